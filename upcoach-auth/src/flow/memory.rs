//! [`MemoryFlowStore`]: the in-process flow store.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use upcoach_core::{Clock, SystemClock};

use super::{FlowError, FlowStore, check_entry, check_key};

/// Options of a [`MemoryFlowStore`]; start from [`MemoryFlowStore::builder`].
#[derive(Debug, Clone)]
pub struct MemoryFlowStoreBuilder {
    clock: Arc<dyn Clock>,
    max_entries: usize,
    max_bytes: usize,
}

impl MemoryFlowStoreBuilder {
    /// The clock that decides expiry (default the system clock; a
    /// [`ManualClock`](upcoach_core::ManualClock) in tests).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The most entries held at once (default 100,000; at least 1).
    pub fn max_entries(mut self, entries: usize) -> Self {
        self.max_entries = entries.max(1);
        self
    }

    /// The most bytes of keys and values held at once (default 64 MiB; at least 1).
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes.max(1);
        self
    }

    /// The store.
    pub fn build(self) -> MemoryFlowStore {
        MemoryFlowStore {
            clock: self.clock,
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            state: Mutex::new(State::default()),
        }
    }
}

/// A flow store in process memory: for one process, and for tests.
///
/// - **Expiry** by its [`Clock`]: a value is gone at its expiry instant exactly.
/// - **Bounded** by entries (default 100,000) and by bytes of keys and values (default
///   64 MiB). Expired entries are swept, oldest expiry first, by every call; when the
///   live entries still fill the store, [`put`](FlowStore::put) refuses with
///   [`FlowError::Full`] rather than evict a flow that is still running.
/// - **Atomic**: one lock, never held across an `.await`, around every read-and-change.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use upcoach_auth::flow::{FlowError, FlowStore, MemoryFlowStore};
/// use upcoach_core::ManualClock;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let clock = Arc::new(ManualClock::starting_now());
/// let store = MemoryFlowStore::builder().clock(clock.clone()).max_entries(10_000).build();
/// store.put("state:q8Zr", b"verifier", Duration::from_secs(600)).await?;
/// clock.advance(Duration::from_secs(600));
/// assert_eq!(store.take("state:q8Zr").await?, None, "expired");
/// # Ok::<(), FlowError>(())
/// # }).unwrap();
/// ```
pub struct MemoryFlowStore {
    clock: Arc<dyn Clock>,
    max_entries: usize,
    max_bytes: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Every entry by (expiry, insertion number), so sweeping starts at the oldest.
    expiries: BTreeMap<(SystemTime, u64), String>,
    next_seq: u64,
    bytes: usize,
}

struct Entry {
    value: Vec<u8>,
    expires_at: SystemTime,
    seq: u64,
}

impl State {
    /// Removes every entry whose expiry is at or before `now`.
    fn sweep(&mut self, now: SystemTime) {
        while let Some(entry) = self.expiries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            if let Some(gone) = self.entries.remove(&key) {
                self.bytes -= key.len() + gone.value.len();
            }
        }
    }

    fn remove(&mut self, key: &str) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.expiries.remove(&(entry.expires_at, entry.seq));
        self.bytes -= key.len() + entry.value.len();
        Some(entry)
    }
}

impl MemoryFlowStore {
    /// A store with the system clock and the default bounds.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Options, starting from the defaults.
    pub fn builder() -> MemoryFlowStoreBuilder {
        MemoryFlowStoreBuilder {
            clock: Arc::new(SystemClock),
            max_entries: 100_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }

    /// How many live entries the store holds (expired ones are swept first).
    pub fn len(&self) -> usize {
        let now = self.clock.now();
        let mut state = self.lock();
        state.sweep(now);
        state.entries.len()
    }

    /// Whether the store holds no live entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many bytes of keys and values the live entries hold.
    pub fn bytes(&self) -> usize {
        let now = self.clock.now();
        let mut state = self.lock();
        state.sweep(now);
        state.bytes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change to `State` completes before its lock is released (nothing in
        // between can panic but an allocation failure), so a poisoned lock holds a
        // consistent state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for MemoryFlowStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryFlowStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryFlowStore")
            .field("clock", &self.clock)
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl FlowStore for MemoryFlowStore {
    async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), FlowError> {
        check_entry(key, value, ttl)?;
        let now = self.clock.now();
        let expires_at = now + ttl;
        let size = key.len() + value.len();
        let mut state = self.lock();
        state.sweep(now);
        if state.entries.contains_key(key) {
            return Err(FlowError::KeyExists);
        }
        if state.entries.len() >= self.max_entries || state.bytes + size > self.max_bytes {
            return Err(FlowError::Full {
                entries: state.entries.len(),
                bytes: state.bytes,
            });
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.expiries.insert((expires_at, seq), key.to_owned());
        state.entries.insert(
            key.to_owned(),
            Entry {
                value: value.to_vec(),
                expires_at,
                seq,
            },
        );
        state.bytes += size;
        Ok(())
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, FlowError> {
        check_key(key)?;
        let now = self.clock.now();
        let mut state = self.lock();
        state.sweep(now);
        Ok(state.remove(key).map(|entry| entry.value))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use upcoach_core::ManualClock;

    use super::*;

    #[tokio::test]
    async fn bytes_are_counted_and_given_back() {
        let clock = Arc::new(ManualClock::starting_now());
        let store = MemoryFlowStore::builder().clock(clock.clone()).build();
        store
            .put("a", b"12345", Duration::from_secs(1))
            .await
            .unwrap();
        store
            .put("bb", b"123", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(store.bytes(), 6 + 5);
        store.take("bb").await.unwrap();
        assert_eq!(store.bytes(), 6);
        clock.advance(Duration::from_secs(1));
        assert_eq!(store.bytes(), 0);
        assert!(store.is_empty());
        let state = store.lock();
        assert!(state.entries.is_empty() && state.expiries.is_empty());
    }
}
