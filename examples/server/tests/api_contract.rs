//! API.md's HTTP contract, route by route, where no other test file already holds the
//! reference server to it: each route's success answer and its main refusals, checked
//! by status *and* by the error's `{"error":{"code","message"}}` shape and code.
//!
//! Covered here: the admin routes' 401/403 for every one of them (`token_missing`,
//! `token_malformed`, `forbidden`), slow queries and optimize in memory, the analytics
//! route's `ETag` / 304 and its `invalid_window`, cache invalidation's bad bodies
//! (415, 400, 413), broadcast's bad bodies and its 429 with `Retry-After` and the
//! `RateLimit` headers, the SSE and WebSocket handshake refusals, `/auth/me`,
//! `/auth/refresh`, `/auth/logout`, `/auth/exchange`, `/auth/link/{provider}` and
//! `/.well-known/jwks.json` without a provider (dev tokens), Facebook's authorize,
//! deauthorize, data-deletion and deletion-status routes against the Graph API
//! stand-in, and Apple's notification refusals against the Apple stand-in.
//!
//! Everything runs on the in-memory server (no Postgres, Redis or Node needed); each
//! test has its own server, so no test's failures count against another's address.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::signin::{Browser, param, urlencode};
use support::{Answer, RETURN_TO, Running, send};
use upcoach_core::config::Settings;
use upcoach_server::{Options, ServerConfig};
use upcoach_testing::facebook::{FacebookStandIn, appsecret_proof};

fn dev() -> Options {
    Options {
        dev: true,
        ..Default::default()
    }
}

/// The in-memory server in `--dev` mode.
async fn dev_server() -> Running {
    Running::start(ServerConfig::default(), dev()).await
}

/// The configuration read from `env` alone (the process environment is not read).
fn config_from(env: &[(&str, String)]) -> ServerConfig {
    ServerConfig::from_lookup(|name| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone()))
        .unwrap_or_else(|e| panic!("the environment list reads: {e:?}"))
}

/// `POST /dev/token` with `roles`: the whole TokenResponse.
async fn issue(server: &Running, roles: &[&str]) -> Value {
    let answer = server
        .send(
            Method::POST,
            "/dev/token",
            Some(json!({ "roles": roles })),
            None,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    answer.json
}

/// The access token of a new user with `roles`.
async fn access(server: &Running, roles: &[&str]) -> String {
    issue(server, roles).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Asserts that `answer` is API.md's error: `status`, and a body that is exactly
/// `{"error":{"code":<code>,"message":<non-empty text>}}`.
#[track_caller]
fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (status, code),
        "{:?}",
        answer.body
    );
    let body = answer.json.as_object().expect("a JSON object");
    assert_eq!(body.len(), 1, "only `error`: {}", answer.json);
    let error = answer.json["error"].as_object().expect("an error object");
    assert!(
        error
            .get("message")
            .and_then(Value::as_str)
            .is_some_and(|m| !m.is_empty()),
        "a message: {}",
        answer.json
    );
    assert_eq!(
        answer.headers["content-type"], "application/json",
        "{}",
        answer.json
    );
}

/// `method path` with `headers`, a raw `body` (its content type among `headers`, or
/// JSON) and a bearer `token` if given.
async fn call(
    server: &Running,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    token: Option<&str>,
) -> Answer {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if let Some(bearer) = &bearer {
        all.push(("authorization", bearer));
    }
    send(method, &server.url(path), &all, body.map(str::to_owned)).await
}

/// Asserts that `POST path` refuses each of `bodies` (sent as JSON, with `token` if
/// given) with 400 `code`.
async fn assert_bodies_refused(
    server: &Running,
    path: &str,
    token: Option<&str>,
    bodies: &[&str],
    code: &str,
) {
    for body in bodies {
        let bad = call(server, Method::POST, path, &[], Some(body), token).await;
        assert_error(&bad, StatusCode::BAD_REQUEST, code);
    }
}

