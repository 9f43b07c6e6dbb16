//! The conformance suite every [`Broadcaster`] passes (feature `testing`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use upcoach_core::{Clock, ManualClock};

use crate::{
    Broadcaster, Error, HistoryLimits, MAX_EVENT_DATA_LEN, Position, Replay, Subscription,
};

/// Makes a fresh, empty broadcaster (its own instance or key prefix) with the given
/// history limits, stamping and ageing events by `clock`.
#[async_trait]
pub trait MakeBroadcaster: Send + Sync {
    /// The broadcaster.
    async fn make(&self, history: HistoryLimits, clock: Arc<ManualClock>) -> Arc<dyn Broadcaster>;
}

const WAIT: Duration = Duration::from_secs(5);

async fn next_seq(sub: &mut Subscription) -> u64 {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("a live event within 5 s")
        .expect("the feed stays open")
        .seq
}

fn events(replay: Replay) -> Vec<u64> {
    match replay {
        Replay::Events(events) => events.iter().map(|e| e.seq).collect(),
        Replay::Gone { reason } => panic!("expected events, history said gone: {reason}"),
    }
}

/// Runs every check, each on a fresh broadcaster from `make`. Panics with a message at
/// the first difference.
pub async fn broadcaster_conformance(make: &dyn MakeBroadcaster) {
    numbering(make).await;
    live_order(make).await;
    replay_ranges(make).await;
    count_bound(make).await;
    age_bound(make).await;
    refusals(make).await;
    concurrent_publishers(make).await;
    epochs(make).await;
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::starting_now())
}

async fn numbering(make: &dyn MakeBroadcaster) {
    let b = make.make(HistoryLimits::default(), clock()).await;
    assert_eq!(b.head("a").await.unwrap().seq, 0, "a new room is at 0");
    for expected in 1..=3 {
        let sent = b
            .publish("a", "tick", serde_json::json!({"n": expected}))
            .await
            .unwrap();
        assert_eq!(sent.seq, expected, "seq counts up by one per event");
        assert_eq!(sent.room, "a");
    }
    let other = b
        .publish("b", "tick", serde_json::json!(null))
        .await
        .unwrap();
    assert_eq!(other.seq, 1, "each room has its own sequence");
    assert_eq!(b.head("a").await.unwrap().seq, 3);
    assert_eq!(b.head("b").await.unwrap().seq, 1);
    assert!(!b.state().kind.is_empty());
}

async fn live_order(make: &dyn MakeBroadcaster) {
    let b = make.make(HistoryLimits::default(), clock()).await;
    let mut first = b.subscribe("live").await.unwrap();
    let mut second = b.subscribe("live").await.unwrap();
    for i in 0..100 {
        b.publish("live", "n", serde_json::json!(i)).await.unwrap();
    }
    for expected in 1..=100 {
        assert_eq!(
            next_seq(&mut first).await,
            expected,
            "in order, none missing"
        );
        assert_eq!(
            next_seq(&mut second).await,
            expected,
            "every subscriber sees each"
        );
    }
}

async fn replay_ranges(make: &dyn MakeBroadcaster) {
    let clock = clock();
    let b = make.make(HistoryLimits::default(), clock.clone()).await;
    for i in 1..=100u64 {
        b.publish("r", "n", serde_json::json!({"i": i, "text": "héllo ✓"}))
            .await
            .unwrap();
    }
    assert_eq!(
        events(b.replay("r", 0.into(), 1000).await.unwrap()),
        (1..=100).collect::<Vec<_>>()
    );
    assert_eq!(
        events(b.replay("r", 50.into(), 10).await.unwrap()),
        (51..=60).collect::<Vec<_>>()
    );
    assert_eq!(
        events(b.replay("r", 100.into(), 10).await.unwrap()),
        Vec::<u64>::new(),
        "at the head: nothing"
    );
    assert!(
        matches!(
            b.replay("r", 105.into(), 10).await.unwrap(),
            Replay::Gone { .. }
        ),
        "a cursor ahead of the room cannot resume"
    );
    assert_eq!(
        events(b.replay("nobody-here", 0.into(), 10).await.unwrap()),
        Vec::<u64>::new()
    );
    let Replay::Events(got) = b.replay("r", 6.into(), 1).await.unwrap() else {
        panic!("events")
    };
    let event = &got[0];
    assert_eq!(
        (event.room.as_str(), event.seq, event.event.as_str()),
        ("r", 7, "n")
    );
    assert_eq!(
        event.data,
        serde_json::json!({"i": 7, "text": "héllo ✓"}),
        "data round-trips"
    );
    let now_ms = clock
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        event.ts_millis().abs_diff(now_ms) <= 1,
        "ts comes from the clock"
    );
}

