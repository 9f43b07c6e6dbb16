//! Caching for upcoach servers: [`CacheStore`], bytes by key with a time to live.
//!
//! - [`MemoryStore`]: in process, bounded by bytes, expiry by the crate's
//!   [`Clock`](upcoach_core::Clock).
//! - `RedisStore` (feature `redis`): one multiplexed, self-reconnecting connection,
//!   keys under a prefix (`CACHE_PREFIX`), batches pipelined.
//! - [`CacheStoreExt`]: typed (serde JSON) get and set over any store.
//! - [`TieredCache`]: an in-process L1 in front of any store as L2, with tags
//!   ([`TagVersions`], O(1) invalidation), LZ4 compression ([`envelope`]), single-flight
//!   loading, stats and fail-open L2 calls.
//!
//! - [`ResponseCacheLayer`]: a tower layer caching whole HTTP responses by rule (GET/HEAD
//!   200s, `Cache-Control`, `Vary`, per-user keys, `ETag`/304, `X-Cache`).
//! - Cross-process L1 coherence over Redis pub/sub ([`TieredCache::enable_coherence`]).
//!
//! Refresh-ahead: [`TieredCache::get_or_refresh`] recomputes an entry read in the last
//! tenth of its life in the background; [`CacheStats`] counts L1 evictions.
//!
//! ```
//! use std::time::Duration;
//! use upcoach_cache::{CacheStore, CacheStoreExt, MemoryStore};
//!
//! # tokio_block_on(async {
//! let store = MemoryStore::new(64 * 1024 * 1024);
//! store.set_json("user:42", &vec!["coach", "admin"], Duration::from_secs(60)).await?;
//! let roles: Option<Vec<String>> = store.get_json("user:42").await?;
//! assert_eq!(roles.unwrap(), ["coach", "admin"]);
//! # Ok::<(), upcoach_cache::Error>(())
//! # }).unwrap();
//! # fn tokio_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
//! #     let mut f = std::pin::pin!(f);
//! #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v } }
//! # }
//! ```
//!
//! Implementing a store (a map without expiry or bounds, for illustration only):
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::Duration;
//! use async_trait::async_trait;
//! use bytes::Bytes;
//! use upcoach_cache::{CacheStore, Result};
//!
//! #[derive(Debug, Default)]
//! struct MapStore(Mutex<HashMap<String, Bytes>>);
//!
//! #[async_trait]
//! impl CacheStore for MapStore {
//!     async fn get(&self, key: &str) -> Result<Option<Bytes>> {
//!         Ok(self.0.lock().unwrap().get(key).cloned())
//!     }
//!     async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
//!         upcoach_cache::check_ttl(ttl)?;
//!         self.0.lock().unwrap().insert(key.to_owned(), value);
//!         Ok(())
//!     }
//!     async fn delete(&self, key: &str) -> Result<bool> {
//!         Ok(self.0.lock().unwrap().remove(key).is_some())
//!     }
//! }
//! ```

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[cfg(feature = "redis")]
mod coherence;
mod config;
pub mod envelope;
mod key;
mod memory;
#[cfg(feature = "redis")]
mod redis_store;
pub mod response;
mod tags;
#[cfg(feature = "testing")]
pub mod testing;
mod tiered;

pub use config::{CacheConfig, DEFAULT_CACHE_PREFIX};
pub use key::{MAX_KEY_LEN, canonical_key};
pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis_store::RedisStore;
pub use response::{CacheRule, ResponseCacheLayer};
#[cfg(feature = "redis")]
pub use tags::RedisTagVersions;
pub use tags::{DEFAULT_MAX_TAGS, MemoryTagVersions, TagVersions};
pub use tiered::{CacheStats, LoadError, TieredCache, TieredOptions};

