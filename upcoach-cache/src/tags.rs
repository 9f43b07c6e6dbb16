//! [`TagVersions`]: a counter per tag. Invalidating a tag bumps its counter (O(1), no key
//! scan); an entry remembers the versions of its tags when computed, and a read whose
//! tags have moved on is a miss.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::Result;

/// Per-tag version counters.
///
/// A tag's version never goes back: each read is at least every earlier read of it.
#[async_trait]
pub trait TagVersions: fmt::Debug + Send + Sync + 'static {
    /// The current version of each tag (0 for a tag never bumped, unless a bounded
    /// store forgot tags to make room: see [`MemoryTagVersions`]), in order.
    async fn versions(&self, tags: &[&str]) -> Result<Vec<u64>>;

    /// Bumps each tag; returns the new versions, in order.
    async fn bump(&self, tags: &[&str]) -> Result<Vec<u64>>;
}

/// The default most tags a [`MemoryTagVersions`] remembers (about 20 MiB of tags of the
/// longest name).
pub const DEFAULT_MAX_TAGS: usize = 100_000;

/// Tag versions in process.
///
/// **Bounded**: it remembers at most [`DEFAULT_MAX_TAGS`] bumped tags
/// ([`with_max_tags`](Self::with_max_tags)). A bump of a new tag that finds it full
/// forgets every tag and raises a *floor* above every version it ever gave out: from
/// then on a tag it does not remember reads the floor. So no version goes back (a
/// forgotten tag that read 3 reads at least 4), every entry tagged before the
/// forgetting is a miss once (never a stale hit), and the count of forgettings is
/// [`forgotten`](Self::forgotten). Without forgetting, a tag never bumped reads 0.
#[derive(Debug)]
pub struct MemoryTagVersions {
    max_tags: usize,
    state: Mutex<TagState>,
}

#[derive(Debug, Default)]
struct TagState {
    versions: HashMap<String, u64>,
    /// What a tag not in `versions` reads: above every version given out before the
    /// last forgetting.
    floor: u64,
    forgotten: u64,
}

impl Default for MemoryTagVersions {
    fn default() -> Self {
        Self::with_max_tags(DEFAULT_MAX_TAGS)
    }
}

impl MemoryTagVersions {
    /// Remembers at most `max_tags` bumped tags (at least 1).
    pub fn with_max_tags(max_tags: usize) -> Self {
        Self {
            max_tags: max_tags.max(1),
            state: Mutex::new(TagState::default()),
        }
    }

    /// How many tags it remembers now.
    pub fn len(&self) -> usize {
        self.lock().versions.len()
    }

    /// Whether it remembers no tag.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many times it forgot every tag to make room, since start.
    pub fn forgotten(&self) -> u64 {
        self.lock().forgotten
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TagState> {
        // Every change is a whole insert, clear or increment: a poisoned lock still
        // guards consistent counters.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl TagVersions for MemoryTagVersions {
    async fn versions(&self, tags: &[&str]) -> Result<Vec<u64>> {
        let state = self.lock();
        Ok(tags
            .iter()
            .map(|t| state.versions.get(*t).copied().unwrap_or(state.floor))
            .collect())
    }

    async fn bump(&self, tags: &[&str]) -> Result<Vec<u64>> {
        let mut state = self.lock();
        let state = &mut *state;
        Ok(tags
            .iter()
            .map(|t| {
                if !state.versions.contains_key(*t) && state.versions.len() >= self.max_tags {
                    // Above everything given out: every forgotten tag moves on.
                    let top = state.versions.values().copied().max().unwrap_or(0);
                    state.floor = state.floor.max(top) + 1;
                    state.versions.clear();
                    state.forgotten += 1;
                }
                let v = state.versions.entry((*t).to_owned()).or_insert(state.floor);
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
