//! Sign in with Apple on the axum example, end to end over HTTP against the Apple
//! stand-in (`upcoach_testing::apple`, which checks our ES256 client secret): a browser
//! signs Ada in through Apple's cross-site `form_post` callback with her name, her app
//! signs her in with an id token and its hashed nonce, she links Google (the
//! `oauth2-mock-server` stand-in) and unlinks it again, and Apple's consent-revoked
//! notification ends her sessions, once.

mod support;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{
    APPLE_APP_CLIENT, APPLE_WEB_CLIENT, Answer, Browser, CLIENT_ID, RETURN_TO, send, urlencode,
};
use upcoach_auth::apple::check_native_nonce;
use upcoach_testing::OidcProvider;
use upcoach_testing::apple::{
    AppleStandIn, AppleUser, TEST_KEY_ID, TEST_TEAM_ID, TEST_TEAM_PUBLIC_KEY,
};

/// The `user` field Apple posts on a first authorization.
const POSTED_USER: &str =
    r#"{"name":{"firstName":"Ada","lastName":"Lovelace"},"email":"ada@privaterelay.appleid.com"}"#;

/// Raw nonces a native app makes, each with the SHA-256 (lowercase hex) it gives Apple
/// (`printf %s <nonce> | sha256sum`; checked in [`hashed`]).
const APP_NONCES: [(&str, &str); 3] = [
    (
        "app-nonce-1",
        "ac5d63df6e0a339d0fc5db375949dc2c7d00cba8425647759a356f6f4a5967f8",
    ),
    (
        "app-nonce-2",
        "4dde9b54c3293bbd28813be79763f106b1e766b5de49b4413292d667a2dea4ed",
    ),
    (
        "app-nonce-3",
        "05bbc553925cfc18045058628e0e9e59900d80c3d0bb2f8c943356d3387dbbc9",
    ),
];

fn ada() -> AppleUser {
    AppleUser::new("001234.5f8e1c2d3b4a.0042", "ada@privaterelay.appleid.com")
}

async fn apple() -> AppleStandIn {
    AppleStandIn::start(TEST_TEAM_ID, TEST_KEY_ID, TEST_TEAM_PUBLIC_KEY).await
}

/// The hash a native app gives Apple for `raw`, one of [`APP_NONCES`].
fn hashed(raw: &str) -> &'static str {
    let (_, hash) = APP_NONCES
        .iter()
        .find(|(nonce, _)| *nonce == raw)
        .unwrap_or_else(|| panic!("{raw} is not in APP_NONCES"));
    assert!(
        check_native_nonce(raw, hash).is_ok(),
        "{hash} is SHA-256({raw})"
    );
    hash
}

fn param(url: &url::Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

/// A browser's sign-in with Apple begun at `base`: the authorize answer (302 to Apple,
/// the flow cookie set), returning to the web app.
async fn begin(base: &str) -> Answer {
    let started = send(
        Method::GET,
        &format!(
            "{base}/auth/apple/authorize?platform=web&return_to={}",
            urlencode(RETURN_TO)
        ),
        &[],
        "",
    )
    .await;
    assert_eq!(started.status, StatusCode::FOUND, "{:?}", started.body);
    started
}

/// What Apple posts back for `started`: a code for Ada issued to the Services ID with
/// the flow's redirect URI and nonce, the flow's `state`, and `user` when given (Apple
/// sends it on the first authorization only).
fn apple_form(apple: &AppleStandIn, started: &Answer, user: Option<&str>) -> String {
    let to_apple = started.location();
    let code = apple.issue_code(
        &ada(),
        APPLE_WEB_CLIENT,
        Some(&param(&to_apple, "redirect_uri")),
        Some(&param(&to_apple, "nonce")),
    );
    let mut form = format!(
        "code={}&state={}",
        urlencode(&code),
        urlencode(&param(&to_apple, "state"))
    );
    if let Some(user) = user {
        form.push_str(&format!("&user={}", urlencode(user)));
    }
    form
}

/// Apple's cross-site `form_post` to our callback, as the browser sends it: with the
/// cookies it sends cross-site (`SameSite=None`), when given.
async fn post_callback(base: &str, form: &str, cookie: Option<&str>) -> Answer {
    let mut headers = vec![
        ("origin", "https://appleid.apple.com"),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    headers.extend(cookie.map(|c| ("cookie", c)));
    send(
        Method::POST,
        &format!("{base}/auth/apple/callback"),
        &headers,
        form,
    )
    .await
}

/// `POST /auth/exchange` of the login code `landed` carries, with `cookie`.
async fn exchange(base: &str, landed: &Answer, cookie: &str) -> Answer {
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.body);
    let to_app = landed.location();
    assert!(to_app.as_str().starts_with(RETURN_TO), "{to_app}");
    send(
        Method::POST,
        &format!("{base}/auth/exchange"),
        &[("cookie", cookie), ("content-type", "application/json")],
        &json!({"login_code": param(&to_app, "login_code")}).to_string(),
    )
    .await
}

/// A browser's whole web sign-in with Apple (`user` posted when given): the exchange's
/// answer and the browser's cookies.
async fn sign_in_web(apple: &AppleStandIn, base: &str, user: Option<&str>) -> (Answer, String) {
    let started = begin(base).await;
    let cookie = started.cookies();
    let form = apple_form(apple, &started, user);
    let landed = post_callback(base, &form, Some(&started.cross_site_cookies())).await;
    let exchanged = exchange(base, &landed, &cookie).await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.body);
    (exchanged, cookie)
}

