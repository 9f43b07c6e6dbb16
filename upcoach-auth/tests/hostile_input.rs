//! Property tests of what sign-in reads from outside before anything is verified, or
//! from a provider once it is: Facebook's `signed_request`, Apple's server-to-server
//! notifications, an id token's header, a callback's form body (Apple's `form_post`) and
//! the Facebook callbacks' form. Each answers with a value or an error, never a panic;
//! where a well-formed input is generated, it reads back what went in.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use upcoach_auth::apple::{AppleError, AppleNotification, notification_payload};
use upcoach_auth::facebook::{FacebookError, SignedRequest, appsecret_proof};
use upcoach_auth::fuzzing;
use upcoach_auth::oidc::{IdTokenError, IdTokenRules};
use upcoach_auth::web::{CallbackParams, posted_name};
use upcoach_core::Secret;

const APP_SECRET: &str = "hostile-input-app-secret";

/// `<signature>.<payload>` as Facebook signs it: HMAC-SHA256 of the payload's base64url
/// text under the app secret (which `appsecret_proof` computes, as hex).
fn signed(payload_json: &[u8]) -> String {
    let payload = URL_SAFE_NO_PAD.encode(payload_json);
    let hex = appsecret_proof(&payload, &Secret::new(APP_SECRET));
    let signature: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    format!("{}.{payload}", URL_SAFE_NO_PAD.encode(signature))
}

fn google_rules() -> IdTokenRules {
    IdTokenRules::rs256(
        ["https://accounts.google.com"],
        ["web.apps.googleusercontent.com"],
    )
}

/// A JSON value of any shape, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::from)),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{0,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn event_kinds() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("email-disabled".to_owned()),
        Just("email-enabled".to_owned()),
        Just("consent-revoked".to_owned()),
        Just("account-delete".to_owned()),
        "[a-z-]{0,16}",
    ]
}

