//! Slow-query detection: every statement sqlx runs is timed through its `tracing`
//! statement log, and those above the threshold are grouped by normalized SQL.
//!
//! Wiring (the reference server does this):
//! - connect with `upcoach_core::postgres::connect_with`, which turns sqlx's statement
//!   and pool-acquire logs on at `TRACE` (they cost nothing unless a subscriber wants
//!   them);
//! - add [`SqlTimingLayer`] to the `tracing` subscriber, filtered to
//!   [`SqlTimingLayer::TARGETS`].
//!
//! With the `postgres` feature, [`explain`] plans a kept statement without running it
//! and builds the slow-query list with plans.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::histogram::{AtomicHistogram, HistogramSnapshot};
use crate::{MemoryMetrics, MetricsSink};

#[cfg(feature = "postgres")]
pub mod explain;

/// Replaces literals with `?` and collapses whitespace, so statements that differ only
/// in their values share one digest.
///
/// Strings (`'...'`, `E'...'`, `$tag$...$tag$`), numbers, bind parameters (`$1`) and
/// lists of them (`IN (?, ?, ?)` → `IN (?)`) become `?`; comments are dropped.
///
/// ```
/// use upcoach_perf::slow::normalize_sql;
///
/// assert_eq!(normalize_sql("SELECT pg_sleep(0.3)"), "SELECT pg_sleep(?)");
/// assert_eq!(
///     normalize_sql("select * from users\n  where email = 'a@b.c' and id in (1, 2, 3)"),
///     "select * from users where email = ? and id in (?)"
/// );
/// ```
pub fn normalize_sql(sql: &str) -> String {
    let bytes = sql.as_bytes();
    // (token, whether whitespace came before it in the source)
    let mut tokens: Vec<(&str, bool)> = Vec::new();
    let mut space = false;
    let mut i = 0;
    while i < bytes.len() && tokens.len() < 2048 {
        let b = bytes[i];
        let start = i;
        let token: &str = match b {
            b' ' | b'\t' | b'\n' | b'\r' => {
                space = true;
                i += 1;
                continue;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                space = true;
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < bytes.len() && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                i = (i + 2).min(bytes.len());
                space = true;
                continue;
            }
            b'\'' => {
                // Backslash escapes exist only in E'...' strings.
                let escapes = tokens.last().is_some_and(|(t, _)| *t == "\u{1}E");
                if escapes && let Some((_, marker_space)) = tokens.pop() {
                    // The literal starts where its E did.
                    space = marker_space;
                }
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\'' if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                        b'\'' => break,
                        b'\\' if escapes => i += 2,
                        _ => i += 1,
                    }
                }
                i = (i + 1).min(bytes.len());
                "?"
            }
            b'$' => {
                i += 1;
                if bytes.get(i).is_some_and(u8::is_ascii_digit) {
                    while bytes.get(i).is_some_and(u8::is_ascii_digit) {
                        i += 1;
                    }
                    "?"
                } else {
                    while bytes
                        .get(i)
                        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                    {
                        i += 1;
                    }
                    if bytes.get(i) == Some(&b'$') {
                        let tag = &sql[start..=i];
                        i += 1;
                        i = sql[i..]
                            .find(tag)
                            .map_or(bytes.len(), |end| i + end + tag.len());
                        "?"
                    } else {
                        &sql[start..i]
                    }
                }
            }
            b'0'..=b'9' => {
                while bytes
                    .get(i)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'_')
                {
                    i += 1;
                }
                "?"
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += 1;
                }
                i = (i + 1).min(bytes.len());
                &sql[start..i]
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 => {
                while bytes
                    .get(i)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c >= 0x80)
                {
                    i += 1;
                }
                // E'...': mark it so the string that follows honours backslashes.
                if i - start == 1 && (c == b'E' || c == b'e') && bytes.get(i) == Some(&b'\'') {
                    "\u{1}E"
                } else {
                    &sql[start..i]
                }
            }
            b':' if bytes.get(i + 1) == Some(&b':') => {
                i += 2;
                "::"
            }
            _ => {
                i += 1;
                while !sql.is_char_boundary(i) {
                    i += 1;
                }
                &sql[start..i]
            }
        };
        tokens.push((token, space));
        space = false;
    }
    let mut out = String::with_capacity(sql.len().min(4096));
    let mut previous = "";
    for (token, space_before) in tokens {
        let glued = previous == "("
            || previous == "."
            || previous == "::"
            || matches!(token, ")" | "," | "." | "::");
        if (space_before || previous == ",") && !glued && !out.is_empty() {
            out.push(' ');
        }
        out.push_str(token);
        previous = token;
    }
    collapse_lists(&out)
}

