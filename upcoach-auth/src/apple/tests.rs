use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::json;

// Test-only keys, generated for these tests with
// `openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt`
// (and `openssl ec -pubout`). They sign nothing anywhere else.
const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgvOihrxMylN9B1kAY
Yz5ECYJyAQoTw88fUH2C9mjeEE6hRANCAATV3W7/NTASlmK+W6KYEmPXkR6mE+Qp
jx0W6SsQvH9+NZ8g8fXZyJhUgP8J5xJ/DpHq1fSuxCzxTtN7PktB+fVV
-----END PRIVATE KEY-----
";
const TEST_PUBLIC_KEY_BASE64: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE1d1u/zUwEpZivluimBJj15EephPkKY8dFukrELx/fjWfIPH12ciYVID/CecSfw6R6tX0rsQs8U7Tez5LQfn1VQ==";
/// A P-384 key: PKCS#8 and EC, but not the curve ES256 needs.
const TEST_P384_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDDzZooqvkZp8qM6kWy1
5jLpR795dE8DbLcywsJn1g0pHH/69JBLcOPt1zBc8diOnTehZANiAARggPmZj87h
08gq/LybB3zyFFRXaJYeLyRPM9/IKfOT9mNUzP/CVVVTlTotqPG+Z1uGQk6aucTp
qgYsZBWbo1HcLv7m1F6gIR2/WNqbi0yZBF2uJarGkEyEfeHKbsOk8xQ=
-----END PRIVATE KEY-----
";
const TEAM_ID: &str = "TEAM123456";
const KEY_ID: &str = "KEY1234567";
const T0: u64 = 1_700_000_000;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn signer() -> ClientSecretSigner {
    ClientSecretSigner::new(TEAM_ID, KEY_ID, TEST_KEY).unwrap()
}

/// The header and claims of `jwt`, after checking its ES256 signature with the test
/// public key.
fn verified(jwt: &str) -> (Value, Value) {
    let spki = STANDARD.decode(TEST_PUBLIC_KEY_BASE64).unwrap();
    // The uncompressed point closes the SubjectPublicKeyInfo.
    let key = DecodingKey::from_ec_der(&spki[spki.len() - 65..]);
    let mut validation = Validation::new(Algorithm::ES256);
    // The test clock is not the system clock; every claim is compared below.
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .unwrap()
        .claims;
    let header = jwt.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    (header, claims)
}

fn claims_of(jwt: &str) -> Value {
    verified(jwt).1
}

#[test]
fn client_secret_header_and_claims_are_exact() {
    let jwt = signer().secret_for("com.example.web", at(T0)).unwrap();
    let (header, claims) = verified(&jwt);
    assert_eq!(header, json!({"alg": "ES256", "kid": KEY_ID}));
    assert_eq!(
        claims,
        json!({
            "iss": TEAM_ID,
            "iat": T0,
            "exp": T0 + 3600,
            "aud": "https://appleid.apple.com",
            "sub": "com.example.web",
        })
    );
}

#[test]
fn lifetime_is_bounded_by_apples_maximum_and_a_minimum() {
    let longest = signer().with_lifetime(MAX_CLIENT_SECRET_LIFETIME).unwrap();
    let jwt = longest.secret_for("com.example.web", at(T0)).unwrap();
    assert_eq!(claims_of(&jwt)["exp"], json!(T0 + 15_777_000));

    for too_long in [
        Duration::from_secs(15_777_001),
        Duration::new(15_777_000, 1),
        Duration::from_secs(365 * 24 * 3600),
    ] {
        let err = signer().with_lifetime(too_long).unwrap_err();
        assert_eq!(err.code(), "apple_client_secret_lifetime_too_long");
    }
    let err = signer().with_lifetime(Duration::ZERO).unwrap_err();
    assert_eq!(err.code(), "apple_client_secret_lifetime_too_short");
    assert!(signer().with_lifetime(MIN_CLIENT_SECRET_LIFETIME).is_ok());
}

#[test]
fn renewal_margin_is_a_tenth_of_the_lifetime_and_at_least_a_minute() {
    assert_eq!(signer().lifetime(), Duration::from_secs(3600));
    assert_eq!(signer().renewal_margin(), Duration::from_secs(360));
    let short = signer().with_lifetime(Duration::from_secs(300)).unwrap();
    assert_eq!(short.renewal_margin(), Duration::from_secs(60));
}

