//! Counts instead of rows for floods of anonymous security events.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::json;

use super::{
    Event, EventKind, EventLog, EventLogError, EventLogStats, EventTypeCount, SecurityEvent,
};
use crate::Clock;
use crate::limit::ip_subject;

/// How [`AggregatingLog`] thins anonymous security events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateConfig {
    /// Rows kept per event type and client address in each window (default 10).
    pub threshold: u32,
    /// The window (default 60 s).
    pub window: Duration,
    /// The most (type, address) pairs counted at once (default 10,000); past it, new
    /// pairs share one bucket per type (`ip:other`).
    pub max_keys: usize,
    /// Capacity of the channel that [`AggregatingLog::subscribe`] reads (default 1,024;
    /// a receiver that falls behind misses the oldest and is told how many).
    pub feed_capacity: usize,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self {
            threshold: 10,
            window: Duration::from_secs(60),
            max_keys: 10_000,
            feed_capacity: 1024,
        }
    }
}

/// An [`EventLog`] in front of another that keeps the audit queue for real events
/// during a flood: a **security event without a user** (an anonymous failure: a bad
/// refresh token, a refused bearer, a rate-limited caller) is kept as a row only for
/// the first [`threshold`](AggregateConfig::threshold) of its type and client address
/// in each window; the rest are counted, and when the window ends one summary row of the
/// same type and address records how many there were (`details`:
/// `{"aggregated": true, "count", "window_s", "first_at", "last_at"}`). Events with a
/// user, and every other kind, pass through untouched. [`flush`](EventLog::flush)
/// writes the open windows' summaries first, so a count is never lost at shutdown.
///
/// Kept rows (summaries included) are also sent to [`subscribe`](Self::subscribe)rs:
/// what a host forwards to its `security` room.
///
/// ```
/// use std::sync::Arc;
/// use upcoach_core::event::{AggregateConfig, AggregatingLog, Event, EventKind, EventLog, MemoryEventLog, SecurityEvent};
/// use upcoach_core::{ManualClock, Clock};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let clock = Arc::new(ManualClock::starting_now());
/// let rows = Arc::new(MemoryEventLog::new(1000));
/// let config = AggregateConfig { threshold: 3, ..AggregateConfig::default() };
/// let log = AggregatingLog::new(rows.clone(), config, clock.clone());
/// for _ in 0..100 {
///     let event = SecurityEvent::new("login_failed", clock.as_ref()).ip("203.0.113.7".parse().unwrap());
///     log.record(Event::Security(event)).unwrap();
/// }
/// log.flush().await.unwrap();
/// let kept = rows.recent(EventKind::Security, 1000).await.unwrap();
/// assert_eq!(kept.len(), 4, "three rows, then one summary of the other 97");
/// # });
/// ```
pub struct AggregatingLog {
    inner: Arc<dyn EventLog>,
    config: AggregateConfig,
    clock: Arc<dyn Clock>,
    buckets: Mutex<HashMap<(String, String), Bucket>>,
    feed: tokio::sync::broadcast::Sender<SecurityEvent>,
    suppressed: AtomicU64,
    summaries: AtomicU64,
}

struct Bucket {
    window_end: SystemTime,
    kept: u32,
    suppressed: u64,
    first_at: Option<SystemTime>,
    last: Option<SecurityEvent>,
}

impl Bucket {
    /// An empty window ending at `window_end`.
    fn open(window_end: SystemTime) -> Self {
        Self {
            window_end,
            kept: 0,
            suppressed: 0,
            first_at: None,
            last: None,
        }
    }
}

