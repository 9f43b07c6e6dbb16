//! GCRA in memory, on `governor`: [`MemoryLimiter`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::SystemTime;

use governor::clock::{Clock as GovernorClock, QuantaClock, QuantaInstant, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};

use super::*;
use crate::Clock;

/// Checks on one thread between two looks at the tables (expired keys and blocks
/// dropped, keys recounted); a look runs at most once per [`TIDY_SPACING`].
const TIDY_EVERY: u32 = 4_096;

/// The least time between two tidy-ups, on the limiter's clock: dropping the expired
/// keys walks the whole table (a few milliseconds at 100,000 keys).
const TIDY_SPACING: u64 = 1_000_000_000;

/// Per-thread scratch space of the checks.
struct Scratch {
    /// The subject of the check in progress as governor's key (a `String`), reused
    /// so a check allocates nothing for a key it has seen.
    key: RefCell<String>,
    /// Set by [`SharedStore`] when the check in progress would make a key of a subject
    /// that is not valid (which it does not make).
    invalid: Cell<bool>,
    /// The last time governor read on this thread: the instant of the last decision,
    /// from which a refusal's wait is measured (without reading the clock again).
    now: Cell<u64>,
    /// Checks on this thread since the last tidy-up.
    ticks: Cell<u32>,
    /// The tables this thread used last, so a check takes no lock (a shared lock
    /// is a write to one cache line from every core). Holds at most [`CACHED`] tables
    /// alive after their limiter is gone.
    buckets: RefCell<[Option<CachedBucket>; CACHED]>,
    /// The entry of `buckets` to replace next.
    next: Cell<usize>,
    /// The entry of `buckets` used last.
    last: Cell<usize>,
}

/// Tables each thread keeps at hand.
const CACHED: usize = 4;

/// One entry of a thread's [`Scratch::buckets`]: valid while its limiter's generation
/// has not moved (a table was dropped).
struct CachedBucket {
    limiter: usize,
    generation: u64,
    quota: Quota,
    rule: Box<str>,
    bucket: Arc<Bucket>,
}

/// Tells limiters apart in the threads' caches.
static NEXT_LIMITER: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SCRATCH: Scratch = const {
        Scratch {
            key: RefCell::new(String::new()),
            invalid: Cell::new(false),
            now: Cell::new(0),
            ticks: Cell::new(0),
            buckets: RefCell::new([const { None }; CACHED]),
            next: Cell::new(0),
            last: Cell::new(0),
        }
    };
}

/// A quick hash for a rule's quotas: they come from the program's rules, not from
/// clients, so it needs no protection against chosen collisions.
#[derive(Default, Clone, Copy)]
struct QuotaHasher(u64);

impl Hasher for QuotaHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// A rule's tables, one per quota it was checked with.
type QuotaMap = HashMap<Quota, Arc<Bucket>, BuildHasherDefault<QuotaHasher>>;

/// Every table: rule -> quota -> table.
type Tables = HashMap<Box<str>, QuotaMap, foldhash::fast::RandomState>;

/// `Err` for the first of `rule` and `subject` that is not a valid name.
fn invalid_names(rule: &str, subject: &str) -> LimitError {
    match validate_name(rule).and_then(|()| validate_name(subject)) {
        Err(error) => error,
        Ok(()) => LimitError::InvalidName(subject.chars().take(40).collect()),
    }
}

