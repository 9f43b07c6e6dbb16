//! The Sign in with Apple stand-in, spoken to over HTTP/1.1 (`upcoach_testing::client`):
//! `/auth/keys`, the code and refresh grants of `/auth/token` with ES256 client secrets
//! checked claim by claim, identity tokens, notifications, and odd input.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use upcoach_testing::apple::{
    APPLE_ISSUER, APPLE_KEY_ID, AppleStandIn, AppleUser, MAX_CLIENT_SECRET_LIFETIME, TEST_KEY_ID,
    TEST_TEAM_ID, TEST_TEAM_PRIVATE_KEY, TEST_TEAM_PUBLIC_KEY, test_client_secret,
};

const CLIENT_ID: &str = "com.example.web";
const OTHER_CLIENT_ID: &str = "com.example.ios";
const REDIRECT: &str = "https://app.example/auth/apple/callback";
const SUB: &str = "001234.5f8e1c2d3b4a4f6e9d7c8b9a0f1e2d3c.0042";

/// Another P-256 key (PKCS#8 PEM), not the team's. TEST-ONLY; made with
/// `openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt`.
const OTHER_EC_KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgQlSpyBFdE2ZgaNXs\n\
01vpz2hX41FyemLR8lOW4DHnuQChRANCAARYCsISxpC0hGYugB6o9GLI+LcPqWrx\n\
sa2jaWW7A2Y/ifnJ9vQQWP9r8QAFa1AUkO5cCN0EMt3NmOdi4Plo/meV\n\
-----END PRIVATE KEY-----";

/// One answer: status, `Content-Type`, body as JSON (`Value::Null` when not JSON).
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: Value,
}

/// `method target` at `base_url`, with `headers` as raw header lines
/// (`"Name: value\r\n"`...) and `body`.
async fn send(base_url: &str, method: &str, target: &str, headers: &str, body: &[u8]) -> Answer {
    let headers: Vec<(&str, &str)> = headers
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim(), value.trim()))
        .collect();
    let answer = upcoach_testing::client::send(
        method.parse().expect("a method"),
        &format!("{base_url}{target}"),
        &headers,
        body.to_vec(),
    )
    .await;
    Answer {
        status: answer.status,
        content_type: answer.content_type().to_owned(),
        body: answer.json(),
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        form.append_pair(name, value);
    }
    form.finish()
}

async fn post_form(apple: &AppleStandIn, body: &str) -> Answer {
    send(
        &apple.base_url(),
        "POST",
        "/auth/token",
        "Content-Type: application/x-www-form-urlencoded\r\n",
        body.as_bytes(),
    )
    .await
}

/// The code grant for `code`, by `client_id` with `secret`.
async fn exchange(apple: &AppleStandIn, client_id: &str, secret: &str, code: &str) -> Answer {
    let body = form(&[
        ("client_id", client_id),
        ("client_secret", secret),
        ("code", code),
        ("grant_type", "authorization_code"),
        ("redirect_uri", REDIRECT),
    ]);
    post_form(apple, &body).await
}

async fn refresh(apple: &AppleStandIn, client_id: &str, secret: &str, token: &str) -> Answer {
    let body = form(&[
        ("client_id", client_id),
        ("client_secret", secret),
        ("grant_type", "refresh_token"),
        ("refresh_token", token),
    ]);
    post_form(apple, &body).await
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn pkcs8_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    STANDARD.decode(body).unwrap()
}

/// `claims` signed ES256 with the PKCS#8 PEM `key`, header `kid`: made here with
/// jsonwebtoken, independently of the stand-in's own helpers.
fn es256(key: &str, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&pkcs8_der(key))).unwrap()
}

/// The claims of a correct client secret for `client_id`, issued a minute ago for an hour.
fn secret_claims(client_id: &str) -> Value {
    let iat = now() - 60;
    json!({
        "iss": TEST_TEAM_ID,
        "iat": iat,
        "exp": iat + 3600,
        "aud": "https://appleid.apple.com",
        "sub": client_id,
    })
}

