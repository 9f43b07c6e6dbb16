use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use upcoach_core::{ManualClock, Role, SessionId, TokenError, TokenVerifier, UserId};

use super::*;

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    ))
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn claims(tokens: &AccessTokens) -> serde_json::Value {
    let now = tokens.clock.unix_seconds();
    serde_json::json!({
        "iss": "upcoach", "aud": "upcoach", "sub": UserId::new().to_string(),
        "sid": SessionId::new().to_string(), "roles": ["admin"], "iat": now,
        "exp": now + 60, "jti": "j",
    })
}

fn signed(key: &SigningKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some(ACCESS_TOKEN_TYP.to_owned());
    header.kid = Some(key.kid().to_owned());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

async fn refused(tokens: &AccessTokens, token: &str) -> TokenError {
    tokens.verify(token).await.expect_err("must be refused")
}

#[tokio::test]
async fn issued_tokens_verify_until_they_expire() {
    let clock = clock();
    let tokens = AccessTokens::new(SigningKey::generate().unwrap(), clock.clone())
        .with_ttl(Duration::from_secs(900));
    let user = UserId::new();
    let session = SessionId::new();
    let issued = tokens.issue(user, vec![Role::COACH], session).unwrap();
    assert_eq!(issued.expires_in, Duration::from_secs(900));
    let p = tokens.verify(&issued.token).await.unwrap();
    assert_eq!(
        (p.user_id, p.session_id, p.roles.clone()),
        (user, session, vec![Role::COACH])
    );
    assert_eq!(p, issued.principal);

    clock.advance(Duration::from_secs(899));
    assert!(tokens.verify(&issued.token).await.is_ok());
    clock.advance(Duration::from_secs(1));
    assert!(matches!(
        refused(&tokens, &issued.token).await,
        TokenError::Expired
    ));
}

#[tokio::test]
async fn tokens_of_another_key_or_a_tampered_one_are_refused() {
    let tokens = AccessTokens::new(SigningKey::generate().unwrap(), clock());
    let other = AccessTokens::new(SigningKey::generate().unwrap(), tokens.clock.clone());
    let foreign = other
        .issue(UserId::new(), vec![], SessionId::new())
        .unwrap()
        .token;
    assert_eq!(refused(&tokens, &foreign).await.code(), "token_invalid");

    // Same kid, other key: the signature fails.
    let forged_key = SigningKey {
        kid: tokens.current.kid.clone(),
        ..SigningKey::generate().unwrap()
    };
    let forged = signed(&forged_key, &claims(&tokens));
    assert!(matches!(
        refused(&tokens, &forged).await,
        TokenError::Invalid {
            reason: "bad signature"
        }
    ));

    // Claims swapped under a valid signature.
    let good = tokens
        .issue(UserId::new(), vec![], SessionId::new())
        .unwrap()
        .token;
    let parts: Vec<&str> = good.split('.').collect();
    let mut c = claims(&tokens);
    c["roles"] = serde_json::json!(["admin"]);
    let tampered = format!("{}.{}.{}", parts[0], b64(&c), parts[2]);
    assert!(matches!(
        refused(&tokens, &tampered).await,
        TokenError::Invalid { .. }
    ));
}

#[tokio::test]
async fn algorithm_none_and_hs256_with_the_public_key_are_refused() {
    let tokens = AccessTokens::new(SigningKey::generate().unwrap(), clock());
    let kid = tokens.current.kid.clone();
    let none = format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg": "none", "typ": "JWT", "kid": kid})),
        b64(&claims(&tokens))
    );
    assert!(tokens.verify(&none).await.is_err());

    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid);
    let public = URL_SAFE_NO_PAD.decode(&tokens.current.public_x).unwrap();
    let hs = jsonwebtoken::encode(
        &header,
        &claims(&tokens),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    assert!(matches!(
        refused(&tokens, &hs).await,
        TokenError::Invalid {
            reason: "unexpected algorithm"
        }
    ));
}

