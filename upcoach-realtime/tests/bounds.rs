//! The in-process broadcaster's bound on rooms, pushed past: a new room finds space
//! only where a room has neither readers nor history, and is refused otherwise.
//!
//! `cargo test -p upcoach-realtime --test bounds`

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use upcoach_core::ManualClock;
use upcoach_realtime::{Broadcaster, Error, HistoryLimits, MemoryBroadcaster, Position, Replay};

#[tokio::test]
async fn a_room_flood_stops_at_the_cap_and_only_idle_rooms_make_space() {
    let clock = Arc::new(ManualClock::starting_now());
    let limits = HistoryLimits {
        max_events: 100,
        max_age: Duration::from_secs(60),
    };
    let broadcaster = MemoryBroadcaster::new(limits, clock.clone()).with_max_rooms(3);
    for room in ["public:a", "public:b", "public:c"] {
        broadcaster
            .publish(room, "posted", json!({}))
            .await
            .unwrap();
    }
    let reader = broadcaster.subscribe("public:b").await.unwrap();

    // Every room has history: publishing to, or reading, a new room is refused.
    for i in 0..100 {
        let room = format!("public:flood-{i}");
        match broadcaster.publish(&room, "posted", json!({})).await {
            Err(e @ Error::TooManyRooms { max: 3 }) => {
                assert_eq!(e.code(), "too_many_rooms");
            }
            other => panic!("a full broadcaster: {other:?}"),
        }
        assert!(matches!(
            broadcaster.subscribe(&room).await,
            Err(Error::TooManyRooms { max: 3 })
        ));
    }
    // The rooms it has keep working.
    let event = broadcaster
        .publish("public:a", "posted", json!({}))
        .await
        .unwrap();
    assert_eq!(event.seq, 2);
    let first_epoch = event.epoch;

    // Once history has aged out, rooms without readers make space; the read one stays.
    clock.advance(Duration::from_secs(61));
    broadcaster
        .publish("public:d", "posted", json!({}))
        .await
        .unwrap();
    broadcaster
        .publish("public:e", "posted", json!({}))
        .await
        .unwrap();
    assert!(matches!(
        broadcaster.publish("public:f", "posted", json!({})).await,
        Err(Error::TooManyRooms { .. })
    ));
    assert_eq!(broadcaster.head("public:b").await.unwrap().seq, 1, "kept");
    assert_eq!(
        broadcaster.head("public:a").await.unwrap(),
        Position::default(),
        "forgotten"
    );
    assert!(matches!(
        broadcaster.replay("public:a", 2.into(), 10).await.unwrap(),
        Replay::Gone {
            reason: "cursor_ahead_of_room"
        }
    ));
    // A forgotten room numbers again from 1 under a new epoch: a position from before,
    // however its number compares, cannot resume in it.
    let old = Position::new(2, first_epoch);
    clock.advance(Duration::from_secs(61));
    for _ in 0..3 {
        broadcaster
            .publish("public:a", "posted", json!({}))
            .await
            .unwrap();
    }
    let head = broadcaster.head("public:a").await.unwrap();
    assert_eq!(head.seq, 3);
    assert_ne!(head.epoch, first_epoch, "a new numbering, a new epoch");
    assert_eq!(
        broadcaster.replay("public:a", old, 10).await.unwrap(),
        Replay::Gone {
            reason: "room_restarted"
        }
    );
    drop(reader);
}
