//! [`MemoryMetrics`]: the in-memory [`MetricsSink`], bounded in series.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::histogram::{AtomicHistogram, HistogramSnapshot};
use crate::{Labels, MetricsSink};

/// Family names the request metrics export; a sink series may not use them.
const RESERVED: [&str; 2] = ["http_requests", "http_request_duration_seconds"];

/// The default most series (name + labels) a [`MemoryMetrics`] keeps.
pub const DEFAULT_MAX_SERIES: usize = 10_000;

/// Counters, gauges and histograms by name and labels, in memory.
///
/// - Names must be Prometheus metric names and label names Prometheus label names;
///   histogram samples are seconds (stored with nanosecond resolution).
/// - At most `max_series` series exist; samples for a new series past that, with an
///   invalid name, with a name already used by another type (`foo` and `foo_total`
///   are one counter family), or with a name of the request metrics (`http_requests*`,
///   `http_request_duration_seconds*`) are dropped and counted in
///   [`dropped`](Self::dropped) (one warning in the log, the first time).
///
/// ```
/// use upcoach_perf::{MemoryMetrics, MetricsSink};
///
/// let metrics = MemoryMetrics::default();
/// metrics.increment_counter("cache_hits_total", &[("tier", "l1")], 3);
/// metrics.set_gauge("pool_idle", &[], 4.0);
/// metrics.record_histogram("query_seconds", &[("digest", "select_users")], 0.012);
/// assert_eq!(metrics.counter("cache_hits_total", &[("tier", "l1")]), Some(3));
/// ```
#[derive(Debug)]
pub struct MemoryMetrics {
    series: RwLock<HashMap<SeriesKey, Arc<Series>>>,
    /// The type of each exposed family name (a counter's name without `_total`), so one
    /// name never carries two types.
    families: RwLock<HashMap<&'static str, &'static str>>,
    max_series: usize,
    dropped: AtomicU64,
    warned: AtomicBool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SeriesKey {
    pub(crate) name: &'static str,
    pub(crate) labels: Vec<(&'static str, String)>,
}

#[derive(Debug)]
pub(crate) enum Series {
    Counter(AtomicU64),
    Gauge(AtomicU64),
    Histogram(AtomicHistogram),
}

/// One series' value at a scrape.
#[derive(Debug, Clone)]
pub(crate) enum SeriesValue {
    Counter(u64),
    Gauge(f64),
    Histogram(HistogramSnapshot),
}

impl Default for MemoryMetrics {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_SERIES)
    }
}

fn valid_name(name: &str, allow_colon: bool) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || (allow_colon && b == b':'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || (allow_colon && b == b':'))
}

impl MemoryMetrics {
    /// A sink keeping at most `max_series` series.
    pub fn new(max_series: usize) -> Self {
        Self {
            series: RwLock::new(HashMap::new()),
            families: RwLock::new(HashMap::new()),
            max_series,
            dropped: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        }
    }

    /// Samples dropped (series limit, invalid name, type clash).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// How many series exist.
    pub fn series_count(&self) -> usize {
        self.read().len()
    }

    /// A counter's value, if the series exists.
    pub fn counter(&self, name: &'static str, labels: Labels<'_>) -> Option<u64> {
        match self.read().get(&key(name, labels)).map(|s| &**s) {
            Some(Series::Counter(v)) => Some(v.load(Ordering::Relaxed)),
            _ => None,
        }
    }

    /// A gauge's value, if the series exists.
    pub fn gauge(&self, name: &'static str, labels: Labels<'_>) -> Option<f64> {
        match self.read().get(&key(name, labels)).map(|s| &**s) {
            Some(Series::Gauge(v)) => Some(f64::from_bits(v.load(Ordering::Relaxed))),
            _ => None,
        }
    }

    /// A histogram's counts, if the series exists.
    pub fn histogram(&self, name: &'static str, labels: Labels<'_>) -> Option<HistogramSnapshot> {
        match self.read().get(&key(name, labels)).map(|s| &**s) {
            Some(Series::Histogram(h)) => Some(h.snapshot()),
            _ => None,
        }
    }

