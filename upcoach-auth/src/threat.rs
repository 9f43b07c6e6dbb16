//! Threat detection: sliding-window detectors over the security events sign-in
//! records, raising `system_alerts`, publishing them live and blocking offenders.
//!
//! [`ThreatDetector`] is an [`EventLog`] wrapped around the host's log: hand it to
//! [`SessionsBuilder::events`](crate::sessions::SessionsBuilder::events) (and wherever
//! else security events are recorded) and detection needs no other change. Every call
//! is forwarded to the inner log unchanged; each security event a detector reads is
//! also queued (bounded, [`ThreatConfig::queue_capacity`]) for one background task. When
//! the queue is full the event is **not examined** (counted in
//! [`ThreatStats::events_dropped`], logged at most every 10 s) but still recorded by the
//! inner log: recording never waits on detection.
//!
//! # Detectors
//!
//! | Detector | Reads | Subject | Fires at (default) | Level | Blocks |
//! |---|---|---|---|---|---|
//! | `brute_force_address` | failures | the address | 10 in 5 min | warning | yes |
//! | `brute_force_account` | failures | the account | 5 in 15 min | warning | no |
//! | `credential_stuffing` | failures with an account | the address | 5 distinct accounts in 10 min | critical | yes |
//! | `refresh_token_reuse` | token reuse | the user | every one (1 alert per user per hour) | critical | no |
//! | `signin_burst` | successes | the user | 4 distinct addresses in 10 min | warning | no |
//!
//! - **Failures** are [`FAILURE_EVENTS`] (`login_failed`, `login_code_refused`,
//!   `logout_refused`); **token reuse** is [`TOKEN_REUSE_EVENTS`]
//!   (`refresh_token_reused`, `refresh_device_mismatch`); **successes** are
//!   [`SUCCESS_EVENTS`] (`login_success`). Other events (`rate_limited`,
//!   `token_rejected`, `logout`, ...) are forwarded and not examined: a refused request
//!   is the consequence of a detection or an expired token, not a new attempt.
//!   Summary rows of an [`AggregatingLog`](upcoach_core::event::AggregatingLog)
//!   (`details.aggregated`) are not counted either: put the detector **outside** an
//!   aggregating log, so it sees every event one by one.
//! - **Addresses** are [`ip_subject`](upcoach_core::limit::ip_subject)'s:
//!   `ip:203.0.113.7`, and IPv6 by /64 (`ip:2001:db8:1:2::/64`), since one client
//!   usually holds a whole /64.
//! - **Accounts** are [`account_of`]'s: `user:<uuid>` when the event names its user,
//!   else `subject:<provider>:<subject>` or `email:<address>` when its details carry a
//!   `subject` or `email`. Sign-in's `login_failed` carries neither today (its details
//!   are `provider` and `code`: an OAuth failure rarely knows the account), so the
//!   per-account detectors and credential stuffing fire only for events that do name
//!   one (`logout_refused`, or a host's own failures with `details.email`).
//! - An alert is **not repeated while open**: the first observation that reaches the
//!   threshold opens an alert for (detector, subject) for one window; a pattern still
//!   going after that raises it again (one alert per window while it lasts).
//! - Blocking: with a [`RateLimiter`] and a non-zero [`ThreatConfig::block`], brute force
//!   by address and credential stuffing call [`RateLimiter::block`] on the address.
//!   Accounts are never blocked: that would let anyone lock a user out by failing on
//!   their behalf.
//!
//! # What a detection does
//!
//! 1. blocks the address (above);
//! 2. records `Event::Alert(SystemAlert)` (source `auth`) in the inner log, with
//!    metadata `{"detector","subject","count","threshold","window_s"}` (and `blocked_s`
//!    when it blocked, `event_type` for token reuse); never a token, secret or code;
//! 3. calls the [`AlertPublisher`], which the host wires to its realtime hub, rooms
//!    [`ALERT_ROOMS`] (`alerts`, `security`), event [`ALERT_EVENT`], data
//!    [`alert_payload`].
//!
//! # State
//!
//! Windows and open alerts live in a [`DetectorState`]: [`MemoryDetectorState`]
//! (default, this process only, bounded) or `RedisDetectorState` (feature `redis`,
//! shared: several processes count one pattern together and raise one alert). Windows
//! run on the events' `created_at`, in both. A state error is logged (at most every
//! 10 s), counted in [`ThreatStats::state_errors`], and costs that observation only.
//!
//! ```
//! use std::sync::Arc;
//! use upcoach_auth::threat::{ThreatConfig, ThreatDetector};
//! use upcoach_core::event::{ClientFacts, Event, EventKind, EventLog, MemoryEventLog, SecurityEvent};
//! use upcoach_core::limit::MemoryLimiter;
//! use upcoach_core::SystemClock;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let log = Arc::new(MemoryEventLog::default());
//! let detector = ThreatDetector::builder(log.clone())
//!     .config(ThreatConfig::default())
//!     .limiter(Arc::new(MemoryLimiter::new()))
//!     .build();
//! // Sign-in records through the detector: `SessionsBuilder::events(detector.clone())`.
//! let facts = ClientFacts { ip: Some("203.0.113.7".parse().unwrap()), ..Default::default() };
//! for _ in 0..10 {
//!     let failed = SecurityEvent::new("login_failed", &SystemClock)
//!         .client(&facts)
//!         .details(serde_json::json!({"provider": "google", "code": "invalid_token"}));
//!     detector.record(failed.into())?;
//! }
//! detector.idle().await;
//! let alerts = log.recent(EventKind::Alert, 10).await?;
//! let Event::Alert(alert) = &alerts[0] else { unreachable!() };
//! assert_eq!(alert.metadata["detector"], "brute_force_address");
//! assert_eq!(alert.metadata["subject"], "ip:203.0.113.7");
//! assert_eq!(detector.stats().alerts_raised, 1);
//! # Ok::<(), upcoach_core::event::EventLogError>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::mpsc;
use upcoach_core::event::{
    AlertLevel, Event, EventKind, EventLog, EventLogError, EventLogStats, EventTypeCount,
};
use upcoach_core::limit::RateLimiter;
use upcoach_core::{Clock, SystemClock};

