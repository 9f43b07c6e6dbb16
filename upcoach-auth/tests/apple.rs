//! Sign in with Apple against the stand-in on loopback (`upcoach_testing::apple`), which
//! checks our ES256 client secret on every code exchange as Apple does, serves "Apple's"
//! RS256 keys, and signs id tokens and notifications with them.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use upcoach_auth::apple::{AppleClient, AppleEventKind, AppleProvider};
use upcoach_auth::config::AuthConfig;
use upcoach_auth::{AuthProvider, AuthorizationRequest, NativeCredential, ProviderId};
use upcoach_core::SystemClock;
use upcoach_core::config::Settings;
use upcoach_testing::apple::{
    AppleStandIn, AppleUser, TEST_KEY_ID, TEST_TEAM_ID, TEST_TEAM_PRIVATE_KEY, TEST_TEAM_PUBLIC_KEY,
};

const WEB: &str = "com.example.web";
const APP: &str = "com.example.app";
const CALLBACK: &str = "https://api.example.test/auth/apple/callback";

async fn stand_in() -> AppleStandIn {
    AppleStandIn::start(TEST_TEAM_ID, TEST_KEY_ID, TEST_TEAM_PUBLIC_KEY).await
}

/// Where the provider finds Apple: the stand-in's addresses and issuer.
#[derive(Clone)]
struct Endpoints {
    auth: String,
    token: String,
    keys: String,
    issuer: String,
}

impl Endpoints {
    fn of(apple: &AppleStandIn) -> Self {
        Self {
            auth: apple.authorize_url(),
            token: apple.token_url(),
            keys: apple.keys_url(),
            issuer: apple.issuer().to_owned(),
        }
    }
}

/// The provider for both client ids, pointed at `apple`'s endpoints.
fn provider(apple: &AppleStandIn) -> AppleProvider {
    provider_at(Endpoints::of(apple))
}

fn provider_at(at: Endpoints) -> AppleProvider {
    let config = AuthConfig::from_lookup(move |name| match name {
        "APPLE_WEB_CLIENT_ID" => Some(WEB.into()),
        "APPLE_MOBILE_CLIENT_ID" => Some(APP.into()),
        "APPLE_TEAM_ID" => Some(TEST_TEAM_ID.into()),
        "APPLE_KEY_ID" => Some(TEST_KEY_ID.into()),
        "APPLE_PRIVATE_KEY" => Some(TEST_TEAM_PRIVATE_KEY.into()),
        "APPLE_AUTH_URL" => Some(at.auth.clone()),
        "APPLE_TOKEN_URL" => Some(at.token.clone()),
        "APPLE_KEYS_URL" => Some(at.keys.clone()),
        "APPLE_ISSUER" => Some(at.issuer.clone()),
        _ => None,
    })
    .unwrap();
    AppleProvider::new(
        config.apple.as_ref().unwrap(),
        CALLBACK,
        Arc::new(SystemClock),
    )
    .unwrap()
}

fn request(nonce: &str) -> AuthorizationRequest {
    AuthorizationRequest {
        state: "flow-state".into(),
        nonce: nonce.into(),
        code_challenge: "pkce-challenge".into(),
        redirect_uri: CALLBACK.into(),
    }
}

fn ada() -> AppleUser {
    AppleUser::new("001234.5f8e1c2d3b4a.0042", "ada@privaterelay.appleid.com")
}

