//! Conformance suites that every backend of a core trait passes (feature `testing`).
//!
//! Call them from a backend's own tests with a fresh, empty instance:
//!
//! ```
//! use upcoach_core::event::MemoryEventLog;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! upcoach_core::testing::event_log_conformance(&MemoryEventLog::new(100)).await;
//! # });
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use serde_json::json;
use uuid::Uuid;

use crate::event::*;
use crate::{ManualClock, SystemClock, UserId};

/// How a conformance suite lets time pass for the store under test.
#[async_trait]
pub trait PassTime: Send + Sync {
    /// Lets `d` pass as the store sees it.
    async fn pass(&self, d: Duration);
}

/// Moves a [`ManualClock`] (for stores that take their time from one).
#[derive(Debug)]
pub struct MoveClock(pub Arc<ManualClock>);

#[async_trait]
impl PassTime for MoveClock {
    async fn pass(&self, d: Duration) {
        self.0.advance(d);
    }
}

/// Really waits (for stores whose clock is elsewhere, such as Redis).
#[derive(Debug)]
pub struct Sleep;

#[async_trait]
impl PassTime for Sleep {
    async fn pass(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }
}

/// Checks an empty [`EventLog`]: round trip of every field of every kind, newest-first
/// order and limits, counting by type over a window, and refusal of records no backend
/// can store. Panics with a message on the first difference.
pub async fn event_log_conformance(log: &dyn EventLog) {
    let base = to_micros(SystemTime::now()) - Duration::from_secs(3600);
    let at = |secs: u64| base + Duration::from_secs(secs);
    let before = log.stats();

    for kind in EventKind::ALL {
        assert!(
            log.recent(kind, 10).await.unwrap().is_empty(),
            "{kind:?} starts empty"
        );
    }

    // Every field, with awkward values.
    let user = UserId::new();
    let full = SecurityEvent {
        id: Uuid::now_v7(),
        user_id: Some(user),
        event_type: "login_succeeded".into(),
        platform: Some("web".into()),
        details: json!({"provider": "google", "nested": {"list": [1, 2.5, null, true]}, "text": "ünï—cødé 🚀 \"quoted\" \\ "}),
        ip_address: Some("2001:db8::1".parse::<IpAddr>().unwrap()),
        user_agent: Some("Mozilla/5.0 (X11; Linux x86_64) 'quoted'".into()),
        created_at: at(10),
    };
    let minimal = SecurityEvent {
        created_at: at(20),
        ..SecurityEvent::new("login_failed", &SystemClock)
    };
    let v4 = SecurityEvent {
        ip_address: Some("203.0.113.9".parse().unwrap()),
        created_at: at(30),
        ..SecurityEvent::new("login_failed", &SystemClock)
    };
    let ws = WebSocketEvent {
        created_at: at(15),
        ..WebSocketEvent::new("connected", &SystemClock)
            .user(user)
            .metadata(json!({"transport": "sse", "rooms": ["metrics", "user:1"]}))
    };
    let alert = SystemAlert {
        created_at: at(25),
        ..SystemAlert::new(
            AlertLevel::Critical,
            "perf",
            "p95 latency 1200 ms over 1000 ms",
            &SystemClock,
        )
        .metadata(json!({"rule": "p95", "value": 1200}))
    };
    for event in [
        Event::from(full.clone()),
        minimal.clone().into(),
        v4.clone().into(),
        ws.clone().into(),
        alert.clone().into(),
    ] {
        log.record(event).expect("a valid event is accepted");
    }
    log.flush().await.expect("flush");

    let security = log.recent(EventKind::Security, 10).await.unwrap();
    assert_eq!(
        security,
        vec![
            Event::from(v4.clone()),
            minimal.clone().into(),
            full.clone().into()
        ],
        "security events come back whole, newest first"
    );
    assert_eq!(
        log.recent(EventKind::WebSocket, 10).await.unwrap(),
        vec![Event::from(ws)]
    );
    assert_eq!(
        log.recent(EventKind::Alert, 10).await.unwrap(),
        vec![Event::from(alert)]
    );

    // Limits.
    assert!(log.recent(EventKind::Security, 0).await.unwrap().is_empty());
    assert_eq!(
        log.recent(EventKind::Security, 2).await.unwrap(),
        vec![Event::from(v4), minimal.into()],
        "a limit keeps the newest"
    );

    // Same timestamp: ties are broken by id, descending.
    let tie_a = SecurityEvent {
        id: Uuid::from_u128(1),
        created_at: at(40),
        ..SecurityEvent::new("tie", &SystemClock)
    };
    let tie_b = SecurityEvent {
        id: Uuid::from_u128(2),
        ..tie_a.clone()
    };
    log.record(tie_a.clone().into()).unwrap();
    log.record(tie_b.clone().into()).unwrap();
    log.flush().await.unwrap();
    assert_eq!(
        log.recent(EventKind::Security, 2).await.unwrap(),
        vec![Event::from(tie_b), tie_a.into()]
    );

    // Counting by type over a window.
    let old = SecurityEvent {
        created_at: base - Duration::from_secs(7200),
        ..SecurityEvent::new("login_succeeded", &SystemClock)
    };
    log.record(old.into()).unwrap();
    log.flush().await.unwrap();
    let counts = log.security_event_counts(at(0)).await.unwrap();
    let counts: Vec<(&str, u64)> = counts
        .iter()
        .map(|c| (c.event_type.as_str(), c.count))
        .collect();
    assert_eq!(
        counts,
        [("login_failed", 2), ("tie", 2), ("login_succeeded", 1)],
        "counts within the window, most frequent first, ties by name"
    );
    assert_eq!(log.security_event_counts(at(31)).await.unwrap().len(), 1);
    assert!(
        log.security_event_counts(at(3600 * 3))
            .await
            .unwrap()
            .is_empty()
    );

    // Records no backend can store are refused up front and nothing is kept.
    let invalid: Vec<Event> = vec![
        SecurityEvent::new("", &SystemClock).into(),
        SecurityEvent::new("x".repeat(MAX_NAME_LEN + 1), &SystemClock).into(),
        SecurityEvent::new("nul\0inside", &SystemClock).into(),
        SecurityEvent::new("ok", &SystemClock)
            .details(json!({"a": "nul\u{0}"}))
            .into(),
        SecurityEvent::new("ok", &SystemClock)
            .details(json!({"a\u{0}": 1}))
            .into(),
        SecurityEvent::new("ok", &SystemClock)
            .details(json!("x".repeat(MAX_JSON_LEN)))
            .into(),
        SecurityEvent::new("ok", &SystemClock)
            .user_agent("u".repeat(MAX_TEXT_LEN + 1))
            .into(),
        WebSocketEvent::new("", &SystemClock).into(),
        SystemAlert::new(AlertLevel::Info, "", "no source", &SystemClock).into(),
        SystemAlert::new(
            AlertLevel::Info,
            "perf",
            "m".repeat(MAX_TEXT_LEN + 1),
            &SystemClock,
        )
        .into(),
    ];
    let accepted_before = log.stats().accepted;
    for event in invalid {
        let err = log
            .record(event.clone())
            .expect_err("invalid event refused");
        assert!(
            matches!(err, EventLogError::InvalidEvent { .. }),
            "{event:?} gave {err:?}"
        );
    }
    log.flush().await.unwrap();
    assert_eq!(
        log.stats().accepted,
        accepted_before,
        "refused events are not counted as accepted"
    );
    assert_eq!(log.recent(EventKind::Security, 100).await.unwrap().len(), 6);

    let after = log.stats();
    assert_eq!(after.accepted - before.accepted, 8);
    assert_eq!(
        after.written - before.written,
        8,
        "everything accepted was written: {after:?}"
    );
    assert_eq!(after.queued, 0);
    assert_eq!(after.dropped, before.dropped);

    // A record whose id was recorded before is accepted and not stored twice (a retry).
    let again = SystemAlert {
        created_at: at(50),
        ..SystemAlert::new(AlertLevel::Warning, "perf", "first", &SystemClock)
    };
    let twice = SecurityEvent {
        created_at: at(50),
        ..SecurityEvent::new("twice", &SystemClock)
    };
    for _ in 0..2 {
        log.record(again.clone().into()).unwrap();
        log.record(twice.clone().into()).unwrap();
    }
    log.flush().await.unwrap();
    assert_eq!(log.recent(EventKind::Alert, 10).await.unwrap().len(), 2);
    let newest = log.recent(EventKind::Security, 10).await.unwrap();
    assert_eq!(newest.len(), 7);
    assert_eq!(newest[0], Event::from(twice));
    assert_eq!(log.stats().queued, 0);
}