    /// Every series and its value, sorted by name then labels.
    pub(crate) fn collect(&self) -> Vec<(SeriesKey, SeriesValue)> {
        let mut out: Vec<(SeriesKey, SeriesValue)> = self
            .read()
            .iter()
            .map(|(k, s)| {
                let value = match &**s {
                    Series::Counter(v) => SeriesValue::Counter(v.load(Ordering::Relaxed)),
                    Series::Gauge(v) => {
                        SeriesValue::Gauge(f64::from_bits(v.load(Ordering::Relaxed)))
                    }
                    Series::Histogram(h) => SeriesValue::Histogram(h.snapshot()),
                };
                (k.clone(), value)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SeriesKey, Arc<Series>>> {
        self.series.read().unwrap_or_else(|p| p.into_inner())
    }

    fn drop_sample(&self, why: &'static str, name: &str) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                metric = name,
                why,
                "metric sample dropped (later drops are only counted)"
            );
        }
    }

    /// The series for `name` + `labels`, made by `make` on first use.
    fn series(
        &self,
        name: &'static str,
        labels: Labels<'_>,
        make: fn() -> Series,
        same_kind: fn(&Series) -> bool,
    ) -> Option<Arc<Series>> {
        let key = key(name, labels);
        if let Some(series) = self.read().get(&key) {
            if same_kind(series) {
                return Some(series.clone());
            }
            self.drop_sample("the series exists with another type", name);
            return None;
        }
        if !valid_name(name, true)
            || !labels
                .iter()
                .all(|(l, _)| valid_name(l, false) && *l != "le")
        {
            self.drop_sample("invalid metric or label name", name);
            return None;
        }
        let probe = make();
        let kind = match probe {
            Series::Counter(_) => "counter",
            Series::Gauge(_) => "gauge",
            Series::Histogram(_) => "histogram",
        };
        let family = if kind == "counter" {
            name.strip_suffix("_total").unwrap_or(name)
        } else {
            name
        };
        if RESERVED
            .iter()
            .any(|r| family == *r || family.starts_with(&format!("{r}_")))
        {
            self.drop_sample("the name belongs to the request metrics", name);
            return None;
        }
        {
            let mut families = self.families.write().unwrap_or_else(|p| p.into_inner());
            match families.get(family) {
                Some(existing) if *existing != kind => {
                    drop(families);
                    self.drop_sample("the name is in use with another type", name);
                    return None;
                }
                Some(_) => {}
                None => {
                    families.insert(family, kind);
                }
            }
        }
        let mut all = self.series.write().unwrap_or_else(|p| p.into_inner());
        if let Some(series) = all.get(&key) {
            return same_kind(series).then(|| series.clone());
        }
        if all.len() >= self.max_series {
            drop(all);
            self.drop_sample("the series limit is reached", name);
            return None;
        }
        let series = Arc::new(probe);
        all.insert(key, series.clone());
        Some(series)
    }
}

fn key(name: &'static str, labels: Labels<'_>) -> SeriesKey {
    let mut labels: Vec<(&'static str, String)> =
        labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    labels.sort();
    SeriesKey { name, labels }
}

impl MetricsSink for MemoryMetrics {
    fn increment_counter(&self, name: &'static str, labels: Labels<'_>, by: u64) {
        if let Some(series) = self.series(
            name,
            labels,
            || Series::Counter(AtomicU64::new(0)),
            |s| matches!(s, Series::Counter(_)),
        ) && let Series::Counter(v) = &*series
        {
            v.fetch_add(by, Ordering::Relaxed);
        }
    }

    fn set_gauge(&self, name: &'static str, labels: Labels<'_>, value: f64) {
        if let Some(series) = self.series(
            name,
            labels,
            || Series::Gauge(AtomicU64::new(0)),
            |s| matches!(s, Series::Gauge(_)),
        ) && let Series::Gauge(v) = &*series
        {
            v.store(value.to_bits(), Ordering::Relaxed);
        }
    }

    fn record_histogram(&self, name: &'static str, labels: Labels<'_>, value: f64) {
        if !value.is_finite() || value < 0.0 {
            self.drop_sample(
                "a histogram sample must be a finite, non-negative number of seconds",
                name,
            );
            return;
        }
        if let Some(series) = self.series(
            name,
            labels,
            || Series::Histogram(AtomicHistogram::new()),
            |s| matches!(s, Series::Histogram(_)),
        ) && let Series::Histogram(h) = &*series
        {
            h.record((value * 1e9) as u64);
        }
    }
}
