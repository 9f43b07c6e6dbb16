use super::*;

const SECRET: &str = "app-secret";
/// Built by Python's `hmac` and `base64` (see the module example): the payload is
/// `{"algorithm":"HMAC-SHA256","issued_at":1700000000,"user_id":"1234567890"}`.
const PYTHON_SIGNED: &str = "FOVuXdhkoWD2wEeXojKHRiHPmWJd9Zy7K_pCnuKtwcY.\
    eyJhbGdvcml0aG0iOiJITUFDLVNIQTI1NiIsImlzc3VlZF9hdCI6MTcwMDAwMDAwMCwidXNlcl9pZCI6IjEyMzQ1Njc4OTAifQ";

fn secret() -> Secret {
    Secret::new(SECRET)
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `payload` signed with `key` the way Facebook does it.
fn sign(payload: &str, key: &str) -> String {
    let payload = b64(payload.as_bytes());
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).unwrap();
    mac.update(payload.as_bytes());
    format!("{}.{payload}", b64(&mac.finalize().into_bytes()))
}

fn refused(signed_request: &str) -> &'static str {
    let error = SignedRequest::verify(signed_request, &secret()).unwrap_err();
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(SECRET), "{shown}");
    error.code()
}

const PAYLOAD: &str = r#"{"algorithm":"HMAC-SHA256","issued_at":1291836800,"user_id":"218471","oauth_token":"EAAB-secret-token","expires":1291840400}"#;

#[test]
fn signed_request_round_trips() {
    let request = SignedRequest::verify(&sign(PAYLOAD, SECRET), &secret()).unwrap();
    assert_eq!(
        request,
        SignedRequest {
            user_id: "218471".into(),
            algorithm: "HMAC-SHA256".into(),
            issued_at: Some(1_291_836_800),
        }
    );
    // Other fields, the user's token among them, are not kept.
    assert!(!format!("{request:?}").contains("EAAB"));
}

#[test]
fn signed_request_from_python_verifies() {
    let request = SignedRequest::verify(PYTHON_SIGNED, &secret()).unwrap();
    assert_eq!(request.user_id, "1234567890");
    assert_eq!(request.issued_at, Some(1_700_000_000));
}

