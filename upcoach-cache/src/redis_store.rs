//! [`RedisStore`]: the Redis store.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::ConnectionManager;

use crate::{CacheStore, Error, Result, canonical_key, check_ttl};

const BACKEND: &str = "redis";

fn backend(e: redis::RedisError) -> Error {
    Error::Backend {
        backend: BACKEND,
        source: Box::new(e),
    }
}

/// A store in Redis: every key under `<prefix>:v:`, values as Redis strings with a
/// millisecond TTL (`SET .. PX`), batches in one round trip (`MGET`, a pipeline of
/// `SET`s).
///
/// It shares one multiplexed, self-reconnecting connection ([`ConnectionManager`]);
/// clones of the store share it too, with no lock around it.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use upcoach_cache::{CacheStore, RedisStore};
///
/// let client = redis::Client::open("redis://127.0.0.1:6379")?;
/// let store = RedisStore::new(redis::aio::ConnectionManager::new(client).await?, "upcoach");
/// store.set("greeting", "hi".into(), Duration::from_secs(60)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store using `conn`, with keys under `prefix` (`CACHE_PREFIX`).
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
        }
    }

    /// The Redis key of `key`: `<prefix>:v:<key>`, apart from tag counters
    /// (`<prefix>:t:`) and anything else the host keeps under the prefix.
    pub fn redis_key(&self, key: &str) -> Result<String> {
        Ok(format!("{}:v:{}", self.prefix, canonical_key(key)?))
    }
}

fn millis(ttl: Duration) -> u64 {
    ttl.as_millis().max(1) as u64
}

#[async_trait]
impl CacheStore for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let key = self.redis_key(key)?;
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(value.map(Bytes::from))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        check_ttl(ttl)?;
        let key = self.redis_key(key)?;
        redis::cmd("SET")
            .arg(key)
            .arg(value.as_ref())
            .arg("PX")
            .arg(millis(ttl))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(backend)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = self.redis_key(key)?;
        let removed: u64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(removed > 0)
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let key = self.redis_key(key)?;
        let n: u64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(n > 0)
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys = keys
            .iter()
            .map(|k| self.redis_key(k))
            .collect::<Result<Vec<_>>>()?;
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    async fn set_many(&self, entries: &[(&str, Bytes, Duration)]) -> Result<()> {
        let mut pipe = redis::pipe();
        for (key, value, ttl) in entries {
            check_ttl(*ttl)?;
            pipe.cmd("SET")
                .arg(self.redis_key(key)?)
                .arg(value.as_ref())
                .arg("PX")
                .arg(millis(*ttl))
                .ignore();
        }
        if entries.is_empty() {
            return Ok(());
        }
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(backend)
    }
}
