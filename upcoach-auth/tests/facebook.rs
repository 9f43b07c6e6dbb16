//! Facebook Login through `Sessions` and its routes, against the Graph API stand-in on
//! loopback (`upcoach_testing::facebook`), which requires `appsecret_proof` on every
//! call as an app can be set to.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;
use upcoach_auth::config::AuthConfig;
use upcoach_auth::facebook::FacebookProvider;
use upcoach_auth::http::AuthRoutes;
use upcoach_auth::session::{AccessTokens, SigningKey};
use upcoach_auth::sessions::{CallbackOutcome, Sessions};
use upcoach_auth::web::CallbackParams;
use upcoach_auth::{AuthProvider, NativeCredential, ProviderId};
use upcoach_core::SystemClock;
use upcoach_core::config::Settings;
use upcoach_core::event::{ClientFacts, Event, EventKind, EventLog, MemoryEventLog};
use upcoach_testing::facebook::{FacebookStandIn, FacebookUser};

const APP_ID: &str = "1234567890";
const APP_SECRET: &str = "stand-in-app-secret";
const PUBLIC_URL: &str = "https://api.example.test";
const CALLBACK: &str = "https://api.example.test/auth/facebook/callback";

fn config(graph: &FacebookStandIn) -> AuthConfig {
    let base = graph.base_url();
    AuthConfig::from_lookup(move |name| match name {
        "FACEBOOK_APP_ID" => Some(APP_ID.into()),
        "FACEBOOK_APP_SECRET" => Some(APP_SECRET.into()),
        "FACEBOOK_GRAPH_URL" => Some(format!("{base}/v19.0")),
        "FACEBOOK_DIALOG_URL" => Some(format!("{base}/v19.0/dialog/oauth")),
        _ => None,
    })
    .unwrap()
}

async fn sessions(graph: &FacebookStandIn) -> (Sessions, Arc<MemoryEventLog>) {
    let events = Arc::new(MemoryEventLog::default());
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        Arc::new(SystemClock),
    ));
    let sessions = Sessions::builder(tokens, PUBLIC_URL)
        .events(events.clone())
        .configure(&config(graph))
        .await
        .unwrap()
        .build();
    (sessions, events)
}

fn alice() -> FacebookUser {
    FacebookUser {
        id: "10150000000000001".into(),
        name: Some("Alice".into()),
        email: Some("alice@example.test".into()),
    }
}

fn facts(platform: &str) -> ClientFacts {
    ClientFacts {
        ip: Some("203.0.113.9".parse::<IpAddr>().unwrap()),
        user_agent: Some("test".into()),
        platform: Some(platform.into()),
    }
}

/// A native Facebook sign-in from an iOS app with `token`.
async fn sign_in_facebook(
    sessions: &Sessions,
    token: String,
) -> Result<upcoach_auth::sessions::TokenResponse, upcoach_auth::sessions::AuthError> {
    sessions
        .sign_in_with_token(
            "facebook",
            NativeCredential::AccessToken(token),
            None,
            None,
            &facts("ios"),
        )
        .await
}

