//! Events the fan-out writes to sockets itself (`HubConfig::direct_writes`), mixed with
//! everything the connection's task writes: every event whole, once and in order, on
//! both servers, with the queue-only path as the same suite's control.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use upcoach_realtime::{Hub, HubConfig, MemoryBroadcaster};

/// A hub with `direct` writes on or off, served on upcoach's accept loop or (`plain`) a
/// plain hyper loop: the two socket types the fan-out can share.
async fn setup(direct: bool, plain: bool, config: HubConfig) -> (Hub, Arc<Tokens>, SocketAddr) {
    let tokens = Arc::new(Tokens::default());
    let hub = Hub::builder(Arc::new(MemoryBroadcaster::default()), tokens.clone())
        .config(HubConfig {
            direct_writes: direct,
            ..config
        })
        .build();
    let addr = if plain {
        serve_plain(hub.clone()).await
    } else {
        serve(hub.clone()).await
    };
    (hub, tokens, addr)
}

/// The next text message as JSON, answering nothing (tungstenite answers pings).
async fn next_json(ws: &mut Ws) -> serde_json::Value {
    recv(ws).await
}

/// Reads until `rooms` have each delivered `1..=per_room`, checking that each room's
/// numbers come one after the other, every one once, and answering the server's pings
/// and sending a `ping` of its own every `ping_every` events (the task's replies then
/// meet the fan-out's writes on the same socket).
async fn read_in_order(mut ws: Ws, rooms: &[&str], per_room: u64, ping_every: u64) -> u64 {
    let mut last = vec![0u64; rooms.len()];
    let mut events = 0u64;
    let mut pongs_due = 0u64;
    while last.iter().any(|&l| l < per_room) || pongs_due > 0 {
        let message = next_json(&mut ws).await;
        match message["type"].as_str() {
            Some("event") => {
                let room = message["room"].as_str().unwrap();
                let i = rooms.iter().position(|r| *r == room).unwrap();
                let seq = message["seq"].as_u64().unwrap();
                assert_eq!(seq, last[i] + 1, "{room}: one after the other ({message})");
                last[i] = seq;
                events += 1;
                if events.is_multiple_of(ping_every) {
                    send(&mut ws, serde_json::json!({"type": "ping"})).await;
                    pongs_due += 1;
                }
            }
            Some("pong") => pongs_due -= 1,
            other => panic!("unexpected {other:?}: {message}"),
        }
    }
    events
}