impl fmt::Debug for AggregatingLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregatingLog")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("suppressed", &self.suppressed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl AggregatingLog {
    /// Thins anonymous security events on their way to `inner`.
    pub fn new(inner: Arc<dyn EventLog>, config: AggregateConfig, clock: Arc<dyn Clock>) -> Self {
        let (feed, _) = tokio::sync::broadcast::channel(config.feed_capacity.max(1));
        Self {
            inner,
            config,
            clock,
            buckets: Mutex::new(HashMap::new()),
            feed,
            suppressed: AtomicU64::new(0),
            summaries: AtomicU64::new(0),
        }
    }

    /// The kept security rows (summaries included), as they are recorded.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<SecurityEvent> {
        self.feed.subscribe()
    }

    /// Events counted instead of stored, and summary rows written, so far.
    pub fn aggregated(&self) -> (u64, u64) {
        (
            self.suppressed.load(Ordering::Relaxed),
            self.summaries.load(Ordering::Relaxed),
        )
    }

    /// Writes the summaries of windows that have ended, every `every` (a quarter of the
    /// window is a good pace), until the log is dropped.
    pub fn spawn_closer(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let log: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every.max(Duration::from_millis(10)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(log) = log.upgrade() else { return };
                log.close_windows(false);
            }
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), Bucket>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the summary of every ended window (every window, with `all`).
    fn close_windows(&self, all: bool) {
        let now = self.clock.now();
        let mut summaries = Vec::new();
        self.lock().retain(|(event_type, _), bucket| {
            if !all && bucket.window_end > now {
                return true;
            }
            if let Some(summary) = self.summary(event_type, bucket) {
                summaries.push(summary);
            }
            false
        });
        for summary in summaries {
            self.pass(Event::Security(summary));
        }
    }

    fn summary(&self, event_type: &str, bucket: &mut Bucket) -> Option<SecurityEvent> {
        if bucket.suppressed == 0 {
            return None;
        }
        let last = bucket.last.take()?;
        let millis = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let mut summary = SecurityEvent::new(event_type, self.clock.as_ref());
        summary.ip_address = last.ip_address;
        summary.user_agent = last.user_agent;
        summary.platform = last.platform;
        summary.details = json!({
            "aggregated": true,
            "count": bucket.suppressed,
            "window_s": self.config.window.as_secs(),
            "first_at_ms": bucket.first_at.map(millis),
            "last_at_ms": millis(last.created_at),
        });
        self.summaries.fetch_add(1, Ordering::Relaxed);
        Some(summary)
    }

    fn pass(&self, event: Event) {
        if let Event::Security(e) = &event
            && self.feed.receiver_count() > 0
        {
            let _ = self.feed.send(e.clone());
        }
        if let Err(e) = self.inner.record(event) {
            tracing::debug!(error = %e, "an aggregated summary was not logged");
        }
    }

    /// Whether `event` is to be kept as a row (and counts it when not).
    fn keep(&self, event: &SecurityEvent) -> bool {
        if event.user_id.is_some() {
            return true;
        }
        let now = self.clock.now();
        let address = event
            .ip_address
            .map_or_else(|| "ip:unknown".to_owned(), ip_subject);
        let mut ended = None;
        let keep = {
            let mut buckets = self.lock();
            let mut key = (event.event_type.clone(), address);
            if !buckets.contains_key(&key) && buckets.len() >= self.config.max_keys {
                key.1 = "ip:other".to_owned();
            }
            let bucket = buckets
                .entry(key)
                .or_insert_with(|| Bucket::open(now + self.config.window));
            if bucket.window_end <= now {
                ended = self.summary(&event.event_type, bucket);
                *bucket = Bucket::open(now + self.config.window);
            }
            if bucket.kept < self.config.threshold {
                bucket.kept += 1;
                true
            } else {
                bucket.suppressed += 1;
                bucket.first_at.get_or_insert(event.created_at);
                bucket.last = Some(event.clone());
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                false
            }
        };
        if let Some(summary) = ended {
            self.pass(Event::Security(summary));
        }
        keep
    }
}

