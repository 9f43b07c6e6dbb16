//! The Google provider against an independent OpenID provider (npm `oauth2-mock-server`):
//! PKCE and code checks at the token endpoint, and the e-mail address from UserInfo when
//! the id token carries none.

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use upcoach_core::config::Settings;

use serde_json::{Value, json};

use upcoach_auth::config::{AuthConfig, GoogleConfig};
use upcoach_auth::google::GoogleProvider;
use upcoach_auth::oidc::OpenIdConfig;
use upcoach_auth::{AuthProvider, AuthorizationRequest};
use upcoach_core::SystemClock;
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
        AuthConfig::from_lookup(|n| env.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()))
            .unwrap();
    let google: &GoogleConfig = config.google.as_ref().unwrap();
    let google = GoogleProvider::discover(
        &OpenIdConfig::google(google),
        REDIRECT,
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    Some((provider, google))
}

/// Follows the authorization URL at the provider and returns the code it redirects with.
async fn code_for(google: &GoogleProvider, request: &AuthorizationRequest) -> String {
    code_with(google, request, None).await
}

/// Like [`code_for`], with `claims` as the provider's `login_hint` (see provider.mjs):
/// claims for the tokens, `"userinfo"` claims for UserInfo only, `"userinfo_status"`.
async fn code_with(
    google: &GoogleProvider,
    request: &AuthorizationRequest,
    claims: Option<&Value>,
) -> String {
    use base64::Engine;
    let mut url = google.authorization_url(request).await.unwrap();
    if let Some(claims) = claims {
        url.query_pairs_mut().append_pair(
            "login_hint",
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string()),
        );
    }
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
        google.authorization_url(&other).await.unwrap_err().code(),
        "redirect_uri_mismatch"
    );
}

/// Signs in through the code flow with `claims` as the provider's hint.
async fn sign_in(
    google: &GoogleProvider,
    claims: &Value,
) -> Result<upcoach_auth::VerifiedIdentity, upcoach_auth::Error> {
    let request = request(VERIFIER);
    let code = code_with(google, &request, Some(claims)).await;
    google.exchange_code(&code, &request, VERIFIER).await
}

#[tokio::test]
async fn an_email_only_in_userinfo_is_taken_from_there() {
    let Some((_p, google)) = setup().await else {
        return;
    };
    let before = SystemTime::now();
    let identity = sign_in(
        &google,
        &json!({
            "sub": "generic-7", "email": null, "email_verified": null, "name": null,
            "userinfo": {"email": "ada@generic.example", "email_verified": true, "name": "Ada"},
        }),
    )
    .await
    .unwrap();
    assert_eq!(identity.subject, "generic-7");
    assert_eq!(identity.email.as_deref(), Some("ada@generic.example"));
    assert!(identity.email_verified);
    assert_eq!(identity.name.as_deref(), Some("Ada"));
    // The mock's tokens live 3600 s; the verifier's leeway is 60 s.
    let expires_at = identity.expires_at.expect("an id token has an expiry");
    assert!(
        expires_at > before + Duration::from_secs(3600 + 60 - 2)
            && expires_at <= SystemTime::now() + Duration::from_secs(3600 + 60 + 1),
        "{expires_at:?}"
    );

    // `email_verified` counts only as the JSON boolean true; the id token's name wins.
    for (verified, expected) in [(json!("true"), false), (Value::Null, false)] {
        let identity = sign_in(
            &google,
            &json!({
                "email": null, "email_verified": true,
                "userinfo": {"email": "bo@generic.example", "email_verified": verified, "name": "Other"},
            }),
        )
        .await
        .unwrap();
        assert_eq!(identity.email.as_deref(), Some("bo@generic.example"));
        assert_eq!(identity.email_verified, expected, "{verified}");
        assert_eq!(identity.name.as_deref(), Some("John Doe"));
    }
}

#[tokio::test]
async fn a_userinfo_subject_other_than_the_id_tokens_is_refused() {
    let Some((_p, google)) = setup().await else {
        return;
    };
    for sub in [json!("someone-else"), Value::Null] {
        let refused = sign_in(
            &google,
            &json!({
                "email": null,
                "userinfo": {"sub": sub, "email": "eve@generic.example", "email_verified": true},
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code(), "userinfo_subject_mismatch", "sub {sub}");
        assert!(!refused.is_retryable());
    }
}

#[tokio::test]
async fn an_id_token_with_an_email_needs_no_userinfo() {
    let Some((_p, google)) = setup().await else {
        return;
    };
    // UserInfo would fail, or name someone else: neither matters.
    for hint in [
        json!({"userinfo_status": 500}),
        json!({"userinfo": {"sub": "someone-else", "email": "eve@generic.example"}}),
    ] {
        let identity = sign_in(&google, &hint).await.unwrap();
        assert_eq!(identity.subject, "johndoe", "{hint}");
        assert_eq!(identity.email.as_deref(), Some("johndoe@example.test"));
        assert!(identity.email_verified);
    }
}

#[tokio::test]
async fn a_failing_userinfo_endpoint_is_retryable() {
    let Some((_p, google)) = setup().await else {
        return;
    };
    let failed = sign_in(&google, &json!({"email": null, "userinfo_status": 503}))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), "provider_unavailable");
    assert!(failed.is_retryable());
}
