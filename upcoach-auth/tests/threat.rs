//! Threat detection: each detector fires on its pattern, stays quiet on a normal mix,
//! does not repeat an open alert and fires again after the window, blocks the offending
//! address; with the in-memory state and with Redis (one alert for a pattern split
//! across two processes); the bounded queue, state failures and a Redis outage.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use upcoach_auth::threat::conformance::detector_state_conformance;
use upcoach_auth::threat::{
    AlertPublisherFn, DetectorState, MemoryDetectorState, Observation, RedisDetectorState,
    StateError, Tally, ThreatConfig, ThreatDetector,
};
use upcoach_core::event::{
    AlertLevel, ClientFacts, Event, EventKind, EventLog, MemoryEventLog, SecurityEvent, SystemAlert,
};
use upcoach_core::limit::{Decision, LimitError, LimitFuture, Quota, RateLimiter};
use upcoach_core::redis::{RedisConnection, RedisOptions};
use upcoach_core::{Clock, ManualClock, UserId};
use upcoach_testing::{FaultProxy, RedisPrefix};

const SECOND: Duration = Duration::from_secs(1);

/// Which state a run uses.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    Redis,
    RedisCluster,
}

/// Records every block; allows every check.
#[derive(Debug, Default)]
struct RecordingLimiter {
    blocks: Mutex<Vec<(String, Duration)>>,
}

impl RecordingLimiter {
    fn blocks(&self) -> Vec<(String, Duration)> {
        self.blocks.lock().unwrap().clone()
    }
}

#[async_trait]
impl RateLimiter for RecordingLimiter {
    fn check<'a>(&'a self, _: &'a str, _: &'a str, quota: Quota) -> LimitFuture<'a> {
        LimitFuture::ready(Ok(Decision {
            allowed: true,
            limit: quota.limit(),
            remaining: quota.limit(),
            reset_after: Duration::ZERO,
            retry_after: Duration::ZERO,
        }))
    }

    async fn block(&self, subject: &str, duration: Duration) -> Result<(), LimitError> {
        self.blocks
            .lock()
            .unwrap()
            .push((subject.to_owned(), duration));
        Ok(())
    }
}

/// A detector over a memory log, with a manual clock, a recording limiter and a
/// recording publisher.
struct Rig {
    log: Arc<MemoryEventLog>,
    detector: Arc<ThreatDetector>,
    clock: Arc<ManualClock>,
    limiter: Arc<RecordingLimiter>,
    published: Arc<Mutex<Vec<SystemAlert>>>,
}

impl Rig {
    fn new(state: Arc<dyn DetectorState>, config: ThreatConfig, clock: Arc<ManualClock>) -> Self {
        let log = Arc::new(MemoryEventLog::new(10_000));
        let limiter = Arc::new(RecordingLimiter::default());
        let published = Arc::new(Mutex::new(Vec::new()));
        let sink = published.clone();
        let detector = ThreatDetector::builder(log.clone())
            .config(config)
            .state(state)
            .limiter(limiter.clone())
            .publisher(Arc::new(AlertPublisherFn::new(move |alert| {
                let sink = sink.clone();
                async move { sink.lock().unwrap().push(alert) }
            })))
            .clock(clock.clone())
            .build();
        Self {
            log,
            detector,
            clock,
            limiter,
            published,
        }
    }

    fn record(&self, event: SecurityEvent) {
        self.detector.record(event.into()).unwrap();
    }

    /// Every alert recorded so far, oldest first.
    async fn alerts(&self) -> Vec<SystemAlert> {
        self.detector.idle().await;
        alerts_of(&self.log).await
    }

    fn tick(&self) {
        self.clock.advance(SECOND);
    }
}

async fn alerts_of(log: &MemoryEventLog) -> Vec<SystemAlert> {
    let mut alerts: Vec<SystemAlert> = log
        .recent(EventKind::Alert, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            Event::Alert(a) => Some(a),
            _ => None,
        })
        .collect();
    alerts.reverse();
    alerts
}

