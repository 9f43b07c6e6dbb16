//! Sign in with Apple end to end over HTTP on the reference server, against the Apple
//! stand-in (`upcoach_testing::apple`, which checks our ES256 client secret): a browser
//! signs in through Apple's `form_post` callback with its name, the same person signs
//! in from the app with an id token, and Apple's consent-revoked notification ends the
//! sessions.

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::{Answer, Running, request_headers};
use upcoach_core::config::Settings;
use upcoach_server::{Options, ServerConfig};
use upcoach_testing::apple::{
    AppleStandIn, AppleUser, TEST_KEY_ID, TEST_TEAM_ID, TEST_TEAM_PRIVATE_KEY, TEST_TEAM_PUBLIC_KEY,
};

const WEB: &str = "com.example.web";
const APP: &str = "com.example.app";
const PUBLIC_URL: &str = "http://api.example.test";
const RETURN_TO: &str = "http://app.example.test/signed-in";
/// The `user` field Apple posts on a first authorization.
const POSTED_USER: &str =
    r#"{"name":{"firstName":"Ada","lastName":"Lovelace"},"email":"ada@privaterelay.appleid.com"}"#;

async fn start(apple: &AppleStandIn) -> Running {
    let env = [
        ("UPCOACH_PUBLIC_URL", PUBLIC_URL.to_owned()),
        ("AUTH_RETURN_TO_ALLOWLIST", RETURN_TO.to_owned()),
        (
            "AUTH_SIGNING_KEY",
            "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc".to_owned(),
        ),
        ("APPLE_WEB_CLIENT_ID", WEB.to_owned()),
        ("APPLE_MOBILE_CLIENT_ID", APP.to_owned()),
        ("APPLE_TEAM_ID", TEST_TEAM_ID.to_owned()),
        ("APPLE_KEY_ID", TEST_KEY_ID.to_owned()),
        ("APPLE_PRIVATE_KEY", TEST_TEAM_PRIVATE_KEY.to_owned()),
        ("APPLE_AUTH_URL", apple.authorize_url()),
        ("APPLE_TOKEN_URL", apple.token_url()),
        ("APPLE_KEYS_URL", apple.keys_url()),
        ("APPLE_ISSUER", apple.issuer().to_owned()),
    ];
    let config = ServerConfig::from_lookup(|name| {
        env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
    })
    .unwrap();
    Running::start(config, Options::default()).await
}

fn ada() -> AppleUser {
    AppleUser::new("001234.5f8e1c2d3b4a.0042", "ada@privaterelay.appleid.com")
}