fn good_secret(client_id: &str) -> String {
    es256(
        TEST_TEAM_PRIVATE_KEY,
        TEST_KEY_ID,
        &secret_claims(client_id),
    )
}

async fn start() -> AppleStandIn {
    AppleStandIn::start(TEST_TEAM_ID, TEST_KEY_ID, TEST_TEAM_PUBLIC_KEY).await
}

/// `/auth/keys`, fetched over HTTP and parsed as a JWK set.
async fn keys(apple: &AppleStandIn) -> JwkSet {
    let answer = send(&apple.base_url(), "GET", "/auth/keys", "", b"").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    serde_json::from_value(answer.body).expect("a JWK set")
}

/// `token` verified RS256 with the served keys for `aud` and `iss`: its header and claims.
async fn verify(
    apple: &AppleStandIn,
    token: &str,
    aud: &str,
) -> jsonwebtoken::errors::Result<(Header, Map<String, Value>)> {
    let header = jsonwebtoken::decode_header(token)?;
    let set = keys(apple).await;
    let jwk = set
        .find(header.kid.as_deref().expect("a kid"))
        .expect("the kid is served");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[aud]);
    validation.set_issuer(&[apple.issuer()]);
    // Notifications have no `sub`: identity tokens' is checked by the tests.
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let data = jsonwebtoken::decode::<Map<String, Value>>(
        token,
        &DecodingKey::from_jwk(jwk).unwrap(),
        &validation,
    )?;
    Ok((data.header, data.claims))
}

fn user() -> AppleUser {
    AppleUser::new(SUB, "ada@example.com")
}

#[tokio::test]
async fn urls_are_loopback_under_auth() {
    let apple = start().await;
    let base = apple.base_url();
    assert!(base.starts_with("http://127.0.0.1:") && !base.ends_with('/'));
    assert_eq!(apple.token_url(), format!("{base}/auth/token"));
    assert_eq!(apple.keys_url(), format!("{base}/auth/keys"));
    assert_eq!(apple.authorize_url(), format!("{base}/auth/authorize"));
    assert_eq!(apple.issuer(), "https://appleid.apple.com");
    assert_eq!(apple.issuer(), APPLE_ISSUER);
    assert_eq!((TEST_TEAM_ID.len(), TEST_KEY_ID.len()), (10, 10));
}

#[tokio::test]
async fn keys_are_served_and_an_id_token_verifies_with_them() {
    let apple = start().await;
    let answer = send(&apple.base_url(), "GET", "/auth/keys", "", b"").await;
    assert_eq!(answer.status, 200);
    assert!(answer.content_type.starts_with("application/json"));
    let keys = answer.body["keys"].as_array().expect("keys").clone();
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert_eq!(key["kty"], "RSA");
    assert_eq!(key["kid"], APPLE_KEY_ID);
    assert_eq!(key["use"], "sig");
    assert_eq!(key["alg"], "RS256");
    assert_eq!(key["e"], "AQAB");
    // A 2048-bit modulus: 256 bytes, 342 base64url characters.
    assert_eq!(key["n"].as_str().unwrap().len(), 342);
    assert_eq!(answer.body, apple.jwks());
    assert_eq!(apple.key_calls(), 1);

    let token = apple.id_token(&user(), CLIENT_ID, Some("n-0S6_WzA2Mj"));
    let (header, claims) = verify(&apple, &token, CLIENT_ID).await.expect("verifies");
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(header.kid.as_deref(), Some(APPLE_KEY_ID));
    assert_eq!(header.typ, None);
    assert_eq!(claims["iss"], "https://appleid.apple.com");
    assert_eq!(claims["aud"], CLIENT_ID);
    assert_eq!(claims["sub"], SUB);
    let iat = claims["iat"].as_u64().unwrap();
    assert!(iat.abs_diff(now()) <= 5);
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 600);
    assert_eq!(claims["auth_time"].as_u64().unwrap(), iat);
    assert_eq!(claims["email"], "ada@example.com");
    assert_eq!(claims["email_verified"], json!(true));
    assert_eq!(claims["is_private_email"], json!(false));
    assert_eq!(claims["real_user_status"], json!(2));
    assert_eq!(claims["nonce_supported"], json!(true));
    assert_eq!(claims["nonce"], "n-0S6_WzA2Mj");
    assert!(!claims.contains_key("at_hash"));
    assert_eq!(apple.key_calls(), 2);

    let without_nonce = apple.id_token(&user(), CLIENT_ID, None);
    let (_, claims) = verify(&apple, &without_nonce, CLIENT_ID).await.unwrap();
    assert!(!claims.contains_key("nonce"));
    // For another audience it does not verify.
    assert!(verify(&apple, &token, OTHER_CLIENT_ID).await.is_err());
}

