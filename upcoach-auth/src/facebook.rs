//! Facebook Login building blocks: the `signed_request` of Facebook's deauthorize and
//! data-deletion callbacks, the `appsecret_proof` the Graph API asks for, and the Graph
//! answers a sign-in reads (`debug_token`, `/me`). Everything here is pure: no HTTP, no
//! clock but the `now` a caller passes.
//!
//! - [`SignedRequest::verify`] takes the callback's `signed_request` form field,
//!   `<signature>.<payload>`, both unpadded base64url. The signature must be the
//!   HMAC-SHA256 of the payload *text* (as received) keyed by the app secret; it is
//!   compared in constant time, and checked before the payload is parsed, so nothing
//!   unauthenticated reaches the JSON parser. Then `algorithm` must be `HMAC-SHA256` and
//!   `user_id` must be present. The input is capped at [`MAX_SIGNED_REQUEST_LEN`].
//! - [`appsecret_proof`] is the lowercase hex HMAC-SHA256 of an access token keyed by
//!   the app secret, sent with Graph calls when the app requires it.
//! - [`DebugToken`] reads `GET /debug_token?input_token=…`; [`DebugToken::check`]
//!   accepts a token only if Facebook calls it valid, it was issued to our app, it names a
//!   user, and it has not expired.
//! - [`FacebookProfile`] reads `GET /me?fields=id,name,email`. Facebook does not say
//!   whether it verified the address, so it is never taken as verified (see
//!   [`LinkingPolicy`](crate::users::LinkingPolicy)).
//!
//! Each refusal is a [`FacebookError`] with a stable [`code`](FacebookError::code). No
//! error carries the app secret, an access token, or the Graph API's error message
//! (which can quote the token).
//!
//! ```
//! use std::time::{Duration, SystemTime, UNIX_EPOCH};
//! use upcoach_auth::facebook::{DebugToken, SignedRequest, appsecret_proof};
//! use upcoach_core::Secret;
//!
//! let app_secret = Secret::new("app-secret");
//!
//! // A data-deletion callback: `signed_request=<this>` in the form body.
//! let signed = "FOVuXdhkoWD2wEeXojKHRiHPmWJd9Zy7K_pCnuKtwcY.\
//!     eyJhbGdvcml0aG0iOiJITUFDLVNIQTI1NiIsImlzc3VlZF9hdCI6MTcwMDAwMDAwMCwidXNlcl9pZCI6IjEyMzQ1Njc4OTAifQ";
//! let request = SignedRequest::verify(signed, &app_secret)?;
//! assert_eq!(request.user_id, "1234567890");
//! assert_eq!(request.issued_at, Some(1_700_000_000));
//! let forged = SignedRequest::verify(signed, &Secret::new("another-secret")).unwrap_err();
//! assert_eq!(forged.code(), "signed_request_bad_signature");
//!
//! // Graph calls made with a user's token carry this proof.
//! let proof = appsecret_proof("EAAB-token", &app_secret);
//! assert_eq!(proof, "294c307ff2427ed2140908ec13f483ef7f7d7819a8fc32fb535cf6ada2327ab2");
//!
//! // Native sign-in: what `debug_token` says about the token the app sent.
//! let answer = br#"{"data": {"app_id": "4242", "type": "USER", "is_valid": true,
//!     "expires_at": 1700003600, "scopes": ["email", "public_profile"],
//!     "user_id": "1234567890"}}"#;
//! let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
//! let token = DebugToken::from_json(answer)?.check("4242", now)?;
//! assert_eq!(token.user_id, "1234567890");
//! let later = now + Duration::from_secs(7200);
//! let expired = DebugToken::from_json(answer)?.check("4242", later).unwrap_err();
//! assert_eq!(expired.code(), "facebook_token_expired");
//! # Ok::<(), upcoach_auth::facebook::FacebookError>(())
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use upcoach_core::Secret;

mod provider;
pub use provider::FacebookProvider;

/// The longest `signed_request` accepted, in bytes. Facebook's are a few hundred.
pub const MAX_SIGNED_REQUEST_LEN: usize = 8 * 1024;

/// How old a callback's `signed_request` may be (by its `issued_at`) to be acted on.
pub const SIGNED_REQUEST_MAX_AGE: Duration = Duration::from_secs(600);

