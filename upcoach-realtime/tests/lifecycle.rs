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

/// `GET /sse?rooms=metrics` asking for gzip, with `authorization`, over `stream`; the
/// response once its head is in (gzip-encoded), its body still to read.
async fn gzip_sse(
    stream: TcpStream,
    addr: std::net::SocketAddr,
    authorization: &str,
) -> hyper::Response<hyper::body::Incoming> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = hyper::Request::get("/sse?rooms=metrics")
        .header("host", addr.to_string())
        .header("authorization", authorization)
        .header("accept-encoding", "gzip")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.headers()["content-encoding"], "gzip");
    response
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
    let mut stream = small_buffer(addr).await;
    let request = format!(
        "GET /sse?rooms={rooms} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// A connection to `addr` with a 4 KiB receive buffer: what it does not read stays in
/// the server's buffers, and the server's writes soon wait.
async fn small_buffer(addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
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

// ---------------------------------------------------------------------------------
// Clients that stop reading
// ---------------------------------------------------------------------------------

/// A WebSocket on a socket with a small receive buffer that this side reads only when
/// told to: the client that stops reading.
async fn ws_small_buffer(addr: std::net::SocketAddr, token: Option<&str>) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stream = small_buffer(addr).await;
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
        .await
        .unwrap()
        .0
}

/// Writes `{"type":"ping"}` frames as fast as the server takes them, reading nothing,
/// until aborted: every one asks for a reply the client never collects.
fn flood_pings(ws: Ws) -> tokio::task::JoinHandle<()> {
    let tokio_tungstenite::MaybeTlsStream::Plain(mut stream) = ws.into_inner() else {
        unreachable!("plain TCP");
    };
    // A masked client text frame; a zero mask leaves the payload as it is.
    let payload = br#"{"type":"ping"}"#;
    let mut frame = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    let burst = frame.repeat(4096);
    tokio::spawn(async move { while stream.write_all(&burst).await.is_ok() {} })
}

/// Before this test a client without a token that sent pings and never read the
/// pongs blocked its connection in the reply's write: the one timer was never polled
/// again, so the auth timeout never came and the pending place was held for good.
#[tokio::test]
async fn a_pending_socket_that_never_reads_its_replies_gives_its_place_back() {
    let (hub, _tokens, _log, addr) = setup(HubConfig {
        // Far off: the write's own bound must end it, not the auth timeout.
        auth_timeout: Duration::from_secs(60),
        ws_pong_timeout: Duration::from_millis(300),
        ..HubConfig::default()
    })
    .await;
    let pending = ws_small_buffer(addr, None).await;
    eventually("pending", || hub.stats().pending_auth_connections == 1).await;
    let flood = flood_pings(pending);
    eventually("the stuck socket dropped", || {
        hub.stats().pending_auth_connections == 0
    })
    .await;
    flood.abort();
}

/// The same for a signed-in reader with events in flight and nothing more coming: no
/// queue fills, so no slow-consumer close; the write's bound ends it, and the end is
/// recorded.
#[tokio::test]
async fn a_reader_that_stops_reading_mid_event_is_dropped_and_recorded() {
    let (hub, tokens, log, addr) = setup(HubConfig {
        ws_pong_timeout: Duration::from_millis(300),
        ..HubConfig::default()
    })
    .await;
    let mut client = ws_small_buffer(addr, Some(&tokens.admin())).await;
    subscribe(&mut client, "metrics", None).await;
    let payload = "x".repeat(60 * 1024);
    for _ in 0..64 {
        hub.publish("metrics", "tick", serde_json::json!(payload))
            .await
            .unwrap();
    }
    eventually("the stuck reader dropped", || hub.connections() == 0).await;
    assert_eq!(hub.stats().slow_consumers_closed, 0, "not cut off as slow");
    assert!(
        disconnect_reasons(&log)
            .await
            .contains(&"write_timeout".to_owned())
    );
    drop(client);
}

/// A client without a token that talks without pause (its socket is never idle, so
/// the one timer may never get its turn) is still closed at the auth timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_socket_that_never_pauses_still_times_out() {
    let (_hub, _tokens, _log, addr) = setup(HubConfig {
        auth_timeout: Duration::from_millis(500),
        ..HubConfig::default()
    })
    .await;
    let client = ws(addr, None).await;
    let (mut sink, mut stream) = client.split();
    let talk = tokio::spawn(async move {
        use futures_util::SinkExt;
        let ping = Message::text(r#"{"type":"ping"}"#);
        while sink.feed(ping.clone()).await.is_ok() {
            if sink.flush().await.is_err() {
                break;
            }
        }
    });
    let started = tokio::time::Instant::now();
    let code = loop {
        match tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
        if started.elapsed() > WAIT {
            talk.abort();
            panic!("still open long past the auth timeout");
        }
    };
    talk.abort();
    assert_eq!(code, Some(4001));
}

/// A reader that keeps reading, only slowly, is not dropped because a batch took it
/// longer than the pong timeout: each step of a write is bounded, not the batch.
/// (The kernel wakes a blocked writer only once a good part of the socket's send
/// buffer has drained, up to megabytes on loopback: so the timeout here is seconds,
/// and the batch, about 9 MB read at 4 KiB a millisecond at most, takes longer.)
#[tokio::test]
async fn a_slow_but_steady_reader_is_not_dropped() {
    use tokio::io::AsyncReadExt;
    let (hub, tokens, log, addr) = setup(HubConfig {
        ws_pong_timeout: Duration::from_secs(3),
        ..HubConfig::default()
    })
    .await;
    let mut client = ws(addr, Some(&tokens.admin())).await;
    subscribe(&mut client, "metrics", None).await;
    let tokio_tungstenite::MaybeTlsStream::Plain(mut raw) = client.into_inner() else {
        unreachable!("plain TCP");
    };
    const EVENTS: usize = 150;
    let payload = "x".repeat(60 * 1024);
    for _ in 0..EVENTS {
        hub.publish("metrics", "tick", serde_json::json!(payload))
            .await
            .unwrap();
    }
    let started = tokio::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut total = 0usize;
    while total < EVENTS * 60 * 1024 {
        match raw.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        total >= EVENTS * 60 * 1024,
        "dropped after {total} bytes in {:?} while reading steadily: {:?} {:?}",
        started.elapsed(),
        hub.stats(),
        disconnect_reasons(&log).await,
    );
    assert_eq!(hub.connections(), 1);
}

/// A client that writes a whole 4 MiB frame before it reads anything can write it all
/// and then reads the close frame 1009. Before, the server closed its socket with the
/// rest of the frame unread: the kernel answered with a reset, the client's write
/// failed, and a client library reports 1006 without reading the frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_message_is_drained_and_the_client_reads_1009() {
    use tokio::io::AsyncReadExt;
    let (hub, tokens, _log, addr) = setup(HubConfig::default()).await;
    let client = ws(addr, Some(&tokens.admin())).await;
    let tokio_tungstenite::MaybeTlsStream::Plain(mut stream) = client.into_inner() else {
        unreachable!("plain TCP");
    };
    let len: u64 = 4 * 1024 * 1024;
    // A masked client text frame (a zero mask) with a 64-bit length.
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.resize(frame.len() + len as usize, b'x');
    tokio::time::timeout(WAIT, stream.write_all(&frame))
        .await
        .expect("written in time")
        .expect("the whole frame written, not reset");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    // 0x88: a close frame; its payload starts with the code.
    assert!(
        answer.len() >= 4 && answer[0] == 0x88,
        "a close frame: {answer:?}"
    );
    assert_eq!(u16::from_be_bytes([answer[2], answer[3]]), 1009);
    eventually("gone", || hub.connections() == 0).await;
}

