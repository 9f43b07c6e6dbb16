//! [`TagVersions`]: a counter per tag. Invalidating a tag bumps its counter (O(1), no key
//! scan); an entry remembers the versions of its tags when computed, and a read whose
//! tags have moved on is a miss.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::Result;

/// Per-tag version counters.
#[async_trait]
pub trait TagVersions: fmt::Debug + Send + Sync + 'static {
    /// The current version of each tag (0 for a tag never bumped), in order.
    async fn versions(&self, tags: &[&str]) -> Result<Vec<u64>>;

    /// Bumps each tag; returns the new versions, in order.
    async fn bump(&self, tags: &[&str]) -> Result<Vec<u64>>;
}

/// Tag versions in process.
#[derive(Debug, Default)]
pub struct MemoryTagVersions {
    versions: Mutex<HashMap<String, u64>>,
}

#[async_trait]
impl TagVersions for MemoryTagVersions {
    async fn versions(&self, tags: &[&str]) -> Result<Vec<u64>> {
        let versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        Ok(tags
            .iter()
            .map(|t| versions.get(*t).copied().unwrap_or(0))
            .collect())
    }

    async fn bump(&self, tags: &[&str]) -> Result<Vec<u64>> {
        let mut versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        Ok(tags
            .iter()
            .map(|t| {
                let v = versions.entry((*t).to_owned()).or_insert(0);
                *v += 1;
                *v
            })
            .collect())
    }
}

/// Tag versions in Redis: one integer key per tag (`<prefix>:t:<tag>`), read with
/// `MGET` and bumped with `INCR` in one pipeline; each counter expires 31 days after its
/// last bump (a day past the longest entry TTL), so tags that stop being used go away.
#[cfg(feature = "redis")]
#[derive(Clone)]
pub struct RedisTagVersions {
    conn: upcoach_core::redis::RedisConnection,
    prefix: String,
}

#[cfg(feature = "redis")]
impl fmt::Debug for RedisTagVersions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTagVersions")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "redis")]
impl RedisTagVersions {
    /// Tag counters under `prefix` on `conn`.
    pub fn new(conn: upcoach_core::redis::RedisConnection, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
        }
    }

    fn key(&self, tag: &str) -> String {
        format!("{}:t:{tag}", self.prefix)
    }
}

#[cfg(feature = "redis")]
fn backend(e: redis::RedisError) -> crate::Error {
    crate::Error::Backend {
        backend: "redis",
        source: Box::new(e),
    }
}

#[cfg(feature = "redis")]
#[async_trait]
impl TagVersions for RedisTagVersions {
    async fn versions(&self, tags: &[&str]) -> Result<Vec<u64>> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = tags.iter().map(|t| self.key(t)).collect();
        let values: Vec<Option<u64>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(values.into_iter().map(|v| v.unwrap_or(0)).collect())
    }

    async fn bump(&self, tags: &[&str]) -> Result<Vec<u64>> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        // A counter outlives every entry written before its last bump (entries live at
        // most MAX_TTL), so letting it expire afterwards can only turn hits into misses.
        let keep_ms = (crate::MAX_TTL + std::time::Duration::from_secs(86_400)).as_millis() as u64;
        let mut pipe = redis::pipe();
        for tag in tags {
            pipe.cmd("INCR").arg(self.key(tag));
            pipe.cmd("PEXPIRE").arg(self.key(tag)).arg(keep_ms).ignore();
        }
        pipe.query_async(&mut self.conn.clone())
            .await
            .map_err(backend)
    }
}