/// GCRA in memory, on [`governor`]'s keyed limiters: one per (rule, [`Quota`]), keyed by
/// subject.
///
/// - **Time**: [`new`](Self::new) uses a fast monotonic clock (`quanta`);
///   [`with_clock`](Self::with_clock) takes a [`Clock`] so tests can move time by hand
///   (a clock set backwards only makes waits longer).
/// - **Decisions**: `remaining` is governor's remaining burst capacity; `retry_after` is
///   the wait governor reports. `reset_after` is derived, since governor does not expose
///   the stored arrival time: when refused it is exact (`retry_after + (limit - 1) ×
///   emission interval`); when allowed it is `(limit - remaining) × emission interval`,
///   which may exceed the true time by less than one emission interval (never falls
///   short).
/// - **Bounded memory**: at most [`DEFAULT_MAX_KEYS`](Self::DEFAULT_MAX_KEYS) (rule,
///   subject) keys ([`with_max_keys`](Self::with_max_keys)), roughly 100 bytes each
///   plus the names. Keys whose bucket has been full again for one emission interval
///   are dropped every few thousand checks (at most once a second) and whenever the
///   table is full. A **new** key that still finds the table full is refused
///   (`allowed: false`, `retry_after` [`FULL_RETRY_AFTER`](Self::FULL_RETRY_AFTER)) and
///   counted in [`MemoryLimiterStats::refused_full`]; keys already present keep
///   working. The bound can be overshot by the number of checks running at that
///   instant.
/// - **Blocks**: at most [`DEFAULT_MAX_BLOCKS`](Self::DEFAULT_MAX_BLOCKS) subjects
///   ([`with_max_blocks`](Self::with_max_blocks)); a block that finds no room once
///   expired blocks are dropped fails with [`LimitError::Unavailable`].
/// - **Cost**: a check takes no lock of its own (each thread keeps the last few tables
///   at hand), allocates nothing for a key already present (awaiting
///   [`check`](RateLimiter::check) included: its [`LimitFuture`] is made already), and
///   checks a name in full only when it makes its table or key (what is in a table
///   is valid). The key tables hash with `foldhash`, seeded at random per table,
///   rather than SipHash. `cargo bench --bench rate_limit` measures it beside a bare
///   governor `check_key`.
/// - **Quotas**: each (rule, quota) has its budget of its own, so a rule whose quota
///   changes (a tightened rule) starts its subjects on a full bucket of the new quota.
///   (The Redis limiter keeps one arrival time per (rule, subject) whatever the quota.)
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use upcoach_core::ManualClock;
/// use upcoach_core::limit::{MemoryLimiter, Quota, RateLimiter};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let clock = Arc::new(ManualClock::starting_now());
/// let limiter = MemoryLimiter::with_clock(clock.clone()).with_max_keys(10_000);
/// let quota = Quota::new(1, Duration::from_secs(10)).unwrap();
/// assert!(limiter.check("login", "ip:192.0.2.1", quota).await.unwrap().allowed);
/// let refused = limiter.check("login", "ip:192.0.2.1", quota).await.unwrap();
/// assert_eq!(refused.retry_after, Duration::from_secs(10));
/// clock.advance(Duration::from_secs(10));
/// assert!(limiter.check("login", "ip:192.0.2.1", quota).await.unwrap().allowed);
/// assert_eq!(limiter.stats().keys, 1);
/// # });
/// ```
pub struct MemoryLimiter {
    time: TimeSource,
    /// This limiter in the threads' caches.
    id: usize,
    buckets: RwLock<Tables>,
    /// Bumped when a table is dropped, so the threads' caches let it go.
    generation: AtomicU64,
    /// Subject -> end of its block, in [`TimeSource`] nanoseconds.
    blocks: RwLock<HashMap<Box<str>, u64>>,
    /// `blocks.len()`, so a check skips the lock while nothing is blocked.
    blocked: AtomicUsize,
    /// Keys in all buckets: counted up as keys are made, recounted at each tidy-up.
    keys: Arc<AtomicUsize>,
    max_keys: usize,
    max_blocks: usize,
    refused_full: AtomicU64,
    blocks_refused: AtomicU64,
    /// When the last tidy-up ran.
    last_tidy: Mutex<Option<u64>>,
}

/// What a [`MemoryLimiter`] holds, from [`MemoryLimiter::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct MemoryLimiterStats {
    /// (rule, subject) keys held, over all quotas.
    pub keys: usize,
    /// The most keys it holds (new keys beyond are refused).
    pub max_keys: usize,
    /// Tables held: one keyed limiter per (rule, quota) seen.
    pub tables: usize,
    /// Subjects blocked (some blocks may have ended and not been dropped yet).
    pub blocks: usize,
    /// Checks of new keys refused because the key table was full, since start.
    pub refused_full: u64,
    /// Blocks refused because the block list was full, since start.
    pub blocks_refused: u64,
}

/// Governor's keyed limiter as used here: decisions come with a state snapshot.
type Keyed = governor::RateLimiter<String, SharedStore, TimeSource, StateInformationMiddleware>;

