//! A generic OpenID Connect provider (`OIDC_PROVIDERS=corp`) on the axum example, beside
//! Google, each an independent OpenID provider (npm `oauth2-mock-server`): a browser
//! signs in with corp, the user links Google and unlinks it again.

mod support;

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Answer, CLIENT_ID, RETURN_TO, send, urlencode};
use upcoach_core::http::protect::LimitConfig;
use upcoach_testing::OidcProvider;

const CORP_CLIENT: &str = "corp-web-client";

/// The axum example with Google at `google` and corp at `corp`; it stops with the
/// test's runtime.
async fn start(google: &OidcProvider, corp: &OidcProvider) -> SocketAddr {
    let mut env = support::google_env(google);
    env.extend([
        ("OIDC_PROVIDERS", "corp".to_owned()),
        ("OIDC_CORP_ISSUER", corp.issuer().to_owned()),
        ("OIDC_CORP_CLIENT_ID", CORP_CLIENT.to_owned()),
        ("OIDC_CORP_CLIENT_SECRET", "corp-secret".to_owned()),
        ("OIDC_CORP_SCOPES", "openid email".to_owned()),
    ]);
    support::start_axum_with_env(env, false, &LimitConfig::default())
        .await
        .0
}

fn param(url: &url::Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

fn hint(claims: &Value) -> String {
    URL_SAFE_NO_PAD.encode(claims.to_string())
}

/// A browser's web sign-in with `provider` at `base`: authorize with `return_to`, the
/// provider (as `claims`), our callback, and the login code's exchange with the flow
/// cookie. The exchange's answer.
async fn sign_in_web(base: &str, provider: &str, claims: &Value) -> Answer {
    let started = send(
        Method::GET,
        &format!(
            "{base}/auth/{provider}/authorize?platform=web&return_to={}",
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
    let mut to_provider = started.location();
    assert_eq!(
        param(&to_provider, "redirect_uri"),
        format!("{base}/auth/{provider}/callback")
    );
    to_provider
        .query_pairs_mut()
        .append_pair("login_hint", &hint(claims));
    let at_provider = send(Method::GET, to_provider.as_str(), &[], "").await;
    assert_eq!(at_provider.status, StatusCode::FOUND);
    let landed = send(
        Method::GET,
        at_provider.location().as_str(),
        &[("cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.body);
    send(
        Method::POST,
        &format!("{base}/auth/exchange"),
        &[("cookie", &cookie), ("content-type", "application/json")],
        &json!({"login_code": param(&landed.location(), "login_code")}).to_string(),
    )
    .await
}

#[tokio::test]
async fn a_corp_user_links_and_unlinks_google_on_axum() {
    let Some(google) = OidcProvider::start().await else {
        return;
    };
    let Some(corp) = OidcProvider::start().await else {
        return;
    };
    let addr = start(&google, &corp).await;
    let base = format!("http://{addr}");

    let ada_corp = json!({"sub": "corp-ada", "email": "ada@corp.example", "email_verified": true});
    let signed_in = sign_in_web(&base, "corp", &ada_corp).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    let tokens = signed_in.json();
    let user = tokens["user"]["id"].clone();
    assert_eq!(tokens["user"]["providers"], json!(["corp"]));
    assert_eq!(tokens["user"]["email"], "ada@corp.example");
    let bearer = format!("Bearer {}", tokens["access_token"].as_str().unwrap());

    let ada_google =
        json!({"sub": "google-ada", "email": "ada@gmail.example", "email_verified": true});
    let id_token = google.id_token(CLIENT_ID, "axum-link-1", &ada_google).await;
    let linked = send(
        Method::POST,
        &format!("{base}/auth/link/google"),
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        &json!({"id_token": id_token, "nonce": "axum-link-1", "platform": "ios"}).to_string(),
    )
    .await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.json()["providers"], json!(["corp", "google"]));

    let as_google = sign_in_web(&base, "google", &ada_google).await;
    assert_eq!(as_google.status, StatusCode::OK, "{:?}", as_google.body);
    assert_eq!(
        as_google.json()["user"]["id"],
        user,
        "linked: the same user"
    );

    let me = send(
        Method::GET,
        &format!("{base}/auth/me"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(me.status, StatusCode::OK, "{:?}", me.body);
    assert_eq!(me.json()["providers"], json!(["corp", "google"]));

    let unlinked = send(
        Method::DELETE,
        &format!("{base}/auth/link/google"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(unlinked.status, StatusCode::OK, "{:?}", unlinked.body);
    assert_eq!(unlinked.json()["providers"], json!(["corp"]));
    let last = send(
        Method::DELETE,
        &format!("{base}/auth/link/corp"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(
        (last.status, last.code()),
        (StatusCode::CONFLICT, "last_identity".into())
    );

    // Unlinked, the Google account signs in on its own: a new user (its address is
    // no one else's).
    let alone = sign_in_web(&base, "google", &ada_google).await;
    assert_eq!(alone.status, StatusCode::OK, "{:?}", alone.body);
    assert_ne!(alone.json()["user"]["id"], user);
    assert_eq!(alone.json()["user"]["providers"], json!(["google"]));

    // The configured scopes went to corp; names it does not know are 404.
    let started = send(
        Method::GET,
        &format!("{base}/auth/corp/authorize?platform=web"),
        &[],
        "",
    )
    .await;
    assert_eq!(param(&started.location(), "scope"), "openid email");
    for path in ["/auth/gitlab/authorize", "/auth/Corp/authorize"] {
        let answer = send(Method::GET, &format!("{base}{path}"), &[], "").await;
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::NOT_FOUND, "unknown_provider".into()),
            "{path}"
        );
    }
}