#[tokio::test]
async fn claims_as_strings_gives_true_and_false_strings() {
    let apple = start().await;
    let user = AppleUser {
        is_private_email: true,
        email_verified: false,
        claims_as_strings: true,
        real_user_status: Some(0),
        ..AppleUser::new(SUB, "k2j4@privaterelay.appleid.com")
    };
    let token = apple.id_token(&user, CLIENT_ID, None);
    let (_, claims) = verify(&apple, &token, CLIENT_ID).await.unwrap();
    assert_eq!(claims["email_verified"], json!("false"));
    assert_eq!(claims["is_private_email"], json!("true"));
    assert_eq!(claims["real_user_status"], json!(0));
    assert!(claims["real_user_status"].is_u64());

    let quiet = AppleUser {
        email: None,
        real_user_status: None,
        ..AppleUser::new(SUB, "unused@example.com")
    };
    let (_, claims) = verify(&apple, &apple.id_token(&quiet, CLIENT_ID, None), CLIENT_ID)
        .await
        .unwrap();
    for absent in [
        "email",
        "email_verified",
        "is_private_email",
        "real_user_status",
    ] {
        assert!(!claims.contains_key(absent), "{absent} in {claims:?}");
    }
}

#[tokio::test]
async fn a_code_exchanges_once_with_a_correct_client_secret() {
    let apple = start().await;
    let code = apple.issue_code(&user(), CLIENT_ID, Some(REDIRECT), Some("nonce-1"));
    let answer = exchange(&apple, CLIENT_ID, &good_secret(CLIENT_ID), &code).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.content_type.starts_with("application/json"));
    let body = answer.body.as_object().unwrap();
    let mut fields: Vec<_> = body.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "access_token",
            "expires_in",
            "id_token",
            "refresh_token",
            "token_type"
        ]
    );
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], json!(3600));
    let access_token = body["access_token"].as_str().unwrap();
    let (_, claims) = verify(&apple, body["id_token"].as_str().unwrap(), CLIENT_ID)
        .await
        .unwrap();
    assert_eq!(claims["sub"], SUB);
    assert_eq!(claims["nonce"], "nonce-1");
    let digest = Sha256::digest(access_token.as_bytes());
    assert_eq!(claims["at_hash"], URL_SAFE_NO_PAD.encode(&digest[..16]));

    let again = exchange(&apple, CLIENT_ID, &good_secret(CLIENT_ID), &code).await;
    assert_eq!(again.status, 400);
    assert_eq!(again.body, json!({ "error": "invalid_grant" }));
    assert_eq!(apple.token_calls(), 2);
    assert_eq!(apple.client_secret_failures(), 0);

    // The refresh grant: a new access token and id token, no new refresh token.
    let refresh_token = body["refresh_token"].as_str().unwrap();
    let renewed = refresh(&apple, CLIENT_ID, &good_secret(CLIENT_ID), refresh_token).await;
    assert_eq!(renewed.status, 200, "{renewed:?}");
    assert_eq!(renewed.body["token_type"], "Bearer");
    assert!(renewed.body.get("refresh_token").is_none());
    assert_ne!(renewed.body["access_token"], body["access_token"]);
    let (_, claims) = verify(
        &apple,
        renewed.body["id_token"].as_str().unwrap(),
        CLIENT_ID,
    )
    .await
    .unwrap();
    assert_eq!(claims["sub"], SUB);
    assert!(!claims.contains_key("nonce"));
    // Refresh tokens stay valid; an unknown one or another client's is invalid_grant.
    let twice = refresh(&apple, CLIENT_ID, &good_secret(CLIENT_ID), refresh_token).await;
    assert_eq!(twice.status, 200);
    let unknown = refresh(&apple, CLIENT_ID, &good_secret(CLIENT_ID), "r-unknown").await;
    assert_eq!(unknown.body, json!({ "error": "invalid_grant" }));
    let other = refresh(
        &apple,
        OTHER_CLIENT_ID,
        &good_secret(OTHER_CLIENT_ID),
        refresh_token,
    )
    .await;
    assert_eq!(other.body, json!({ "error": "invalid_grant" }));
    assert_eq!(apple.client_secret_failures(), 0);
}