#[test]
fn cached_secret_is_reused_then_renewed_near_expiry() {
    let signer = signer();
    let first = signer.secret_for("com.example.web", at(T0)).unwrap();
    // 54 min in, exactly the 6 min margin is left: still handed out.
    for later in [T0, T0 + 60, T0 + 3600 - 360] {
        assert_eq!(
            signer.secret_for("com.example.web", at(later)).unwrap(),
            first
        );
    }
    // Less than the margin left: a new one, issued now.
    let renewed = signer
        .secret_for("com.example.web", at(T0 + 3600 - 359))
        .unwrap();
    assert_ne!(renewed, first);
    assert_eq!(claims_of(&renewed)["iat"], json!(T0 + 3600 - 359));
    assert_eq!(claims_of(&renewed)["exp"], json!(T0 + 2 * 3600 - 359));
    // And that one is cached in turn.
    assert_eq!(
        signer.secret_for("com.example.web", at(T0 + 3600)).unwrap(),
        renewed
    );
}

#[test]
fn a_clock_gone_back_gets_a_new_secret() {
    let signer = signer();
    let first = signer.secret_for("com.example.web", at(T0)).unwrap();
    let earlier = signer.secret_for("com.example.web", at(T0 - 1)).unwrap();
    assert_ne!(earlier, first);
    assert_eq!(claims_of(&earlier)["iat"], json!(T0 - 1));
}

#[test]
fn a_clock_before_1970_is_refused() {
    let err = signer()
        .secret_for("com.example.web", UNIX_EPOCH - Duration::from_secs(1))
        .unwrap_err();
    assert_eq!(err.code(), "apple_client_secret_signing_failed");
}

#[test]
fn client_ids_get_their_own_secrets() {
    let signer = signer();
    let web = signer.secret_for("com.example.web", at(T0)).unwrap();
    let app = signer.secret_for("com.example.app", at(T0)).unwrap();
    assert_ne!(web, app);
    assert_eq!(claims_of(&web)["sub"], json!("com.example.web"));
    assert_eq!(claims_of(&app)["sub"], json!("com.example.app"));
    assert_eq!(
        signer.secret_for("com.example.web", at(T0 + 1)).unwrap(),
        web
    );
    assert_eq!(
        signer.secret_for("com.example.app", at(T0 + 1)).unwrap(),
        app
    );
}

#[test]
fn the_cache_is_bounded_and_drops_the_soonest_expiring() {
    let signer = signer();
    let ids: Vec<String> = (0..MAX_CACHED_CLIENT_IDS)
        .map(|i| format!("com.example.app{i}"))
        .collect();
    let mut secrets = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        secrets.push(signer.secret_for(id, at(T0 + i as u64)).unwrap());
    }
    let newcomer = T0 + 100;
    signer.secret_for("com.example.new", at(newcomer)).unwrap();
    {
        let cache = signer.cache.lock().unwrap();
        assert_eq!(cache.len(), MAX_CACHED_CLIENT_IDS);
        assert!(!cache.contains_key(&ids[0]), "the oldest is dropped");
        assert!(cache.contains_key("com.example.new"));
    }
    // The others keep their secrets; the dropped one gets a new one.
    for (id, secret) in ids.iter().zip(&secrets).skip(1) {
        assert_eq!(&signer.secret_for(id, at(newcomer)).unwrap(), secret);
    }
    assert_ne!(
        signer.secret_for(&ids[0], at(newcomer)).unwrap(),
        secrets[0]
    );

    // Secrets due for renewal go first, all of them.
    let much_later = T0 + 10 * 3600;
    signer
        .secret_for("com.example.later", at(much_later))
        .unwrap();
    assert_eq!(signer.cache.lock().unwrap().len(), 1);
}