/// `(?, ?, ?)` → `(?)`.
fn collapse_lists(s: &str) -> String {
    let mut out = s.to_owned();
    while let Some(at) = out.find("?, ?") {
        out.replace_range(at..at + 4, "?");
    }
    out
}

/// One group of slow statements with the same normalized SQL.
#[derive(Debug, Clone, Serialize)]
pub struct SlowDigest {
    /// The SQL with literals replaced by `?`.
    pub digest: String,
    /// Slow executions seen.
    pub count: u64,
    /// Their 95th percentile, milliseconds (within 3.125 %).
    pub p95_ms: f64,
    /// The slowest, milliseconds.
    pub max_ms: f64,
    /// When the last one finished (milliseconds since the epoch).
    pub last_seen: u64,
}

#[derive(Debug)]
struct Entry {
    latency: AtomicHistogram,
    last_seen: SystemTime,
    /// One statement as sqlx ran it (bind parameters are not in it); used for EXPLAIN
    /// and never shown.
    sample: String,
}

/// The slow-query digests, bounded in number; the least recently seen is dropped when a
/// new digest arrives and the table is full.
#[derive(Debug)]
pub struct SlowQueryLog {
    threshold: Duration,
    max_digests: usize,
    digests: Mutex<HashMap<String, Entry>>,
    evicted: AtomicU64,
    #[cfg(feature = "redis")]
    redis: std::sync::OnceLock<crate::slow_redis::RedisSlowList>,
}

impl SlowQueryLog {
    /// A log of statements slower than `threshold`, at most `max_digests` digests.
    pub fn new(threshold: Duration, max_digests: usize) -> Self {
        Self {
            threshold,
            max_digests: max_digests.max(1),
            digests: Mutex::new(HashMap::new()),
            evicted: AtomicU64::new(0),
            #[cfg(feature = "redis")]
            redis: std::sync::OnceLock::new(),
        }
    }

    /// Also pushes each slow statement to a Redis list (`LPUSH` + `LTRIM` to `max_len`),
    /// from a background task fed by a bounded queue (1,024 entries; past that an entry
    /// is skipped). Call within a Tokio runtime.
    #[cfg(feature = "redis")]
    pub fn with_redis(
        self,
        redis: upcoach_core::redis::RedisConnection,
        key: impl Into<String>,
        max_len: usize,
    ) -> Self {
        self.attach_redis(redis, key, max_len);
        self
    }

    /// As [`with_redis`](Self::with_redis), on a log already shared; only the first call
    /// takes effect.
    #[cfg(feature = "redis")]
    pub fn attach_redis(
        &self,
        redis: upcoach_core::redis::RedisConnection,
        key: impl Into<String>,
        max_len: usize,
    ) {
        let _ = self
            .redis
            .get_or_init(|| crate::slow_redis::RedisSlowList::start(redis, key.into(), max_len));
    }

    /// The threshold.
    pub fn threshold(&self) -> Duration {
        self.threshold
    }

    /// Digests dropped to make room.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Slow statements whose entry never reached the Redis list: its queue (1,024
    /// entries) was full, or Redis refused or missed the write. 0 without Redis. The
    /// in-memory digests are kept either way.
    pub fn redis_skipped(&self) -> u64 {
        #[cfg(feature = "redis")]
        if let Some(redis) = self.redis.get() {
            return redis.skipped();
        }
        0
    }