/// A state for `backend` (and the Redis prefix to keep alive); `None` to skip.
async fn state(backend: Backend) -> Option<(Arc<dyn DetectorState>, Option<RedisPrefix>)> {
    match backend {
        Backend::Memory => Some((Arc::new(MemoryDetectorState::new(10_000)), None)),
        Backend::Redis | Backend::RedisCluster => {
            let prefix = if matches!(backend, Backend::Redis) {
                RedisPrefix::create()?
            } else {
                RedisPrefix::on_cluster()?
            };
            let state = redis_state(&prefix, prefix.url()).await;
            Some((Arc::new(state), Some(prefix)))
        }
    }
}

async fn redis_state(prefix: &RedisPrefix, url: &str) -> RedisDetectorState {
    let options = RedisOptions {
        connection_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(300),
        reconnect_retries: 1,
    };
    let url = upcoach_core::config::ServiceUrl::parse(url, &["redis", "redis+cluster"]).unwrap();
    let conn = RedisConnection::connect(&url, options).await.unwrap();
    RedisDetectorState::new(conn).with_prefix(prefix.prefix())
}

async fn rig(backend: Backend, config: ThreatConfig) -> Option<(Rig, Option<RedisPrefix>)> {
    let (state, prefix) = state(backend).await?;
    Some((
        Rig::new(state, config, Arc::new(ManualClock::starting_now())),
        prefix,
    ))
}

fn facts(ip: &str) -> ClientFacts {
    ClientFacts {
        ip: Some(ip.parse::<IpAddr>().unwrap()),
        user_agent: Some("test/1.0".into()),
        platform: Some("web".into()),
    }
}

/// `login_failed` as sign-in records it: no user, `provider` and `code`.
fn failed(clock: &dyn Clock, ip: &str) -> SecurityEvent {
    SecurityEvent::new("login_failed", clock)
        .client(&facts(ip))
        .details(serde_json::json!({"provider": "google", "code": "invalid_token_xyz"}))
}

/// A failure that names its account (as a host's own failures may).
fn failed_as(clock: &dyn Clock, ip: &str, email: &str) -> SecurityEvent {
    SecurityEvent::new("login_failed", clock)
        .client(&facts(ip))
        .details(serde_json::json!({"provider": "google", "code": "wrong_hosted_domain", "email": email}))
}

fn success(clock: &dyn Clock, user: UserId, ip: &str) -> SecurityEvent {
    SecurityEvent::new("login_success", clock)
        .user(user)
        .client(&facts(ip))
        .details(serde_json::json!({"provider": "google", "created": false, "linked": false}))
}

fn reused(clock: &dyn Clock, user: UserId) -> SecurityEvent {
    SecurityEvent::new("refresh_token_reused", clock)
        .user(user)
        .client(&facts("198.51.100.20"))
        .details(serde_json::json!({"family_id": uuid::Uuid::new_v4().to_string()}))
}

