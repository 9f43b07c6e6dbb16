//! [`MemoryStore`]: the in-process store, bounded by bytes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use quick_cache::Weighter;
use quick_cache::sync::Cache;
use upcoach_core::{Clock, SystemClock};

use crate::{CacheStore, Result, canonical_key, check_ttl};

#[derive(Debug, Clone)]
struct Entry {
    value: Bytes,
    expires_at: SystemTime,
}

#[derive(Debug, Clone, Copy)]
struct ByBytes;

impl Weighter<String, Entry> for ByBytes {
    fn weight(&self, key: &String, entry: &Entry) -> u64 {
        // Key, value and bookkeeping, so that empty values still weigh something.
        (key.len() + entry.value.len() + 64) as u64
    }
}

/// An in-process store on `quick_cache`, bounded by the bytes of its keys and values.
///
/// When full, the least useful entries (quick_cache's CLOCK-Pro policy) make room.
/// Expiry is decided by the [`Clock`] given (the system clock by default), so tests can
/// move time; an expired entry is a miss and is removed when next touched.
#[derive(Debug)]
pub struct MemoryStore {
    entries: Cache<String, Entry, ByBytes>,
    clock: Arc<dyn Clock>,
}

impl MemoryStore {
    /// A store of at most `max_bytes` of keys and values, on the system clock.
    pub fn new(max_bytes: u64) -> Self {
        Self::with_clock(max_bytes, Arc::new(SystemClock))
    }

    /// A store of at most `max_bytes`, with expiry by `clock`.
    pub fn with_clock(max_bytes: u64, clock: Arc<dyn Clock>) -> Self {
        // quick_cache sizes its tables from an estimate of the item count.
        let estimated_items = (max_bytes / 512).clamp(16, 1 << 22) as usize;
        Self {
            entries: Cache::with_weighter(estimated_items, max_bytes.max(1), ByBytes),
            clock,
        }
    }

    /// How many entries are held (expired ones included until touched).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes held, as weighed.
    pub fn weight(&self) -> u64 {
        self.entries.weight()
    }

    fn live(&self, key: &str) -> Option<Entry> {
        let entry = self.entries.get(key)?;
        if self.clock.now() >= entry.expires_at {
            self.entries.remove(key);
            return None;
        }
        Some(entry)
    }
}

#[async_trait]
impl CacheStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let key = canonical_key(key)?;
        Ok(self.live(&key).map(|e| e.value))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        check_ttl(ttl)?;
        let key = canonical_key(key)?;
        let expires_at = self.clock.now() + ttl;
        self.entries
            .insert(key.into_owned(), Entry { value, expires_at });
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = canonical_key(key)?;
        let live = self.live(&key).is_some();
        self.entries.remove(key.as_ref());
        Ok(live)
    }
}
