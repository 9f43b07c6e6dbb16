//! Abuse protection through the whole server: rate limits on sign-in, the `security`
//! room, the body deadline, the connection caps and the Redis outage policy.

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use http::{Method, StatusCode};
use support::{Running, next_json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use upcoach_core::config::ServiceUrl;
use upcoach_core::event::{Event, EventKind};
use upcoach_server::{Options, ServerConfig};
use upcoach_testing::{FaultProxy, RedisPrefix};

const WAIT: Duration = Duration::from_secs(10);

fn dev() -> Options {
    Options {
        dev: true,
        ..Options::default()
    }
}

async fn admin_token(server: &Running) -> String {
    let answer = server.post("/dev/token", r#"{"roles":["admin"]}"#).await;
    answer.json["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_refresh_flood_is_limited_detected_blocked_and_shown_in_the_security_room() {
    let server = Running::start(ServerConfig::default(), dev()).await;
    let token = admin_token(&server).await;
    let url = format!(
        "ws://{}/api/dashboard/realtime/ws?access_token={token}",
        server.addr
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    for room in ["security", "alerts"] {
        let subscribe = format!(r#"{{"type":"subscribe","room":"{room}"}}"#);
        ws.send(Message::Text(subscribe.into())).await.unwrap();
        assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    }

    // The reproduction: 120 bogus refreshes from one address.
    let mut statuses = Vec::new();
    let mut last_retry = 0u64;
    for _ in 0..120 {
        let answer = server
            .post("/auth/refresh", r#"{"refresh_token":"bogus"}"#)
            .await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(answer.json["error"]["code"], "rate_limited");
            assert!(answer.headers.contains_key("ratelimit-policy"));
            last_retry = answer.headers["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
        }
        statuses.push(answer.status);
    }
    // The first failures are answered; brute-force detection (10 failures from one
    // address) then blocks the address for 15 minutes, before the 60-a-minute budget
    // would have run out.
    assert!(
        statuses[..10]
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED),
        "{statuses:?}"
    );
    let answered = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    assert!(
        answered < 60,
        "blocked before the budget ran out: {answered} answered"
    );
    assert_eq!(statuses[119], StatusCode::TOO_MANY_REQUESTS);
    assert!(
        last_retry > 600,
        "the block, not the budget, refuses: retry after {last_retry} s"
    );

    // The rooms hear about it, and every row carries the client's address.
    let (mut types, mut alert) = (Vec::new(), None);
    while alert.is_none() || !types.iter().any(|t| t == "rate_limited") {
        let event = next_json(&mut ws).await;
        if event["type"] != "event" {
            continue;
        }
        match event["room"].as_str().unwrap() {
            "security" if event["event"] == "security_event" => {
                assert_eq!(event["data"]["ip_address"], "127.0.0.1", "{event}");
                types.push(event["data"]["event_type"].as_str().unwrap().to_owned());
            }
            "alerts" => alert = Some(event["data"].clone()),
            _ => {}
        }
    }
    let alert = alert.unwrap();
    assert_eq!(alert["detector"], "brute_force_address", "{alert}");
    assert!(types.iter().any(|t| t == "refresh_failed"), "{types:?}");
    let rows = server
        .app
        .event_log()
        .recent(EventKind::Security, 1000)
        .await
        .unwrap();
    let count = |kind: &str| {
        rows.iter()
            .filter(|e| matches!(e, Event::Security(s) if s.event_type == kind))
            .count()
    };
    assert_eq!(
        count("rate_limited"),
        1,
        "one event per address and window, not one per 429"
    );
    assert!(
        count("refresh_failed") <= 11,
        "failures past 10 a minute are counted, not stored"
    );
    for row in &rows {
        let Event::Security(row) = row else { continue };
        assert_eq!(
            row.ip_address,
            Some("127.0.0.1".parse().unwrap()),
            "{row:?}"
        );
    }
    let alerts = server
        .app
        .event_log()
        .recent(EventKind::Alert, 10)
        .await
        .unwrap();
    assert_eq!(
        alerts.len(),
        1,
        "a system_alerts row, not repeated while open"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_trickled_body_gets_408_and_its_connection_back() {
    let server = Running::start(ServerConfig::default(), dev()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = "POST /dev/token HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    // One more byte every 2 s: each arrives well within any idle timeout.
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                n = stream.read(&mut buf) => {
                    let n = n.unwrap();
                    if n == 0 { break; }
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") { break; }
                }
                () = tokio::time::sleep(Duration::from_secs(2)) => {
                    let _ = stream.write_all(b" ").await;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("answered in time");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(9) && elapsed < Duration::from_secs(15),
        "{elapsed:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn connections_are_capped_per_address() {
    let mut config = ServerConfig::default();
    config.limits.max_connections_per_address = 3;
    let server = Running::start(config, Options::default()).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // The fourth is answered 429 and closed without being read.
    let mut fourth = TcpStream::connect(server.addr).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(WAIT, fourth.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(text.contains("too_many_connections_from_address"));

    // A closed connection gives its place back.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = server.get("/health").await;
    assert_eq!(answer.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_cut_sign_in_fails_closed_and_the_rest_keeps_working() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let proxy = FaultProxy::start(upcoach_testing::service_addr(prefix.url())).await;
    let mut config = ServerConfig::default();
    config.cache.prefix = prefix.prefix().trim_end_matches(':').to_owned();
    config.services.redis_url = Some(
        ServiceUrl::parse(
            &upcoach_testing::url_via(prefix.url(), proxy.addr()),
            &["redis"],
        )
        .unwrap(),
    );
    let server = Running::start(config, dev()).await;
    let token = admin_token(&server).await;
    let refresh = server
        .post("/auth/refresh", r#"{"refresh_token":"bogus"}"#)
        .await;
    assert_eq!(refresh.status, StatusCode::UNAUTHORIZED, "{}", refresh.json);
    assert!(
        refresh.headers.contains_key("ratelimit"),
        "counted in Redis"
    );

    proxy.cut();
    let refresh = server
        .post("/auth/refresh", r#"{"refresh_token":"bogus"}"#)
        .await;
    assert_eq!(
        refresh.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refresh.json
    );
    assert_eq!(refresh.json["error"]["code"], "rate_limiter_unavailable");
    let authorize = server.get("/auth/google/authorize?platform=web").await;
    assert_eq!(authorize.status, StatusCode::SERVICE_UNAVAILABLE);
    // A broadcast cannot be numbered without Redis: refused, not dropped.
    let started = Instant::now();
    let broadcast = support::request_with(
        server.addr,
        Method::POST,
        "/api/dashboard/realtime/broadcast/public:x",
        Some(r#"{"event":"note","data":{}}"#),
        Some(&token),
    )
    .await;
    assert_eq!(
        broadcast.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        broadcast.json
    );
    assert_eq!(broadcast.json["error"]["code"], "broker_unavailable");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Routes without a fail-closed rule keep answering.
    let me = support::request_with(server.addr, Method::GET, "/auth/me", None, Some(&token)).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.json);
    let jwks = server.get("/.well-known/jwks.json").await;
    assert_eq!(jwks.status, StatusCode::OK);
    let sse_path = format!("/api/dashboard/realtime/sse?rooms=public:x&access_token={token}");
    let mut sse = TcpStream::connect(server.addr).await.unwrap();
    sse.write_all(format!("GET {sse_path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, sse.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    // The realtime broker itself needs Redis; the rate limit does not stand in its way.
    assert!(
        !head.contains("rate_limiter_unavailable"),
        "realtime connects fall back to a local count: {head}"
    );
    assert!(server.app.limits().stats().fell_back >= 1);

    proxy.restore();
    server.stop().await;
}
