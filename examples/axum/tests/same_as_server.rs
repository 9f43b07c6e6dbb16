//! The axum example and the reference server answer every auth route alike: the same
//! requests to both, with the same provider and signing key, get the same status,
//! error code and headers.

mod support;

use http::Method;
use upcoach_testing::OidcProvider;

const JSON: (&str, &str) = ("content-type", "application/json");

/// Method, path, headers, body.
type Case = (
    Method,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

const CASES: &[Case] = &[
    (Method::GET, "/auth/google/authorize?platform=web", &[], ""),
    (
        Method::GET,
        "/auth/google/authorize?return_to=http%3A%2F%2Fevil.example.test%2F",
        &[],
        "",
    ),
    (
        Method::GET,
        "/auth/google/authorize?login_challenge=short",
        &[],
        "",
    ),
    (Method::GET, "/auth/google/callback?code=abc", &[], ""),
    (
        Method::GET,
        "/auth/google/callback?code=abc&state=forged",
        &[("cookie", "upcoach_flow=x")],
        "",
    ),
    (
        Method::POST,
        "/auth/google/callback",
        &[("content-type", "application/x-www-form-urlencoded")],
        "code=abc",
    ),
    (
        Method::POST,
        "/auth/google/token",
        &[("content-type", "text/plain")],
        r#"{"id_token":"x"}"#,
    ),
    (
        Method::POST,
        "/auth/google/token",
        &[JSON],
        r#"{"id_token":"a.b.c","platform":"ios"}"#,
    ),
    (
        Method::POST,
        "/auth/google/token",
        &[JSON],
        r#"{"id_token":"a.b.c","nonce":"n","extra":1}"#,
    ),
    (Method::POST, "/auth/google/token", &[JSON], "{"),
    (
        Method::POST,
        "/auth/exchange",
        &[JSON],
        r#"{"login_code":"unknown"}"#,
    ),
    (
        Method::POST,
        "/auth/exchange",
        &[("content-type", "text/plain")],
        r#"{"login_code":"x"}"#,
    ),
    (
        Method::POST,
        "/auth/refresh",
        &[JSON],
        r#"{"refresh_token":"garbage"}"#,
    ),
    (
        Method::POST,
        "/auth/refresh",
        &[("content-type", "text/plain")],
        r#"{"refresh_token":"x"}"#,
    ),
    (Method::POST, "/auth/logout", &[JSON], "{}"),
    (
        Method::POST,
        "/auth/logout",
        &[JSON, ("authorization", "Bearer bad")],
        "{}",
    ),
    (Method::GET, "/auth/me", &[], ""),
    (
        Method::GET,
        "/auth/me",
        &[("authorization", "Bearer bad.token.here")],
        "",
    ),
    (
        Method::GET,
        "/auth/me",
        &[("authorization", "Basic dXNlcg==")],
        "",
    ),
    (
        Method::POST,
        "/auth/link/google",
        &[JSON],
        r#"{"id_token":"x"}"#,
    ),
    (Method::DELETE, "/auth/link/google", &[], ""),
    (Method::GET, "/auth/unknown/authorize", &[], ""),
    (
        Method::POST,
        "/auth/unknown/token",
        &[JSON],
        r#"{"id_token":"x","nonce":"n"}"#,
    ),
    (
        Method::GET,
        "/auth/unknown/callback?code=abc&state=s",
        &[],
        "",
    ),
    (Method::GET, "/.well-known/jwks.json", &[], ""),
    (
        Method::POST,
        "/dev/token",
        &[JSON],
        r#"{"roles":["admin"]}"#,
    ),
    (Method::GET, "/auth/goo%67le/authorize", &[], ""),
    (Method::GET, "/auth/%FF/authorize", &[], ""),
    (Method::HEAD, "/.well-known/jwks.json", &[], ""),
    (Method::GET, "/auth/nowhere", &[], ""),
    (Method::GET, "/auth/refresh", &[], ""),
];

/// What must be the same: status, error code, and these headers.
fn outcome(answer: &support::Answer) -> (u16, String, Vec<Option<String>>) {
    let headers = [
        "content-type",
        "cache-control",
        "www-authenticate",
        "retry-after",
        "ratelimit-policy",
    ]
    .iter()
    .map(|h| {
        answer
            .headers
            .get(*h)
            .map(|v| v.to_str().unwrap().to_owned())
    })
    .collect();
    (answer.status.as_u16(), answer.code(), headers)
}

#[tokio::test]
async fn every_auth_route_answers_as_the_reference_server_does() {
    let Some(provider) = OidcProvider::start().await else {
        return;
    };
    let (axum, _) = support::start_axum(&provider, false).await;
    let server = support::start_server(&provider).await;
    for (method, path, headers, body) in CASES {
        let ours = support::send(
            method.clone(),
            &format!("http://{axum}{path}"),
            headers,
            body,
        )
        .await;
        let theirs = support::send(
            method.clone(),
            &format!("http://{server}{path}"),
            headers,
            body,
        )
        .await;
        assert_eq!(
            outcome(&ours),
            outcome(&theirs),
            "{method} {path}: {:?} / {:?}",
            ours.body,
            theirs.body
        );
        if *method == Method::GET && path.starts_with("/.well-known") {
            assert_eq!(ours.json(), theirs.json(), "the same keys");
        }
        if let (Some(a), Some(b)) = (
            ours.headers.get("set-cookie"),
            theirs.headers.get("set-cookie"),
        ) {
            let attributes =
                |v: &http::HeaderValue| v.to_str().unwrap().split_once(';').unwrap().1.to_owned();
            assert_eq!(attributes(a), attributes(b), "{method} {path}");
        }
    }
}

#[tokio::test]
async fn the_dashboard_answers_as_the_reference_server_does() {
    let Some(provider) = OidcProvider::start().await else {
        return;
    };
    let (axum, _) = support::start_axum(&provider, false).await;
    let server = support::start_server(&provider).await;
    for (method, path) in [
        (Method::GET, "/dashboard"),
        (Method::GET, "/dashboard/"),
        (Method::GET, "/dashboard/dashboard.js"),
        (Method::GET, "/dashboard/config.json"),
        (Method::HEAD, "/dashboard/dashboard.css"),
        (Method::GET, "/dashboard/nope.txt"),
        (Method::GET, "/dashboard/a/b"),
        (Method::POST, "/dashboard"),
    ] {
        let (ours, theirs) = (
            support::send(method.clone(), &format!("http://{axum}{path}"), &[], "").await,
            support::send(method.clone(), &format!("http://{server}{path}"), &[], "").await,
        );
        let headers = |answer: &support::Answer| {
            [
                "content-type",
                "content-security-policy",
                "etag",
                "x-frame-options",
            ]
            .map(|h| {
                answer
                    .headers
                    .get(h)
                    .map(|v| v.to_str().unwrap().to_owned())
            })
        };
        assert_eq!(
            (ours.status, headers(&ours), &ours.body),
            (theirs.status, headers(&theirs), &theirs.body),
            "{method} {path}"
        );
        assert!(
            headers(&ours)[1].is_some(),
            "{path}: a policy on every answer"
        );
    }
    let config = support::send(
        Method::GET,
        &format!("http://{axum}/dashboard/config.json"),
        &[],
        "",
    )
    .await;
    assert_eq!(
        config.json(),
        serde_json::json!({"providers": ["google"], "dev_sign_in": false})
    );
}
