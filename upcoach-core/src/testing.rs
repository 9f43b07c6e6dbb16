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