fn query(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[tokio::test]
async fn a_browser_signs_in_with_facebook_and_every_graph_call_carries_the_proof() {
    let graph = FacebookStandIn::start(APP_ID, APP_SECRET).await;
    let (sessions, events) = sessions(&graph).await;
    let mut users = Vec::new();
    for _ in 0..2 {
        let started = sessions
            .authorize("facebook", None, None, None, &facts("web"))
            .await
            .unwrap();
        let dialog = &started.redirect;
        assert!(dialog.as_str().starts_with(&graph.base_url()));
        assert_eq!(query(dialog, "client_id").as_deref(), Some(APP_ID));
        assert_eq!(query(dialog, "redirect_uri").as_deref(), Some(CALLBACK));
        assert_eq!(
            query(dialog, "code_challenge_method").as_deref(),
            Some("S256")
        );
        assert!(query(dialog, "code_challenge").is_some());
        let params = CallbackParams {
            state: query(dialog, "state"),
            code: Some(graph.issue_code(alice(), CALLBACK)),
            error: None,
            iss: None,
            user: None,
        };
        let outcome = sessions
            .callback(
                "facebook",
                &params,
                Some(started.browser_cookie.as_str()),
                None,
                &facts("web"),
            )
            .await
            .unwrap();
        let CallbackOutcome::SignedIn(tokens) = outcome else {
            panic!("a browser without return_to gets its tokens at the callback");
        };
        users.push(tokens.user.id);
    }
    assert_eq!(users[0], users[1], "one Facebook user is one user");
    assert_eq!(graph.calls("/v19.0/debug_token"), 2);
    assert_eq!(graph.calls("/v19.0/me"), 2);
    assert_eq!(graph.proof_failures(), 0);
    let rows = events.recent(EventKind::Security, 100).await.unwrap();
    let logins: Vec<_> = rows
        .iter()
        .filter_map(|e| match e {
            Event::Security(e) if e.event_type == "login_success" => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(logins.len(), 2, "{rows:?}");
    assert!(
        logins
            .iter()
            .all(|e| e.details.to_string().contains("facebook")),
        "{logins:?}"
    );
    let text = format!("{rows:?}");
    assert!(!text.contains(APP_SECRET));
}

#[tokio::test]
async fn a_code_is_taken_once_and_only_for_its_callback() {
    let graph = FacebookStandIn::start(APP_ID, APP_SECRET).await;
    let facebook = FacebookProvider::new(
        config(&graph).facebook.as_ref().unwrap(),
        CALLBACK,
        Arc::new(SystemClock),
    )
    .unwrap();
    let request = upcoach_auth::AuthorizationRequest {
        state: "s".into(),
        nonce: "n".into(),
        code_challenge: "c".into(),
        redirect_uri: CALLBACK.into(),
    };
    let code = graph.issue_code(alice(), CALLBACK);
    let identity = facebook.exchange_code(&code, &request, "v").await.unwrap();
    assert_eq!(identity.provider, ProviderId::FACEBOOK);
    assert_eq!(identity.subject, alice().id);
    assert_eq!(identity.email.as_deref(), Some("alice@example.test"));
    assert!(
        !identity.email_verified,
        "a Facebook address is never verified"
    );
    let again = facebook
        .exchange_code(&code, &request, "v")
        .await
        .unwrap_err();
    assert_eq!(again.code(), "authorization_code_rejected");
    let elsewhere = graph.issue_code(alice(), "https://evil.example.test/callback");
    let refused = facebook
        .exchange_code(&elsewhere, &request, "v")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "authorization_code_rejected");
}

#[tokio::test]
async fn native_access_tokens_are_checked_with_debug_token_first() {
    let graph = FacebookStandIn::start(APP_ID, APP_SECRET).await;
    let (sessions, _) = sessions(&graph).await;
    let token = graph.issue_token(alice());
    let signed_in = sign_in_facebook(&sessions, token).await.unwrap();
    assert!(!signed_in.access_token.is_empty());

    let revoked = graph.issue_token(alice());
    graph.revoke(&revoked);
    let cases = [
        (
            graph.issue_foreign_token(alice()),
            "facebook_token_foreign_app",
        ),
        (revoked, "facebook_token_invalid"),
        (graph.issue_expired_token(alice()), "facebook_token_invalid"),
        ("not-a-token".to_owned(), "facebook_token_invalid"),
        (String::new(), "facebook_token_malformed"),
    ];
    let me_before = graph.calls("/v19.0/me");
    for (token, code) in cases {
        let refused = sign_in_facebook(&sessions, token).await.unwrap_err();
        assert_eq!(refused.code(), code);
    }
    assert_eq!(
        graph.calls("/v19.0/me"),
        me_before,
        "no profile is read for a token debug_token refused"
    );
    let limited = sessions
        .sign_in_with_token(
            "facebook",
            NativeCredential::IdToken {
                id_token: "a.b.c".into(),
                nonce: Some("n".into()),
            },
            None,
            None,
            &facts("ios"),
        )
        .await
        .unwrap_err();
    // Not a JWT: refused before any key is fetched.
    assert_eq!(limited.code(), "id_token_malformed");
    assert_eq!(graph.proof_failures(), 0);
}

#[tokio::test]
async fn the_token_route_takes_an_access_token_or_an_id_token_not_both() {
    let graph = FacebookStandIn::start(APP_ID, APP_SECRET).await;
    let (sessions, _) = sessions(&graph).await;
    let routes = AuthRoutes::new(Arc::new(sessions));
    let post = |body: serde_json::Value| {
        http::Request::post("/auth/facebook/token")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap()
    };
    let token = graph.issue_token(alice());
    let ok = routes
        .token(
            "facebook",
            post(json!({"access_token": token, "platform": "android"})),
        )
        .await;
    assert_eq!(ok.status(), 200);
    for body in [
        json!({"access_token": "t", "id_token": "a.b.c", "nonce": "n"}),
        json!({"access_token": "t", "nonce": "n"}),
        json!({"platform": "ios"}),
    ] {
        let refused = routes.token("facebook", post(body.clone())).await;
        assert_eq!(refused.status(), 400, "{body}");
    }
}

#[tokio::test]
async fn limited_login_id_tokens_are_verified_with_their_issuers_keys_and_nonce() {
    let Some(oidc) = upcoach_testing::OidcProvider::start().await else {
        return;
    };
    let graph = FacebookStandIn::start(APP_ID, APP_SECRET).await;
    let issuer = oidc.issuer().to_owned();
    let base = graph.base_url();
    let config = AuthConfig::from_lookup(|name| match name {
        "FACEBOOK_APP_ID" => Some(APP_ID.into()),
        "FACEBOOK_APP_SECRET" => Some(APP_SECRET.into()),
        "FACEBOOK_GRAPH_URL" => Some(format!("{base}/v19.0")),
        "FACEBOOK_LIMITED_LOGIN_ISSUER" => Some(issuer.clone()),
        "FACEBOOK_LIMITED_LOGIN_JWKS_URL" => Some(format!("{issuer}/jwks")),
        _ => None,
    })
    .unwrap();
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        Arc::new(SystemClock),
    ));
    let sessions = Sessions::builder(tokens, PUBLIC_URL)
        .configure(&config)
        .await
        .unwrap()
        .build();
    let claims = json!({"sub": alice().id, "email": "alice@example.test", "email_verified": true});
    let native = |id_token: String, nonce: &str| NativeCredential::IdToken {
        id_token,
        nonce: Some(nonce.to_owned()),
    };

    let token = oidc.id_token(APP_ID, "limited-nonce-1", &claims).await;
    let signed_in = sessions
        .sign_in_with_token(
            "facebook",
            native(token.clone(), "limited-nonce-1"),
            None,
            None,
            &facts("ios"),
        )
        .await
        .unwrap();
    // The same person as the classic token's: one user.
    let classic = sign_in_facebook(&sessions, graph.issue_token(alice()))
        .await
        .unwrap();
    assert_eq!(signed_in.user.id, classic.user.id);
    assert!(
        !signed_in.user.email_verified,
        "Facebook's word on an address is not taken"
    );

    let replayed = sessions
        .sign_in_with_token(
            "facebook",
            native(token, "limited-nonce-1"),
            None,
            None,
            &facts("ios"),
        )
        .await
        .unwrap_err();
    assert_eq!(replayed.code(), "nonce_replayed");
    let other_nonce = oidc.id_token(APP_ID, "limited-nonce-2", &claims).await;
    let wrong = sessions
        .sign_in_with_token(
            "facebook",
            native(other_nonce, "limited-nonce-3"),
            None,
            None,
            &facts("ios"),
        )
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), "id_token_nonce_mismatch");
    let foreign = oidc.id_token("999", "limited-nonce-4", &claims).await;
    let refused = sessions
        .sign_in_with_token(
            "facebook",
            native(foreign, "limited-nonce-4"),
            None,
            None,
            &facts("ios"),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "id_token_wrong_audience");
}