/// The longest time to live a store accepts: 30 days.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What can go wrong in a cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key cannot be used (it is empty).
    #[error("invalid cache key: {reason}")]
    InvalidKey {
        /// Why.
        reason: &'static str,
    },
    /// The time to live is zero or longer than [`MAX_TTL`].
    #[error("invalid time to live {ttl:?}: expected more than zero and at most 30 days")]
    InvalidTtl {
        /// The refused value.
        ttl: Duration,
    },
    /// A tag is empty, longer than 128 bytes, or an entry has more than 32.
    #[error("invalid tag: {reason}")]
    InvalidTag {
        /// Why.
        reason: &'static str,
    },
    /// A value is larger than the 64 MiB an entry may hold.
    #[error("the value is {len} bytes; an entry holds at most 64 MiB")]
    ValueTooLarge {
        /// Its length.
        len: usize,
    },
    /// A stored entry is not in the format this crate writes (unknown codec header,
    /// truncated, bad compressed data).
    #[error("a cached entry is corrupt: {reason}")]
    Corrupt {
        /// What was wrong.
        reason: &'static str,
    },
    /// A value could not be turned into or out of JSON ([`CacheStoreExt`]).
    #[error("cached value could not be (de)serialized")]
    Serde(#[source] serde_json::Error),
    /// The backend does not support this operation.
    #[error("{operation} is not supported by this cache store")]
    Unsupported {
        /// Which operation.
        operation: &'static str,
    },
    /// The backend failed or did not answer in time.
    #[error("{backend} cache backend failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Whether trying again later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Backend { .. })
    }

    /// A stable snake_case code for clients and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidKey { .. } => "invalid_cache_key",
            Error::InvalidTtl { .. } => "invalid_ttl",
            Error::InvalidTag { .. } => "invalid_tags",
            Error::ValueTooLarge { .. } => "value_too_large",
            Error::Corrupt { .. } => "cache_entry_corrupt",
            Error::Serde(_) => "invalid_cache_value",
            Error::Unsupported { .. } => "unsupported",
            Error::Backend { .. } => "cache_unavailable",
        }
    }
}

impl upcoach_core::http::HttpError for Error {
    fn status(&self) -> http::StatusCode {
        match self {
            Error::InvalidKey { .. } | Error::InvalidTtl { .. } | Error::InvalidTag { .. } => {
                http::StatusCode::BAD_REQUEST
            }
            Error::ValueTooLarge { .. } => http::StatusCode::PAYLOAD_TOO_LARGE,
            Error::Backend { .. } => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        Error::code(self)
    }

    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Refuses a zero time to live or one over [`MAX_TTL`], as every store does.
pub fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(Error::InvalidTtl { ttl });
    }
    Ok(())
}

/// Bytes by key, each entry with its own time to live.
///
/// Keys are any non-empty UTF-8; keys longer than [`MAX_KEY_LEN`] bytes are stored under
/// a digest of themselves ([`canonical_key`]), the same way in every store. Values may be
/// empty. The required surface is `get`, `set` and `delete`; the batched and existence
/// operations have default implementations that a store overrides when it can do better
/// (one pipelined round trip to Redis, say).
#[async_trait]
pub trait CacheStore: fmt::Debug + Send + Sync + 'static {
    /// The value under `key`, if present and not expired.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;

    /// Stores `value` under `key` for `ttl` (see [`check_ttl`]).
    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()>;

    /// Removes `key`; whether it was present (and not expired).
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Whether `key` is present and not expired.
    async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.get(key).await?.is_some())
    }

    /// The values under `keys`, in order.
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(key).await?);
        }
        Ok(out)
    }

    /// Stores every `(key, value, ttl)`; all TTLs are checked before anything is stored.
    async fn set_many(&self, entries: &[(&str, Bytes, Duration)]) -> Result<()> {
        for (_, _, ttl) in entries {
            check_ttl(*ttl)?;
        }
        for (key, value, ttl) in entries {
            self.set(key, value.clone(), *ttl).await?;
        }
        Ok(())
    }
}

/// Typed helpers over any [`CacheStore`]: values as JSON.
#[async_trait]
pub trait CacheStoreExt: CacheStore {
    /// The value under `key`, decoded from JSON; a value that does not decode is an
    /// error, not a miss.
    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.get(key).await? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(Error::Serde),
            None => Ok(None),
        }
    }

    /// Stores `value` as JSON under `key` for `ttl`.
    async fn set_json<T: Serialize + Sync>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(Error::Serde)?;
        self.set(key, Bytes::from(bytes), ttl).await
    }
}

impl<S: CacheStore + ?Sized> CacheStoreExt for S {}
