//! [`TieredCache`]: an in-process L1 in front of any [`CacheStore`] as L2, with tags,
//! compression, single-flight loading and stats. It is itself a [`CacheStore`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use quick_cache::Weighter;
use quick_cache::sync::Cache;
use serde::Serialize;
use upcoach_core::{Clock, SystemClock};

use crate::envelope::{self, TagVersion, check_tags};
use crate::tags::TagVersions;
use crate::{CacheStore, Error, Result, canonical_key, check_ttl};

/// Settings of a [`TieredCache`].
#[derive(Debug, Clone)]
pub struct TieredOptions {
    /// Bytes the L1 may hold (default 64 MiB).
    pub l1_max_bytes: u64,
    /// The longest an entry stays in L1 whatever its TTL (default 5 s): what another
    /// process changed is seen at the latest this late.
    pub l1_max_age: Duration,
    /// Values at least this large are compressed when that saves 10 % (default 1 KiB).
    pub compress_threshold: usize,
    /// Refresh-ahead for [`TieredCache::get_or_refresh`]: a hit within this fraction of
    /// its TTL from expiry is reloaded in the background (default 0.1; 0 turns it off),
    /// so a key read often never expires under load.
    pub refresh_ahead: f64,
    /// How long one L2 call may take before the cache carries on without it
    /// (default 250 ms): a read becomes a miss, a write is skipped; both are counted.
    pub l2_timeout: Duration,
    /// How often the coherence subscriber pings Redis (default 5 s), so that a
    /// connection that went silent without closing is noticed, replaced, and L1
    /// emptied; a ping unanswered within 2 s counts as dead.
    pub coherence_ping_interval: Duration,
}

impl Default for TieredOptions {
    fn default() -> Self {
        Self {
            l1_max_bytes: 64 * 1024 * 1024,
            l1_max_age: Duration::from_secs(5),
            compress_threshold: 1024,
            refresh_ahead: 0.1,
            l2_timeout: Duration::from_millis(250),
            coherence_ping_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone)]
struct L1Entry {
    value: Bytes,
    /// `None` for an untagged entry (no reference count to touch on a hit).
    tags: Option<Arc<[TagVersion]>>,
    /// Until when L1 may answer with it: its expiry, or sooner by `l1_max_age`.
    expires_at: SystemTime,
    /// When the entry itself expires (in L2 too), for refresh-ahead.
    ttl_ends: SystemTime,
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Counts what L1 pushes out to make room.
#[derive(Debug, Clone, Default)]
struct Evictions(Arc<AtomicU64>);

impl quick_cache::Lifecycle<String, L1Entry> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: String, _: L1Entry) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
struct L1Weight;

impl Weighter<String, L1Entry> for L1Weight {
    fn weight(&self, key: &String, entry: &L1Entry) -> u64 {
        let tags = entry.tags.as_ref().map_or(0, |t| t.len());
        (key.len() + entry.value.len() + tags * 32 + 64) as u64
    }
}

/// The in-process tier: entries, and the newest version seen of each tag (from L2 reads,
/// local invalidations and other processes' notices), which decides whether a tagged L1
/// entry is still fresh without a round trip.
#[derive(Debug)]
struct L1 {
    entries: Cache<String, L1Entry, L1Weight, quick_cache::DefaultHashBuilder, Evictions>,
    /// Hashed with `foldhash`, seeded at random: every tagged L1 hit looks its tags up
    /// here, and SipHash was some 500 of the 23k instructions of a cached
    /// authenticated GET. Tags are named by the host's rules and invalidations, not by
    /// clients.
    known_tags: std::sync::RwLock<HashMap<String, u64, foldhash::fast::RandomState>>,
    /// Change counters, one per stripe of keys: bumped by every local write and delete
    /// and every key notice, so a read that fetched from L2 before a change to its key
    /// does not put the older value into L1 after it. (Tags need none: tagged entries
    /// are checked against `known_tags`.)
    generations: [AtomicU64; STRIPES],
}

/// Stripes of the L1 change counters.
const STRIPES: usize = 64;

/// Past this many tags remembered, the map starts over (entries then rely on their
/// maximum age until their tags are seen again).
const MAX_KNOWN_TAGS: usize = 100_000;

impl L1 {
    fn stripe(&self, key: &str) -> &AtomicU64 {
        // A fixed hash (FNV-1a): the same key always lands on the same stripe.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.as_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        &self.generations[(h % STRIPES as u64) as usize]
    }

