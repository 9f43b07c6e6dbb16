//! Facebook Login end to end over HTTP on the reference server, against the Graph API
//! stand-in (`upcoach_testing::facebook`, which requires `appsecret_proof`): a browser
//! signs in with a login code, the same person signs in from the app with an access
//! token, and tokens Facebook does not vouch for are refused.

mod support;

use http::StatusCode;
use serde_json::json;
use support::signin::{Browser, param, urlencode};
use support::{RETURN_TO, Running};
use upcoach_testing::facebook::{FacebookStandIn, FacebookUser};

const APP_ID: &str = "1234567890";
const APP_SECRET: &str = "stand-in-app-secret";

async fn start(graph: &FacebookStandIn) -> Running {
    Running::from_env(&graph.env(), |_| {}).await
}

fn bob() -> FacebookUser {
    FacebookUser::new("10150000000000002")
        .with_name("Bob")
        .with_email("bob@example.test")
}

#[tokio::test]
async fn a_browser_and_an_app_sign_the_same_person_in_with_facebook() {
    let graph = FacebookStandIn::start(APP_ID, APP_SECRET).await;
    let server = start(&graph).await;

    // The browser: authorize → Facebook's dialog → our callback → the web app's code.
    let mut browser = Browser::default();
    let authorize = format!("platform=web&return_to={}", urlencode(RETURN_TO));
    let dialog = browser
        .authorize(&server, "facebook", &authorize)
        .await
        .location();
    assert_eq!(param(&dialog, "client_id"), APP_ID);
    let callback = server.url("/auth/facebook/callback");
    assert_eq!(param(&dialog, "redirect_uri"), callback);
    let code = graph.issue_code(bob(), &callback);
    let back = format!("{callback}?code={code}&state={}", param(&dialog, "state"));
    let landed = browser.callback(&url::Url::parse(&back).unwrap()).await;
    let exchanged = browser.finish(&server, &landed).await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.json);
    let web_user = exchanged.json["user"]["id"].clone();
    assert!(web_user.is_string());

    // The app: the access token Facebook's SDK gave it.
    let sign_in = async |access_token: String| {
        let body = json!({"access_token": access_token, "platform": "ios"});
        server.sign_in_native("facebook", body).await
    };
    let native = sign_in(graph.issue_token(bob())).await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.json);
    assert_eq!(native.json["user"]["id"], web_user, "one person, one user");
    let me = server
        .get_as("/auth/me", native.json["access_token"].as_str())
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
        let refused = sign_in(token).await;
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
