//! The WebSocket transport against an in-memory hub: API.md's protocol, access rules,
//! tokens, limits, abuse, slow consumers and shutdown.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use upcoach_core::event::{EventKind, EventLog, MemoryEventLog};
use upcoach_core::{Role, UserId};
use upcoach_realtime::{HistoryLimits, Hub, HubConfig, MemoryBroadcaster};

fn hub_with(tokens: &Arc<Tokens>, config: HubConfig) -> Hub {
    Hub::builder(Arc::new(MemoryBroadcaster::default()), tokens.clone())
        .config(config)
        .build()
}

async fn setup(config: HubConfig) -> (Hub, Arc<Tokens>, std::net::SocketAddr) {
    let tokens = Arc::new(Tokens::default());
    let hub = hub_with(&tokens, config);
    let addr = serve(hub.clone()).await;
    (hub, tokens, addr)
}

#[tokio::test]
async fn events_arrive_in_order_in_the_api_shape() {
    let (hub, tokens, addr) = setup(HubConfig::default()).await;
    let mut client = ws(addr, Some(&tokens.admin())).await;
    assert_eq!(subscribe(&mut client, "metrics", None).await, 0);
    for i in 0..50 {
        hub.publish("metrics", "tick", serde_json::json!({"i": i}))
            .await
            .unwrap();
    }
    for seq in 1..=50u64 {
        let event = recv(&mut client).await;
        assert_eq!(event["type"], "event");
        assert_eq!(event["room"], "metrics");
        assert_eq!(event["seq"], seq);
        assert_eq!(event["event"], "tick");
        assert_eq!(event["data"]["i"], seq - 1);
        assert!(
            event["ts"].as_u64().unwrap() > 1_700_000_000_000,
            "ts in ms: {event}"
        );
    }
    send(&mut client, serde_json::json!({"type": "ping"})).await;
    assert_eq!(recv(&mut client).await, serde_json::json!({"type": "pong"}));
}

#[tokio::test]
async fn since_replays_each_missed_event_once_then_live_ones() {
    let (hub, tokens, addr) = setup(HubConfig::default()).await;
    for i in 1..=10 {
        hub.publish("public:news", "posted", serde_json::json!(i))
            .await
            .unwrap();
    }
    let mut client = ws(addr, Some(&tokens.admin())).await;
    assert_eq!(subscribe(&mut client, "public:news", Some(4)).await, 10);
    for seq in 5..=10u64 {
        assert_eq!(recv(&mut client).await["seq"], seq);
    }
    hub.publish("public:news", "posted", serde_json::json!(11))
        .await
        .unwrap();
    let live = recv(&mut client).await;
    assert_eq!(
        (live["seq"].as_u64(), live["data"].as_u64()),
        (Some(11), Some(11))
    );
}

#[tokio::test]
async fn since_beyond_history_sends_reset_then_live_events() {
    let tokens = Arc::new(Tokens::default());
    let broadcaster = MemoryBroadcaster::new(
        HistoryLimits {
            max_events: 5,
            max_age: Duration::from_secs(60),
        },
        Arc::new(upcoach_core::SystemClock),
    );
    let hub = Hub::builder(Arc::new(broadcaster), tokens.clone()).build();
    let addr = serve(hub.clone()).await;
    for i in 0..20 {
        hub.publish("alerts", "fired", serde_json::json!(i))
            .await
            .unwrap();
    }
    let mut client = ws(addr, Some(&tokens.admin())).await;
    assert_eq!(subscribe(&mut client, "alerts", Some(2)).await, 20);
    let reset = recv(&mut client).await;
    assert_eq!(reset["type"], "reset");
    assert_eq!(reset["room"], "alerts");
    assert_eq!(reset["reason"], "history_expired");
    hub.publish("alerts", "fired", serde_json::json!(20))
        .await
        .unwrap();
    assert_eq!(recv(&mut client).await["seq"], 21);
}

