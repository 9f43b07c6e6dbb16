//! Resource bounds through the whole server: floods that arrive over HTTP are pushed
//! past each bound, and the tests assert the exact count held (not a memory reading),
//! the answer of the refused request, and that what was there keeps working.
//!
//! `cargo test -p upcoach-server --test bounds`

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use support::{Answer, Running, next_json};
use tokio_tungstenite::tungstenite::Message;
use upcoach_core::config::Settings;
use upcoach_server::{Options, ServerConfig};

const WAIT: Duration = Duration::from_secs(10);

fn dev() -> Options {
    Options {
        dev: true,
        ..Options::default()
    }
}

/// `POST /dev/token` with `body`.
async fn dev_token(server: &Running, body: Value) -> Answer {
    server
        .send(Method::POST, "/dev/token", Some(body), None)
        .await
}

/// An access token of a new user with `roles`.
async fn access(server: &Running, roles: &[&str]) -> String {
    let answer = dev_token(server, json!({ "roles": roles })).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    answer.json["access_token"].as_str().unwrap().to_owned()
}

/// Waits until `done` holds, for at most [`WAIT`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_sign_up_flood_stops_at_the_user_cap_and_members_keep_signing_in() {
    let mut config = ServerConfig::default();
    config.auth.memory_max_users = 20;
    config.auth.memory_max_sessions = 30;
    let server = Running::start(config, dev()).await;
    let stores = server
        .app
        .memory_auth()
        .expect("in-memory auth stores")
        .clone();

    // 60 sign-ups, one new account each: 20 made, 40 refused with a clear error.
    let mut members = Vec::new();
    for _ in 0..60 {
        let answer = dev_token(&server, json!({ "roles": [] })).await;
        match answer.status {
            StatusCode::OK => members.push(answer.json),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(answer.code(), "user_store_full", "{}", answer.json);
                let message = answer.json["error"]["message"].as_str().unwrap();
                assert!(message.contains("no new account"), "{message}");
            }
            other => panic!("{other}: {}", answer.json),
        }
    }
    assert_eq!(members.len(), 20);
    assert_eq!(stores.users.len(), 20);
    assert_eq!(stores.users.refused_full(), 40);
    let stats = stores.refresh.stats();
    assert_eq!((stats.families, stats.tokens), (20, 20));

    // Members still sign in (a new session of an existing account) and refresh.
    let first = &members[0];
    let id = first["user"]["id"].as_str().unwrap();
    let again = dev_token(&server, json!({ "sub": id, "roles": [] })).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.json);
    let refreshed = server.refresh(&first["refresh_token"], &[]).await;
    assert_eq!(refreshed.status, StatusCode::OK, "{}", refreshed.json);
    assert_eq!(stores.users.len(), 20);

    // Sessions have their own cap: 21 open now, 9 more fit, then refresh_store_full.
    let mut opened = 0;
    loop {
        let answer = dev_token(&server, json!({ "sub": id, "roles": [] })).await;
        if answer.status != StatusCode::OK {
            assert_eq!(
                (answer.status, answer.code().as_str()),
                (StatusCode::SERVICE_UNAVAILABLE, "refresh_store_full"),
                "{}",
                answer.json
            );
            break;
        }
        opened += 1;
        assert!(opened <= 9, "the session cap did not hold");
    }
    assert_eq!(opened, 9);
    assert_eq!(stores.refresh.stats().families, 30);

    // A sign-out makes room: the revoked session is the one that goes.
    let member = &members[1];
    let logout = server
        .send_text(
            Method::POST,
            "/auth/logout",
            Some(json!({ "refresh_token": member["refresh_token"] }).to_string()),
            member["access_token"].as_str(),
        )
        .await;
    assert_eq!(logout.status, StatusCode::NO_CONTENT, "{}", logout.json);
    let after = dev_token(&server, json!({ "sub": id, "roles": [] })).await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.json);
    let stats = stores.refresh.stats();
    assert_eq!((stats.families, stats.evicted_revoked), (30, 1));
    server.stop().await;
}

