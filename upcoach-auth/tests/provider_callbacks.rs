//! What providers tell the server about a person, through `AuthRoutes` and `Sessions`
//! with in-memory stores: Facebook's data-deletion callback and its status page, and
//! Sign in with Apple's server-to-server notifications, against the Graph API and Apple
//! stand-ins on loopback (`upcoach_testing::facebook`, `upcoach_testing::apple`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use upcoach_auth::config::AuthConfig;
use upcoach_auth::http::{Answer, AuthRoutes};
use upcoach_auth::session::{AccessTokens, SigningKey};
use upcoach_auth::sessions::{Sessions, TokenResponse};
use upcoach_auth::{NativeCredential, ProviderId};
use upcoach_core::SystemClock;
use upcoach_core::config::Settings;
use upcoach_core::event::{ClientFacts, Event, EventKind, EventLog, MemoryEventLog, SecurityEvent};
use upcoach_testing::apple::{
    AppleStandIn, AppleUser, TEST_KEY_ID, TEST_TEAM_ID, TEST_TEAM_PRIVATE_KEY, TEST_TEAM_PUBLIC_KEY,
};
use upcoach_testing::facebook::{FacebookStandIn, FacebookUser};

const APP_ID: &str = "1234567890";
const APP_SECRET: &str = "stand-in-app-secret";
const PUBLIC_URL: &str = "https://api.example.test";
const APPLE_WEB: &str = "com.example.web";
const APPLE_APP: &str = "com.example.app";

/// The stand-ins and the service configured against both.
struct World {
    graph: FacebookStandIn,
    apple: AppleStandIn,
    sessions: Arc<Sessions>,
    routes: AuthRoutes,
    events: Arc<MemoryEventLog>,
}

async fn world() -> World {
    let graph = FacebookStandIn::start(APP_ID, APP_SECRET).await;
    let apple = AppleStandIn::start(TEST_TEAM_ID, TEST_KEY_ID, TEST_TEAM_PUBLIC_KEY).await;
    let base = graph.base_url();
    let (auth, token, keys) = (apple.authorize_url(), apple.token_url(), apple.keys_url());
    let issuer = apple.issuer().to_owned();
    let config = AuthConfig::from_lookup(move |name| match name {
        "FACEBOOK_APP_ID" => Some(APP_ID.into()),
        "FACEBOOK_APP_SECRET" => Some(APP_SECRET.into()),
        "FACEBOOK_GRAPH_URL" => Some(format!("{base}/v19.0")),
        "FACEBOOK_DIALOG_URL" => Some(format!("{base}/v19.0/dialog/oauth")),
        "APPLE_WEB_CLIENT_ID" => Some(APPLE_WEB.into()),
        "APPLE_MOBILE_CLIENT_ID" => Some(APPLE_APP.into()),
        "APPLE_TEAM_ID" => Some(TEST_TEAM_ID.into()),
        "APPLE_KEY_ID" => Some(TEST_KEY_ID.into()),
        "APPLE_PRIVATE_KEY" => Some(TEST_TEAM_PRIVATE_KEY.into()),
        "APPLE_AUTH_URL" => Some(auth.clone()),
        "APPLE_TOKEN_URL" => Some(token.clone()),
        "APPLE_KEYS_URL" => Some(keys.clone()),
        "APPLE_ISSUER" => Some(issuer.clone()),
        _ => None,
    })
    .unwrap();
    let events = Arc::new(MemoryEventLog::default());
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        Arc::new(SystemClock),
    ));
    let sessions = Arc::new(
        Sessions::builder(tokens, PUBLIC_URL)
            .events(events.clone())
            .configure(&config)
            .await
            .unwrap()
            .build(),
    );
    World {
        graph,
        apple,
        routes: AuthRoutes::new(sessions.clone()),
        sessions,
        events,
    }
}

