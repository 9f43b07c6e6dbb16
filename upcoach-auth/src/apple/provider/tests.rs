use std::time::{Duration, SystemTime};

use serde_json::json;
use upcoach_core::{ManualClock, Secret};
use upcoach_testing::apple::{TEST_KEY_ID, TEST_TEAM_ID, TEST_TEAM_PRIVATE_KEY};

use super::*;
use crate::config::{APPLE_AUTH_URL, APPLE_ISSUER};

const WEB: &str = "com.example.web";
const APP: &str = "com.example.app";
const CALLBACK: &str = "https://api.example.test/auth/apple/callback";
const T0: u64 = 1_700_000_000;

fn config(web: Option<&str>, mobile: Option<&str>) -> AppleConfig {
    AppleConfig {
        web_client_id: web.map(str::to_owned),
        mobile_client_id: mobile.map(str::to_owned),
        team_id: TEST_TEAM_ID.into(),
        key_id: TEST_KEY_ID.into(),
        private_key: Secret::new(TEST_TEAM_PRIVATE_KEY),
        auth_url: APPLE_AUTH_URL.into(),
        // Nothing listens there: no test here may reach the network.
        token_url: "http://127.0.0.1:9/auth/token".into(),
        keys_url: "http://127.0.0.1:9/auth/keys".into(),
        issuer: APPLE_ISSUER.into(),
    }
}

fn provider(web: Option<&str>, mobile: Option<&str>) -> AppleProvider {
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0),
    ));
    AppleProvider::new(&config(web, mobile), CALLBACK, clock).unwrap()
}

fn request() -> AuthorizationRequest {
    AuthorizationRequest {
        state: "st+ate/=".into(),
        nonce: "no nce".into(),
        code_challenge: "challenge".into(),
        redirect_uri: CALLBACK.into(),
    }
}

fn code_of<T: std::fmt::Debug>(result: Result<T, Error>) -> &'static str {
    result.unwrap_err().code()
}

#[test]
fn a_key_that_is_not_p256_pkcs8_fails_at_construction() {
    let mut config = config(Some(WEB), None);
    config.private_key =
        Secret::new("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----");
    let err = AppleProvider::new(&config, CALLBACK, Arc::new(ManualClock::default())).unwrap_err();
    assert_eq!(err.code(), "internal_error");
    let source = std::error::Error::source(&err).unwrap();
    assert!(source.to_string().contains("P-256"), "{source}");
}

#[test]
fn a_config_without_client_ids_is_refused() {
    let err = AppleProvider::new(
        &config(None, None),
        CALLBACK,
        Arc::new(ManualClock::default()),
    )
    .unwrap_err();
    assert_eq!(err.code(), "provider_unavailable");
}

#[test]
fn debug_shows_no_key_material() {
    let text = format!("{:?}", provider(Some(WEB), Some(APP)));
    assert!(text.contains(WEB) && text.contains(APP), "{text}");
    assert!(
        !text.contains("PRIVATE") && !text.contains("MIGHAgEA"),
        "{text}"
    );
}

#[tokio::test]
async fn the_authorization_url_is_apples_form_post_flow_with_a_percent_encoded_scope() {
    let url = provider(Some(WEB), None)
        .authorization_url(&request())
        .await
        .unwrap();
    assert_eq!(
        url.as_str(),
        "https://appleid.apple.com/auth/authorize?response_type=code&response_mode=form_post\
         &client_id=com.example.web\
         &redirect_uri=https%3A%2F%2Fapi.example.test%2Fauth%2Fapple%2Fcallback\
         &state=st%2Bate%2F%3D&nonce=no%20nce&scope=name%20email"
    );
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    assert!(pairs.contains(&("state".into(), "st+ate/=".into())));
    assert!(pairs.contains(&("nonce".into(), "no nce".into())));
}

#[tokio::test]
async fn the_web_flow_needs_the_web_client_id_and_our_callback() {
    let native_only = provider(None, Some(APP));
    assert_eq!(
        code_of(native_only.authorization_url(&request()).await),
        "apple_web_not_configured"
    );
    assert_eq!(
        code_of(native_only.exchange_code("c", &request(), "v").await),
        "apple_web_not_configured"
    );
    let web = provider(Some(WEB), None);
    let mut elsewhere = request();
    elsewhere.redirect_uri = "https://evil.example.test/callback".into();
    assert_eq!(
        code_of(web.authorization_url(&elsewhere).await),
        "redirect_uri_mismatch"
    );
    assert_eq!(
        code_of(web.exchange_code("c", &elsewhere, "v").await),
        "redirect_uri_mismatch"
    );
}

#[tokio::test]
async fn native_credentials_are_refused_before_any_network_when_they_cannot_pass() {
    let web_only = provider(Some(WEB), None);
    let id_token = NativeCredential::IdToken {
        id_token: "a.b.c".into(),
        nonce: Some("raw".into()),
    };
    assert_eq!(
        code_of(web_only.verify_native(&id_token).await),
        "apple_native_not_configured"
    );
    let apple = provider(Some(WEB), Some(APP));
    let cases = [
        (
            NativeCredential::AccessToken("token".into()),
            "id_token_required",
        ),
        (
            NativeCredential::IdToken {
                id_token: "a.b.c".into(),
                nonce: None,
            },
            "nonce_required",
        ),
        (
            NativeCredential::AuthorizationCode {
                code: "c".into(),
                nonce: None,
            },
            "nonce_required",
        ),
        (
            NativeCredential::AuthorizationCode {
                code: "c".into(),
                nonce: Some(String::new()),
            },
            "apple_nonce_malformed",
        ),
        (
            NativeCredential::AuthorizationCode {
                code: "c".into(),
                nonce: Some("n".repeat(MAX_NATIVE_NONCE_LEN + 1)),
            },
            "apple_nonce_malformed",
        ),
        (
            NativeCredential::AuthorizationCode {
                code: "c".repeat(MAX_CODE_LEN + 1),
                nonce: Some("raw".into()),
            },
            "authorization_code_rejected",
        ),
        (
            NativeCredential::AuthorizationCode {
                code: String::new(),
                nonce: Some("raw".into()),
            },
            "authorization_code_rejected",
        ),
    ];
    for (credential, code) in cases {
        let err = apple.verify_native(&credential).await.unwrap_err();
        assert_eq!(err.code(), code, "{credential:?}");
        assert!(!err.is_retryable());
    }
    assert_eq!(apple.keys().fetches(), 0, "no key was fetched");
}