#[tokio::test]
async fn every_default_room_rule_allows_and_refuses() {
    let tokens = Arc::new(Tokens::default());
    let log = Arc::new(MemoryEventLog::default());
    let hub = Hub::builder(Arc::new(MemoryBroadcaster::default()), tokens.clone())
        .events(log.clone())
        .build();
    let addr = serve(hub.clone()).await;
    let me = UserId::new();
    let other = UserId::new();
    let ttl = Duration::from_secs(900);
    let cases: Vec<(Vec<Role>, String, bool)> = vec![
        (vec![Role::ADMIN], "metrics".into(), true),
        (vec![Role::ADMIN], "alerts".into(), true),
        (vec![Role::ADMIN], "security".into(), true),
        (vec![Role::ADMIN], format!("user:{other}"), true),
        (vec![Role::ADMIN], format!("coach:{other}"), true),
        (vec![Role::USER], "metrics".into(), false),
        (vec![Role::USER], "alerts".into(), false),
        (vec![Role::USER], "security".into(), false),
        (vec![Role::USER], format!("user:{me}"), true),
        (vec![Role::USER], format!("user:{other}"), false),
        (vec![Role::USER], format!("coach:{me}"), false),
        (vec![Role::COACH], format!("coach:{me}"), true),
        (vec![Role::COACH], format!("coach:{other}"), false),
        (vec![Role::USER], "public:lobby".into(), true),
        (vec![Role::USER], "public:".into(), false),
        (vec![Role::USER], "private:x".into(), false),
    ];
    let mut denied = 0;
    for (roles, room, allowed) in cases {
        let mut client = ws(addr, Some(&tokens.issue(me, &roles, ttl))).await;
        send(
            &mut client,
            serde_json::json!({"type": "subscribe", "room": room}),
        )
        .await;
        let reply = recv(&mut client).await;
        if allowed {
            assert_eq!(reply["type"], "subscribed", "{roles:?} on {room}: {reply}");
        } else {
            denied += 1;
            assert_eq!(reply["type"], "error", "{roles:?} on {room}: {reply}");
            assert_eq!(reply["code"], "forbidden");
            assert_eq!(reply["room"], room.as_str());
        }
    }
    assert_eq!(hub.stats().denied_subscriptions, denied);
    let rows = log.recent(EventKind::WebSocket, 1000).await.unwrap();
    let denials = rows
        .iter()
        .filter(|r| r.name() == "subscription_denied")
        .count() as u64;
    assert_eq!(denials, denied, "each refusal is in websocket_events");
}

#[tokio::test]
async fn a_token_can_come_by_query_or_first_message_and_must_come_in_time() {
    let (_hub, tokens, addr) = setup(HubConfig {
        auth_timeout: Duration::from_millis(300),
        ..HubConfig::default()
    })
    .await;
    let token = tokens.admin();
    let mut by_query = ws_with(addr, &format!("/ws?access_token={token}"), None, None)
        .await
        .unwrap();
    subscribe(&mut by_query, "metrics", None).await;

    let mut by_message = ws(addr, None).await;
    send(
        &mut by_message,
        serde_json::json!({"type": "subscribe", "room": "metrics"}),
    )
    .await;
    assert_eq!(recv(&mut by_message).await["code"], "unauthenticated");
    send(
        &mut by_message,
        serde_json::json!({"type": "auth", "token": token}),
    )
    .await;
    subscribe(&mut by_message, "metrics", None).await;

    let mut silent = ws(addr, None).await;
    assert_eq!(
        closed(&mut silent).await,
        Some(4001),
        "no token within the auth timeout"
    );

    let mut wrong = ws(addr, Some("not-a-token")).await;
    assert_eq!(
        closed(&mut wrong).await,
        Some(4001),
        "an invalid header token"
    );
}

