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

/// A [`Check`] run at most once per `fresh` however many ask: a public `/health` route
/// (load balancers poll it, and so can anyone) then costs each dependency one probe
/// per `fresh`, not one per request, and a flood of it cannot take the database
/// pool's connections from real requests. Callers arriving while a probe runs wait
/// for it and share its answer. The probe runs in a task of its own, so a caller that
/// gives up (a client gone) neither loses it nor makes the next caller start over: a
/// caller waits at most [`CHECK_TIMEOUT`] for a probe under way, plus its own.
///
/// ```
/// use std::time::Duration;
/// use upcoach_core::health::SharedCheck;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let shared = SharedCheck::new(Duration::from_secs(1));
/// let probes = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
/// for _ in 0..3 {
///     let probes = probes.clone();
///     shared
///         .run(|| async move {
///             probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///             Ok::<_, ()>(Duration::from_millis(1))
///         })
///         .await;
/// }
/// assert_eq!(probes.load(std::sync::atomic::Ordering::Relaxed), 1, "one probe for three checks");
/// # });
/// ```
#[derive(Debug)]
pub struct SharedCheck {
    fresh: Duration,
    /// Held while a probe runs, so that callers meanwhile wait for its answer.
    probing: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The last answer and when it came: a fresh one costs a caller no async lock.
    last: std::sync::Arc<std::sync::Mutex<Option<(tokio::time::Instant, Check)>>>,
}

impl SharedCheck {
    /// Answers repeat a probe's for `fresh` (1 s suits a `/health` route).
    pub fn new(fresh: Duration) -> Self {
        Self {
            fresh,
            probing: std::sync::Arc::default(),
            last: std::sync::Arc::default(),
        }
    }

    /// The last answer if it is fresh.
    fn fresh(&self) -> Option<Check> {
        lock(&self.last)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < self.fresh)
            .map(|(_, check)| check.clone())
    }

    /// The last check if it is fresh, else [`Check::run`] of `probe()` in a task of its
    /// own (a probe that panics counts as down).
    pub async fn run<E, F>(&self, probe: impl FnOnce() -> F) -> Check
    where
        F: Future<Output = Result<Duration, E>> + Send + 'static,
        E: Send + 'static,
    {
        if let Some(check) = self.fresh() {
            return check;
        }
        let probing = self.probing.clone().lock_owned().await;
        // A probe that ran while this caller waited answers it too.
        if let Some(check) = self.fresh() {
            return check;
        }
        let probe = probe();
        let last = self.last.clone();
        let task = tokio::spawn(async move {
            let _probing = probing;
            let check = Check::run(probe).await;
            *lock(&last) = Some((tokio::time::Instant::now(), check.clone()));
            check
        });
        task.await.unwrap_or(Check {
            status: Status::Down,
            latency_ms: 0.0,
            error: Some("unreachable"),
        })
    }
}

/// A poisoned lock's value: the values behind these locks are whole at every unlock.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

#[cfg(test)]
mod shared_check_tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn probe(count: Arc<AtomicU32>) -> Result<Duration, ()> {
        count.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(Duration::from_millis(50))
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_probe_and_a_stale_answer_is_probed_again() {
        let shared = Arc::new(SharedCheck::new(Duration::from_secs(1)));
        let count = Arc::new(AtomicU32::new(0));
        let mut waiting = Vec::new();
        for _ in 0..20 {
            let (shared, count) = (shared.clone(), count.clone());
            waiting.push(tokio::spawn(
                async move { shared.run(|| probe(count)).await },
            ));
        }
        for check in waiting {
            assert_eq!(check.await.unwrap().status, Status::Ok);
        }
        assert_eq!(count.load(Ordering::SeqCst), 1, "twenty callers, one probe");

        tokio::time::advance(Duration::from_millis(900)).await;
        shared.run(|| probe(count.clone())).await;
        assert_eq!(count.load(Ordering::SeqCst), 1, "still fresh");
        tokio::time::advance(Duration::from_millis(200)).await;
        shared.run(|| probe(count.clone())).await;
        assert_eq!(count.load(Ordering::SeqCst), 2, "stale: probed again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_is_shared_too_and_retried_once_stale() {
        let shared = SharedCheck::new(Duration::from_secs(1));
        let down = shared.run(|| async { Err::<Duration, _>("refused") }).await;
        assert_eq!(down.status, Status::Down);
        let again = shared
            .run(|| async { Ok::<_, ()>(Duration::from_millis(1)) })
            .await;
        assert_eq!(again, down, "within a second the answer stands");
        tokio::time::advance(Duration::from_secs(1)).await;
        let up = shared
            .run(|| async { Ok::<_, ()>(Duration::from_millis(1)) })
            .await;
        assert_eq!(up.status, Status::Ok);
    }
}

#[cfg(test)]
mod shared_check_cancel_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_mid_probe_does_not_lose_the_probe() {
        let shared = std::sync::Arc::new(SharedCheck::new(Duration::from_secs(1)));
        let probes = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let slow = |probes: std::sync::Arc<std::sync::atomic::AtomicU32>| async move {
            probes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok::<_, ()>(Duration::from_millis(500))
        };
        // The first caller starts the probe, then gives up (its client went away).
        let (first, count) = (shared.clone(), probes.clone());
        let gone = tokio::spawn(async move { first.run(|| slow(count)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        gone.abort();
        // The next caller gets that probe's answer, without a probe of its own.
        let count = probes.clone();
        let check = shared.run(|| slow(count)).await;
        assert_eq!(check.status, Status::Degraded, "500 ms is past CHECK_SLOW");
        assert_eq!(probes.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
