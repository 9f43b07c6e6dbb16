//! [`PerfMonitor`]: ties request metrics, process readings and alert rules together on
//! a ticker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::alert::{AlertEngine, FiringAlert, metrics};
use crate::process::{ProcessReading, ProcessSampler};
use crate::requests::{LatencySummary, RouteSnapshot};
use crate::{MemoryMetrics, MetricsSink, PrometheusExporter, RequestMetrics};

/// The fewest requests in the last minute for an error rate to be judged (one failure
/// out of three requests is not an incident); below it the rate counts as 0.
pub const MIN_REQUESTS_FOR_ERROR_RATE: u64 = 20;

/// What the monitor saw, for `GET /api/dashboard/realtime/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct PerfSnapshot {
    /// Every route and method seen.
    pub routes: Vec<RouteSnapshot>,
    /// All routes together over the last minute.
    pub overall: OverallWindow,
    /// The latest process reading.
    pub process: ProcessReading,
    /// Alerts firing now.
    pub alerts: Vec<FiringAlert>,
}

/// All routes together over the last minute.
#[derive(Debug, Clone, Serialize)]
pub struct OverallWindow {
    /// Requests.
    pub count: u64,
    /// Failed requests (5xx or no response).
    pub errors: u64,
    /// Latency.
    #[serde(flatten)]
    pub latency: LatencySummary,
}

/// Request metrics, a metrics sink, process readings and alert rules, refreshed by
/// [`tick`](Self::tick) (every few seconds, from [`spawn`](Self::spawn)).
#[derive(Debug)]
pub struct PerfMonitor {
    requests: Arc<RequestMetrics>,
    metrics: Arc<MemoryMetrics>,
    process: ProcessSampler,
    last_process: Mutex<ProcessReading>,
    alerts: AlertEngine,
    exporter: PrometheusExporter,
}

impl PerfMonitor {
    /// A monitor over `requests` and `metrics`, judging `alerts`.
    pub fn new(
        requests: Arc<RequestMetrics>,
        metrics: Arc<MemoryMetrics>,
        alerts: AlertEngine,
    ) -> Self {
        Self {
            exporter: PrometheusExporter::new(requests.clone(), metrics.clone()),
            requests,
            metrics,
            process: ProcessSampler::new(),
            last_process: Mutex::new(ProcessReading::default()),
            alerts,
        }
    }

    /// The request metrics.
    pub fn requests(&self) -> &Arc<RequestMetrics> {
        &self.requests
    }

    /// The metrics sink.
    pub fn metrics(&self) -> &Arc<MemoryMetrics> {
        &self.metrics
    }

    /// The alert engine.
    pub fn alerts(&self) -> &AlertEngine {
        &self.alerts
    }

    /// Reads the process into gauges and judges the alert rules, with `extra` values
    /// from the host (cache hit rate, connections) beside the monitor's own.
    pub fn tick(&self, extra: &HashMap<&'static str, f64>) {
        let reading = self.process.sample();
        let sink: &dyn MetricsSink = &*self.metrics;
        let gauges = [
            (
                "process_resident_memory_bytes",
                reading.rss_bytes.map(|v| v as f64),
            ),
            (
                "process_memory_limit_bytes",
                reading.memory_limit_bytes.map(|v| v as f64),
            ),
            ("process_cpu_seconds", reading.cpu_seconds),
            ("process_cpu_percent", reading.cpu_percent),
            ("process_threads", reading.threads.map(|v| v as f64)),
            ("process_open_fds", reading.open_fds.map(|v| v as f64)),
            ("process_max_fds", reading.max_fds.map(|v| v as f64)),
        ];
        for (name, value) in gauges {
            if let Some(value) = value {
                sink.set_gauge(name, &[], value);
            }
        }
        *self.last_process.lock().unwrap_or_else(|p| p.into_inner()) = reading;

        let mut values = extra.clone();
        // With no traffic the latency and error rate are 0, not unknown, so an alert that
        // fired under load can resolve once the load is gone.
        let (window, errors) = self.requests.window_overall();
        values.insert(
            metrics::HTTP_P95_MS,
            window.quantile(0.95).map_or(0.0, |p95| p95 as f64 / 1e6),
        );
        let rate = if window.count() >= MIN_REQUESTS_FOR_ERROR_RATE {
            errors as f64 / window.count() as f64
        } else {
            0.0
        };
        values.insert(metrics::HTTP_ERROR_RATE, rate);
        if let Some(ratio) = reading.memory_used_ratio() {
            values.insert(metrics::MEMORY_USED_RATIO, ratio);
        }
        self.alerts.evaluate(&values);
    }

    /// Ticks every `every` in the background with `extra()` values, until the handle is
    /// aborted.
    pub fn spawn<F>(self: &Arc<Self>, every: Duration, extra: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> HashMap<&'static str, f64> + Send + Sync + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                this.tick(&extra());
            }
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> PerfSnapshot {
        let (window, errors) = self.requests.window_overall();
        PerfSnapshot {
            routes: self.requests.snapshot(),
            overall: OverallWindow {
                count: window.count(),
                errors,
                latency: LatencySummary::of(&window),
            },
            process: *self.last_process.lock().unwrap_or_else(|p| p.into_inner()),
            alerts: self.alerts.firing(),
        }
    }

    /// The Prometheus exposition text.
    pub fn render_prometheus(&self) -> String {
        self.exporter.render()
    }
}