mod config;
#[cfg(feature = "testing")]
pub mod conformance;
mod engine;
mod publish;
#[cfg(feature = "redis")]
mod redis;
mod sighting;
mod state;

pub use config::{
    DEFAULT_MAX_KEYS, DEFAULT_QUEUE_CAPACITY, MAX_THRESHOLD, MAX_WINDOW, ThreatConfig, Threshold,
};
pub use publish::{AlertPublisher, AlertPublisherFn, alert_payload, room_publisher};
#[cfg(feature = "redis")]
pub use redis::RedisDetectorState;
pub use sighting::account_of;
pub use state::{
    DetectorState, MAX_WINDOW_MEMBERS, MemoryDetectorState, Observation, StateError, Tally,
};

use engine::{Counters, Engine};
use sighting::Sighting;

/// Events counted as failed sign-in attempts.
pub const FAILURE_EVENTS: &[&str] = &[
    "login_failed",
    "login_code_refused",
    "logout_refused",
    "refresh_failed",
];
/// Events meaning a refresh token was presented where it should not have been.
pub const TOKEN_REUSE_EVENTS: &[&str] = &["refresh_token_reused", "refresh_device_mismatch"];
/// Events counted as successful sign-ins.
pub const SUCCESS_EVENTS: &[&str] = &["login_success"];
/// The rooms a host publishes alerts to.
pub const ALERT_ROOMS: [&str; 2] = ["alerts", "security"];
/// The event name alerts are published under (as the perf alerts are).
pub const ALERT_EVENT: &str = "alert";
/// The `source` of the alerts raised here.
pub const ALERT_SOURCE: &str = "auth";

/// One detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// Failures from one address.
    BruteForceAddress,
    /// Failures of one account.
    BruteForceAccount,
    /// Distinct accounts failing from one address.
    CredentialStuffing,
    /// A refresh token presented again (or from another device).
    RefreshTokenReuse,
    /// One account signing in from many addresses.
    SigninBurst,
}

impl Detector {
    /// Every detector.
    pub const ALL: [Detector; 5] = [
        Detector::BruteForceAddress,
        Detector::BruteForceAccount,
        Detector::CredentialStuffing,
        Detector::RefreshTokenReuse,
        Detector::SigninBurst,
    ];

    /// Its stable name (`brute_force_address`), as alerts and keys carry it.
    pub fn as_str(self) -> &'static str {
        match self {
            Detector::BruteForceAddress => "brute_force_address",
            Detector::BruteForceAccount => "brute_force_account",
            Detector::CredentialStuffing => "credential_stuffing",
            Detector::RefreshTokenReuse => "refresh_token_reuse",
            Detector::SigninBurst => "signin_burst",
        }
    }

    /// How serious its alerts are.
    pub fn level(self) -> AlertLevel {
        match self {
            Detector::CredentialStuffing | Detector::RefreshTokenReuse => AlertLevel::Critical,
            _ => AlertLevel::Warning,
        }
    }

    /// Whether a detection blocks its subject (an address) in the rate limiter.
    pub fn blocks(self) -> bool {
        matches!(
            self,
            Detector::BruteForceAddress | Detector::CredentialStuffing
        )
    }
}