/// `POST /auth/apple/token` from the app: `id_token` with the raw `nonce`.
async fn sign_in_native(base: &str, id_token: &str, nonce: &str) -> Answer {
    send(
        Method::POST,
        &format!("{base}/auth/apple/token"),
        &[("content-type", "application/json")],
        &json!({"id_token": id_token, "nonce": nonce, "platform": "ios"}).to_string(),
    )
    .await
}

/// `POST /auth/refresh` of `refresh_token` with `device`: the browser's cookies or
/// `X-Device-Id`, or nothing for a session bound to no device.
async fn refresh(base: &str, refresh_token: &Value, device: &[(&str, &str)]) -> Answer {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(device);
    send(
        Method::POST,
        &format!("{base}/auth/refresh"),
        &headers,
        &json!({ "refresh_token": refresh_token }).to_string(),
    )
    .await
}

/// `method path` with `bearer`.
async fn with_bearer(base: &str, method: Method, path: &str, bearer: &str) -> Answer {
    send(
        method,
        &format!("{base}{path}"),
        &[("authorization", bearer)],
        "",
    )
    .await
}

fn bearer(tokens: &Value) -> String {
    format!("Bearer {}", tokens["access_token"].as_str().unwrap())
}

/// An id token Google (the stand-in at `issuer`) issues to our client for `claims` with
/// `nonce`, as a native app's SDK obtains one.
async fn google_id_token(issuer: &str, nonce: &str, claims: &Value) -> String {
    let redirect_uri = "http://app.example.test/native";
    let mut authorize = url::Url::parse(&format!("{issuer}/authorize")).unwrap();
    authorize
        .query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", CLIENT_ID)
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("nonce", nonce)
        .append_pair("login_hint", &URL_SAFE_NO_PAD.encode(claims.to_string()));
    let redirected = send(Method::GET, authorize.as_str(), &[], "").await;
    let code = param(&redirected.location(), "code");
    let form = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={}&client_id={CLIENT_ID}",
        urlencode(redirect_uri)
    );
    let answer = send(
        Method::POST,
        &format!("{issuer}/token"),
        &[("content-type", "application/x-www-form-urlencoded")],
        &form,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    answer.json()["id_token"].as_str().unwrap().to_owned()
}

/// A browser's web sign-in with Google at `addr` as `claims`: the exchange's answer.
async fn sign_in_google(addr: SocketAddr, user_agent: &'static str, claims: &Value) -> Answer {
    let mut browser = Browser {
        addr,
        user_agent,
        cookie: None,
    };
    let query = format!("platform=web&return_to={}", urlencode(RETURN_TO));
    let landed = browser.sign_in(&query, claims).await;
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.body);
    let exchanged = browser
        .exchange(&param(&landed.location(), "login_code"))
        .await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.body);
    exchanged
}

fn now_millis() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since.as_millis()).unwrap()
}