#[tokio::test]
async fn the_memory_store_caps_are_read_from_the_environment() {
    let read = |env: &[(&str, &str)]| {
        ServerConfig::from_lookup(|name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    };
    let config = read(&[
        ("AUTH_MEMORY_MAX_USERS", "5"),
        ("AUTH_MEMORY_MAX_SESSIONS", "6"),
        ("AUTH_MEMORY_MAX_REFRESH_TOKENS", "7"),
    ])
    .unwrap();
    assert_eq!(
        (
            config.auth.memory_max_users,
            config.auth.memory_max_sessions,
            config.auth.memory_max_refresh_tokens
        ),
        (5, 6, 7)
    );
    let stats = config.auth.memory_refresh_store().stats();
    assert_eq!((stats.max_families, stats.max_tokens), (6, 7));
    assert_eq!(config.auth.memory_user_store().max_users(), 5);
    for (name, value) in [
        ("AUTH_MEMORY_MAX_USERS", "0"),
        ("AUTH_MEMORY_MAX_SESSIONS", "lots"),
        ("AUTH_MEMORY_MAX_REFRESH_TOKENS", "100000001"),
    ] {
        let error = read(&[(name, value)]).unwrap_err().to_string();
        assert!(error.contains(name), "{error}");
    }
}

#[tokio::test]
async fn a_subscribe_flood_stops_at_the_rooms_per_connection_cap() {
    let server = Running::start(ServerConfig::default(), dev()).await;
    let token = access(&server, &[]).await;
    let max = server.app.hub().config().max_rooms_per_connection;
    assert_eq!(max, 32);
    let mut ws = support::ws(&server, &token).await;
    let mut subscribed = 0;
    for i in 0..(max + 40) {
        let subscribe = json!({"type": "subscribe", "room": format!("public:flood-{i}")});
        ws.send(Message::Text(subscribe.to_string().into()))
            .await
            .unwrap();
        let answer = next_json(&mut ws).await;
        if i < max {
            assert_eq!(answer["type"], "subscribed", "{answer}");
            subscribed += 1;
        } else {
            assert_eq!(
                (answer["type"].as_str(), answer["code"].as_str()),
                (Some("error"), Some("too_many_rooms")),
                "{answer}"
            );
        }
    }
    assert_eq!(subscribed, max);
    assert_eq!(server.app.hub().stats().rooms, max);
    // Refusals are not protocol misuse: the connection stays, and an unsubscribe
    // gives a place back.
    let leave = json!({"type": "unsubscribe", "room": "public:flood-0"});
    ws.send(Message::Text(leave.to_string().into()))
        .await
        .unwrap();
    let join = json!({"type": "subscribe", "room": "public:late"});
    ws.send(Message::Text(join.to_string().into()))
        .await
        .unwrap();
    loop {
        let answer = next_json(&mut ws).await;
        if answer["type"] == "subscribed" {
            assert_eq!(answer["room"], "public:late");
            break;
        }
        assert_ne!(answer["type"], "error", "{answer}");
    }
    assert_eq!(server.app.hub().stats().rooms, max);

    // One SSE stream: at most 32 rooms as well (and 64 names in all).
    let rooms: Vec<String> = (0..=max).map(|i| format!("public:s{i}")).collect();
    let path = format!("/api/dashboard/realtime/sse?rooms={}", rooms.join(","));
    let answer = server
        .send_text(Method::GET, &path, None, Some(&token))
        .await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (StatusCode::BAD_REQUEST, "too_many_rooms"),
        "{}",
        answer.json
    );
    let rooms: Vec<String> = (0..65).map(|i| format!("public:s{i}")).collect();
    let path = format!("/api/dashboard/realtime/sse?rooms={}", rooms.join(","));
    let answer = server
        .send_text(Method::GET, &path, None, Some(&token))
        .await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_rooms")
    );
    drop(ws);
    eventually("the flooding connection's rooms are gone", || {
        server.app.hub().stats().rooms == 0
    })
    .await;
    server.stop().await;
}

/// Reads an SSE body until a whole `event: reset` record has come; the record.
async fn read_reset(body: &mut hyper::body::Incoming) -> String {
    let mut text = String::new();
    loop {
        if let Some(record) = text
            .split("\n\n")
            .find(|r| r.contains("event: reset") && text.contains(&format!("{r}\n\n")))
        {
            return record.to_owned();
        }
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("a reset in time")
            .expect("the stream is open")
            .expect("a frame");
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
}

#[tokio::test]
async fn endless_sse_reconnects_with_stale_cursors_are_reset_limited_and_leave_nothing() {
    let server = Running::start(ServerConfig::default(), dev()).await;
    let token = access(&server, &[]).await;
    let bearer = format!("Bearer {token}");
    // History keeps the last 1,000 events of a room: 1,010 leave seq 1 behind it.
    for i in 0..1_010 {
        server
            .app
            .hub()
            .publish("public:news", "tick", json!({ "i": i }))
            .await
            .unwrap();
    }
    let quota = 60; // realtime.connect: 60 a minute from one address.
    let mut reasons = Vec::new();
    let mut limited = 0;
    for i in 0..(quota + 15) {
        // A cursor behind history, and one ahead of the room (a reset server's).
        let cursor = if i % 2 == 0 {
            "public:news=1"
        } else {
            "public:news=999999"
        };
        let response = support::open_stream(
            server.addr,
            "/api/dashboard/realtime/sse?rooms=public:news",
            &[("authorization", &bearer), ("last-event-id", cursor)],
        )
        .await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(response.headers().contains_key("retry-after"));
            limited += 1;
            continue;
        }
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let record = read_reset(&mut body).await;
        let data: Value = serde_json::from_str(
            record
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("a data line"),
        )
        .unwrap();
        assert_eq!(data["room"], "public:news", "{record}");
        // The reset's id is the room's head: a client that keeps it resumes cleanly.
        assert!(record.contains("id: public:news=1010"), "{record}");
        reasons.push(data["reason"].as_str().unwrap().to_owned());
    }
    assert_eq!(reasons.len(), quota);
    assert_eq!(limited, 15);
    assert!(
        reasons.iter().any(|r| r == "history_expired"),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r == "cursor_ahead_of_room"),
        "{reasons:?}"
    );
    let hub = server.app.hub();
    assert!(hub.stats().resets >= quota as u64, "{:?}", hub.stats());
    eventually("every reconnect's stream and room are gone", || {
        let stats = hub.stats();
        (stats.sse_connections, stats.rooms) == (0, 0)
    })
    .await;
    server.stop().await;
}