#[async_trait]
impl EventLog for AggregatingLog {
    fn record(&self, event: Event) -> Result<(), EventLogError> {
        if let Event::Security(security) = &event {
            event.validate()?;
            if !self.keep(security) {
                return Ok(());
            }
            if self.feed.receiver_count() > 0 {
                let _ = self.feed.send(security.clone());
            }
        }
        self.inner.record(event)
    }

    async fn flush(&self) -> Result<(), EventLogError> {
        self.close_windows(true);
        self.inner.flush().await
    }

    async fn recent(&self, kind: EventKind, limit: usize) -> Result<Vec<Event>, EventLogError> {
        self.inner.recent(kind, limit).await
    }

    async fn security_event_counts(
        &self,
        since: SystemTime,
    ) -> Result<Vec<EventTypeCount>, EventLogError> {
        self.inner.security_event_counts(since).await
    }

    fn stats(&self) -> EventLogStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;
    use crate::event::MemoryEventLog;

    fn failed(clock: &dyn Clock, ip: &str) -> Event {
        Event::Security(SecurityEvent::new("login_failed", clock).ip(ip.parse().unwrap()))
    }

    #[tokio::test]
    async fn a_flood_keeps_the_queue_for_real_events() {
        let clock = Arc::new(ManualClock::starting_now());
        // A small bounded log: the flood alone would fill it.
        let rows = Arc::new(MemoryEventLog::new(50));
        let log = Arc::new(AggregatingLog::new(
            rows.clone(),
            AggregateConfig::default(),
            clock.clone(),
        ));
        let mut feed = log.subscribe();
        for i in 0..5_000 {
            log.record(failed(clock.as_ref(), &format!("198.51.100.{}", i % 3)))
                .unwrap();
        }
        let real = SecurityEvent::new("login_success", clock.as_ref()).user(crate::UserId::new());
        log.record(Event::Security(real.clone())).unwrap();
        let kept = rows.recent(EventKind::Security, 100).await.unwrap();
        assert_eq!(kept.len(), 31, "10 per address, then the real one");
        assert!(kept.iter().any(|e| e.id_string() == real.id.to_string()));
        assert_eq!(log.aggregated(), (5_000 - 30, 0));

        // The window ends: one summary per address with the count.
        clock.advance(Duration::from_secs(61));
        log.close_windows(false);
        let kept = rows.recent(EventKind::Security, 100).await.unwrap();
        let counts: u64 = kept
            .iter()
            .filter_map(|e| match e {
                Event::Security(s) => s.details.get("count").and_then(|c| c.as_u64()),
                _ => None,
            })
            .sum();
        assert_eq!(counts, 5_000 - 30);
        assert_eq!(log.aggregated().1, 3);
        let mut fed = 0;
        while feed.try_recv().is_ok() {
            fed += 1;
        }
        assert_eq!(fed, 31 + 3);
    }

    #[tokio::test]
    async fn keys_are_bounded_and_flush_writes_open_counts() {
        let clock = Arc::new(ManualClock::starting_now());
        let rows = Arc::new(MemoryEventLog::new(10_000));
        let config = AggregateConfig {
            threshold: 1,
            max_keys: 4,
            ..AggregateConfig::default()
        };
        let log = AggregatingLog::new(rows.clone(), config, clock.clone());
        for i in 0..100u32 {
            let ip = format!("10.0.{}.{}", i / 250, i % 250);
            log.record(failed(clock.as_ref(), &ip)).unwrap();
            log.record(failed(clock.as_ref(), &ip)).unwrap();
        }
        assert!(
            log.lock().len() <= 5,
            "four addresses and the shared bucket"
        );
        log.flush().await.unwrap();
        let kept = rows.recent(EventKind::Security, 10_000).await.unwrap();
        let counted: u64 = kept
            .iter()
            .map(|e| match e {
                Event::Security(s) => s.details.get("count").and_then(|c| c.as_u64()).unwrap_or(1),
                _ => 0,
            })
            .sum();
        assert_eq!(counted, 200, "every event is a row or counted in one");
    }
}