fn param(url: &url::Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

fn encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// What a native app gives Apple for its raw nonce.
fn hashed(raw: &str) -> String {
    Sha256::digest(raw.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A browser sign-in begun: Apple's authorization URL, the `Set-Cookie` headers, and the
/// cookies as the browser sends them back.
struct Begun {
    apple_url: url::Url,
    set_cookies: Vec<String>,
    cookie: String,
}

async fn begin(addr: SocketAddr) -> Begun {
    let authorize = format!(
        "/auth/apple/authorize?platform=web&return_to={}",
        encode(RETURN_TO)
    );
    let started = request_headers(addr, Method::GET, &authorize, None, &[]).await;
    assert_eq!(started.status, StatusCode::FOUND, "{:?}", started.json);
    let set_cookies: Vec<String> = started
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|c| c.to_str().unwrap().to_owned())
        .collect();
    let cookie = set_cookies
        .iter()
        .map(|c| c.split(';').next().unwrap())
        .collect::<Vec<_>>()
        .join("; ");
    Begun {
        apple_url: url::Url::parse(started.headers["location"].to_str().unwrap()).unwrap(),
        set_cookies,
        cookie,
    }
}

/// Apple's `form_post` back to our callback, as the browser sends it (with `cookie`).
async fn post_callback(addr: SocketAddr, form: &str, cookie: Option<&str>) -> Answer {
    let mut request = Request::post("/auth/apple/callback")
        .header("host", addr.to_string())
        .header("origin", "https://appleid.apple.com")
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let request = request
        .body(Full::new(Bytes::from(form.to_owned())))
        .unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        json: serde_json::from_slice(&body).unwrap_or(Value::Null),
    }
}

/// Apple's answer for `begun`: a code for Ada issued to the web client with the flow's
/// redirect URI and nonce, posted with the flow's `state` and `user`.
fn apple_form(apple: &AppleStandIn, begun: &Begun) -> String {
    let url = &begun.apple_url;
    let code = apple.issue_code(
        &ada(),
        WEB,
        Some(&param(url, "redirect_uri")),
        Some(&param(url, "nonce")),
    );
    format!(
        "code={}&state={}&user={}",
        encode(&code),
        encode(&param(url, "state")),
        encode(POSTED_USER)
    )
}

#[tokio::test]
async fn a_browser_and_an_app_sign_ada_in_with_apple_until_she_revokes_consent() {
    let apple = AppleStandIn::start(TEST_TEAM_ID, TEST_KEY_ID, TEST_TEAM_PUBLIC_KEY).await;
    let server = start(&apple).await;
    let addr = server.addr;

    // Authorize: to Apple with form_post; the flow cookie must survive Apple's
    // cross-site POST back.
    let begun = begin(addr).await;
    assert!(
        begun.apple_url.as_str().starts_with(&apple.authorize_url()),
        "{}",
        begun.apple_url
    );
    assert_eq!(param(&begun.apple_url, "client_id"), WEB);
    assert_eq!(param(&begun.apple_url, "response_mode"), "form_post");
    assert_eq!(
        param(&begun.apple_url, "redirect_uri"),
        format!("{PUBLIC_URL}/auth/apple/callback")
    );
    let flow_cookie = &begun.set_cookies[0];
    assert!(flow_cookie.contains("SameSite=None"), "{flow_cookie}");
    assert!(flow_cookie.contains("Secure"), "{flow_cookie}");
    assert!(flow_cookie.contains("HttpOnly"), "{flow_cookie}");

    // Apple's POST from a browser that did not begin this sign-in (another flow, so
    // this one stays untouched).
    let other = begin(addr).await;
    let stray = post_callback(addr, &apple_form(&apple, &other), None).await;
    assert!(
        matches!(stray.status.as_u16(), 400 | 401 | 403),
        "{:?} {:?}",
        stray.status,
        stray.json
    );
    assert_eq!(
        stray.json["error"]["code"], "flow_browser_mismatch",
        "{:?}",
        stray.json
    );

    // The browser that began: back to the web app with a login code.
    let landed = post_callback(addr, &apple_form(&apple, &begun), Some(&begun.cookie)).await;
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.json);
    let to_app = url::Url::parse(landed.headers["location"].to_str().unwrap()).unwrap();
    assert!(to_app.as_str().starts_with(RETURN_TO), "{to_app}");
    let exchanged = request_headers(
        addr,
        Method::POST,
        "/auth/exchange",
        Some(&json!({"login_code": param(&to_app, "login_code")}).to_string()),
        &[("cookie", &begun.cookie)],
    )
    .await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.json);
    let web_user = exchanged.json["user"]["id"].clone();
    assert!(web_user.is_string());
    let web_bearer = format!(
        "Bearer {}",
        exchanged.json["access_token"].as_str().unwrap()
    );
    let me = request_headers(
        addr,
        Method::GET,
        "/auth/me",
        None,
        &[("authorization", &web_bearer)],
    )
    .await;
    assert_eq!(me.status, StatusCode::OK, "{:?}", me.json);
    assert_eq!(me.json["name"], "Ada Lovelace", "{:?}", me.json);
    assert_eq!(me.json["email"], "ada@privaterelay.appleid.com");
    assert_eq!(apple.client_secret_failures(), 0);

    // The app: Apple's id token for the bundle id, carrying the hash of its nonce.
    let native = request_headers(
        addr,
        Method::POST,
        "/auth/apple/token",
        Some(
            &json!({
                "id_token": apple.id_token(&ada(), APP, Some(&hashed("app-nonce-1"))),
                "nonce": "app-nonce-1",
                "platform": "ios",
            })
            .to_string(),
        ),
        &[],
    )
    .await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.json);
    assert_eq!(native.json["user"]["id"], web_user, "one person, one user");
    assert_eq!(
        native.json["user"]["name"], "Ada Lovelace",
        "the name Apple posted once stays"
    );
    let bearer = format!("Bearer {}", native.json["access_token"].as_str().unwrap());

    // Apple is Ada's only way in: it cannot be unlinked.
    let unlink = request_headers(
        addr,
        Method::DELETE,
        "/auth/link/apple",
        None,
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(unlink.status, StatusCode::CONFLICT, "{:?}", unlink.json);
    assert_eq!(unlink.json["error"]["code"], "last_identity");

    // The session works until Apple says consent was revoked.
    let refreshed = request_headers(
        addr,
        Method::POST,
        "/auth/refresh",
        Some(&json!({"refresh_token": native.json["refresh_token"]}).to_string()),
        &[],
    )
    .await;
    assert_eq!(refreshed.status, StatusCode::OK, "{:?}", refreshed.json);
    let revoked = json!({"payload": apple.notification(APP, json!({
        "type": "consent-revoked",
        "sub": ada().sub,
        "event_time": 1_700_000_000_123_u64,
    }))})
    .to_string();
    let handled = request_headers(
        addr,
        Method::POST,
        "/auth/apple/notifications",
        Some(&revoked),
        &[],
    )
    .await;
    assert_eq!(handled.status, StatusCode::OK, "{:?}", handled.json);
    let replayed = request_headers(
        addr,
        Method::POST,
        "/auth/apple/notifications",
        Some(&revoked),
        &[],
    )
    .await;
    assert_eq!(replayed.status, StatusCode::CONFLICT, "{:?}", replayed.json);
    assert_eq!(replayed.json["error"]["code"], "notification_replayed");
    for (refresh_token, cookie) in [
        (&refreshed.json["refresh_token"], ""),
        (&exchanged.json["refresh_token"], begun.cookie.as_str()),
    ] {
        let ended = request_headers(
            addr,
            Method::POST,
            "/auth/refresh",
            Some(&json!({ "refresh_token": refresh_token }).to_string()),
            &[("cookie", cookie)],
        )
        .await;
        assert_eq!(ended.status, StatusCode::UNAUTHORIZED, "{:?}", ended.json);
        assert_eq!(ended.json["error"]["code"], "refresh_token_revoked");
    }
    server.stop().await;
}