fn facts() -> ClientFacts {
    ClientFacts {
        ip: Some("203.0.113.9".parse::<IpAddr>().unwrap()),
        user_agent: Some("test".into()),
        platform: Some("ios".into()),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn alice() -> FacebookUser {
    FacebookUser {
        id: "10150000000000001".into(),
        name: Some("Alice".into()),
        email: Some("alice@example.test".into()),
    }
}

fn ada() -> AppleUser {
    AppleUser::new("001234.5f8e1c2d3b4a.0042", "ada@privaterelay.appleid.com")
}

/// `signed_request` as Facebook sends it: HMAC-SHA256 of the base64url payload text,
/// keyed by `secret`.
fn signed_request(secret: &str, payload: &Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::Mac;
    let payload = URL_SAFE_NO_PAD.encode(payload.to_string());
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(payload.as_bytes());
    format!(
        "{}.{payload}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// A fresh deletion request of Facebook's for `user_id`, issued `ago` seconds ago.
fn deletion_request(user_id: &str, ago: u64) -> String {
    signed_request(
        APP_SECRET,
        &json!({"algorithm": "HMAC-SHA256", "issued_at": now() - ago, "user_id": user_id}),
    )
}

/// Facebook's data-deletion callback for `user_id`, signed `ago` seconds ago: the
/// answer's status and body.
async fn request_deletion(world: &World, user_id: &str, ago: u64) -> (u16, Value) {
    answered(
        world
            .routes
            .facebook_data_deletion(form(&deletion_request(user_id, ago)))
            .await,
    )
    .await
}

fn form(signed_request: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let body = format!(
        "signed_request={}",
        url::form_urlencoded::byte_serialize(signed_request.as_bytes()).collect::<String>()
    );
    http::Request::post("/auth/facebook/data-deletion")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap()
}

fn notification(jwt: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post("/auth/apple/notifications")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            json!({ "payload": jwt }).to_string(),
        )))
        .unwrap()
}

/// An answer's status and JSON body (`Null` when it has none).
async fn answered(answer: Answer) -> (u16, Value) {
    let status = answer.status().as_u16();
    let body = http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// The security events named `kind`.
async fn recorded(events: &MemoryEventLog, kind: &str) -> Vec<SecurityEvent> {
    events.flush().await.unwrap();
    events
        .recent(EventKind::Security, 500)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            Event::Security(e) if e.event_type == kind => Some(e),
            _ => None,
        })
        .collect()
}

async fn sign_in_facebook(world: &World, user: FacebookUser) -> TokenResponse {
    world
        .sessions
        .sign_in_with_token(
            "facebook",
            NativeCredential::AccessToken(world.graph.issue_token(user)),
            None,
            None,
            &facts(),
        )
        .await
        .unwrap()
}

