//! Alert rules: thresholds held for a minimum time before firing, with hysteresis
//! before resolving, so a flapping value does not storm.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::broadcast;
use upcoach_core::Clock;
use upcoach_core::event::{AlertLevel, EventLog, SystemAlert};

/// Which side of the threshold is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Breach {
    /// Firing while the value is above the threshold.
    Above,
    /// Firing while the value is below the threshold.
    Below,
}

/// One rule: a named value, a threshold, and how long before firing and resolving.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertRule {
    /// Stable name (`http_p95_latency`).
    pub name: String,
    /// The value it watches (a key of the values passed to [`AlertEngine::evaluate`]).
    pub metric: String,
    /// The threshold.
    pub threshold: f64,
    /// Which side is bad.
    pub breach: Breach,
    /// How long the value must stay bad before the alert fires.
    pub for_duration: Duration,
    /// How far back past the threshold the value must come to count as recovered, as a
    /// fraction of the threshold (0.1: 10 % below an `Above` threshold).
    pub hysteresis: f64,
    /// How long the value must stay recovered before the alert resolves.
    pub resolve_after: Duration,
    /// The level of the firing alert.
    pub level: AlertLevel,
}

impl AlertRule {
    /// A rule with 30 s to fire, 10 % hysteresis and 60 s to resolve.
    pub fn new(
        name: &str,
        metric: &str,
        breach: Breach,
        threshold: f64,
        level: AlertLevel,
    ) -> Self {
        Self {
            name: name.to_owned(),
            metric: metric.to_owned(),
            threshold,
            breach,
            for_duration: Duration::from_secs(30),
            hysteresis: 0.1,
            resolve_after: Duration::from_secs(60),
            level,
        }
    }

    /// The reference system's thresholds: p95 latency 1000 ms, error rate 5 %, cache
    /// hit rate 80 %, active connections 5000, memory 90 %.
    pub fn defaults() -> Vec<AlertRule> {
        vec![
            AlertRule::new(
                "http_p95_latency",
                metrics::HTTP_P95_MS,
                Breach::Above,
                1000.0,
                AlertLevel::Warning,
            ),
            AlertRule::new(
                "http_error_rate",
                metrics::HTTP_ERROR_RATE,
                Breach::Above,
                0.05,
                AlertLevel::Critical,
            ),
            AlertRule::new(
                "cache_hit_rate",
                metrics::CACHE_HIT_RATE,
                Breach::Below,
                0.80,
                AlertLevel::Warning,
            ),
            AlertRule::new(
                "active_connections",
                metrics::ACTIVE_CONNECTIONS,
                Breach::Above,
                5000.0,
                AlertLevel::Warning,
            ),
            AlertRule::new(
                "memory_usage",
                metrics::MEMORY_USED_RATIO,
                Breach::Above,
                0.90,
                AlertLevel::Critical,
            ),
        ]
    }

    fn breached(&self, v: f64) -> bool {
        match self.breach {
            Breach::Above => v > self.threshold,
            Breach::Below => v < self.threshold,
        }
    }

    fn recovered(&self, v: f64) -> bool {
        match self.breach {
            Breach::Above => v <= self.threshold * (1.0 - self.hysteresis),
            Breach::Below => v >= self.threshold * (1.0 + self.hysteresis),
        }
    }
}

/// The names of the values the default rules watch.
pub mod metrics {
    /// p95 request latency over the last minute, milliseconds.
    pub const HTTP_P95_MS: &str = "http_p95_ms";
    /// Share of requests over the last minute that failed (5xx or no response).
    pub const HTTP_ERROR_RATE: &str = "http_error_rate";
    /// Cache hit rate (0 to 1).
    pub const CACHE_HIT_RATE: &str = "cache_hit_rate";
    /// Open realtime connections.
    pub const ACTIVE_CONNECTIONS: &str = "active_connections";
    /// Resident memory over the memory limit (0 to 1).
    pub const MEMORY_USED_RATIO: &str = "memory_used_ratio";
}

/// A rule changing state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertTransition {
    /// The rule.
    pub rule: String,
    /// `firing` or `resolved`.
    pub state: AlertState,
    /// The value that caused it.
    pub value: f64,
    /// The threshold.
    pub threshold: f64,
    /// The level of the stored alert (`info` for a resolution).
    pub level: AlertLevel,
    /// When.
    #[serde(with = "unix_ms")]
    pub at: SystemTime,
}

/// A transition's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The alert started firing.
    Firing,
    /// The alert stopped firing.
    Resolved,
}

mod unix_ms {
    use std::time::SystemTime;

    pub(super) fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        s.serialize_u64(ms)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Ok,
    Pending {
        since: SystemTime,
    },
    Firing {
        since: SystemTime,
        value: f64,
    },
    Resolving {
        since: SystemTime,
        fired: SystemTime,
        value: f64,
    },
}

/// A firing alert, for snapshots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FiringAlert {
    /// The rule.
    pub rule: String,
    /// Its level.
    pub level: AlertLevel,
    /// The value when it fired (or last seen while firing).
    pub value: f64,
    /// The threshold.
    pub threshold: f64,
    /// When it fired.
    #[serde(with = "unix_ms")]
    pub since: SystemTime,
}

