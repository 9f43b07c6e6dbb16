//! Id-token verification: every rejection the issue lists, each with its code, against
//! a JWK Set served over HTTP by the test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use upcoach_auth::oidc::{IdTokenError, IdTokenRules, IdTokenVerifier, JwksCache};
use upcoach_core::ManualClock;

const ISSUER: &str = "https://accounts.example.test";
const CLIENT: &str = "web-client.example.test";
const IOS_CLIENT: &str = "ios-client.example.test";
const PROVIDER_KID: &str = "provider-key-1";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Serves `body` as a JWK Set (or 503 when `body` is None), counting requests.
async fn key_server(body: Option<Vec<u8>>) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let response = match &body {
                        Some(body) => hyper::Response::builder()
                            .header("content-type", "application/json")
                            .header("cache-control", "public, max-age=300")
                            .body(Full::new(Bytes::from(body.clone()))),
                        None => hyper::Response::builder()
                            .status(503)
                            .body(Full::new(Bytes::new())),
                    };
                    async move { response }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, hits)
}

struct Setup {
    verifier: IdTokenVerifier,
    clock: Arc<ManualClock>,
    fetches: Arc<AtomicU64>,
}

async fn setup() -> Setup {
    let (addr, fetches) = key_server(Some(fixture("provider.jwks.json"))).await;
    let clock = Arc::new(ManualClock::starting_now());
    let keys = JwksCache::new(
        format!("http://{addr}/certs"),
        oauth2::reqwest::Client::new(),
    );
    let rules = IdTokenRules::rs256([ISSUER], [CLIENT, IOS_CLIENT]);
    Setup {
        verifier: IdTokenVerifier::new(rules, Arc::new(keys), clock.clone()),
        clock,
        fetches,
    }
}

fn now(clock: &ManualClock) -> u64 {
    use upcoach_core::Clock;
    clock.now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn claims(clock: &ManualClock) -> Value {
    let now = now(clock);
    json!({
        "iss": ISSUER, "aud": CLIENT, "sub": "10769150350006150715113082367",
        "email": "jan@example.test", "email_verified": true,
        "iat": now, "exp": now + 3600, "nonce": "n-0S6_WzA2Mj",
    })
}

fn sign_with(key: &str, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_rsa_der(&fixture(&format!("{key}.der"))),
    )
    .unwrap()
}

fn sign(claims: &Value) -> String {
    sign_with("provider", Some(PROVIDER_KID), claims)
}

/// A token with any header, signed RS256 by `key`.
fn sign_header(key: &str, header: Value, claims: &Value) -> String {
    let head = URL_SAFE_NO_PAD.encode(header.to_string());
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let message = format!("{head}.{body}");
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_rsa_der(&fixture(&format!("{key}.der"))),
        Algorithm::RS256,
    )
    .unwrap();
    format!("{message}.{signature}")
}

async fn refused(s: &Setup, token: &str, nonce: Option<&str>) -> IdTokenError {
    s.verifier
        .verify(token, nonce)
        .await
        .expect_err("the token must be refused")
}

#[tokio::test]
async fn a_good_token_is_accepted_and_its_keys_are_cached() {
    let s = setup().await;
    let token = sign(&claims(&s.clock));
    for _ in 0..50 {
        let verified = s
            .verifier
            .verify(&token, Some("n-0S6_WzA2Mj"))
            .await
            .unwrap();
        assert_eq!(verified.sub, "10769150350006150715113082367");
        assert!(verified.email_verified());
    }
    assert_eq!(
        s.fetches.load(Ordering::SeqCst),
        1,
        "one fetch, then the cache"
    );
}

#[tokio::test]
async fn alg_none_is_refused() {
    let s = setup().await;
    let head = URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": PROVIDER_KID}).to_string());
    let body = URL_SAFE_NO_PAD.encode(claims(&s.clock).to_string());
    let e = refused(&s, &format!("{head}.{body}."), None).await;
    assert_eq!(e.code(), "id_token_alg_not_allowed");
}

#[tokio::test]
async fn hs256_signed_with_the_providers_public_key_is_refused() {
    let s = setup().await;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(PROVIDER_KID.into());
    let token = jsonwebtoken::encode(
        &header,
        &claims(&s.clock),
        &EncodingKey::from_secret(&fixture("provider.pub.pem")),
    )
    .unwrap();
    assert_eq!(
        refused(&s, &token, None).await.code(),
        "id_token_alg_not_allowed"
    );
}

#[tokio::test]
async fn a_token_signed_by_another_key_is_refused() {
    let s = setup().await;
    let token = sign_with("attacker", Some(PROVIDER_KID), &claims(&s.clock));
    assert_eq!(
        refused(&s, &token, None).await.code(),
        "id_token_bad_signature"
    );
}