#[tokio::test]
async fn issuer_audience_and_claim_types_are_checked() {
    let tokens = AccessTokens::new(SigningKey::generate().unwrap(), clock());
    let key = &tokens.current;
    let cases: Vec<(&str, serde_json::Value)> = vec![
        ("iss", serde_json::json!("someone-else")),
        ("aud", serde_json::json!("another-api")),
        ("exp", serde_json::json!("1900000000")),
        ("iat", serde_json::json!("1")),
        ("sub", serde_json::json!("42")),
        ("roles", serde_json::json!(["Admin!"])),
    ];
    for (field, value) in cases {
        let mut c = claims(&tokens);
        c[field] = value;
        assert!(
            tokens.verify(&signed(key, &c)).await.is_err(),
            "{field} must be checked"
        );
    }
    for field in ["exp", "iat", "sub", "sid", "iss", "aud"] {
        let mut c = claims(&tokens);
        c.as_object_mut().unwrap().remove(field);
        assert!(
            tokens.verify(&signed(key, &c)).await.is_err(),
            "{field} is required"
        );
    }
    let mut future = claims(&tokens);
    future["iat"] = serde_json::json!(tokens.clock.unix_seconds() + 3600);
    assert!(matches!(
        refused(&tokens, &signed(key, &future)).await,
        TokenError::Invalid {
            reason: "issued in the future"
        }
    ));
    assert!(matches!(refused(&tokens, "").await, TokenError::Missing));
    assert!(matches!(
        refused(&tokens, &"a".repeat(5000)).await,
        TokenError::Malformed
    ));
}

#[tokio::test]
async fn a_rotated_out_key_still_verifies_and_both_are_published() {
    let clock = clock();
    let old = SigningKey::from_seed(&[7; 32]);
    let old_tokens = AccessTokens::new(SigningKey::from_seed(&[7; 32]), clock.clone());
    let token = old_tokens
        .issue(UserId::new(), vec![], SessionId::new())
        .unwrap()
        .token;

    let rotated = AccessTokens::new(SigningKey::generate().unwrap(), clock).with_previous_key(old);
    assert!(rotated.verify(&token).await.is_ok());
    let jwks = rotated.jwks();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids.len(), 2);
    assert_eq!(kids[1], old_tokens.current.kid());
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    assert!(
        jwks["keys"][0].get("d").is_none(),
        "no private part is published"
    );
}

#[tokio::test]
async fn a_jwt_of_another_type_signed_by_the_same_key_is_refused() {
    let tokens = AccessTokens::new(SigningKey::generate().unwrap(), clock());
    for typ in [None, Some("JWT"), Some("login-code+jwt")] {
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = typ.map(str::to_owned);
        header.kid = Some(tokens.current.kid().to_owned());
        let token =
            jsonwebtoken::encode(&header, &claims(&tokens), &tokens.current.encoding).unwrap();
        assert!(
            matches!(
                refused(&tokens, &token).await,
                TokenError::Invalid {
                    reason: "not an access token"
                }
            ),
            "typ {typ:?}"
        );
    }
}

#[test]
fn debug_shows_no_key_material() {
    let key = SigningKey::from_seed(&[9; 32]);
    let debug = format!("{key:?}");
    assert!(
        debug.contains(key.kid()) && !debug.contains("encoding"),
        "{debug}"
    );
}

/// A token seen before is answered from memory only while the clock is before its
/// `exp`: at `exp` it is `Expired` exactly as a first presentation would be, and
/// forgotten; one second before, it still verifies (from memory).
#[tokio::test]
async fn a_remembered_token_is_never_served_past_its_exp() {
    let clock = clock();
    let tokens = AccessTokens::new(SigningKey::generate().unwrap(), clock.clone())
        .with_ttl(Duration::from_secs(60));
    let issued = tokens
        .issue(UserId::new(), vec![Role::ADMIN], SessionId::new())
        .unwrap();
    assert_eq!(tokens.verified_cached(), 0, "issuing is not verifying");
    assert_eq!(
        tokens.verify(&issued.token).await.unwrap(),
        issued.principal
    );
    assert_eq!(tokens.verified_cached(), 1);
    clock.advance(Duration::from_millis(59_999));
    assert_eq!(
        tokens.verify(&issued.token).await.unwrap(),
        issued.principal
    );
    clock.advance(Duration::from_millis(1));
    assert!(matches!(
        refused(&tokens, &issued.token).await,
        TokenError::Expired
    ));
    assert_eq!(tokens.verified_cached(), 0, "forgotten once expired");
    assert!(matches!(
        refused(&tokens, &issued.token).await,
        TokenError::Expired
    ));
}