#[tokio::test]
async fn ada_signs_in_with_apple_links_google_and_revokes_consent_on_axum() {
    let Some(google) = OidcProvider::start().await else {
        return;
    };
    let apple = apple().await;
    let (addr, _app) = support::start_axum_apple(&apple, Some(&google)).await;
    let base = format!("http://{addr}");

    // Authorize: to Apple with form_post; the flow cookie must come along on Apple's
    // cross-site POST back, so it is SameSite=None; Secure.
    let started = begin(&base).await;
    let to_apple = started.location();
    assert!(
        to_apple.as_str().starts_with(&apple.authorize_url()),
        "{to_apple}"
    );
    assert_eq!(param(&to_apple, "client_id"), APPLE_WEB_CLIENT);
    assert_eq!(param(&to_apple, "response_mode"), "form_post");
    assert_eq!(param(&to_apple, "response_type"), "code");
    assert_eq!(
        param(&to_apple, "redirect_uri"),
        format!("{base}/auth/apple/callback")
    );
    let flow_cookie = started.set_cookie("upcoach_flow");
    for attribute in ["SameSite=None", "Secure", "HttpOnly", "Path=/auth"] {
        assert!(
            flow_cookie.split("; ").any(|a| a == attribute),
            "{attribute} missing: {flow_cookie}"
        );
    }

    // The browser that began, with Ada's name on her first authorization: Apple's POST
    // carries the flow cookie (the only one a browser sends cross-site), lands back on
    // the web app with a login code, exchanged there with all the browser's cookies.
    let cookie = started.cookies();
    let cross_site = started.cross_site_cookies();
    assert!(cross_site.starts_with("upcoach_flow="), "{cross_site}");
    let form = apple_form(&apple, &started, Some(POSTED_USER));
    let landed = post_callback(&base, &form, Some(&cross_site)).await;
    let exchanged = exchange(&base, &landed, &cookie).await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.body);
    let web = exchanged.json();
    let ada_id = web["user"]["id"].clone();
    assert!(ada_id.is_string(), "{web}");
    assert_eq!(web["token_type"], "Bearer");
    assert_eq!(web["user"]["providers"], json!(["apple"]));
    let me = with_bearer(&base, Method::GET, "/auth/me", &bearer(&web)).await;
    assert_eq!(me.status, StatusCode::OK, "{:?}", me.body);
    assert_eq!(me.json()["id"], ada_id);
    assert_eq!(
        me.json()["name"],
        "Ada Lovelace",
        "the posted name is saved"
    );
    assert_eq!(me.json()["email"], "ada@privaterelay.appleid.com");
    assert_eq!(me.json()["email_verified"], true);

    // A flow ends at its callback: the same POST again finds its state used.
    let again = post_callback(&base, &form, Some(&cross_site)).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::UNAUTHORIZED, "state_invalid".into()),
        "{:?}",
        again.body
    );

    // The app: Apple's id token for the bundle id carries the hash of its nonce.
    let (nonce, _) = APP_NONCES[0];
    let id_token = apple.id_token(&ada(), APPLE_APP_CLIENT, Some(hashed(nonce)));
    let native = sign_in_native(&base, &id_token, nonce).await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.body);
    let native = native.json();
    assert_eq!(native["user"]["id"], ada_id, "one person, one user");
    assert_eq!(
        native["user"]["name"], "Ada Lovelace",
        "the name Apple posted once stays"
    );
    let ada_bearer = bearer(&native);

    // Apple is Ada's only way in: it cannot be unlinked.
    let last = with_bearer(&base, Method::DELETE, "/auth/link/apple", &ada_bearer).await;
    assert_eq!(
        (last.status, last.code()),
        (StatusCode::CONFLICT, "last_identity".into()),
        "{:?}",
        last.body
    );

    // She links Google, and Google signs her in as the same user.
    let ada_google =
        json!({"sub": "google-ada", "email": "ada@gmail.example", "email_verified": true});
    let google_token = google_id_token(google.issuer(), "axum-apple-link-1", &ada_google).await;
    let linked = send(
        Method::POST,
        &format!("{base}/auth/link/google"),
        &[
            ("authorization", &ada_bearer),
            ("content-type", "application/json"),
        ],
        &json!({"id_token": google_token, "nonce": "axum-apple-link-1", "platform": "ios"})
            .to_string(),
    )
    .await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.json()["id"], ada_id);
    assert_eq!(linked.json()["providers"], json!(["apple", "google"]));
    let as_google = sign_in_google(addr, "ada-laptop", &ada_google).await.json();
    assert_eq!(as_google["user"]["id"], ada_id, "linked: the same user");
    assert_eq!(as_google["user"]["providers"], json!(["apple", "google"]));

    // Unlinked, Google is hers no more; Apple still signs her in on the web (no `user`
    // posted this time: the name stays).
    let unlinked = with_bearer(&base, Method::DELETE, "/auth/link/google", &ada_bearer).await;
    assert_eq!(unlinked.status, StatusCode::OK, "{:?}", unlinked.body);
    assert_eq!(unlinked.json()["providers"], json!(["apple"]));
    let gone = with_bearer(&base, Method::DELETE, "/auth/link/google", &ada_bearer).await;
    assert_eq!(
        (gone.status, gone.code()),
        (StatusCode::NOT_FOUND, "not_linked".into()),
        "{:?}",
        gone.body
    );
    let (again, again_cookie) = sign_in_web(&apple, &base, None).await;
    let again = again.json();
    assert_eq!(again["user"]["id"], ada_id);
    assert_eq!(again["user"]["providers"], json!(["apple"]));
    assert_eq!(again["user"]["name"], "Ada Lovelace");
    let google_alone = sign_in_google(addr, "ada-phone", &ada_google).await.json();
    assert_ne!(
        google_alone["user"]["id"], ada_id,
        "Google alone: someone new"
    );
    assert_eq!(google_alone["user"]["providers"], json!(["google"]));

    // Her sessions work until Apple says she revoked consent.
    let (nonce, _) = APP_NONCES[1];
    let id_token = apple.id_token(&ada(), APPLE_APP_CLIENT, Some(hashed(nonce)));
    let native = sign_in_native(&base, &id_token, nonce).await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.body);
    let native = native.json();
    assert_eq!(native["user"]["id"], ada_id, "native again: the same user");
    let refreshed = refresh(&base, &native["refresh_token"], &[]).await;
    assert_eq!(refreshed.status, StatusCode::OK, "{:?}", refreshed.body);
    let revoked = json!({"payload": apple.notification(APPLE_WEB_CLIENT, json!({
        "type": "consent-revoked",
        "sub": ada().sub,
        "event_time": now_millis(),
    }))})
    .to_string();
    let notify = async || {
        send(
            Method::POST,
            &format!("{base}/auth/apple/notifications"),
            &[("content-type", "application/json")],
            &revoked,
        )
        .await
    };
    let handled = notify().await;
    assert_eq!(handled.status, StatusCode::OK, "{:?}", handled.body);
    assert_eq!(handled.json(), json!({"status": "handled"}));
    let replayed = notify().await;
    assert_eq!(
        (replayed.status, replayed.code()),
        (StatusCode::CONFLICT, "notification_replayed".into()),
        "{:?}",
        replayed.body
    );
    for (what, refresh_token, device) in [
        ("app", &refreshed.json()["refresh_token"], vec![]),
        (
            "first browser",
            &web["refresh_token"],
            vec![("cookie", cookie.as_str())],
        ),
        (
            "second browser",
            &again["refresh_token"],
            vec![("cookie", again_cookie.as_str())],
        ),
    ] {
        let ended = refresh(&base, refresh_token, &device).await;
        assert_eq!(
            (ended.status, ended.code()),
            (StatusCode::UNAUTHORIZED, "refresh_token_revoked".into()),
            "{what}: {:?}",
            ended.body
        );
    }
    // Only Ada's: the Google-only user keeps hers.
    // (Its exchange bound it to a new device, answered as `device_id`.)
    let device = google_alone["device_id"].as_str().unwrap();
    let others = refresh(
        &base,
        &google_alone["refresh_token"],
        &[("x-device-id", device)],
    )
    .await;
    assert_eq!(others.status, StatusCode::OK, "{:?}", others.body);
    assert_eq!(apple.client_secret_failures(), 0);
}