/// What a native app gives Apple for its raw nonce.
fn hashed(raw: &str) -> String {
    Sha256::digest(raw.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Apple's native sign-in: an id token for the app's bundle id carrying the hash of
/// `raw_nonce`, and the raw nonce.
fn apple_credential(apple: &AppleStandIn, user: &AppleUser, raw_nonce: &str) -> NativeCredential {
    NativeCredential::IdToken {
        id_token: apple.id_token(user, APPLE_APP, Some(&hashed(raw_nonce))),
        nonce: Some(raw_nonce.into()),
    }
}

async fn sign_in_apple(world: &World, raw_nonce: &str) -> TokenResponse {
    world
        .sessions
        .sign_in_with_token(
            "apple",
            apple_credential(&world.apple, &ada(), raw_nonce),
            None,
            None,
            &facts(),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn a_facebook_data_deletion_erases_the_person_and_answers_a_code_to_follow_it() {
    let world = world().await;
    let signed_in = sign_in_facebook(&world, alice()).await;
    let again = sign_in_facebook(&world, alice()).await;
    let user_id = signed_in.user.id;

    // Refused first: another secret's signature changes nothing.
    let tampered = signed_request(
        "another-secret",
        &json!({"algorithm": "HMAC-SHA256", "issued_at": now(), "user_id": alice().id}),
    );
    let (status, body) = answered(world.routes.facebook_data_deletion(form(&tampered)).await).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "signed_request_bad_signature");
    world
        .sessions
        .refresh(&signed_in.refresh_token, None, &facts())
        .await
        .expect("a refused callback deletes nothing");
    let signed_in = again;

    // The genuine request.
    let (status, body) = request_deletion(&world, &alice().id, 0).await;
    assert_eq!(status, 200, "{body}");
    let code = body["confirmation_code"].as_str().unwrap().to_owned();
    assert_eq!(
        body["url"],
        format!("{PUBLIC_URL}/auth/facebook/data-deletion/{code}")
    );
    let refused = world
        .sessions
        .refresh(&signed_in.refresh_token, None, &facts())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "refresh_token_revoked");
    let users = world.sessions.users();
    assert_eq!(
        users
            .find_by_identity(ProviderId::FACEBOOK, &alice().id)
            .await
            .unwrap(),
        None,
        "the identity is erased"
    );
    assert_eq!(
        users.get(user_id).await.unwrap(),
        None,
        "Facebook was the only way in: the user is gone too"
    );

    // Its status page.
    let (status, shown) = answered(world.routes.data_deletion_status(&code).await).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["confirmation_code"], code.as_str());
    assert_eq!(shown["provider"], "facebook");
    assert_eq!(shown["status"], "completed");
    assert_eq!(shown["outcome"], "identity_removed");
    let requested = shown["requested_at"].as_u64().unwrap();
    let completed = shown["completed_at"].as_u64().unwrap();
    assert!(requested <= completed && completed <= now(), "{shown}");
    assert!(now() - requested < 60, "{shown}");

    // Facebook asks again (a new signed_request for the same person): the same code.
    let (status, retried) = request_deletion(&world, &alice().id, 5).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["confirmation_code"], code.as_str());
    assert_eq!(retried["url"], body["url"]);

    // A person the server never knew: a request all the same, with nothing found.
    let (status, stranger) = request_deletion(&world, "10150000000000077", 0).await;
    assert_eq!(status, 200, "{stranger}");
    let stranger_code = stranger["confirmation_code"].as_str().unwrap();
    assert_ne!(stranger_code, code);
    let (_, shown) = answered(world.routes.data_deletion_status(stranger_code).await).await;
    assert_eq!(shown["status"], "completed");
    assert_eq!(shown["outcome"], "nothing_found");

    // Codes that are not ours.
    for unknown in [
        "AAAAAAAAAAAAAAAAAAAAAA",
        "not-a-code",
        "",
        &format!("{code}A"),
        &"A".repeat(4096),
    ] {
        let (status, body) = answered(world.routes.data_deletion_status(unknown).await).await;
        assert_eq!(status, 404, "{unknown}: {body}");
        assert_eq!(body["error"]["code"], "deletion_request_not_found");
    }

    let deletions = recorded(&world.events, "provider_data_deletion").await;
    assert_eq!(
        deletions.len(),
        3,
        "each request is recorded, the retry too (it found nothing left): {deletions:?}"
    );
    assert_eq!(
        deletions
            .iter()
            .filter(|e| e.details["known"] == true)
            .count(),
        1,
        "only the first found Alice: {deletions:?}"
    );
    let alices = deletions
        .iter()
        .find(|e| e.details["known"] == true)
        .expect("Alice's deletion");
    assert_eq!(alices.user_id, Some(user_id));
    assert_eq!(alices.details["confirmation_code"], code.as_str());
    assert_eq!(alices.details["user_deleted"], true);
    assert!(
        alices.details["sessions_revoked"].as_u64() >= Some(2),
        "{alices:?}"
    );
    let refusals = recorded(&world.events, "provider_notification_refused").await;
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0].details["code"], "signed_request_bad_signature");
}

