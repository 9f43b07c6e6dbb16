//! How connections end, on both transports: a stream cut off as too slow gives its
//! place back even when its client never reads again, shutdown is not held up by one,
//! the one timer of a WebSocket still serves the auth timeout, the heartbeat, the
//! token's expiry and its refresh, and every end is recorded with its reason.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use upcoach_core::event::{EventKind, EventLog, MemoryEventLog};
use upcoach_core::{Role, UserId};
use upcoach_realtime::{HistoryLimits, Hub, HubConfig, MemoryBroadcaster};

async fn setup(config: HubConfig) -> (Hub, Arc<Tokens>, Arc<MemoryEventLog>, std::net::SocketAddr) {
    let tokens = Arc::new(Tokens::default());
    let log = Arc::new(MemoryEventLog::default());
    let broadcaster = MemoryBroadcaster::new(
        HistoryLimits::default(),
        Arc::new(upcoach_core::SystemClock),
    );
    let hub = Hub::builder(Arc::new(broadcaster), tokens.clone())
        .events(log.clone())
        .config(config)
        .build();
    let addr = serve(hub.clone()).await;
    (hub, tokens, log, addr)
}

/// Waits until `done` holds (the server side runs on its own tasks).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn readers(hub: &Hub, room: &str) -> usize {
    hub.status()
        .rooms
        .into_iter()
        .find(|r| r.room == room)
        .map_or(0, |r| r.subscribers)
}