    /// Records one statement; only those at or above the threshold are kept.
    pub fn observe(&self, sql: &str, elapsed: Duration) {
        if elapsed < self.threshold {
            return;
        }
        let digest = normalize_sql(sql);
        let now = SystemTime::now();
        {
            let mut digests = self.digests.lock().unwrap_or_else(|p| p.into_inner());
            if !digests.contains_key(&digest)
                && digests.len() >= self.max_digests
                && let Some(oldest) = digests
                    .iter()
                    .min_by_key(|(_, e)| e.last_seen)
                    .map(|(k, _)| k.clone())
            {
                digests.remove(&oldest);
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
            if !digests.contains_key(&digest) {
                // The digest has no literals, so it can be logged; the statement cannot.
                tracing::warn!(
                    digest = %digest,
                    elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                    threshold_ms = self.threshold.as_millis() as u64,
                    "slow statement (first of its kind; later ones are counted in the slow-query list)"
                );
            }
            let entry = digests.entry(digest.clone()).or_insert_with(|| Entry {
                latency: AtomicHistogram::new(),
                last_seen: now,
                sample: sql.chars().take(16 * 1024).collect(),
            });
            entry.latency.record_duration(elapsed);
            entry.last_seen = now;
        }
        #[cfg(feature = "redis")]
        if let Some(redis) = self.redis.get() {
            redis.push(&digest, elapsed, now);
        }
    }

    /// Every digest, the most total time first.
    pub fn digests(&self) -> Vec<SlowDigest> {
        let digests = self.digests.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(u64, SlowDigest)> = digests
            .iter()
            .map(|(digest, e)| {
                let h: HistogramSnapshot = e.latency.snapshot();
                let ms = |n: u64| (n as f64 / 1e3).round() / 1e3;
                (
                    h.sum(),
                    SlowDigest {
                        digest: digest.clone(),
                        count: h.count(),
                        p95_ms: ms(h.quantile(0.95).unwrap_or(0)),
                        max_ms: ms(h.max()),
                        last_seen: e
                            .last_seen
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map(|d| d.as_millis() as u64)
                            .unwrap_or(0),
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.digest.cmp(&b.1.digest)));
        out.into_iter().map(|(_, d)| d).collect()
    }

    /// The statement kept for `digest`, to EXPLAIN it.
    pub fn sample(&self, digest: &str) -> Option<String> {
        let digests = self.digests.lock().unwrap_or_else(|p| p.into_inner());
        digests.get(digest).map(|e| e.sample.clone())
    }
}

/// A `tracing` layer that reads sqlx's statement and pool-acquire events: every
/// statement's time goes to the `db_statement_duration_seconds` histogram (labelled by
/// its first keyword), every wait that ends with a pooled connection to
/// `db_pool_acquire_duration_seconds` (a wait that times out sends no event), and slow
/// statements to a [`SlowQueryLog`].
#[derive(Debug, Clone)]
pub struct SqlTimingLayer {
    slow: Arc<SlowQueryLog>,
    metrics: Arc<MemoryMetrics>,
}

impl SqlTimingLayer {
    /// The event targets this layer reads; filter the layer to them.
    pub const TARGETS: [&'static str; 2] = ["sqlx::query", "sqlx::pool::acquire"];

    /// A layer feeding `slow` and `metrics`.
    pub fn new(slow: Arc<SlowQueryLog>, metrics: Arc<MemoryMetrics>) -> Self {
        Self { slow, metrics }
    }

    /// Whether an event's target is one this layer reads.
    pub fn wants(metadata: &tracing::Metadata<'_>) -> bool {
        Self::TARGETS.contains(&metadata.target())
    }
}

#[derive(Default)]
struct Fields {
    summary: Option<String>,
    statement: Option<String>,
    elapsed_secs: Option<f64>,
    acquired_after_secs: Option<f64>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "summary" => self.summary = Some(value.to_owned()),
            "db.statement" if !value.trim().is_empty() => {
                self.statement = Some(value.trim().to_owned())
            }
            _ => {}
        }
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        match field.name() {
            "elapsed_secs" => self.elapsed_secs = Some(value),
            "acquired_after_secs" => self.acquired_after_secs = Some(value),
            _ => {}
        }
    }

    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

/// The first keyword of a statement, from a fixed set (a bounded label).
fn statement_kind(sql: &str) -> &'static str {
    let word = sql
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    match word.as_str() {
        "select" => "select",
        "insert" => "insert",
        "update" => "update",
        "delete" => "delete",
        "with" => "with",
        "begin" | "commit" | "rollback" | "savepoint" | "release" => "transaction",
        "create" | "alter" | "drop" => "ddl",
        _ => "other",
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SqlTimingLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if !Self::wants(event.metadata()) {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let sink: &dyn MetricsSink = &*self.metrics;
        if let Some(waited) = fields.acquired_after_secs {
            sink.record_histogram("db_pool_acquire_duration_seconds", &[], waited);
        }
        if let Some(secs) = fields.elapsed_secs {
            let sql = fields.statement.or(fields.summary).unwrap_or_default();
            sink.record_histogram(
                "db_statement_duration_seconds",
                &[("kind", statement_kind(&sql))],
                secs,
            );
            self.slow
                .observe(&sql, Duration::from_secs_f64(secs.max(0.0)));
        }
    }
}

#[cfg(test)]
mod tests;