/// Checks a [`RateLimiter`](crate::limit::RateLimiter) against GCRA as the trait
/// describes it: a burst of `limit` admitted with `remaining` counting down, then
/// refusals whose `retry_after` is the emission interval; one more admitted per interval;
/// subjects and rules independent; blocks across rules that only ever lengthen; invalid
/// names refused. Panics with a message on the first difference.
///
/// Quotas are 4 requests per 4 × `emission`. `time` lets time pass for the limiter:
/// [`MoveClock`] for one on a [`ManualClock`] (then `slack` can be zero and every
/// duration is checked exactly), [`Sleep`] for one on real time such as Redis (then
/// `emission` should dwarf a round trip, e.g. 250 ms, and `slack` covers round trips and
/// scheduling, e.g. 80 ms). Durations are checked as `ideal - slack <= got <= ideal`:
/// real time only ever makes them shorter. Rule and subject names are unique per run, so
/// runs can share a Redis.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use upcoach_core::ManualClock;
/// use upcoach_core::limit::MemoryLimiter;
/// use upcoach_core::testing::{MoveClock, rate_limiter_conformance};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let clock = Arc::new(ManualClock::starting_now());
/// let limiter = MemoryLimiter::with_clock(clock.clone());
/// rate_limiter_conformance(&limiter, &MoveClock(clock), Duration::from_secs(1), Duration::ZERO)
///     .await;
/// # });
/// ```
pub async fn rate_limiter_conformance(
    limiter: &dyn crate::limit::RateLimiter,
    time: &dyn PassTime,
    emission: Duration,
    slack: Duration,
) {
    use crate::limit::{LimitError, Quota};

    let quota = Quota::new(4, emission * 4).expect("a valid quota");
    let run = Uuid::now_v7().simple().to_string();
    let rule = format!("conformance.{run}.a");
    let other_rule = format!("conformance.{run}.b");
    let subject = format!("user:{run}:1");
    let near = |got: Duration, ideal: Duration, what: &str| {
        assert!(
            got <= ideal && got + slack >= ideal,
            "{what}: {got:?}, expected {ideal:?} (slack {slack:?})"
        );
    };

    // A burst of `limit`, remaining counting down, the bucket's refill time growing.
    for n in 1..=4u32 {
        let d = limiter.check(&rule, &subject, quota).await.unwrap();
        assert!(d.allowed, "request {n} of a burst of 4 is admitted: {d:?}");
        assert_eq!(d.limit, 4, "the decision carries the quota's limit");
        assert_eq!(d.remaining, 4 - n, "remaining after request {n}: {d:?}");
        assert_eq!(d.retry_after, Duration::ZERO, "no wait when admitted");
        near(
            d.reset_after,
            emission * n,
            &format!("reset_after after {n}"),
        );
    }

    // Then refused until one emission interval has passed.
    let refused = limiter.check(&rule, &subject, quota).await.unwrap();
    assert!(!refused.allowed, "the 5th request is refused: {refused:?}");
    assert_eq!((refused.limit, refused.remaining), (4, 0));
    near(
        refused.retry_after,
        emission,
        "retry_after once the burst is spent",
    );
    near(
        refused.reset_after,
        emission * 4,
        "reset_after once the burst is spent",
    );
    let again = limiter.check(&rule, &subject, quota).await.unwrap();
    assert!(
        !again.allowed,
        "a refused request is not counted, and still refused"
    );
    assert!(again.retry_after > Duration::ZERO && again.retry_after <= refused.retry_after);

    // One interval later, exactly one more.
    time.pass(again.retry_after + slack / 2).await;
    let refilled = limiter.check(&rule, &subject, quota).await.unwrap();
    assert!(
        refilled.allowed,
        "one request is back after the interval: {refilled:?}"
    );
    assert_eq!(refilled.remaining, 0);
    let after = limiter.check(&rule, &subject, quota).await.unwrap();
    assert!(!after.allowed, "only one came back: {after:?}");
    near(after.retry_after, emission, "retry_after after the refill");

    // Other subjects and other rules have budgets of their own.
    let other_subject = format!("ip:{run}");
    let d = limiter.check(&rule, &other_subject, quota).await.unwrap();
    assert!(d.allowed && d.remaining == 3, "another subject: {d:?}");
    let d = limiter.check(&other_rule, &subject, quota).await.unwrap();
    assert!(d.allowed && d.remaining == 3, "another rule: {d:?}");
    let wide = Quota::new(7, emission * 7).unwrap();
    let d = limiter
        .check(&format!("conformance.{run}.c"), &subject, wide)
        .await
        .unwrap();
    assert_eq!((d.allowed, d.limit, d.remaining), (true, 7, 6), "{d:?}");
    let single = Quota::new(1, emission * 4).unwrap();
    let single_rule = format!("conformance.{run}.d");
    assert!(
        limiter
            .check(&single_rule, &subject, single)
            .await
            .unwrap()
            .allowed
    );
    let d = limiter.check(&single_rule, &subject, single).await.unwrap();
    assert_eq!((d.allowed, d.limit, d.remaining), (false, 1, 0), "{d:?}");
    near(
        d.retry_after,
        emission * 4,
        "a quota of one waits the whole window",
    );

    // A block shuts the subject out of every rule, lengthens but never shortens.
    let blocked = format!("ip:{run}:blocked");
    let bystander = format!("ip:{run}:bystander");
    limiter.block(&blocked, emission * 3).await.unwrap();
    limiter.block(&blocked, emission).await.unwrap();
    for r in [&rule, &other_rule] {
        let d = limiter.check(r, &blocked, quota).await.unwrap();
        assert!(!d.allowed, "a blocked subject is refused under {r}: {d:?}");
        assert_eq!((d.limit, d.remaining), (4, 0));
        near(
            d.retry_after,
            emission * 3,
            "retry_after of a block (a shorter one came after)",
        );
        assert!(d.reset_after >= d.retry_after, "{d:?}");
    }
    assert!(
        limiter
            .check(&rule, &bystander, quota)
            .await
            .unwrap()
            .allowed
    );
    limiter.block(&blocked, emission * 5).await.unwrap();
    let d = limiter.check(&rule, &blocked, quota).await.unwrap();
    near(
        d.retry_after,
        emission * 5,
        "a longer block replaces a shorter one",
    );
    time.pass(d.retry_after + slack / 2).await;
    let d = limiter.check(&rule, &blocked, quota).await.unwrap();
    assert!(d.allowed, "the block has ended: {d:?}");
    assert_eq!(d.remaining, 3, "refusals during a block use no budget");
    limiter.block(&blocked, Duration::ZERO).await.unwrap();
    assert!(
        limiter.check(&rule, &blocked, quota).await.unwrap().allowed,
        "a zero block is none"
    );

    // Names no backend can key.
    let long = "x".repeat(crate::limit::MAX_NAME_LEN + 1);
    for bad in [
        "",
        "a{b",
        "a}b",
        "{tag}",
        "tab\there",
        "nul\0",
        long.as_str(),
    ] {
        let invalid = |r: Result<_, LimitError>, what: &str| {
            assert!(
                matches!(r, Err(LimitError::InvalidName(_))),
                "{what} {bad:?} gave {r:?}"
            );
        };
        invalid(
            limiter.check(bad, &subject, quota).await.map(|_| ()),
            "rule",
        );
        invalid(
            limiter.check(&rule, bad, quota).await.map(|_| ()),
            "subject",
        );
        invalid(limiter.block(bad, emission).await, "blocked subject");
    }
    let longest = "y".repeat(crate::limit::MAX_NAME_LEN);
    assert!(
        limiter
            .check(&longest, &format!("user:{run}:ünï"), quota)
            .await
            .unwrap()
            .allowed
    );
}