/// On a connection an SSE stream took over, what the client sends is read and dropped,
/// up to 4 KiB; past that the stream ends. An SSE client sends nothing: without the
/// bound, a client could make the server read for it without end. (Through hyper's body
/// the server stops reading while the response runs.)
#[tokio::test]
async fn a_client_that_talks_after_its_sse_request_is_cut_off() {
    let (hub, tokens, log, addr) = setup(HubConfig::default()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /sse?rooms=metrics HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\r\n",
        tokens.admin()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    eventually("subscribed", || readers(&hub, "metrics") == 1).await;
    stream.write_all(&[b'x'; 1000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(hub.connections(), 1, "a few bytes are tolerated");
    let _ = stream.write_all(&[b'x'; 64 * 1024]).await;
    eventually("gone", || hub.connections() == 0).await;
    let reasons = disconnect_reasons(&log).await;
    assert!(
        reasons.contains(&"client sent data after its request".to_owned()),
        "{reasons:?}"
    );
}

/// `Hub::shutdown_on`: the accept loop's future resolves as soon as the signal comes
/// (the hub's shutdown runs in its own task), and `finished` says when every stream,
/// SSE streams holding their own connections included, has ended and been recorded.
#[tokio::test]
async fn shutdown_on_a_signal_lets_the_drain_start_and_says_when_streams_are_recorded() {
    let (hub, tokens, log, addr) = setup(HubConfig::default()).await;
    let auth = format!("Bearer {}", tokens.admin());
    let _stream = sse(addr, "rooms=metrics", &[("authorization", &auth)]).await;
    eventually("the stream is open", || hub.connections() == 1).await;
    let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
    let (stopping, realtime) = hub.shutdown_on(async move {
        let _ = signalled.await;
    });
    let _ = signal.send(());
    tokio::time::timeout(Duration::from_secs(1), stopping)
        .await
        .expect("the accept loop's future resolves at the signal");
    let left = tokio::time::timeout(WAIT, realtime.finished())
        .await
        .unwrap();
    assert_eq!(left, Some(0), "every stream ended in time");
    let reasons = disconnect_reasons(&log).await;
    assert!(
        reasons.contains(&"server shutting down".to_owned()),
        "{reasons:?}"
    );

    let (never, realtime) = hub.shutdown_on(std::future::pending());
    drop(never);
    assert_eq!(
        realtime.finished().await,
        None,
        "no signal, no shutdown to wait for"
    );
}

/// A stream whose server offers its connection but never hands it over (its offer kept
/// alive elsewhere) waits at most until its token's expiry, records that, and gives its
/// place back.
#[tokio::test]
async fn a_stream_whose_connection_never_comes_ends_at_the_token_expiry() {
    let (hub, tokens, log, _) = setup(HubConfig::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let offers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let served = hub.clone();
    let kept = offers.clone();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                let hub = served.clone();
                // Offered, but this server never hands a connection over.
                let offer = upcoach_core::http::ConnectionHandoff::new();
                kept.lock().unwrap().push(offer.clone());
                request.extensions_mut().insert(offer);
                async move { Ok::<_, std::convert::Infallible>(hub.sse(request).await) }
            },
        );
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    });
    let token = tokens.issue(UserId::new(), &[Role::ADMIN], Duration::from_millis(1500));
    let auth = format!("Bearer {token}");
    let stream = sse(addr, "rooms=metrics", &[("authorization", &auth)]).await;
    assert_eq!(stream.status, 200);
    eventually("the stream holds a place", || hub.connections() == 1).await;
    eventually("gone at the expiry", || hub.connections() == 0).await;
    let reasons = disconnect_reasons(&log).await;
    assert!(reasons.contains(&"token_expired".to_owned()), "{reasons:?}");
    assert_eq!(offers.lock().unwrap().len(), 1);
}