/// Brute force from one address: silent at 9, one alert at 10 (blocked, published,
/// no code in it), no repeat while open, a new alert once the window has passed.
async fn brute_force_by_address(backend: Backend) {
    let Some((rig, _prefix)) = rig(backend, ThreatConfig::default()).await else {
        return;
    };
    for _ in 0..9 {
        rig.record(failed(rig.clock.as_ref(), "203.0.113.7"));
        rig.tick();
    }
    assert!(
        rig.alerts().await.is_empty(),
        "9 failures are not an attack"
    );
    rig.record(failed(rig.clock.as_ref(), "203.0.113.7"));
    let alerts = rig.alerts().await;
    assert_eq!(alerts.len(), 1);
    let alert = &alerts[0];
    assert_eq!(alert.source, "auth");
    assert_eq!(alert.level, AlertLevel::Warning);
    assert_eq!(
        alert.metadata,
        serde_json::json!({
            "detector": "brute_force_address",
            "subject": "ip:203.0.113.7",
            "count": 10,
            "threshold": 10,
            "window_s": 300,
            "blocked_s": 900,
        })
    );
    assert_eq!(
        alert.message,
        "10 failed sign-ins from ip:203.0.113.7 within 5 min; ip:203.0.113.7 blocked for 15 min"
    );
    let text = serde_json::to_string(alert).unwrap();
    assert!(!text.contains("invalid_token_xyz"), "no code in an alert");
    assert_eq!(
        rig.limiter.blocks(),
        [("ip:203.0.113.7".to_owned(), Duration::from_secs(900))]
    );
    assert_eq!(rig.published.lock().unwrap().clone(), alerts);

    for _ in 0..20 {
        rig.record(failed(rig.clock.as_ref(), "203.0.113.7"));
        rig.tick();
    }
    assert_eq!(rig.alerts().await.len(), 1, "an open alert is not repeated");

    rig.clock.advance(Duration::from_secs(301));
    for _ in 0..10 {
        rig.record(failed(rig.clock.as_ref(), "203.0.113.7"));
        rig.tick();
    }
    assert_eq!(rig.alerts().await.len(), 2, "fires again after the window");
    assert_eq!(rig.limiter.blocks().len(), 2);
    let stats = rig.detector.stats();
    assert_eq!(stats.alerts_raised, 2);
    assert_eq!(stats.blocks, 2);
    assert_eq!(stats.events_seen, 40);
    assert_eq!(stats.events_examined, 40);
    assert_eq!((stats.events_dropped, stats.state_errors), (0, 0));
    assert_eq!(
        rig.log
            .recent(EventKind::Security, 1000)
            .await
            .unwrap()
            .len(),
        40,
        "every event reaches the inner log"
    );
}

/// IPv6 addresses of one /64 are one address.
async fn ipv6_groups_by_64(backend: Backend) {
    let Some((rig, _prefix)) = rig(backend, ThreatConfig::default()).await else {
        return;
    };
    for i in 1..=10 {
        rig.record(failed(rig.clock.as_ref(), &format!("2001:db8:1:2::{i:x}")));
        rig.tick();
    }
    rig.record(failed(rig.clock.as_ref(), "2001:db8:1:3::1"));
    let alerts = rig.alerts().await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].metadata["subject"], "ip:2001:db8:1:2::/64");
}

/// One account failing from many addresses: `brute_force_account`, no block.
async fn brute_force_by_account(backend: Backend) {
    let Some((rig, _prefix)) = rig(backend, ThreatConfig::default()).await else {
        return;
    };
    for i in 1..=4 {
        rig.record(failed_as(
            rig.clock.as_ref(),
            &format!("192.0.2.{i}"),
            "Ada@Example.com",
        ));
        rig.tick();
    }
    assert!(rig.alerts().await.is_empty());
    rig.record(failed_as(
        rig.clock.as_ref(),
        "192.0.2.5",
        "ada@example.com",
    ));
    let alerts = rig.alerts().await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].metadata["detector"], "brute_force_account");
    assert_eq!(alerts[0].metadata["subject"], "email:ada@example.com");
    assert_eq!(alerts[0].metadata["count"], 5);
    assert!(
        rig.limiter.blocks().is_empty(),
        "accounts are never blocked"
    );
}