#[tokio::test]
async fn a_data_deletion_keeps_a_user_who_has_another_way_in() {
    let world = world().await;
    let signed_in = sign_in_facebook(&world, alice()).await;
    let principal = world
        .sessions
        .authenticate(&signed_in.access_token)
        .await
        .unwrap();
    let linked = world
        .sessions
        .link(
            &principal,
            "apple",
            apple_credential(&world.apple, &ada(), "link-nonce"),
            &facts(),
        )
        .await
        .unwrap();
    assert_eq!(linked.providers.len(), 2, "{linked:?}");

    let (status, body) = request_deletion(&world, &alice().id, 0).await;
    assert_eq!(status, 200, "{body}");
    let user = world
        .sessions
        .users()
        .get(signed_in.user.id)
        .await
        .unwrap()
        .expect("the user stays: Apple still signs them in");
    assert_eq!(user.providers, vec![ProviderId::APPLE]);
    let refused = world
        .sessions
        .refresh(&signed_in.refresh_token, None, &facts())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "refresh_token_revoked");
    let back = sign_in_apple(&world, "back-nonce").await;
    assert_eq!(back.user.id, signed_in.user.id);
    let deletions = recorded(&world.events, "provider_data_deletion").await;
    assert_eq!(deletions.len(), 1);
    assert_eq!(deletions[0].details["user_deleted"], false);
}

/// An event of Apple's for Ada.
fn event(kind: &str) -> Value {
    json!({
        "type": kind,
        "sub": ada().sub,
        "email": ada().email,
        "is_private_email": "true",
        "event_time": now() * 1000,
    })
}

/// Notification claims as Apple sends them, for `aud`, issued `ago` seconds ago and
/// valid for five minutes.
fn claims(apple: &AppleStandIn, aud: &str, ago: u64) -> Value {
    let iat = now() - ago;
    json!({
        "iss": apple.issuer(),
        "aud": aud,
        "iat": iat,
        "exp": iat + 300,
        "jti": format!("jti-{aud}-{ago}"),
        "events": event("consent-revoked").to_string(),
    })
}