#[tokio::test]
async fn an_unknown_kid_is_refused_after_one_refetch_and_a_flood_fetches_no_more() {
    let s = setup().await;
    s.verifier
        .verify(&sign(&claims(&s.clock)), None)
        .await
        .unwrap();
    assert_eq!(s.fetches.load(Ordering::SeqCst), 1);
    let token = sign_with("provider", Some("rotated-key-2"), &claims(&s.clock));
    assert_eq!(
        refused(&s, &token, None).await.code(),
        "id_token_unknown_kid"
    );
    assert_eq!(s.fetches.load(Ordering::SeqCst), 2, "exactly one re-fetch");
    for i in 0..100 {
        let token = sign_with("provider", Some(&format!("random-{i}")), &claims(&s.clock));
        assert_eq!(
            refused(&s, &token, None).await.code(),
            "id_token_unknown_kid"
        );
    }
    assert_eq!(
        s.fetches.load(Ordering::SeqCst),
        2,
        "random kids do not hammer the provider"
    );
}

#[tokio::test]
async fn a_kid_with_path_or_url_characters_is_refused() {
    let s = setup().await;
    for kid in [
        "../../etc/passwd",
        "https://evil.example/key",
        "a b",
        "",
        "k/1",
    ] {
        let token = sign_with("provider", Some(kid), &claims(&s.clock));
        assert_eq!(
            refused(&s, &token, None).await.code(),
            "id_token_invalid_kid",
            "{kid:?}"
        );
    }
    let token = sign_with("provider", None, &claims(&s.clock));
    assert_eq!(
        refused(&s, &token, None).await.code(),
        "id_token_invalid_kid",
        "no kid at all"
    );
    assert_eq!(
        s.fetches.load(Ordering::SeqCst),
        0,
        "refused before any key lookup"
    );
}

#[tokio::test]
async fn jku_x5u_and_an_embedded_jwk_are_ignored() {
    let s = setup().await;
    let (evil, evil_hits) = key_server(Some(fixture("attacker.jwks.json"))).await;
    let attacker_jwk: Value =
        serde_json::from_slice::<Value>(&fixture("attacker.jwks.json")).unwrap()["keys"][0].clone();
    let claims = claims(&s.clock);
    // The attacker's own key id, with a URL to the attacker's keys.
    for field in ["jku", "x5u"] {
        let header =
            json!({"alg": "RS256", "kid": "attacker-key-1", field: format!("http://{evil}/certs")});
        let token = sign_header("attacker", header, &claims);
        assert_eq!(
            refused(&s, &token, None).await.code(),
            "id_token_unknown_kid",
            "{field}"
        );
    }
    // The provider's key id, with the attacker's key embedded.
    let header = json!({"alg": "RS256", "kid": PROVIDER_KID, "jwk": attacker_jwk});
    let token = sign_header("attacker", header, &claims);
    assert_eq!(
        refused(&s, &token, None).await.code(),
        "id_token_bad_signature"
    );
    assert_eq!(
        evil_hits.load(Ordering::SeqCst),
        0,
        "the attacker's URL is never fetched"
    );
}

async fn refused_claims(edit: impl FnOnce(&mut Value, u64)) -> String {
    let s = setup().await;
    let mut c = claims(&s.clock);
    edit(&mut c, now(&s.clock));
    refused(&s, &sign(&c), Some("n-0S6_WzA2Mj"))
        .await
        .code()
        .to_owned()
}

#[tokio::test]
async fn a_wrong_issuer_is_refused() {
    assert_eq!(
        refused_claims(|c, _| c["iss"] = json!("https://evil.example")).await,
        "id_token_wrong_issuer"
    );
    assert_eq!(
        refused_claims(|c, _| c["iss"] = json!("accounts.example.test")).await,
        "id_token_wrong_issuer"
    );
}

#[tokio::test]
async fn a_missing_or_foreign_audience_is_refused() {
    assert_eq!(
        refused_claims(|c, _| {
            c.as_object_mut().unwrap().remove("aud");
        })
        .await,
        "id_token_missing_claim"
    );
    assert_eq!(
        refused_claims(|c, _| c["aud"] = json!("someone-else")).await,
        "id_token_wrong_audience"
    );
    assert_eq!(
        refused_claims(|c, _| c["aud"] = json!(["someone-else", "another"])).await,
        "id_token_wrong_audience"
    );
    assert_eq!(
        refused_claims(|c, _| c["aud"] = json!(42)).await,
        "id_token_invalid_claim"
    );
}

#[tokio::test]
async fn several_audiences_need_a_trusted_azp() {
    assert_eq!(
        refused_claims(|c, _| c["aud"] = json!([CLIENT, "someone-else"])).await,
        "id_token_untrusted_azp"
    );
    assert_eq!(
        refused_claims(|c, _| {
            c["aud"] = json!([CLIENT, "someone-else"]);
            c["azp"] = json!("someone-else");
        })
        .await,
        "id_token_untrusted_azp"
    );
    let s = setup().await;
    let mut c = claims(&s.clock);
    c["aud"] = json!([CLIENT, "someone-else"]);
    c["azp"] = json!(IOS_CLIENT);
    assert!(
        s.verifier.verify(&sign(&c), None).await.is_ok(),
        "azp is one of ours"
    );
}