/// `verify_known` answers only what `verify` would: nothing for a token it has not
/// verified, the principal once it has, `Expired` from its `exp` on, and nothing again
/// once forgotten (so `verify` checks it in full).
#[tokio::test]
async fn a_known_answer_is_the_one_verify_would_give() {
    let clock = clock();
    let tokens = AccessTokens::new(SigningKey::generate().unwrap(), clock.clone())
        .with_ttl(Duration::from_secs(60));
    let issued = tokens
        .issue(UserId::new(), vec![Role::COACH], SessionId::new())
        .unwrap();
    assert!(
        tokens.verify_known(&issued.token).is_none(),
        "never verified"
    );
    assert!(matches!(
        tokens.verify_known(""),
        Some(Err(TokenError::Missing))
    ));
    assert!(matches!(
        tokens.verify_known(&"x".repeat(4097)),
        Some(Err(TokenError::Malformed))
    ));
    tokens.verify(&issued.token).await.unwrap();
    assert_eq!(
        tokens.verify_known(&issued.token).unwrap().unwrap(),
        issued.principal
    );
    clock.advance(Duration::from_secs(60));
    assert!(matches!(
        tokens.verify_known(&issued.token),
        Some(Err(TokenError::Expired))
    ));
    assert!(
        tokens.verify_known(&issued.token).is_none(),
        "forgotten once expired"
    );

    let off = AccessTokens::new(SigningKey::generate().unwrap(), clock).with_verified_cache(0);
    let issued = off
        .issue(UserId::new(), vec![Role::USER], SessionId::new())
        .unwrap();
    off.verify(&issued.token).await.unwrap();
    assert!(
        off.verify_known(&issued.token).is_none(),
        "nothing remembered"
    );
}

/// Only tokens that verified are remembered: after a token is remembered, the same
/// token with one character of its signature changed, the same claims signed by
/// another key, and the claims with another role under the old signature are each
/// still refused, and nothing of them is remembered.
#[tokio::test]
async fn an_altered_or_unknown_token_is_never_served_from_memory() {
    let key = SigningKey::generate().unwrap();
    let tokens = AccessTokens::new(key, clock());
    let claims = claims(&tokens);
    let token = signed(&tokens.current, &claims);
    tokens.verify(&token).await.unwrap();
    assert_eq!(tokens.verified_cached(), 1);

    let mut flipped = token.clone().into_bytes();
    let last = flipped.len() - 2;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let foreign = signed(&SigningKey::generate().unwrap(), &claims);
    let mut promoted = claims.clone();
    promoted["roles"] = serde_json::json!(["admin", "coach"]);
    let [head, _, sig]: [&str; 3] = token.split('.').collect::<Vec<_>>().try_into().unwrap();
    let forged = format!("{head}.{}.{sig}", b64(&promoted));
    for bad in [flipped, foreign, forged] {
        assert!(tokens.verify(&bad).await.is_err(), "{bad}");
        assert!(tokens.verify(&bad).await.is_err(), "again: {bad}");
    }
    assert_eq!(tokens.verified_cached(), 1);
}

/// The memory holds at most its capacity, however many distinct tokens verify; turned
/// off, nothing is remembered and every token still verifies.
#[tokio::test]
async fn the_memory_of_verified_tokens_is_bounded() {
    let tokens = AccessTokens::new(SigningKey::generate().unwrap(), clock()).with_verified_cache(8);
    for _ in 0..200 {
        let issued = tokens
            .issue(UserId::new(), vec![Role::USER], SessionId::new())
            .unwrap();
        tokens.verify(&issued.token).await.unwrap();
        assert!(
            tokens.verified_cached() <= 8,
            "{}",
            tokens.verified_cached()
        );
    }
    let off = AccessTokens::new(SigningKey::generate().unwrap(), clock()).with_verified_cache(0);
    let issued = off
        .issue(UserId::new(), vec![Role::USER], SessionId::new())
        .unwrap();
    for _ in 0..3 {
        assert_eq!(off.verify(&issued.token).await.unwrap(), issued.principal);
    }
    assert_eq!(off.verified_cached(), 0);
}

