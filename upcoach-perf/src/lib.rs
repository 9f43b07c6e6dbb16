//! Performance monitoring for upcoach servers, light enough to leave on.
//!
//! - [`RequestTimingLayer`]: a tower layer that records method, route *template*,
//!   status class and latency of every request into [`RequestMetrics`]: lock-free
//!   histograms since start and over the last minute, p50/p95/p99/max within 3.125 %.
//! - [`MemoryMetrics`]: the in-memory [`MetricsSink`] (counters, gauges, histograms),
//!   bounded in series.
//! - [`PrometheusExporter`]: Prometheus text exposition of both.
//! - [`ProcessSampler`]: RSS, CPU, threads and descriptors from `/proc`.
//! - [`AlertEngine`]: threshold rules with a minimum duration and hysteresis, recorded in
//!   `system_alerts` and sent to subscribers.
//! - [`PerfMonitor`]: all of the above on a ticker, and the JSON snapshot.
//!
//! - [`slow`]: every SQL statement timed through sqlx's `tracing` log; slow ones grouped
//!   by normalized SQL. With the `postgres` feature, `slow::explain` gives each its
//!   plan, without running it.
//! - [`advice`]: recommendations from the above (slowest routes, a poor cache hit rate,
//!   and with `postgres` the slow statements and their plans).
//! - [`MatchedRoute`]: a router names the template it matched in the response, and the
//!   timing layer takes its word instead of matching the path again.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use upcoach_perf::{RequestMetrics, RouteTable};
//!
//! let metrics = RequestMetrics::new(RouteTable::new(["/health", "/api/users/{id}"])?);
//! metrics.record_request(&http::Method::GET, "/api/users/42", Some(200), Duration::from_millis(12));
//! metrics.record_request(&http::Method::GET, "/random/scan/path", Some(404), Duration::from_millis(1));
//! let routes = metrics.snapshot();
//! assert_eq!(routes[0].route, "/api/users/{id}");
//! assert_eq!(routes[1].route, "unmatched");
//! assert!((routes[0].p95_ms() - 12.0).abs() <= 12.0 / 32.0);
//! # Ok::<(), upcoach_perf::InvalidTemplate>(())
//! ```

use std::fmt;

pub mod advice;
pub mod alert;
mod config;
mod exposition;
pub mod histogram;
mod layer;
mod monitor;
mod process;
mod requests;
mod route;
mod sink;
pub mod slow;
#[cfg(feature = "redis")]
mod slow_redis;

pub use alert::{AlertEngine, AlertRule, AlertState, AlertTransition, Breach, FiringAlert};
pub use config::{DEFAULT_SLOW_QUERY_THRESHOLD_MS, PerfConfig, PerfSinks};
pub use exposition::{CONTENT_TYPE, LATENCY_BUCKETS, PrometheusExporter};
pub use layer::{RequestTiming, RequestTimingLayer, TimingFuture};
pub use monitor::{MIN_REQUESTS_FOR_ERROR_RATE, OverallWindow, PerfMonitor, PerfSnapshot};
pub use process::{ProcessReading, ProcessSampler};
pub use requests::{LatencySummary, RecentRoute, RequestMetrics, RouteSnapshot, WindowSummary};
pub use route::{InvalidTemplate, MatchedRoute, RouteId, RouteTable, UNMATCHED};
pub use sink::{DEFAULT_MAX_SERIES, MemoryMetrics};

/// Label pairs of one sample: `(name, value)`. Label values must come from a bounded
/// set (a route template, never a raw path).
pub type Labels<'a> = &'a [(&'static str, &'a str)];

/// Where counters, gauges and histogram samples go.
///
/// Recording is synchronous and must be cheap: it sits on request paths.
///
/// Implementing a sink (counters only, for illustration):
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use upcoach_perf::{Labels, MetricsSink};
///
/// #[derive(Debug, Default)]
/// struct Counting(Mutex<HashMap<String, u64>>);
///
/// impl MetricsSink for Counting {
///     fn increment_counter(&self, name: &'static str, _labels: Labels<'_>, by: u64) {
///         *self.0.lock().unwrap().entry(name.to_owned()).or_default() += by;
///     }
///     fn set_gauge(&self, _name: &'static str, _labels: Labels<'_>, _value: f64) {}
///     fn record_histogram(&self, _name: &'static str, _labels: Labels<'_>, _value: f64) {}
/// }
///
/// let sink = Counting::default();
/// sink.increment_counter("http_requests_total", &[("route", "/health")], 1);
/// assert_eq!(sink.0.lock().unwrap()["http_requests_total"], 1);
/// ```
pub trait MetricsSink: fmt::Debug + Send + Sync + 'static {
    /// Adds `by` to the counter `name` with `labels`.
    fn increment_counter(&self, name: &'static str, labels: Labels<'_>, by: u64);

    /// Sets the gauge `name` with `labels` to `value`.
    fn set_gauge(&self, name: &'static str, labels: Labels<'_>, value: f64);

    /// Records one sample (seconds for latencies) in the histogram `name` with `labels`.
    fn record_histogram(&self, name: &'static str, labels: Labels<'_>, value: f64);
}
