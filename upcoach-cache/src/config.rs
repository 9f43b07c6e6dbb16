//! The cache's settings: `CACHE_PREFIX`.

use upcoach_core::config::{Env, Settings};

/// The default key prefix in Redis (`CACHE_PREFIX`).
pub const DEFAULT_CACHE_PREFIX: &str = "upcoach";

/// What the cache reads from the environment.
///
/// ```
/// use upcoach_cache::CacheConfig;
/// use upcoach_core::config::Settings;
///
/// assert_eq!(CacheConfig::from_lookup(|_| None)?.prefix, "upcoach");
/// assert!(CacheConfig::from_lookup(|n| (n == "CACHE_PREFIX").then(|| "a b".into())).is_err());
/// # Ok::<(), upcoach_core::config::ConfigErrors>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheConfig {
    /// `CACHE_PREFIX`: prefix of every key in Redis (1 to 64 of `A-Z a-z 0-9 _ - . :`;
    /// default `upcoach`). The reference server puts its other Redis keys under it too.
    pub prefix: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_CACHE_PREFIX.to_owned(),
        }
    }
}

impl Settings for CacheConfig {
    fn read(env: &mut Env<'_>) -> Self {
        let prefix = match env.get("CACHE_PREFIX") {
            None => DEFAULT_CACHE_PREFIX.to_owned(),
            Some(v) => {
                let ok = (1..=64).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
                if !ok {
                    env.invalid(
                        "CACHE_PREFIX",
                        "1 to 64 characters of A-Z, a-z, 0-9, '_', '-', '.' or ':'",
                        Some(v.clone()),
                    );
                }
                v
            }
        };
        Self { prefix }
    }
}