#[test]
fn a_bad_key_is_refused_at_construction() {
    let public_key =
        format!("-----BEGIN PUBLIC KEY-----\n{TEST_PUBLIC_KEY_BASE64}\n-----END PUBLIC KEY-----");
    let sec1_label = TEST_KEY.replace("PRIVATE KEY", "EC PRIVATE KEY");
    let not_base64 = "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----";
    let not_a_key = "-----BEGIN PRIVATE KEY-----\nAAAAAAAA\n-----END PRIVATE KEY-----";
    let truncated_key = TEST_KEY.replace(
        "jx0W6SsQvH9+NZ8g8fXZyJhUgP8J5xJ/DpHq1fSuxCzxTtN7PktB+fVV\n",
        "",
    );
    for pem in [
        "",
        "not a key",
        public_key.as_str(),
        sec1_label.as_str(),
        not_base64,
        not_a_key,
        truncated_key.as_str(),
        TEST_P384_KEY,
    ] {
        let err = ClientSecretSigner::new(TEAM_ID, KEY_ID, pem).unwrap_err();
        assert_eq!(err.code(), "apple_private_key_invalid", "{pem}");
        assert!(!err.to_string().contains("MIG"), "{err}");
    }
}

#[test]
fn a_key_with_crlf_and_surrounding_space_is_read() {
    let pem = format!("  \n{}\n", TEST_KEY.replace('\n', "\r\n"));
    let signer = ClientSecretSigner::new(TEAM_ID, KEY_ID, &pem).unwrap();
    let jwt = signer.secret_for("com.example.web", at(T0)).unwrap();
    assert_eq!(claims_of(&jwt)["iss"], json!(TEAM_ID));
}

#[test]
fn debug_never_prints_the_key_or_a_secret() {
    let signer = signer();
    let jwt = signer.secret_for("com.example.web", at(T0)).unwrap();
    let text = format!("{signer:?}");
    assert!(
        text.contains(KEY_ID) && text.contains("cached_client_ids: 1"),
        "{text}"
    );
    for line in TEST_KEY.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!text.contains(line), "{text}");
    }
    for part in jwt.split('.') {
        assert!(!text.contains(part), "{text}");
    }
}

fn apple_claims(extra: Value) -> Result<AppleClaims, AppleError> {
    let mut claims = json!({"iss": APPLE_ISSUER, "sub": "001234.abc.0042"});
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    AppleClaims::from_claims(claims.as_object().unwrap())
}

#[test]
fn bool_claims_accept_booleans_and_their_strings() {
    for (value, expected) in [
        (json!(true), true),
        (json!("true"), true),
        (json!(false), false),
        (json!("false"), false),
        (Value::Null, false),
    ] {
        let claims = apple_claims(json!({
            "email_verified": value,
            "is_private_email": value,
            "nonce_supported": value,
        }))
        .unwrap();
        assert_eq!(claims.email_verified, expected, "{value}");
        assert_eq!(claims.is_private_email, expected, "{value}");
        let supported = (!value.is_null()).then_some(expected);
        assert_eq!(claims.nonce_supported, supported, "{value}");
    }
}

#[test]
fn absent_claims_are_false_or_none() {
    let claims = apple_claims(json!({})).unwrap();
    assert_eq!(
        claims,
        AppleClaims {
            sub: "001234.abc.0042".into(),
            email: None,
            email_verified: false,
            is_private_email: false,
            real_user_status: None,
            nonce: None,
            nonce_supported: None,
        }
    );
}

#[test]
fn bool_claims_of_another_value_are_refused() {
    for name in ["email_verified", "is_private_email", "nonce_supported"] {
        for value in [
            json!("yes"),
            json!("no"),
            json!("1"),
            json!("TRUE"),
            json!(" true"),
            json!(""),
            json!(1),
            json!(0),
            json!([]),
            json!({}),
        ] {
            let err = apple_claims(json!({ name: value })).unwrap_err();
            assert_eq!(err.code(), "apple_claims_invalid", "{name}: {value}");
        }
    }
}

#[test]
fn real_user_status_is_0_1_or_2() {
    for (code, status) in [
        (0, RealUserStatus::Unsupported),
        (1, RealUserStatus::Unknown),
        (2, RealUserStatus::LikelyReal),
    ] {
        let claims = apple_claims(json!({"real_user_status": code})).unwrap();
        assert_eq!(claims.real_user_status, Some(status));
        assert_eq!(status.code(), code);
    }
    let claims = apple_claims(json!({"real_user_status": null})).unwrap();
    assert_eq!(claims.real_user_status, None);
    for bad in [json!(3), json!(-1), json!("2"), json!(2.0), json!(true)] {
        let err = apple_claims(json!({"real_user_status": bad})).unwrap_err();
        assert_eq!(err.code(), "apple_claims_invalid", "{bad}");
    }
}