async fn count_bound(make: &dyn MakeBroadcaster) {
    let limits = HistoryLimits {
        max_events: 5,
        max_age: Duration::from_secs(3600),
    };
    let b = make.make(limits, clock()).await;
    for i in 0..300 {
        b.publish("c", "n", serde_json::json!(i)).await.unwrap();
    }
    assert!(
        matches!(
            b.replay("c", 0.into(), 1000).await.unwrap(),
            Replay::Gone { .. }
        ),
        "history bounded by count no longer reaches the start"
    );
    assert_eq!(
        events(b.replay("c", 295.into(), 100).await.unwrap()),
        (296..=300).collect::<Vec<_>>()
    );
}

async fn age_bound(make: &dyn MakeBroadcaster) {
    let clock = clock();
    let limits = HistoryLimits {
        max_events: 1000,
        max_age: Duration::from_secs(60),
    };
    let b = make.make(limits, clock.clone()).await;
    for i in 0..3 {
        b.publish("t", "n", serde_json::json!(i)).await.unwrap();
    }
    clock.advance(Duration::from_secs(30));
    for i in 3..5 {
        b.publish("t", "n", serde_json::json!(i)).await.unwrap();
    }
    clock.advance(Duration::from_secs(40));
    assert!(
        matches!(
            b.replay("t", 0.into(), 100).await.unwrap(),
            Replay::Gone { .. }
        ),
        "events older than max_age are not replayed"
    );
    assert_eq!(
        events(b.replay("t", 3.into(), 100).await.unwrap()),
        vec![4, 5]
    );
}

async fn refusals(make: &dyn MakeBroadcaster) {
    let b = make.make(HistoryLimits::default(), clock()).await;
    let long = "x".repeat(129);
    for room in ["", "a b", "a,b", "a=b", "{a}", "ümlaut", long.as_str()] {
        assert!(
            matches!(
                b.publish(room, "n", serde_json::json!(1)).await,
                Err(Error::InvalidRoom { .. })
            ),
            "room {room:?} is refused"
        );
        assert!(matches!(
            b.subscribe(room).await,
            Err(Error::InvalidRoom { .. })
        ));
    }
    for event in ["", "reset", "subscribed", "a\nb", "a|b"] {
        assert!(
            matches!(
                b.publish("ok", event, serde_json::json!(1)).await,
                Err(Error::InvalidEvent { .. })
            ),
            "event name {event:?} is refused"
        );
    }
    let big = serde_json::json!("x".repeat(MAX_EVENT_DATA_LEN));
    assert!(matches!(
        b.publish("ok", "n", big).await,
        Err(Error::TooLarge { .. })
    ));
    assert_eq!(
        b.head("ok").await.unwrap().seq,
        0,
        "nothing refused was published"
    );
}

async fn concurrent_publishers(make: &dyn MakeBroadcaster) {
    let b = make.make(HistoryLimits::default(), clock()).await;
    let mut live = b.subscribe("busy").await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                seqs.push(
                    b.publish("busy", "n", serde_json::json!([t, i]))
                        .await
                        .unwrap()
                        .seq,
                );
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=100).collect::<Vec<_>>(),
        "every publish got its own number"
    );
    for expected in 1..=100 {
        assert_eq!(
            next_seq(&mut live).await,
            expected,
            "delivered in sequence order"
        );
    }
}

/// Every event of a numbering carries its epoch, the head says it, and a replay from
/// another numbering is refused as `room_restarted` (from an epoch not known, it is
/// taken at its word).
async fn epochs(make: &dyn MakeBroadcaster) {
    let b = make.make(HistoryLimits::default(), clock()).await;
    let mut live = b.subscribe("e").await.unwrap();
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(b.publish("e", "n", serde_json::json!(i)).await.unwrap());
    }
    let epoch = sent[0].epoch;
    assert_ne!(epoch, 0, "a numbering has an epoch");
    assert!(
        sent.iter().all(|e| e.epoch == epoch),
        "one numbering, one epoch"
    );
    assert_eq!(b.head("e").await.unwrap(), Position::new(3, epoch));
    for _ in 0..3 {
        let event = tokio::time::timeout(WAIT, live.recv())
            .await
            .expect("a live event within 5 s")
            .expect("the feed stays open");
        assert_eq!(event.epoch, epoch, "live events carry the epoch");
    }
    let Replay::Events(replayed) = b.replay("e", Position::new(1, epoch), 10).await.unwrap() else {
        panic!("the same numbering replays")
    };
    assert_eq!(
        replayed.iter().map(|e| e.position()).collect::<Vec<_>>(),
        [Position::new(2, epoch), Position::new(3, epoch)],
        "replayed events carry the epoch"
    );
    assert_eq!(
        events(b.replay("e", 1.into(), 10).await.unwrap()),
        [2, 3],
        "an epoch not known is taken at its word"
    );
    let other = epoch.wrapping_add(1).max(1);
    for after in [0, 1, 3] {
        assert_eq!(
            b.replay("e", Position::new(after, other), 10)
                .await
                .unwrap(),
            Replay::Gone {
                reason: "room_restarted"
            },
            "a position from another numbering (seq {after}) cannot resume"
        );
    }
}
