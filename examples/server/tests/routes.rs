//! Routing, error shapes and the `--dev` token route.

mod support;

use http::{Method, StatusCode};
use support::{Running, request};
use upcoach_core::config::Settings;
use upcoach_core::{Role, TokenVerifier, UserId};
use upcoach_server::{Options, ServerConfig};

fn dev() -> Options {
    Options {
        dev: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_with_the_error_shape() {
    let server = Running::start(ServerConfig::default(), Options::default()).await;
    let answer = server.get("/nope").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json["error"]["code"], "not_found");
    assert!(answer.json["error"]["message"].is_string());

    let answer = request(server.addr, Method::DELETE, "/health", None).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.json["error"]["code"], "method_not_allowed");
    server.stop().await;
}

#[tokio::test]
async fn dev_token_does_not_exist_without_dev() {
    let server = Running::start(ServerConfig::default(), Options::default()).await;
    let answer = server.post("/dev/token", r#"{"roles":["admin"]}"#).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json["error"]["code"], "not_found");
    assert!(server.app.access_tokens().is_none());
    server.stop().await;
}

#[tokio::test]
async fn dev_token_issues_a_verifiable_token_for_the_asked_user_and_roles() {
    let server = Running::start(ServerConfig::default(), dev()).await;
    let user = UserId::new();
    let answer = server
        .post(
            "/dev/token",
            &format!(r#"{{"sub":"{user}","roles":["admin","coach","admin"]}}"#),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(answer.json["token_type"], "Bearer");
    assert_eq!(answer.json["expires_in"], 900);
    assert_eq!(answer.json["user"]["id"], user.to_string());
    assert_eq!(
        answer.json["user"]["roles"],
        serde_json::json!(["admin", "coach"])
    );
    let token = answer.json["access_token"].as_str().unwrap();
    let principal = server
        .app
        .access_tokens()
        .unwrap()
        .verify(token)
        .await
        .unwrap();
    assert_eq!(principal.user_id, user);
    assert_eq!(principal.roles, [Role::ADMIN, Role::COACH]);

    // No sub: a fresh user.
    let answer = server.post("/dev/token", "{}").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.json["user"]["id"]
            .as_str()
            .unwrap()
            .parse::<UserId>()
            .is_ok()
    );
    server.stop().await;
}

#[tokio::test]
async fn dev_token_refuses_bad_input_with_clear_errors() {
    let server = Running::start(ServerConfig::default(), dev()).await;
    let cases = [
        (r#"{"sub":"42"}"#, StatusCode::BAD_REQUEST, "invalid_sub"),
        (
            r#"{"roles":["Admin"]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_roles",
        ),
        (
            r#"{"roles":"admin"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            r#"{"sub":null,"extra":1}"#,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        ("not json", StatusCode::BAD_REQUEST, "invalid_json"),
        ("", StatusCode::BAD_REQUEST, "invalid_json"),
    ];
    for (body, status, code) in cases {
        let answer = server.post("/dev/token", body).await;
        assert_eq!(
            (answer.status, answer.json["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    let many_roles: Vec<String> = (0..17).map(|i| format!("r{i}")).collect();
    let answer = server
        .post(
            "/dev/token",
            &serde_json::json!({ "roles": many_roles }).to_string(),
        )
        .await;
    assert_eq!(answer.json["error"]["code"], "invalid_roles");

    let huge = format!(r#"{{"sub":"{}"}}"#, "x".repeat(20_000));
    let answer = server.post("/dev/token", &huge).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.json["error"]["code"], "payload_too_large");

    let answer = server.get("/dev/token").await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    server.stop().await;
}

/// A rotated refresh token presented again: reuse (the family is revoked) by default,
/// a sibling within `AUTH_REFRESH_GRACE_SECONDS`.
#[tokio::test]
async fn a_refresh_retried_within_the_configured_grace_gets_a_sibling() {
    async fn refresh_twice(server: &Running) -> (StatusCode, serde_json::Value) {
        let issued = server.post("/dev/token", r#"{"roles":["coach"]}"#).await;
        let token = issued.json["refresh_token"].as_str().unwrap().to_owned();
        let body = format!(r#"{{"refresh_token":"{token}"}}"#);
        let first = server.post("/auth/refresh", &body).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.json);
        let again = server.post("/auth/refresh", &body).await;
        (again.status, again.json)
    }

    let strict = Running::start(ServerConfig::default(), dev()).await;
    let (status, json) = refresh_twice(&strict).await;
    assert_eq!(
        (status, json["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("refresh_token_reused"))
    );
    strict.stop().await;

    let mut config = ServerConfig::default();
    config.auth.refresh_grace = std::time::Duration::from_secs(10);
    let lenient = Running::start(config, dev()).await;
    let (status, json) = refresh_twice(&lenient).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert!(json["refresh_token"].is_string());
    lenient.stop().await;
}

#[tokio::test]
async fn dev_mode_refuses_to_listen_beyond_loopback_or_behind_https() {
    let mut public = ServerConfig::default();
    public.addr = "0.0.0.0:0".parse().unwrap();
    let err = upcoach_server::App::start(public, dev()).await.unwrap_err();
    assert!(err.to_string().contains("--dev refuses"), "{err}");

    let behind_https = ServerConfig::from_lookup(|name| {
        (name == "UPCOACH_PUBLIC_URL").then(|| "https://api.example.com".to_owned())
    })
    .unwrap();
    let err = upcoach_server::App::start(behind_https, dev())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("https"), "{err}");

    // Not in dev mode, both are fine.
    let mut public = ServerConfig::default();
    public.addr = "0.0.0.0:0".parse().unwrap();
    assert!(
        upcoach_server::App::start(public, Options::default())
            .await
            .is_ok()
    );
}

/// With AUTH_SIGNING_KEY, `--dev` signs with that key (so several local processes share
/// one), and `/dev/token` leaves an existing user's roles as they are.
#[tokio::test]
async fn dev_tokens_use_the_configured_key_and_keep_existing_roles() {
    let seed = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc";
    let config =
        ServerConfig::from_lookup(|name| (name == "AUTH_SIGNING_KEY").then(|| seed.to_owned()))
            .unwrap();
    let server = Running::start(config.clone(), dev()).await;
    let other = Running::start(config, Options::default()).await;
    let user = UserId::new();
    let first = server
        .post(
            "/dev/token",
            &format!(r#"{{"sub":"{user}","roles":["coach"]}}"#),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json);
    let token = first.json["access_token"].as_str().unwrap();
    assert!(
        other
            .app
            .access_tokens()
            .unwrap()
            .verify(token)
            .await
            .is_ok(),
        "a process with the same key (and no --dev) accepts it"
    );
    let again = server
        .post(
            "/dev/token",
            &format!(r#"{{"sub":"{user}","roles":["admin"]}}"#),
        )
        .await;
    assert_eq!(again.json["user"]["roles"], serde_json::json!(["coach"]));
    let events = server
        .app
        .event_log()
        .recent(upcoach_core::event::EventKind::Security, 10)
        .await
        .unwrap();
    assert!(
        events.iter().any(|e| e.name() == "session_issued"),
        "{events:?}"
    );
    server.stop().await;
    other.stop().await;
}

/// Path parameters are validated decoded: what `encodeURIComponent("public:news")`
/// sends is the room `public:news`.
#[tokio::test]
async fn percent_encoded_path_parameters_are_decoded() {
    let server = Running::start(ServerConfig::default(), dev()).await;
    let admin = server.post("/dev/token", r#"{"roles":["admin"]}"#).await;
    let token = admin.json["access_token"].as_str().unwrap();
    let answer = support::request_with(
        server.addr,
        Method::POST,
        "/api/dashboard/realtime/broadcast/public%3Anews",
        Some(r#"{"event":"headline","data":{"n":1}}"#),
        Some(token),
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.json);
    assert_eq!(answer.json["room"], "public:news");
    let bad = support::request_with(
        server.addr,
        Method::POST,
        "/api/dashboard/realtime/broadcast/%FF",
        Some(r#"{"event":"x"}"#),
        Some(token),
    )
    .await;
    assert_eq!(bad.json["error"]["code"], "invalid_path");
    let provider = request(server.addr, Method::GET, "/auth/goo%67le/authorize", None).await;
    assert_eq!(
        provider.json["error"]["code"], "provider_not_configured",
        "goo%67le is google"
    );
    server.stop().await;
}

/// A cross-site `text/plain` POST (no preflight) never reaches a JSON route.
#[tokio::test]
async fn json_routes_refuse_other_content_types_in_dev_mode() {
    let server = Running::start(ServerConfig::default(), dev()).await;
    for path in ["/dev/token", "/auth/refresh", "/auth/exchange"] {
        let answer =
            support::request_typed(server.addr, path, "text/plain", r#"{"roles":["admin"]}"#).await;
        assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{path}");
    }
    server.stop().await;
}

/// DNS rebinding: a page of another site whose name resolves to 127.0.0.1 reaches a
/// loopback server with its own name in `Host`; `/dev/token` answers only loopback names.
#[tokio::test]
async fn dev_tokens_are_only_for_requests_addressed_to_loopback() {
    let server = Running::start(ServerConfig::default(), dev()).await;
    let body = r#"{"roles":["admin"]}"#;
    for host in ["evil.example.test", "evil.example.test:8080", "10.0.0.7"] {
        let answer =
            support::request_to_host(server.addr, host, "/dev/token", "application/json", body)
                .await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{host}");
    }
    for host in ["localhost:8080", "127.0.0.1", "[::1]:8080"] {
        let answer =
            support::request_to_host(server.addr, host, "/dev/token", "application/json", body)
                .await;
        assert_eq!(answer.status, StatusCode::OK, "{host}: {}", answer.json);
    }
    // Through a proxy (nginx sets X-Forwarded-For), Host proves nothing: refused.
    for header in [
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
    ] {
        let answer = support::request_headers(
            server.addr,
            Method::POST,
            "/dev/token",
            Some(body),
            &[header],
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::FORBIDDEN,
            "{header:?}: {}",
            answer.json
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn the_dashboard_page_is_served_with_its_policy_and_the_servers_sign_in_options() {
    let server = Running::start(ServerConfig::default(), Options::default()).await;
    let (status, headers, body) =
        support::raw(server.addr, Method::GET, "/dashboard", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'") && !policy.contains("unsafe"));
    assert!(String::from_utf8_lossy(&body).contains("/dashboard/dashboard.js"));
    // No signing key, no --dev: nothing to sign in with, and the page says so.
    let settings = server.get("/dashboard/config.json").await;
    assert_eq!(
        settings.json,
        serde_json::json!({"providers": [], "dev_sign_in": false})
    );
    // Every answer under /dashboard, refusals too, carries the page's headers.
    for (method, path, status, code) in [
        (
            Method::GET,
            "/dashboard/nope.js",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/dashboard/a/b",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/dashboard/%ff",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "//dashboard.js",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/dashboard",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ] {
        let (got, headers, body) =
            support::raw(server.addr, method.clone(), path, None, None).await;
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}"
        );
        if path.starts_with("/dashboard") {
            assert_eq!(
                headers["content-security-policy"], policy,
                "{method} {path}"
            );
            assert_eq!(headers["x-frame-options"], "DENY", "{method} {path}");
        }
    }
    let (_, headers, _) = support::raw(server.addr, Method::POST, "/dashboard", None, None).await;
    assert_eq!(headers["allow"], "GET, HEAD");
    server.stop().await;

    let server = Running::start(ServerConfig::default(), dev()).await;
    let settings = server.get("/dashboard/config.json").await;
    assert_eq!(settings.json["dev_sign_in"], true);
    server.stop().await;
}