    fn changed(&self, key: &str) {
        self.stripe(key).fetch_add(1, Ordering::Relaxed);
    }

    fn changed_all(&self) {
        for g in &self.generations {
            g.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn get(&self, key: &str) -> Option<L1Entry> {
        self.entries.get(key)
    }

    fn insert(&self, key: String, entry: L1Entry) {
        self.entries.insert(key, entry);
    }

    fn remove(&self, key: &str) -> Option<(String, L1Entry)> {
        self.entries.remove(key)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no tag of `entry` is known to have moved past the version it carries.
    fn tags_fresh(&self, entry: &L1Entry) -> bool {
        let Some(tags) = &entry.tags else {
            return true;
        };
        let known = self.known_tags.read().unwrap_or_else(|p| p.into_inner());
        tags.iter()
            .all(|(tag, version)| known.get(tag).is_none_or(|now| now <= version))
    }

    fn learn(&self, tags: impl IntoIterator<Item = (String, u64)>) {
        let mut known = self.known_tags.write().unwrap_or_else(|p| p.into_inner());
        if known.len() > MAX_KNOWN_TAGS {
            // Forgetting versions would make stale tagged entries look fresh: forget
            // those entries too.
            known.clear();
            self.entries.clear();
            self.changed_all();
        }
        for (tag, version) in tags {
            let slot = known.entry(tag).or_insert(0);
            *slot = (*slot).max(version);
        }
    }
}

#[cfg(feature = "redis")]
impl crate::coherence::Apply for L1 {
    fn apply(&self, notice: crate::coherence::Notice) {
        match notice {
            crate::coherence::Notice::Key(key) => {
                self.changed(&key);
                self.entries.remove(&key);
            }
            crate::coherence::Notice::Tag(tag, version) => self.learn([(tag, version)]),
        }
    }

    fn resynced(&self) {
        // Notices may have been missed while disconnected: start L1 afresh.
        self.changed_all();
        self.entries.clear();
    }
}

/// Counters of a [`TieredCache`], cheap enough to stay on (relaxed atomics).
#[derive(Debug, Default)]
struct Counters {
    l1_hits: AtomicU64,
    l2_hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
    loads: AtomicU64,
    load_errors: AtomicU64,
    load_nanos: AtomicU64,
    sets: AtomicU64,
    l2_errors: AtomicU64,
    invalidations: AtomicU64,
    bytes_saved: AtomicU64,
}

/// A snapshot of a [`TieredCache`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[non_exhaustive]
pub struct CacheStats {
    /// Reads answered by L1.
    pub l1_hits: u64,
    /// Reads answered by L2.
    pub l2_hits: u64,
    /// Reads answered by neither.
    pub misses: u64,
    /// Reads that found an entry whose tags had been invalidated (counted as misses too).
    pub stale: u64,
    /// `hits / (hits + misses)`, 0 before any read.
    pub hit_rate: f64,
    /// Loader runs.
    pub loads: u64,
    /// Loader runs that failed (nothing was cached).
    pub load_errors: u64,
    /// Time spent in loaders, milliseconds.
    pub load_ms: f64,
    /// Writes.
    pub sets: u64,
    /// L2 calls that failed or timed out (reads became misses, writes were skipped).
    pub l2_errors: u64,
    /// Tags invalidated.
    pub invalidations: u64,
    /// Bytes compression saved on L2 writes.
    pub bytes_saved: u64,
    /// Entries in L1 now.
    pub l1_entries: u64,
    /// Entries L1 pushed out to make room (L2's own evictions are Redis's business:
    /// `INFO stats` `evicted_keys`).
    pub l1_evictions: u64,
    /// Invalidation notices that never reached the other processes (the outbox of
    /// 4,096 was full, or `PUBLISH` failed); their L1 copies live out their maximum
    /// age. 0 without [`enable_coherence`](TieredCache::enable_coherence).
    pub coherence_dropped: u64,
}

impl CacheStats {
    /// These counts as gauges: `cache_hits{tier}`, `cache_misses`, `cache_l2_errors`,
    /// `cache_l1_entries`, `cache_coherence_dropped`.
    pub fn gauges(&self) -> [upcoach_core::health::Gauge; 6] {
        use upcoach_core::health::Gauge;
        [
            Gauge::new("cache_hits", &[("tier", "l1")], self.l1_hits as f64),
            Gauge::new("cache_hits", &[("tier", "l2")], self.l2_hits as f64),
            Gauge::new("cache_misses", &[], self.misses as f64),
            Gauge::new("cache_l2_errors", &[], self.l2_errors as f64),
            Gauge::new("cache_l1_entries", &[], self.l1_entries as f64),
            Gauge::new(
                "cache_coherence_dropped",
                &[],
                self.coherence_dropped as f64,
            ),
        ]
    }
}

/// An L1 (in process, quick_cache) in front of an L2 [`CacheStore`] (Redis, usually),
/// with tag versions in a [`TagVersions`].
///
/// - Reads try L1, then L2 (filling L1), and check the entry's tag versions against the
///   current ones: an entry written before one of its tags was invalidated is a miss.
/// - [`get_or_load`](Self::get_or_load) runs at most one loader per key in this process
///   at a time (the others wait for its result). It reads the tag versions *before* the
///   loader runs and stores them with the value, so a value computed before an
///   invalidation but stored after it is never served as fresh.
/// - L2 failures and slow answers (past [`TieredOptions::l2_timeout`]) never fail a
///   read or a write: reads fall back to L1 and the loader, writes are skipped, both are
///   counted in [`CacheStats::l2_errors`].
///
/// - With [`enable_coherence`](Self::enable_coherence) (feature `redis`), a delete,
///   overwrite or tag invalidation here evicts the stale L1 copies of every process on
///   the same channel; a lost notice heals within [`TieredOptions::l1_max_age`].
///   Tagged L1 hits compare their tag versions with the newest this process has seen
///   (no round trip).
///
/// - [`get_or_refresh`](Self::get_or_refresh) reloads hot keys in the background before
///   they expire.
///
/// L2 evictions are not counted here: Redis reports its own (`INFO stats`).
#[derive(Debug)]
pub struct TieredCache {
    l1: Arc<L1>,
    #[cfg(feature = "redis")]
    coherence: std::sync::OnceLock<Arc<crate::coherence::Coherence>>,
    l2: Arc<dyn CacheStore>,
    tags: Arc<dyn TagVersions>,
    /// `None` on the system clock, read directly on the hit path (no indirect call).
    clock: Option<Arc<dyn Clock>>,
    options: TieredOptions,
    counters: Counters,
    inflight: Mutex<HashMap<String, Flight>>,
    l1_evictions: Evictions,
    /// Keys being refreshed in the background (one refresh per key at a time).
    refreshing: Mutex<std::collections::HashSet<String>>,
}

impl TieredCache {
    /// A cache over `l2` with tag versions in `tags`, on the system clock.
    pub fn new(
        l2: Arc<dyn CacheStore>,
        tags: Arc<dyn TagVersions>,
        options: TieredOptions,
    ) -> Self {
        let mut cache = Self::with_clock(l2, tags, options, Arc::new(SystemClock));
        cache.clock = None;
        cache
    }

    /// As [`new`](Self::new), with L1 expiry by `clock`.
    pub fn with_clock(
        l2: Arc<dyn CacheStore>,
        tags: Arc<dyn TagVersions>,
        options: TieredOptions,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let estimated = (options.l1_max_bytes / 512).clamp(16, 1 << 22) as usize;
        let evictions = Evictions::default();
        Self {
            l1: Arc::new(L1 {
                entries: Cache::with(
                    estimated,
                    options.l1_max_bytes.max(1),
                    L1Weight,
                    quick_cache::DefaultHashBuilder::default(),
                    evictions.clone(),
                ),
                known_tags: std::sync::RwLock::new(HashMap::default()),
                generations: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
            #[cfg(feature = "redis")]
            coherence: std::sync::OnceLock::new(),
            l2,
            tags,
            clock: Some(clock),
            options,
            counters: Counters::default(),
            inflight: Mutex::new(HashMap::new()),
            l1_evictions: evictions,
            refreshing: Mutex::new(std::collections::HashSet::new()),
        }
    }

    #[inline]
    fn now(&self) -> SystemTime {
        match &self.clock {
            None => SystemTime::now(),
            Some(clock) => clock.now(),
        }
    }

    /// The value under `key`, if present, not expired and not invalidated by its tags.
    ///
    /// The same as [`CacheStore::get`], without the boxed future of a trait call: an L1
    /// hit allocates nothing.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let key = canonical_key(key)?;
        // The L1 hit path without entering the async read at all.
        if let Some(entry) = self.l1_hit(&key) {
            return Ok(Some(entry.value));
        }
        Ok(self.read_l2(&key).await?.map(|(value, _)| value))
    }

    /// A fresh L1 entry for `key` (counted as an L1 hit); a stale one is dropped.
    #[inline]
    fn l1_hit(&self, key: &str) -> Option<L1Entry> {
        let entry = self.l1.get(key)?;
        if self.now() < entry.expires_at && self.l1.tags_fresh(&entry) {
            self.counters.l1_hits.fetch_add(1, Ordering::Relaxed);
            return Some(entry);
        }
        self.l1.remove(key);
        None
    }

    /// The cache of a server: L2 in Redis under `config.prefix` with L1 kept coherent
    /// across processes (channel `{prefix}:invalidate`) when `redis` is given, else an
    /// in-memory L2 of 256 MiB.
    #[cfg(feature = "redis")]
    pub fn on(
        redis: Option<&upcoach_core::redis::RedisConnection>,
        config: &crate::CacheConfig,
    ) -> Arc<Self> {
        let prefix = &config.prefix;
        let (l2, tags): (Arc<dyn CacheStore>, Arc<dyn crate::TagVersions>) = match redis {
            Some(redis) => (
                Arc::new(crate::RedisStore::new(redis.clone(), prefix.clone())),
                Arc::new(crate::RedisTagVersions::new(redis.clone(), prefix.clone())),
            ),
            None => (
                Arc::new(crate::MemoryStore::new(256 * 1024 * 1024)),
                Arc::new(crate::MemoryTagVersions::default()),
            ),
        };
        let cache = Arc::new(Self::new(l2, tags, TieredOptions::default()));
        if let Some(redis) = redis
            && let Some(pubsub) = redis.pubsub()
        {
            cache.enable_coherence(
                pubsub.clone(),
                redis.clone(),
                format!("{prefix}:invalidate"),
            );
        }
        cache
    }

    /// Keeps the L1 of every process that shares `channel` coherent: this process's
    /// deletes, overwrites and tag invalidations are published there (`PUBLISH`, from a
    /// bounded queue), and the others' evict here. The subscriber reconnects by itself and
    /// empties L1 on each (re)subscription, since notices may have been missed. Call
    /// once, within a Tokio runtime; later calls are ignored.
    #[cfg(feature = "redis")]
    pub fn enable_coherence(
        &self,
        pubsub: impl Into<upcoach_core::redis::PubSubSource>,
        publisher: upcoach_core::redis::RedisConnection,
        channel: impl Into<String>,
    ) {
        let target: Arc<dyn crate::coherence::Apply> = self.l1.clone();
        let target = Arc::downgrade(&target);
        let channel = channel.into();
        let _ = self.coherence.get_or_init(|| {
            crate::coherence::Coherence::start(
                pubsub.into(),
                publisher,
                channel,
                target,
                // tokio's interval refuses zero.
                self.options
                    .coherence_ping_interval
                    .max(Duration::from_millis(1)),
            )
        });
    }

    fn notify(&self, notice: NoticeOf<'_>) {
        #[cfg(feature = "redis")]
        if let Some(coherence) = self.coherence.get() {
            coherence.publish(match notice {
                NoticeOf::Key(key) => crate::coherence::Notice::Key(key.to_owned()),
                NoticeOf::Tag(tag, version) => {
                    crate::coherence::Notice::Tag(tag.to_owned(), version)
                }
            });
        }
        #[cfg(not(feature = "redis"))]
        let _ = notice;
    }

    /// The counters now.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let hits = load(&c.l1_hits) + load(&c.l2_hits);
        let misses = load(&c.misses);
        CacheStats {
            l1_hits: load(&c.l1_hits),
            l2_hits: load(&c.l2_hits),
            misses,
            stale: load(&c.stale),
            hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            loads: load(&c.loads),
            load_errors: load(&c.load_errors),
            load_ms: load(&c.load_nanos) as f64 / 1e6,
            sets: load(&c.sets),
            l2_errors: load(&c.l2_errors),
            invalidations: load(&c.invalidations),
            bytes_saved: load(&c.bytes_saved),
            l1_entries: self.l1.len() as u64,
            l1_evictions: self.l1_evictions.0.load(Ordering::Relaxed),
            coherence_dropped: self.coherence_dropped(),
        }
    }

    fn coherence_dropped(&self) -> u64 {
        #[cfg(feature = "redis")]
        if let Some(coherence) = self.coherence.get() {
            return coherence.dropped();
        }
        0
    }

    /// Round-trips L2 with a read and returns how long it took.
    pub async fn health(&self) -> Result<Duration> {
        let start = Instant::now();
        self.l2_call(self.l2.exists("__upcoach_health__")).await?;
        Ok(start.elapsed())
    }

    async fn l2_call<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.options.l2_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(Error::Backend {
                backend: "l2",
                source: format!("no answer within {:?}", self.options.l2_timeout).into(),
            }),
        }
    }

    fn l2_failed(&self, what: &'static str, e: &Error) {
        let n = self.counters.l2_errors.fetch_add(1, Ordering::Relaxed);
        if n.is_power_of_two() || n == 0 {
            tracing::warn!(error = %e, what, failures = n + 1, "cache L2 unavailable; carrying on without it");
        }
    }

    /// Whether the tag versions an entry carries are still current. Tag versions that
    /// cannot be read make the entry a miss (rather serve fresh than stale).
    async fn tags_current(&self, tags: &[TagVersion]) -> bool {
        if tags.is_empty() {
            return true;
        }
        let names: Vec<&str> = tags.iter().map(|(t, _)| t.as_str()).collect();
        match self.l2_call(self.tags.versions(&names)).await {
            Ok(now) => {
                let current = tags.iter().zip(&now).all(|((_, then), now)| then == now);
                self.l1
                    .learn(names.iter().map(|t| (*t).to_owned()).zip(now));
                current
            }
            Err(e) => {
                self.l2_failed("tag versions", &e);
                false
            }
        }
    }

    /// Reads `key` through L1 then L2, honouring tags; `Ok(None)` for a miss.
    async fn read(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.read_entry(key).await?.map(|(value, _)| value))
    }

