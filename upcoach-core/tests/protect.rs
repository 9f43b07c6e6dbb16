//! The rate-limit layer: keys, headers, events, proxies and outage policies.

use std::convert::Infallible;
use std::future::Ready;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tower_layer::Layer;
use tower_service::Service;
use upcoach_core::event::{Event, EventKind, EventLog, MemoryEventLog};
use upcoach_core::http::protect::{
    KeyBy, LimitConfig, OnOutage, RateLimitLayer, Rule, TrustedProxies, default_rules,
};
use upcoach_core::http::{ClientAddr, error_response};
use upcoach_core::limit::{LimitError, LimitFuture, MemoryLimiter, Quota, RateLimiter};
use upcoach_core::{Principal, Role, SessionId, TokenError, TokenVerifier, UserId};

/// The host's routes: 401 `token_missing` on `/auth/me` without a bearer, 200
/// otherwise; each answer says which client address the route saw.
#[derive(Clone)]
struct Routes;

impl Service<Request<()>> for Routes {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        if request.uri().path() == "/auth/me" && !request.headers().contains_key("authorization") {
            return std::future::ready(Ok(error_response(&TokenError::Missing)));
        }
        let seen = request
            .extensions()
            .get::<ClientAddr>()
            .map(|a| a.0.ip().to_string())
            .unwrap_or_default();
        std::future::ready(Ok(Response::new(Full::new(Bytes::from(seen)))))
    }
}

fn request(method: Method, path: &str, peer: &str) -> Request<()> {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .body(())
        .unwrap();
    r.extensions_mut()
        .insert(ClientAddr(SocketAddr::new(peer.parse().unwrap(), 40000)));
    r
}

async fn call<S>(service: &mut S, request: Request<()>) -> Response<String>
where
    S: Service<
            Request<()>,
            Response = Response<upcoach_core::http::protect::ProtectedBody<Full<Bytes>>>,
        >,
    S::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    let response = service.call(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, String::from_utf8(bytes.to_vec()).unwrap())
}