/// Five accounts failing from one address: `credential_stuffing`, critical, blocked.
async fn credential_stuffing(backend: Backend) {
    let Some((rig, _prefix)) = rig(backend, ThreatConfig::default()).await else {
        return;
    };
    for i in 1..=4 {
        // Each twice: distinct accounts are counted, not failures.
        for _ in 0..2 {
            rig.record(failed_as(
                rig.clock.as_ref(),
                "198.51.100.9",
                &format!("user{i}@example.com"),
            ));
            rig.tick();
        }
    }
    assert!(rig.alerts().await.is_empty(), "8 failures, 4 accounts");
    rig.record(failed_as(
        rig.clock.as_ref(),
        "198.51.100.9",
        "user5@example.com",
    ));
    let alerts = rig.alerts().await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].metadata["detector"], "credential_stuffing");
    assert_eq!(alerts[0].metadata["subject"], "ip:198.51.100.9");
    assert_eq!(alerts[0].metadata["count"], 5);
    assert_eq!(alerts[0].level, AlertLevel::Critical);
    assert_eq!(
        rig.limiter.blocks(),
        [("ip:198.51.100.9".to_owned(), Duration::from_secs(900))]
    );
    // The next failure makes 10 from the address: brute force too, another detector.
    rig.record(failed_as(
        rig.clock.as_ref(),
        "198.51.100.9",
        "user6@example.com",
    ));
    let alerts = rig.alerts().await;
    assert_eq!(alerts.len(), 2);
    assert_eq!(alerts[1].metadata["detector"], "brute_force_address");
}

/// Any reuse alerts, once per user per window.
async fn refresh_token_reuse(backend: Backend) {
    let Some((rig, _prefix)) = rig(backend, ThreatConfig::default()).await else {
        return;
    };
    let (ada, bob) = (UserId::new(), UserId::new());
    rig.record(reused(rig.clock.as_ref(), ada));
    let alerts = rig.alerts().await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].level, AlertLevel::Critical);
    assert_eq!(alerts[0].metadata["detector"], "refresh_token_reuse");
    assert_eq!(alerts[0].metadata["subject"], format!("user:{ada}"));
    assert_eq!(alerts[0].metadata["event_type"], "refresh_token_reused");
    assert!(rig.limiter.blocks().is_empty());

    rig.tick();
    rig.record(reused(rig.clock.as_ref(), ada));
    rig.record(reused(rig.clock.as_ref(), bob));
    let alerts = rig.alerts().await;
    assert_eq!(alerts.len(), 2, "ada's is open; bob's is new");
    assert_eq!(alerts[1].metadata["subject"], format!("user:{bob}"));

    rig.clock.advance(Duration::from_secs(3600));
    rig.record(reused(rig.clock.as_ref(), ada));
    assert_eq!(rig.alerts().await.len(), 3, "again after the hour");
}

/// One account signing in from four /64-or-v4 addresses in 10 minutes.
async fn signin_burst(backend: Backend) {
    let Some((rig, _prefix)) = rig(backend, ThreatConfig::default()).await else {
        return;
    };
    let ada = UserId::new();
    for ip in [
        "203.0.113.1",
        "203.0.113.2",
        "2001:db8:9:9::1",
        "2001:db8:9:9::2", // the same /64
        "203.0.113.1",
    ] {
        rig.record(success(rig.clock.as_ref(), ada, ip));
        rig.tick();
    }
    assert!(rig.alerts().await.is_empty(), "three distinct addresses");
    rig.record(success(rig.clock.as_ref(), ada, "192.0.2.200"));
    let alerts = rig.alerts().await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].metadata["detector"], "signin_burst");
    assert_eq!(alerts[0].metadata["subject"], format!("user:{ada}"));
    assert_eq!(alerts[0].metadata["count"], 4);
    assert!(rig.limiter.blocks().is_empty());
}