    /// As [`read`](Self::read), with when the entry expires.
    async fn read_entry(&self, key: &str) -> Result<Option<(Bytes, SystemTime)>> {
        if let Some(entry) = self.l1_hit(key) {
            return Ok(Some((entry.value, entry.ttl_ends)));
        }
        self.read_l2(key).await
    }

    /// Reads `key` from L2 after an L1 miss (L1 is not looked at again), honouring tags
    /// and filling L1; the value and when it expires.
    async fn read_l2(&self, key: &str) -> Result<Option<(Bytes, SystemTime)>> {
        // Before the read, so an L1 copy is never older than its maximum age; not read at
        // all when L1 keeps nothing.
        let now = (!self.options.l1_max_age.is_zero()).then(|| self.now());
        let stripe = self.l1.stripe(key);
        let generation = stripe.load(Ordering::Relaxed);
        let stored = match self.l2_call(self.l2.get(key)).await {
            Ok(stored) => stored,
            Err(e) => {
                self.l2_failed("read", &e);
                None
            }
        };
        let Some(stored) = stored else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let decoded = envelope::decode(stored)?;
        if !self.tags_current(&decoded.tags).await {
            self.counters.stale.fetch_add(1, Ordering::Relaxed);
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        self.counters.l2_hits.fetch_add(1, Ordering::Relaxed);
        let ttl_ends = from_ms(decoded.expires_at_ms);
        // L1 keeps it for its maximum age at most, and never past its own expiry.
        if let Some(now) = now
            && stripe.load(Ordering::Relaxed) == generation
        {
            self.l1.insert(
                key.to_owned(),
                L1Entry {
                    value: decoded.value.clone(),
                    tags: (!decoded.tags.is_empty()).then(|| decoded.tags.into()),
                    expires_at: (now + self.options.l1_max_age).min(ttl_ends),
                    ttl_ends,
                },
            );
        }
        Ok(Some((decoded.value, ttl_ends)))
    }

    /// Writes `value` with `tags` (and their versions) to L1 and L2.
    async fn write(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
        tags: Vec<TagVersion>,
    ) -> Result<()> {
        check_ttl(ttl)?;
        let ttl_ends = self.now() + ttl;
        let (encoded, saved) = envelope::encode(
            &value,
            &tags,
            to_ms(ttl_ends),
            self.options.compress_threshold,
        )?;
        self.counters.sets.fetch_add(1, Ordering::Relaxed);
        self.l1.changed(key);
        self.counters
            .bytes_saved
            .fetch_add(saved as u64, Ordering::Relaxed);
        self.l1.insert(
            key.to_owned(),
            L1Entry {
                value,
                tags: (!tags.is_empty()).then(|| tags.into()),
                expires_at: self.now() + ttl.min(self.options.l1_max_age),
                ttl_ends,
            },
        );
        match self.l2_call(self.l2.set(key, encoded, ttl)).await {
            Ok(()) => self.notify(NoticeOf::Key(key)),
            Err(e) => self.l2_failed("write", &e),
        }
        Ok(())
    }

    /// The current versions of `tags`, to store a value computed from now on with
    /// [`set_with_versions`](Self::set_with_versions); `None` when they cannot be read
    /// (L2 down or slow), in which case nothing tagged should be stored.
    pub async fn tag_versions(&self, tags: &[&str]) -> Option<Vec<TagVersion>> {
        if check_tags(tags).is_err() {
            return None;
        }
        match self.l2_call(self.tags.versions(tags)).await {
            Ok(versions) => Some(tags.iter().map(|t| (*t).to_owned()).zip(versions).collect()),
            Err(e) => {
                self.l2_failed("tag versions", &e);
                None
            }
        }
    }

    /// Stores `value` with tag versions read (by [`tag_versions`](Self::tag_versions))
    /// before it was computed.
    pub async fn set_with_versions(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
        versions: Vec<TagVersion>,
    ) -> Result<()> {
        let names: Vec<&str> = versions.iter().map(|(t, _)| t.as_str()).collect();
        check_tags(&names)?;
        let key = canonical_key(key)?;
        self.write(&key, value, ttl, versions).await
    }

    /// Stores `value` under `key` for `ttl`, tagged with `tags`.
    pub async fn set_tagged(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
        tags: &[&str],
    ) -> Result<()> {
        check_tags(tags)?;
        check_ttl(ttl)?;
        let key = canonical_key(key)?;
        // Without the current tag versions the entry cannot be tagged safely: skip it.
        let Some(versions) = self.tag_versions(tags).await else {
            return Ok(());
        };
        self.write(&key, value, ttl, versions).await
    }

    /// Invalidates every entry tagged with any of `tags`, in O(1) per tag: each tag's
    /// version is bumped, and entries that carry an older version become misses.
    pub async fn invalidate_tags(&self, tags: &[&str]) -> Result<Vec<u64>> {
        check_tags(tags)?;
        // An invalidation that does not happen must say so: no fail-open here.
        let versions = self.l2_call(self.tags.bump(tags)).await?;
        self.counters
            .invalidations
            .fetch_add(tags.len() as u64, Ordering::Relaxed);
        self.l1.learn(
            tags.iter()
                .map(|t| (*t).to_owned())
                .zip(versions.iter().copied()),
        );
        for (tag, version) in tags.iter().zip(&versions) {
            self.notify(NoticeOf::Tag(tag, *version));
        }
        Ok(versions)
    }

    /// The value under `key`, or the loader's value, computed at most once at a time per
    /// key in this process and stored for `ttl` with `tags`. A loader error is returned
    /// and nothing is stored.
    pub async fn get_or_load<F, Fut, E>(
        &self,
        key: &str,
        ttl: Duration,
        tags: &[&str],
        loader: F,
    ) -> Result<Bytes, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        check_ttl(ttl)?;
        check_tags(tags)?;
        let key = canonical_key(key)?.into_owned();
        match self.read(&key).await {
            Ok(Some(hit)) => return Ok(hit),
            Ok(None) => {}
            // A corrupt entry is replaced by a fresh load, not returned as an error forever.
            Err(Error::Corrupt { reason }) => {
                tracing::warn!(reason, "corrupt cache entry; loading afresh");
            }
            Err(e) => return Err(e.into()),
        }
        let flight = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            inflight.entry(key.clone()).or_default().clone()
        };
        let _cleanup = FlightGuard {
            cache: self,
            key: &key,
            flight: &flight,
        };
        let mut slot = flight.lock().await;
        // The loader that ran before us shares its value even when it could not be
        // cached (L1 off or too small, tag versions unreadable).
        if let Some(value) = slot.as_ref() {
            self.counters.l1_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(value.clone());
        }
        let result = self.load_once(&key, ttl, tags, loader).await;
        if let Ok(value) = &result {
            *slot = Some(value.clone());
        }
        result
    }