#[test]
fn claims_need_a_non_empty_string_sub() {
    for claims in [json!({}), json!({"sub": ""}), json!({"sub": 42})] {
        let err = AppleClaims::from_claims(claims.as_object().unwrap()).unwrap_err();
        assert_eq!(err.code(), "apple_claims_invalid", "{claims}");
    }
    let claims = apple_claims(json!({"email": "a@example.com", "nonce": "n"})).unwrap();
    assert_eq!(claims.email.as_deref(), Some("a@example.com"));
    assert_eq!(claims.nonce.as_deref(), Some("n"));
    let err = apple_claims(json!({"email": 5})).unwrap_err();
    assert_eq!(err.code(), "apple_claims_invalid");
}

/// SHA-256("n-0S6_WzA2Mj"), lowercase hex (from `sha256sum`).
const NONCE_HASH: &str = "0823a09b54cb9381561068b00aaf4e539b3f54604631d3e6a820879b6b04cc19";
/// SHA-256 of [`NONCE_HASH`] as text.
const NONCE_HASH_HASH: &str = "8a1c6cc70cf039484c80a3143de2d47fc16f402e7b396e27692ec6fcdcca29df";

fn nonce_code(raw: &str, claim: &str) -> &'static str {
    check_native_nonce(raw, claim).map_or_else(|e| e.code(), |()| "ok")
}

#[test]
fn the_right_raw_nonce_is_accepted() {
    assert_eq!(nonce_code("n-0S6_WzA2Mj", NONCE_HASH), "ok");
}

#[test]
fn another_nonce_is_a_mismatch() {
    assert_eq!(
        nonce_code("n-0S6_WzA2Mk", NONCE_HASH),
        "apple_nonce_mismatch"
    );
    assert_eq!(
        nonce_code("n-0S6_WzA2Mj", NONCE_HASH_HASH),
        "apple_nonce_mismatch"
    );
    assert_eq!(nonce_code("n-0S6_WzA2Mj", ""), "apple_nonce_mismatch");
    let upper = NONCE_HASH.to_ascii_uppercase();
    assert_eq!(nonce_code("n-0S6_WzA2Mj", &upper), "apple_nonce_mismatch");
}

#[test]
fn the_same_value_both_ways_is_not_hashed() {
    // The app gave Apple the raw nonce (and us too).
    assert_eq!(
        nonce_code("n-0S6_WzA2Mj", "n-0S6_WzA2Mj"),
        "apple_nonce_not_hashed"
    );
    // The app gave Apple the hash and us the hash as well.
    assert_eq!(nonce_code(NONCE_HASH, NONCE_HASH), "apple_nonce_not_hashed");
}

#[test]
fn a_hex_nonce_hashed_once_more_is_a_valid_nonce() {
    // The app treats the hex hash as its nonce and gives Apple its hash: consistent.
    assert_eq!(nonce_code(NONCE_HASH, NONCE_HASH_HASH), "ok");
}

#[test]
fn empty_or_overlong_nonces_are_malformed() {
    assert_eq!(nonce_code("", NONCE_HASH), "apple_nonce_malformed");
    assert_eq!(nonce_code("", ""), "apple_nonce_malformed");
    let longest = "a".repeat(MAX_NATIVE_NONCE_LEN);
    let claim = lower_hex(&Sha256::digest(longest.as_bytes()));
    assert_eq!(nonce_code(&longest, &claim), "ok");
    let too_long = "a".repeat(MAX_NATIVE_NONCE_LEN + 1);
    let claim = lower_hex(&Sha256::digest(too_long.as_bytes()));
    assert_eq!(nonce_code(&too_long, &claim), "apple_nonce_malformed");
}

fn notification(events: Value) -> Result<AppleNotification, AppleError> {
    let claims = json!({
        "iss": APPLE_ISSUER,
        "aud": "com.example.web",
        "iat": T0,
        "exp": T0 + 300,
        "jti": "jti-1",
        "events": events,
    });
    AppleNotification::from_claims(claims.as_object().unwrap())
}

