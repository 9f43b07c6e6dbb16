//! [`RequestMetrics`]: per route and method, counts by status class and latency
//! histograms since start and over the last minute.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Request timing reads the CPU's time-stamp counter through `quanta` (a few ns) instead
/// of the system clock (about 20 ns here): two reads per request on the hot path.
pub(crate) use quanta::Instant;

use serde::Serialize;

use crate::histogram::{HistogramSnapshot, SLOT_SECS, SLOTS, WindowedHistogram};
use crate::route::{MethodClass, RouteId, RouteTable};

/// Status classes counted: 1xx to 5xx, "error" for a service that failed without a
/// response, and "cancelled" for a request dropped before its response (the client went
/// away, a timeout, shutdown).
const STATUS_CLASSES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error", "cancelled"];

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A response with this status.
    Status(u16),
    /// The service returned an error.
    Failed,
    /// The request was dropped before it finished.
    Cancelled,
}

/// How many copies of each route's counters exist: each thread records into its own
/// (threads beyond this share), so threads serving one route do not fight over cache
/// lines. Reads add the stripes up.
const STRIPES: usize = 4;

/// Latency and status counts of one route and method, striped by thread.
#[derive(Debug, Default)]
pub(crate) struct RouteStats {
    stripes: [Stripe; STRIPES],
}

/// One thread's share; aligned so two stripes never share a cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    latency: WindowedHistogram,
    status: [AtomicU64; 7],
    errors_window: WindowedCounter,
}

impl RouteStats {
    #[inline]
    fn stripe(&self) -> &Stripe {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
        }
        &self.stripes[STRIPE.with(|s| *s)]
    }

    fn total(&self) -> HistogramSnapshot {
        let mut out = HistogramSnapshot::empty();
        for s in &self.stripes {
            out.merge(&s.latency.total());
        }
        out
    }

    fn window(&self, now_secs: u64) -> (HistogramSnapshot, u64) {
        let mut out = HistogramSnapshot::empty();
        let mut errors = 0;
        for s in &self.stripes {
            out.merge(&s.latency.window(now_secs));
            errors += s.errors_window.window(now_secs);
        }
        (out, errors)
    }

    fn statuses(&self) -> [u64; 7] {
        let mut out = [0; 7];
        for s in &self.stripes {
            for (total, n) in out.iter_mut().zip(&s.status) {
                *total += n.load(Ordering::Relaxed);
            }
        }
        out
    }
}

/// A count over the same sliding window as [`WindowedHistogram`].
#[derive(Debug, Default)]
struct WindowedCounter {
    slots: [(AtomicU64, AtomicU64); SLOTS],
}

impl WindowedCounter {
    fn add(&self, now_secs: u64) {
        let period = now_secs / SLOT_SECS;
        let (tag, count) = &self.slots[(period % SLOTS as u64) as usize];
        let current = tag.load(Ordering::Acquire);
        if current != period + 1
            && current < period + 1
            && tag
                .compare_exchange(current, period + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            count.store(0, Ordering::Relaxed);
        }
        count.fetch_add(1, Ordering::Relaxed);
    }

    fn window(&self, now_secs: u64) -> u64 {
        let period = now_secs / SLOT_SECS;
        let oldest = period.saturating_sub(SLOTS as u64 - 1);
        self.slots
            .iter()
            .filter(|(tag, _)| {
                let tag = tag.load(Ordering::Acquire);
                tag > 0 && (oldest..=period).contains(&(tag - 1))
            })
            .map(|(_, count)| count.load(Ordering::Relaxed))
            .sum()
    }
}

/// Request metrics for a fixed set of route templates, recorded lock-free.
///
/// Memory is bounded by the route table: at most `(templates + 1) × 8 methods` entries
/// of about 135 KiB (four thread stripes of 33 KiB), each made on first use. Paths that match no template all count as
/// the route `unmatched`, so a scan of random URLs adds nothing.
#[derive(Debug)]
pub struct RequestMetrics {
    routes: RouteTable,
    stats: Box<[[OnceLock<Box<RouteStats>>; 8]]>,
    started: Instant,
}

impl RequestMetrics {
    /// Metrics for `routes`.
    pub fn new(routes: RouteTable) -> Self {
        let slots = routes.len() + 1;
        Self {
            stats: (0..slots)
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect(),
            routes,
            started: Instant::now(),
        }
    }

    /// The route table.
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    #[inline]
    pub(crate) fn stats(&self, route: RouteId, method: MethodClass) -> &RouteStats {
        let route = route.min(self.routes.len());
        self.stats[route][method.index()].get_or_init(Box::default)
    }

    /// Seconds since these metrics started, the clock of the sliding window.
    #[inline]
    pub(crate) fn seconds_at(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs()
    }

    /// Records one finished request.
    #[inline]
    pub(crate) fn record(
        &self,
        route: RouteId,
        method: MethodClass,
        outcome: Outcome,
        elapsed: Duration,
        now: Instant,
    ) {
        let stats = self.stats(route, method).stripe();
        let now_secs = self.seconds_at(now);
        stats.latency.record(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            now_secs,
        );
        let class = match outcome {
            Outcome::Status(s) if (100..600).contains(&s) => usize::from(s / 100 - 1),
            Outcome::Status(_) | Outcome::Failed => 5,
            Outcome::Cancelled => 6,
        };
        stats.status[class].fetch_add(1, Ordering::Relaxed);
        if class == 4 || class == 5 {
            stats.errors_window.add(now_secs);
        }
    }