#[tokio::test]
async fn a_native_code_needs_no_redirect_uri() {
    let apple = start().await;
    let code = apple.issue_code(&user(), OTHER_CLIENT_ID, None, None);
    let body = form(&[
        ("client_id", OTHER_CLIENT_ID),
        ("client_secret", &test_client_secret(OTHER_CLIENT_ID)),
        ("code", &code),
        ("grant_type", "authorization_code"),
    ]);
    let answer = post_form(&apple, &body).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let (_, claims) = verify(
        &apple,
        answer.body["id_token"].as_str().unwrap(),
        OTHER_CLIENT_ID,
    )
    .await
    .unwrap();
    assert!(!claims.contains_key("nonce"));
}

#[tokio::test]
async fn bad_client_secrets_are_invalid_client_and_counted() {
    let apple = start().await;
    let code = apple.issue_code(&user(), CLIENT_ID, Some(REDIRECT), None);
    let with = |change: &dyn Fn(&mut Value)| {
        let mut claims = secret_claims(CLIENT_ID);
        change(&mut claims);
        es256(TEST_TEAM_PRIVATE_KEY, TEST_KEY_ID, &claims)
    };
    let iat = now() - 60;
    let mut bad = vec![
        ("wrong sub", with(&|c| c["sub"] = json!(OTHER_CLIENT_ID))),
        (
            "wrong aud",
            with(&|c| c["aud"] = json!("https://appleid.apple.com/")),
        ),
        ("aud as array", with(&|c| c["aud"] = json!([APPLE_ISSUER]))),
        ("wrong iss", with(&|c| c["iss"] = json!("OTHERTEAM1"))),
        (
            "no iat",
            with(&|c| drop(c.as_object_mut().unwrap().remove("iat"))),
        ),
        (
            "no exp",
            with(&|c| drop(c.as_object_mut().unwrap().remove("exp"))),
        ),
        (
            "no sub",
            with(&|c| drop(c.as_object_mut().unwrap().remove("sub"))),
        ),
        (
            "expired",
            with(&|c| {
                c["iat"] = json!(iat - 7200);
                c["exp"] = json!(iat - 10);
            }),
        ),
        (
            "lifetime over 6 months",
            // Both set here: `secret_claims` reads the clock again, and a second
            // ticking between the two readings would make the lifetime exactly 6 months.
            with(&|c| {
                c["iat"] = json!(iat);
                c["exp"] = json!(iat + MAX_CLIENT_SECRET_LIFETIME + 1);
            }),
        ),
        (
            "iat in the future",
            with(&|c| c["iat"] = json!(now() + 600)),
        ),
        (
            "exp as a string",
            with(&|c| c["exp"] = json!((iat + 3600).to_string())),
        ),
        (
            "wrong kid",
            es256(
                TEST_TEAM_PRIVATE_KEY,
                "OTHERKEY01",
                &secret_claims(CLIENT_ID),
            ),
        ),
        (
            "another EC key",
            es256(OTHER_EC_KEY, TEST_KEY_ID, &secret_claims(CLIENT_ID)),
        ),
        ("not a JWT", "not-a-jwt".to_owned()),
    ];
    // Algorithm confusion: HS256 keyed with the public key's PEM.
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some(TEST_KEY_ID.to_owned());
    bad.push((
        "HS256 with the public key",
        jsonwebtoken::encode(
            &hs,
            &secret_claims(CLIENT_ID),
            &EncodingKey::from_secret(TEST_TEAM_PUBLIC_KEY.as_bytes()),
        )
        .unwrap(),
    ));
    // A correct secret with its signature swapped for another one's.
    let good = good_secret(CLIENT_ID);
    let other = es256(OTHER_EC_KEY, TEST_KEY_ID, &secret_claims(CLIENT_ID));
    let (good_head, _) = good.rsplit_once('.').unwrap();
    let (_, other_signature) = other.rsplit_once('.').unwrap();
    bad.push((
        "spliced signature",
        format!("{good_head}.{other_signature}"),
    ));

    for (n, (why, secret)) in bad.iter().enumerate() {
        let answer = exchange(&apple, CLIENT_ID, secret, &code).await;
        assert_eq!(answer.status, 400, "{why}: {answer:?}");
        assert_eq!(answer.body, json!({ "error": "invalid_client" }), "{why}");
        assert_eq!(apple.client_secret_failures(), n + 1, "{why}");
    }
    // No client secret at all.
    let body = form(&[
        ("client_id", CLIENT_ID),
        ("code", &code),
        ("grant_type", "authorization_code"),
        ("redirect_uri", REDIRECT),
    ]);
    let answer = post_form(&apple, &body).await;
    assert_eq!(answer.body, json!({ "error": "invalid_client" }));
    assert_eq!(apple.client_secret_failures(), bad.len() + 1);

    // None of that consumed the code; a lifetime of exactly six months is accepted.
    let longest = with(&|c| {
        c["iat"] = json!(iat);
        c["exp"] = json!(iat + MAX_CLIENT_SECRET_LIFETIME);
    });
    let answer = exchange(&apple, CLIENT_ID, &longest, &code).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(apple.client_secret_failures(), bad.len() + 1);
}