proptest! {
    // No regression files written into the tree: a failing input found here is kept as
    // an explicit test beside these.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Any text as the form field: refused or read, never a panic.
    #[test]
    fn any_signed_request_is_read_or_refused(text in any::<String>()) {
        let _ = SignedRequest::verify(&text, &Secret::new(APP_SECRET));
    }

    /// Any payload signed with the app secret passes the signature check: what refuses
    /// it is its JSON, never its form.
    #[test]
    fn a_signed_payload_is_never_refused_for_its_signature(payload in any_json()) {
        let signed = signed(payload.to_string().as_bytes());
        match SignedRequest::verify(&signed, &Secret::new(APP_SECRET)) {
            Err(FacebookError::SignedRequestBadSignature | FacebookError::SignedRequestMalformed) => {
                prop_assert!(false, "refused for its form: {}", signed);
            }
            Ok(request) => prop_assert!(!request.user_id.is_empty()),
            Err(_) => {}
        }
    }

    /// A well-formed payload reads back; changing one byte of the signature refuses it.
    #[test]
    fn a_well_formed_signed_request_reads_back(
        user_id in "[0-9]{1,20}",
        numeric in any::<bool>(),
        issued_at in proptest::option::of(any::<u64>()),
        flip in any::<prop::sample::Index>(),
    ) {
        let id = if numeric && user_id.len() < 19 {
            json!(user_id.parse::<u64>().unwrap())
        } else {
            json!(user_id)
        };
        let mut payload = json!({"algorithm": "HMAC-SHA256", "user_id": id});
        if let Some(at) = issued_at {
            payload["issued_at"] = json!(at);
        }
        let text = signed(payload.to_string().as_bytes());
        let read = SignedRequest::verify(&text, &Secret::new(APP_SECRET)).unwrap();
        prop_assert_eq!(read.user_id, id.as_str().map_or_else(|| id.to_string(), str::to_owned));
        prop_assert_eq!(read.issued_at, issued_at);
        let (signature, rest) = text.split_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(signature).unwrap();
        let i = flip.index(raw.len());
        raw[i] ^= 1;
        let forged = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(raw));
        prop_assert!(matches!(
            SignedRequest::verify(&forged, &Secret::new(APP_SECRET)),
            Err(FacebookError::SignedRequestBadSignature)
        ));
    }

    /// The body Apple posts: any bytes are a payload or a refusal; a payload is never
    /// empty.
    #[test]
    fn any_notification_body_is_a_payload_or_refused(
        body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            any_json().prop_map(|v| json!({"payload": v}).to_string().into_bytes()),
        ],
    ) {
        if let Ok(payload) = notification_payload(&body) {
            prop_assert!(!payload.is_empty());
        }
    }

    /// The claims of a notification JWT of any shape: a notification or a refusal.
    #[test]
    fn any_notification_claims_are_read_or_refused(claims in any_json(), events in any_json()) {
        let mut claims = match claims {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        let _ = AppleNotification::from_claims(&claims);
        // The events claim is a string holding JSON: any JSON there too.
        claims.insert("events".into(), Value::from(events.to_string()));
        let _ = AppleNotification::from_claims(&claims);
    }

    /// A well-formed event reads back, and its processing key depends on `jti` alone
    /// when there is one.
    #[test]
    fn a_well_formed_notification_reads_back(
        kind in event_kinds(),
        sub in any::<String>(),
        email in proptest::option::of(any::<String>()),
        private in prop_oneof![Just(json!(true)), Just(json!("false")), Just(json!("true")), Just(json!(1))],
        event_time in any::<u64>(),
        jti in proptest::option::of(any::<String>()),
    ) {
        let mut event = json!({"type": kind, "sub": sub, "event_time": event_time, "is_private_email": private});
        if let Some(email) = &email {
            event["email"] = json!(email);
        }
        let mut claims = Map::new();
        claims.insert("events".into(), Value::from(event.to_string()));
        if let Some(jti) = &jti {
            claims.insert("jti".into(), json!(jti));
        }
        let known = ["email-disabled", "email-enabled", "consent-revoked", "account-delete"];
        match AppleNotification::from_claims(&claims) {
            Ok(read) => {
                prop_assert!(known.contains(&kind.as_str()));
                prop_assert_eq!(read.event.kind.as_str(), kind.as_str());
                prop_assert_eq!(&read.event.sub, &sub);
                prop_assert_eq!(&read.event.email, &email);
                prop_assert_eq!(read.event.event_time, event_time);
                let key = read.idempotency_key();
                match &read.jti {
                    Some(jti) => prop_assert_eq!(key, format!("apple:jti:{jti}")),
                    None => prop_assert!(key.starts_with("apple:event:")),
                }
            }
            Err(AppleError::UnknownEvent { kind: reported }) => {
                prop_assert!(!known.contains(&kind.as_str()));
                prop_assert!(reported.len() <= kind.len());
            }
            Err(_) => {
                // Refused only for what the contract names: an empty sub, a jti that is
                // empty or too long, or an is_private_email of another type.
                let bad_jti = jti.as_ref().is_some_and(|j| j.is_empty() || j.len() > 256);
                prop_assert!(sub.is_empty() || bad_jti || private == json!(1), "{}", event);
            }
        }
    }

    /// Any text as an id token: its header is read or refused before any key is used.
    #[test]
    fn any_id_token_header_is_read_or_refused(text in any::<String>()) {
        let _ = fuzzing::id_token_header(&google_rules(), &text);
    }

    /// A header is accepted exactly when its `alg` is the pinned one and its `kid` a
    /// plain short identifier, whatever else it holds.
    #[test]
    fn an_id_token_header_is_accepted_exactly_when_pinned_and_plain(
        alg in prop_oneof![Just(json!("RS256")), Just(json!("none")), Just(json!("HS256")), Just(json!("ES256")), Just(json!("rs256")), Just(json!(256))],
        kid in proptest::option::of(prop_oneof![
            "[A-Za-z0-9._-]{0,130}".prop_map(Value::from),
            any::<String>().prop_map(Value::from),
            Just(json!(12)),
        ]),
        extra in proptest::collection::btree_map("(jku|x5u|jwk|typ|crit)", any_json(), 0..3),
        rest in "[A-Za-z0-9_-]{0,20}\\.[A-Za-z0-9_-]{0,20}",
    ) {
        let mut header: Map<String, Value> = extra.into_iter().collect();
        header.insert("alg".into(), alg.clone());
        if let Some(kid) = &kid {
            header.insert("kid".into(), kid.clone());
        }
        let token = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(Value::Object(header).to_string()));
        let plain = kid.as_ref().and_then(Value::as_str).filter(|k| {
            !k.is_empty() && k.len() <= 128 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
        match fuzzing::id_token_header(&google_rules(), &token) {
            Ok((_, read)) => {
                prop_assert_eq!(&alg, &json!("RS256"));
                prop_assert_eq!(Some(read.as_str()), plain);
            }
            Err(IdTokenError::AlgorithmNotAllowed) => prop_assert!(alg.is_string() && alg != json!("RS256")),
            Err(IdTokenError::InvalidKid) => prop_assert!(alg == json!("RS256") && plain.is_none()),
            Err(IdTokenError::Malformed) => prop_assert!(!alg.is_string()),
            Err(other) => prop_assert!(false, "{other}"),
        }
    }

    /// Any bytes as a callback's form body: the fields read, none longer than the
    /// U+FFFD each undecodable byte becomes.
    #[test]
    fn any_form_body_reads(body in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let params = CallbackParams::from_form(&body);
        for value in [&params.state, &params.code, &params.error, &params.iss, &params.user].into_iter().flatten() {
            prop_assert!(value.len() <= 3 * body.len());
        }
        if let Some(user) = &params.user {
            let _ = posted_name(user);
        }
        if let Ok(field) = fuzzing::signed_request_field(&body) {
            prop_assert!(field.len() <= 3 * body.len());
        }
    }

    /// A form as a browser encodes it reads back: the first of each field, whatever
    /// its text, and no field that was not sent.
    #[test]
    fn a_posted_form_reads_back(
        fields in proptest::collection::vec(
            (prop_oneof![Just("state"), Just("code"), Just("error"), Just("iss"), Just("user"), Just("other"), Just("signed_request")], any::<String>()),
            0..8,
        ),
    ) {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in &fields {
            form.append_pair(name, value);
        }
        let body = form.finish();
        let params = CallbackParams::from_form(body.as_bytes());
        let first = |name: &str| fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone());
        prop_assert_eq!(params.state, first("state"));
        prop_assert_eq!(params.code, first("code"));
        prop_assert_eq!(params.error, first("error"));
        prop_assert_eq!(params.iss, first("iss"));
        prop_assert_eq!(params.user, first("user"));
        let signed: Vec<&String> = fields.iter().filter(|(n, _)| *n == "signed_request").map(|(_, v)| v).collect();
        match fuzzing::signed_request_field(body.as_bytes()) {
            Ok(value) => prop_assert_eq!(vec![&value], signed),
            Err(code) => {
                prop_assert_eq!(code, "signed_request_malformed");
                prop_assert!(signed.len() != 1);
            }
        }
    }

    /// Apple's `user` of any shape: a display name within bounds, or none.
    #[test]
    fn any_posted_user_is_a_name_or_none(
        user in prop_oneof![
            any::<String>(),
            (proptest::option::of(any::<String>()), proptest::option::of(any::<String>()))
                .prop_map(|(first, last)| json!({"name": {"firstName": first, "lastName": last}}).to_string()),
        ],
    ) {
        if let Some(name) = posted_name(&user) {
            prop_assert!(!name.is_empty() && name.len() <= user.len());
            prop_assert!(!name.chars().any(char::is_control));
            prop_assert_eq!(name.trim(), name.as_str());
        }
    }
}