fn events(event: Value) -> Value {
    Value::String(event.to_string())
}

#[test]
fn each_event_kind_is_read() {
    let email_disabled = notification(events(json!({
        "type": "email-disabled",
        "sub": "001234.abc.0042",
        "email": "k2j4@privaterelay.appleid.com",
        "is_private_email": "true",
        "event_time": 1_700_000_000_123_u64,
    })))
    .unwrap();
    assert_eq!(
        email_disabled,
        AppleNotification {
            jti: Some("jti-1".into()),
            expires_at: Some(T0 + 300),
            event: AppleEvent {
                kind: AppleEventKind::EmailDisabled,
                sub: "001234.abc.0042".into(),
                email: Some("k2j4@privaterelay.appleid.com".into()),
                is_private_email: true,
                event_time: 1_700_000_000_123,
            },
        }
    );
    let email_enabled = notification(events(json!({
        "type": "email-enabled",
        "sub": "001234.abc.0042",
        "email": "k2j4@privaterelay.appleid.com",
        "is_private_email": false,
        "event_time": 1,
    })))
    .unwrap();
    assert_eq!(email_enabled.event.kind, AppleEventKind::EmailEnabled);
    assert!(!email_enabled.event.is_private_email);
    for (name, kind) in [
        ("consent-revoked", AppleEventKind::ConsentRevoked),
        ("account-delete", AppleEventKind::AccountDelete),
    ] {
        let n = notification(events(json!({
            "type": name,
            "sub": "001234.abc.0042",
            "event_time": 2,
        })))
        .unwrap();
        assert_eq!(n.event.kind, kind);
        assert_eq!(n.event.kind.as_str(), name);
        assert_eq!(n.event.email, None);
        assert!(!n.event.is_private_email);
        assert_eq!(n.event.event_time, 2);
    }
}

#[test]
fn an_unknown_event_kind_is_refused() {
    for kind in ["email-forwarded", "Account-Delete", ""] {
        let err = notification(events(json!({
            "type": kind,
            "sub": "001234.abc.0042",
            "event_time": 1,
        })))
        .unwrap_err();
        assert_eq!(err.code(), "apple_notification_unknown_event", "{kind}");
    }
    let long = "x".repeat(1000);
    let err = notification(events(json!({"type": long}))).unwrap_err();
    assert!(matches!(&err, AppleError::UnknownEvent { kind } if kind.len() == 64));
}

#[test]
fn events_must_be_a_string() {
    let object = json!({"type": "account-delete", "sub": "s", "event_time": 1});
    for value in [object, json!(1), json!(["account-delete"]), Value::Null] {
        let err = notification(value.clone()).unwrap_err();
        assert_eq!(err.code(), "apple_notification_malformed", "{value}");
    }
    let claims = json!({"iss": APPLE_ISSUER});
    let err = AppleNotification::from_claims(claims.as_object().unwrap()).unwrap_err();
    assert_eq!(err.code(), "apple_notification_malformed");
}

#[test]
fn malformed_events_are_refused() {
    for text in [
        "",
        "{",
        "not json",
        "[]",
        "\"account-delete\"",
        r#"{"sub": "s", "event_time": 1}"#,
        r#"{"type": 1, "sub": "s", "event_time": 1}"#,
        r#"{"type": "account-delete", "event_time": 1}"#,
        r#"{"type": "account-delete", "sub": "", "event_time": 1}"#,
        r#"{"type": "account-delete", "sub": 7, "event_time": 1}"#,
        r#"{"type": "account-delete", "sub": "s"}"#,
        r#"{"type": "account-delete", "sub": "s", "event_time": "1"}"#,
        r#"{"type": "account-delete", "sub": "s", "event_time": -1}"#,
        r#"{"type": "account-delete", "sub": "s", "event_time": 1.5}"#,
        r#"{"type": "email-disabled", "sub": "s", "event_time": 1, "is_private_email": "yes"}"#,
        r#"{"type": "email-disabled", "sub": "s", "event_time": 1, "email": 3}"#,
    ] {
        let err = notification(Value::String(text.into())).unwrap_err();
        assert_eq!(err.code(), "apple_notification_malformed", "{text}");
    }
}