/// What a native app gives Apple for its raw nonce.
fn hashed(raw: &str) -> String {
    Sha256::digest(raw.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn id_token_credential(id_token: String, raw_nonce: &str) -> NativeCredential {
    NativeCredential::IdToken {
        id_token,
        nonce: Some(raw_nonce.into()),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn query(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The body Apple posts to the notification endpoint.
fn notification_body(jwt: &str) -> Vec<u8> {
    json!({ "payload": jwt }).to_string().into_bytes()
}

fn consent_revoked() -> Value {
    json!({
        "type": "consent-revoked",
        "sub": ada().sub,
        "event_time": 1_700_000_000_123_u64,
    })
}

/// Notification claims as Apple sends them, for `aud`, issued now.
fn notification_claims(apple: &AppleStandIn, aud: &str) -> Value {
    let iat = now();
    json!({
        "iss": apple.issuer(),
        "aud": aud,
        "iat": iat,
        "exp": iat + 300,
        "jti": "Ptdu3kOAHgFsU8HvoxW0Ng",
        "events": consent_revoked().to_string(),
    })
}

#[tokio::test]
async fn a_web_code_is_exchanged_with_a_valid_client_secret_and_yields_the_identity() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let mut user = ada();
    user.claims_as_strings = true;
    let code = apple.issue_code(&user, WEB, Some(CALLBACK), Some("web-nonce"));
    let identity = provider
        .exchange_code(&code, &request("web-nonce"), "pkce-verifier")
        .await
        .unwrap();
    assert_eq!(identity.provider, ProviderId::APPLE);
    assert_eq!(identity.subject, user.sub);
    assert_eq!(identity.email, user.email);
    assert!(identity.email_verified, "\"true\" as a string counts");
    assert_eq!(identity.name, None);
    let until = identity.expires_at.unwrap();
    assert!(until > SystemTime::now());
    assert_eq!(apple.token_calls(), 1);
    assert_eq!(apple.client_secret_failures(), 0);
    assert_eq!(provider.issuer(), Some(apple.issuer()));

    let mut unverified = ada();
    unverified.email_verified = false;
    unverified.claims_as_strings = true;
    let code = apple.issue_code(&unverified, WEB, Some(CALLBACK), Some("web-nonce"));
    let identity = provider
        .exchange_code(&code, &request("web-nonce"), "pkce-verifier")
        .await
        .unwrap();
    assert!(!identity.email_verified, "\"false\" as a string");
    assert_eq!(apple.client_secret_failures(), 0);
}

#[tokio::test]
async fn the_authorization_url_asks_for_a_form_post_with_name_and_email_and_no_pkce() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let url = provider
        .authorization_url(&request("web-nonce"))
        .await
        .unwrap();
    assert!(url.as_str().starts_with(&apple.authorize_url()), "{url}");
    assert_eq!(query(&url, "response_type").as_deref(), Some("code"));
    assert_eq!(query(&url, "response_mode").as_deref(), Some("form_post"));
    assert_eq!(query(&url, "scope").as_deref(), Some("name email"));
    assert!(url.as_str().contains("scope=name%20email"), "{url}");
    assert_eq!(query(&url, "client_id").as_deref(), Some(WEB));
    assert_eq!(query(&url, "redirect_uri").as_deref(), Some(CALLBACK));
    assert_eq!(query(&url, "state").as_deref(), Some("flow-state"));
    assert_eq!(query(&url, "nonce").as_deref(), Some("web-nonce"));
    assert_eq!(query(&url, "code_challenge"), None);
    assert_eq!(query(&url, "code_challenge_method"), None);
    assert_eq!(apple.token_calls() + apple.key_calls(), 0);
}

#[tokio::test]
async fn a_code_is_taken_once() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let code = apple.issue_code(&ada(), WEB, Some(CALLBACK), Some("web-nonce"));
    provider
        .exchange_code(&code, &request("web-nonce"), "v")
        .await
        .unwrap();
    let again = provider
        .exchange_code(&code, &request("web-nonce"), "v")
        .await
        .unwrap_err();
    assert_eq!(again.code(), "authorization_code_rejected");
    assert!(!again.is_retryable());
    let unknown = provider
        .exchange_code("c-never-issued", &request("web-nonce"), "v")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), "authorization_code_rejected");
    assert_eq!(apple.client_secret_failures(), 0);
}

/// Apple refusing our client secret (`invalid_client`: a key id, team or key that is
/// not Apple's for this client) is our configuration's fault: `provider_misconfigured`,
/// not retryable, where an outage would be `provider_unavailable`.
#[tokio::test]
async fn a_client_secret_apple_refuses_is_a_misconfiguration() {
    // Apple knows the team's key under another key id than the one configured.
    let apple = AppleStandIn::start(TEST_TEAM_ID, "ZZ99YY88XX", TEST_TEAM_PUBLIC_KEY).await;
    let provider = provider(&apple);
    let code = apple.issue_code(&ada(), WEB, Some(CALLBACK), Some("web-nonce"));
    let refused = provider
        .exchange_code(&code, &request("web-nonce"), "v")
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.is_retryable()),
        ("provider_misconfigured", false),
        "{refused:?}"
    );
    assert_eq!(apple.client_secret_failures(), 1);
}