#[test]
fn token_endpoint_errors_are_classified() {
    use reqwest::StatusCode;
    let cases: [(StatusCode, &[u8], &str, bool); 8] = [
        (
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant"}"#,
            "authorization_code_rejected",
            false,
        ),
        (
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_request"}"#,
            "authorization_code_rejected",
            false,
        ),
        (
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_client"}"#,
            "provider_misconfigured",
            false,
        ),
        (
            StatusCode::UNAUTHORIZED,
            br#"{"error":"invalid_client"}"#,
            "provider_misconfigured",
            false,
        ),
        (
            StatusCode::BAD_REQUEST,
            br#"{"error":"unsupported_grant_type"}"#,
            "provider_unavailable",
            true,
        ),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"error":"invalid_grant"}"#,
            "provider_unavailable",
            true,
        ),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            b"<html>down</html>",
            "provider_unavailable",
            true,
        ),
        (StatusCode::BAD_REQUEST, b"", "provider_unavailable", true),
    ];
    for (status, body, code, retryable) in cases {
        let err = token_error(status, body, WEB);
        assert_eq!(
            err.code(),
            code,
            "{status} {}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(err.is_retryable(), retryable, "{status}");
    }
}

#[test]
fn a_token_endpoint_error_repeats_only_a_plain_oauth_code() {
    let err = token_error(
        reqwest::StatusCode::BAD_REQUEST,
        br#"{"error":"secret c0de eyJhbGciOi"}"#,
        WEB,
    );
    let text = std::error::Error::source(&err).unwrap().to_string();
    assert!(!text.contains("eyJ") && text.contains("400"), "{text}");
    let err = token_error(
        reqwest::StatusCode::BAD_REQUEST,
        br#"{"error":"invalid_scope"}"#,
        WEB,
    );
    let text = std::error::Error::source(&err).unwrap().to_string();
    assert!(text.contains("invalid_scope"), "{text}");
}

#[test]
fn query_values_encode_a_space_as_percent_20() {
    assert_eq!(query_value("name email"), "name%20email");
    assert_eq!(query_value("a+b c"), "a%2Bb%20c");
    assert_eq!(query_value("é&="), "%C3%A9%26%3D");
}

/// The verdict on notification claims `claims` at [`T0`] (leeway 60 s).
fn notification_verdict(claims: Value) -> &'static str {
    let apple = provider(Some(WEB), Some(APP));
    match apple.check_notification_claims(claims.as_object().unwrap()) {
        Ok(()) => "ok",
        Err(e) => e.code(),
    }
}

#[test]
fn notification_claims_are_held_to_issuer_audience_and_time() {
    let good = || {
        json!({
            "iss": APPLE_ISSUER,
            "aud": WEB,
            "iat": T0 - 10,
            "exp": T0 + 300,
        })
    };
    let with = |name: &str, value: Value| {
        let mut claims = good();
        claims[name] = value;
        claims
    };
    let without = |name: &str| {
        let mut claims = good();
        claims.as_object_mut().unwrap().remove(name);
        claims
    };
    let cases = [
        (good(), "ok"),
        (with("aud", json!(APP)), "ok"),
        (with("aud", json!(["someone.else", APP])), "ok"),
        (without("iat"), "apple_notification_malformed"),
        (with("iat", json!(T0 - 23 * 3600)), "ok"),
        (
            with("iat", json!(T0 - 23 * 3600 - 1)),
            "apple_notification_expired",
        ),
        (with("exp", json!(T0 - 60)), "ok"),
        (with("iat", json!(T0 + 60)), "ok"),
        (with("exp", json!(T0 - 61)), "apple_notification_expired"),
        (
            with("iat", json!(T0 + 61)),
            "apple_notification_not_yet_valid",
        ),
        (
            with("nbf", json!(T0 + 61)),
            "apple_notification_not_yet_valid",
        ),
        (
            with("iss", json!("https://evil.example.test")),
            "apple_notification_wrong_issuer",
        ),
        (
            with("aud", json!("someone.else")),
            "apple_notification_wrong_audience",
        ),
        (
            with("aud", json!(["someone.else"])),
            "apple_notification_wrong_audience",
        ),
        (with("aud", json!([])), "apple_notification_wrong_audience"),
        (with("aud", json!(7)), "apple_notification_malformed"),
        (without("aud"), "apple_notification_malformed"),
        (without("iss"), "apple_notification_malformed"),
        (with("iss", json!(1)), "apple_notification_malformed"),
        (without("exp"), "apple_notification_malformed"),
        (
            with("exp", json!(T0.to_string())),
            "apple_notification_malformed",
        ),
        (with("iat", json!("soon")), "apple_notification_malformed"),
    ];
    for (claims, verdict) in cases {
        assert_eq!(notification_verdict(claims.clone()), verdict, "{claims}");
    }
}