fn security_types(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Security(s) => Some(s.event_type.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_refresh_flood_from_one_address_is_limited_and_reported_once() {
    let events = Arc::new(MemoryEventLog::new(1000));
    let layer = RateLimitLayer::builder(Arc::new(MemoryLimiter::new()))
        .config(&LimitConfig::default())
        .events(events.clone())
        .build()
        .unwrap();
    let mut service = layer.layer(Routes);
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..120 {
        let response = call(
            &mut service,
            request(Method::POST, "/auth/refresh", "203.0.113.7"),
        )
        .await;
        statuses.push(response.status());
        last = Some(response);
    }
    let allowed = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(
        allowed, 60,
        "the default auth.refresh budget is 60 a minute"
    );
    assert_eq!(statuses[60], StatusCode::TOO_MANY_REQUESTS);
    let last = last.unwrap();
    assert_eq!(last.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = last.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=2).contains(&retry),
        "one place comes back each second: {retry}"
    );
    assert_eq!(
        last.headers()["ratelimit-policy"],
        r#""auth.refresh";q=60;w=60"#
    );
    assert!(
        last.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with(r#""auth.refresh";r=0;t="#)
    );
    assert!(
        last.body().contains(r#""code":"rate_limited""#),
        "{}",
        last.body()
    );

    // Another address is not affected.
    let other = call(
        &mut service,
        request(Method::POST, "/auth/refresh", "203.0.113.8"),
    )
    .await;
    assert_eq!(other.status(), StatusCode::OK);

    let rows = events.recent(EventKind::Security, 1000).await.unwrap();
    assert_eq!(
        security_types(&rows),
        ["rate_limited"],
        "one event for 60 refusals"
    );
    let Event::Security(row) = &rows[0] else {
        unreachable!()
    };
    assert_eq!(row.ip_address, Some("203.0.113.7".parse().unwrap()));
    assert_eq!(row.details["rule"], "auth.refresh");
    assert_eq!(layer.stats().limited, 60);
}

#[tokio::test]
async fn unmatched_routes_pass_without_a_check() {
    let layer = RateLimitLayer::builder(Arc::new(MemoryLimiter::new()))
        .config(&LimitConfig::default())
        .build()
        .unwrap();
    let mut service = layer.layer(Routes);
    for _ in 0..500 {
        let response = call(&mut service, request(Method::GET, "/health", "203.0.113.7")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!response.headers().contains_key("ratelimit"));
    }
    // The wrong method of a limited path is not limited either.
    let response = call(
        &mut service,
        request(Method::GET, "/auth/refresh", "203.0.113.7"),
    )
    .await;
    assert!(!response.headers().contains_key("ratelimit"));
    assert_eq!(layer.stats().checked, 0);
}

#[tokio::test]
async fn every_rule_s_route_is_checked_whatever_its_path_starts_with() {
    // The layer skips paths that start like no rule; each rule's own route (with its
    // parameters filled in) is checked, also a rule whose first segment is a parameter.
    let tenant = Rule::new(
        "tenant.reports",
        "/{tenant}/reports",
        KeyBy::Route,
        Quota::new(100, Duration::from_secs(60)).unwrap(),
    );
    let rules: Vec<Rule> = default_rules().into_iter().chain([tenant]).collect();
    let layer = RateLimitLayer::builder(Arc::new(MemoryLimiter::new()))
        .rules(rules.clone())
        .build()
        .unwrap();
    let mut service = layer.layer(Routes);
    for (i, rule) in rules.iter().enumerate() {
        let path: Vec<&str> = rule
            .path()
            .split('/')
            .map(|s| if s.starts_with('{') { "p1" } else { s })
            .collect();
        let response = call(
            &mut service,
            request(Method::POST, &path.join("/"), "203.0.113.7"),
        )
        .await;
        let method = if response.headers().contains_key("ratelimit") {
            Method::POST
        } else {
            Method::GET
        };
        let response = call(
            &mut service,
            request(method, &path.join("/"), "203.0.113.8"),
        )
        .await;
        assert!(
            response.headers().contains_key("ratelimit"),
            "{} on {}",
            rule.name(),
            path.join("/")
        );
        assert!(layer.stats().checked > i as u64);
    }
    let before = layer.stats().checked;
    for path in ["/health", "/api/analytics/x", "/", "/au"] {
        call(&mut service, request(Method::GET, path, "203.0.113.7")).await;
    }
    assert_eq!(layer.stats().checked, before, "no rule, no check");
}

#[tokio::test]
async fn ipv6_clients_are_limited_by_their_64() {
    let rule = Rule::new(
        "t",
        "/t",
        KeyBy::Address,
        Quota::new(2, Duration::from_secs(60)).unwrap(),
    );
    let layer = RateLimitLayer::builder(Arc::new(MemoryLimiter::new()))
        .rule(rule)
        .build()
        .unwrap();
    let mut service = layer.layer(Routes);
    let a = call(&mut service, request(Method::GET, "/t", "2001:db8:1:2::1")).await;
    let b = call(
        &mut service,
        request(Method::GET, "/t", "2001:db8:1:2:ffff::9"),
    )
    .await;
    let c = call(&mut service, request(Method::GET, "/t", "2001:db8:1:2::77")).await;
    let d = call(&mut service, request(Method::GET, "/t", "2001:db8:1:3::1")).await;
    assert_eq!(
        [a.status(), b.status(), c.status(), d.status()],
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::OK
        ]
    );
}

#[tokio::test]
async fn forwarded_headers_count_only_from_trusted_proxies() {
    let rule = Rule::new(
        "t",
        "/t",
        KeyBy::Address,
        Quota::new(1, Duration::from_secs(60)).unwrap(),
    );
    let layer = RateLimitLayer::builder(Arc::new(MemoryLimiter::new()))
        .rule(rule)
        .trusted_proxies(TrustedProxies::parse("10.0.0.0/8").unwrap())
        .build()
        .unwrap();
    let mut service = layer.layer(Routes);
    let spoofed = |xff: &str| {
        let mut r = request(Method::GET, "/t", "198.51.100.1");
        r.headers_mut()
            .insert("x-forwarded-for", xff.parse().unwrap());
        r
    };
    // An untrusted peer sends a new X-Forwarded-For each time: still one key.
    let first = call(&mut service, spoofed("192.0.2.1")).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        first.body(),
        "198.51.100.1",
        "the route sees the peer, not the header"
    );
    let second = call(&mut service, spoofed("192.0.2.2")).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);

    // Through the trusted proxy, each client is its own key; a client's own
    // X-Forwarded-For entries to the left of the proxy's are not believed.
    let via_proxy = |xff: &str| {
        let mut r = request(Method::GET, "/t", "10.1.2.3");
        r.headers_mut()
            .insert("x-forwarded-for", xff.parse().unwrap());
        r
    };
    let a = call(&mut service, via_proxy("6.6.6.6, 192.0.2.10")).await;
    assert_eq!(
        (a.status(), a.body().as_str()),
        (StatusCode::OK, "192.0.2.10")
    );
    let b = call(&mut service, via_proxy("7.7.7.7, 192.0.2.10")).await;
    assert_eq!(
        b.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "same client, spoofed left part"
    );
    let c = call(&mut service, via_proxy("192.0.2.11")).await;
    assert_eq!(c.status(), StatusCode::OK);
}