/// Many users signing in from one or two addresses, a few failures here and there,
/// refreshes, logouts, and a flood of events no detector reads: no alert.
async fn quiet_on_a_normal_mix(backend: Backend) {
    let Some((rig, _prefix)) = rig(backend, ThreatConfig::default()).await else {
        return;
    };
    for n in 0..150u32 {
        let user = UserId::new();
        let home = format!("10.{}.{}.1", n / 200, n % 200);
        let phone = format!("2001:db8:{n:x}:1::{:x}", n + 1);
        if n % 10 == 0 {
            for _ in 0..3 {
                rig.record(failed(rig.clock.as_ref(), &home));
            }
        }
        rig.record(success(rig.clock.as_ref(), user, &home));
        if n % 2 == 0 {
            rig.record(success(rig.clock.as_ref(), user, &phone));
            rig.record(success(
                rig.clock.as_ref(),
                user,
                &phone.replace("::", "::ff"),
            ));
        }
        for name in ["logout", "token_rejected", "session_issued"] {
            rig.record(
                SecurityEvent::new(name, rig.clock.as_ref())
                    .user(user)
                    .client(&facts(&home)),
            );
        }
        rig.tick();
    }
    for _ in 0..100 {
        rig.record(
            SecurityEvent::new("rate_limited", rig.clock.as_ref())
                .client(&facts("203.0.113.99"))
                .details(serde_json::json!({"rule": "auth.login"})),
        );
    }
    assert!(rig.alerts().await.is_empty());
    let stats = rig.detector.stats();
    assert_eq!(stats.alerts_raised, 0);
    assert_eq!(
        stats.events_seen,
        15 * 3 + 150 + 75 * 2,
        "only failures and successes"
    );
    assert_eq!((stats.events_dropped, stats.state_errors), (0, 0));
}

macro_rules! on_every_state {
    ($($name:ident),* $(,)?) => {
        mod in_memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Memory).await
                }
            )*
        }
        mod in_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Redis).await
                }
            )*
        }
        mod in_redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::RedisCluster).await
                }
            )*
        }
    };
}

on_every_state!(
    brute_force_by_address,
    ipv6_groups_by_64,
    brute_force_by_account,
    credential_stuffing,
    refresh_token_reuse,
    signin_burst,
    quiet_on_a_normal_mix,
);