/// Governor's DashMap state table, on a fast hasher seeded at random per table
/// (`foldhash`) rather than SipHash: the keys are `rule\0subject`, and a subject is a
/// client address or an account, which a client cannot pick freely enough to aim at
/// collisions it cannot see.
type States = DashMapStateStore<String, foldhash::fast::RandomState>;

/// The keyed limiter of one quota and a handle on its table.
struct Bucket {
    limiter: Keyed,
    states: Arc<States>,
    /// `window / limit`, governor's emission interval, in nanoseconds.
    emission_nanos: u64,
    /// The quota's window, in nanoseconds.
    window_nanos: u64,
}

/// A governor state table the limiter can look into (is this key held?) while governor
/// owns it, and that counts the keys it makes in the limiter's key count.
#[derive(Debug)]
struct SharedStore {
    states: Arc<States>,
    keys: Arc<AtomicUsize>,
}

impl StateStore for SharedStore {
    type Key = String;

    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // As governor's own DashMap store does, and counting a key when it is made.
        if let Some(state) = self.states.get(key.as_str()) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        // A key in the table is a valid name, checked here once.
        if validate_name(key).is_err() {
            let _ = SCRATCH.try_with(|scratch| scratch.invalid.set(true));
            return InMemoryState::default().measure_and_replace(&NotKeyed::NonKey, f);
        }
        let state = match self.states.entry(key.clone()) {
            dashmap::Entry::Occupied(held) => held.into_ref(),
            dashmap::Entry::Vacant(room) => {
                self.keys.fetch_add(1, Ordering::Relaxed);
                room.insert(InMemoryState::default())
            }
        };
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl ShrinkableKeyedStateStore<String> for SharedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.states, drop_below);
    }

    fn shrink_to_fit(&self) {
        self.states.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.states.len()
    }

    fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
}

/// Governor's clock: nanoseconds since the limiter started (fast clock) or since the
/// Unix epoch (a given [`Clock`]).
#[derive(Clone)]
enum TimeSource {
    Fast {
        clock: QuantaClock,
        base: QuantaInstant,
    },
    Given(Arc<dyn Clock>),
}

impl fmt::Debug for TimeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimeSource::Fast { .. } => f.write_str("monotonic"),
            TimeSource::Given(clock) => write!(f, "{clock:?}"),
        }
    }
}

impl GovernorClock for TimeSource {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let now = match self {
            TimeSource::Fast { clock, base } => clock.now().duration_since(*base),
            TimeSource::Given(clock) => Nanos::new(
                clock
                    .now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(nanos)
                    .unwrap_or(0),
            ),
        };
        let _ = SCRATCH.try_with(|scratch| scratch.now.set(now.as_u64()));
        now
    }
}

