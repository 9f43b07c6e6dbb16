//! Health checks for a `/health` route: [`Check::run`] times a probe of a dependency
//! (bounded by [`CHECK_TIMEOUT`], slow past [`CHECK_SLOW`]), and [`Status::worst`]
//! folds the checks into the route's answer.
//!
//! ```
//! use std::time::Duration;
//! use upcoach_core::health::{Check, Status};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let fast = Check::run(async { Ok::<_, ()>(Duration::from_millis(3)) }).await;
//! let broken = Check::run(async { Err::<Duration, _>("refused") }).await;
//! assert_eq!(fast.status, Status::Ok);
//! assert_eq!(broken.error, Some("unreachable"));
//! assert_eq!(fast.status.worst(broken.status), Status::Down);
//! assert_eq!(broken.failing_open().status, Status::Degraded);
//! # });
//! ```

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

/// How long one check may take before it counts as down.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// A check slower than this is degraded.
pub const CHECK_SLOW: Duration = Duration::from_millis(250);

/// How a dependency (or the whole service) is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Answering in time.
    Ok,
    /// Slow, or down in a way the service works around.
    Degraded,
    /// Not answering.
    Down,
}

impl Status {
    /// The worse of the two.
    pub fn worst(self, other: Status) -> Status {
        self.max(other)
    }
}

/// One dependency's check: `{"status","latency_ms","error"?}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// How it is doing.
    pub status: Status,
    /// How long the probe took, in milliseconds (to the microsecond).
    pub latency_ms: f64,
    /// Why it is down: `unreachable` or `timeout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
}

impl Check {
    /// Runs `probe` (which answers with the latency it measured) for at most
    /// [`CHECK_TIMEOUT`].
    pub async fn run<E>(probe: impl Future<Output = Result<Duration, E>>) -> Self {
        match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
            Ok(Ok(latency)) => Check {
                status: if latency > CHECK_SLOW {
                    Status::Degraded
                } else {
                    Status::Ok
                },
                latency_ms: (latency.as_secs_f64() * 1_000_000.0).round() / 1000.0,
                error: None,
            },
            Ok(Err(_)) => Check {
                status: Status::Down,
                latency_ms: 0.0,
                error: Some("unreachable"),
            },
            Err(_) => Check {
                status: Status::Down,
                latency_ms: CHECK_TIMEOUT.as_secs_f64() * 1000.0,
                error: Some("timeout"),
            },
        }
    }

    /// The same check for a dependency the service fails open on (a cache): down is
    /// only degraded.
    pub fn failing_open(mut self) -> Self {
        if self.status == Status::Down {
            self.status = Status::Degraded;
        }
        self
    }
}

/// One gauge reading, as a crate reports its state for a metrics sink: name, labels and
/// value (`cache_hits{tier="l1"} 42`). Each crate's stats say which gauges they make.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gauge {
    /// The metric's name.
    pub name: &'static str,
    /// Its labels.
    pub labels: &'static [(&'static str, &'static str)],
    /// The reading.
    pub value: f64,
}

impl Gauge {
    /// A reading of `name` with `labels`.
    pub fn new(
        name: &'static str,
        labels: &'static [(&'static str, &'static str)],
        value: f64,
    ) -> Self {
        Self {
            name,
            labels,
            value,
        }
    }
}