/// JSON nested `depth` deep: `[[[...]]]`.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn huge_and_deeply_nested_json_is_refused_on_every_json_route() {
    let server = Running::start(ServerConfig::default(), dev()).await;
    let admin = access(&server, &["admin"]).await;
    let issued = dev_token(&server, json!({ "roles": [] })).await;
    let user = issued.json["access_token"].as_str().unwrap().to_owned();
    // Every route that parses a JSON body, with the token it needs and its body limit.
    let json = upcoach_core::http::DEFAULT_JSON_LIMIT;
    let routes: [(&str, Option<&str>, usize); 7] = [
        ("/auth/refresh", None, json),
        ("/auth/exchange", None, json),
        ("/auth/logout", Some(&user), json),
        ("/auth/link/google", Some(&user), json),
        ("/dev/token", None, json),
        ("/api/cache/invalidate", Some(&admin), json),
        (
            "/api/dashboard/realtime/broadcast/public:news",
            Some(&admin),
            upcoach_realtime::PUBLISH_BODY_LIMIT,
        ),
    ];
    // 200 levels: past serde_json's 128; 8,000 fill most of 16 KiB; 30,000 fit only
    // in the broadcast route's 65 KiB. Bare, and inside an object.
    for (path, token, limit) in routes {
        for depth in [200, 8_000, 30_000] {
            let wrapped = json!({ "wrapped": 1 })
                .to_string()
                .replace('1', &nested(depth));
            for body in [nested(depth), wrapped] {
                let (status, code) = if body.len() > limit {
                    (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
                } else {
                    (StatusCode::BAD_REQUEST, "invalid_json")
                };
                let answer = server
                    .send_text(Method::POST, path, Some(body), token)
                    .await;
                assert_eq!(
                    (answer.status, answer.code().as_str()),
                    (status, code),
                    "{path} at depth {depth}: {}",
                    answer.json
                );
            }
        }
    }
    // Past the limit, every body route answers 413 before parsing anything (Apple's
    // notifications too, though Apple is not configured here).
    for (path, token) in routes
        .iter()
        .map(|(path, token, _)| (*path, *token))
        .chain([("/auth/apple/notifications", None)])
    {
        let huge = json!({ "refresh_token": "x".repeat(100_000) }).to_string();
        let answer = server
            .send_text(Method::POST, path, Some(huge), token)
            .await;
        assert_eq!(
            (answer.status, answer.code().as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            "{path}"
        );
    }
    // A WebSocket frame: the same recursion limit, an error frame, the socket stays.
    let mut ws = support::ws(&server, &user).await;
    let deep = format!(r#"{{"type":"subscribe","room":{}}}"#, nested(5_000));
    ws.send(Message::Text(deep.into())).await.unwrap();
    let answer = next_json(&mut ws).await;
    assert_eq!(answer["type"], "error", "{answer}");
    ws.send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    // And the server is whole.
    assert_eq!(server.get("/health").await.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn a_random_path_flood_makes_no_new_metric_series() {
    let server = Running::start(ServerConfig::default(), dev()).await;
    let before = support::get_text(server.addr, "/metrics").await;
    let series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("http_requests_total{"))
            .count()
    };
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..600u32 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // Unknown paths, and random values in the parameters of known templates.
        let path = match i % 3 {
            0 => format!("/scan/{state:x}/{i}"),
            1 => format!("/auth/facebook/data-deletion/{state:x}"),
            _ => format!("/api/dashboard/realtime/broadcast/public:{state:x}"),
        };
        let method = if i % 3 == 2 {
            Method::POST
        } else {
            Method::GET
        };
        server
            .send_text(method, &path, Some("{}".into()), None)
            .await;
    }
    let after = support::get_text(server.addr, "/metrics").await;
    assert!(!after.contains("/scan/"), "raw paths never become labels");
    // /metrics itself, /health-like known routes: a handful of series, whatever the paths.
    assert!(
        series(&after) <= series(&before) + 4,
        "before:\n{before}\nafter:\n{after}"
    );
    for template in [
        r#"route="unmatched""#,
        r#"route="/auth/facebook/data-deletion/{code}""#,
        r#"route="/api/dashboard/realtime/broadcast/{room}""#,
    ] {
        assert!(after.contains(template), "{template} in:\n{after}");
    }
    server.stop().await;
}