#[test]
fn overlong_events_are_refused() {
    let padding = " ".repeat(MAX_EVENTS_LEN);
    let text = format!(r#"{{"type": "account-delete", "sub": "s", "event_time": 1}}{padding}"#);
    let err = notification(Value::String(text)).unwrap_err();
    assert_eq!(err.code(), "apple_notification_too_large");
    // At the limit it is read (trailing whitespace is valid JSON).
    let event = r#"{"type": "account-delete", "sub": "s", "event_time": 1}"#;
    let text = format!("{event}{}", " ".repeat(MAX_EVENTS_LEN - event.len()));
    assert!(notification(Value::String(text)).is_ok());
}

#[test]
fn a_bad_jti_is_refused() {
    for jti in [json!(""), json!(5), json!("j".repeat(MAX_JTI_LEN + 1))] {
        let claims = json!({
            "jti": jti,
            "events": r#"{"type": "account-delete", "sub": "s", "event_time": 1}"#,
        });
        let err = AppleNotification::from_claims(claims.as_object().unwrap()).unwrap_err();
        assert_eq!(err.code(), "apple_notification_malformed", "{jti}");
    }
}

#[test]
fn the_idempotency_key_is_the_jti_or_derived_from_the_event() {
    let with_jti = notification(events(json!({
        "type": "account-delete", "sub": "s", "event_time": 1,
    })))
    .unwrap();
    assert_eq!(with_jti.idempotency_key(), "apple:jti:jti-1");

    let derived = |kind: &str, sub: &str, time: u64| {
        let claims = json!({
            "events": events(json!({"type": kind, "sub": sub, "event_time": time})),
        });
        let n = AppleNotification::from_claims(claims.as_object().unwrap()).unwrap();
        assert_eq!(n.jti, None);
        n.idempotency_key()
    };
    let key = derived("account-delete", "s", 1);
    let mut expected = Sha256::new();
    expected.update(b"account-delete\n1\ns");
    assert_eq!(
        key,
        format!("apple:event:{}", lower_hex(&expected.finalize()))
    );
    assert_eq!(derived("account-delete", "s", 1), key);
    assert_ne!(derived("consent-revoked", "s", 1), key);
    assert_ne!(derived("account-delete", "t", 1), key);
    assert_ne!(derived("account-delete", "s", 2), key);
}

#[test]
fn no_input_makes_a_notification_panic() {
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let inputs = [
        Value::String(deep.clone()),
        Value::String("\u{0}\u{ffff}".into()),
        Value::String(r#"{"type": "account-delete", "sub": "s", "event_time": 1"#.into()),
        Value::String(format!(r#"{{"type": "{}"}}"#, "é".repeat(100))),
        Value::String(r#"{"type": "account-delete", "sub": "s", "event_time": 1e400}"#.into()),
        Value::String(
            r#"{"type": "account-delete", "sub": "s", "event_time": 18446744073709551616}"#.into(),
        ),
        json!({"nested": {"deeper": [1, 2, 3]}}),
        json!(f64::MAX),
    ];
    for input in inputs {
        assert!(notification(input).is_err());
    }
    for body in [
        deep.as_bytes(),
        b"",
        b"\xff\xfe",
        b"{\"payload\": 1}",
        b"null",
    ] {
        assert!(notification_payload(body).is_err());
    }
}

#[test]
fn the_payload_is_read_from_the_body() {
    let body = br#"{"payload": "eyJ.eyJ.sig"}"#;
    assert_eq!(notification_payload(body).unwrap(), "eyJ.eyJ.sig");
    for bad in [
        &br#"{"payload": ""}"#[..],
        br#"{"payload": 7}"#,
        br#"{}"#,
        br#"payload=eyJ"#,
    ] {
        let err = notification_payload(bad).unwrap_err();
        assert_eq!(err.code(), "apple_notification_malformed");
    }
    let huge = format!(
        r#"{{"payload": "{}"}}"#,
        "a".repeat(MAX_NOTIFICATION_BODY_LEN)
    );
    let err = notification_payload(huge.as_bytes()).unwrap_err();
    assert_eq!(err.code(), "apple_notification_too_large");
}