#[tokio::test]
async fn an_expired_token_closes_4001_and_a_refresh_keeps_the_connection() {
    let (_hub, tokens, addr) = setup(HubConfig::default()).await;
    let me = UserId::new();
    let short = Duration::from_millis(1200);

    let mut expiring = ws(addr, Some(&tokens.issue(me, &[Role::ADMIN], short))).await;
    subscribe(&mut expiring, "metrics", None).await;
    assert_eq!(closed(&mut expiring).await, Some(4001));

    let mut refreshed = ws(addr, Some(&tokens.issue(me, &[Role::ADMIN], short))).await;
    subscribe(&mut refreshed, "metrics", None).await;
    let fresh = tokens.issue(me, &[Role::ADMIN], Duration::from_secs(900));
    send(
        &mut refreshed,
        serde_json::json!({"type": "auth", "token": fresh}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1800)).await;
    send(&mut refreshed, serde_json::json!({"type": "ping"})).await;
    assert_eq!(
        recv(&mut refreshed).await["type"],
        "pong",
        "still open past the first expiry"
    );

    let someone_else = tokens.issue(UserId::new(), &[Role::ADMIN], Duration::from_secs(900));
    send(
        &mut refreshed,
        serde_json::json!({"type": "auth", "token": someone_else}),
    )
    .await;
    assert_eq!(
        closed(&mut refreshed).await,
        Some(4003),
        "a refresh may not switch users"
    );
}

#[tokio::test]
async fn bad_messages_get_errors_then_4400_and_oversized_ones_are_refused() {
    let (_hub, tokens, addr) = setup(HubConfig::default()).await;
    let mut client = ws(addr, Some(&tokens.admin())).await;
    let bad = [
        Message::Text("not json".into()),
        Message::Text(r#"{"type":"dance"}"#.into()),
        Message::Text(r#"{"type":"subscribe"}"#.into()),
        Message::Binary(vec![1, 2, 3].into()),
        Message::Text(r#"{"type":"subscribe","room":"metrics","since":"7"}"#.into()),
    ];
    for message in bad {
        client.send(message).await.unwrap();
        let reply = recv(&mut client).await;
        assert_eq!(
            (reply["type"].as_str(), reply["code"].as_str()),
            (Some("error"), Some("bad_message"))
        );
    }
    send(
        &mut client,
        serde_json::json!({"type": "subscribe", "room": "bad room"}),
    )
    .await;
    assert_eq!(recv(&mut client).await["code"], "invalid_room");
    client.send(Message::Text("again".into())).await.unwrap();
    assert_eq!(closed(&mut client).await, Some(4400));

    let mut big = ws(addr, Some(&tokens.admin())).await;
    let huge = "x".repeat(64 * 1024);
    let _ = big.send(Message::Text(huge.into())).await;
    assert_eq!(closed(&mut big).await, Some(1009));
}

#[tokio::test]
async fn origins_and_connection_limits_are_enforced() {
    let (hub, tokens, addr) = setup(HubConfig {
        allowed_origins: vec!["https://app.example.com".into()],
        max_connections: 4,
        max_connections_per_user: 2,
        ..HubConfig::default()
    })
    .await;
    let refused = ws_with(
        addr,
        "/ws",
        Some(&tokens.admin()),
        Some("https://evil.example"),
    )
    .await;
    assert!(
        matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 403)
    );
    let _ok = ws_with(
        addr,
        "/ws",
        Some(&tokens.admin()),
        Some("https://app.example.com"),
    )
    .await
    .unwrap();

    let me = UserId::new();
    let token = tokens.issue(me, &[Role::USER], Duration::from_secs(900));
    let _one = ws(addr, Some(&token)).await;
    let _two = ws(addr, Some(&token)).await;
    let third_same_user = ws_with(addr, "/ws", Some(&token), None).await;
    assert!(
        matches!(third_same_user, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 429)
    );
    let _three = ws(addr, Some(&tokens.admin())).await;
    let over_the_top = ws_with(addr, "/ws", Some(&tokens.admin()), None).await;
    assert!(
        matches!(over_the_top, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503)
    );
    assert_eq!(hub.connections(), 4);
    assert_eq!(hub.stats().refused, 2);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_4008_and_memory_stays_bounded() {
    let (hub, tokens, addr) = setup(HubConfig {
        queue_capacity: 16,
        close_timeout: Duration::from_secs(10),
        ..HubConfig::default()
    })
    .await;
    let mut stuck = ws(addr, Some(&tokens.admin())).await;
    subscribe(&mut stuck, "metrics", None).await;
    let mut healthy = ws(addr, Some(&tokens.admin())).await;
    subscribe(&mut healthy, "metrics", None).await;
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let event = recv(&mut healthy).await;
            n += 1;
            assert_eq!(event["seq"], n, "the healthy client misses nothing");
            if n == 3000 {
                return n;
            }
        }
    });
    // 3,000 events of 4 KiB: far more than the socket buffers and the queue of 16 hold.
    let payload = "y".repeat(4096);
    for _ in 0..3000 {
        hub.publish("metrics", "tick", serde_json::json!(payload))
            .await
            .unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(reader.await.unwrap(), 3000);
    assert_eq!(hub.stats().slow_consumers_closed, 1);
    let metrics = hub
        .status()
        .rooms
        .into_iter()
        .find(|r| r.room == "metrics")
        .unwrap();
    assert_eq!(
        metrics.subscribers, 1,
        "the stuck client no longer holds events"
    );
    // Once it reads again it sees what was already in flight, then the close.
    let mut received = 0;
    let code = loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut stuck))
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(_))) => received += 1,
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert_eq!(code, Some(4008));
    assert!(
        received < 3000,
        "it was cut off, not fed everything ({received})"
    );
}