/// Several readers of two rooms, published to concurrently, with the server pinging
/// every few milliseconds and each reader sending pings: each reader gets both rooms'
/// events whole, once and in order. With direct writes on, most of them are written by
/// the fan-out; off, none.
async fn two_rooms_with_pings_in_between(direct: bool, plain: bool) {
    const READERS: usize = 6;
    const PER_ROOM: u64 = 1500;
    let (hub, tokens, addr) = setup(
        direct,
        plain,
        HubConfig {
            ws_ping_interval: Duration::from_millis(5),
            ws_pong_timeout: Duration::from_secs(10),
            ..HubConfig::default()
        },
    )
    .await;
    let mut readers = JoinSet::new();
    for _ in 0..READERS {
        let mut client = ws(addr, Some(&tokens.admin())).await;
        subscribe(&mut client, "metrics", None).await;
        subscribe(&mut client, "alerts", None).await;
        readers.spawn(read_in_order(client, &["metrics", "alerts"], PER_ROOM, 97));
    }
    let mut publishers = JoinSet::new();
    for room in ["metrics", "alerts"] {
        let hub = hub.clone();
        publishers.spawn(async move {
            for i in 0..PER_ROOM {
                hub.publish(
                    room,
                    "tick",
                    serde_json::json!({"i": i, "pad": "x".repeat(200)}),
                )
                .await
                .unwrap();
                if i.is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
            }
        });
    }
    publishers.join_all().await;
    for events in readers.join_all().await {
        assert_eq!(events, 2 * PER_ROOM);
    }
    let stats = hub.stats();
    assert_eq!(stats.delivered, 2 * PER_ROOM * READERS as u64);
    assert_eq!(stats.slow_consumers_closed, 0);
    if direct {
        assert!(
            stats.written_directly > 0,
            "the fan-out wrote events itself: {stats:?}"
        );
    } else {
        assert_eq!(stats.written_directly, 0, "{stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rooms_with_pings_in_between_on_upcoachs_loop() {
    two_rooms_with_pings_in_between(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rooms_with_pings_in_between_on_a_plain_hyper_loop() {
    two_rooms_with_pings_in_between(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rooms_with_pings_in_between_through_the_queues_only() {
    two_rooms_with_pings_in_between(false, false).await;
}

/// A reader that joins with `since` while the room is being published to gets the
/// replay and then the live events, one after the other: the fan-out cannot write a
/// live event before the replay is out.
async fn joining_mid_stream(direct: bool) {
    const EVENTS: u64 = 3000;
    let (hub, tokens, addr) = setup(direct, false, HubConfig::default()).await;
    let mut early = ws(addr, Some(&tokens.admin())).await;
    subscribe(&mut early, "metrics", None).await;
    let early = tokio::spawn(read_in_order(early, &["metrics"], EVENTS, u64::MAX));
    let publisher = {
        let hub = hub.clone();
        tokio::spawn(async move {
            for i in 0..EVENTS {
                hub.publish("metrics", "tick", serde_json::json!(i))
                    .await
                    .unwrap();
                if i.is_multiple_of(8) {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
        })
    };
    let mut late = Vec::new();
    for k in 0..8u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut client = ws(addr, Some(&tokens.admin())).await;
        let since = k * 10;
        let mut message = serde_json::json!({"type": "subscribe", "room": "metrics"});
        message["since"] = since.into();
        send(&mut client, message).await;
        let reply = next_json(&mut client).await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        late.push(tokio::spawn(async move {
            let mut last = since;
            let mut again_since = None;
            let mut answered = false;
            while last < EVENTS {
                let event = next_json(&mut client).await;
                if event["type"] == "subscribed" {
                    // Subscribing again moved the reader back: from here on, the events
                    // after the new position, once each (nothing of the old reader's
                    // after this).
                    last = again_since.expect("subscribed once again");
                    answered = true;
                    continue;
                }
                assert_eq!(event["type"], "event", "{event}");
                let seq = event["seq"].as_u64().unwrap();
                assert_eq!(seq, last + 1, "replay, then live, one after the other");
                last = seq;
                if again_since.is_none() && last >= since + 200 && last + 200 < EVENTS {
                    // Mid-stream, the same room again from five events back.
                    again_since = Some(last - 5);
                    let mut again = serde_json::json!({"type": "subscribe", "room": "metrics"});
                    again["since"] = (last - 5).into();
                    send(&mut client, again).await;
                }
            }
            assert!(answered, "the second subscription was answered");
        }));
    }
    publisher.await.unwrap();
    assert_eq!(early.await.unwrap(), EVENTS);
    for reader in late {
        reader.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_joining_mid_stream_get_the_replay_before_live_events() {
    joining_mid_stream(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_joining_mid_stream_through_the_queues_only() {
    joining_mid_stream(false).await;
}

/// A reader with a small receive buffer that stops reading while large events are
/// published fills its socket: the fan-out then writes frames in part and leaves the
/// rest to the connection's task, or queues them whole. When it reads again, every
/// frame arrives whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_filled_its_socket_gets_every_frame_whole_when_it_reads_again() {
    const EVENTS: u64 = 400;
    let (hub, tokens, addr) = setup(true, false, HubConfig::default()).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", tokens.admin()).parse().unwrap(),
    );
    let (mut client, _): (WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>, _) =
        tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    subscribe(&mut client, "metrics", None).await;
    // Odd sizes, so that the socket fills in the middle of frames: 400 events of 20 to
    // 60 KiB, about 16 MiB, are far more than the two socket buffers hold (the sending
    // one grows to 4 MiB at most by Linux's default).
    for i in 0..EVENTS {
        let pad = "z".repeat(20_000 + (i as usize * 9_973) % 40_000);
        hub.publish("metrics", "tick", serde_json::json!({"i": i, "pad": pad}))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for seq in 1..=EVENTS {
        let message = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("a whole frame");
        let Message::Text(text) = message else {
            panic!("expected an event, got {message:?}");
        };
        let event: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(event["seq"], seq);
        assert_eq!(event["data"]["i"], seq - 1);
    }
    // The connection is still in step: the next event comes too, and a ping is answered.
    hub.publish("metrics", "tick", serde_json::json!("after"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut client).await["seq"], EVENTS + 1);
    client
        .send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut client).await["type"], "pong");
    assert_eq!(hub.stats().slow_consumers_closed, 0);
}

/// A room large enough to be written by several threads at once (a part per core
/// from 256 readers each): each reader still gets every event once, in order, and the
/// parts together reach every reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_room_written_by_several_threads_delivers_in_order() {
    const READERS: usize = 600;
    const EVENTS: u64 = 20;
    let (hub, tokens, addr) = setup(
        true,
        false,
        HubConfig {
            max_connections_per_user: READERS,
            max_connections: READERS,
            ..HubConfig::default()
        },
    )
    .await;
    let token = tokens.admin();
    let mut clients = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let mut client = ws(addr, Some(&token)).await;
        subscribe(&mut client, "metrics", None).await;
        clients.push(client);
    }
    let mut readers = JoinSet::new();
    for client in clients {
        readers.spawn(read_in_order(client, &["metrics"], EVENTS, u64::MAX));
    }
    for i in 0..EVENTS {
        hub.publish("metrics", "tick", serde_json::json!(i))
            .await
            .unwrap();
    }
    for events in readers.join_all().await {
        assert_eq!(events, EVENTS);
    }
    let stats = hub.stats();
    assert_eq!(stats.delivered, EVENTS * READERS as u64);
    assert!(stats.written_directly > 0, "{stats:?}");
}