#[tokio::test]
async fn memory_state_conforms() {
    detector_state_conformance(&MemoryDetectorState::new(10_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_state_conforms() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    detector_state_conformance(&redis_state(&prefix, prefix.url()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_state_conforms_on_a_cluster() {
    let Some(prefix) = RedisPrefix::on_cluster() else {
        return;
    };
    detector_state_conformance(&redis_state(&prefix, prefix.url()).await).await;
}

/// Two processes' detectors on one Redis, each seeing half of a brute force: one
/// alert between them, recorded and published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_detectors_on_one_redis_raise_one_alert() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let clock = Arc::new(ManualClock::starting_now());
    let a = Rig::new(
        Arc::new(redis_state(&prefix, prefix.url()).await),
        ThreatConfig::default(),
        clock.clone(),
    );
    let b = Rig::new(
        Arc::new(redis_state(&prefix, prefix.url()).await),
        ThreatConfig::default(),
        clock.clone(),
    );
    for i in 0..30 {
        let rig = if i % 2 == 0 { &a } else { &b };
        rig.record(failed(clock.as_ref(), "203.0.113.50"));
        if i % 3 == 0 {
            clock.advance(SECOND);
        }
    }
    let (alerts_a, alerts_b) = (a.alerts().await, b.alerts().await);
    assert_eq!(
        alerts_a.len() + alerts_b.len(),
        1,
        "one alert for the pattern: {alerts_a:?} {alerts_b:?}"
    );
    assert_eq!(
        a.published.lock().unwrap().len() + b.published.lock().unwrap().len(),
        1
    );
    assert_eq!(a.limiter.blocks().len() + b.limiter.blocks().len(), 1);

    // Ten processes' detectors racing over one pattern at once: still one alert.
    let clock = Arc::new(ManualClock::starting_now());
    let mut rigs = Vec::new();
    for _ in 0..10 {
        rigs.push(Rig::new(
            Arc::new(redis_state(&prefix, prefix.url()).await),
            ThreatConfig::default(),
            clock.clone(),
        ));
    }
    for rig in &rigs {
        rig.record(failed(clock.as_ref(), "203.0.113.51"));
        rig.record(failed(clock.as_ref(), "203.0.113.51"));
    }
    let mut total = 0;
    for rig in &rigs {
        total += rig.alerts().await.len();
    }
    assert_eq!(total, 1);
}

/// The queue holds `queue_capacity` events; the rest are not examined but still
/// recorded, and counted.
#[tokio::test]
async fn a_full_queue_drops_detection_not_records() {
    let mut config = ThreatConfig::default();
    config.queue_capacity = 2;
    let rig = Rig::new(
        Arc::new(MemoryDetectorState::default()),
        config,
        Arc::new(ManualClock::starting_now()),
    );
    // On this single-threaded runtime the task cannot run before the next await.
    for _ in 0..10 {
        rig.record(failed(rig.clock.as_ref(), "203.0.113.7"));
    }
    let stats = rig.detector.stats();
    assert_eq!((stats.events_seen, stats.events_dropped), (10, 8));
    rig.detector.idle().await;
    assert_eq!(rig.detector.stats().events_examined, 2);
    assert!(rig.alerts().await.is_empty());
    assert_eq!(
        rig.log
            .recent(EventKind::Security, 100)
            .await
            .unwrap()
            .len(),
        10
    );
}

#[derive(Debug)]
struct BrokenState;

#[async_trait]
impl DetectorState for BrokenState {
    async fn observe(&self, _: &Observation<'_>) -> Result<Tally, StateError> {
        Err(StateError::Backend {
            backend: "test",
            source: "down".into(),
        })
    }
}

/// A failing state costs detection only: events recorded, errors counted.
#[tokio::test]
async fn state_errors_are_counted_and_cost_nothing_else() {
    let rig = Rig::new(
        Arc::new(BrokenState),
        ThreatConfig::default(),
        Arc::new(ManualClock::starting_now()),
    );
    for _ in 0..12 {
        rig.record(failed_as(
            rig.clock.as_ref(),
            "203.0.113.7",
            "a@example.com",
        ));
    }
    assert!(rig.alerts().await.is_empty());
    let stats = rig.detector.stats();
    assert_eq!(stats.state_errors, 36, "three observations per failure");
    assert_eq!(stats.events_examined, 12);
    assert_eq!(
        rig.log
            .recent(EventKind::Security, 100)
            .await
            .unwrap()
            .len(),
        12
    );
}

/// Detection off: events forwarded, nothing examined.
#[tokio::test]
async fn disabled_detection_only_forwards() {
    use upcoach_core::config::Settings;
    let config =
        ThreatConfig::from_lookup(|n| (n == "THREAT_DETECTION_ENABLED").then(|| "false".into()))
            .unwrap();
    let rig = Rig::new(
        Arc::new(MemoryDetectorState::default()),
        config,
        Arc::new(ManualClock::starting_now()),
    );
    for _ in 0..20 {
        rig.record(failed(rig.clock.as_ref(), "203.0.113.7"));
    }
    assert!(rig.alerts().await.is_empty());
    assert_eq!(rig.detector.stats().events_seen, 0);
    assert_eq!(
        rig.log
            .recent(EventKind::Security, 100)
            .await
            .unwrap()
            .len(),
        20
    );
}

/// Redis cut: `record` stays instant, errors are counted; back: detection resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_costs_detection_only() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let proxy = FaultProxy::start(upcoach_testing::service_addr(prefix.url())).await;
    let url = upcoach_testing::url_via(prefix.url(), proxy.addr());
    let rig = Rig::new(
        Arc::new(redis_state(&prefix, &url).await),
        ThreatConfig::default(),
        Arc::new(ManualClock::starting_now()),
    );
    proxy.cut();
    let started = Instant::now();
    for _ in 0..3 {
        rig.record(failed(rig.clock.as_ref(), "203.0.113.7"));
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "record never waits on Redis"
    );
    rig.detector.idle().await;
    assert_eq!(rig.detector.stats().state_errors, 3);
    assert_eq!(
        rig.log
            .recent(EventKind::Security, 100)
            .await
            .unwrap()
            .len(),
        3
    );

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let errors = rig.detector.stats().state_errors;
        rig.record(failed(rig.clock.as_ref(), "203.0.113.8"));
        rig.detector.idle().await;
        if rig.detector.stats().state_errors == errors {
            break;
        }
        assert!(Instant::now() < deadline, "Redis is back within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        rig.record(failed(rig.clock.as_ref(), "203.0.113.9"));
    }
    let alerts = rig.alerts().await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].metadata["subject"], "ip:203.0.113.9");
}

mod through_sessions {
    use super::*;
    use upcoach_auth::session::{AccessTokens, SigningKey};
    use upcoach_auth::sessions::Sessions;
    use upcoach_auth::{
        AuthProvider, AuthorizationRequest, Error, NativeCredential, ProviderId, VerifiedIdentity,
    };

    /// A provider that accepts nothing.
    #[derive(Debug)]
    struct Refusing;

    #[async_trait]
    impl AuthProvider for Refusing {
        fn id(&self) -> ProviderId {
            ProviderId::GOOGLE
        }
        async fn authorization_url(&self, _: &AuthorizationRequest) -> Result<url::Url, Error> {
            Ok(url::Url::parse("https://sso.example/authorize").unwrap())
        }
        async fn exchange_code(
            &self,
            _: &str,
            _: &AuthorizationRequest,
            _: &str,
        ) -> Result<VerifiedIdentity, Error> {
            Err(Error::CodeRejected)
        }
        async fn verify_native(&self, _: &NativeCredential) -> Result<VerifiedIdentity, Error> {
            Err(Error::InvalidCredential {
                reason: "unknown_badge",
            })
        }
    }

    /// The detector handed to `SessionsBuilder::events` sees sign-in's own failures.
    #[tokio::test]
    async fn sign_in_failures_raise_a_brute_force_alert() {
        let clock = Arc::new(ManualClock::starting_now());
        let rig = Rig::new(
            Arc::new(MemoryDetectorState::default()),
            ThreatConfig::default(),
            clock.clone(),
        );
        let tokens = Arc::new(AccessTokens::new(
            SigningKey::generate().unwrap(),
            clock.clone(),
        ));
        let sessions = Sessions::builder(tokens, "https://api.example.com")
            .provider(Arc::new(Refusing))
            .events(rig.detector.clone())
            .clock(clock.clone())
            .build();
        for i in 0..10 {
            let credential = NativeCredential::IdToken {
                id_token: format!("forged-{i}"),
                nonce: Some(format!("n-{i}")),
            };
            let refused = sessions
                .sign_in_with_token("google", credential, None, None, &facts("203.0.113.77"))
                .await;
            assert!(refused.is_err());
            clock.advance(SECOND);
        }
        let alerts = rig.alerts().await;
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].metadata["subject"], "ip:203.0.113.77");
        assert!(
            !serde_json::to_string(&alerts[0])
                .unwrap()
                .contains("forged")
        );
    }
}

/// With the real in-memory limiter, the blocked address is refused under any rule.
#[tokio::test]
async fn a_memory_limiter_refuses_the_blocked_address() {
    use upcoach_core::limit::MemoryLimiter;
    let log = Arc::new(MemoryEventLog::default());
    let limiter = Arc::new(MemoryLimiter::new());
    let detector = ThreatDetector::builder(log)
        .limiter(limiter.clone())
        .build();
    let quota = Quota::new(100, Duration::from_secs(60)).unwrap();
    let clock = ManualClock::starting_now();
    for _ in 0..10 {
        detector
            .record(failed(&clock, "203.0.113.7").into())
            .unwrap();
    }
    detector.idle().await;
    assert_eq!(detector.stats().blocks, 1);
    let decision = limiter
        .check("auth.login", "ip:203.0.113.7", quota)
        .await
        .unwrap();
    assert!(!decision.allowed, "blocked: {decision:?}");
    assert!(
        limiter
            .check("auth.login", "ip:203.0.113.8", quota)
            .await
            .unwrap()
            .allowed
    );
}
