//! Routing, error shapes and the `--dev` token route.

mod support;

use http::{Method, StatusCode};
use support::{Running, request};
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