#[tokio::test]
async fn a_web_id_token_must_carry_the_flows_nonce() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let code = apple.issue_code(&ada(), WEB, Some(CALLBACK), Some("another-flow"));
    let err = provider
        .exchange_code(&code, &request("web-nonce"), "v")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "id_token_nonce_mismatch");

    let code = apple.issue_code(&ada(), WEB, Some(CALLBACK), None);
    let err = provider
        .exchange_code(&code, &request("web-nonce"), "v")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "id_token_nonce_missing");

    // The hash of the flow's nonce is not the flow's nonce: the web is exact.
    let code = apple.issue_code(&ada(), WEB, Some(CALLBACK), Some(&hashed("web-nonce")));
    let err = provider
        .exchange_code(&code, &request("web-nonce"), "v")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "id_token_nonce_mismatch");
}

#[tokio::test]
async fn a_native_id_token_with_the_hashed_nonce_signs_in() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let raw = "n-0S6_WzA2Mj";
    let token = apple.id_token(&ada(), APP, Some(&hashed(raw)));
    let identity = provider
        .verify_native(&id_token_credential(token.clone(), raw))
        .await
        .unwrap();
    assert_eq!(identity.provider, ProviderId::APPLE);
    assert_eq!(identity.subject, ada().sub);
    assert_eq!(identity.email, ada().email);
    assert!(identity.email_verified);

    let signed_in = provider
        .verify_id_token(&token, AppleClient::Native, raw)
        .await
        .unwrap();
    assert_eq!(signed_in.identity, identity);
    assert_eq!(signed_in.claims.nonce, Some(hashed(raw)));
    assert_eq!(signed_in.claims.real_user_status.map(|s| s.code()), Some(2));
    assert!(!signed_in.claims.is_private_email);
}

#[tokio::test]
async fn a_raw_nonce_given_to_apple_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let raw = "n-0S6_WzA2Mj";
    // The app gave Apple the raw nonce: the claim is the raw nonce.
    let token = apple.id_token(&ada(), APP, Some(raw));
    let err = provider
        .verify_native(&id_token_credential(token, raw))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "apple_nonce_not_hashed");
}

#[tokio::test]
async fn a_hashed_nonce_given_to_us_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let raw = "n-0S6_WzA2Mj";
    // Apple got the hash, as it should, but the app gave us the hash too.
    let token = apple.id_token(&ada(), APP, Some(&hashed(raw)));
    let err = provider
        .verify_native(&id_token_credential(token, &hashed(raw)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "apple_nonce_not_hashed");
}

#[tokio::test]
async fn a_native_id_token_of_another_nonce_or_none_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let token = apple.id_token(&ada(), APP, Some(&hashed("another-sign-in")));
    let err = provider
        .verify_native(&id_token_credential(token, "n-0S6_WzA2Mj"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "apple_nonce_mismatch");

    let token = apple.id_token(&ada(), APP, None);
    let err = provider
        .verify_native(&id_token_credential(token, "n-0S6_WzA2Mj"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "id_token_nonce_missing");
}

#[tokio::test]
async fn a_native_id_token_for_the_web_audience_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let raw = "n-0S6_WzA2Mj";
    let token = apple.id_token(&ada(), WEB, Some(&hashed(raw)));
    let err = provider
        .verify_native(&id_token_credential(token, raw))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "id_token_wrong_audience");

    // Nor does a native token pass as a web one.
    let token = apple.id_token(&ada(), APP, Some("web-nonce"));
    let err = provider
        .verify_id_token(&token, AppleClient::Web, "web-nonce")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "id_token_wrong_audience");
}

#[tokio::test]
async fn a_native_id_token_not_signed_by_apple_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let raw = "n-0S6_WzA2Mj";
    let iat = now();
    let claims = json!({
        "iss": apple.issuer(),
        "aud": APP,
        "iat": iat,
        "exp": iat + 600,
        "sub": ada().sub,
        "nonce": hashed(raw),
    });
    let forged = apple.sign_with_foreign_key(claims.clone());
    let err = provider
        .verify_native(&id_token_credential(forged, raw))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "id_token_bad_signature");

    let mut elsewhere = claims;
    elsewhere["iss"] = json!("https://evil.example.test");
    let err = provider
        .verify_native(&id_token_credential(apple.sign(elsewhere), raw))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "id_token_wrong_issuer");
}