    /// Records a request by its parts (for hosts that do not use the layer).
    pub fn record_request(
        &self,
        method: &http::Method,
        path: &str,
        status: Option<u16>,
        elapsed: Duration,
    ) {
        let route = self.routes.match_path(path);
        let outcome = status.map_or(Outcome::Failed, Outcome::Status);
        self.record(
            route,
            MethodClass::of(method),
            outcome,
            elapsed,
            Instant::now(),
        );
    }

    /// Every request of the last minute, all routes together: latency and failures.
    pub fn window_overall(&self) -> (HistogramSnapshot, u64) {
        let now_secs = self.seconds_at(Instant::now());
        let mut latency = HistogramSnapshot::empty();
        let mut errors = 0;
        for methods in self.stats.iter() {
            for stats in methods.iter().filter_map(OnceLock::get) {
                let (window, window_errors) = stats.window(now_secs);
                latency.merge(&window);
                errors += window_errors;
            }
        }
        (latency, errors)
    }

    /// Every route and method that has seen a request, in table order.
    pub fn snapshot(&self) -> Vec<RouteSnapshot> {
        let now_secs = self.seconds_at(Instant::now());
        // The window holds the current (partial) slot and the five before it.
        let window_secs =
            (now_secs + 1).min((SLOTS as u64 - 1) * SLOT_SECS + now_secs % SLOT_SECS + 1) as f64;
        let mut out = Vec::new();
        for (route, methods) in self.stats.iter().enumerate() {
            for method in MethodClass::ALL {
                let Some(stats) = methods[method.index()].get() else {
                    continue;
                };
                let statuses: Vec<(&'static str, u64)> = STATUS_CLASSES
                    .iter()
                    .zip(stats.statuses())
                    .map(|(class, n)| (*class, n))
                    .collect();
                let total = stats.total();
                let (window, window_errors) = stats.window(now_secs);
                out.push(RouteSnapshot {
                    method: method.as_str(),
                    route: self.routes.template(route).to_owned(),
                    count: total.count(),
                    errors: statuses[4].1 + statuses[5].1,
                    statuses: statuses.into_iter().filter(|(_, n)| *n > 0).collect(),
                    latency: LatencySummary::of(&total),
                    window: WindowSummary {
                        seconds: window_secs as u64,
                        count: window.count(),
                        errors: window_errors,
                        rate_per_s: window.count() as f64 / window_secs,
                        latency: LatencySummary::of(&window),
                    },
                    histogram: total,
                });
            }
        }
        out
    }
}

/// p50, p95, p99 and max in milliseconds (within the histogram's 3.125 %; max exact).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl LatencySummary {
    pub(crate) fn of(h: &HistogramSnapshot) -> Self {
        let ms = |nanos: Option<u64>| nanos.map_or(0.0, |n| round3(n as f64 / 1e6));
        Self {
            p50_ms: ms(h.quantile(0.50)),
            p95_ms: ms(h.quantile(0.95)),
            p99_ms: ms(h.quantile(0.99)),
            max_ms: ms(Some(h.max())),
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The last minute of one route.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowSummary {
    /// How many seconds the window covers: 51 to 60 (fewer just after start).
    pub seconds: u64,
    /// Requests in the window.
    pub count: u64,
    /// 5xx answers and failures in the window.
    pub errors: u64,
    /// Requests per second over the window.
    pub rate_per_s: f64,
    /// Latency over the window.
    #[serde(flatten)]
    pub latency: LatencySummary,
}

impl RouteSnapshot {
    /// p95 since start, milliseconds.
    pub fn p95_ms(&self) -> f64 {
        self.latency.p95_ms
    }
}

/// One route and method over the last minute, as a live feed sends it (the reference
/// server's `metrics` room): its rate, p95 and errors there.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecentRoute {
    /// The method (`GET`, ..., `OTHER`).
    pub method: &'static str,
    /// The route template, or `unmatched`.
    pub route: String,
    /// Requests per second over the window.
    pub rate_per_s: f64,
    /// The p95 latency over the window, milliseconds.
    pub p95_ms: f64,
    /// 5xx answers and failures in the window.
    pub errors: u64,
}

/// One route and method, since start and over the last minute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteSnapshot {
    /// The method (`GET`, ..., `OTHER`).
    pub method: &'static str,
    /// The route template, or `unmatched`.
    pub route: String,
    /// Requests since start.
    pub count: u64,
    /// 5xx answers and failures since start.
    pub errors: u64,
    /// Requests by status class since start (`2xx`, ...), classes seen only.
    pub statuses: Vec<(&'static str, u64)>,
    /// Latency since start.
    #[serde(flatten)]
    pub latency: LatencySummary,
    /// The last minute.
    pub window: WindowSummary,
    /// The full histogram since start (for exposition).
    #[serde(skip)]
    pub histogram: HistogramSnapshot,
}

impl RouteSnapshot {
    /// Its last minute, or `None` when it had no request there.
    pub fn recent(&self) -> Option<RecentRoute> {
        (self.window.count > 0).then(|| RecentRoute {
            method: self.method,
            route: self.route.clone(),
            rate_per_s: self.window.rate_per_s,
            p95_ms: self.window.latency.p95_ms,
            errors: self.window.errors,
        })
    }
}
