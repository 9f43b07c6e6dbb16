//! [`RedisFlowStore`]: the flow store in Redis.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use upcoach_core::redis::RedisConnection;

use super::{FlowError, FlowStore, check_entry, check_key};

const BACKEND: &str = "redis";

fn backend(e: ::redis::RedisError) -> FlowError {
    FlowError::Backend {
        backend: BACKEND,
        source: Box::new(e),
    }
}

/// A flow store in Redis (6.2 or later), shared by every process of a deployment.
///
/// - [`put`](FlowStore::put) is one `SET <prefix><key> <value> PX <ttl ms> NX`: Redis
///   refuses a live key atomically and expires the value by itself.
/// - [`take`](FlowStore::take) is one `GETDEL`: of concurrent takes, Redis answers
///   exactly one with the value.
/// - Keys are `<prefix><key>`; the prefix defaults to `upcoach:flow:`.
///
/// It shares one multiplexed, self-reconnecting connection ([`RedisConnection`], which
/// times commands out and replaces a link gone silent); clones of the store share it
/// too. An outage fails a call instead of hanging it; the failure is
/// [`FlowError::Backend`], which is retryable.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use upcoach_auth::flow::{FlowStore, RedisFlowStore};
///
/// use upcoach_core::config::ServiceUrl;
/// use upcoach_core::redis::{RedisConnection, RedisOptions};
///
/// let url = ServiceUrl::parse("redis://127.0.0.1:6379", &["redis"])?;
/// let redis = RedisConnection::connect(&url, RedisOptions::default()).await?;
/// let store = RedisFlowStore::new(redis).with_prefix("myapp:flow:");
/// store.put("state:q8Zr", b"verifier", Duration::from_secs(600)).await?;
/// assert_eq!(store.take("state:q8Zr").await?.as_deref(), Some(&b"verifier"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisFlowStore {
    conn: RedisConnection,
    prefix: String,
}

impl fmt::Debug for RedisFlowStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisFlowStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisFlowStore {
    /// The prefix of every key unless [`with_prefix`](Self::with_prefix) says otherwise.
    pub const DEFAULT_PREFIX: &'static str = "upcoach:flow:";

    /// A store using `conn`, with keys under [`DEFAULT_PREFIX`](Self::DEFAULT_PREFIX).
    pub fn new(conn: RedisConnection) -> Self {
        Self {
            conn,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
        }
    }

    /// The same store with keys under `prefix` (put in front of each key as is, so end
    /// it with a separator such as `:`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The prefix of every key.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key of `key`.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// `ttl` in whole milliseconds, rounded up so a value never lives shorter than asked.
fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

#[async_trait]
impl FlowStore for RedisFlowStore {
    async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), FlowError> {
        check_entry(key, value, ttl)?;
        let stored: Option<String> = ::redis::cmd("SET")
            .arg(self.redis_key(key))
            .arg(value)
            .arg("PX")
            .arg(millis(ttl))
            .arg("NX")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        match stored {
            Some(_) => Ok(()),
            None => Err(FlowError::KeyExists),
        }
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, FlowError> {
        check_key(key)?;
        ::redis::cmd("GETDEL")
            .arg(self.redis_key(key))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_milliseconds() {
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_millis(250)), 250);
        assert_eq!(millis(Duration::from_micros(1_500)), 2);
        assert_eq!(millis(Duration::from_secs(3600)), 3_600_000);
    }
}