const ADMIN_ROUTES: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/api/dashboard/realtime/metrics", None),
    ("GET", "/api/performance/slow-queries", None),
    ("POST", "/api/performance/optimize", Some("{}")),
    ("GET", "/api/analytics/security-events?window=1h", None),
    (
        "POST",
        "/api/cache/invalidate",
        Some(r#"{"tags":["analytics"]}"#),
    ),
    ("GET", "/api/dashboard/realtime/status", None),
    (
        "POST",
        "/api/dashboard/realtime/broadcast/public:news",
        Some(r#"{"event":"posted","data":1}"#),
    ),
];

// ---------------------------------------------------------------------------------------
// Admin routes: who may call them.
// ---------------------------------------------------------------------------------------

/// Every admin route: 401 `token_missing` without a bearer, 401 `token_malformed` with a
/// token that is no JWT of ours, 403 `forbidden` for a signed-in non-admin.
#[tokio::test]
async fn every_admin_route_refuses_the_anonymous_the_forged_and_non_admins() {
    let server = dev_server().await;
    let coach = access(&server, &["coach"]).await;
    for (method, path, body) in ADMIN_ROUTES {
        let method: Method = method.parse().unwrap();
        let none = call(&server, method.clone(), path, &[], *body, None).await;
        assert_error(&none, StatusCode::UNAUTHORIZED, "token_missing");
        let forged = call(&server, method.clone(), path, &[], *body, Some("not-a-jwt")).await;
        assert_error(&forged, StatusCode::UNAUTHORIZED, "token_malformed");
        let refused = call(&server, method, path, &[], *body, Some(&coach)).await;
        assert_error(&refused, StatusCode::FORBIDDEN, "forbidden");
    }
    server.stop().await;
}

/// `GET /metrics` when configured for admins only: the same refusals, then the text.
#[tokio::test]
async fn metrics_for_admins_only_refuses_with_codes() {
    let mut config = ServerConfig::default();
    config.metrics_public = false;
    let server = Running::start(config, dev()).await;
    let none = server.get_as("/metrics", None).await;
    assert_error(&none, StatusCode::UNAUTHORIZED, "token_missing");
    let coach = access(&server, &["coach"]).await;
    let refused = server.get_as("/metrics", Some(&coach)).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "forbidden");
    let admin = access(&server, &["admin"]).await;
    let (status, headers, body) = support::raw_with(server.addr, "/metrics", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{headers:?}"
    );
    assert!(String::from_utf8_lossy(&body).contains("# TYPE http_requests_total counter"));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Performance and cached analytics, in memory.
// ---------------------------------------------------------------------------------------

/// Without Postgres: no slow query, and optimize still answers its two lists, warming
/// the three usual windows once.
#[tokio::test]
async fn slow_queries_and_optimize_answer_without_postgres() {
    let server = dev_server().await;
    let admin = access(&server, &["admin"]).await;
    for path in [
        "/api/performance/slow-queries",
        "/api/performance/slow-queries?explain=true",
    ] {
        let answer = server.get_as(path, Some(&admin)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        assert!(answer.json["threshold_ms"].is_u64(), "{}", answer.json);
        assert_eq!(answer.json["digests"], json!([]), "{}", answer.json);
    }
    let optimize = async || {
        server
            .send(
                Method::POST,
                "/api/performance/optimize",
                Some(json!({})),
                Some(&admin),
            )
            .await
    };
    let first = optimize().await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json);
    assert!(first.json["recommendations"].is_array(), "{}", first.json);
    let action = &first.json["actions"][0];
    assert_eq!(
        (action["kind"].as_str(), action["loaded"].as_u64()),
        (Some("warm_cache"), Some(3)),
        "{}",
        first.json
    );
    assert!(action["undo"].as_str().unwrap().contains("analytics"));
    let again = optimize().await;
    assert_eq!(again.json["actions"][0]["already_cached"], 3);
    server.stop().await;
}

/// The analytics route: `ETag` on a 200, 304 (no body) on `If-None-Match` with it, and
/// 400 `invalid_window` for a window that is not `<n>s|m|h|d` or is past 30 days.
#[tokio::test]
async fn security_events_answer_304_to_their_etag_and_refuse_bad_windows() {
    let server = dev_server().await;
    let admin = access(&server, &["admin"]).await;
    let path = "/api/analytics/security-events?window=1h";
    let first = server.get_as(path, Some(&admin)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json);
    assert_eq!(first.json["window"], "1h");
    assert!(first.json["counts"].is_array(), "{}", first.json);
    assert!(first.json["since_ms"].is_u64(), "{}", first.json);
    let etag = first.headers["etag"].to_str().unwrap().to_owned();
    let bearer = format!("Bearer {admin}");
    let headers = [
        ("authorization", bearer.as_str()),
        ("if-none-match", etag.as_str()),
    ];
    let same = send(Method::GET, &server.url(path), &headers, None).await;
    assert_eq!(same.status, StatusCode::NOT_MODIFIED, "{:?}", same.body);
    assert!(same.body.is_empty());
    assert_eq!(same.headers["etag"], etag.as_str());
    let stale = [
        ("authorization", bearer.as_str()),
        ("if-none-match", "\"not-this-one\""),
    ];
    let other = send(Method::GET, &server.url(path), &stale, None).await;
    assert_eq!(other.status, StatusCode::OK);

    for window in ["forever", "31d", "0h", "1w", ""] {
        let path = format!("/api/analytics/security-events?window={window}");
        let bad = server.get_as(&path, Some(&admin)).await;
        assert_error(&bad, StatusCode::BAD_REQUEST, "invalid_window");
    }
    server.stop().await;
}

/// `POST /api/cache/invalidate`: 415 for a body that is not JSON by its type, 400
/// `invalid_json` for one that is not `{"tags":[...]}`, 400 `invalid_tags` for no tag,
/// 413 past the body limit.
#[tokio::test]
async fn cache_invalidation_refuses_bad_bodies() {
    let server = dev_server().await;
    let admin = access(&server, &["admin"]).await;
    let path = "/api/cache/invalidate";
    let ok = call(
        &server,
        Method::POST,
        path,
        &[],
        Some(r#"{"tags":["analytics","dashboard"]}"#),
        Some(&admin),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.json);
    assert_eq!(ok.json, json!({"invalidated": ["analytics", "dashboard"]}));

    let typed = call(
        &server,
        Method::POST,
        path,
        &[("content-type", "text/plain")],
        Some(r#"{"tags":["analytics"]}"#),
        Some(&admin),
    )
    .await;
    assert_error(
        &typed,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let bodies = ["{", r#"{"tags":"analytics"}"#, r#"{"tags":[],"x":1}"#, ""];
    assert_bodies_refused(&server, path, Some(&admin), &bodies, "invalid_json").await;
    let empty = call(
        &server,
        Method::POST,
        path,
        &[],
        Some(r#"{"tags":[]}"#),
        Some(&admin),
    )
    .await;
    assert_error(&empty, StatusCode::BAD_REQUEST, "invalid_tags");
    let huge = json!({ "tags": ["x".repeat(20_000)] }).to_string();
    let large = call(&server, Method::POST, path, &[], Some(&huge), Some(&admin)).await;
    assert_error(&large, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Realtime producers and operators.
// ---------------------------------------------------------------------------------------

/// Broadcast: 202 `{"room","seq"}`; 415, 400 `invalid_json` and 413 for bad bodies;
/// status: the documented fields.
#[tokio::test]
async fn broadcast_refuses_bad_bodies_and_status_lists_rooms() {
    let server = dev_server().await;
    let admin = access(&server, &["admin"]).await;
    let path = "/api/dashboard/realtime/broadcast/public:news";
    let ok = call(
        &server,
        Method::POST,
        path,
        &[],
        Some(r#"{"event":"posted","data":{"id":1}}"#),
        Some(&admin),
    )
    .await;
    assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.json);
    assert_eq!(ok.json, json!({"room": "public:news", "seq": 1}));

    let typed = call(
        &server,
        Method::POST,
        path,
        &[("content-type", "text/plain")],
        Some(r#"{"event":"posted"}"#),
        Some(&admin),
    )
    .await;
    assert_error(
        &typed,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    assert_bodies_refused(
        &server,
        path,
        Some(&admin),
        &["{", r#"{"data":1}"#, r#"{"event":1}"#],
        "invalid_json",
    )
    .await;
    let reserved = call(
        &server,
        Method::POST,
        path,
        &[],
        Some(r#"{"event":"reset"}"#),
        Some(&admin),
    )
    .await;
    assert_error(&reserved, StatusCode::BAD_REQUEST, "invalid_event");
    let huge = json!({"event": "posted", "data": "x".repeat(100_000)}).to_string();
    let large = call(&server, Method::POST, path, &[], Some(&huge), Some(&admin)).await;
    assert_error(&large, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let bad_room = call(
        &server,
        Method::POST,
        "/api/dashboard/realtime/broadcast/a%20b",
        &[],
        Some(r#"{"event":"posted"}"#),
        Some(&admin),
    )
    .await;
    assert_error(&bad_room, StatusCode::BAD_REQUEST, "invalid_room");
    let get = server.get_as(path, Some(&admin)).await;
    assert_error(&get, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");

    let status = server
        .get_as("/api/dashboard/realtime/status", Some(&admin))
        .await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.json);
    for field in ["node_id", "uptime_s", "connections", "rooms", "broker"] {
        assert!(status.json.get(field).is_some(), "{field}: {}", status.json);
    }
    assert!(status.json["rooms"].is_array(), "{}", status.json);
    server.stop().await;
}

/// Over the broadcast budget (here 2 a minute per user): 429 `rate_limited` with
/// `Retry-After`, `RateLimit-Policy` and `RateLimit`; allowed answers carry the two
/// `RateLimit` headers too.
#[tokio::test]
async fn broadcast_over_its_budget_is_429_with_retry_after_and_ratelimit_headers() {
    let config = config_from(&[("RATE_LIMIT_REALTIME_BROADCAST", "2/1m".to_owned())]);
    let server = Running::start(config, dev()).await;
    let admin = access(&server, &["admin"]).await;
    let path = "/api/dashboard/realtime/broadcast/public:news";
    let body = Some(r#"{"event":"posted","data":1}"#);
    for _ in 0..2 {
        let ok = call(&server, Method::POST, path, &[], body, Some(&admin)).await;
        assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.json);
        assert!(ok.headers.contains_key("ratelimit"), "{:?}", ok.headers);
        assert!(ok.headers.contains_key("ratelimit-policy"));
    }
    let limited = call(&server, Method::POST, path, &[], body, Some(&admin)).await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        limited.headers["ratelimit-policy"],
        "\"realtime.broadcast\";q=2;w=60"
    );
    let state = limited.headers["ratelimit"].to_str().unwrap();
    assert!(
        state.starts_with("\"realtime.broadcast\";r=0;t="),
        "{state}"
    );
    // Another admin has a budget of their own.
    let other = access(&server, &["admin"]).await;
    let ok = call(&server, Method::POST, path, &[], body, Some(&other)).await;
    assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.json);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Realtime connections: what the handshakes refuse.
// ---------------------------------------------------------------------------------------

/// SSE: 401 without a token or with a bad one, 403 `forbidden` for a room the user may
/// not read, 400 `invalid_rooms` / `invalid_cursor`; a good request streams
/// `text/event-stream` that starts with `retry: 3000`.
#[tokio::test]
async fn sse_refuses_with_error_shapes_and_streams_when_allowed() {
    let server = dev_server().await;
    let coach = access(&server, &["coach"]).await;
    let path = "/api/dashboard/realtime/sse";
    let none = server
        .get_as(&format!("{path}?rooms=public:news"), None)
        .await;
    assert_error(&none, StatusCode::UNAUTHORIZED, "token_missing");
    let forged = server
        .get_as(
            &format!("{path}?rooms=public:news&access_token=not-a-jwt"),
            None,
        )
        .await;
    assert_error(&forged, StatusCode::UNAUTHORIZED, "token_malformed");
    for room in ["metrics", "alerts", "security"] {
        let denied = server
            .get_as(&format!("{path}?rooms={room}"), Some(&coach))
            .await;
        assert_error(&denied, StatusCode::FORBIDDEN, "forbidden");
    }
    let other_user = format!("user:{}", upcoach_core::UserId::new());
    let denied = server
        .get_as(&format!("{path}?rooms={other_user}"), Some(&coach))
        .await;
    assert_error(&denied, StatusCode::FORBIDDEN, "forbidden");
    for query in ["", "?rooms=a%20b", "?rooms=public:news,bad!room"] {
        let bad = server.get_as(&format!("{path}{query}"), Some(&coach)).await;
        assert_error(&bad, StatusCode::BAD_REQUEST, "invalid_rooms");
    }
    let cursor = server
        .get_as(
            &format!("{path}?rooms=public:news&last_event_id=public:news%3Dx"),
            Some(&coach),
        )
        .await;
    assert_error(&cursor, StatusCode::BAD_REQUEST, "invalid_cursor");

    // Allowed: the stream's head and its first record, on a connection of our own.
    let response = support::open_stream(
        server.addr,
        &format!("{path}?rooms=public:news&access_token={coach}"),
        &[],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let frame = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        http_body_util::BodyExt::frame(&mut body),
    )
    .await
    .expect("a first record in time")
    .unwrap()
    .unwrap();
    let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    assert!(text.starts_with("retry: 3000\n"), "{text:?}");
    drop(body);
    server
        .app
        .hub()
        .shutdown(std::time::Duration::from_secs(5))
        .await;
    server.stop().await;
}

/// WebSocket: a plain GET is no handshake (426 `websocket_required`); a bad token
/// upgrades and is closed with 4001.
#[tokio::test]
async fn websocket_refuses_plain_requests_and_closes_bad_tokens_with_4001() {
    let server = dev_server().await;
    let plain = server.get_as("/api/dashboard/realtime/ws", None).await;
    assert_error(&plain, StatusCode::UPGRADE_REQUIRED, "websocket_required");

    let url = format!(
        "ws://{}/api/dashboard/realtime/ws?access_token=not-a-jwt",
        server.addr
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("a bad token still upgrades");
    let close = loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("closed in time");
        match message {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    let frame = close.expect("a close code");
    assert_eq!(u16::from(frame.code), 4001, "{frame:?}");
    server
        .app
        .hub()
        .shutdown(std::time::Duration::from_secs(5))
        .await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Sessions without a provider: dev tokens stand in for a sign-in.
// ---------------------------------------------------------------------------------------

/// `GET /auth/me`: the User for a bearer, 401 `token_missing` / `token_malformed`
/// otherwise.
#[tokio::test]
async fn me_answers_the_user_or_401() {
    let server = dev_server().await;
    let tokens = issue(&server, &["coach"]).await;
    let access = tokens["access_token"].as_str().unwrap();
    let me = server.get_as("/auth/me", Some(access)).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.json);
    assert_eq!(me.json["id"], tokens["user"]["id"]);
    assert_eq!(me.json["roles"], json!(["coach"]));
    for field in ["email", "email_verified", "name", "providers"] {
        assert!(me.json.get(field).is_some(), "{field} in {}", me.json);
    }
    assert!(me.json["providers"].is_array());
    let none = server.get_as("/auth/me", None).await;
    assert_error(&none, StatusCode::UNAUTHORIZED, "token_missing");
    let forged = server.get_as("/auth/me", Some("not-a-jwt")).await;
    assert_error(&forged, StatusCode::UNAUTHORIZED, "token_malformed");
    let post = call(
        &server,
        Method::POST,
        "/auth/me",
        &[],
        Some("{}"),
        Some(access),
    )
    .await;
    assert_error(&post, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    server.stop().await;
}

/// `POST /auth/refresh`: a rotated TokenResponse; 401 `refresh_token_invalid` for a
/// token never issued, 400 `invalid_json` without one.
#[tokio::test]
async fn refresh_rotates_or_refuses_with_codes() {
    let server = dev_server().await;
    let tokens = issue(&server, &["coach"]).await;
    let rotated = server.refresh(&tokens["refresh_token"], &[]).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.json);
    assert_eq!(rotated.json["token_type"], "Bearer");
    assert!(rotated.json["expires_in"].is_u64());
    assert!(rotated.json["access_token"].is_string());
    assert_ne!(rotated.json["refresh_token"], tokens["refresh_token"]);
    assert_eq!(rotated.json["user"]["id"], tokens["user"]["id"]);

    let bogus = server.refresh(&json!("never-issued"), &[]).await;
    assert_error(&bogus, StatusCode::UNAUTHORIZED, "refresh_token_invalid");
    let bodies = ["{}", "[]", "not json"];
    assert_bodies_refused(&server, "/auth/refresh", None, &bodies, "invalid_json").await;
    server.stop().await;
}

/// `POST /auth/logout`: 401 without a bearer, 415 for a body that is not JSON, 403
/// `refresh_token_not_yours` for another user's refresh token (which lives on), 204
/// for the bearer's own (then refused as revoked).
#[tokio::test]
async fn logout_needs_a_bearer_and_revokes_only_its_own_family() {
    let server = dev_server().await;
    let a = issue(&server, &["coach"]).await;
    let b = issue(&server, &["coach"]).await;
    let a_access = a["access_token"].as_str().unwrap();

    let anonymous = call(&server, Method::POST, "/auth/logout", &[], Some("{}"), None).await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "token_missing");
    let typed = call(
        &server,
        Method::POST,
        "/auth/logout",
        &[("content-type", "text/plain")],
        Some(r#"{"refresh_token":"x"}"#),
        Some(a_access),
    )
    .await;
    assert_error(
        &typed,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let bad = call(
        &server,
        Method::POST,
        "/auth/logout",
        &[],
        Some("{"),
        Some(a_access),
    )
    .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "invalid_json");

    let theirs = json!({ "refresh_token": b["refresh_token"] }).to_string();
    let refused = call(
        &server,
        Method::POST,
        "/auth/logout",
        &[],
        Some(&theirs),
        Some(a_access),
    )
    .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "refresh_token_not_yours");
    let b_lives = server.refresh(&b["refresh_token"], &[]).await;
    assert_eq!(b_lives.status, StatusCode::OK, "{}", b_lives.json);

    let own = json!({ "refresh_token": a["refresh_token"] }).to_string();
    let out = call(
        &server,
        Method::POST,
        "/auth/logout",
        &[],
        Some(&own),
        Some(a_access),
    )
    .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT, "{:?}", out.body);
    assert!(out.body.is_empty());
    let after = server.refresh(&a["refresh_token"], &[]).await;
    assert_error(&after, StatusCode::UNAUTHORIZED, "refresh_token_revoked");
    server.stop().await;
}

/// `POST /auth/exchange`: 401 `login_code_invalid` for a code never issued, 400
/// `invalid_json` for a body without one.
#[tokio::test]
async fn exchange_refuses_unknown_codes_and_bad_bodies() {
    let server = dev_server().await;
    let unknown = server
        .send(
            Method::POST,
            "/auth/exchange",
            Some(json!({"login_code": "never-issued"})),
            None,
        )
        .await;
    assert_error(&unknown, StatusCode::UNAUTHORIZED, "login_code_invalid");
    assert_bodies_refused(
        &server,
        "/auth/exchange",
        None,
        &["{}", "{", r#"{"login_code":1}"#],
        "invalid_json",
    )
    .await;
    server.stop().await;
}

/// `POST` / `DELETE /auth/link/{provider}`: 401 without a bearer; linking with a
/// provider this server does not offer is 404 (`provider_not_configured`, or
/// `unknown_provider` for a name that is no provider); unlinking an identity the user
/// does not have is 404 `not_linked`.
#[tokio::test]
async fn link_and_unlink_need_a_bearer_and_a_configured_provider() {
    let server = dev_server().await;
    let access = access(&server, &["coach"]).await;
    let body = r#"{"id_token":"x.y.z","nonce":"n","platform":"ios"}"#;
    for provider in ["google", "apple", "facebook"] {
        let path = format!("/auth/link/{provider}");
        let link = call(&server, Method::POST, &path, &[], Some(body), None).await;
        assert_error(&link, StatusCode::UNAUTHORIZED, "token_missing");
        let unlink = call(&server, Method::DELETE, &path, &[], None, None).await;
        assert_error(&unlink, StatusCode::UNAUTHORIZED, "token_missing");
        let link = call(&server, Method::POST, &path, &[], Some(body), Some(&access)).await;
        assert_error(&link, StatusCode::NOT_FOUND, "provider_not_configured");
    }
    let unknown = call(
        &server,
        Method::POST,
        "/auth/link/gitlab",
        &[],
        Some(body),
        Some(&access),
    )
    .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "unknown_provider");
    let unknown = call(
        &server,
        Method::DELETE,
        "/auth/link/gitlab",
        &[],
        None,
        Some(&access),
    )
    .await;
    // In memory DELETE answers `not_linked` where POST says `unknown_provider` (with
    // OpenID providers configured it says `unknown_provider`: openid_signin.rs). Either
    // is a 404 in the error shape; which code is right is not pinned here.
    assert!(
        ["unknown_provider", "not_linked"].contains(&unknown.code().as_str()),
        "{}",
        unknown.json
    );
    assert_error(&unknown, StatusCode::NOT_FOUND, &unknown.code());
    let not_linked = call(
        &server,
        Method::DELETE,
        "/auth/link/google",
        &[],
        None,
        Some(&access),
    )
    .await;
    assert_error(&not_linked, StatusCode::NOT_FOUND, "not_linked");
    server.stop().await;
}

/// `GET /.well-known/jwks.json`: the key that signs access tokens (EdDSA), cacheable
/// for 300 s.
#[tokio::test]
async fn jwks_lists_the_signing_key() {
    let server = dev_server().await;
    let access = access(&server, &["coach"]).await;
    let jwks = server.get("/.well-known/jwks.json").await;
    assert_eq!(jwks.status, StatusCode::OK, "{}", jwks.json);
    let cache = jwks.headers["cache-control"].to_str().unwrap();
    assert!(cache.contains("max-age=300"), "{cache}");
    let keys = jwks.json["keys"].as_array().unwrap();
    assert!(!keys.is_empty());
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(access.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    let signer = keys
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .unwrap_or_else(|| panic!("the token's key {header} in {}", jwks.json));
    assert_eq!(signer["alg"], "EdDSA");
    assert!(signer.get("d").is_none(), "never the private part");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Facebook: authorize and the callbacks Facebook calls (Graph API stand-in).
// ---------------------------------------------------------------------------------------

const FB_APP_ID: &str = "1234567890";
const FB_APP_SECRET: &str = "stand-in-app-secret";

/// A `--dev` server with Facebook pointed at `graph`, `return_to` allowed to
/// [`RETURN_TO`], and `extra` variables.
async fn facebook_server(graph: &FacebookStandIn, extra: &[(&str, String)]) -> Running {
    let mut env = graph.env();
    env.push(("AUTH_RETURN_TO_ALLOWLIST", RETURN_TO.to_owned()));
    env.extend(extra.iter().cloned());
    Running::start(config_from(&env), dev()).await
}

/// A `signed_request` form for `user_id`, signed with `secret`.
fn signed_request_form(user_id: &str, secret: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let payload = URL_SAFE_NO_PAD.encode(
        json!({"algorithm": "HMAC-SHA256", "issued_at": now, "user_id": user_id}).to_string(),
    );
    let proof = appsecret_proof(secret, &payload);
    let signature: Vec<u8> = (0..proof.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&proof[i..i + 2], 16).unwrap())
        .collect();
    format!(
        "signed_request={}.{payload}",
        URL_SAFE_NO_PAD.encode(signature)
    )
}

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

/// `GET /auth/facebook/authorize`: 302 to the dialog with `state` and an S256
/// challenge; 400 `invalid_platform`, 400 `return_to_not_allowed`.
#[tokio::test]
async fn authorize_redirects_or_refuses_bad_input() {
    let graph = FacebookStandIn::start(FB_APP_ID, FB_APP_SECRET).await;
    let server = facebook_server(&graph, &[]).await;
    let query = format!("platform=web&return_to={}", urlencode(RETURN_TO));
    let started = Browser::default()
        .authorize(&server, "facebook", &query)
        .await;
    let dialog = started.location();
    assert!(param(&dialog, "state").len() >= 43, "{dialog}");
    assert_eq!(param(&dialog, "code_challenge_method"), "S256");
    assert!(!param(&dialog, "code_challenge").is_empty());

    let platform = server
        .get_as("/auth/facebook/authorize?platform=desktop", None)
        .await;
    assert_error(&platform, StatusCode::BAD_REQUEST, "invalid_platform");
    let elsewhere = format!(
        "/auth/facebook/authorize?platform=web&return_to={}",
        urlencode("http://evil.example.test/signed-in")
    );
    let refused = server.get_as(&elsewhere, None).await;
    assert_error(&refused, StatusCode::BAD_REQUEST, "return_to_not_allowed");
    let unconfigured = server
        .get_as("/auth/google/authorize?platform=web", None)
        .await;
    assert_error(
        &unconfigured,
        StatusCode::NOT_FOUND,
        "provider_not_configured",
    );
    server.stop().await;
}

/// Each address may start 30 sign-ins per 10 minutes: the 31st is 429
/// `too_many_sign_in_flows` with `Retry-After` and the `RateLimit` headers (the
/// route's own rate limit turned off, so that this quota is the one reached).
#[tokio::test]
async fn too_many_sign_ins_from_one_address_are_429() {
    let graph = FacebookStandIn::start(FB_APP_ID, FB_APP_SECRET).await;
    let server = facebook_server(
        &graph,
        &[
            ("RATE_LIMIT_AUTH_AUTHORIZE", "off".to_owned()),
            ("RATE_LIMIT_AUTH_PROVIDER", "off".to_owned()),
        ],
    )
    .await;
    let path = "/auth/facebook/authorize?platform=web";
    for i in 0..30 {
        let started = server.get_as(path, None).await;
        assert_eq!(
            started.status,
            StatusCode::FOUND,
            "sign-in {i}: {:?}",
            started.body
        );
    }
    let refused = server.get_as(path, None).await;
    assert_error(
        &refused,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_sign_in_flows",
    );
    let retry: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=600).contains(&retry), "Retry-After {retry}");
    assert!(refused.headers.contains_key("ratelimit"));
    assert!(refused.headers.contains_key("ratelimit-policy"));
    server.stop().await;
}

/// `POST /auth/facebook/deauthorize` and `/data-deletion` (form `signed_request`): 200
/// once verified (data deletion with `{"url","confirmation_code"}`, whose status page
/// answers); 415 for another body type, 400 `signed_request_malformed`, 401
/// `signed_request_bad_signature`; an unknown confirmation code is 404.
#[tokio::test]
async fn facebook_callbacks_verify_the_signed_request() {
    let graph = FacebookStandIn::start(FB_APP_ID, FB_APP_SECRET).await;
    let server = facebook_server(&graph, &[]).await;
    let good = signed_request_form("10150000000000009", FB_APP_SECRET);
    let forged = signed_request_form("10150000000000009", "not-the-app-secret");
    for path in ["/auth/facebook/deauthorize", "/auth/facebook/data-deletion"] {
        let json_body = call(
            &server,
            Method::POST,
            path,
            &[],
            Some(r#"{"signed_request":"x.y"}"#),
            None,
        )
        .await;
        assert_error(
            &json_body,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        );
        for form in ["", "other=1", "signed_request=a.b&signed_request=c.d"] {
            let bad = call(&server, Method::POST, path, &[FORM], Some(form), None).await;
            assert_error(&bad, StatusCode::BAD_REQUEST, "signed_request_malformed");
        }
        let bad = call(&server, Method::POST, path, &[FORM], Some(&forged), None).await;
        assert_error(
            &bad,
            StatusCode::UNAUTHORIZED,
            "signed_request_bad_signature",
        );
    }

    let deauthorized = call(
        &server,
        Method::POST,
        "/auth/facebook/deauthorize",
        &[FORM],
        Some(&good),
        None,
    )
    .await;
    assert_eq!(
        deauthorized.status,
        StatusCode::OK,
        "{:?}",
        deauthorized.body
    );

    let deletion = call(
        &server,
        Method::POST,
        "/auth/facebook/data-deletion",
        &[FORM],
        Some(&good),
        None,
    )
    .await;
    assert_eq!(deletion.status, StatusCode::OK, "{:?}", deletion.body);
    let code = deletion.json["confirmation_code"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = deletion.json["url"].as_str().unwrap();
    assert!(
        url.ends_with(&format!("/auth/facebook/data-deletion/{code}")),
        "{url}"
    );
    let status = server
        .get_as(&format!("/auth/facebook/data-deletion/{code}"), None)
        .await;
    assert_eq!(status.status, StatusCode::OK, "{:?}", status.body);
    assert_eq!(status.json["confirmation_code"], code.as_str());
    assert!(status.json["status"].is_string(), "{}", status.json);
    let unknown = server
        .get_as("/auth/facebook/data-deletion/no-such-code", None)
        .await;
    assert_error(
        &unknown,
        StatusCode::NOT_FOUND,
        "deletion_request_not_found",
    );
    assert_eq!(graph.proof_failures(), 0);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Apple's server-to-server notifications (Apple stand-in): the refusals.
// ---------------------------------------------------------------------------------------

/// A notification that is not `{"payload":"<jwt>"}` is 400; one not signed by Apple's
/// key is 401; on a server without Apple the route is 404.
#[tokio::test]
async fn apple_notifications_refuse_malformed_and_forged_payloads() {
    use upcoach_testing::apple::{AppleStandIn, TEST_KEY_ID, TEST_TEAM_ID, TEST_TEAM_PUBLIC_KEY};
    let apple = AppleStandIn::start(TEST_TEAM_ID, TEST_KEY_ID, TEST_TEAM_PUBLIC_KEY).await;
    let server = Running::start(
        config_from(&apple.env("com.example.web", "com.example.app")),
        dev(),
    )
    .await;
    let path = "/auth/apple/notifications";
    let bodies = [
        "{",
        "{}",
        r#"{"payload":"not-a-jwt"}"#,
        r#"{"payload":"a.b.c"}"#,
    ];
    assert_bodies_refused(&server, path, None, &bodies, "apple_notification_malformed").await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let forged = apple.sign_with_foreign_key(json!({
        "iss": apple.issuer(),
        "aud": "com.example.app",
        "iat": now,
        "exp": now + 300,
        "jti": "forged-1",
        "events": json!({"type": "consent-revoked", "sub": "001", "event_time": now * 1000}).to_string(),
    }));
    let body = json!({ "payload": forged }).to_string();
    let refused = call(&server, Method::POST, path, &[], Some(&body), None).await;
    assert_error(
        &refused,
        StatusCode::UNAUTHORIZED,
        "apple_notification_bad_signature",
    );
    server.stop().await;

    let without_apple = dev_server().await;
    let missing = call(&without_apple, Method::POST, path, &[], Some(&body), None).await;
    assert_error(&missing, StatusCode::NOT_FOUND, "provider_not_configured");
    without_apple.stop().await;
}