impl SignedRequest {
    /// Until when this request may be acted on: [`SIGNED_REQUEST_MAX_AGE`] after it was
    /// issued. [`FacebookError::SignedRequestStale`] without `issued_at`, when that
    /// time has passed, or when it was issued more than a minute after `now`.
    pub fn fresh_until(&self, now: SystemTime) -> Result<SystemTime, FacebookError> {
        let issued = self
            .issued_at
            .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
            .ok_or(FacebookError::SignedRequestStale)?;
        let until = issued + SIGNED_REQUEST_MAX_AGE;
        if until <= now || issued > now + Duration::from_secs(60) {
            return Err(FacebookError::SignedRequestStale);
        }
        Ok(until)
    }
}

/// The one algorithm Facebook signs requests with.
const HMAC_SHA256: &str = "HMAC-SHA256";

type HmacSha256 = Hmac<Sha256>;

/// Why a Facebook input was refused. Each has a stable [`code`](Self::code).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FacebookError {
    /// The `signed_request` is longer than [`MAX_SIGNED_REQUEST_LEN`].
    #[error("the signed request is too long")]
    SignedRequestTooLong,
    /// The `signed_request` is not two non-empty parts joined by one `.`.
    #[error("the signed request is not two non-empty parts joined by one dot")]
    SignedRequestMalformed,
    /// A part is not unpadded base64url (a character outside the alphabet, `=`
    /// padding, or an impossible length).
    #[error("the signed request is not unpadded base64url")]
    SignedRequestBadEncoding(#[source] base64::DecodeError),
    /// The signature is not the HMAC-SHA256 of the payload under our app secret.
    #[error("the signed request's signature is invalid")]
    SignedRequestBadSignature,
    /// The signed payload is not a JSON object with a string `algorithm` (and, when
    /// present, a string or integer `user_id` and an integer `issued_at`).
    #[error("the signed request's payload is not the expected JSON object")]
    SignedRequestBadPayload(#[source] serde_json::Error),
    /// The payload's `algorithm` is not `HMAC-SHA256`.
    #[error("the signed request's algorithm is not HMAC-SHA256")]
    SignedRequestUnsupportedAlgorithm,
    /// The payload has no `user_id`, or an empty one.
    #[error("the signed request names no user")]
    SignedRequestMissingUserId,
    /// `issued_at` is missing, older than [`SIGNED_REQUEST_MAX_AGE`], or ahead of the
    /// clock by more than a minute.
    #[error("the signed request is not fresh")]
    SignedRequestStale,
    /// The `debug_token` answer is not the expected JSON.
    #[error("the debug_token answer is not the expected JSON")]
    TokenMalformed(#[source] serde_json::Error),
    /// Facebook says the access token is not valid (expired, revoked, or never was).
    #[error("Facebook says the access token is not valid")]
    TokenInvalid {
        /// The Graph API error code Facebook gave, if any (190: invalid token).
        graph_code: Option<i64>,
        /// The Graph API error subcode, if any (463: expired, 460: password changed).
        graph_subcode: Option<i64>,
    },
    /// The access token was issued to another app, or the answer names no app.
    #[error("the access token was issued to another app")]
    TokenForeignApp,
    /// The access token names no user (an app token, say).
    #[error("the access token names no user")]
    TokenMissingUserId,
    /// The access token's `expires_at` is not in the future.
    #[error("the access token has expired")]
    TokenExpired,
    /// The `/me` answer is not the expected JSON, or has no `id`.
    #[error("the /me answer is not the expected JSON")]
    ProfileMalformed(#[source] serde_json::Error),
}

impl FacebookError {
    /// A stable snake_case code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            FacebookError::SignedRequestTooLong => "signed_request_too_long",
            FacebookError::SignedRequestMalformed => "signed_request_malformed",
            FacebookError::SignedRequestBadEncoding(_) => "signed_request_bad_encoding",
            FacebookError::SignedRequestBadSignature => "signed_request_bad_signature",
            FacebookError::SignedRequestBadPayload(_) => "signed_request_bad_payload",
            FacebookError::SignedRequestUnsupportedAlgorithm => {
                "signed_request_unsupported_algorithm"
            }
            FacebookError::SignedRequestMissingUserId => "signed_request_missing_user_id",
            FacebookError::SignedRequestStale => "signed_request_stale",
            FacebookError::TokenMalformed(_) => "facebook_token_malformed",
            FacebookError::TokenInvalid { .. } => "facebook_token_invalid",
            FacebookError::TokenForeignApp => "facebook_token_foreign_app",
            FacebookError::TokenMissingUserId => "facebook_token_missing_user_id",
            FacebookError::TokenExpired => "facebook_token_expired",
            FacebookError::ProfileMalformed(_) => "facebook_profile_malformed",
        }
    }

    /// Whether trying again later could succeed: never, for these. A refused request
    /// or token stays refused; an unreachable Graph API is the caller's error, not one
    /// of these.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// A verified `signed_request` from Facebook's deauthorize or data-deletion callback.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SignedRequest {
    /// The app-scoped id of the user who removed the app or asked for deletion.
    pub user_id: String,
    /// The algorithm the payload names, as sent (`HMAC-SHA256`, any case).
    pub algorithm: String,
    /// When Facebook issued the request, seconds since the epoch, if it said.
    pub issued_at: Option<u64>,
}

/// The payload fields read; every other field is ignored.
#[derive(Deserialize)]
struct SignedPayload {
    algorithm: String,
    #[serde(default)]
    user_id: Option<GraphId>,
    #[serde(default)]
    issued_at: Option<u64>,
}

impl SignedRequest {
    /// Verifies `signed_request` (the form field's value, `<signature>.<payload>`)
    /// with the app secret and reads its payload.
    pub fn verify(signed_request: &str, app_secret: &Secret) -> Result<Self, FacebookError> {
        if signed_request.len() > MAX_SIGNED_REQUEST_LEN {
            return Err(FacebookError::SignedRequestTooLong);
        }
        let (signature, payload) = signed_request
            .split_once('.')
            .ok_or(FacebookError::SignedRequestMalformed)?;
        if signature.is_empty() || payload.is_empty() || payload.contains('.') {
            return Err(FacebookError::SignedRequestMalformed);
        }
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(FacebookError::SignedRequestBadEncoding)
        };
        let signature = decode(signature)?;
        let payload_json = decode(payload)?;
        // Signed is the payload's base64url text, not its decoded bytes.
        hmac_sha256(app_secret)
            .chain_update(payload.as_bytes())
            .verify_slice(&signature)
            .map_err(|_| FacebookError::SignedRequestBadSignature)?;
        let fields: SignedPayload = serde_json::from_slice(&payload_json)
            .map_err(FacebookError::SignedRequestBadPayload)?;
        if !fields.algorithm.eq_ignore_ascii_case(HMAC_SHA256) {
            return Err(FacebookError::SignedRequestUnsupportedAlgorithm);
        }
        let user_id = fields
            .user_id
            .map(GraphId::into_string)
            .filter(|id| !id.is_empty())
            .ok_or(FacebookError::SignedRequestMissingUserId)?;
        Ok(Self {
            user_id,
            algorithm: fields.algorithm,
            issued_at: fields.issued_at,
        })
    }
}

