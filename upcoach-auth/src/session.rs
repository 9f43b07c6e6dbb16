//! Our own access tokens: short-lived EdDSA JWTs, and their [`TokenVerifier`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use upcoach_core::{Clock, Principal, Role, SessionId, TokenError, TokenVerifier, UserId};

use crate::Error;

/// The default lifetime of an access token.
pub const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(15 * 60);
/// The `typ` header of our access tokens (RFC 9068), required on verification.
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";
/// The clock skew tolerated on `iat`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// How many verified access tokens [`AccessTokens`] remembers by default: see
/// [`AccessTokens::with_verified_cache`]. The bound counts tokens; with ours (some 450
/// bytes, with what each proved about 600) that is about 6 MB.
pub const DEFAULT_VERIFIED_CACHE: usize = 10_000;

/// An Ed25519 key that signs access tokens, with its key id.
pub struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    public_x: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &"EdDSA")
            .finish_non_exhaustive()
    }
}

/// PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410): this prefix, then the 32 bytes.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

impl SigningKey {
    /// A new key from the operating system's randomness.
    pub fn generate() -> Result<Self, Error> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| Error::Crypto(Box::new(e)))?;
        Ok(Self::from_seed(&seed))
    }

    /// The key whose 32-byte Ed25519 seed is `seed`.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let public = ed25519_dalek::SigningKey::from_bytes(seed)
            .verifying_key()
            .to_bytes();
        let mut der = Vec::with_capacity(48);
        der.extend_from_slice(&PKCS8_ED25519_PREFIX);
        der.extend_from_slice(seed);
        // The key id names the public key, so it is stable for a configured key.
        let kid = URL_SAFE_NO_PAD.encode(&public[..12]);
        Self {
            kid,
            encoding: EncodingKey::from_ed_der(&der),
            decoding: DecodingKey::from_ed_der(&public),
            public_x: URL_SAFE_NO_PAD.encode(public),
        }
    }

    /// The key id written in each token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (RFC 8037), for `/.well-known/jwks.json`.
    pub fn public_jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.public_x,
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        })
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// The user id.
    pub sub: String,
    /// The session id.
    pub sid: String,
    /// The user's roles.
    pub roles: Vec<String>,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expires at (seconds since the epoch).
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
}

/// A freshly signed access token.
#[derive(Clone)]
pub struct IssuedAccessToken {
    /// The JWT.
    pub token: String,
    /// Its lifetime from now.
    pub expires_in: Duration,
    /// What it proves.
    pub principal: Principal,
}

impl fmt::Debug for IssuedAccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedAccessToken")
            .field("token", &"[redacted]")
            .field("expires_in", &self.expires_in)
            .field("principal", &self.principal)
            .finish()
    }
}

/// Issues and verifies our access tokens: EdDSA JWTs with `kid`, `iss`, `aud`, `sub`,
/// `sid`, `roles`, `iat`, `exp` and `jti`, every time decision taken from a [`Clock`].
///
/// Verification pins the algorithm (EdDSA, never read from the token), requires the
/// `typ` header `at+jwt`, accepts only the keys it holds (the current one and any
/// previous ones kept for rotation), checks issuer and audience, refuses an `iat` in the
/// future beyond the leeway and a token at or past its `exp`.
///
/// It does not look up whether the session (`sid`) was revoked: an access token stays
/// valid until its short expiry after a logout, which is why the default lifetime is 15
/// minutes.
///
/// **Tokens seen before.** A token that passed every check is remembered, keyed by
/// itself (compared in constant time), with what it proved, for at most
/// [`DEFAULT_VERIFIED_CACHE`] tokens (least recently useful ones go first;
/// [`with_verified_cache`](Self::with_verified_cache) sets the bound, 0 turns it off).
/// Presented again, it is answered from there without the signature check (tens of
/// microseconds of CPU), held to the same time rules: at or
/// past its `exp` it is `Expired` (and forgotten), and a clock stepped back before its
/// `iat` (beyond the leeway) refuses it as issued in the future. Only tokens that
/// verified are remembered: an unknown, altered or refused token always goes through
/// every check. Changing the issuer, audience or keys forgets them all.
///
/// ```
/// use std::sync::Arc;
/// use upcoach_auth::session::{AccessTokens, SigningKey};
/// use upcoach_core::{Role, SessionId, SystemClock, TokenVerifier, UserId};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let tokens = AccessTokens::new(SigningKey::generate()?, Arc::new(SystemClock));
/// let issued = tokens.issue(UserId::new(), vec![Role::ADMIN], SessionId::new())?;
/// let principal = tokens.verify(&issued.token).await.unwrap();
/// assert!(principal.is_admin());
/// assert_eq!(tokens.verify("not.a.jwt").await.unwrap_err().code(), "token_malformed");
/// # Ok::<(), upcoach_auth::Error>(())
/// # }).unwrap();
/// ```
pub struct AccessTokens {
    current: SigningKey,
    previous: Vec<SigningKey>,
    issuer: String,
    audience: String,
    ttl: Duration,
    leeway: Duration,
    clock: Arc<dyn Clock>,
    validation: Validation,
    /// What verified tokens proved, and their `iat`, by the token; `None` when turned
    /// off.
    verified: Option<quick_cache::sync::Cache<Seen, (Principal, u64)>>,
}