#[tokio::test]
async fn the_helper_secret_is_accepted() {
    let apple = start().await;
    let code = apple.issue_code(&user(), CLIENT_ID, Some(REDIRECT), None);
    let answer = exchange(&apple, CLIENT_ID, &test_client_secret(CLIENT_ID), &code).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let header = jsonwebtoken::decode_header(test_client_secret(CLIENT_ID)).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.kid.as_deref(), Some(TEST_KEY_ID));
}

#[tokio::test]
async fn codes_are_bound_to_client_redirect_and_time() {
    let apple = start().await;
    let secret = good_secret(CLIENT_ID);
    let invalid_grant = json!({ "error": "invalid_grant" });

    let unknown = exchange(&apple, CLIENT_ID, &secret, "c-unknown").await;
    assert_eq!(unknown.body, invalid_grant);

    // Issued to another client id, presented with that client's own good secret.
    let code = apple.issue_code(&user(), CLIENT_ID, Some(REDIRECT), None);
    let answer = exchange(
        &apple,
        OTHER_CLIENT_ID,
        &good_secret(OTHER_CLIENT_ID),
        &code,
    )
    .await;
    assert_eq!(answer.body, invalid_grant);
    // ... which consumed it.
    let answer = exchange(&apple, CLIENT_ID, &secret, &code).await;
    assert_eq!(answer.body, invalid_grant);

    let code = apple.issue_code(&user(), CLIENT_ID, Some("https://app.example/other"), None);
    let answer = exchange(&apple, CLIENT_ID, &secret, &code).await;
    assert_eq!(answer.body, invalid_grant);

    let code = apple.issue_code(&user(), CLIENT_ID, Some(REDIRECT), None);
    let body = form(&[
        ("client_id", CLIENT_ID),
        ("client_secret", &secret),
        ("code", &code),
        ("grant_type", "authorization_code"),
    ]);
    let answer = post_form(&apple, &body).await;
    assert_eq!(
        answer.body, invalid_grant,
        "a web code without redirect_uri"
    );

    let code = apple.issue_code(&user(), CLIENT_ID, Some(REDIRECT), None);
    apple.expire_code(&code);
    let answer = exchange(&apple, CLIENT_ID, &secret, &code).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body, invalid_grant);
    assert_eq!(apple.client_secret_failures(), 0);
}