#[derive(Debug)]
struct Tokens;

#[async_trait]
impl TokenVerifier for Tokens {
    async fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let user: UserId = token.parse().map_err(|_| TokenError::Invalid {
            reason: "not a user",
        })?;
        Ok(Principal::new(
            user,
            vec![Role::ADMIN],
            SessionId::new(),
            std::time::SystemTime::now() + Duration::from_secs(60),
        ))
    }
}

#[tokio::test]
async fn user_rules_count_each_user_and_anonymous_callers_by_address() {
    let rule = Rule::new(
        "b",
        "/b/{room}",
        KeyBy::User,
        Quota::new(2, Duration::from_secs(60)).unwrap(),
    );
    let layer = RateLimitLayer::builder(Arc::new(MemoryLimiter::new()))
        .rule(rule)
        .verifier(Arc::new(Tokens))
        .build()
        .unwrap();
    let mut service = layer.layer(Routes);
    let as_user = |user: &UserId| {
        let mut r = request(Method::POST, "/b/x", "203.0.113.7");
        r.headers_mut()
            .insert("authorization", format!("Bearer {user}").parse().unwrap());
        r
    };
    let (alice, bob) = (UserId::new(), UserId::new());
    let mut seen = Vec::new();
    for r in [
        as_user(&alice),
        as_user(&alice),
        as_user(&alice),
        as_user(&bob),
    ] {
        seen.push(call(&mut service, r).await.status());
    }
    assert_eq!(
        seen,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::OK
        ],
        "same address, separate budgets per user"
    );
    // No valid token: counted by address.
    let anonymous = || request(Method::POST, "/b/x", "203.0.113.9");
    assert_eq!(
        call(&mut service, anonymous()).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        call(&mut service, anonymous()).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        call(&mut service, anonymous()).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn provider_rules_share_one_budget_per_provider() {
    let rule = Rule::new(
        "p",
        "/auth/{provider}/{step}",
        KeyBy::Provider,
        Quota::new(2, Duration::from_secs(60)).unwrap(),
    );
    let layer = RateLimitLayer::builder(Arc::new(MemoryLimiter::new()))
        .rule(rule)
        .build()
        .unwrap();
    let mut service = layer.layer(Routes);
    let mut statuses = Vec::new();
    for (path, peer) in [
        ("/auth/google/token", "192.0.2.1"),
        ("/auth/google/authorize", "192.0.2.2"),
        ("/auth/google/token", "192.0.2.3"),
        ("/auth/apple/token", "192.0.2.3"),
    ] {
        statuses.push(
            call(&mut service, request(Method::POST, path, peer))
                .await
                .status(),
        );
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::OK
        ]
    );
}