/// `d` in nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl MemoryLimiter {
    /// The default bound on (rule, subject) keys.
    pub const DEFAULT_MAX_KEYS: usize = 100_000;
    /// The default bound on blocked subjects.
    pub const DEFAULT_MAX_BLOCKS: usize = 10_000;
    /// The most (rule, quota) tables it keeps, each a keyed limiter. A program has a
    /// handful of rules; past this many, tables with no live keys are dropped, and a
    /// new (rule, quota) that still finds no room is refused as when the key table is
    /// full.
    pub const MAX_TABLES: usize = 1_000;
    /// How long a caller refused because the key table is full is told to wait.
    pub const FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

    /// A limiter on a fast monotonic clock, with the default bounds.
    pub fn new() -> Self {
        let clock = QuantaClock::default();
        let base = clock.now();
        Self::on(TimeSource::Fast { clock, base })
    }

    /// A limiter that reads time from `clock` (a [`ManualClock`](crate::ManualClock) in
    /// tests), with the default bounds.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self::on(TimeSource::Given(clock))
    }

    fn on(time: TimeSource) -> Self {
        Self {
            time,
            id: NEXT_LIMITER.fetch_add(1, Ordering::Relaxed),
            buckets: RwLock::new(Tables::default()),
            generation: AtomicU64::new(0),
            blocks: RwLock::new(HashMap::new()),
            blocked: AtomicUsize::new(0),
            keys: Arc::new(AtomicUsize::new(0)),
            max_keys: Self::DEFAULT_MAX_KEYS,
            max_blocks: Self::DEFAULT_MAX_BLOCKS,
            refused_full: AtomicU64::new(0),
            blocks_refused: AtomicU64::new(0),
            last_tidy: Mutex::new(None),
        }
    }

    /// Holds at most `max_keys` (rule, subject) keys (at least 1); new keys beyond are
    /// refused.
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// Holds at most `max_blocks` blocked subjects (at least 1).
    pub fn with_max_blocks(mut self, max_blocks: usize) -> Self {
        self.max_blocks = max_blocks.max(1);
        self
    }

    /// What the limiter holds now.
    pub fn stats(&self) -> MemoryLimiterStats {
        let buckets = read(&self.buckets);
        MemoryLimiterStats {
            keys: all(&buckets).map(|b| b.states.len()).sum(),
            max_keys: self.max_keys,
            tables: all(&buckets).count(),
            blocks: read(&self.blocks).len(),
            refused_full: self.refused_full.load(Ordering::Relaxed),
            blocks_refused: self.blocks_refused.load(Ordering::Relaxed),
        }
    }

    /// The check, which never waits.
    fn decide(&self, rule: &str, subject: &str, quota: Quota) -> Result<Decision, LimitError> {
        // The names are checked in full when their key is made (a key in the table is
        // of valid names), here only what bounds the work.
        let short = |name: &str| (1..=MAX_NAME_LEN).contains(&name.len());
        if !(short(rule) && short(subject)) {
            return Err(invalid_names(rule, subject));
        }
        if self.blocked.load(Ordering::Relaxed) > 0
            && let Some(left) = self.block_left(subject)
        {
            validate_name(rule)?;
            return Ok(Decision {
                allowed: false,
                limit: quota.limit(),
                remaining: 0,
                reset_after: left,
                retry_after: left,
            });
        }
        // Only a check made by a thread-local destructor finds no scratch space.
        match SCRATCH.try_with(|scratch| self.decide_on(scratch, rule, subject, quota)) {
            Ok(Some(decision)) => Ok(decision),
            Ok(None) => Err(invalid_names(rule, subject)),
            Err(_) => Err(LimitError::Unavailable(
                "checked while its thread was shutting down".into(),
            )),
        }
    }

    /// The check, with this thread's scratch space; `None` when the names are not valid.
    fn decide_on(
        &self,
        scratch: &Scratch,
        rule: &str,
        subject: &str,
        quota: Quota,
    ) -> Option<Decision> {
        let ticks = scratch.ticks.get().wrapping_add(1);
        scratch.ticks.set(ticks);
        if ticks.is_multiple_of(TIDY_EVERY) {
            self.tidy();
        }
        let generation = self.generation.load(Ordering::Acquire);
        let mut cache = scratch.buckets.borrow_mut();
        let usable = |entry: &Option<CachedBucket>| {
            entry.as_ref().is_some_and(|entry| {
                entry.limiter == self.id
                    && entry.generation == generation
                    && entry.quota == quota
                    && *entry.rule == *rule
            })
        };
        // The table used last first: a rule's checks come in runs.
        let last = scratch.last.get();
        let index = if usable(&cache[last]) {
            last
        } else if let Some(index) = cache.iter().position(usable) {
            index
        } else {
            // A rule is checked in full once per table and thread.
            validate_name(rule).ok()?;
            let Some(bucket) = self.bucket(rule, quota) else {
                return Some(self.refuse_full(quota));
            };
            let index = scratch.next.get() % CACHED;
            scratch.next.set(index + 1);
            cache[index] = Some(CachedBucket {
                limiter: self.id,
                generation,
                quota,
                rule: rule.into(),
                bucket,
            });
            index
        };
        scratch.last.set(index);
        let Some(entry) = &cache[index] else {
            return Some(self.refuse_full(quota));
        };
        let mut key = scratch.key.borrow_mut();
        key.clear();
        key.push_str(subject);
        self.check_in(scratch, &entry.bucket, &key, quota)
    }

    /// The keyed limiter of (`rule`, `quota`), made if need be; `None` when the tables
    /// are all taken by limiters that still hold keys.
    fn bucket(&self, rule: &str, quota: Quota) -> Option<Arc<Bucket>> {
        // Tries again when the limiter was made in between, or dropped again (by a
        // tidy-up of over-full tables) before it could be used.
        for _ in 0..3 {
            let found = read(&self.buckets)
                .get(rule)
                .and_then(|quotas| quotas.get(&quota))
                .cloned();
            if found.is_some() {
                return found;
            }
            if !self.add_bucket(rule, quota) {
                return None;
            }
        }
        None
    }

    /// Counts one request of `key` (the subject) in `bucket`. A bucket dropped
    /// meanwhile (only empty ones are, when the tables are all taken) takes the request
    /// and forgets it: the subject starts again on a full bucket.
    fn check_in(
        &self,
        scratch: &Scratch,
        bucket: &Bucket,
        key: &String,
        quota: Quota,
    ) -> Option<Decision> {
        if self.keys.load(Ordering::Relaxed) >= self.max_keys
            && !bucket.states.contains_key(key.as_str())
        {
            validate_name(key).ok()?;
            self.tidy();
            if self.keys.load(Ordering::Relaxed) >= self.max_keys {
                return Some(self.refuse_full(quota));
            }
        }
        scratch.invalid.set(false);
        let outcome = bucket.limiter.check_key(key);
        if scratch.invalid.replace(false) {
            return None;
        }
        let limit = quota.limit();
        Some(match outcome {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity().min(limit);
                // At most `window`: the emission interval is `window / limit`.
                let used = bucket.emission_nanos * u64::from(limit - remaining);
                Decision {
                    allowed: true,
                    limit,
                    remaining,
                    reset_after: Duration::from_nanos(used.min(bucket.window_nanos)),
                    retry_after: Duration::ZERO,
                }
            }
            Err(not_until) => {
                // Measured from the instant governor decided at.
                let retry_after = not_until.wait_time_from(Nanos::new(scratch.now.get()));
                let rest = bucket.emission_nanos * u64::from(limit - 1);
                Decision {
                    allowed: false,
                    limit,
                    remaining: 0,
                    reset_after: retry_after.saturating_add(Duration::from_nanos(rest)),
                    retry_after,
                }
            }
        })
    }

    fn refuse_full(&self, quota: Quota) -> Decision {
        self.refused_full.fetch_add(1, Ordering::Relaxed);
        Decision {
            allowed: false,
            limit: quota.limit(),
            remaining: 0,
            reset_after: Self::FULL_RETRY_AFTER,
            retry_after: Self::FULL_RETRY_AFTER,
        }
    }

    /// Makes the keyed limiter of (`rule`, `quota`); false when the tables are all
    /// taken by limiters that still hold keys.
    fn add_bucket(&self, rule: &str, quota: Quota) -> bool {
        let mut buckets = write(&self.buckets);
        if buckets
            .get(rule)
            .is_some_and(|quotas| quotas.contains_key(&quota))
        {
            return true;
        }
        if all(&buckets).count() >= Self::MAX_TABLES {
            buckets.retain(|_, quotas| {
                quotas.retain(|_, bucket| {
                    bucket.limiter.retain_recent();
                    !bucket.states.is_empty()
                });
                !quotas.is_empty()
            });
            self.generation.fetch_add(1, Ordering::Release);
            if all(&buckets).count() >= Self::MAX_TABLES {
                return false;
            }
        }
        let emission = quota.emission_interval();
        // `Quota::new` guarantees a non-zero emission interval and limit.
        let (Some(gcra), Some(burst)) = (
            governor::Quota::with_period(emission),
            NonZeroU32::new(quota.limit()),
        ) else {
            return false;
        };
        let states = Arc::new(States::default());
        let store = SharedStore {
            states: states.clone(),
            keys: self.keys.clone(),
        };
        let limiter = Keyed::new(gcra.allow_burst(burst), store, self.time.clone());
        buckets.entry(rule.into()).or_default().insert(
            quota,
            Arc::new(Bucket {
                limiter,
                states,
                emission_nanos: nanos(emission),
                window_nanos: nanos(quota.window()),
            }),
        );
        true
    }

    /// Drops keys whose bucket is full again and blocks that have ended, and recounts
    /// the keys; at most once per [`TIDY_SPACING`], and never two at a time.
    fn tidy(&self) {
        let Ok(mut last) = self.last_tidy.try_lock() else {
            return;
        };
        let now = self.time.now().as_u64();
        if last.is_some_and(|last| now.saturating_sub(last) < TIDY_SPACING) {
            return;
        }
        *last = Some(now);
        let mut keys = 0;
        for bucket in all(&read(&self.buckets)) {
            bucket.limiter.retain_recent();
            keys += bucket.states.len();
        }
        self.keys.store(keys, Ordering::Relaxed);
        if self.blocked.load(Ordering::Relaxed) > 0 {
            let mut blocks = write(&self.blocks);
            blocks.retain(|_, until| *until > now);
            self.blocked.store(blocks.len(), Ordering::Relaxed);
        }
    }

    /// How long `subject` stays blocked, if it is.
    fn block_left(&self, subject: &str) -> Option<Duration> {
        let until = *read(&self.blocks).get(subject)?;
        let now = self.time.now().as_u64();
        (until > now).then(|| Duration::from_nanos(until - now))
    }
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("clock", &self.time)
            .field("max_blocks", &self.max_blocks)
            .field("stats", &self.stats())
            .finish()
    }
}