/// A remembered token is held to the same time rules as a first presentation: after
/// the clock steps back past its `iat` (beyond the leeway), it is "issued in the
/// future" from memory exactly as it is without memory.
#[tokio::test]
async fn a_remembered_token_is_refused_when_the_clock_steps_back() {
    let clock = clock();
    let start = clock.now();
    let remembering = AccessTokens::new(SigningKey::from_seed(&[9; 32]), clock.clone());
    let checking =
        AccessTokens::new(SigningKey::from_seed(&[9; 32]), clock.clone()).with_verified_cache(0);
    let issued = remembering
        .issue(UserId::new(), vec![Role::USER], SessionId::new())
        .unwrap();
    remembering.verify(&issued.token).await.unwrap();
    clock.set(start - Duration::from_secs(300));
    for tokens in [&remembering, &checking] {
        assert!(matches!(
            refused(tokens, &issued.token).await,
            TokenError::Invalid {
                reason: "issued in the future"
            }
        ));
    }
    clock.set(start);
    assert_eq!(
        remembering.verify(&issued.token).await.unwrap(),
        issued.principal
    );
}

/// Changing the rules (issuer, audience, keys) forgets every remembered token, so a
/// token verified under the old rules is checked against the new ones.
#[tokio::test]
async fn changing_the_rules_forgets_remembered_tokens() {
    let tokens = AccessTokens::new(SigningKey::generate().unwrap(), clock());
    let issued = tokens
        .issue(UserId::new(), vec![Role::USER], SessionId::new())
        .unwrap();
    tokens.verify(&issued.token).await.unwrap();
    assert_eq!(tokens.verified_cached(), 1);
    let other_audience = tokens.with_audience("another-api");
    assert_eq!(other_audience.verified_cached(), 0);
    assert!(matches!(
        refused(&other_audience, &issued.token).await,
        TokenError::Invalid {
            reason: "wrong audience"
        }
    ));
    let other_issuer = other_audience
        .with_audience("upcoach")
        .with_issuer("someone");
    assert!(matches!(
        refused(&other_issuer, &issued.token).await,
        TokenError::Invalid {
            reason: "wrong issuer"
        }
    ));
    let rotated = other_issuer
        .with_issuer("upcoach")
        .with_previous_key(SigningKey::generate().unwrap());
    assert_eq!(rotated.verified_cached(), 0);
    rotated.verify(&issued.token).await.unwrap();
}

/// The memory finds a token by its hash but decides by the whole token: with a hasher
/// that gives every token the same hash, each is still told from the others.
#[test]
fn remembered_tokens_that_hash_alike_are_told_apart() {
    #[derive(Clone, Default)]
    struct OneHash;
    impl std::hash::BuildHasher for OneHash {
        type Hasher = OneHasher;
        fn build_hasher(&self) -> OneHasher {
            OneHasher
        }
    }
    struct OneHasher;
    impl std::hash::Hasher for OneHasher {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }
    let cache = quick_cache::sync::Cache::with(
        16,
        16,
        quick_cache::UnitWeighter,
        OneHash,
        quick_cache::sync::DefaultLifecycle::default(),
    );
    cache.insert(Seen("a.b.c".into()), 1);
    cache.insert(Seen("a.b.d".into()), 2);
    assert_eq!(cache.get(&Presented("a.b.c")), Some(1));
    assert_eq!(cache.get(&Presented("a.b.d")), Some(2));
    assert_eq!(cache.get(&Presented("a.b.e")), None);
    assert_eq!(cache.get(&Presented("a.b.")), None);
}