impl fmt::Display for Detector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the detector has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ThreatStats {
    /// Security events a detector reads (failures, successes, token reuse).
    pub events_seen: u64,
    /// Of those, examined by the detectors.
    pub events_examined: u64,
    /// Of those, not examined: the queue was full or the task had stopped (each still
    /// went to the inner log).
    pub events_dropped: u64,
    /// Alerts raised.
    pub alerts_raised: u64,
    /// Addresses blocked in the rate limiter.
    pub blocks: u64,
    /// Observations the state failed (a Redis outage).
    pub state_errors: u64,
    /// Blocks the rate limiter refused or did not answer in time.
    pub block_errors: u64,
    /// Alerts the inner log refused.
    pub alert_record_errors: u64,
    /// Observations the state did not track because it was full.
    pub untracked: u64,
}

impl ThreatStats {
    /// These counts as gauges: `threat_events{outcome="seen|examined|dropped"}`,
    /// `threat_alerts_raised`, `threat_blocks`, `threat_errors{kind="state|block|record"}`
    /// and `threat_untracked`.
    pub fn gauges(&self) -> [upcoach_core::health::Gauge; 9] {
        use upcoach_core::health::Gauge;
        [
            Gauge::new(
                "threat_events",
                &[("outcome", "seen")],
                self.events_seen as f64,
            ),
            Gauge::new(
                "threat_events",
                &[("outcome", "examined")],
                self.events_examined as f64,
            ),
            Gauge::new(
                "threat_events",
                &[("outcome", "dropped")],
                self.events_dropped as f64,
            ),
            Gauge::new("threat_alerts_raised", &[], self.alerts_raised as f64),
            Gauge::new("threat_blocks", &[], self.blocks as f64),
            Gauge::new(
                "threat_errors",
                &[("kind", "state")],
                self.state_errors as f64,
            ),
            Gauge::new(
                "threat_errors",
                &[("kind", "block")],
                self.block_errors as f64,
            ),
            Gauge::new(
                "threat_errors",
                &[("kind", "record")],
                self.alert_record_errors as f64,
            ),
            Gauge::new("threat_untracked", &[], self.untracked as f64),
        ]
    }
}

/// Options of a [`ThreatDetector`]; start from [`ThreatDetector::builder`].
#[derive(Debug)]
pub struct ThreatDetectorBuilder {
    inner: Arc<dyn EventLog>,
    config: ThreatConfig,
    state: Option<Arc<dyn DetectorState>>,
    publisher: Option<Arc<dyn AlertPublisher>>,
    limiter: Option<Arc<dyn RateLimiter>>,
    clock: Option<Arc<dyn Clock>>,
}

impl ThreatDetectorBuilder {
    /// Thresholds, windows, block and bounds (default [`ThreatConfig::default`]).
    pub fn config(mut self, config: ThreatConfig) -> Self {
        self.config = config;
        self
    }

    /// Where windows and open alerts live (default: a [`MemoryDetectorState`] of
    /// [`ThreatConfig::max_keys`]).
    pub fn state(mut self, state: Arc<dyn DetectorState>) -> Self {
        self.state = Some(state);
        self
    }

    /// The state in Redis under `{prefix}:threat:` when `redis` is given (so every
    /// process counts together), in memory otherwise.
    #[cfg(feature = "redis")]
    pub fn redis(
        mut self,
        redis: Option<&upcoach_core::redis::RedisConnection>,
        prefix: &str,
    ) -> Self {
        self.state = redis.map(|redis| {
            Arc::new(
                RedisDetectorState::new(redis.clone()).with_prefix(format!("{prefix}:threat:")),
            ) as Arc<dyn DetectorState>
        });
        self
    }

    /// Where alerts go live (default: nowhere but the log).
    pub fn publisher(mut self, publisher: Arc<dyn AlertPublisher>) -> Self {
        self.publisher = Some(publisher);
        self
    }

