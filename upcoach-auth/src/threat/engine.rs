//! The detection task: examines each sighting against the state, and raises, blocks,
//! records and publishes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use upcoach_core::Clock;
use upcoach_core::event::{Event, EventLog, SystemAlert};
use upcoach_core::limit::RateLimiter;

use super::sighting::Sighting;
use super::{
    ALERT_SOURCE, AlertPublisher, Detector, DetectorState, Observation, ThreatConfig, Threshold,
};

/// How long a publish or a block may take before the detector moves on.
const SIDE_EFFECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The least time between two warnings of one kind (drops, state errors).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What the detector counts, shared by its handle and its task.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) seen: AtomicU64,
    pub(super) queued: AtomicU64,
    pub(super) examined: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) alerts: AtomicU64,
    pub(super) blocks: AtomicU64,
    pub(super) state_errors: AtomicU64,
    pub(super) block_errors: AtomicU64,
    pub(super) record_errors: AtomicU64,
    /// Woken after each examined event.
    pub(super) progress: Notify,
    pub(super) drop_warnings: Throttle,
    pub(super) state_warnings: Throttle,
}

/// Lets one warning of a kind through every [`WARN_EVERY`], with the count since.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    pending: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Throttle {
    /// Counts one; `Some(n)` when a warning for the `n` so far is due.
    pub(super) fn hit(&self) -> Option<u64> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return None;
        }
        *last = Some(Instant::now());
        Some(self.pending.swap(0, Ordering::Relaxed))
    }
}

/// The detection task's half.
pub(super) struct Engine {
    pub(super) config: ThreatConfig,
    pub(super) state: Arc<dyn DetectorState>,
    pub(super) publisher: Option<Arc<dyn AlertPublisher>>,
    pub(super) limiter: Option<Arc<dyn RateLimiter>>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) inner: Arc<dyn EventLog>,
    pub(super) counters: Arc<Counters>,
}

impl Engine {
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Sighting>) {
        while let Some(sighting) = rx.recv().await {
            self.examine(&sighting).await;
            self.counters.examined.fetch_add(1, Ordering::AcqRel);
            self.counters.progress.notify_waiters();
        }
    }

    async fn examine(&self, sighting: &Sighting) {
        for (detector, subject, member) in sighting.observations() {
            let threshold = self.config.threshold(detector);
            if !threshold.is_on() {
                continue;
            }
            let observation = Observation::new(
                detector.as_str(),
                subject,
                member,
                sighting.at,
                threshold.window,
                threshold.count,
            );
            match self.state.observe(&observation).await {
                Ok(tally) if tally.opened => {
                    self.raise(detector, subject, tally.count, threshold, sighting)
                        .await;
                }
                Ok(_) => {}
                Err(error) => {
                    self.counters.state_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(failed) = self.counters.state_warnings.hit() {
                        tracing::warn!(
                            error = %error,
                            source = ?std::error::Error::source(&error).map(|s| s.to_string()),
                            failed,
                            "threat detection state failed; those observations were lost"
                        );
                    }
                }
            }
        }
    }

    async fn raise(
        &self,
        detector: Detector,
        subject: &str,
        count: u64,
        threshold: Threshold,
        sighting: &Sighting,
    ) {
        self.counters.alerts.fetch_add(1, Ordering::Relaxed);
        let blocked = match &self.limiter {
            Some(limiter) if detector.blocks() && !self.config.block.is_zero() => {
                match tokio::time::timeout(
                    SIDE_EFFECT_TIMEOUT,
                    limiter.block(subject, self.config.block),
                )
                .await
                {
                    Ok(Ok(())) => {
                        self.counters.blocks.fetch_add(1, Ordering::Relaxed);
                        Some(self.config.block)
                    }
                    Ok(Err(error)) => {
                        self.counters.block_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%error, code = error.code(), detector = %detector, subject, "could not block an offending address");
                        None
                    }
                    Err(_) => {
                        self.counters.block_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(detector = %detector, subject, "blocking an offending address timed out");
                        None
                    }
                }
            }
            _ => None,
        };
        let window = human(threshold.window);
        let mut message = match detector {
            Detector::BruteForceAddress => {
                format!("{count} failed sign-ins from {subject} within {window}")
            }
            Detector::BruteForceAccount => {
                format!("{count} failed sign-ins of {subject} within {window}")
            }
            Detector::CredentialStuffing => format!(
                "{count} different accounts failed to sign in from {subject} within {window}"
            ),
            Detector::RefreshTokenReuse => format!(
                "possible refresh-token theft: {} for {subject}",
                sighting.event_type
            ),
            Detector::SigninBurst => {
                format!("{subject} signed in from {count} different addresses within {window}")
            }
        };
        if let Some(block) = blocked {
            message.push_str(&format!("; {subject} blocked for {}", human(block)));
        }
        let mut metadata = serde_json::json!({
            "detector": detector.as_str(),
            "subject": subject,
            "count": count,
            "threshold": threshold.count,
            "window_s": threshold.window.as_secs(),
        });
        if let Some(block) = blocked {
            metadata["blocked_s"] = block.as_secs().into();
        }
        if detector == Detector::RefreshTokenReuse {
            metadata["event_type"] = sighting.event_type.clone().into();
        }
        let alert = SystemAlert::new(detector.level(), ALERT_SOURCE, message, self.clock.as_ref())
            .metadata(metadata);
        tracing::warn!(detector = %detector, subject, count, alert_id = %alert.id, "threat detected");
        if let Err(error) = self.inner.record(Event::Alert(alert.clone())) {
            self.counters.record_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, detector = %detector, "a threat alert was not recorded");
        }
        if let Some(publisher) = &self.publisher
            && tokio::time::timeout(SIDE_EFFECT_TIMEOUT, publisher.publish(&alert))
                .await
                .is_err()
        {
            tracing::warn!(detector = %detector, "publishing a threat alert timed out");
        }
    }
}

/// `90 s`, `5 min`, `1 h 30 min`, `2 h`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s} s"),
        (0, m, 0) => format!("{m} min"),
        (h, 0, 0) => format!("{h} h"),
        (h, m, 0) => format!("{h} h {m} min"),
        _ => format!("{s} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_read_as_people_write_them() {
        assert_eq!(human(Duration::from_secs(90)), "90 s");
        assert_eq!(human(Duration::from_secs(300)), "5 min");
        assert_eq!(human(Duration::from_secs(3600)), "1 h");
        assert_eq!(human(Duration::from_secs(5400)), "1 h 30 min");
    }
}
