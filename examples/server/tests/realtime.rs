//! The realtime routes of the reference server: broadcast, status, WebSocket and SSE
//! through the whole service stack, the `metrics` snapshot and the `alerts` room.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::SinkExt;
use http::{Method, StatusCode};
use support::Running;
use tokio_tungstenite::tungstenite::Message;
use upcoach_core::event::AlertLevel;
use upcoach_perf::{AlertRule, Breach};
use upcoach_server::{Options, ServerConfig};

const WAIT: Duration = Duration::from_secs(10);

async fn dev_token(server: &Running, roles: &str) -> String {
    let answer = server
        .post("/dev/token", &format!(r#"{{"roles":{roles}}}"#))
        .await;
    answer.json["access_token"].as_str().unwrap().to_owned()
}

async fn broadcast(
    server: &Running,
    room: &str,
    body: &str,
    token: Option<&str>,
) -> support::Answer {
    let path = format!("/api/dashboard/realtime/broadcast/{room}");
    support::request_with(server.addr, Method::POST, &path, Some(body), token).await
}

use support::{Ws, next_json, ws};

async fn send(ws: &mut Ws, value: serde_json::Value) {
    ws.send(Message::Text(value.to_string().into()))
        .await
        .unwrap();
}

#[tokio::test]
async fn broadcast_and_status_follow_the_api() {
    let server = Running::start(
        ServerConfig::default(),
        Options {
            dev: true,
            ..Options::default()
        },
    )
    .await;
    let admin = dev_token(&server, r#"["admin"]"#).await;
    let coach = dev_token(&server, r#"["coach"]"#).await;
    let body = r#"{"event":"posted","data":{"id":1}}"#;

    let first = broadcast(&server, "public:news", body, Some(&admin)).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(
        first.json,
        serde_json::json!({"room": "public:news", "seq": 1})
    );
    assert_eq!(
        broadcast(&server, "public:news", body, Some(&admin))
            .await
            .json["seq"],
        2
    );

    assert_eq!(
        broadcast(&server, "public:news", body, Some(&coach))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        broadcast(&server, "public:news", body, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let reserved = broadcast(&server, "public:news", r#"{"event":"reset"}"#, Some(&admin)).await;
    assert_eq!(
        (reserved.status, reserved.json["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_event"))
    );
    let bad_room = broadcast(&server, "a%20b", body, Some(&admin)).await;
    assert_eq!(
        (bad_room.status, bad_room.json["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_room"))
    );
    let not_json = broadcast(&server, "public:news", "{", Some(&admin)).await;
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST);

    let status = support::request_with(
        server.addr,
        Method::GET,
        "/api/dashboard/realtime/status",
        None,
        Some(&admin),
    )
    .await;
    assert_eq!(status.status, StatusCode::OK);
    assert!(
        status.json["node_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    assert!(status.json["uptime_s"].is_u64());
    assert_eq!(
        status.json["connections"],
        serde_json::json!({"ws": 0, "sse": 0})
    );
    assert_eq!(
        status.json["broker"],
        serde_json::json!({"kind": "memory", "connected": true})
    );
    assert!(status.json["rooms"].is_array());
    let refused = support::request_with(
        server.addr,
        Method::GET,
        "/api/dashboard/realtime/status",
        None,
        Some(&coach),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    server.stop().await;
}

#[tokio::test]
async fn websocket_clients_get_broadcasts_and_the_metrics_snapshot() {
    let server = Running::start(
        ServerConfig::default(),
        Options {
            dev: true,
            ..Options::default()
        },
    )
    .await;
    let admin = dev_token(&server, r#"["admin"]"#).await;
    broadcast(
        &server,
        "public:news",
        r#"{"event":"posted","data":1}"#,
        Some(&admin),
    )
    .await;

    let mut client = ws(&server, &admin).await;
    send(
        &mut client,
        serde_json::json!({"type": "subscribe", "room": "public:news", "since": 0}),
    )
    .await;
    let subscribed = next_json(&mut client).await;
    let epoch = subscribed["epoch"].as_u64().expect("the room's epoch");
    assert_ne!(epoch, 0);
    assert_eq!(
        subscribed,
        serde_json::json!({"type": "subscribed", "room": "public:news", "seq": 1, "epoch": epoch})
    );
    assert_eq!(
        next_json(&mut client).await["data"],
        1,
        "replayed from history"
    );
    broadcast(
        &server,
        "public:news",
        r#"{"event":"posted","data":2}"#,
        Some(&admin),
    )
    .await;
    let live = next_json(&mut client).await;
    assert_eq!(
        (live["seq"].as_u64(), live["data"].as_u64()),
        (Some(2), Some(2))
    );

    // The snapshot ticker published once at start; `since: 0` replays it.
    send(
        &mut client,
        serde_json::json!({"type": "subscribe", "room": "metrics", "since": 0}),
    )
    .await;
    assert_eq!(next_json(&mut client).await["type"], "subscribed");
    let snapshot = next_json(&mut client).await;
    assert_eq!(
        (snapshot["room"].as_str(), snapshot["event"].as_str()),
        (Some("metrics"), Some("metrics"))
    );
    for field in ["overall", "process", "alerts", "cache", "realtime"] {
        assert!(
            snapshot["data"].get(field).is_some(),
            "{field} in {snapshot}"
        );
    }

    let dashboard = support::request_with(
        server.addr,
        Method::GET,
        "/api/dashboard/realtime/metrics",
        None,
        Some(&admin),
    )
    .await;
    assert_eq!(
        dashboard.json["realtime"]["ws_connections"], 1,
        "the JSON snapshot counts the open socket"
    );
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn alert_transitions_reach_the_alerts_room_over_sse() {
    let mut rule = AlertRule::new(
        "too_many_connections",
        upcoach_perf::alert::metrics::ACTIVE_CONNECTIONS,
        Breach::Above,
        3.0,
        AlertLevel::Warning,
    );
    rule.for_duration = Duration::ZERO;
    let options = Options {
        dev: true,
        alert_rules: Some(vec![rule]),
        ..Options::default()
    };
    let server = Running::start(ServerConfig::default(), options).await;
    let admin = dev_token(&server, r#"["admin"]"#).await;

    let bearer = format!("Bearer {admin}");
    let response = support::open_stream(
        server.addr,
        "/api/dashboard/realtime/sse?rooms=alerts",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();

    server.app.perf().tick(&HashMap::from([(
        upcoach_perf::alert::metrics::ACTIVE_CONNECTIONS,
        10.0,
    )]));
    let mut text = String::new();
    while !text.contains("event: alert") || !text.ends_with("\n\n") {
        use http_body_util::BodyExt;
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("an alert in time")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    let record = text
        .split("\n\n")
        .find(|r| r.contains("event: alert"))
        .unwrap();
    assert!(record.contains("id: alerts=1"), "{record}");
    let data = record
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    let data: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(data["data"]["rule"], "too_many_connections");
    assert_eq!(data["data"]["state"], "firing");
    drop(body);
    server.app.hub().shutdown(Duration::from_secs(5)).await;
    server.stop().await;
}
