//! Facebook Login on the axum example, end to end over HTTP against the Graph API
//! stand-in (`upcoach_testing::facebook`, which requires `appsecret_proof`).

mod support;

use http::{Method, StatusCode};
use serde_json::json;
use support::{FACEBOOK_APP_ID, FACEBOOK_APP_SECRET, RETURN_TO, send, urlencode};
use upcoach_testing::facebook::{FacebookStandIn, FacebookUser};

fn carol() -> FacebookUser {
    FacebookUser::new("10150000000000003").with_email("carol@example.test")
}

fn param(url: &url::Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

#[tokio::test]
async fn a_browser_and_an_app_sign_in_with_facebook_on_axum() {
    let graph = FacebookStandIn::start(FACEBOOK_APP_ID, FACEBOOK_APP_SECRET).await;
    let (addr, _app) = support::start_axum_facebook(&graph).await;
    let base = format!("http://{addr}");

    let started = send(
        Method::GET,
        &format!(
            "{base}/auth/facebook/authorize?platform=web&return_to={}",
            urlencode(RETURN_TO)
        ),
        &[],
        "",
    )
    .await;
    assert_eq!(started.status, StatusCode::FOUND, "{:?}", started.body);
    let cookie = started
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join("; ");
    let dialog = started.location();
    let callback = format!("{base}/auth/facebook/callback");
    assert_eq!(param(&dialog, "redirect_uri"), callback);
    let code = graph.issue_code(carol(), &callback);
    let landed = send(
        Method::GET,
        &format!("{callback}?code={code}&state={}", param(&dialog, "state")),
        &[("cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.body);
    let exchanged = send(
        Method::POST,
        &format!("{base}/auth/exchange"),
        &[("cookie", &cookie), ("content-type", "application/json")],
        &json!({"login_code": param(&landed.location(), "login_code")}).to_string(),
    )
    .await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.body);

    let native = send(
        Method::POST,
        &format!("{base}/auth/facebook/token"),
        &[("content-type", "application/json")],
        &json!({"access_token": graph.issue_token(carol()), "platform": "android"}).to_string(),
    )
    .await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.body);
    assert_eq!(native.json()["user"]["id"], exchanged.json()["user"]["id"]);

    let foreign = send(
        Method::POST,
        &format!("{base}/auth/facebook/token"),
        &[("content-type", "application/json")],
        &json!({"access_token": graph.issue_foreign_token(carol()), "platform": "android"})
            .to_string(),
    )
    .await;
    assert_eq!(foreign.status, StatusCode::UNAUTHORIZED);
    assert_eq!(foreign.code(), "facebook_token_foreign_app");
    assert_eq!(graph.proof_failures(), 0);
}