#[tokio::test]
async fn a_native_code_is_exchanged_as_the_bundle_id() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let raw = "n-0S6_WzA2Mj";
    let code = apple.issue_code(&ada(), APP, None, Some(&hashed(raw)));
    let identity = provider
        .verify_native(&NativeCredential::AuthorizationCode {
            code,
            nonce: Some(raw.into()),
        })
        .await
        .unwrap();
    assert_eq!(identity.subject, ada().sub);
    assert_eq!(identity.email, ada().email);
    assert_eq!(apple.client_secret_failures(), 0);

    // A code of the web client is not the app's to redeem.
    let web_code = apple.issue_code(&ada(), WEB, None, Some(&hashed(raw)));
    let err = provider
        .verify_native(&NativeCredential::AuthorizationCode {
            code: web_code,
            nonce: Some(raw.into()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "authorization_code_rejected");

    // Its id token is held to the hashed nonce as a native id token is.
    let code = apple.issue_code(&ada(), APP, None, Some(raw));
    let err = provider
        .verify_native(&NativeCredential::AuthorizationCode {
            code,
            nonce: Some(raw.into()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "apple_nonce_not_hashed");
    assert_eq!(apple.client_secret_failures(), 0);
}

#[tokio::test]
async fn a_native_access_token_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let err = provider
        .verify_native(&NativeCredential::AccessToken("a-token".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "id_token_required");
    assert_eq!(apple.token_calls() + apple.key_calls(), 0);
}

#[tokio::test]
async fn a_notification_signed_by_apple_is_read() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    for aud in [WEB, APP] {
        let jwt = apple.notification(aud, consent_revoked());
        let notification = provider
            .verify_notification(&notification_body(&jwt))
            .await
            .unwrap();
        assert_eq!(notification.event.kind, AppleEventKind::ConsentRevoked);
        assert_eq!(notification.event.sub, ada().sub);
        assert_eq!(notification.event.event_time, 1_700_000_000_123);
        assert!(notification.idempotency_key().starts_with("apple:jti:"));
    }
}

#[tokio::test]
async fn a_notification_not_signed_by_apple_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let jwt = apple.sign_with_foreign_key(notification_claims(&apple, WEB));
    let err = provider
        .verify_notification(&notification_body(&jwt))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "apple_notification_bad_signature");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn a_notification_for_another_audience_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let jwt = apple.notification("com.someone.else", consent_revoked());
    let err = provider
        .verify_notification(&notification_body(&jwt))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "apple_notification_wrong_audience");
}

#[tokio::test]
async fn an_expired_notification_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let mut claims = notification_claims(&apple, WEB);
    claims["iat"] = json!(now() - 3600);
    claims["exp"] = json!(now() - 3600 + 300);
    let err = provider
        .verify_notification(&notification_body(&apple.sign(claims)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "apple_notification_expired");

    // Still within its `exp`, but issued longer ago than any notification's key is
    // remembered: a replay of it could not be told apart from a first delivery.
    let mut claims = notification_claims(&apple, WEB);
    claims["iat"] = json!(now() - 23 * 3600 - 5);
    claims["exp"] = json!(now() + 3600);
    let err = provider
        .verify_notification(&notification_body(&apple.sign(claims)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "apple_notification_expired");
    let mut claims = notification_claims(&apple, WEB);
    claims["iat"] = json!(now() - 23 * 3600 + 60);
    claims["exp"] = json!(now() + 3600);
    provider
        .verify_notification(&notification_body(&apple.sign(claims)))
        .await
        .expect("younger than NOTIFICATION_MAX_AGE");

    for claim in ["exp", "iat"] {
        let mut claims = notification_claims(&apple, WEB);
        claims.as_object_mut().unwrap().remove(claim);
        let err = provider
            .verify_notification(&notification_body(&apple.sign(claims)))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            "apple_notification_malformed",
            "without {claim}"
        );
    }
}

#[tokio::test]
async fn a_notification_issued_in_the_future_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let mut claims = notification_claims(&apple, WEB);
    claims["iat"] = json!(now() + 3600);
    claims["exp"] = json!(now() + 3600 + 300);
    let err = provider
        .verify_notification(&notification_body(&apple.sign(claims)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "apple_notification_not_yet_valid");
}

