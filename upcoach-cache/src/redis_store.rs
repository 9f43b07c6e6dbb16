//! [`RedisStore`]: the Redis store.

use std::borrow::Cow;
use std::io::Write;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::{Cmd, RedisWrite, ToRedisArgs};
use upcoach_core::redis::RedisConnection;

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
/// It shares one multiplexed, self-reconnecting connection ([`RedisConnection`], which
/// times commands out and replaces a link gone silent); clones of the store share it
/// too, with no lock around it.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use upcoach_cache::{CacheStore, RedisStore};
///
/// use upcoach_core::config::ServiceUrl;
/// use upcoach_core::redis::{RedisConnection, RedisOptions};
///
/// let url = ServiceUrl::parse("redis://127.0.0.1:6379", &["redis"])?;
/// let redis = RedisConnection::connect(&url, RedisOptions::default()).await?;
/// let store = RedisStore::new(redis, "upcoach");
/// store.set("greeting", "hi".into(), Duration::from_secs(60)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConnection,
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
    pub fn new(conn: RedisConnection, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
        }
    }

    /// The Redis key of `key`: `<prefix>:v:<key>`, apart from tag counters
    /// (`<prefix>:t:`) and anything else the host keeps under the prefix.
    pub fn redis_key(&self, key: &str) -> Result<String> {
        let key = self.value_key(key)?;
        let mut out = String::with_capacity(key.len());
        for part in key.parts() {
            out.push_str(part);
        }
        Ok(out)
    }

    /// `key` as a command argument, written straight into the command's buffer.
    fn value_key<'a>(&'a self, key: &'a str) -> Result<ValueKey<'a>> {
        Ok(ValueKey {
            prefix: &self.prefix,
            key: canonical_key(key)?,
        })
    }

    /// `name key`, with room for both: no reallocation while it is built.
    fn key_cmd(name: &str, key: &ValueKey<'_>, extra_args: usize, extra_len: usize) -> Cmd {
        let mut cmd = Cmd::with_capacity(2 + extra_args, name.len() + key.len() + extra_len);
        cmd.arg(name).arg(key);
        cmd
    }
}

/// `<prefix>:v:<canonical key>` as one Redis argument, written into the command without
/// an intermediate `String`: a read is on the hot path of every L2 hit.
struct ValueKey<'a> {
    prefix: &'a str,
    key: Cow<'a, str>,
}

impl ValueKey<'_> {
    fn parts(&self) -> [&str; 3] {
        [self.prefix, ":v:", &self.key]
    }

    fn len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }
}

impl ToRedisArgs for &ValueKey<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut arg = out.writer_for_next_arg();
        for part in self.parts() {
            // Writing to the command's buffer cannot fail.
            let _ = arg.write_all(part.as_bytes());
        }
    }
}

fn millis(ttl: Duration) -> u64 {
    ttl.as_millis().max(1) as u64
}

#[async_trait]
impl CacheStore for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let cmd = Self::key_cmd("GET", &self.value_key(key)?, 0, 0);
        let value: Option<Vec<u8>> = cmd
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(value.map(Bytes::from))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        check_ttl(ttl)?;
        let mut cmd = Self::key_cmd("SET", &self.value_key(key)?, 3, value.len() + 22);
        cmd.arg(value.as_ref()).arg("PX").arg(millis(ttl));
        cmd.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(backend)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let cmd = Self::key_cmd("DEL", &self.value_key(key)?, 0, 0);
        let removed: u64 = cmd
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(removed > 0)
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let cmd = Self::key_cmd("EXISTS", &self.value_key(key)?, 0, 0);
        let n: u64 = cmd
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(n > 0)
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(&self.value_key(key)?);
        }
        let values: Vec<Option<Vec<u8>>> = cmd
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
                .arg(&self.value_key(key)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_argument_is_the_prefixed_canonical_key() {
        let long = "k".repeat(1000);
        for key in ["user:42", "ключ", long.as_str()] {
            let arg = ValueKey {
                prefix: "app",
                key: canonical_key(key).unwrap(),
            };
            let expected = format!("app:v:{}", canonical_key(key).unwrap());
            assert_eq!(arg.len(), expected.len());
            assert_eq!(
                RedisStore::key_cmd("GET", &arg, 0, 0).get_packed_command(),
                redis::cmd("GET").arg(&expected).get_packed_command()
            );
        }
    }
}