#[test]
fn signed_request_accepts_lower_case_algorithm_and_no_issued_at() {
    let request = SignedRequest::verify(
        &sign(r#"{"algorithm":"hmac-sha256","user_id":"7"}"#, SECRET),
        &secret(),
    )
    .unwrap();
    assert_eq!((request.user_id.as_str(), request.issued_at), ("7", None));
}

#[test]
fn tampered_payload_is_refused() {
    let signed = sign(PAYLOAD, SECRET);
    let (signature, _) = signed.split_once('.').unwrap();
    let other = b64(PAYLOAD.replace("218471", "218472").as_bytes());
    assert_eq!(
        refused(&format!("{signature}.{other}")),
        "signed_request_bad_signature"
    );
}

#[test]
fn tampered_signature_is_refused() {
    let signed = sign(PAYLOAD, SECRET);
    let (signature, payload) = signed.split_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
    bytes[0] ^= 1;
    assert_eq!(
        refused(&format!("{}.{payload}", b64(&bytes))),
        "signed_request_bad_signature"
    );
    // A signature of the wrong length.
    assert_eq!(
        refused(&format!("{}.{payload}", b64(&bytes[..31]))),
        "signed_request_bad_signature"
    );
}

#[test]
fn other_secret_is_refused() {
    assert_eq!(
        refused(&sign(PAYLOAD, "another-secret")),
        "signed_request_bad_signature"
    );
    assert_eq!(
        refused(&sign(PAYLOAD, "app-secre")),
        "signed_request_bad_signature"
    );
}

#[test]
fn other_algorithms_are_refused() {
    for algorithm in ["HMAC-SHA1", "none", "HS256", "HMAC-SHA256 ", ""] {
        let payload = format!(r#"{{"algorithm":"{algorithm}","user_id":"218471"}}"#);
        assert_eq!(
            refused(&sign(&payload, SECRET)),
            "signed_request_unsupported_algorithm",
            "{algorithm:?}"
        );
    }
    // Unsigned, as `alg: none` would be: refused before the payload is read.
    let unsigned = format!(
        "{}.{}",
        b64(b"x"),
        b64(br#"{"algorithm":"none","user_id":"1"}"#)
    );
    assert_eq!(refused(&unsigned), "signed_request_bad_signature");
}

#[test]
fn shapes_other_than_one_dot_are_refused() {
    let signed = sign(PAYLOAD, SECRET);
    let (signature, payload) = signed.split_once('.').unwrap();
    for input in [
        String::new(),
        ".".into(),
        signature.to_owned(),
        format!("{signature}{payload}"),
        format!("{signature}.{payload}.{payload}"),
        format!("{signature}.{payload}."),
        format!("{signature}.."),
        format!("{signature}."),
        format!(".{payload}"),
    ] {
        assert_eq!(refused(&input), "signed_request_malformed", "{input:?}");
    }
}

#[test]
fn bad_base64_is_refused() {
    let signed = sign(PAYLOAD, SECRET);
    let (signature, payload) = signed.split_once('.').unwrap();
    for input in [
        // Padding, on either part.
        format!("{signature}=.{payload}"),
        format!("{signature}.{payload}=="),
        // The standard alphabet's characters, and others.
        format!("{}.{payload}", signature.replace(&signature[..1], "+")),
        format!("{signature}.{}/", &payload[..payload.len() - 1]),
        format!("{signature}.{payload} "),
        format!("{signature}.é{payload}"),
        format!("{signature}.{}", payload.replace(&payload[2..3], "!")),
        // A length no base64 has (4n + 1).
        format!("{signature}.{}", &payload[..4 * 5 + 1]),
        format!("{}.{payload}", &signature[..41]),
    ] {
        assert_eq!(refused(&input), "signed_request_bad_encoding", "{input:?}");
    }
}

#[test]
fn bad_payloads_are_refused() {
    for payload in [
        "not json",
        "",
        "[]",
        r#""HMAC-SHA256""#,
        r#"{"user_id":"218471"}"#,
        r#"{"algorithm":1,"user_id":"218471"}"#,
        r#"{"algorithm":"HMAC-SHA256","user_id":"1","issued_at":"1291836800"}"#,
        r#"{"algorithm":"HMAC-SHA256","user_id":"1","issued_at":-1}"#,
        r#"{"algorithm":"HMAC-SHA256","user_id":1.5}"#,
        r#"{"algorithm":"HMAC-SHA256","user_id":"1","user_id":"2"}"#,
        r#"{"algorithm":"HMAC-SHA256","user_id":"1"} trailing"#,
    ] {
        if payload.is_empty() {
            // An empty payload is an empty part.
            assert_eq!(refused(&sign(payload, SECRET)), "signed_request_malformed");
            continue;
        }
        assert_eq!(
            refused(&sign(payload, SECRET)),
            "signed_request_bad_payload",
            "{payload}"
        );
    }
}

#[test]
fn missing_user_id_is_refused() {
    for payload in [
        r#"{"algorithm":"HMAC-SHA256","issued_at":1291836800}"#,
        r#"{"algorithm":"HMAC-SHA256","user_id":""}"#,
        r#"{"algorithm":"HMAC-SHA256","user_id":null}"#,
    ] {
        assert_eq!(
            refused(&sign(payload, SECRET)),
            "signed_request_missing_user_id",
            "{payload}"
        );
    }
}

#[test]
fn too_long_input_is_refused() {
    let padding = "x".repeat(MAX_SIGNED_REQUEST_LEN);
    let long = format!(r#"{{"algorithm":"HMAC-SHA256","user_id":"1","pad":"{padding}"}}"#);
    assert_eq!(refused(&sign(&long, SECRET)), "signed_request_too_long");
    assert_eq!(
        refused(&"a".repeat(MAX_SIGNED_REQUEST_LEN + 1)),
        "signed_request_too_long"
    );
    // Just under the cap is read as usual.
    let room = MAX_SIGNED_REQUEST_LEN
        - sign(
            r#"{"algorithm":"HMAC-SHA256","user_id":"1","pad":""}"#,
            SECRET,
        )
        .len();
    let fits = format!(
        r#"{{"algorithm":"HMAC-SHA256","user_id":"1","pad":"{}"}}"#,
        "x".repeat(room / 4 * 3)
    );
    let fits = sign(&fits, SECRET);
    assert!(fits.len() <= MAX_SIGNED_REQUEST_LEN);
    assert!(SignedRequest::verify(&fits, &secret()).is_ok());
}

#[test]
fn every_single_change_is_refused_without_panic() {
    let signed = sign(PAYLOAD, SECRET);
    for cut in 0..signed.len() {
        assert!(SignedRequest::verify(&signed[..cut], &secret()).is_err());
    }
    for at in 0..signed.len() {
        for replacement in [b'A', b'b', b'_', b'-', b'.', b'=', b'\0'] {
            let mut changed = signed.clone().into_bytes();
            if changed[at] == replacement {
                continue;
            }
            changed[at] = replacement;
            let changed = String::from_utf8(changed).unwrap();
            assert!(
                SignedRequest::verify(&changed, &secret()).is_err(),
                "{changed}"
            );
        }
    }
}

#[test]
fn appsecret_proof_matches_python() {
    // python3 -c "import hmac,hashlib;print(hmac.new(b'secret',b'token',hashlib.sha256).hexdigest())"
    assert_eq!(
        appsecret_proof("token", &Secret::new("secret")),
        "e941110e3d2bfe82621f0e3e1434730d7305d106c5f68c87165d0b27a4611a4a"
    );
    assert_ne!(
        appsecret_proof("token", &Secret::new("secret2")),
        appsecret_proof("token", &Secret::new("secret"))
    );
}

const APP_ID: &str = "4242";
const NOW: u64 = 1_700_000_000;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn debug_token(data: serde_json::Value) -> DebugToken {
    let body = serde_json::to_vec(&serde_json::json!({ "data": data })).unwrap();
    DebugToken::from_json(&body).unwrap()
}

fn user_token() -> serde_json::Value {
    serde_json::json!({
        "app_id": APP_ID,
        "type": "USER",
        "application": "upcoach",
        "data_access_expires_at": NOW + 90 * 86_400,
        "expires_at": NOW + 3600,
        "is_valid": true,
        "scopes": ["email", "public_profile"],
        "granular_scopes": [{"scope": "email"}],
        "user_id": "10215241773831025",
    })
}

fn with(field: &str, value: serde_json::Value) -> DebugToken {
    let mut data = user_token();
    data[field] = value;
    debug_token(data)
}

#[test]
fn debug_token_valid_is_accepted() {
    let token = debug_token(user_token());
    assert_eq!(token.token_type.as_deref(), Some("USER"));
    assert_eq!(token.application.as_deref(), Some("upcoach"));
    let verified = token.check(APP_ID, at(NOW)).unwrap();
    assert_eq!(
        verified,
        VerifiedUserToken {
            user_id: "10215241773831025".into(),
            expires_at: Some(at(NOW + 3600)),
            scopes: vec!["email".into(), "public_profile".into()],
        }
    );
}

#[test]
fn debug_token_not_valid_is_refused_with_graph_codes() {
    let token = debug_token(serde_json::json!({
        "app_id": APP_ID,
        "type": "USER",
        "is_valid": false,
        "expires_at": NOW - 10,
        "scopes": [],
        "user_id": "10215241773831025",
        "error": {
            "code": 190,
            "message": "Error validating access token: Malformed access token EAAB-secret",
            "subcode": 463,
        },
    }));
    let error = token.check(APP_ID, at(NOW)).unwrap_err();
    assert_eq!(error.code(), "facebook_token_invalid");
    assert!(matches!(
        error,
        FacebookError::TokenInvalid {
            graph_code: Some(190),
            graph_subcode: Some(463)
        }
    ));
    // Facebook's message, which can quote the token, is kept nowhere.
    assert!(!format!("{token:?} {error} {error:?}").contains("EAAB"));
    // A token Facebook cannot parse at all: no app, no user.
    let unparsable = debug_token(serde_json::json!({
        "error": {"code": 190, "message": "Invalid OAuth access token."},
        "is_valid": false,
        "scopes": [],
    }));
    assert_eq!(
        unparsable.check(APP_ID, at(NOW)).unwrap_err().code(),
        "facebook_token_invalid"
    );
}

#[test]
fn debug_token_of_another_app_is_refused() {
    for app_id in [
        serde_json::json!("4243"),
        serde_json::json!("42420"),
        serde_json::json!(" 4242"),
        serde_json::json!(""),
        serde_json::Value::Null,
    ] {
        assert_eq!(
            with("app_id", app_id.clone())
                .check(APP_ID, at(NOW))
                .unwrap_err()
                .code(),
            "facebook_token_foreign_app",
            "{app_id}"
        );
    }
    // An integer app id, as older answers sent, is still ours.
    assert!(
        with("app_id", serde_json::json!(4242))
            .check(APP_ID, at(NOW))
            .is_ok()
    );
}

#[test]
fn debug_token_without_user_is_refused() {
    for user_id in [serde_json::json!(""), serde_json::Value::Null] {
        assert_eq!(
            with("user_id", user_id)
                .check(APP_ID, at(NOW))
                .unwrap_err()
                .code(),
            "facebook_token_missing_user_id"
        );
    }
}

#[test]
fn debug_token_expired_is_refused() {
    let token = with("expires_at", serde_json::json!(NOW));
    assert_eq!(
        token.check(APP_ID, at(NOW)).unwrap_err().code(),
        "facebook_token_expired"
    );
    assert!(token.check(APP_ID, at(NOW - 1)).is_ok());
    let stale = with("expires_at", serde_json::json!(NOW - 3600));
    assert!(matches!(
        stale.check(APP_ID, at(NOW)),
        Err(FacebookError::TokenExpired)
    ));
}

#[test]
fn debug_token_expires_at_zero_never_expires() {
    for expires_at in [serde_json::json!(0), serde_json::Value::Null] {
        let token = with("expires_at", expires_at);
        let verified = token.check(APP_ID, at(u64::from(u32::MAX))).unwrap();
        assert_eq!(verified.expires_at, None);
        assert_eq!(token.expiry(), None);
    }
}

#[test]
fn debug_token_malformed_is_refused() {
    for body in [
        &b"not json"[..],
        b"",
        b"{}",
        br#"{"data": null}"#,
        br#"{"data": {"app_id": "4242", "user_id": "1"}}"#,
        br#"{"data": {"is_valid": "true"}}"#,
        br#"{"data": {"is_valid": true, "expires_at": "soon"}}"#,
        br#"{"data": {"is_valid": true, "expires_at": -5}}"#,
        br#"{"data": {"is_valid": true, "scopes": "email"}}"#,
        br#"{"data": {"is_valid": true, "user_id": 1.5}}"#,
        br#"{"error": {"message": "Invalid OAuth access token.", "code": 190}}"#,
    ] {
        let error = DebugToken::from_json(body).unwrap_err();
        assert_eq!(
            error.code(),
            "facebook_token_malformed",
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn profile_with_email_parses() {
    let profile = FacebookProfile::from_json(
        br#"{"id": "10215241773831025", "name": "Ada Lovelace", "email": "ada@example.com"}"#,
    )
    .unwrap();
    assert_eq!(
        profile,
        FacebookProfile {
            id: "10215241773831025".into(),
            name: Some("Ada Lovelace".into()),
            email: Some("ada@example.com".into()),
        }
    );
}

#[test]
fn profile_without_email_parses() {
    let profile = FacebookProfile::from_json(br#"{"id": "7", "name": "Ada"}"#).unwrap();
    assert_eq!((profile.id.as_str(), profile.email), ("7", None));
    let empty = FacebookProfile::from_json(br#"{"id": "7", "email": ""}"#).unwrap();
    assert_eq!((empty.name, empty.email), (None, None));
}

#[test]
fn profile_without_id_is_refused() {
    for body in [
        &br#"{"name": "Ada", "email": "ada@example.com"}"#[..],
        br#"{"id": "", "name": "Ada"}"#,
        br#"{"id": null}"#,
        br#"{"id": "7", "email": 5}"#,
        br#"{"error": {"message": "An active access token must be used", "code": 2500}}"#,
        b"<html>",
    ] {
        assert_eq!(
            FacebookProfile::from_json(body).unwrap_err().code(),
            "facebook_profile_malformed",
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn codes_are_stable_and_not_retryable() {
    let json_error = || serde_json::from_str::<u8>("x").unwrap_err();
    let errors = [
        FacebookError::SignedRequestTooLong,
        FacebookError::SignedRequestMalformed,
        FacebookError::SignedRequestBadEncoding(base64::DecodeError::InvalidPadding),
        FacebookError::SignedRequestBadSignature,
        FacebookError::SignedRequestBadPayload(json_error()),
        FacebookError::SignedRequestUnsupportedAlgorithm,
        FacebookError::SignedRequestMissingUserId,
        FacebookError::TokenMalformed(json_error()),
        FacebookError::TokenInvalid {
            graph_code: None,
            graph_subcode: None,
        },
        FacebookError::TokenForeignApp,
        FacebookError::TokenMissingUserId,
        FacebookError::TokenExpired,
        FacebookError::ProfileMalformed(json_error()),
    ];
    let codes: Vec<&str> = errors.iter().map(FacebookError::code).collect();
    let mut unique = codes.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), errors.len(), "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|code| code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    );
    assert!(errors.iter().all(|e| !e.is_retryable()));
}