    /// The limiter whose [`block`](RateLimiter::block) shuts out an offending address
    /// (default: none; nothing is blocked).
    pub fn limiter(mut self, limiter: Arc<dyn RateLimiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// The clock that dates alerts (default: the system clock). Windows run on the
    /// events' own `created_at`.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Starts the detection task on the current Tokio runtime, which needs its timers
    /// (`enable_all()`, as `#[tokio::main]` and `#[tokio::test]` have): publishing and
    /// blocking are each given 5 s.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn build(self) -> Arc<ThreatDetector> {
        let (tx, rx) = mpsc::channel(self.config.queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let state = self
            .state
            .unwrap_or_else(|| Arc::new(MemoryDetectorState::new(self.config.max_keys)));
        let engine = Engine {
            config: self.config.clone(),
            state: state.clone(),
            publisher: self.publisher,
            limiter: self.limiter,
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            inner: self.inner.clone(),
            counters: counters.clone(),
        };
        tokio::spawn(engine.run(rx));
        Arc::new(ThreatDetector {
            inner: self.inner,
            enabled: self.config.enabled,
            config: self.config,
            state,
            tx,
            counters,
        })
    }
}

/// An [`EventLog`] that forwards everything to an inner log and runs the detectors over
/// its security events (see the [module docs](self)).
///
/// Dropping the last handle ends the detection task once the queue is examined.
#[derive(Debug)]
pub struct ThreatDetector {
    inner: Arc<dyn EventLog>,
    enabled: bool,
    config: ThreatConfig,
    state: Arc<dyn DetectorState>,
    tx: mpsc::Sender<Sighting>,
    counters: Arc<Counters>,
}

impl ThreatDetector {
    /// A detector recording into `inner`, with the default configuration, an
    /// in-memory state, no publisher and no limiter.
    pub fn builder(inner: Arc<dyn EventLog>) -> ThreatDetectorBuilder {
        ThreatDetectorBuilder {
            inner,
            config: ThreatConfig::default(),
            state: None,
            publisher: None,
            limiter: None,
            clock: None,
        }
    }

    /// The log everything is forwarded to.
    pub fn inner(&self) -> &Arc<dyn EventLog> {
        &self.inner
    }

    /// The configuration in force.
    pub fn config(&self) -> &ThreatConfig {
        &self.config
    }

    /// What the detector has done so far.
    pub fn stats(&self) -> ThreatStats {
        let c = &self.counters;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        ThreatStats {
            events_seen: load(&c.seen),
            events_examined: load(&c.examined),
            events_dropped: load(&c.dropped),
            alerts_raised: load(&c.alerts),
            blocks: load(&c.blocks),
            state_errors: load(&c.state_errors),
            block_errors: load(&c.block_errors),
            alert_record_errors: load(&c.record_errors),
            untracked: self.state.untracked(),
        }
    }

    /// Waits until every event queued before the call has been examined (its alerts
    /// recorded and published). Not part of [`flush`](EventLog::flush), which only
    /// flushes the inner log: with Redis down, examining waits on timeouts.
    pub async fn idle(&self) {
        let target = self.counters.queued.load(Ordering::Acquire);
        loop {
            let mut notified = std::pin::pin!(self.counters.progress.notified());
            notified.as_mut().enable();
            if self.counters.examined.load(Ordering::Acquire) >= target || self.tx.is_closed() {
                return;
            }
            notified.await;
        }
    }

    fn offer(&self, sighting: Sighting) {
        let c = &self.counters;
        c.seen.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(sighting) {
            Ok(()) => {
                c.queued.fetch_add(1, Ordering::AcqRel);
            }
            Err(_) => {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(dropped) = c.drop_warnings.hit() {
                    tracing::warn!(
                        dropped,
                        capacity = self.config.queue_capacity,
                        "threat detection is behind: security events were recorded but not examined"
                    );
                }
            }
        }
    }
}

#[async_trait]
impl EventLog for ThreatDetector {
    fn record(&self, event: Event) -> Result<(), EventLogError> {
        let sighting = match &event {
            Event::Security(e) if self.enabled => Sighting::of(e),
            _ => None,
        };
        let result = self.inner.record(event);
        if let Some(sighting) = sighting {
            self.offer(sighting);
        }
        result
    }

    async fn flush(&self) -> Result<(), EventLogError> {
        self.inner.flush().await
    }

    async fn recent(&self, kind: EventKind, limit: usize) -> Result<Vec<Event>, EventLogError> {
        self.inner.recent(kind, limit).await
    }

    async fn security_event_counts(
        &self,
        since: SystemTime,
    ) -> Result<Vec<EventTypeCount>, EventLogError> {
        self.inner.security_event_counts(since).await
    }

    fn stats(&self) -> EventLogStats {
        self.inner.stats()
    }
}