    async fn load_once<F, Fut, E>(
        &self,
        key: &str,
        ttl: Duration,
        tags: &[&str],
        loader: F,
    ) -> Result<Bytes, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        // A flight that ended between our first read and this one may have stored it.
        if let Some(hit) = self.l1_hit(key) {
            return Ok(hit.value);
        }
        // Versions before the loader runs: an invalidation during the load makes what
        // it computed stale at once.
        let versions = match self.l2_call(self.tags.versions(tags)).await {
            Ok(v) => Some(v),
            Err(e) => {
                self.l2_failed("tag versions", &e);
                None
            }
        };
        self.counters.loads.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let loaded = loader().await;
        self.counters
            .load_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let value = match loaded {
            Ok(value) => value,
            Err(e) => {
                self.counters.load_errors.fetch_add(1, Ordering::Relaxed);
                return Err(LoadError::Loader(e));
            }
        };
        // Without tag versions the value cannot be tagged safely: serve it, keep nothing.
        if let Some(versions) = versions {
            let tags = tags.iter().map(|t| (*t).to_owned()).zip(versions).collect();
            self.write(key, value.clone(), ttl, tags).await?;
        }
        Ok(value)
    }

    /// As [`get_or_load`](Self::get_or_load), with refresh-ahead: a hit within
    /// [`TieredOptions::refresh_ahead`] of its TTL from expiry is returned at once and
    /// reloaded in the background (at most one reload per key at a time; tag versions read
    /// before it runs, as for any load; a failed reload is counted and leaves the entry).
    pub async fn get_or_refresh<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        ttl: Duration,
        tags: &[&str],
        loader: F,
    ) -> Result<Bytes, LoadError<E>>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
        E: Send + 'static,
    {
        check_ttl(ttl)?;
        check_tags(tags)?;
        let key = canonical_key(key)?.into_owned();
        if let Ok(Some((value, ttl_ends))) = self.read_entry(&key).await {
            let left = ttl_ends.duration_since(self.now()).unwrap_or_default();
            if self.options.refresh_ahead > 0.0
                && left < ttl.mul_f64(self.options.refresh_ahead.min(1.0))
            {
                self.refresh_in_background(key, ttl, tags, loader);
            }
            return Ok(value);
        }
        self.get_or_load(&key, ttl, tags, loader).await
    }

    fn refresh_in_background<F, Fut, E>(
        self: &Arc<Self>,
        key: String,
        ttl: Duration,
        tags: &[&str],
        loader: F,
    ) where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
        E: Send + 'static,
    {
        if !self
            .refreshing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return;
        }
        let this = self.clone();
        let tags: Vec<String> = tags.iter().map(|t| (*t).to_owned()).collect();
        tokio::spawn(async move {
            let names: Vec<&str> = tags.iter().map(String::as_str).collect();
            if let Some(versions) = this.tag_versions(&names).await {
                this.counters.loads.fetch_add(1, Ordering::Relaxed);
                let start = Instant::now();
                let loaded = loader().await;
                this.counters
                    .load_nanos
                    .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                match loaded {
                    Ok(value) => {
                        let _ = this.set_with_versions(&key, value, ttl, versions).await;
                    }
                    Err(_) => {
                        this.counters.load_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            this.refreshing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        });
    }

    /// Loads `keys` that are not cached yet, one at a time through
    /// [`get_or_load`](Self::get_or_load); returns how many were loaded.
    pub async fn warm<F, Fut, E>(
        &self,
        keys: &[&str],
        ttl: Duration,
        tags: &[&str],
        loader: F,
    ) -> Result<usize, LoadError<E>>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        let before = self.counters.loads.load(Ordering::Relaxed);
        for key in keys {
            let owned = (*key).to_owned();
            self.get_or_load(key, ttl, tags, || loader(owned)).await?;
        }
        Ok((self.counters.loads.load(Ordering::Relaxed) - before) as usize)
    }
}

