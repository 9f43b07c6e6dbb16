//! Performance monitoring for upcoach servers: the [`MetricsSink`] seam.
//!
//! This crate is at its first step: the trait is settled so the other crates can
//! report through it. The in-memory sink, the request timing layer, slow-query
//! detection, resource readings, alert rules and Prometheus exposition are not built
//! yet.
//!
//! Recording is synchronous and must be cheap: it sits on every request's path.
//!
//! Implementing a sink (counters only, for illustration):
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use upcoach_perf::{Labels, MetricsSink};
//!
//! #[derive(Debug, Default)]
//! struct Counting(Mutex<HashMap<String, u64>>);
//!
//! impl MetricsSink for Counting {
//!     fn increment_counter(&self, name: &'static str, _labels: Labels<'_>, by: u64) {
//!         *self.0.lock().unwrap().entry(name.to_owned()).or_default() += by;
//!     }
//!     fn set_gauge(&self, _name: &'static str, _labels: Labels<'_>, _value: f64) {}
//!     fn record_histogram(&self, _name: &'static str, _labels: Labels<'_>, _value: f64) {}
//! }
//!
//! let sink = Counting::default();
//! sink.increment_counter("http_requests_total", &[("route", "/health")], 1);
//! assert_eq!(sink.0.lock().unwrap()["http_requests_total"], 1);
//! ```

use std::fmt;

/// Label pairs of one sample: `(name, value)`. Label values must come from a bounded
/// set (a route template, never a raw path).
pub type Labels<'a> = &'a [(&'static str, &'a str)];

/// Where counters, gauges and histogram samples go.
pub trait MetricsSink: fmt::Debug + Send + Sync + 'static {
    /// Adds `by` to the counter `name` with `labels`.
    fn increment_counter(&self, name: &'static str, labels: Labels<'_>, by: u64);

    /// Sets the gauge `name` with `labels` to `value`.
    fn set_gauge(&self, name: &'static str, labels: Labels<'_>, value: f64);

    /// Records one sample (seconds for latencies) in the histogram `name` with `labels`.
    fn record_histogram(&self, name: &'static str, labels: Labels<'_>, value: f64);
}
