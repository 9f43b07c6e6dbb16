//! [`MemoryDeletionStore`]: data-deletion requests in process memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;

use super::{
    ConfirmationCode, DeletionError, DeletionOutcome, DeletionRequest, DeletionStore, SubjectHash,
    check_subject,
};
use crate::ProviderId;

/// A deletion store in process memory: for one process (the reference server without
/// Postgres), and for tests. Everything is lost when the process ends, so a real
/// deployment keeps its requests in `PgDeletionStore`.
///
/// - **Bounded** by a number of requests ([`with_capacity`](Self::with_capacity); 100,000
///   by default). Every [`record`](DeletionStore::record) first drops the requests past
///   [`RETENTION`](super::RETENTION), oldest first; when the kept ones still fill the
///   store it refuses with [`DeletionError::Full`] rather than drop a request someone may
///   still look up.
/// - **Atomic**: one lock, never held across an `.await`, around every read-and-change,
///   so concurrent records of one subject make one request.
/// - `Debug` shows every request it holds, with each subject as its
///   [`SubjectHash`] only.
///
/// ```
/// use std::time::SystemTime;
/// use upcoach_auth::deletion::{DeletionError, DeletionStore, MemoryDeletionStore};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = MemoryDeletionStore::with_capacity(1);
/// let facebook = "facebook".parse().unwrap();
/// store.record(facebook, "1001", SystemTime::now()).await?;
/// let full = store.record(facebook, "1002", SystemTime::now()).await.unwrap_err();
/// assert_eq!(full.code(), "deletion_store_full");
/// # Ok::<(), DeletionError>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct MemoryDeletionStore {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    requests: HashMap<ConfirmationCode, Kept>,
    by_subject: HashMap<SubjectHash, ConfirmationCode>,
    /// Every request by (`requested_at`, insertion number), so the oldest expire first.
    by_age: BTreeMap<(SystemTime, u64), ConfirmationCode>,
    next_seq: u64,
}

#[derive(Debug)]
struct Kept {
    request: DeletionRequest,
    subject: SubjectHash,
}

impl State {
    /// Drops every request past retention at `now`.
    fn sweep(&mut self, now: SystemTime) {
        while let Some(oldest) = self.by_age.first_entry() {
            let expired = self
                .requests
                .get(oldest.get())
                .is_none_or(|kept| kept.request.is_expired(now));
            if !expired {
                break;
            }
            let code = oldest.remove();
            if let Some(gone) = self.requests.remove(&code) {
                self.by_subject.remove(&gone.subject);
            }
        }
    }

    /// The request with `code`, if it is kept at `now`.
    fn live(&mut self, code: &ConfirmationCode, now: SystemTime) -> Option<&mut DeletionRequest> {
        self.requests
            .get_mut(code)
            .map(|kept| &mut kept.request)
            .filter(|request| !request.is_expired(now))
    }
}

impl MemoryDeletionStore {
    /// How many requests [`new`](Self::new) keeps at most.
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// An empty store keeping at most [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY)
    /// requests.
    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// An empty store keeping at most `capacity` requests (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
        }
    }

    /// The most requests kept at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many requests the store holds, counting those past retention that no
    /// [`record`](DeletionStore::record) has dropped yet.
    pub fn len(&self) -> usize {
        self.lock().requests.len()
    }

    /// Whether the store holds no request at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each change to `State` is completed before the lock is released (nothing in
        // between can panic but an allocation failure), so a poisoned lock holds a
        // consistent state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for MemoryDeletionStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl DeletionStore for MemoryDeletionStore {
    async fn record(
        &self,
        provider: ProviderId,
        subject: &str,
        now: SystemTime,
    ) -> Result<DeletionRequest, DeletionError> {
        check_subject(subject)?;
        let hash = SubjectHash::of(&provider, subject);
        let mut code = ConfirmationCode::generate()?;
        let mut state = self.lock();
        state.sweep(now);
        // Every request left is kept at `now`.
        if let Some(kept) = state
            .by_subject
            .get(&hash)
            .and_then(|code| state.requests.get(code))
        {
            return Ok(kept.request.clone());
        }
        if state.requests.len() >= self.capacity {
            return Err(DeletionError::Full {
                capacity: self.capacity,
            });
        }
        // 128 random bits do not collide; a map that silently replaced a request would
        // still be worse than this loop.
        while state.requests.contains_key(&code) {
            code = ConfirmationCode::generate()?;
        }
        let request = DeletionRequest::new(code.clone(), provider, now);
        let seq = state.next_seq;
        state.next_seq += 1;
        state
            .by_age
            .insert((request.requested_at, seq), code.clone());
        state.by_subject.insert(hash, code.clone());
        state.requests.insert(
            code,
            Kept {
                request: request.clone(),
                subject: hash,
            },
        );
        Ok(request)
    }

    async fn complete(
        &self,
        code: &ConfirmationCode,
        outcome: DeletionOutcome,
        now: SystemTime,
    ) -> Result<Option<DeletionRequest>, DeletionError> {
        let mut state = self.lock();
        Ok(state.live(code, now).map(|request| {
            request.complete(outcome, now);
            request.clone()
        }))
    }

    async fn get(
        &self,
        code: &ConfirmationCode,
        now: SystemTime,
    ) -> Result<Option<DeletionRequest>, DeletionError> {
        Ok(self.lock().live(code, now).map(|request| request.clone()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::deletion::RETENTION;

    #[tokio::test]
    async fn sweeping_keeps_the_indexes_in_step() {
        let store = MemoryDeletionStore::with_capacity(3);
        let facebook: ProviderId = "facebook".parse().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for (i, subject) in ["a", "b", "c"].into_iter().enumerate() {
            let at = t0 + Duration::from_secs(i as u64);
            store.record(facebook, subject, at).await.unwrap();
        }
        // "a" and "b" expire; "c" stays; "d" takes a freed place.
        let later = t0 + RETENTION + Duration::from_secs(1);
        store.record(facebook, "d", later).await.unwrap();
        let state = store.lock();
        assert_eq!(state.requests.len(), 2);
        assert_eq!(state.by_subject.len(), 2);
        assert_eq!(state.by_age.len(), 2);
        for kept in state.requests.values() {
            assert_eq!(
                state.by_subject.get(&kept.subject),
                Some(&kept.request.code)
            );
        }
        for ((requested_at, _), code) in &state.by_age {
            assert_eq!(state.requests[code].request.requested_at, *requested_at);
        }
    }
}