#[tokio::test]
async fn an_expired_token_is_refused_beyond_the_leeway_only() {
    assert_eq!(
        refused_claims(|c, now| c["exp"] = json!(now - 120)).await,
        "id_token_expired"
    );
    let s = setup().await;
    let mut c = claims(&s.clock);
    c["exp"] = json!(now(&s.clock) - 30);
    assert!(
        s.verifier.verify(&sign(&c), None).await.is_ok(),
        "30 s late is within the 60 s leeway"
    );
    s.clock.advance(Duration::from_secs(31));
    assert_eq!(
        refused(&s, &sign(&c), None).await.code(),
        "id_token_expired"
    );
}

#[tokio::test]
async fn accepted_until_is_the_first_instant_the_token_is_refused() {
    let s = setup().await;
    let c = claims(&s.clock);
    let token = sign(&c);
    let verified = s.verifier.verify(&token, None).await.unwrap();
    let until = s
        .verifier
        .accepted_until(&verified)
        .expect("an exp that fits");
    let exp = UNIX_EPOCH + Duration::from_secs(c["exp"].as_u64().unwrap());
    assert!(until >= exp + s.verifier.rules().leeway, "{until:?}");
    s.clock.set(until - Duration::from_nanos(1));
    assert!(
        s.verifier.verify(&token, None).await.is_ok(),
        "accepted until then"
    );
    s.clock.set(until);
    assert_eq!(refused(&s, &token, None).await.code(), "id_token_expired");
}

#[tokio::test]
async fn exp_and_nbf_as_strings_are_refused() {
    assert_eq!(
        refused_claims(|c, now| c["exp"] = json!((now + 3600).to_string())).await,
        "id_token_invalid_claim"
    );
    assert_eq!(
        refused_claims(|c, now| c["nbf"] = json!(now.to_string())).await,
        "id_token_invalid_claim"
    );
    assert_eq!(
        refused_claims(|c, now| c["iat"] = json!(now.to_string())).await,
        "id_token_invalid_claim"
    );
    assert_eq!(
        refused_claims(|c, now| c["nbf"] = json!(now + 600)).await,
        "id_token_not_yet_valid"
    );
}

#[tokio::test]
async fn iat_far_in_the_future_is_refused() {
    assert_eq!(
        refused_claims(|c, now| {
            c["iat"] = json!(now + 3600);
            c["exp"] = json!(now + 7200);
        })
        .await,
        "id_token_issued_in_future"
    );
}

#[tokio::test]
async fn a_missing_sub_is_refused() {
    assert_eq!(
        refused_claims(|c, _| {
            c.as_object_mut().unwrap().remove("sub");
        })
        .await,
        "id_token_missing_claim"
    );
    assert_eq!(
        refused_claims(|c, _| c["sub"] = json!("")).await,
        "id_token_missing_claim"
    );
    assert_eq!(
        refused_claims(|c, _| c["sub"] = json!(12345)).await,
        "id_token_invalid_claim"
    );
}

#[tokio::test]
async fn a_missing_or_wrong_nonce_is_refused() {
    assert_eq!(
        refused_claims(|c, _| {
            c.as_object_mut().unwrap().remove("nonce");
        })
        .await,
        "id_token_nonce_missing"
    );
    assert_eq!(
        refused_claims(|c, _| c["nonce"] = json!("another-nonce")).await,
        "id_token_nonce_mismatch"
    );
}

#[tokio::test]
async fn email_verified_counts_only_as_the_boolean_true() {
    let s = setup().await;
    for (value, verified) in [
        (json!(true), true),
        (json!(false), false),
        (json!("false"), false),
        (json!("true"), false),
    ] {
        let mut c = claims(&s.clock);
        c["email_verified"] = value.clone();
        let got = s.verifier.verify(&sign(&c), None).await.unwrap();
        assert_eq!(got.email_verified(), verified, "{value}");
    }
}

#[tokio::test]
async fn unreachable_keys_are_a_retryable_error() {
    let (addr, _) = key_server(None).await;
    let clock = Arc::new(ManualClock::starting_now());
    let keys = JwksCache::new(
        format!("http://{addr}/certs"),
        oauth2::reqwest::Client::new(),
    );
    let verifier = IdTokenVerifier::new(
        IdTokenRules::rs256([ISSUER], [CLIENT]),
        Arc::new(keys),
        clock.clone(),
    );
    let e = verifier
        .verify(&sign(&claims(&clock)), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "provider_keys_unavailable");
    assert!(e.is_retryable());
    let _ = SystemTime::now();
}

#[tokio::test]
async fn garbage_is_malformed_not_a_panic() {
    let s = setup().await;
    for token in [
        "",
        "a",
        "a.b",
        "a.b.c.d",
        "!!!.???.###",
        &"x".repeat(20_000),
        "eyJhbGciOiJSUzI1NiJ9.e30.sig",
    ] {
        let e = refused(&s, token, None).await;
        assert!(
            matches!(e.code(), "id_token_malformed" | "id_token_invalid_kid"),
            "{token:.20}: {}",
            e.code()
        );
    }
}