#[tokio::test]
async fn malformed_requests_are_answered_not_crashed() {
    let apple = start().await;
    let secret = good_secret(CLIENT_ID);
    let code = apple.issue_code(&user(), CLIENT_ID, Some(REDIRECT), None);
    let error = |answer: &Answer| answer.body["error"].as_str().unwrap_or("").to_owned();

    let no_grant_type = form(&[
        ("client_id", CLIENT_ID),
        ("client_secret", &secret),
        ("code", &code),
    ]);
    assert_eq!(
        error(&post_form(&apple, &no_grant_type).await),
        "invalid_request"
    );

    let password = form(&[
        ("client_id", CLIENT_ID),
        ("client_secret", &secret),
        ("grant_type", "password"),
    ]);
    let answer = post_form(&apple, &password).await;
    assert_eq!(answer.status, 400);
    assert_eq!(error(&answer), "unsupported_grant_type");

    let no_code = form(&[
        ("client_id", CLIENT_ID),
        ("client_secret", &secret),
        ("grant_type", "authorization_code"),
    ]);
    assert_eq!(error(&post_form(&apple, &no_code).await), "invalid_request");

    let no_client = form(&[
        ("client_secret", &secret),
        ("code", &code),
        ("grant_type", "authorization_code"),
    ]);
    assert_eq!(
        error(&post_form(&apple, &no_client).await),
        "invalid_request"
    );

    let repeated = format!(
        "{}&code=again",
        form(&[
            ("client_id", CLIENT_ID),
            ("client_secret", &secret),
            ("code", &code),
            ("grant_type", "authorization_code"),
        ])
    );
    assert_eq!(
        error(&post_form(&apple, &repeated).await),
        "invalid_request"
    );

    let json_body = send(
        &apple.base_url(),
        "POST",
        "/auth/token",
        "Content-Type: application/json\r\n",
        br#"{"client_id":"x"}"#,
    )
    .await;
    assert_eq!(json_body.status, 400);
    assert_eq!(error(&json_body), "invalid_request");

    let huge = format!("client_id={}", "x".repeat(64 * 1024));
    assert_eq!(error(&post_form(&apple, &huge).await), "invalid_request");

    let binary = send(
        &apple.base_url(),
        "POST",
        "/auth/token",
        "Content-Type: application/x-www-form-urlencoded; charset=UTF-8\r\n",
        &[0xff, 0xfe, b'=', 0x00, b'&', 0xc3],
    )
    .await;
    assert_eq!(binary.status, 400);
    assert_eq!(error(&binary), "invalid_request");

    let get_token = send(&apple.base_url(), "GET", "/auth/token", "", b"").await;
    assert_eq!(get_token.status, 405);
    let post_keys = send(&apple.base_url(), "POST", "/auth/keys", "", b"").await;
    assert_eq!(post_keys.status, 405);
    let authorize = send(&apple.base_url(), "GET", "/auth/authorize", "", b"").await;
    assert_eq!(authorize.status, 404);
    assert!(authorize.content_type.starts_with("application/json"));

    assert_eq!(apple.client_secret_failures(), 0);
    assert_eq!(apple.token_calls(), 9);
    assert_eq!(apple.key_calls(), 1);
    // The code was never presented by an authenticated client: it still works.
    let answer = exchange(&apple, CLIENT_ID, &secret, &code).await;
    assert_eq!(answer.status, 200, "{answer:?}");
}

