//! OpenID Connect id-token verification, held to RFC 8725 (JWT BCP) and OIDC Core §3.1.3.7.
//!
//! - Algorithms are pinned per provider and never read from the token: `alg: none`, an
//!   HMAC algorithm, or anything else outside the pinned list is refused before any key
//!   is touched, so a token "signed" with the provider's public key as an HMAC secret
//!   goes nowhere.
//! - Keys come only from the provider's JWKS URL; a token's `jku`, `x5u`, `x5c` and
//!   embedded `jwk` are ignored. A `kid` must be a short plain identifier.
//! - `iss` must be one of the provider's issuers; `aud` must name one of our client ids,
//!   and a token for several audiences needs an `azp` that is ours; `exp`, `nbf` and
//!   `iat` are checked against the [`Clock`] with a small leeway and must be numbers;
//!   `sub` is required; `nonce` must match when we sent one (compared in constant time).
//!
//! ```no_run
//! use std::sync::Arc;
//! use upcoach_auth::oidc::{IdTokenRules, IdTokenVerifier, JwksCache};
//! use upcoach_core::SystemClock;
//!
//! # async fn run(token: &str) -> Result<(), upcoach_auth::oidc::IdTokenError> {
//! let http = oauth2::reqwest::Client::new();
//! let keys = JwksCache::new("https://www.googleapis.com/oauth2/v3/certs", http);
//! let rules = IdTokenRules::rs256(
//!     ["https://accounts.google.com", "accounts.google.com"],
//!     ["1234-web.apps.googleusercontent.com"],
//! );
//! let verifier = IdTokenVerifier::new(rules, Arc::new(keys), Arc::new(SystemClock));
//! let claims = verifier.verify(token, Some("the nonce we sent")).await?;
//! println!("signed in: {}", claims.sub);
//! # Ok(()) }
//! ```

mod jwks;
mod provider;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;
use subtle::ConstantTimeEq;
use upcoach_core::Clock;

pub use jwks::JwksCache;
pub use provider::{
    DEFAULT_SCOPES, DISCOVERY_RETRY, Discovery, OpenIdConfig, OpenIdProvider, provider_http_client,
};

/// The default clock skew tolerated on `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
/// The longest id token accepted.
pub const MAX_ID_TOKEN_LEN: usize = 16 * 1024;

/// Why an id token was refused. Each has a stable [`code`](Self::code).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdTokenError {
    /// Not three base64url parts with JSON header and claims.
    #[error("the id token is malformed")]
    Malformed,
    /// The header's `alg` is not one this provider is pinned to.
    #[error("the id token's algorithm is not allowed")]
    AlgorithmNotAllowed,
    /// The `kid` is missing or not a plain identifier.
    #[error("the id token's key id is missing or invalid")]
    InvalidKid,
    /// No key of the provider has this `kid`, even after fetching the keys again.
    #[error("the id token's key id is not one of the provider's keys")]
    UnknownKid,
    /// The signature does not verify with the provider's key.
    #[error("the id token's signature is invalid")]
    BadSignature,
    /// `iss` is not the provider's.
    #[error("the id token was issued by someone else")]
    WrongIssuer,
    /// `aud` does not name us.
    #[error("the id token is not for this application")]
    WrongAudience,
    /// Several audiences and no `azp` of ours.
    #[error("the id token has several audiences and no trusted azp")]
    UntrustedAzp,
    /// `exp` is past (beyond the leeway).
    #[error("the id token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("the id token is not valid yet")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    #[error("the id token was issued in the future")]
    IssuedInFuture,
    /// A required claim is absent.
    #[error("the id token lacks the {0} claim")]
    MissingClaim(&'static str),
    /// A claim has the wrong JSON type (`exp` as a string, say).
    #[error("the id token's {0} claim has the wrong type")]
    InvalidClaim(&'static str),
    /// We sent a nonce and the token carries none.
    #[error("the id token carries no nonce")]
    NonceMissing,
    /// The nonce is not the one we sent.
    #[error("the id token's nonce does not match")]
    NonceMismatch,
    /// The provider's keys could not be fetched (and none were cached).
    #[error("the provider's keys are unavailable")]
    KeysUnavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl IdTokenError {
    /// A stable snake_case code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            IdTokenError::Malformed => "id_token_malformed",
            IdTokenError::AlgorithmNotAllowed => "id_token_alg_not_allowed",
            IdTokenError::InvalidKid => "id_token_invalid_kid",
            IdTokenError::UnknownKid => "id_token_unknown_kid",
            IdTokenError::BadSignature => "id_token_bad_signature",
            IdTokenError::WrongIssuer => "id_token_wrong_issuer",
            IdTokenError::WrongAudience => "id_token_wrong_audience",
            IdTokenError::UntrustedAzp => "id_token_untrusted_azp",
            IdTokenError::Expired => "id_token_expired",
            IdTokenError::NotYetValid => "id_token_not_yet_valid",
            IdTokenError::IssuedInFuture => "id_token_issued_in_future",
            IdTokenError::MissingClaim(_) => "id_token_missing_claim",
            IdTokenError::InvalidClaim(_) => "id_token_invalid_claim",
            IdTokenError::NonceMissing => "id_token_nonce_missing",
            IdTokenError::NonceMismatch => "id_token_nonce_mismatch",
            IdTokenError::KeysUnavailable(_) => "provider_keys_unavailable",
        }
    }

    /// Whether trying again later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, IdTokenError::KeysUnavailable(_))
    }
}