#[async_trait]
impl RateLimiter for MemoryLimiter {
    fn check<'a>(&'a self, rule: &'a str, subject: &'a str, quota: Quota) -> LimitFuture<'a> {
        LimitFuture::ready(self.decide(rule, subject, quota))
    }

    fn check_now(
        &self,
        rule: &str,
        subject: &str,
        quota: Quota,
    ) -> Option<Result<Decision, LimitError>> {
        Some(self.decide(rule, subject, quota))
    }

    async fn block(&self, subject: &str, duration: Duration) -> Result<(), LimitError> {
        validate_name(subject)?;
        if duration.is_zero() {
            return Ok(());
        }
        let now = self.time.now().as_u64();
        let until = now.saturating_add(nanos(duration));
        let mut blocks = write(&self.blocks);
        if let Some(current) = blocks.get_mut(subject) {
            *current = (*current).max(until);
            return Ok(());
        }
        if blocks.len() >= self.max_blocks {
            blocks.retain(|_, until| *until > now);
        }
        let result = if blocks.len() >= self.max_blocks {
            self.blocks_refused.fetch_add(1, Ordering::Relaxed);
            Err(LimitError::Unavailable(format!(
                "the in-memory block list is full ({} subjects)",
                self.max_blocks
            )))
        } else {
            blocks.insert(subject.into(), until);
            Ok(())
        };
        self.blocked.store(blocks.len(), Ordering::Relaxed);
        result
    }
}