impl fmt::Debug for AccessTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessTokens")
            .field("current", &self.current)
            .field("previous", &self.previous)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .field(
                "verified_cache",
                &self.verified.as_ref().map(|c| c.capacity()),
            )
            .finish_non_exhaustive()
    }
}

impl AccessTokens {
    /// Tokens signed with `key`, issuer and audience `upcoach`, 15-minute lifetime.
    pub fn new(key: SigningKey, clock: Arc<dyn Clock>) -> Self {
        let mut tokens = Self {
            current: key,
            previous: Vec::new(),
            issuer: "upcoach".into(),
            audience: "upcoach".into(),
            ttl: DEFAULT_ACCESS_TTL,
            leeway: DEFAULT_LEEWAY,
            clock,
            validation: Validation::new(Algorithm::EdDSA),
            verified: None,
        };
        tokens.rebuild_validation();
        tokens.with_verified_cache(DEFAULT_VERIFIED_CACHE)
    }

    /// Remembers up to `capacity` verified tokens (see the type's docs); 0 turns the
    /// memory off, so every token is checked in full every time.
    pub fn with_verified_cache(mut self, capacity: usize) -> Self {
        self.verified = (capacity > 0).then(|| quick_cache::sync::Cache::new(capacity));
        self
    }

    /// How many verified tokens are remembered now.
    pub fn verified_cached(&self) -> usize {
        self.verified.as_ref().map_or(0, |c| c.len())
    }

    /// Sets the `iss` written and required.
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = issuer.into();
        self.rebuild_validation();
        self
    }

    /// Sets the `aud` written and required.
    pub fn with_audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = audience.into();
        self.rebuild_validation();
        self
    }

    /// Sets the lifetime of new tokens (at least one second).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// Keeps accepting tokens signed by `key` (a key rotated out).
    pub fn with_previous_key(mut self, key: SigningKey) -> Self {
        self.previous.push(key);
        self.forget_verified();
        self
    }

    /// Forgets every verified token: the rules they passed have changed.
    fn forget_verified(&mut self) {
        if let Some(cache) = &self.verified {
            cache.clear();
        }
    }

    fn rebuild_validation(&mut self) {
        self.forget_verified();
        let mut v = Validation::new(Algorithm::EdDSA);
        // Time is checked against our Clock below, not the system time.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.required_spec_claims.clear();
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        self.validation = v;
    }

    /// The lifetime of new tokens.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Signs a token for `user_id` with `roles` in `session_id`.
    pub fn issue(
        &self,
        user_id: UserId,
        roles: Vec<Role>,
        session_id: SessionId,
    ) -> Result<IssuedAccessToken, Error> {
        let now = self.clock.unix_seconds();
        let exp = now + self.ttl.as_secs();
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user_id.to_string(),
            sid: session_id.to_string(),
            roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
            iat: now,
            exp,
            jti: uuid::Uuid::now_v7().to_string(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(ACCESS_TOKEN_TYP.to_owned());
        header.kid = Some(self.current.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.current.encoding)
            .map_err(|e| Error::Crypto(Box::new(e)))?;
        Ok(IssuedAccessToken {
            token,
            expires_in: self.ttl,
            principal: Principal::new(
                user_id,
                roles,
                session_id,
                SystemTime::UNIX_EPOCH + Duration::from_secs(exp),
            ),
        })
    }

    /// The public keys (current first), as a JWK Set.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = std::iter::once(&self.current)
            .chain(&self.previous)
            .map(SigningKey::public_jwk)
            .collect();
        serde_json::json!({ "keys": keys })
    }

    fn key_for(&self, kid: &str) -> Option<&SigningKey> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.kid == kid)
    }
}