#[tokio::test]
async fn a_notification_carries_its_events_as_a_string() {
    let apple = start().await;
    let event = json!({
        "type": "email-disabled",
        "sub": SUB,
        "email": "k2j4@privaterelay.appleid.com",
        "is_private_email": "true",
        "event_time": 1_700_000_000_123_u64,
    });
    let first = apple.notification(CLIENT_ID, event.clone());
    let (header, claims) = verify(&apple, &first, CLIENT_ID).await.unwrap();
    assert_eq!(header.kid.as_deref(), Some(APPLE_KEY_ID));
    assert_eq!(claims["iss"], "https://appleid.apple.com");
    let events = claims["events"].as_str().expect("events is a JSON string");
    assert_eq!(serde_json::from_str::<Value>(events).unwrap(), event);
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 300);
    let jti = claims["jti"].as_str().unwrap().to_owned();
    assert!(!jti.is_empty());

    let second = apple.notification(
        CLIENT_ID,
        json!({ "type": "consent-revoked", "sub": SUB, "event_time": 1_700_000_000_000_u64 }),
    );
    let (_, claims) = verify(&apple, &second, CLIENT_ID).await.unwrap();
    assert_ne!(claims["jti"], json!(jti));
    assert!(
        claims["events"]
            .as_str()
            .unwrap()
            .contains("consent-revoked")
    );
}

#[tokio::test]
async fn signed_claims_verify_and_foreign_ones_do_not() {
    let apple = start().await;
    let claims = json!({
        "iss": APPLE_ISSUER,
        "aud": CLIENT_ID,
        "sub": SUB,
        "iat": now(),
        "exp": now() + 600,
    });
    let (_, back) = verify(&apple, &apple.sign(claims.clone()), CLIENT_ID)
        .await
        .unwrap();
    assert_eq!(Value::Object(back), claims);

    let foreign = apple.sign_with_foreign_key(claims);
    assert_eq!(
        jsonwebtoken::decode_header(&foreign)
            .unwrap()
            .kid
            .as_deref(),
        Some(APPLE_KEY_ID)
    );
    let refused = verify(&apple, &foreign, CLIENT_ID).await.unwrap_err();
    assert_eq!(
        refused.kind(),
        &jsonwebtoken::errors::ErrorKind::InvalidSignature
    );
}

#[tokio::test]
async fn the_issuer_can_be_set() {
    let apple = AppleStandIn::start_with_issuer(
        TEST_TEAM_ID,
        TEST_KEY_ID,
        TEST_TEAM_PUBLIC_KEY,
        "https://issuer.example",
    )
    .await;
    assert_eq!(apple.issuer(), "https://issuer.example");
    let (_, claims) = verify(&apple, &apple.id_token(&user(), CLIENT_ID, None), CLIENT_ID)
        .await
        .unwrap();
    assert_eq!(claims["iss"], "https://issuer.example");
    let notification = apple.notification(CLIENT_ID, json!({ "type": "account-delete" }));
    let (_, claims) = verify(&apple, &notification, CLIENT_ID).await.unwrap();
    assert_eq!(claims["iss"], "https://issuer.example");
    // Client secrets still name Apple as their audience.
    let code = apple.issue_code(&user(), CLIENT_ID, Some(REDIRECT), None);
    let answer = exchange(&apple, CLIENT_ID, &good_secret(CLIENT_ID), &code).await;
    assert_eq!(answer.status, 200, "{answer:?}");
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let apple = start().await;
    let addr = apple.addr();
    apple.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
