//! The Google provider against an independent OpenID provider (npm `oauth2-mock-server`):
//! PKCE and code checks at the token endpoint.

use std::sync::Arc;

use upcoach_auth::google::GoogleProvider;
use upcoach_auth::{AuthProvider, AuthorizationRequest};
use upcoach_core::config::GoogleConfig;
use upcoach_core::{Config, SystemClock};
use upcoach_testing::OidcProvider;

const REDIRECT: &str = "http://127.0.0.1:1/auth/google/callback";

async fn setup() -> Option<(OidcProvider, GoogleProvider)> {
    let provider = OidcProvider::start().await?;
    let issuer = provider.issuer().to_owned();
    let env = [
        ("GOOGLE_CLIENT_ID", "upcoach-test-client".to_owned()),
        ("GOOGLE_CLIENT_SECRET", "test-secret".to_owned()),
        ("GOOGLE_ISSUER_URL", issuer),
    ];
    let config =
        Config::from_lookup(|n| env.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone())).unwrap();
    let google: &GoogleConfig = config.google.as_ref().unwrap();
    let google = GoogleProvider::discover(google, REDIRECT, Arc::new(SystemClock))
        .await
        .unwrap();
    Some((provider, google))
}

/// Follows the authorization URL at the provider and returns the code it redirects with.
async fn code_for(google: &GoogleProvider, request: &AuthorizationRequest) -> String {
    let url = google.authorization_url(request).unwrap();
    let http = oauth2::reqwest::Client::builder()
        .redirect(oauth2::reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let answer = http.get(url.as_str()).send().await.unwrap();
    let location = url::Url::parse(answer.headers()["location"].to_str().unwrap()).unwrap();
    location
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned()
}

fn request(verifier: &str) -> AuthorizationRequest {
    use base64::Engine;
    use sha2::Digest;
    AuthorizationRequest {
        state: "state-1".into(),
        nonce: "nonce-1".into(),
        code_challenge: base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes())),
        redirect_uri: REDIRECT.into(),
    }
}

const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

#[tokio::test]
async fn the_right_verifier_gets_a_verified_identity() {
    let Some((_p, google)) = setup().await else {
        return;
    };
    let request = request(VERIFIER);
    let code = code_for(&google, &request).await;
    let identity = google
        .exchange_code(&code, &request, VERIFIER)
        .await
        .unwrap();
    assert_eq!(identity.subject, "johndoe");
    assert!(identity.email_verified);
}

#[tokio::test]
async fn a_wrong_or_missing_pkce_verifier_is_refused() {
    let Some((_p, google)) = setup().await else {
        return;
    };
    let request = request(VERIFIER);
    let code = code_for(&google, &request).await;
    let wrong = google
        .exchange_code(
            &code,
            &request,
            "WRONGftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
        )
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), "authorization_code_rejected");
    let code = code_for(&google, &request).await;
    let missing = google.exchange_code(&code, &request, "").await.unwrap_err();
    assert_eq!(missing.code(), "authorization_code_rejected");
}

#[tokio::test]
async fn a_replayed_code_is_refused() {
    let Some((_p, google)) = setup().await else {
        return;
    };
    let request = request(VERIFIER);
    let code = code_for(&google, &request).await;
    google
        .exchange_code(&code, &request, VERIFIER)
        .await
        .unwrap();
    let replay = google
        .exchange_code(&code, &request, VERIFIER)
        .await
        .unwrap_err();
    assert_eq!(replay.code(), "authorization_code_rejected");
}

#[tokio::test]
async fn a_redirect_uri_other_than_the_registered_one_is_refused() {
    let Some((_p, google)) = setup().await else {
        return;
    };
    let mut other = request(VERIFIER);
    other.redirect_uri = "http://127.0.0.1:1/auth/google/callback/extra".into();
    assert_eq!(
        google.authorization_url(&other).unwrap_err().code(),
        "redirect_uri_mismatch"
    );
}