/// Evaluates [`AlertRule`]s on each tick, records transitions in `system_alerts` through
/// the [`EventLog`] and sends them to subscribers.
///
/// Subscribers get a bounded channel (256 transitions); one that falls behind loses the
/// oldest and is told so by `RecvError::Lagged`.
#[derive(Debug)]
pub struct AlertEngine {
    rules: Vec<AlertRule>,
    states: Mutex<Vec<State>>,
    log: Arc<dyn EventLog>,
    clock: Arc<dyn Clock>,
    hook: broadcast::Sender<AlertTransition>,
}

impl AlertEngine {
    /// An engine for `rules`, recording into `log`, timed by `clock`.
    pub fn new(rules: Vec<AlertRule>, log: Arc<dyn EventLog>, clock: Arc<dyn Clock>) -> Self {
        let states = Mutex::new(vec![State::Ok; rules.len()]);
        Self {
            rules,
            states,
            log,
            clock,
            hook: broadcast::channel(256).0,
        }
    }

    /// The rules.
    pub fn rules(&self) -> &[AlertRule] {
        &self.rules
    }

    /// Transitions from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AlertTransition> {
        self.hook.subscribe()
    }

    /// Evaluates every rule against `values` (a missing value leaves its rule as it is)
    /// and returns the transitions that happened.
    pub fn evaluate(&self, values: &HashMap<&str, f64>) -> Vec<AlertTransition> {
        let now = self.clock.now();
        let mut out = Vec::new();
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        for (rule, state) in self.rules.iter().zip(states.iter_mut()) {
            let Some(&value) = values.get(rule.metric.as_str()) else {
                continue;
            };
            if !value.is_finite() {
                continue;
            }
            let elapsed = |since: SystemTime| now.duration_since(since).unwrap_or_default();
            *state = match *state {
                State::Ok if rule.breached(value) => {
                    if rule.for_duration.is_zero() {
                        out.push(self.transition(rule, AlertState::Firing, value, now));
                        State::Firing { since: now, value }
                    } else {
                        State::Pending { since: now }
                    }
                }
                State::Ok => State::Ok,
                State::Pending { .. } if !rule.breached(value) => State::Ok,
                State::Pending { since } if elapsed(since) >= rule.for_duration => {
                    out.push(self.transition(rule, AlertState::Firing, value, now));
                    State::Firing { since: now, value }
                }
                pending @ State::Pending { .. } => pending,
                State::Firing { since, .. } if rule.recovered(value) => State::Resolving {
                    since: now,
                    fired: since,
                    value,
                },
                State::Firing { since, .. } => State::Firing { since, value },
                State::Resolving { fired, .. } if !rule.recovered(value) => State::Firing {
                    since: fired,
                    value,
                },
                State::Resolving { since, .. } if elapsed(since) >= rule.resolve_after => {
                    out.push(self.transition(rule, AlertState::Resolved, value, now));
                    State::Ok
                }
                resolving @ State::Resolving { .. } => resolving,
            };
        }
        drop(states);
        for t in &out {
            let _ = self.hook.send(t.clone());
        }
        out
    }

    fn transition(
        &self,
        rule: &AlertRule,
        state: AlertState,
        value: f64,
        at: SystemTime,
    ) -> AlertTransition {
        let level = match state {
            AlertState::Firing => rule.level,
            AlertState::Resolved => AlertLevel::Info,
        };
        let (verb, side) = match (state, rule.breach) {
            (AlertState::Firing, Breach::Above) => ("firing", "above"),
            (AlertState::Firing, Breach::Below) => ("firing", "below"),
            (AlertState::Resolved, _) => ("resolved", "back within"),
        };
        let message = format!(
            "{} {verb}: {} = {value:.3} ({side} threshold {})",
            rule.name, rule.metric, rule.threshold
        );
        let alert =
            SystemAlert::new(level, "perf", message, &*self.clock).metadata(serde_json::json!({
                "rule": rule.name,
                "metric": rule.metric,
                "state": verb,
                "value": value,
                "threshold": rule.threshold,
            }));
        match state {
            AlertState::Firing => {
                tracing::warn!(rule = %rule.name, value, threshold = rule.threshold, "alert firing")
            }
            AlertState::Resolved => tracing::info!(rule = %rule.name, value, "alert resolved"),
        }
        if let Err(e) = self.log.record(alert.into()) {
            tracing::warn!(error = %e, rule = %rule.name, "alert transition not recorded in the event log");
        }
        AlertTransition {
            rule: rule.name.clone(),
            state,
            value,
            threshold: rule.threshold,
            level,
            at,
        }
    }

    /// The alerts firing now (including those waiting out their resolve time).
    pub fn firing(&self) -> Vec<FiringAlert> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        self.rules
            .iter()
            .zip(states.iter())
            .filter_map(|(rule, state)| match *state {
                State::Firing { since, value }
                | State::Resolving {
                    fired: since,
                    value,
                    ..
                } => Some(FiringAlert {
                    rule: rule.name.clone(),
                    level: rule.level,
                    value,
                    threshold: rule.threshold,
                    since,
                }),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