/// One key's loading: the leader's value, for those who waited on it.
type Flight = Arc<tokio::sync::Mutex<Option<Bytes>>>;

/// Removes a key's flight once nobody waits on it, also when the caller was cancelled.
struct FlightGuard<'a> {
    cache: &'a TieredCache,
    key: &'a str,
    flight: &'a Flight,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut inflight = self
            .cache
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // The map's reference and ours: nobody else is waiting.
        if inflight
            .get(self.key)
            .is_some_and(|f| Arc::ptr_eq(f, self.flight) && Arc::strong_count(f) <= 2)
        {
            inflight.remove(self.key);
        }
    }
}

/// A change to tell other processes about.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
enum NoticeOf<'a> {
    Key(&'a str),
    Tag(&'a str, u64),
}

/// Why [`TieredCache::get_or_load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError<E> {
    /// The cache refused the call (bad key, TTL or tags; corrupt entry).
    #[error(transparent)]
    Cache(#[from] Error),
    /// The loader failed; nothing was cached.
    #[error("the loader failed")]
    Loader(#[source] E),
}

#[async_trait]
impl CacheStore for TieredCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        TieredCache::get(self, key).await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        let key = canonical_key(key)?;
        self.write(&key, value, ttl, Vec::new()).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = canonical_key(key)?;
        self.l1.changed(&key);
        let in_l1 = self
            .l1
            .remove(key.as_ref())
            .is_some_and(|(_, e)| self.now() < e.expires_at);
        match self.l2_call(self.l2.delete(&key)).await {
            Ok(in_l2) => {
                self.notify(NoticeOf::Key(&key));
                Ok(in_l1 || in_l2)
            }
            Err(e) => {
                // A delete that did not reach L2 would come back: say so (retryable).
                self.l2_failed("delete", &e);
                Err(e)
            }
        }
    }
}
