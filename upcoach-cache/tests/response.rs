//! The response-cache layer against the RFC 9111 cases it promises, one test each.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower_layer::Layer;
use tower_service::Service;
use upcoach_cache::response::CachedBody;
use upcoach_cache::{
    CacheRule, MemoryStore, MemoryTagVersions, ResponseCacheLayer, TieredCache, TieredOptions,
};
use upcoach_core::{Principal, Role, SessionId, TokenError, TokenVerifier, UserId};

/// Answers by path: `/api/x?status=404`, `?cc=no-store`, `?vary=accept-language`,
/// `?cookie=1` (or the request header `x-answer-vary: accept-language`, for a resource
/// whose answers start or stop varying); the body names the call number and the
/// Accept-Language.
#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
}

impl Service<Request<()>> for Origin {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let query = req.uri().query().unwrap_or("").to_owned();
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_owned))
        };
        let lang = req
            .headers()
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let mut response = Response::new(Full::new(Bytes::from(format!("call {n} lang {lang}"))));
        if let Some(status) = param("status") {
            *response.status_mut() = StatusCode::from_u16(status.parse().unwrap()).unwrap();
        }
        if let Some(cc) = param("cc") {
            response
                .headers_mut()
                .insert("cache-control", cc.parse().unwrap());
        }
        if let Some(vary) = param("vary") {
            response.headers_mut().insert("vary", vary.parse().unwrap());
        }
        if let Some(vary) = req.headers().get("x-answer-vary") {
            response.headers_mut().insert("vary", vary.clone());
        }
        if param("cookie").is_some() {
            response
                .headers_mut()
                .insert("set-cookie", "session=abc".parse().unwrap());
        }
        ready(Ok(response))
    }
}

#[derive(Debug)]
struct Tokens;

#[async_trait]
impl TokenVerifier for Tokens {
    async fn verify(&self, bearer: &str) -> Result<Principal, TokenError> {
        let (user, roles) = match bearer {
            "alice" => (1, vec![Role::ADMIN]),
            "alice-demoted" => (1, vec![]),
            "bob" => (2, vec![]),
            _ => return Err(TokenError::Invalid { reason: "unknown" }),
        };
        let user = UserId::from_uuid(uuid::Uuid::from_u128(user));
        Ok(Principal::new(
            user,
            roles,
            SessionId::new(),
            SystemTime::now() + Duration::from_secs(60),
        ))
    }
}

struct Setup {
    service: upcoach_cache::response::ResponseCache<Origin>,
    calls: Arc<AtomicUsize>,
    cache: Arc<TieredCache>,
}

fn setup(rules: Vec<CacheRule>) -> Setup {
    let cache = Arc::new(TieredCache::new(
        Arc::new(MemoryStore::new(16 << 20)),
        Arc::new(MemoryTagVersions::default()),
        TieredOptions::default(),
    ));
    let origin = Origin::default();
    let calls = origin.calls.clone();
    let layer = ResponseCacheLayer::new(cache.clone(), rules).with_verifier(Arc::new(Tokens));
    Setup {
        service: layer.layer(origin),
        calls,
        cache,
    }
}

fn shared_rule() -> CacheRule {
    CacheRule::new(
        "/api",
        Duration::from_secs(300),
        &["analytics", "dashboard"],
    )
}

struct Got {
    status: StatusCode,
    x_cache: Option<String>,
    etag: Option<String>,
    body: String,
}