/// An SSE request on a socket with a small receive buffer that is never read: a
/// client whose tab froze, or one that stalls on purpose.
async fn stuck_sse(addr: std::net::SocketAddr, rooms: &str, token: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!(
        "GET /sse?rooms={rooms} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Floods `room` with large events until the hub has cut off one slow consumer.
async fn flood_until_cut_off(hub: &Hub, room: &str) {
    let payload = "x".repeat(60 * 1024);
    for _ in 0..2000 {
        if hub.stats().slow_consumers_closed >= 1 {
            return;
        }
        hub.publish(room, "tick", serde_json::json!(payload))
            .await
            .unwrap();
        tokio::task::yield_now().await;
    }
    panic!("the stuck client was never cut off as a slow consumer");
}

/// The reasons of the `disconnect` records.
async fn disconnect_reasons(log: &MemoryEventLog) -> Vec<String> {
    log.recent(EventKind::WebSocket, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|row| match row {
            upcoach_core::event::Event::WebSocket(e) if e.event_type == "disconnect" => {
                Some(e.metadata["reason"].as_str().unwrap_or_default().to_owned())
            }
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Regressions
// ---------------------------------------------------------------------------------

/// Before 8d9ce69 a stream whose queue filled ended on its own task ("too slow") and
/// gave back its place and its user's count at once, whatever hyper still held. As a
/// pull body it is only advanced when hyper can write: a client that stops reading
/// keeps both until it reads again or its TCP connection dies.
#[tokio::test]
async fn a_stuck_sse_stream_cut_off_as_too_slow_gives_its_place_back() {
    let (hub, tokens, log, addr) = setup(HubConfig {
        queue_capacity: 16,
        max_connections_per_user: 1,
        ..HubConfig::default()
    })
    .await;
    let me = UserId::new();
    let token = tokens.issue(me, &[Role::ADMIN], Duration::from_secs(900));
    let _stuck = stuck_sse(addr, "metrics", &token).await;
    eventually("the stuck stream reads the room", || {
        readers(&hub, "metrics") == 1
    })
    .await;
    flood_until_cut_off(&hub, "metrics").await;
    assert_eq!(readers(&hub, "metrics"), 0, "no longer fed");
    // The hub decided the connection is over: its place must come back.
    eventually("the cut-off stream's place given back", || {
        hub.status().connections.sse == 0
    })
    .await;
    assert!(
        disconnect_reasons(&log)
            .await
            .iter()
            .any(|r| r == "too slow: the send queue filled"),
        "its disconnect recorded"
    );
    // The same user (limit 1) can open a stream again.
    let auth = format!("Bearer {token}");
    let again = sse(addr, "rooms=metrics", &[("authorization", &auth)]).await;
    assert_eq!(again.status, 200, "the user's count was given back");
}

/// `hub.shutdown` waits for every place: a cut-off stream that still holds one makes it
/// wait for its whole timeout (and report the stream as still open).
#[tokio::test]
async fn shutdown_is_not_held_up_by_a_stuck_sse_stream_that_was_cut_off() {
    let (hub, tokens, _log, addr) = setup(HubConfig {
        queue_capacity: 16,
        ..HubConfig::default()
    })
    .await;
    let _stuck = stuck_sse(addr, "metrics", &tokens.admin()).await;
    eventually("the stuck stream reads the room", || {
        readers(&hub, "metrics") == 1
    })
    .await;
    flood_until_cut_off(&hub, "metrics").await;
    assert_eq!(
        hub.shutdown(Duration::from_secs(3)).await,
        0,
        "every connection gone in time"
    );
}

// ---------------------------------------------------------------------------------
// Checked, and still as before
// ---------------------------------------------------------------------------------

/// A socket without a token that keeps talking (each message resets the one timer)
/// still has to authenticate within the auth timeout.
#[tokio::test]
async fn a_pending_socket_that_keeps_talking_still_times_out() {
    let (_hub, _tokens, _log, addr) = setup(HubConfig {
        auth_timeout: Duration::from_millis(800),
        ws_ping_interval: Duration::from_millis(100),
        ws_pong_timeout: Duration::from_secs(5),
        ..HubConfig::default()
    })
    .await;
    let mut pending = ws(addr, None).await;
    let started = tokio::time::Instant::now();
    let code = loop {
        send(&mut pending, serde_json::json!({"type": "ping"})).await;
        let message = tokio::time::timeout(WAIT, pending.next())
            .await
            .expect("an answer in time");
        match message {
            Some(Ok(Message::Close(frame))) => {
                break frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()));
            }
            Some(Ok(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Some(Err(_)) | None => break None,
        }
        assert!(started.elapsed() < WAIT, "never timed out");
    };
    assert_eq!(code, Some((4001, "token_missing".to_owned())));
}

/// Pings (answered) and the token's expiry share one timer: pings go on, the client is
/// not dropped for them, and the expiry still closes 4001.
#[tokio::test]
async fn pings_answered_then_the_token_expiry_closes_4001() {
    let (hub, tokens, log, addr) = setup(HubConfig {
        // The pong timeout below the interval: the next ping is due at the later of
        // the two after the last one (as before the merge).
        ws_ping_interval: Duration::from_millis(300),
        ws_pong_timeout: Duration::from_millis(250),
        ..HubConfig::default()
    })
    .await;
    let token = tokens.issue(UserId::new(), &[Role::ADMIN], Duration::from_millis(2000));
    let mut client = ws(addr, Some(&token)).await;
    subscribe(&mut client, "metrics", None).await;
    let mut pings = 0;
    let close = loop {
        match tokio::time::timeout(WAIT, client.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Close(frame))) => {
                break frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert_eq!(close, Some((4001, "token_expired".to_owned())));
    assert!(pings >= 3, "pings went on until the expiry ({pings})");
    drop(client);
    eventually("gone", || hub.connections() == 0).await;
    assert!(
        disconnect_reasons(&log)
            .await
            .contains(&"token_expired".to_owned())
    );
}

/// A refresh moves the deadline to the new token's expiry, and that expiry is enforced
/// in turn (the timer is re-armed, not left off).
#[tokio::test]
async fn a_refresh_moves_the_deadline_and_the_new_expiry_still_closes() {
    let (_hub, tokens, _log, addr) = setup(HubConfig::default()).await;
    let me = UserId::new();
    let mut client = ws(
        addr,
        Some(&tokens.issue(me, &[Role::ADMIN], Duration::from_millis(800))),
    )
    .await;
    subscribe(&mut client, "metrics", None).await;
    let second = tokens.issue(me, &[Role::ADMIN], Duration::from_millis(2500));
    send(
        &mut client,
        serde_json::json!({"type": "auth", "token": second}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    send(&mut client, serde_json::json!({"type": "ping"})).await;
    assert_eq!(
        recv(&mut client).await["type"],
        "pong",
        "open past the first expiry"
    );
    assert_eq!(
        closed(&mut client).await,
        Some(4001),
        "closed at the second expiry"
    );
}

/// A signed-in socket that reads no room is closed 1000 on the heartbeat's schedule.
#[tokio::test]
async fn an_idle_socket_is_closed_1000() {
    let (_hub, tokens, _log, addr) = setup(HubConfig {
        ws_ping_interval: Duration::from_millis(300),
        ws_pong_timeout: Duration::from_millis(250),
        idle_timeout: Duration::from_millis(700),
        ..HubConfig::default()
    })
    .await;
    let mut client = ws(addr, Some(&tokens.admin())).await;
    assert_eq!(closed(&mut client).await, Some(1000));
}

/// A socket without a token that answers pings is still closed at the auth timeout.
#[tokio::test]
async fn a_pending_socket_answering_pings_still_hits_the_auth_timeout() {
    let (_hub, _tokens, _log, addr) = setup(HubConfig {
        ws_ping_interval: Duration::from_millis(100),
        auth_timeout: Duration::from_millis(700),
        ..HubConfig::default()
    })
    .await;
    let mut pending = ws(addr, None).await;
    assert_eq!(closed(&mut pending).await, Some(4001));
}

/// The SSE ends and their records: the token's expiry, a client going away, and the
/// shutdown, each with its reason; a gzip stream ended by the shutdown is a whole gzip
/// member (its trailer came).
#[tokio::test]
async fn sse_ends_are_recorded_with_their_reasons_and_gzip_is_finished() {
    let (hub, tokens, log, addr) = setup(HubConfig::default()).await;
    // The token's expiry.
    let short = tokens.issue(UserId::new(), &[Role::ADMIN], Duration::from_millis(700));
    let auth = format!("Bearer {short}");
    let mut expiring = sse(addr, "rooms=metrics", &[("authorization", &auth)]).await;
    while expiring.next().await.is_some() {}
    // A client that goes away.
    let auth = format!("Bearer {}", tokens.admin());
    let mut leaving = sse(addr, "rooms=metrics", &[("authorization", &auth)]).await;
    leaving.next().await.unwrap();
    drop(leaving);
    eventually("the leaving client noticed", || {
        hub.status().connections.sse == 0
    })
    .await;
    // The shutdown, on a gzip stream read raw.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = hyper::Request::get("/sse?rooms=metrics")
        .header("host", addr.to_string())
        .header("authorization", &auth)
        .header("accept-encoding", "gzip")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let body =
        tokio::spawn(async move { response.into_body().collect().await.unwrap().to_bytes() });
    eventually("the gzip stream open", || hub.status().connections.sse == 1).await;
    assert_eq!(hub.shutdown(Duration::from_secs(5)).await, 0);
    let body = tokio::time::timeout(WAIT, body).await.unwrap().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut text)
        .expect("a whole gzip member, trailer included");
    assert!(text.starts_with("retry: "), "{text}");
    let reasons = disconnect_reasons(&log).await;
    for reason in ["token_expired", "client went away", "server shutting down"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} in {reasons:?}"
        );
    }
}

/// Rooms matched by pointer, then by text: after an unsubscribe and a subscribe again
/// the events of the room still arrive once each; another room's events do not leak.
#[tokio::test]
async fn resubscribing_and_neighbouring_rooms_still_match_by_name() {
    let (hub, tokens, _log, addr) = setup(HubConfig::default()).await;
    let mut client = ws(addr, Some(&tokens.admin())).await;
    subscribe(&mut client, "metrics", None).await;
    send(
        &mut client,
        serde_json::json!({"type": "unsubscribe", "room": "metrics"}),
    )
    .await;
    let other = tokens.admin();
    let mut keeper = ws(addr, Some(&other)).await;
    subscribe(&mut keeper, "metrics", None).await;
    subscribe(&mut client, "metrics", None).await;
    hub.publish("metrics.other", "tick", serde_json::json!(0))
        .await
        .unwrap();
    hub.publish("metrics", "tick", serde_json::json!(1))
        .await
        .unwrap();
    let event = recv(&mut client).await;
    assert_eq!(
        (event["room"].as_str(), event["data"].as_i64()),
        (Some("metrics"), Some(1))
    );
    send(&mut client, serde_json::json!({"type": "ping"})).await;
    assert_eq!(
        recv(&mut client).await["type"],
        "pong",
        "nothing else in between"
    );
}