// The SSE tests run twice: `handed_over::` (upcoach's accept loop, the stream writes to
// its connection) and `through_the_body::` (a plain hyper loop).
on_both_servers! {
    /// Before 8d9ce69 a stream whose queue filled ended on its own task ("too slow") and
    /// gave back its place and its user's count at once, whatever hyper still held. As a
    /// pull body it is only advanced when hyper can write: a client that stops reading
    /// keeps both until it reads again or its TCP connection dies.
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

    /// The SSE ends and their records: the token's expiry, a client going away, and the
    /// shutdown, each with its reason; a gzip stream ended by the shutdown is a whole gzip
    /// member (its trailer came).
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
        let response = gzip_sse(stream, addr, &auth).await;
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

    /// Before this test an SSE stream whose client stopped reading waited in its send for
    /// good once no more events came (no queue filled, so no slow-consumer close): the
    /// token's expiry was never seen, and the stream kept its place past it.
    async fn a_stuck_sse_stream_still_ends_at_the_token_expiry() {
        let (hub, tokens, log, addr) = setup(HubConfig::default()).await;
        let token = tokens.issue(UserId::new(), &[Role::ADMIN], Duration::from_millis(1500));
        let _stuck = stuck_sse(addr, "metrics", &token).await;
        eventually("subscribed", || readers(&hub, "metrics") == 1).await;
        // One chunk each (the stream batches what is queued when it wakes): enough to
        // fill the chunks in flight, hyper's buffer and the socket's, far from the queue.
        let payload = "x".repeat(60 * 1024);
        for _ in 0..100 {
            hub.publish("metrics", "tick", serde_json::json!(payload))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        eventually("the stream ended", || readers(&hub, "metrics") == 0).await;
        assert_eq!(hub.stats().slow_consumers_closed, 0, "not cut off as slow");
        eventually("gone", || hub.connections() == 0).await;
        let reasons = disconnect_reasons(&log).await;
        assert!(reasons.contains(&"token_expired".to_owned()), "{reasons:?}");
    }

    /// A stuck client that resumes from far back is owed megabytes of replay: the
    /// first send waits, and must not outlive the token either (on a connection the
    /// stream took over, the first send once raced nothing and waited for ever).
    async fn a_stuck_client_resuming_a_long_replay_still_ends_at_the_token_expiry() {
        let (hub, tokens, log, addr) = setup(HubConfig {
            close_timeout: Duration::from_millis(200),
            ..HubConfig::default()
        })
        .await;
        // 12 MB: more than the socket buffers take, so the first send waits.
        let payload = "x".repeat(60 * 1024);
        for _ in 0..200 {
            hub.publish("metrics", "tick", serde_json::json!(payload))
                .await
                .unwrap();
        }
        let epoch = hub.broadcaster().head("metrics").await.unwrap().epoch;
        let token = tokens.issue(UserId::new(), &[Role::ADMIN], Duration::from_millis(1500));
        let mut stream = small_buffer(addr).await;
        let request = format!(
            "GET /sse?rooms=metrics HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\nlast-event-id: metrics=0@{epoch}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        eventually("the stream opened", || hub.connections() == 1).await;
        eventually("gone", || hub.connections() == 0).await;
        let reasons = disconnect_reasons(&log).await;
        assert!(reasons.contains(&"token_expired".to_owned()), "{reasons:?}");
    }

    /// A gzip stream that ends at the token's expiry while a send waits is still a whole
    /// gzip member: the send given up on had not fed the encoder (before, the chunk was
    /// compressed, then dropped, and the trailer's checksum counted it).
    async fn a_gzip_stream_ending_at_the_expiry_mid_send_is_still_whole() {
        let (hub, tokens, _log, addr) = setup(HubConfig::default()).await;
        let expiry = tokio::time::Instant::now() + Duration::from_millis(1500);
        let token = tokens.issue(UserId::new(), &[Role::ADMIN], Duration::from_millis(1500));
        let stream = small_buffer(addr).await;
        let response = gzip_sse(stream, addr, &format!("Bearer {token}")).await;
        // Random payloads (59 KiB, barely compressible), so that the stream's send really
        // waits, each made between two publishes (which spaces them out: one chunk each);
        // until just past the expiry.
        for _ in 0..400 {
            if tokio::time::Instant::now() > expiry + Duration::from_millis(200) {
                break;
            }
            let payload: String = (0..3800)
                .flat_map(|_| uuid::Uuid::new_v4().into_bytes())
                .map(|b| match b % 90 + 35 {
                    b'\\' => '~',
                    c => c as char,
                })
                .collect();
            hub.publish("metrics", "tick", serde_json::json!(payload))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Past the expiry the stream ends, its last send given up on; then read it all,
        // well within the close timeout the trailer is given.
        tokio::time::sleep_until(expiry + Duration::from_millis(500)).await;
        let body = tokio::time::timeout(WAIT, response.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut text)
            .expect("a whole gzip member, trailer included");
        assert!(text.ends_with("\n\n"), "whole records");
    }
}