/// `signed_request` as Facebook sends it: HMAC-SHA256 of the base64url payload text,
/// keyed by `secret`.
fn signed_request(secret: &str, payload: serde_json::Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::Mac;
    let payload = URL_SAFE_NO_PAD.encode(payload.to_string());
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(payload.as_bytes());
    format!(
        "{}.{payload}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fn form(body: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post("/auth/facebook/deauthorize")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap()
}

async fn status_and_code(answer: upcoach_auth::http::Answer) -> (u16, String) {
    let status = answer.status().as_u16();
    let body = http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap()
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    (
        status,
        json["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test]
async fn a_deauthorize_callback_ends_the_users_sessions_once_its_signature_holds() {
    let graph = FacebookStandIn::start(APP_ID, APP_SECRET).await;
    let (sessions, events) = sessions(&graph).await;
    let sessions = Arc::new(sessions);
    let routes = AuthRoutes::new(sessions.clone());
    let signed_in = sign_in_facebook(&sessions, graph.issue_token(alice()))
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let payload = json!({"algorithm": "HMAC-SHA256", "issued_at": now, "user_id": alice().id});
    let issued = |at: u64| {
        signed_request(
            APP_SECRET,
            json!({"algorithm": "HMAC-SHA256", "issued_at": at, "user_id": alice().id}),
        )
    };
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();

    // Refused, each with its own code, and nothing revoked.
    let genuine = signed_request(APP_SECRET, payload.clone());
    // Another user's payload under this one's signature.
    let (signature, _) = genuine.split_once('.').unwrap();
    let (_, other_body) = signed_request(
        APP_SECRET,
        json!({"algorithm": "HMAC-SHA256", "user_id": "10150000000000099"}),
    )
    .split_once('.')
    .map(|(s, b)| (s.to_owned(), b.to_owned()))
    .unwrap();
    let tampered = format!("{signature}.{other_body}");
    let other_algorithm = signed_request(
        APP_SECRET,
        json!({"algorithm": "HMAC-SHA1", "user_id": alice().id}),
    );
    for (form_body, status, code) in [
        (
            format!("signed_request={}", encode(&tampered)),
            401,
            "signed_request_bad_signature",
        ),
        (
            format!(
                "signed_request={}",
                encode(&signed_request("another-secret", payload.clone()))
            ),
            401,
            "signed_request_bad_signature",
        ),
        (
            format!("signed_request={}", encode(&other_algorithm)),
            400,
            "signed_request_unsupported_algorithm",
        ),
        (
            "signed_request=no-dot".to_owned(),
            400,
            "signed_request_malformed",
        ),
        (
            format!("signed_request={}=", encode(&genuine)),
            400,
            "signed_request_bad_encoding",
        ),
        ("user_id=1".to_owned(), 400, "signed_request_malformed"),
        // Signed, but not a fresh deauthorization: an hour old, from the future, or
        // undated (as the SDK's own sign-in requests may be).
        (
            format!("signed_request={}", encode(&issued(now - 3600))),
            400,
            "signed_request_stale",
        ),
        (
            format!("signed_request={}", encode(&issued(now + 300))),
            400,
            "signed_request_stale",
        ),
        (
            format!(
                "signed_request={}",
                encode(&signed_request(
                    APP_SECRET,
                    json!({"algorithm": "HMAC-SHA256", "user_id": alice().id}),
                ))
            ),
            400,
            "signed_request_stale",
        ),
    ] {
        let answer = routes.facebook_deauthorize(form(&form_body)).await;
        assert_eq!(
            status_and_code(answer).await,
            (status, code.to_owned()),
            "{form_body}"
        );
    }
    let json_body = http::Request::post("/auth/facebook/deauthorize")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from("{}")))
        .unwrap();
    assert_eq!(routes.facebook_deauthorize(json_body).await.status(), 415);
    sessions
        .refresh(&signed_in.refresh_token, None, &facts("ios"))
        .await
        .expect("no refused callback revokes anything");

    // The genuine one: every session ends; Facebook was the only identity, so it stays.
    let still = sign_in_facebook(&sessions, graph.issue_token(alice()))
        .await
        .unwrap();
    let answer = routes
        .facebook_deauthorize(form(&format!("signed_request={}", encode(&genuine))))
        .await;
    assert_eq!(answer.status(), 200);
    let revoked = sessions
        .refresh(&still.refresh_token, None, &facts("ios"))
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), "refresh_token_revoked");
    // The same request again is answered as handled and does nothing.
    let again = routes
        .facebook_deauthorize(form(&format!("signed_request={}", encode(&genuine))))
        .await;
    assert_eq!(again.status(), 200);
    let back = sign_in_facebook(&sessions, graph.issue_token(alice()))
        .await
        .unwrap();
    assert_eq!(
        back.user.id, signed_in.user.id,
        "signing in again finds the account"
    );

    let rows = events.recent(EventKind::Security, 100).await.unwrap();
    let of = |kind: &str| {
        rows.iter()
            .filter_map(|e| match e {
                Event::Security(e) if e.event_type == kind => Some(e),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let handled = of("provider_deauthorized");
    assert_eq!(handled.len(), 1, "acted on once: {rows:?}");
    // Each refused signed_request is recorded; a form without one never reached it.
    assert_eq!(of("provider_notification_refused").len(), 8, "{rows:?}");
    assert!(
        handled
            .iter()
            .any(|e| e.details["sessions_revoked"].as_u64() >= Some(2)
                && e.details["unlinked"] == false),
        "{handled:?}"
    );
}

/// Nothing of Facebook's is reached while the service is built: a server starts with
/// Facebook down, and only a sign-in finds out (retryably).
#[tokio::test]
async fn the_service_is_built_without_reaching_facebook() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let config = AuthConfig::from_lookup(|name| match name {
        "FACEBOOK_APP_ID" => Some(APP_ID.into()),
        "FACEBOOK_APP_SECRET" => Some(APP_SECRET.into()),
        "FACEBOOK_GRAPH_URL" => Some(format!("http://{closed}/v19.0")),
        "FACEBOOK_LIMITED_LOGIN_JWKS_URL" => Some(format!("http://{closed}/jwks")),
        _ => None,
    })
    .unwrap();
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        Arc::new(SystemClock),
    ));
    let sessions = Sessions::builder(tokens, PUBLIC_URL)
        .configure(&config)
        .await
        .expect("built with Facebook unreachable")
        .build();
    let down = sign_in_facebook(&sessions, "some-token".into())
        .await
        .unwrap_err();
    assert_eq!(down.code(), "provider_unavailable");
    assert!(down.is_retryable());
}