/// At most `max` bytes of `response`'s body, read a chunk at a time, so an answer
/// without a length stops at the cap too; more is an error naming `what`. Errors
/// carry no URL (a query may hold a token). Every provider answer is read this way.
pub(crate) async fn read_capped(
    response: &mut oauth2::reqwest::Response,
    max: usize,
    what: &str,
) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
    let too_large = || format!("{what} is too large").into();
    if response
        .content_length()
        .is_some_and(|len| len > max as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.without_url())? {
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What one provider's id tokens must satisfy.
#[derive(Debug, Clone)]
pub struct IdTokenRules {
    /// Accepted `iss` values (exact match).
    pub issuers: Vec<String>,
    /// Our client ids: `aud` must contain one; with several audiences `azp` must be one.
    pub audiences: Vec<String>,
    /// The algorithms this provider signs with.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

impl IdTokenRules {
    /// RS256 tokens (Google, Apple, Facebook Limited Login) from `issuers` for `audiences`.
    pub fn rs256<I, A>(issuers: I, audiences: A) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
        A: IntoIterator,
        A::Item: Into<String>,
    {
        Self {
            issuers: issuers.into_iter().map(Into::into).collect(),
            audiences: audiences.into_iter().map(Into::into).collect(),
            algorithms: vec![Algorithm::RS256],
            leeway: DEFAULT_LEEWAY,
        }
    }
}

/// The claims of a verified id token.
#[derive(Debug, Clone, PartialEq)]
pub struct IdTokenClaims {
    /// The issuer.
    pub iss: String,
    /// The provider's stable id for the user.
    pub sub: String,
    /// The audiences.
    pub aud: Vec<String>,
    /// The authorized party, if given.
    pub azp: Option<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issue time, seconds since the epoch.
    pub iat: u64,
    /// The nonce, if any.
    pub nonce: Option<String>,
    /// Every claim, as sent.
    pub all: serde_json::Map<String, Value>,
}

impl IdTokenClaims {
    /// A string claim.
    pub fn string(&self, name: &str) -> Option<&str> {
        self.all.get(name).and_then(Value::as_str)
    }

    /// `email_verified`, strictly: only the JSON boolean `true` counts (the string
    /// `"true"` some providers send does not, nor does `"false"`).
    pub fn email_verified(&self) -> bool {
        matches!(self.all.get("email_verified"), Some(Value::Bool(true)))
    }
}

/// Verifies one provider's id tokens.
#[derive(Debug, Clone)]
pub struct IdTokenVerifier {
    rules: Arc<IdTokenRules>,
    keys: Arc<JwksCache>,
    clock: Arc<dyn Clock>,
}

impl IdTokenVerifier {
    /// A verifier applying `rules` with the keys of `keys`, timed by `clock`.
    pub fn new(rules: IdTokenRules, keys: Arc<JwksCache>, clock: Arc<dyn Clock>) -> Self {
        Self {
            rules: Arc::new(rules),
            keys,
            clock,
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> &IdTokenRules {
        &self.rules
    }

    /// The provider's key cache.
    pub fn keys(&self) -> &Arc<JwksCache> {
        &self.keys
    }

    /// Until when this verifier accepts a token with these claims: the first instant at
    /// which it refuses it as expired, `exp` plus the leeway (plus the second that
    /// reading the clock in whole seconds adds). A caller that remembers a one-time
    /// nonce until then can never see the same token accepted after forgetting it.
    /// `None` only for an `exp` too far ahead for [`SystemTime`].
    pub fn accepted_until(&self, claims: &IdTokenClaims) -> Option<SystemTime> {
        let secs = claims
            .exp
            .checked_add(self.rules.leeway.as_secs())?
            .checked_add(1)?;
        UNIX_EPOCH.checked_add(Duration::from_secs(secs))
    }

    /// Verifies `token`; with `nonce`, the token must carry exactly that nonce.
    pub async fn verify(
        &self,
        token: &str,
        nonce: Option<&str>,
    ) -> Result<IdTokenClaims, IdTokenError> {
        let payload = self.verified_payload(token).await?;
        self.check_claims(payload, nonce)
    }

    /// The claims of `token` once its form and signature passed: at most
    /// [`MAX_ID_TOKEN_LEN`] bytes, a pinned algorithm, a plain `kid` of the provider's
    /// keys (fetched again once for an unknown one) and a signature that verifies. No
    /// claim is looked at: a caller checks every claim it relies on (as
    /// [`verify`](Self::verify) does for id tokens).
    pub(crate) async fn verified_payload(
        &self,
        token: &str,
    ) -> Result<serde_json::Map<String, Value>, IdTokenError> {
        if token.len() > MAX_ID_TOKEN_LEN {
            return Err(IdTokenError::Malformed);
        }
        let (alg, kid) = self.header(token)?;
        let key = self.keys.key(&kid).await?;
        if !key.algorithms.contains(&alg) {
            return Err(IdTokenError::AlgorithmNotAllowed);
        }
        let mut validation = Validation::new(alg);
        // Every claim is checked below, by our clock and with our error codes; the
        // library checks the signature only.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(
            token,
            &key.decoding,
            &validation,
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => IdTokenError::BadSignature,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => IdTokenError::AlgorithmNotAllowed,
            _ => IdTokenError::Malformed,
        })?;
        Ok(data.claims)
    }

    /// The pinned algorithm and the key id, read from the header without trusting it.
    fn header(&self, token: &str) -> Result<(Algorithm, String), IdTokenError> {
        token_header(&self.rules, token)
    }

    fn check_claims(
        &self,
        all: serde_json::Map<String, Value>,
        nonce: Option<&str>,
    ) -> Result<IdTokenClaims, IdTokenError> {
        let rules = &self.rules;
        let leeway = rules.leeway.as_secs();
        let now = self
            .clock
            .now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);

        let iss = string_claim(&all, "iss")?.ok_or(IdTokenError::MissingClaim("iss"))?;
        if !rules.issuers.iter().any(|i| i == iss) {
            return Err(IdTokenError::WrongIssuer);
        }
        let aud: Vec<String> = match all.get("aud") {
            None => return Err(IdTokenError::MissingClaim("aud")),
            Some(Value::String(one)) => vec![one.clone()],
            Some(Value::Array(many)) => many
                .iter()
                .map(|a| a.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(IdTokenError::InvalidClaim("aud"))?,
            Some(_) => return Err(IdTokenError::InvalidClaim("aud")),
        };
        if !aud.iter().any(|a| rules.audiences.contains(a)) {
            return Err(IdTokenError::WrongAudience);
        }
        let azp = string_claim(&all, "azp")?.map(str::to_owned);
        if aud.len() > 1
            && !azp
                .as_ref()
                .is_some_and(|azp| rules.audiences.contains(azp))
        {
            return Err(IdTokenError::UntrustedAzp);
        }
        let exp = number_claim(&all, "exp")?.ok_or(IdTokenError::MissingClaim("exp"))?;
        let iat = number_claim(&all, "iat")?.ok_or(IdTokenError::MissingClaim("iat"))?;
        if now > exp.saturating_add(leeway) {
            return Err(IdTokenError::Expired);
        }
        if let Some(nbf) = number_claim(&all, "nbf")?
            && nbf > now.saturating_add(leeway)
        {
            return Err(IdTokenError::NotYetValid);
        }
        if iat > now.saturating_add(leeway) {
            return Err(IdTokenError::IssuedInFuture);
        }
        let sub = string_claim(&all, "sub")?
            .filter(|s| !s.is_empty())
            .ok_or(IdTokenError::MissingClaim("sub"))?
            .to_owned();
        let token_nonce = string_claim(&all, "nonce")?.map(str::to_owned);
        if let Some(expected) = nonce {
            let got = token_nonce.as_deref().ok_or(IdTokenError::NonceMissing)?;
            if !bool::from(got.as_bytes().ct_eq(expected.as_bytes())) {
                return Err(IdTokenError::NonceMismatch);
            }
        }
        Ok(IdTokenClaims {
            iss: iss.to_owned(),
            sub,
            aud,
            azp,
            exp,
            iat,
            nonce: token_nonce,
            all,
        })
    }
}

pub(crate) fn string_claim<'a>(
    all: &'a serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, IdTokenError> {
    match all.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(IdTokenError::InvalidClaim(name)),
    }
}