#[tokio::test]
async fn an_unresponsive_client_is_dropped_by_the_heartbeat() {
    let (hub, tokens, addr) = setup(HubConfig {
        ws_ping_interval: Duration::from_millis(200),
        ws_pong_timeout: Duration::from_millis(200),
        ..HubConfig::default()
    })
    .await;
    let mut client = ws(addr, Some(&tokens.admin())).await;
    subscribe(&mut client, "metrics", None).await;
    // Not reading means not answering pings.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(hub.connections(), 0, "dropped after a missed pong");
    let mut answering = ws(addr, Some(&tokens.admin())).await;
    subscribe(&mut answering, "metrics", None).await;
    let keep_reading = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_millis(900), closed(&mut answering)).await;
        answering
    });
    let _answering = keep_reading.await.unwrap();
    assert_eq!(hub.connections(), 1, "a client that answers pings stays");
}

#[tokio::test]
async fn shutdown_closes_with_1001_and_connections_are_logged() {
    let tokens = Arc::new(Tokens::default());
    let log = Arc::new(MemoryEventLog::default());
    let hub = Hub::builder(Arc::new(MemoryBroadcaster::default()), tokens.clone())
        .events(log.clone())
        .build();
    let addr = serve(hub.clone()).await;
    let mut client = ws(addr, Some(&tokens.admin())).await;
    subscribe(&mut client, "metrics", None).await;
    let mut refused = ws(addr, Some("forged")).await;
    assert_eq!(closed(&mut refused).await, Some(4001));
    let stopping = tokio::spawn({
        let hub = hub.clone();
        async move { hub.shutdown(Duration::from_secs(5)).await }
    });
    assert_eq!(closed(&mut client).await, Some(1001));
    drop(client);
    assert_eq!(
        stopping.await.unwrap(),
        0,
        "every connection closed in time"
    );
    assert!(
        ws_with(addr, "/ws", Some(&tokens.admin()), None)
            .await
            .is_err(),
        "refused while down"
    );
    let rows = log.recent(EventKind::WebSocket, 100).await.unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name()).collect();
    for expected in ["connect", "disconnect", "auth_failure"] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
}

#[tokio::test]
async fn since_ahead_of_the_room_gets_reset_then_live_events() {
    let (hub, tokens, addr) = setup(HubConfig::default()).await;
    for i in 0..3 {
        hub.publish("public:x", "n", serde_json::json!(i))
            .await
            .unwrap();
    }
    let mut client = ws(addr, Some(&tokens.admin())).await;
    assert_eq!(subscribe(&mut client, "public:x", Some(999)).await, 3);
    let reset = recv(&mut client).await;
    assert_eq!(
        (reset["type"].as_str(), reset["reason"].as_str()),
        (Some("reset"), Some("cursor_ahead_of_room"))
    );
    hub.publish("public:x", "n", serde_json::json!("live"))
        .await
        .unwrap();
    assert_eq!(recv(&mut client).await["seq"], 4);
}