#[tokio::test]
async fn apple_notifications_end_sessions_flip_the_relay_and_refuse_what_apple_did_not_send() {
    let world = world().await;
    let signed_in = sign_in_apple(&world, "nonce-1").await;
    let second = sign_in_apple(&world, "nonce-2").await;
    assert_eq!(second.user.id, signed_in.user.id);
    let users = world.sessions.users();
    assert_eq!(
        users
            .email_deliverable(ProviderId::APPLE, &ada().sub)
            .await
            .unwrap(),
        Some(true)
    );

    // The relay address turned off, then on again.
    for (kind, deliverable) in [("email-disabled", false), ("email-enabled", true)] {
        let jwt = world.apple.notification(APPLE_WEB, event(kind));
        let (status, body) =
            answered(world.routes.apple_notifications(notification(&jwt)).await).await;
        assert_eq!(status, 200, "{kind}: {body}");
        assert_eq!(body["status"], "handled");
        assert_eq!(
            users
                .email_deliverable(ProviderId::APPLE, &ada().sub)
                .await
                .unwrap(),
            Some(deliverable),
            "{kind}"
        );
    }
    world
        .sessions
        .refresh(&signed_in.refresh_token, None, &facts())
        .await
        .expect("an e-mail event ends no session");

    // Refused, each with its code, and nothing revoked.
    let apple = &world.apple;
    let mut expired = claims(apple, APPLE_APP, 3600);
    expired["jti"] = json!("expired-one");
    for (jwt, status, code) in [
        (
            apple.sign_with_foreign_key(claims(apple, APPLE_APP, 0)),
            401,
            "apple_notification_bad_signature",
        ),
        (
            apple.sign(claims(apple, "com.example.other", 0)),
            400,
            "apple_notification_wrong_audience",
        ),
        (apple.sign(expired), 400, "apple_notification_expired"),
    ] {
        let (got, body) =
            answered(world.routes.apple_notifications(notification(&jwt)).await).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    world
        .sessions
        .refresh(&second.refresh_token, None, &facts())
        .await
        .expect("no refused notification revokes anything");

    // Consent revoked: every session ends; Apple is Ada's only way in, so it stays.
    let still = sign_in_apple(&world, "nonce-3").await;
    let revoked = world
        .apple
        .notification(APPLE_APP, event("consent-revoked"));
    let (status, body) = answered(
        world
            .routes
            .apple_notifications(notification(&revoked))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let ended = world
        .sessions
        .refresh(&still.refresh_token, None, &facts())
        .await
        .unwrap_err();
    assert_eq!(ended.code(), "refresh_token_revoked");

    // The same notification again.
    let (status, body) = answered(
        world
            .routes
            .apple_notifications(notification(&revoked))
            .await,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "notification_replayed");

    let back = sign_in_apple(&world, "nonce-4").await;
    assert_eq!(
        back.user.id, signed_in.user.id,
        "signing in again finds the account"
    );

    let deauthorized = recorded(&world.events, "provider_deauthorized").await;
    assert_eq!(deauthorized.len(), 1, "{deauthorized:?}");
    assert_eq!(deauthorized[0].user_id, Some(signed_in.user.id));
    assert_eq!(deauthorized[0].details["provider"], "apple");
    assert_eq!(deauthorized[0].details["unlinked"], false);
    assert!(deauthorized[0].details["sessions_revoked"].as_u64() >= Some(2));
    let email = recorded(&world.events, "provider_email_status").await;
    assert_eq!(email.len(), 2, "{email:?}");
    assert!(email.iter().all(|e| e.user_id == Some(signed_in.user.id)));
    let mut refusals: Vec<String> = recorded(&world.events, "provider_notification_refused")
        .await
        .iter()
        .map(|e| e.details["code"].as_str().unwrap_or_default().to_owned())
        .collect();
    refusals.sort();
    assert_eq!(
        refusals,
        [
            "apple_notification_bad_signature",
            "apple_notification_expired",
            "apple_notification_wrong_audience",
            "notification_replayed",
        ]
    );
}

/// A person who signs in with Facebook again after their data was deleted, then asks
/// Facebook to delete it again (within the 90 days the first request is kept): the new
/// account must go too.
#[tokio::test]
async fn a_second_deletion_after_signing_in_again_erases_the_new_account() {
    let world = world().await;
    sign_in_facebook(&world, alice()).await;
    let (status, first) = request_deletion(&world, &alice().id, 0).await;
    assert_eq!(status, 200, "{first}");
    let returned = sign_in_facebook(&world, alice()).await;
    let (status, second) = request_deletion(&world, &alice().id, 1).await;
    assert_eq!(status, 200, "{second}");
    let left = world
        .sessions
        .users()
        .find_by_identity(ProviderId::FACEBOOK, &alice().id)
        .await
        .unwrap();
    assert_eq!(
        left, None,
        "the account made after the first deletion is still there (second answer {second}, first {first})"
    );
    let refresh = world
        .sessions
        .refresh(&returned.refresh_token, None, &facts())
        .await;
    assert!(refresh.is_err(), "its sessions still work");
}

/// `POST /auth/apple/token` from a native app, with `body` besides the credential.
fn apple_token_request(
    apple: &AppleStandIn,
    user: &AppleUser,
    raw_nonce: &str,
    extra: Value,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut body = json!({
        "id_token": apple.id_token(user, APPLE_APP, Some(&hashed(raw_nonce))),
        "nonce": raw_nonce,
        "platform": "ios",
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    http::Request::post("/auth/apple/token")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap()
}

/// Apple gives a native app the person's name once, at the first authorization, and
/// never in the token; the app passes it on as `user` (Apple's web shape, as an object
/// or as its JSON text). It names an account this sign-in creates, and nothing else: a
/// later sign-in (or one for an account that exists) leaves the name as it is, and a
/// `user` that does not read as a name is no name, never a refusal.
#[tokio::test]
async fn a_native_apple_sign_in_names_the_account_it_creates() {
    let world = world().await;
    let name = json!({"name": {"firstName": "Ada", "lastName": "Lovelace"}});
    let cases = [
        (
            "001234.aaaa.0001",
            json!({ "user": name }),
            Some("Ada Lovelace"),
        ),
        (
            "001234.aaaa.0002",
            json!({ "user": json!({"name": {"firstName": "Grace"}}).to_string() }),
            Some("Grace"),
        ),
        (
            "001234.aaaa.0003",
            json!({ "user": {"name": {"firstName": "Bell\u{7}"}} }),
            None,
        ),
        ("001234.aaaa.0004", json!({ "user": 42 }), None),
        ("001234.aaaa.0005", json!({ "user": "not json" }), None),
        ("001234.aaaa.0006", json!({}), None),
    ];
    for (i, (sub, extra, expected)) in cases.into_iter().enumerate() {
        let user = AppleUser::new(sub, &format!("p{i}@privaterelay.appleid.com"));
        let (status, body) = answered(
            world
                .routes
                .token(
                    "apple",
                    apple_token_request(&world.apple, &user, &format!("name-{i}"), extra),
                )
                .await,
        )
        .await;
        assert_eq!(status, 200, "{sub}: {body}");
        assert_eq!(body["user"]["name"].as_str(), expected, "{sub}: {body}");
    }

    // Ada again, with another name: her account keeps the one it has.
    let ada = AppleUser::new("001234.aaaa.0001", "p0@privaterelay.appleid.com");
    let renamed = json!({ "user": {"name": {"firstName": "Mallory"}} });
    let (status, body) = answered(
        world
            .routes
            .token(
                "apple",
                apple_token_request(&world.apple, &ada, "name-again", renamed),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"]["name"], "Ada Lovelace");
}

/// Apple's web callback takes only Apple's form post (a `GET` is 405 and uses nothing
/// up), answers tokens (no `return_to`) and clears the flow cookie with the attributes
/// it was set with (`SameSite=None; Secure`), which a browser needs to replace a
/// `Secure` cookie.
#[tokio::test]
async fn an_apple_callback_clears_the_flow_cookie_it_set() {
    let world = world().await;
    let started = world
        .routes
        .authorize(
            "apple",
            http::Request::get("/auth/apple/authorize?platform=web")
                .body(())
                .unwrap(),
        )
        .await;
    assert_eq!(started.status(), 302);
    let set: Vec<String> = started
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let flow = set
        .iter()
        .find(|c| c.starts_with("__Host-upcoach_flow="))
        .expect("the flow cookie");
    assert!(
        flow.ends_with("; Path=/; Secure; Max-Age=600; HttpOnly; SameSite=None"),
        "{flow}"
    );
    let flow_pair = flow.split(';').next().unwrap().to_owned();
    let location = url::Url::parse(started.headers()["location"].to_str().unwrap()).unwrap();
    let param = |name: &str| {
        location
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap()
    };
    let code = world.apple.issue_code(
        &ada(),
        APPLE_WEB,
        Some(&param("redirect_uri")),
        Some(&param("nonce")),
    );
    let form = format!("state={}&code={code}", param("state"));
    // Apple posts its answer: the same answer by GET is refused, and uses nothing up.
    let by_get = world
        .routes
        .callback(
            "apple",
            http::Request::get(format!("/auth/apple/callback?{form}"))
                .header("cookie", &flow_pair)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(by_get.headers()["allow"], "POST");
    let (status, body) = answered(by_get).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let landed = world
        .routes
        .callback(
            "apple",
            http::Request::post("/auth/apple/callback")
                .header("content-type", "application/x-www-form-urlencoded")
                .header("cookie", flow_pair)
                .body(http_body_util::Full::new(bytes::Bytes::from(form)))
                .unwrap(),
        )
        .await;
    let cleared: Vec<String> = landed
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let (status, body) = answered(landed).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        cleared.contains(
            &"__Host-upcoach_flow=; Path=/; Secure; Max-Age=0; HttpOnly; SameSite=None".to_owned()
        ),
        "{cleared:?}"
    );
}