async fn send(s: &mut Setup, method: Method, uri: &str, headers: &[(&str, &str)]) -> Got {
    let mut builder = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let response: Response<CachedBody<Full<Bytes>>> =
        s.service.call(builder.body(()).unwrap()).await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    Got {
        status: response.status(),
        x_cache: header("x-cache"),
        etag: header("etag"),
        body: String::from_utf8(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap(),
    }
}

#[tokio::test]
async fn a_200_get_is_stored_and_served_with_etag_and_x_cache() {
    let mut s = setup(vec![shared_rule()]);
    let first = send(&mut s, Method::GET, "/api/report", &[]).await;
    assert_eq!(
        (first.status, first.x_cache.as_deref()),
        (StatusCode::OK, Some("MISS"))
    );
    let second = send(&mut s, Method::GET, "/api/report", &[]).await;
    assert_eq!(
        (second.x_cache.as_deref(), second.body.as_str()),
        (Some("HIT"), "call 1 lang -")
    );
    assert!(first.etag.is_some() && first.etag == second.etag);
    assert_eq!(s.calls.load(Ordering::SeqCst), 1);
    let other_query = send(&mut s, Method::GET, "/api/report?window=2h", &[]).await;
    assert_eq!(
        other_query.x_cache.as_deref(),
        Some("MISS"),
        "the query is part of the key"
    );
}

#[tokio::test]
async fn if_none_match_gets_304() {
    let mut s = setup(vec![shared_rule()]);
    let first = send(&mut s, Method::GET, "/api/report", &[]).await;
    let etag = first.etag.unwrap();
    let hit = send(
        &mut s,
        Method::GET,
        "/api/report",
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(
        (hit.status, hit.body.as_str()),
        (StatusCode::NOT_MODIFIED, "")
    );
    let other = send(
        &mut s,
        Method::GET,
        "/api/report",
        &[("if-none-match", "\"nope\"")],
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    let list = send(
        &mut s,
        Method::GET,
        "/api/report",
        &[("if-none-match", &format!("\"x\", W/{etag}"))],
    )
    .await;
    assert_eq!(
        list.status,
        StatusCode::NOT_MODIFIED,
        "weak comparison over a list"
    );
}

#[tokio::test]
async fn head_is_answered_from_the_get_entry_without_a_body() {
    let mut s = setup(vec![shared_rule()]);
    send(&mut s, Method::GET, "/api/report", &[]).await;
    let head = send(&mut s, Method::HEAD, "/api/report", &[]).await;
    assert_eq!(
        (head.status, head.x_cache.as_deref(), head.body.as_str()),
        (StatusCode::OK, Some("HIT"), "")
    );
    assert_eq!(s.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn only_get_and_head_200s_under_a_rule_are_stored() {
    let mut s = setup(vec![shared_rule()]);
    for _ in 0..2 {
        send(&mut s, Method::POST, "/api/report", &[]).await;
        send(&mut s, Method::GET, "/api/report?status=404", &[]).await;
        send(&mut s, Method::GET, "/api/report?status=500", &[]).await;
        let outside = send(&mut s, Method::GET, "/elsewhere", &[]).await;
        assert_eq!(outside.x_cache, None, "no rule, untouched");
    }
    assert_eq!(s.calls.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn no_store_and_private_are_respected() {
    let mut s = setup(vec![shared_rule()]);
    for uri in [
        "/api/a?cc=no-store",
        "/api/b?cc=private",
        "/api/c?cc=max-age=60,private",
    ] {
        send(&mut s, Method::GET, uri, &[]).await;
        let again = send(&mut s, Method::GET, uri, &[]).await;
        assert_eq!(again.x_cache.as_deref(), Some("MISS"), "{uri}");
    }
    send(&mut s, Method::GET, "/api/d", &[]).await;
    let bypass = send(
        &mut s,
        Method::GET,
        "/api/d",
        &[("cache-control", "no-store")],
    )
    .await;
    assert_eq!(
        bypass.x_cache.as_deref(),
        Some("MISS"),
        "a no-store request is not answered from the cache"
    );
    assert_eq!(s.calls.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn vary_keys_by_the_named_headers_and_star_is_never_stored() {
    let mut s = setup(vec![shared_rule()]);
    let uri = "/api/i18n?vary=accept-language";
    let en = send(&mut s, Method::GET, uri, &[("accept-language", "en")]).await;
    let de = send(&mut s, Method::GET, uri, &[("accept-language", "de")]).await;
    assert_eq!(
        (en.x_cache.as_deref(), de.x_cache.as_deref()),
        (Some("MISS"), Some("MISS"))
    );
    let en_again = send(&mut s, Method::GET, uri, &[("accept-language", "en")]).await;
    assert_eq!(
        (en_again.x_cache.as_deref(), en_again.body.as_str()),
        (Some("HIT"), "call 1 lang en")
    );
    let de_again = send(&mut s, Method::GET, uri, &[("accept-language", "de")]).await;
    assert_eq!(de_again.body, "call 2 lang de");

    send(&mut s, Method::GET, "/api/any?vary=*", &[]).await;
    let star = send(&mut s, Method::GET, "/api/any?vary=*", &[]).await;
    assert_eq!(star.x_cache.as_deref(), Some("MISS"));
}

/// A resource's entry holds its answer while it varies on nothing, and its `Vary` list
/// once it does: each form is found after the other, and no variant gets another's
/// answer.
#[tokio::test]
async fn a_resource_that_starts_or_stops_varying_is_found_in_its_new_form() {
    let mut s = setup(vec![shared_rule()]);
    let uri = "/api/report";
    // The first byte of the resource's entry: 0 for the answer itself, 1 for a Vary list.
    let form = async |s: &Setup| {
        let entry = s.cache.get("http:r:-:/api/report").await.unwrap();
        entry.and_then(|bytes| bytes.first().copied())
    };
    let first = send(&mut s, Method::GET, uri, &[("accept-language", "en")]).await;
    assert_eq!(
        form(&s).await,
        Some(0),
        "the answer under the resource's key"
    );
    let plain = send(&mut s, Method::GET, uri, &[("accept-language", "de")]).await;
    assert_eq!(
        (plain.x_cache.as_deref(), plain.body.as_str()),
        (Some("HIT"), first.body.as_str()),
        "no Vary: one answer for every caller"
    );

    s.cache.invalidate_tags(&["analytics"]).await.unwrap();
    let varies = [("x-answer-vary", "accept-language")];
    let en = send(
        &mut s,
        Method::GET,
        uri,
        &[varies[0], ("accept-language", "en")],
    )
    .await;
    let de = send(
        &mut s,
        Method::GET,
        uri,
        &[varies[0], ("accept-language", "de")],
    )
    .await;
    assert_eq!(
        (en.x_cache.as_deref(), de.x_cache.as_deref()),
        (Some("MISS"), Some("MISS")),
        "after the invalidation, and once it varies, each language is its own"
    );
    assert_eq!(form(&s).await, Some(1), "its Vary list there now");
    let (en_body, de_body) = (en.body, de.body);
    assert_eq!(
        (en_body.as_str(), de_body.as_str()),
        ("call 2 lang en", "call 3 lang de")
    );
    for (lang, body) in [("en", &en_body), ("de", &de_body), ("en", &en_body)] {
        let again = send(&mut s, Method::GET, uri, &[("accept-language", lang)]).await;
        assert_eq!(
            (again.x_cache.as_deref(), &again.body),
            (Some("HIT"), body),
            "{lang}: found through the Vary list"
        );
    }

    s.cache.invalidate_tags(&["dashboard"]).await.unwrap();
    let stopped = send(&mut s, Method::GET, uri, &[("accept-language", "fr")]).await;
    let any = send(&mut s, Method::GET, uri, &[("accept-language", "en")]).await;
    assert_eq!(
        (stopped.x_cache.as_deref(), stopped.body.as_str()),
        (Some("MISS"), "call 4 lang fr")
    );
    assert_eq!(
        (any.x_cache.as_deref(), any.body.as_str()),
        (Some("HIT"), "call 4 lang fr"),
        "varying on nothing again: its answer is back under the resource's key"
    );
    assert_eq!(form(&s).await, Some(0));
    assert_eq!(s.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn authorization_and_set_cookie_are_never_shared() {
    let mut s = setup(vec![shared_rule()]);
    send(
        &mut s,
        Method::GET,
        "/api/me",
        &[("authorization", "Bearer alice")],
    )
    .await;
    let again = send(
        &mut s,
        Method::GET,
        "/api/me",
        &[("authorization", "Bearer alice")],
    )
    .await;
    assert_eq!(
        again.x_cache, None,
        "a shared rule passes authorized requests through"
    );
    let anonymous = send(&mut s, Method::GET, "/api/me", &[]).await;
    assert_eq!(
        anonymous.x_cache.as_deref(),
        Some("MISS"),
        "nor does the anonymous one get alice's answer"
    );

    send(&mut s, Method::GET, "/api/session?cookie=1", &[]).await;
    let cookie = send(&mut s, Method::GET, "/api/session?cookie=1", &[]).await;
    assert_eq!(
        cookie.x_cache.as_deref(),
        Some("MISS"),
        "Set-Cookie is not stored on a shared rule"
    );
}

#[tokio::test]
async fn a_per_user_rule_keys_by_the_verified_user() {
    let mut s = setup(vec![shared_rule().per_user()]);
    let alice = send(
        &mut s,
        Method::GET,
        "/api/me",
        &[("authorization", "Bearer alice")],
    )
    .await;
    let bob = send(
        &mut s,
        Method::GET,
        "/api/me",
        &[("authorization", "Bearer bob")],
    )
    .await;
    assert_ne!(alice.body, bob.body);
    let alice_again = send(
        &mut s,
        Method::GET,
        "/api/me",
        &[("authorization", "Bearer alice")],
    )
    .await;
    assert_eq!(
        (alice_again.x_cache.as_deref(), alice_again.body),
        (Some("HIT"), alice.body)
    );
    let forged = send(
        &mut s,
        Method::GET,
        "/api/me",
        &[("authorization", "Bearer mallory")],
    )
    .await;
    assert_eq!(
        forged.x_cache, None,
        "an unverifiable token never gets a cached answer"
    );
    assert_eq!(s.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn invalidating_a_tag_makes_the_next_request_a_miss() {
    let mut s = setup(vec![shared_rule()]);
    send(&mut s, Method::GET, "/api/report", &[]).await;
    assert_eq!(
        send(&mut s, Method::GET, "/api/report", &[])
            .await
            .x_cache
            .as_deref(),
        Some("HIT")
    );
    s.cache.invalidate_tags(&["dashboard"]).await.unwrap();
    let after = send(&mut s, Method::GET, "/api/report", &[]).await;
    assert_eq!(
        (after.x_cache.as_deref(), after.body.as_str()),
        (Some("MISS"), "call 2 lang -")
    );
}

#[tokio::test]
async fn should_cache_can_refuse() {
    let rule = shared_rule().should_cache(|req, _res| !req.uri.path().ends_with("/live"));
    let mut s = setup(vec![rule]);
    send(&mut s, Method::GET, "/api/live", &[]).await;
    assert_eq!(
        send(&mut s, Method::GET, "/api/live", &[])
            .await
            .x_cache
            .as_deref(),
        Some("MISS")
    );
    send(&mut s, Method::GET, "/api/stored", &[]).await;
    assert_eq!(
        send(&mut s, Method::GET, "/api/stored", &[])
            .await
            .x_cache
            .as_deref(),
        Some("HIT")
    );
}

#[tokio::test]
async fn a_head_first_stores_nothing_and_the_get_after_it_gets_the_body() {
    let mut s = setup(vec![shared_rule()]);
    let head = send(&mut s, Method::HEAD, "/api/report", &[]).await;
    assert_eq!(
        head.x_cache.as_deref(),
        Some("MISS"),
        "passed through, not stored"
    );
    let get = send(&mut s, Method::GET, "/api/report", &[]).await;
    assert_eq!(
        (get.x_cache.as_deref(), get.body.as_str()),
        (Some("MISS"), "call 2 lang -")
    );
    let again = send(&mut s, Method::GET, "/api/report", &[]).await;
    assert_eq!(
        (again.x_cache.as_deref(), again.body.as_str()),
        (Some("HIT"), "call 2 lang -")
    );
}

#[tokio::test]
async fn no_cache_and_zero_max_age_are_not_reused() {
    let mut s = setup(vec![shared_rule()]);
    for uri in [
        "/api/a?cc=no-cache",
        "/api/b?cc=max-age=0",
        "/api/c?cc=s-maxage=0",
    ] {
        send(&mut s, Method::GET, uri, &[]).await;
        assert_eq!(
            send(&mut s, Method::GET, uri, &[]).await.x_cache.as_deref(),
            Some("MISS"),
            "{uri}"
        );
    }
    send(&mut s, Method::GET, "/api/d", &[]).await;
    let revalidated = send(
        &mut s,
        Method::GET,
        "/api/d",
        &[("cache-control", "no-cache")],
    )
    .await;
    assert_eq!(
        (revalidated.x_cache.as_deref(), revalidated.body.as_str()),
        (Some("MISS"), "call 8 lang -")
    );
    let after = send(&mut s, Method::GET, "/api/d", &[]).await;
    assert_eq!(
        (after.x_cache.as_deref(), after.body.as_str()),
        (Some("HIT"), "call 8 lang -"),
        "and stored again"
    );
}

#[tokio::test]
async fn a_hit_is_served_only_to_who_the_rule_authorizes_and_roles_are_in_the_key() {
    let rule = shared_rule().per_user().authorize(|p| p.is_admin());
    let mut s = setup(vec![rule]);
    let admin = send(
        &mut s,
        Method::GET,
        "/api/admin",
        &[("authorization", "Bearer alice")],
    )
    .await;
    assert_eq!(admin.x_cache.as_deref(), Some("MISS"));
    assert_eq!(
        send(
            &mut s,
            Method::GET,
            "/api/admin",
            &[("authorization", "Bearer alice")]
        )
        .await
        .x_cache
        .as_deref(),
        Some("HIT")
    );
    // The same user without the role reaches the handler, every time.
    for _ in 0..2 {
        let demoted = send(
            &mut s,
            Method::GET,
            "/api/admin",
            &[("authorization", "Bearer alice-demoted")],
        )
        .await;
        assert_eq!(demoted.x_cache, None);
    }
    assert_eq!(s.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_answer_computed_across_an_invalidation_is_not_stored_as_fresh() {
    // The origin invalidates the tag while it computes (as a concurrent writer would).
    #[derive(Clone)]
    struct Invalidating(Arc<TieredCache>, Arc<AtomicUsize>);
    impl Service<Request<()>> for Invalidating {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
        >;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<()>) -> Self::Future {
            let (cache, calls) = (self.0.clone(), self.1.clone());
            Box::pin(async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 {
                    cache.invalidate_tags(&["analytics"]).await.unwrap();
                }
                Ok(Response::new(Full::new(Bytes::from(format!("call {n}")))))
            })
        }
    }
    let cache = Arc::new(TieredCache::new(
        Arc::new(MemoryStore::new(16 << 20)),
        Arc::new(MemoryTagVersions::default()),
        TieredOptions::default(),
    ));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = ResponseCacheLayer::new(cache.clone(), vec![shared_rule()])
        .layer(Invalidating(cache, calls.clone()));
    for expected in ["MISS", "MISS", "HIT"] {
        let response = service
            .call(Request::get("/api/report").body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.headers()["x-cache"], expected);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the first answer was not reused"
    );
}