/// The `appsecret_proof` parameter for a Graph API call made with `access_token`: the
/// lowercase hex HMAC-SHA256 of the token keyed by the app secret.
pub fn appsecret_proof(access_token: &str, app_secret: &Secret) -> String {
    let digest = hmac_sha256(app_secret)
        .chain_update(access_token.as_bytes())
        .finalize()
        .into_bytes();
    lower_hex(&digest)
}

/// What `GET /debug_token` says about an access token (the object under `data`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct DebugToken {
    /// Whether Facebook still accepts the token.
    pub is_valid: bool,
    /// The app the token was issued to (absent for a token Facebook cannot parse).
    #[serde(default, deserialize_with = "optional_graph_id")]
    pub app_id: Option<String>,
    /// The user the token is for (absent for app tokens).
    #[serde(default, deserialize_with = "optional_graph_id")]
    pub user_id: Option<String>,
    /// `USER`, `PAGE`, `APP`…
    #[serde(default, rename = "type")]
    pub token_type: Option<String>,
    /// The app's name.
    #[serde(default)]
    pub application: Option<String>,
    /// When the token expires, seconds since the epoch; `0` (or absent) for tokens that
    /// do not expire.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// The permissions the user granted to the app.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Why the token is not valid, when Facebook says.
    #[serde(default)]
    pub error: Option<DebugTokenError>,
}

/// The `error` object of a `debug_token` answer: its codes only. The message is not
/// kept, since it can quote the token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct DebugTokenError {
    /// The Graph API error code (190: invalid access token).
    #[serde(default)]
    pub code: Option<i64>,
    /// The subcode (463: expired, 460: password changed, 458: app removed…).
    #[serde(default)]
    pub subcode: Option<i64>,
}

/// `GET /debug_token`'s body: `{"data": {…}}`.
#[derive(Deserialize)]
struct DebugTokenAnswer {
    data: DebugToken,
}

