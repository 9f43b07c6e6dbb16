//! Prometheus text exposition (format 0.0.4) of request metrics and a [`MemoryMetrics`],
//! encoded by the `prometheus-client` crate.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::histogram::HistogramSnapshot;
use crate::sink::SeriesValue;
use crate::{MemoryMetrics, RequestMetrics};

/// The `Content-Type` of [`PrometheusExporter::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Histogram bucket bounds, in seconds, of every exported latency histogram.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Renders request metrics and a [`MemoryMetrics`] as Prometheus text.
///
/// Request metrics become `http_requests_total{method,route,status}` (status class) and
/// `http_request_duration_seconds{method,route}` (a histogram with
/// [`LATENCY_BUCKETS`], aggregatable across processes).
///
/// ```
/// use std::sync::Arc;
/// use upcoach_perf::{MemoryMetrics, MetricsSink, PrometheusExporter, RequestMetrics, RouteTable};
///
/// let requests = Arc::new(RequestMetrics::new(RouteTable::new(["/health"])?));
/// let metrics = Arc::new(MemoryMetrics::default());
/// metrics.set_gauge("process_threads", &[], 8.0);
/// let text = PrometheusExporter::new(requests, metrics).render();
/// assert!(text.contains("process_threads 8"));
/// # Ok::<(), upcoach_perf::InvalidTemplate>(())
/// ```
#[derive(Debug)]
pub struct PrometheusExporter {
    registry: Registry,
}

impl PrometheusExporter {
    /// An exporter of `requests` and `metrics`.
    pub fn new(requests: Arc<RequestMetrics>, metrics: Arc<MemoryMetrics>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Collect { requests, metrics }));
        Self { registry }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail, and our collector only fails on that.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// The labels of one series.
type LabelPairs = Vec<(&'static str, String)>;

#[derive(Debug)]
struct Collect {
    requests: Arc<RequestMetrics>,
    metrics: Arc<MemoryMetrics>,
}

/// Per-bucket counts at [`LATENCY_BUCKETS`] (the encoder accumulates them).
fn buckets(h: &HistogramSnapshot) -> Vec<(f64, u64)> {
    let bounds: Vec<u64> = LATENCY_BUCKETS.iter().map(|s| (s * 1e9) as u64).collect();
    let cumulative = h.cumulative_at(&bounds);
    let mut previous = 0;
    LATENCY_BUCKETS
        .iter()
        .zip(cumulative)
        .map(|(&bound, c)| {
            let n = c - previous;
            previous = c;
            (bound, n)
        })
        .collect()
}

fn encode_histogram(
    encoder: &mut prometheus_client::encoding::MetricEncoder<'_>,
    h: &HistogramSnapshot,
) -> Result<(), std::fmt::Error> {
    encoder.encode_histogram::<NoLabelSet>(h.sum() as f64 / 1e9, h.count(), &buckets(h), None)
}

impl Collector for Collect {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let routes = self.requests.snapshot();

        let mut counter = encoder.encode_descriptor(
            "http_requests",
            "HTTP requests by method, route template and status class.",
            None,
            MetricType::Counter,
        )?;
        for r in &routes {
            for (class, n) in &r.statuses {
                let labels = [
                    ("method", r.method),
                    ("route", r.route.as_str()),
                    ("status", class),
                ];
                counter
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(n, None)?;
            }
        }

        let mut histogram = encoder.encode_descriptor(
            "http_request_duration_seconds",
            "Time to the response head, by method and route template.",
            None,
            MetricType::Histogram,
        )?;
        for r in &routes {
            let labels = [("method", r.method), ("route", r.route.as_str())];
            encode_histogram(&mut histogram.encode_family(&labels)?, &r.histogram)?;
        }

        let mut by_name: BTreeMap<&'static str, Vec<(LabelPairs, SeriesValue)>> = BTreeMap::new();
        for (key, value) in self.metrics.collect() {
            // Counters `foo` and `foo_total` are one family (the sink allows one type
            // per family), encoded as `foo_total`.
            let family = match value {
                SeriesValue::Counter(_) => key.name.strip_suffix("_total").unwrap_or(key.name),
                _ => key.name,
            };
            by_name.entry(family).or_default().push((key.labels, value));
        }
        for (name, series) in &by_name {
            let kind = match series[0].1 {
                SeriesValue::Counter(_) => MetricType::Counter,
                SeriesValue::Gauge(_) => MetricType::Gauge,
                SeriesValue::Histogram(_) => MetricType::Histogram,
            };
            let base = *name;
            let mut metric = encoder.encode_descriptor(base, name, None, kind)?;
            for (labels, value) in series {
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let mut family = metric.encode_family(&labels)?;
                match value {
                    SeriesValue::Counter(n) => {
                        family.encode_counter::<NoLabelSet, u64, u64>(n, None)?
                    }
                    SeriesValue::Gauge(v) => family.encode_gauge(v)?,
                    SeriesValue::Histogram(h) => encode_histogram(&mut family, h)?,
                }
            }
        }
        Ok(())
    }
}
