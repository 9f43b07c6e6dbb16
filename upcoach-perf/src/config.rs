//! Performance monitoring's settings: `PERFORMANCE_MONITORING_ENABLED` and
//! `SLOW_QUERY_THRESHOLD`.

use std::time::Duration;

use upcoach_core::config::{Env, Settings};

/// The default slow-query threshold (`SLOW_QUERY_THRESHOLD`), in milliseconds.
pub const DEFAULT_SLOW_QUERY_THRESHOLD_MS: u64 = 1000;

/// What performance monitoring reads from the environment.
///
/// ```
/// use upcoach_core::config::Settings;
/// use upcoach_perf::PerfConfig;
///
/// let config = PerfConfig::from_lookup(|name| (name == "SLOW_QUERY_THRESHOLD").then(|| "250".into()))?;
/// assert_eq!(config.slow_query_threshold.as_millis(), 250);
/// assert!(config.enabled);
/// assert!(PerfConfig::from_lookup(|name| (name == "SLOW_QUERY_THRESHOLD").then(|| "soon".into())).is_err());
/// # Ok::<(), upcoach_core::config::ConfigErrors>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PerfConfig {
    /// `PERFORMANCE_MONITORING_ENABLED`: whether the timing layer records (default
    /// true; false makes it a pass-through).
    pub enabled: bool,
    /// `SLOW_QUERY_THRESHOLD`: statements at least this slow are grouped in the
    /// slow-query list (milliseconds, 1 to 3,600,000; default 1000).
    pub slow_query_threshold: Duration,
}

impl Default for PerfConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            slow_query_threshold: Duration::from_millis(DEFAULT_SLOW_QUERY_THRESHOLD_MS),
        }
    }
}

impl Settings for PerfConfig {
    fn read(env: &mut Env<'_>) -> Self {
        let defaults = Self::default();
        Self {
            enabled: env.flag("PERFORMANCE_MONITORING_ENABLED", defaults.enabled),
            slow_query_threshold: Duration::from_millis(env.number(
                "SLOW_QUERY_THRESHOLD",
                DEFAULT_SLOW_QUERY_THRESHOLD_MS,
                1..=3_600_000,
                "a whole number of milliseconds from 1 to 3600000",
            )),
        }
    }
}

/// The parts of performance monitoring that must exist before logging starts, because
/// SQL timing comes through the `tracing` subscriber: make them first, add
/// [`sql_layer`](Self::sql_layer) to the subscriber, then hand them to the rest.
#[derive(Debug, Clone)]
pub struct PerfSinks {
    /// Counters, gauges and histograms.
    pub metrics: std::sync::Arc<crate::MemoryMetrics>,
    /// Slow statements, grouped by digest (the 200 slowest kept).
    pub slow_queries: std::sync::Arc<crate::slow::SlowQueryLog>,
}

impl PerfSinks {
    /// Sinks for `config` (`SLOW_QUERY_THRESHOLD`).
    pub fn new(config: &PerfConfig) -> Self {
        Self {
            metrics: Default::default(),
            slow_queries: std::sync::Arc::new(crate::slow::SlowQueryLog::new(
                config.slow_query_threshold,
                200,
            )),
        }
    }

    /// The `tracing` layer that times SQL statements into these sinks; add it to the
    /// subscriber with a filter on
    /// [`SqlTimingLayer::wants`](crate::slow::SqlTimingLayer::wants).
    pub fn sql_layer(&self) -> crate::slow::SqlTimingLayer {
        crate::slow::SqlTimingLayer::new(self.slow_queries.clone(), self.metrics.clone())
    }
}