/// A limiter whose store is down.
#[derive(Debug)]
struct Down;

#[async_trait]
impl RateLimiter for Down {
    fn check<'a>(&'a self, _: &'a str, _: &'a str, _: Quota) -> LimitFuture<'a> {
        LimitFuture::ready(Err(LimitError::Unavailable("connection refused".into())))
    }
    async fn block(&self, _: &str, _: Duration) -> Result<(), LimitError> {
        Err(LimitError::Unavailable("connection refused".into()))
    }
}

#[tokio::test]
async fn an_outage_fails_sign_in_closed_and_falls_back_elsewhere() {
    let layer = RateLimitLayer::builder(Arc::new(Down))
        .config(&LimitConfig::default())
        .build()
        .unwrap();
    assert!(
        layer
            .rules()
            .iter()
            .filter(|r| r.name().starts_with("auth."))
            .all(|r| r.outage() == OnOutage::FailClosed)
    );
    let mut service = layer.layer(Routes);
    let refresh = call(
        &mut service,
        request(Method::POST, "/auth/refresh", "203.0.113.7"),
    )
    .await;
    assert_eq!(refresh.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refresh.body().contains("rate_limiter_unavailable"));
    // Realtime connects are counted locally: 60 a minute, then 429.
    let mut statuses = Vec::new();
    for _ in 0..61 {
        statuses.push(
            call(
                &mut service,
                request(Method::GET, "/api/dashboard/realtime/sse", "203.0.113.7"),
            )
            .await
            .status(),
        );
    }
    assert!(statuses[..60].iter().all(|s| *s == StatusCode::OK));
    assert_eq!(statuses[60], StatusCode::TOO_MANY_REQUESTS);
    // Routes without a rule never notice.
    assert_eq!(
        call(&mut service, request(Method::GET, "/health", "203.0.113.7"))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(layer.stats().unavailable, 1);
    assert_eq!(layer.stats().fell_back, 61);
}

#[tokio::test]
async fn refused_bearers_are_recorded_with_the_client() {
    let events = Arc::new(MemoryEventLog::new(100));
    let layer = RateLimitLayer::builder(Arc::new(MemoryLimiter::new()))
        .events(events.clone())
        .build()
        .unwrap();
    let mut service = layer.layer(Routes);
    let mut r = request(Method::GET, "/auth/me?access_token=x", "203.0.113.7");
    r.headers_mut()
        .insert("user-agent", "curl/8".parse().unwrap());
    assert_eq!(
        call(&mut service, r).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let rows = events.recent(EventKind::Security, 10).await.unwrap();
    let Event::Security(row) = &rows[0] else {
        panic!("{rows:?}")
    };
    assert_eq!(row.event_type, "token_rejected");
    assert_eq!(row.details["code"], "token_missing");
    assert_eq!(row.details["path"], "/auth/me", "the path, never the query");
    assert_eq!(row.ip_address, Some("203.0.113.7".parse().unwrap()));
    assert_eq!(row.user_agent.as_deref(), Some("curl/8"));
}

#[test]
fn the_default_rules_cover_the_reference_routes() {
    let names: Vec<_> = default_rules()
        .iter()
        .map(|r| r.name().to_owned())
        .collect();
    for name in [
        "auth.authorize",
        "auth.callback",
        "auth.token",
        "auth.exchange",
        "auth.refresh",
        "realtime.broadcast",
        "realtime.connect",
    ] {
        assert!(names.iter().any(|n| n == name), "{name}");
    }
}