/// A user access token [`DebugToken::check`] accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedUserToken {
    /// The app-scoped id of the user.
    pub user_id: String,
    /// When the token expires; `None` when it does not.
    pub expires_at: Option<SystemTime>,
    /// The permissions the user granted.
    pub scopes: Vec<String>,
}

impl DebugToken {
    /// Reads the body of a successful `GET /debug_token` (HTTP 200). A Graph error
    /// answer (`{"error": …}`, HTTP 4xx) means our own app token or the request was
    /// refused; it is `TokenMalformed` here, and a caller should treat the status first.
    pub fn from_json(body: &[u8]) -> Result<Self, FacebookError> {
        serde_json::from_slice::<DebugTokenAnswer>(body)
            .map(|answer| answer.data)
            .map_err(FacebookError::TokenMalformed)
    }

    /// When the token expires: `None` when `expires_at` is `0` or absent.
    pub fn expiry(&self) -> Option<SystemTime> {
        match self.expires_at {
            None | Some(0) => None,
            Some(secs) => UNIX_EPOCH.checked_add(Duration::from_secs(secs)),
        }
    }

    /// Accepts the token for sign-in to the app `app_id` at `now`: Facebook calls it
    /// valid, its `app_id` is exactly ours, it names a user, and its `expires_at` (unless
    /// `0`, never) is after `now`.
    pub fn check(&self, app_id: &str, now: SystemTime) -> Result<VerifiedUserToken, FacebookError> {
        if !self.is_valid {
            return Err(FacebookError::TokenInvalid {
                graph_code: self.error.as_ref().and_then(|e| e.code),
                graph_subcode: self.error.as_ref().and_then(|e| e.subcode),
            });
        }
        if self.app_id.as_deref() != Some(app_id) {
            return Err(FacebookError::TokenForeignApp);
        }
        // A page or app token may name a user too; only a user's own token signs in.
        if self.token_type.as_deref() != Some("USER") {
            return Err(FacebookError::TokenInvalid {
                graph_code: None,
                graph_subcode: None,
            });
        }
        let user_id = self
            .user_id
            .clone()
            .filter(|id| !id.is_empty())
            .ok_or(FacebookError::TokenMissingUserId)?;
        if let Some(secs) = self.expires_at.filter(|&secs| secs != 0) {
            let now = now
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            if secs <= now {
                return Err(FacebookError::TokenExpired);
            }
        }
        Ok(VerifiedUserToken {
            user_id,
            expires_at: self.expiry(),
            scopes: self.scopes.clone(),
        })
    }
}

/// A user as `GET /me?fields=id,name,email` describes them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct FacebookProfile {
    /// The app-scoped user id; never empty.
    #[serde(deserialize_with = "non_empty_graph_id")]
    pub id: String,
    /// The display name, if given.
    #[serde(default, deserialize_with = "optional_text")]
    pub name: Option<String>,
    /// The primary e-mail address, if the user has one and granted `email`; not known
    /// to be verified.
    #[serde(default, deserialize_with = "optional_text")]
    pub email: Option<String>,
}

impl FacebookProfile {
    /// Reads the body of a successful `GET /me?fields=id,name,email`.
    pub fn from_json(body: &[u8]) -> Result<Self, FacebookError> {
        serde_json::from_slice(body).map_err(FacebookError::ProfileMalformed)
    }
}

/// A Graph id: a JSON string, or an integer as older answers sent.
#[derive(Deserialize)]
#[serde(untagged)]
enum GraphId {
    Text(String),
    Number(u64),
}

impl GraphId {
    fn into_string(self) -> String {
        match self {
            GraphId::Text(text) => text,
            GraphId::Number(number) => number.to_string(),
        }
    }
}

fn optional_graph_id<'de, D>(deserializer: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(Option::<GraphId>::deserialize(deserializer)?.map(GraphId::into_string))
}

fn non_empty_graph_id<'de, D>(deserializer: D) -> Result<String, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let id = GraphId::deserialize(deserializer)?.into_string();
    if id.is_empty() {
        return Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Str(""),
            &"a non-empty id",
        ));
    }
    Ok(id)
}

/// An optional string, with `""` read as absent.
fn optional_text<'de, D>(deserializer: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(Option::<String>::deserialize(deserializer)?.filter(|text| !text.is_empty()))
}

fn hmac_sha256(key: &Secret) -> HmacSha256 {
    // HMAC takes keys of any length (longer ones are hashed), so this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key.expose().as_bytes())
        .expect("HMAC accepts keys of any length")
}

fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

#[cfg(test)]
mod tests;