/// A NumericDate: a JSON number (never a string), whole seconds.
pub(crate) fn number_claim(
    all: &serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<Option<u64>, IdTokenError> {
    match all.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(IdTokenError::InvalidClaim(name)),
        Some(_) => Err(IdTokenError::InvalidClaim(name)),
    }
}

/// The pinned algorithm and the key id of `token`, read from its header without
/// trusting it: three parts, a base64url JSON header, an `alg` among `rules`' pinned
/// algorithms and a plain `kid` (at most 128 ASCII letters, digits, `-`, `_`, `.`).
pub(crate) fn token_header(
    rules: &IdTokenRules,
    token: &str,
) -> Result<(Algorithm, String), IdTokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(IdTokenError::Malformed);
    };
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| IdTokenError::Malformed)?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).map_err(|_| IdTokenError::Malformed)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(IdTokenError::Malformed)?;
    let alg = rules
        .algorithms
        .iter()
        .copied()
        .find(|a| algorithm_name(*a) == alg)
        .ok_or(IdTokenError::AlgorithmNotAllowed)?;
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .filter(|kid| {
            !kid.is_empty()
                && kid.len() <= 128
                && kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .ok_or(IdTokenError::InvalidKid)?;
    Ok((alg, kid.to_owned()))
}

fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
        // Algorithms added to the library later are never pinned by name here.
        _ => "",
    }
}