#[tokio::test]
async fn a_notification_of_another_issuer_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    let mut claims = notification_claims(&apple, WEB);
    claims["iss"] = json!("https://evil.example.test");
    let err = provider
        .verify_notification(&notification_body(&apple.sign(claims)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "apple_notification_wrong_issuer");
}

#[tokio::test]
async fn a_notification_body_that_is_not_a_jwt_is_refused() {
    let apple = stand_in().await;
    let provider = provider(&apple);
    for body in [
        b"{\"payload\":\"not-a-jwt\"}".to_vec(),
        b"{\"signed\":\"x\"}".to_vec(),
        b"payload=x".to_vec(),
    ] {
        let err = provider.verify_notification(&body).await.unwrap_err();
        assert_eq!(
            err.code(),
            "apple_notification_malformed",
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[tokio::test]
async fn the_provider_is_built_without_apple_and_fetches_keys_on_first_use() {
    // Built while nothing answers at Apple's addresses.
    let gone = stand_in().await;
    let endpoints = Endpoints::of(&gone);
    let token = gone.id_token(&ada(), APP, Some(&hashed("raw")));
    let notification = gone.notification(WEB, consent_revoked());
    gone.shutdown().await;
    let unreachable = provider_at(endpoints);
    let err = unreachable
        .verify_native(&id_token_credential(token, "raw"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "provider_keys_unavailable");
    assert!(err.is_retryable());
    let err = unreachable
        .verify_notification(&notification_body(&notification))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "apple_keys_unavailable");
    assert!(err.is_retryable());

    // Against a running Apple: no call until a token is checked, then one key fetch
    // serves id tokens and notifications alike.
    let apple = stand_in().await;
    let provider = provider(&apple);
    assert_eq!(apple.key_calls(), 0);
    let token = apple.id_token(&ada(), APP, Some(&hashed("raw")));
    provider
        .verify_native(&id_token_credential(token, "raw"))
        .await
        .unwrap();
    assert_eq!(apple.key_calls(), 1);
    let notification = apple.notification(WEB, consent_revoked());
    provider
        .verify_notification(&notification_body(&notification))
        .await
        .unwrap();
    let code = apple.issue_code(&ada(), WEB, Some(CALLBACK), Some("web-nonce"));
    provider
        .exchange_code(&code, &request("web-nonce"), "v")
        .await
        .unwrap();
    assert_eq!(apple.key_calls(), 1);
    assert_eq!(provider.keys().fetches(), 1);
}

/// What `jose` (an independent JOSE library, run by Node) says of `secret` as a client
/// secret of `team`'s key `key_id` for `client_id`: `Ok(lifetime)` or the refusal.
/// `None` without Node or the packages (a failure with `UPCOACH_REQUIRE_NODE=1`).
fn jose_verdict(
    secret: &str,
    team: &str,
    key_id: &str,
    client_id: &str,
) -> Option<Result<u64, String>> {
    use std::io::Write;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/js/oidc");
    let required = std::env::var("UPCOACH_REQUIRE_NODE").is_ok_and(|v| v == "1");
    if !dir.join("node_modules/jose").exists() {
        assert!(
            !required,
            "UPCOACH_REQUIRE_NODE=1 but tests/js/oidc/node_modules is missing"
        );
        eprintln!("skipped: run `npm ci` in tests/js/oidc");
        return None;
    }
    let mut child = std::process::Command::new("node")
        .arg("apple-client-secret.mjs")
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node starts");
    let input = json!({
        "secret": secret,
        "publicKey": TEST_TEAM_PUBLIC_KEY,
        "teamId": team,
        "keyId": key_id,
        "clientId": client_id,
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let verdict: Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    Some(if verdict["ok"] == true {
        Ok(verdict["lifetime"].as_u64().unwrap())
    } else {
        Err(verdict["error"].as_str().unwrap_or_default().to_owned())
    })
}

/// The client secret we make passes Apple's rules as an independent library checks
/// them (not our signer, not our stand-in): ES256 under the team's key, `kid`, iss,
/// aud, sub, and a lifetime within six months, at the default and at the longest we
/// allow; and that check refuses a secret for another team, key or client.
#[test]
fn our_client_secret_passes_an_independent_check() {
    use upcoach_auth::apple::ClientSecretSigner;
    let config = AuthConfig::from_lookup(|name| match name {
        "APPLE_WEB_CLIENT_ID" => Some(WEB.into()),
        "APPLE_TEAM_ID" => Some(TEST_TEAM_ID.into()),
        "APPLE_KEY_ID" => Some(TEST_KEY_ID.into()),
        "APPLE_PRIVATE_KEY" => Some(TEST_TEAM_PRIVATE_KEY.into()),
        _ => None,
    })
    .unwrap();
    let signer = ClientSecretSigner::from_config(config.apple.as_ref().unwrap()).unwrap();
    let secret = signer.secret_for(WEB, SystemTime::now()).unwrap();
    let Some(verdict) = jose_verdict(&secret, TEST_TEAM_ID, TEST_KEY_ID, WEB) else {
        return;
    };
    assert_eq!(verdict, Ok(signer.lifetime().as_secs()));

    let longest = ClientSecretSigner::from_config(config.apple.as_ref().unwrap())
        .unwrap()
        .with_lifetime(std::time::Duration::from_secs(15_777_000))
        .unwrap();
    let secret_long = longest.secret_for(APP, SystemTime::now()).unwrap();
    assert_eq!(
        jose_verdict(&secret_long, TEST_TEAM_ID, TEST_KEY_ID, APP).unwrap(),
        Ok(15_777_000)
    );

    for (team, key_id, client) in [
        ("ZZZZZZZZZZ", TEST_KEY_ID, WEB),
        (TEST_TEAM_ID, "ZZ99YY88XX", WEB),
        (TEST_TEAM_ID, TEST_KEY_ID, APP),
    ] {
        let refused = jose_verdict(&secret, team, key_id, client).unwrap();
        assert!(refused.is_err(), "{team} {key_id} {client}: {refused:?}");
    }
}

/// Apple's id tokens as an independent implementation signs them: the npm
/// `oauth2-mock-server` (RS256, its own key set) configured as Apple (its JWKS as
/// `APPLE_KEYS_URL`, its issuer as `APPLE_ISSUER`) issues a native id token with Apple's
/// claims, booleans as the strings Apple sometimes sends and the hashed nonce. Our
/// provider accepts it and reads Apple's claims; the raw nonce in the token, another
/// nonce, or the web client's audience are refused.
#[tokio::test]
async fn apple_id_tokens_signed_by_an_independent_implementation_are_verified() {
    let Some(idp) = upcoach_testing::OidcProvider::start().await else {
        return;
    };
    let issuer = idp.issuer().to_owned();
    let provider = provider_at(Endpoints {
        auth: format!("{issuer}/authorize"),
        token: format!("{issuer}/token"),
        keys: format!("{issuer}/jwks"),
        issuer: issuer.clone(),
    });
    let person = |nonce: &str| {
        json!({
            "sub": "001234.independent.0007",
            "email": "k7q2@privaterelay.appleid.com",
            "email_verified": "true",
            "is_private_email": "true",
            "real_user_status": 1,
            "name": null,
            "nonce": nonce,
        })
    };
    let raw = "independent-raw-nonce-1";
    let token = idp.id_token(APP, &hashed(raw), &person(&hashed(raw))).await;
    let signed_in = provider
        .verify_id_token(&token, AppleClient::Native, raw)
        .await
        .unwrap();
    assert_eq!(signed_in.identity.provider, ProviderId::APPLE);
    assert_eq!(signed_in.identity.subject, "001234.independent.0007");
    assert!(signed_in.identity.email_verified, "\"true\" as a string");
    assert!(signed_in.claims.is_private_email);
    assert_eq!(signed_in.claims.real_user_status.map(|s| s.code()), Some(1));

    // The raw nonce where Apple puts its hash; another nonce's hash.
    let raw_in_token = idp.id_token(APP, raw, &person(raw)).await;
    let refused = provider
        .verify_native(&id_token_credential(raw_in_token, raw))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "apple_nonce_not_hashed");
    let other = idp
        .id_token(APP, &hashed("another"), &person(&hashed("another")))
        .await;
    let refused = provider
        .verify_native(&id_token_credential(other, raw))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "apple_nonce_mismatch");
    // Issued to the web client: not a native token.
    let for_web = idp.id_token(WEB, &hashed(raw), &person(&hashed(raw))).await;
    let refused = provider
        .verify_native(&id_token_credential(for_web, raw))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "id_token_wrong_audience");
}
