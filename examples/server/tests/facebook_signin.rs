//! Facebook Login end to end over HTTP on the reference server, against the Graph API
//! stand-in (`upcoach_testing::facebook`, which requires `appsecret_proof`): a browser
//! signs in with a login code, the same person signs in from the app with an access
//! token, and tokens Facebook does not vouch for are refused.

mod support;

use http::{Method, StatusCode};
use serde_json::json;
use support::{Running, request_headers};
use upcoach_core::config::Settings;
use upcoach_server::{Options, ServerConfig};
use upcoach_testing::facebook::{FacebookStandIn, FacebookUser};

const APP_ID: &str = "1234567890";
const APP_SECRET: &str = "stand-in-app-secret";
const PUBLIC_URL: &str = "http://api.example.test";
const RETURN_TO: &str = "http://app.example.test/signed-in";

async fn start(graph: &FacebookStandIn) -> Running {
    let env = [
        ("UPCOACH_PUBLIC_URL", PUBLIC_URL.to_owned()),
        ("AUTH_RETURN_TO_ALLOWLIST", RETURN_TO.to_owned()),
        (
            "AUTH_SIGNING_KEY",
            "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc".to_owned(),
        ),
        ("FACEBOOK_APP_ID", APP_ID.to_owned()),
        ("FACEBOOK_APP_SECRET", APP_SECRET.to_owned()),
        ("FACEBOOK_GRAPH_URL", graph.graph_url()),
        (
            "FACEBOOK_DIALOG_URL",
            format!("{}/v19.0/dialog/oauth", graph.base_url()),
        ),
    ];
    let config = ServerConfig::from_lookup(|name| {
        env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
    })
    .unwrap();
    Running::start(config, Options::default()).await
}

fn bob() -> FacebookUser {
    FacebookUser::new("10150000000000002")
        .with_name("Bob")
        .with_email("bob@example.test")
}

fn param(url: &url::Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

#[tokio::test]
async fn a_browser_and_an_app_sign_the_same_person_in_with_facebook() {
    let graph = FacebookStandIn::start(APP_ID, APP_SECRET).await;
    let server = start(&graph).await;
    let addr = server.addr;

    // The browser: authorize → Facebook's dialog → our callback → the web app's code.
    let authorize = format!(
        "/auth/facebook/authorize?platform=web&return_to={}",
        url::form_urlencoded::byte_serialize(RETURN_TO.as_bytes()).collect::<String>()
    );
    let started = request_headers(addr, Method::GET, &authorize, None, &[]).await;
    assert_eq!(started.status, StatusCode::FOUND, "{:?}", started.json);
    let cookies: Vec<String> = started
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_owned())
        .collect();
    let cookie = cookies.join("; ");
    let dialog = url::Url::parse(started.headers["location"].to_str().unwrap()).unwrap();
    assert_eq!(param(&dialog, "client_id"), APP_ID);
    let callback = format!("{PUBLIC_URL}/auth/facebook/callback");
    assert_eq!(param(&dialog, "redirect_uri"), callback);
    let code = graph.issue_code(bob(), &callback);
    let back = format!(
        "/auth/facebook/callback?code={code}&state={}",
        param(&dialog, "state")
    );
    let landed = request_headers(addr, Method::GET, &back, None, &[("cookie", &cookie)]).await;
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.json);
    let to_app = url::Url::parse(landed.headers["location"].to_str().unwrap()).unwrap();
    assert!(to_app.as_str().starts_with(RETURN_TO));
    let exchanged = request_headers(
        addr,
        Method::POST,
        "/auth/exchange",
        Some(&json!({"login_code": param(&to_app, "login_code")}).to_string()),
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.json);
    let web_user = exchanged.json["user"]["id"].clone();
    assert!(web_user.is_string());

    // The app: the access token Facebook's SDK gave it.
    let native = request_headers(
        addr,
        Method::POST,
        "/auth/facebook/token",
        Some(&json!({"access_token": graph.issue_token(bob()), "platform": "ios"}).to_string()),
        &[],
    )
    .await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.json);
    assert_eq!(native.json["user"]["id"], web_user, "one person, one user");
    let bearer = format!("Bearer {}", native.json["access_token"].as_str().unwrap());
    let me = request_headers(
        addr,
        Method::GET,
        "/auth/me",
        None,
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(me.status, StatusCode::OK, "{:?}", me.json);

    // Tokens Facebook does not vouch for.
    for (token, code) in [
        (
            graph.issue_foreign_token(bob()),
            "facebook_token_foreign_app",
        ),
        (graph.issue_expired_token(bob()), "facebook_token_invalid"),
    ] {
        let refused = request_headers(
            addr,
            Method::POST,
            "/auth/facebook/token",
            Some(&json!({"access_token": token, "platform": "ios"}).to_string()),
            &[],
        )
        .await;
        assert_eq!(
            refused.status,
            StatusCode::UNAUTHORIZED,
            "{:?}",
            refused.json
        );
        assert_eq!(refused.json["error"]["code"], code);
    }
    assert_eq!(graph.proof_failures(), 0);
    server.stop().await;
}