/// Every table.
fn all(tables: &Tables) -> impl Iterator<Item = &Arc<Bucket>> {
    tables.values().flat_map(|quotas| quotas.values())
}

/// Reads `lock`; a panic elsewhere cannot leave these tables half-written.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    fn limiter(max_keys: usize) -> (Arc<ManualClock>, MemoryLimiter) {
        let clock = Arc::new(ManualClock::starting_now());
        let limiter = MemoryLimiter::with_clock(clock.clone()).with_max_keys(max_keys);
        (clock, limiter)
    }

    #[test]
    fn reset_after_is_exact_when_refused_and_at_most_one_interval_over_when_allowed() {
        let (clock, limiter) = limiter(10);
        let quota = Quota::new(4, Duration::from_secs(4)).unwrap();
        let check = || limiter.decide("r", "s", quota).unwrap();
        assert_eq!(check().reset_after, Duration::from_secs(1));
        clock.advance(Duration::from_millis(300));
        // True time until full: 2 s - 0.3 s.
        let second = check();
        assert_eq!(second.remaining, 2);
        assert_eq!(second.reset_after, Duration::from_secs(2));
        check();
        check();
        let refused = check();
        assert!(!refused.allowed);
        // Arrival time 4 s; allowed again at 1 s.
        assert_eq!(refused.retry_after, Duration::from_millis(700));
        assert_eq!(refused.reset_after, Duration::from_millis(3700));
    }

    #[tokio::test]
    async fn check_now_and_check_share_one_budget() {
        let (_, limiter) = limiter(10);
        let seam: &dyn RateLimiter = &limiter;
        let quota = Quota::new(3, Duration::from_secs(60)).unwrap();
        let now = |seam: &dyn RateLimiter| seam.check_now("r", "s", quota).unwrap().unwrap();
        assert!(now(seam).allowed);
        assert!(seam.check("r", "s", quota).await.unwrap().allowed);
        let third = now(seam);
        assert!(third.allowed && third.remaining == 0);
        assert!(!seam.check("r", "s", quota).await.unwrap().allowed);
        assert!(!now(seam).allowed);
        assert!(matches!(
            seam.check_now("", "s", quota),
            Some(Err(LimitError::InvalidName(_)))
        ));
    }

    #[test]
    fn the_tables_are_bounded() {
        let (clock, limiter) = limiter(100_000);
        for limit in 1..=MemoryLimiter::MAX_TABLES as u32 {
            let quota = Quota::new(limit, Duration::from_secs(3600)).unwrap();
            assert!(limiter.decide("r", "s", quota).unwrap().allowed);
        }
        let one_more = Quota::new(
            MemoryLimiter::MAX_TABLES as u32 + 1,
            Duration::from_secs(3600),
        )
        .unwrap();
        let refused = limiter.decide("r", "s", one_more).unwrap();
        assert!(!refused.allowed);
        assert_eq!(limiter.stats().refused_full, 1);
        // Once the old quotas' buckets are full again (and one interval more, as
        // governor keeps them), their limiters go.
        clock.advance(Duration::from_secs(7200));
        assert!(limiter.decide("r", "s", one_more).unwrap().allowed);
        assert_eq!(limiter.stats().tables, 1, "the empty tables were dropped");
        // This thread's cached table of the first quota is not used any more.
        let first = Quota::new(1, Duration::from_secs(3600)).unwrap();
        assert!(limiter.decide("r", "s", first).unwrap().allowed);
        assert!(!limiter.decide("r", "s", first).unwrap().allowed);
        assert_eq!(limiter.stats().tables, 2);
        assert_eq!(limiter.stats().keys, 2);
    }

    #[test]
    fn invalid_names_never_make_a_key() {
        let (_, limiter) = limiter(2);
        let quota = Quota::new(5, Duration::from_secs(60)).unwrap();
        assert!(limiter.decide("r", "s", quota).unwrap().allowed);
        // Each would join to a key with two separators or a brace; none is stored,
        // whether the table has room or is full.
        for held in 1..=2 {
            for (rule, subject) in [("r", "s\0"), ("r\0s", "t"), ("r", "{s}"), ("r}", "s")] {
                assert!(
                    matches!(
                        limiter.decide(rule, subject, quota),
                        Err(LimitError::InvalidName(_))
                    ),
                    "{rule:?} {subject:?}"
                );
            }
            assert_eq!(limiter.stats().keys, held);
            // Fills the table on the first pass.
            assert!(limiter.decide("r", "t", quota).unwrap().allowed);
        }
        // The valid keys keep their own budgets.
        assert_eq!(limiter.decide("r", "s", quota).unwrap().remaining, 3);
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        let (clock, limiter) = limiter(10);
        let huge = Quota::new(u32::MAX, Duration::from_secs(86_400)).unwrap();
        let tiny = Quota::new(1, Duration::from_millis(1)).unwrap();
        let dense = Quota::new(1_000_000, Duration::from_millis(1)).unwrap_or(tiny);
        for quota in [huge, tiny, dense] {
            assert!(limiter.decide("r", "s", quota).unwrap().allowed);
        }
        clock.set(SystemTime::UNIX_EPOCH - Duration::from_secs(10));
        limiter.decide("r", "s", tiny).unwrap();
        clock.set(SystemTime::now());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(limiter.block("s", Duration::MAX)).unwrap();
        assert!(!limiter.decide("r", "s", tiny).unwrap().allowed);
        assert!(matches!(
            rt.block_on(limiter.block("a{b}", Duration::from_secs(1))),
            Err(LimitError::InvalidName(_))
        ));
    }
}
