//! The crates on an axum Router, end to end: a browser signs in with Google (npm
//! `oauth2-mock-server`), and one broadcast reaches its WebSocket and its SSE stream.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use support::{Browser, RETURN_TO, send, urlencode};
use tokio_tungstenite::tungstenite::Message;
use upcoach_core::event::{Event, EventKind};
use upcoach_testing::OidcProvider;

const WAIT: Duration = Duration::from_secs(10);
const USER_AGENT: &str = "upcoach-axum-test/1.0";

#[tokio::test]
async fn a_signed_in_user_gets_a_broadcast_over_websocket_and_sse() {
    let Some(provider) = OidcProvider::start().await else {
        return;
    };
    let (addr, app) = support::start_axum(&provider, true).await;

    // Sign in: authorize → the provider → callback → 302 with a login code → exchange.
    let mut browser = Browser {
        addr,
        user_agent: USER_AGENT,
        cookie: None,
    };
    let query = format!("platform=web&return_to={}", urlencode(RETURN_TO));
    let landed = browser.sign_in(&query, &json!({"sub": "axum-user"})).await;
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.body);
    let back = landed.location();
    assert!(back.as_str().starts_with(RETURN_TO), "{back}");
    let code = back
        .query_pairs()
        .find(|(k, _)| k == "login_code")
        .unwrap()
        .1;
    let tokens = browser.exchange(&code).await;
    assert_eq!(tokens.status, StatusCode::OK, "{:?}", tokens.body);
    let user = tokens.json()["access_token"].as_str().unwrap().to_owned();

    // The sign-in's security event has the client's address and user agent.
    let events = app.events.recent(EventKind::Security, 100).await.unwrap();
    let login = events
        .iter()
        .find_map(|e| match e {
            Event::Security(e) if e.event_type == "login_success" => Some(e),
            _ => None,
        })
        .expect("a login_success event");
    assert_eq!(login.ip_address, Some(addr.ip()));
    assert_eq!(login.user_agent.as_deref(), Some(USER_AGENT));

    let dev = send(
        Method::POST,
        &format!("http://{addr}/dev/token"),
        &[("content-type", "application/json")],
        r#"{"roles":["admin"]}"#,
    )
    .await;
    assert_eq!(dev.status, StatusCode::OK, "{:?}", dev.body);
    let admin = dev.json()["access_token"].as_str().unwrap().to_owned();

    // The user listens on both transports.
    let url = format!("ws://{addr}/api/dashboard/realtime/ws?access_token={user}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket handshake");
    let subscribe = json!({"type": "subscribe", "room": "public:news"});
    ws.send(Message::Text(subscribe.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");

    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("/api/dashboard/realtime/sse?rooms=public:news")
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {user}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let sse = sender.send_request(request).await.unwrap();
    assert_eq!(sse.status(), StatusCode::OK);
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let mut sse = sse.into_body();

    // The admin broadcasts; the room is percent-encoded in the path.
    let body = r#"{"event":"posted","data":{"id":42}}"#;
    let bearer = format!("Bearer {admin}");
    let headers = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let path = format!("http://{addr}/api/dashboard/realtime/broadcast/public%3Anews");
    let sent = send(Method::POST, &path, &headers, body).await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{:?}", sent.body);
    assert_eq!(sent.json(), json!({"room": "public:news", "seq": 1}));
    let user_bearer = format!("Bearer {user}");
    let headers = [
        ("authorization", user_bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let refused = send(Method::POST, &path, &headers, body).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );

    let over_ws = next_json(&mut ws).await;
    assert_eq!(
        (
            &over_ws["room"],
            &over_ws["seq"],
            &over_ws["event"],
            &over_ws["data"]
        ),
        (
            &json!("public:news"),
            &json!(1),
            &json!("posted"),
            &json!({"id": 42})
        ),
        "{over_ws}"
    );
    let mut text = String::new();
    while !text.contains("event: posted") || !text.ends_with("\n\n") {
        let frame = tokio::time::timeout(WAIT, sse.frame())
            .await
            .expect("in time");
        if let Ok(data) = frame.expect("open").unwrap().into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    let record = text
        .split("\n\n")
        .find(|r| r.contains("event: posted"))
        .unwrap();
    assert!(record.contains("id: public:news=1"), "{record}");
    let data = record
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(data).unwrap()["data"],
        json!({"id": 42})
    );

    // The cache layer answers the admin's second status read; the timing layer
    // recorded requests under the templates axum matched.
    let bearer = format!("Bearer {admin}");
    let status_url = format!("http://{addr}/api/dashboard/realtime/status");
    let first = send(Method::GET, &status_url, &[("authorization", &bearer)], "").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert_eq!(first.json()["connections"], json!({"ws": 1, "sse": 1}));
    let second = send(Method::GET, &status_url, &[("authorization", &bearer)], "").await;
    assert_eq!(
        (&first.headers["x-cache"], &second.headers["x-cache"]),
        (&"MISS".parse().unwrap(), &"HIT".parse().unwrap())
    );
    let routes: Vec<String> = app
        .requests
        .snapshot()
        .into_iter()
        .map(|r| r.route)
        .collect();
    for template in [
        "/auth/{provider}/authorize",
        "/auth/{provider}/callback",
        "/api/dashboard/realtime/broadcast/{room}",
    ] {
        assert!(
            routes.iter().any(|r| r == template),
            "{template} in {routes:?}"
        );
    }
    drop((ws, sse));
    app.hub.shutdown(Duration::from_secs(5)).await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time");
        match message.expect("open").expect("ok") {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