#[async_trait]
impl TokenVerifier for AccessTokens {
    /// An empty token (`Missing`) or one over 4,096 bytes (`Malformed`), or one verified
    /// before and remembered (see [`with_verified_cache`](Self::with_verified_cache)),
    /// checked against the clock now as the full path would check it.
    fn verify_known(&self, bearer: &str) -> Option<Result<Principal, TokenError>> {
        if bearer.is_empty() {
            return Some(Err(TokenError::Missing));
        }
        if bearer.len() > 4096 {
            return Some(Err(TokenError::Malformed));
        }
        let presented = Presented(bearer);
        let cache = self.verified.as_ref()?;
        let (principal, iat) = cache.get(&presented)?;
        // The same time checks as `verify`'s full path, against the clock now.
        if self.clock.now() >= principal.expires_at {
            cache.remove(&presented);
            return Some(Err(TokenError::Expired));
        }
        if iat > self.clock.unix_seconds() + self.leeway.as_secs() {
            return Some(Err(TokenError::Invalid {
                reason: "issued in the future",
            }));
        }
        Some(Ok(principal))
    }

    async fn verify(&self, bearer: &str) -> Result<Principal, TokenError> {
        if let Some(known) = self.verify_known(bearer) {
            return known;
        }
        let header = jsonwebtoken::decode_header(bearer).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid {
                reason: "unexpected algorithm",
            });
        }
        // Another kind of JWT signed by the same key is never an access token.
        if header.typ.as_deref() != Some(ACCESS_TOKEN_TYP) {
            return Err(TokenError::Invalid {
                reason: "not an access token",
            });
        }
        let kid = header.kid.ok_or(TokenError::Invalid {
            reason: "no key id",
        })?;
        let key = self.key_for(&kid).ok_or(TokenError::Invalid {
            reason: "unknown key id",
        })?;
        let data = jsonwebtoken::decode::<AccessClaims>(bearer, &key.decoding, &self.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::InvalidSignature => TokenError::Invalid {
                        reason: "bad signature",
                    },
                    K::InvalidIssuer => TokenError::Invalid {
                        reason: "wrong issuer",
                    },
                    K::InvalidAudience => TokenError::Invalid {
                        reason: "wrong audience",
                    },
                    K::InvalidAlgorithm => TokenError::Invalid {
                        reason: "unexpected algorithm",
                    },
                    _ => TokenError::Malformed,
                }
            })?;
        let claims = data.claims;
        let now = self.clock.unix_seconds();
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        if claims.iat > now + self.leeway.as_secs() {
            return Err(TokenError::Invalid {
                reason: "issued in the future",
            });
        }
        let user_id: UserId = claims.sub.parse().map_err(|_| TokenError::Malformed)?;
        let session_id: SessionId = claims.sid.parse().map_err(|_| TokenError::Malformed)?;
        let roles = claims
            .roles
            .iter()
            .map(|r| r.parse::<Role>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| TokenError::Malformed)?;
        let principal = Principal::new(
            user_id,
            roles,
            session_id,
            SystemTime::UNIX_EPOCH + Duration::from_secs(claims.exp),
        );
        if let Some(cache) = &self.verified {
            cache.insert(Seen(bearer.into()), (principal.clone(), claims.iat));
        }
        Ok(principal)
    }
}

/// A verified token as [`AccessTokens`] remembers it: the token itself, compared in
/// constant time.
///
/// Keyed by the token, not a digest of it: the cache's own hash finds the entry (about
/// 20 ns for a token, where its SHA-256 took 370), and the comparison that follows
/// decides, so two tokens that hash alike are still told apart, and how far a guess
/// matches a remembered token does not show in the time it takes.
///
/// A remembered token is a live bearer kept in memory until it is evicted or expires:
/// its bytes are wiped when it is dropped, so a later dump of freed memory does not
/// hold it.
#[derive(Clone)]
struct Seen(Box<str>);

impl Drop for Seen {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl PartialEq for Seen {
    fn eq(&self, other: &Self) -> bool {
        upcoach_core::secret::constant_time_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for Seen {}

impl std::hash::Hash for Seen {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Presented(&self.0).hash(state);
    }
}

/// A presented token, looked up among the [`Seen`] ones without a copy.
struct Presented<'a>(&'a str);

impl std::hash::Hash for Presented<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

impl quick_cache::Equivalent<Seen> for Presented<'_> {
    fn equivalent(&self, key: &Seen) -> bool {
        upcoach_core::secret::constant_time_eq(self.0.as_bytes(), key.0.as_bytes())
    }
}

#[cfg(test)]
mod tests;