#[tokio::test]
async fn apple_callbacks_and_app_tokens_that_break_the_rules_are_refused_on_axum() {
    let apple = apple().await;
    let (addr, _app) = support::start_axum_apple(&apple, None).await;
    let base = format!("http://{addr}");

    // Apple's POST from a browser that did not begin the sign-in: without the flow
    // cookie, and with another flow's.
    let started = begin(&base).await;
    let stray = post_callback(
        &base,
        &apple_form(&apple, &started, Some(POSTED_USER)),
        None,
    )
    .await;
    assert_eq!(
        (stray.status, stray.code()),
        (StatusCode::UNAUTHORIZED, "flow_browser_mismatch".into()),
        "{:?}",
        stray.body
    );
    let (victim, other) = (begin(&base).await, begin(&base).await);
    let form = apple_form(&apple, &victim, None);
    let crossed = post_callback(&base, &form, Some(&other.cross_site_cookies())).await;
    assert_eq!(
        (crossed.status, crossed.code()),
        (StatusCode::UNAUTHORIZED, "flow_browser_mismatch".into()),
        "{:?}",
        crossed.body
    );
    let no_state = post_callback(&base, "code=abc", Some(&other.cross_site_cookies())).await;
    assert_eq!(
        (no_state.status, no_state.code()),
        (StatusCode::BAD_REQUEST, "state_missing".into()),
        "{:?}",
        no_state.body
    );

    // The app's nonce: Apple must have been given its SHA-256, and we the nonce itself.
    let (nonce, hash) = (APP_NONCES[2].0, hashed(APP_NONCES[2].0));
    let refusals = [
        (
            "the raw nonce given to Apple",
            apple.id_token(&ada(), APPLE_APP_CLIENT, Some(nonce)),
            nonce,
            "apple_nonce_not_hashed",
        ),
        (
            "the hash given to us",
            apple.id_token(&ada(), APPLE_APP_CLIENT, Some(hash)),
            hash,
            "apple_nonce_not_hashed",
        ),
        (
            "another nonce's hash",
            apple.id_token(&ada(), APPLE_APP_CLIENT, Some(hashed(APP_NONCES[0].0))),
            nonce,
            "apple_nonce_mismatch",
        ),
        (
            "a token without a nonce",
            apple.id_token(&ada(), APPLE_APP_CLIENT, None),
            nonce,
            "id_token_nonce_missing",
        ),
    ];
    for (what, id_token, sent, code) in refusals {
        let refused = sign_in_native(&base, &id_token, sent).await;
        assert_eq!(
            (refused.status, refused.code()),
            (StatusCode::UNAUTHORIZED, code.to_owned()),
            "{what}: {:?}",
            refused.body
        );
    }
    let no_nonce = send(
        Method::POST,
        &format!("{base}/auth/apple/token"),
        &[("content-type", "application/json")],
        &json!({"id_token": apple.id_token(&ada(), APPLE_APP_CLIENT, Some(hash)), "platform": "ios"})
            .to_string(),
    )
    .await;
    assert_eq!(
        (no_nonce.status, no_nonce.code()),
        (StatusCode::UNAUTHORIZED, "nonce_required".into()),
        "{:?}",
        no_nonce.body
    );

    // Right, then once only: a refused attempt did not use the nonce up.
    let id_token = apple.id_token(&ada(), APPLE_APP_CLIENT, Some(hash));
    let signed_in = sign_in_native(&base, &id_token, nonce).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    let replayed = sign_in_native(&base, &id_token, nonce).await;
    assert_eq!(
        (replayed.status, replayed.code()),
        (StatusCode::UNAUTHORIZED, "nonce_replayed".into()),
        "{:?}",
        replayed.body
    );

    // A notification not signed by Apple's key changes nothing.
    let forged = apple.sign_with_foreign_key(json!({
        "iss": apple.issuer(),
        "aud": APPLE_WEB_CLIENT,
        "iat": now_millis() / 1000,
        "exp": now_millis() / 1000 + 300,
        "jti": "forged-1",
        "events": json!({"type": "consent-revoked", "sub": ada().sub, "event_time": now_millis()})
            .to_string(),
    }));
    let refused = send(
        Method::POST,
        &format!("{base}/auth/apple/notifications"),
        &[("content-type", "application/json")],
        &json!({ "payload": forged }).to_string(),
    )
    .await;
    assert_eq!(
        (refused.status, refused.code()),
        (
            StatusCode::UNAUTHORIZED,
            "apple_notification_bad_signature".into()
        ),
        "{:?}",
        refused.body
    );
    let kept = refresh(&base, &signed_in.json()["refresh_token"], &[]).await;
    assert_eq!(kept.status, StatusCode::OK, "{:?}", kept.body);
}
