//! Sign in with Apple: [`AppleProvider`] (web and native sign-in, server-to-server
//! notifications), and the parts that need no network, each testable on its own.
//!
//! - [`ClientSecretSigner`]: Apple's token endpoint takes as client secret an ES256 JWT
//!   signed with the team's Sign in with Apple key (`APPLE_TEAM_ID`, `APPLE_KEY_ID`,
//!   `APPLE_PRIVATE_KEY`). One is made per client id (the Services ID on the web, the
//!   bundle id in native apps) and kept until shortly before it expires.
//! - [`AppleClaims`]: the Apple-specific claims of a verified id token, normalized.
//!   `email_verified`, `is_private_email` and `nonce_supported` arrive as JSON booleans
//!   or as the strings `"true"`/`"false"`; `real_user_status` as 0, 1 or 2.
//! - [`check_native_nonce`]: a native app gives Apple the SHA-256 of its nonce and us
//!   the nonce itself.
//! - [`AppleNotification`]: the server-to-server notifications (private relay turned off
//!   or on, consent revoked, account deleted), read from the claims of a verified
//!   notification JWT, with an idempotency key.
//!
//! These parts fetch no keys and check no signatures: [`AppleProvider`] verifies id
//! tokens and notification JWTs with Apple's keys first (an
//! [`IdTokenVerifier`](crate::oidc::IdTokenVerifier)), and these functions read the
//! claims it returns.
//!
//! ```
//! use serde_json::json;
//! use upcoach_auth::apple::{
//!     AppleClaims, AppleEventKind, AppleNotification, RealUserStatus, check_native_nonce,
//! };
//!
//! // A verified native id token; the app gave Apple SHA-256("n-0S6_WzA2Mj").
//! let id_token = json!({
//!     "iss": "https://appleid.apple.com",
//!     "aud": "com.example.app",
//!     "sub": "001234.5f8e1c2d3b4a.0042",
//!     "email": "k2j4@privaterelay.appleid.com",
//!     "email_verified": "true",
//!     "is_private_email": true,
//!     "real_user_status": 2,
//!     "nonce": "0823a09b54cb9381561068b00aaf4e539b3f54604631d3e6a820879b6b04cc19",
//!     "nonce_supported": true,
//! });
//! let claims = AppleClaims::from_claims(id_token.as_object().unwrap())?;
//! assert!(claims.email_verified && claims.is_private_email);
//! assert_eq!(claims.real_user_status, Some(RealUserStatus::LikelyReal));
//! check_native_nonce("n-0S6_WzA2Mj", claims.nonce.as_deref().unwrap_or_default())?;
//!
//! // A verified notification: `events` is JSON inside a string.
//! let notification = json!({
//!     "iss": "https://appleid.apple.com",
//!     "aud": "com.example.web",
//!     "iat": 1_700_000_000,
//!     "jti": "Ptdu3kOAHgFsU8HvoxW0Ng",
//!     "events": r#"{"type":"consent-revoked","sub":"001234.5f8e1c2d3b4a.0042","event_time":1700000000123}"#,
//! });
//! let notification = AppleNotification::from_claims(notification.as_object().unwrap())?;
//! assert_eq!(notification.event.kind, AppleEventKind::ConsentRevoked);
//! assert_eq!(notification.idempotency_key(), "apple:jti:Ptdu3kOAHgFsU8HvoxW0Ng");
//! # Ok::<(), upcoach_auth::apple::AppleError>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AppleConfig;
use crate::oidc::IdTokenError;

mod provider;

pub use provider::{AppleClient, AppleProvider, AppleSignIn};

/// Apple's issuer: the `iss` of its id tokens and the `aud` of every client secret.
pub const APPLE_ISSUER: &str = "https://appleid.apple.com";
/// The longest-lived client secret Apple accepts: 15,777,000 s, about six months.
pub const MAX_CLIENT_SECRET_LIFETIME: Duration = Duration::from_secs(15_777_000);
/// The shortest lifetime a [`ClientSecretSigner`] accepts. Below it the renewal margin
/// (at least a minute) would be most of the lifetime.
pub const MIN_CLIENT_SECRET_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// The default client-secret lifetime: one hour.
///
/// The secret is a bearer credential for our client id at Apple's token and revocation
/// endpoints. One that leaks (a proxy log, a crash report) is useful until it expires,
/// so it should not live for months. Making one costs one ES256 signature per client id
/// per hour, which is nothing, and nothing about it is stored. An hour also leaves room
/// for clock skew with Apple.
pub const DEFAULT_CLIENT_SECRET_LIFETIME: Duration = Duration::from_secs(3600);
/// The least renewal margin (see [`ClientSecretSigner::renewal_margin`]).
const MIN_RENEWAL_MARGIN: Duration = Duration::from_secs(60);
/// How many client ids a [`ClientSecretSigner`] keeps a secret for. Apple has one
/// Services ID per website and one bundle id per app, so a handful at most.
pub const MAX_CACHED_CLIENT_IDS: usize = 16;
/// The longest raw nonce accepted from a native client, in bytes.
pub const MAX_NATIVE_NONCE_LEN: usize = 512;
/// The longest `events` string of a notification, in bytes.
pub const MAX_EVENTS_LEN: usize = 8 * 1024;
/// The longest notification request body, in bytes: an id token's limit plus room for
/// the JSON around it.
pub const MAX_NOTIFICATION_BODY_LEN: usize = crate::oidc::MAX_ID_TOKEN_LEN + 1024;
/// The longest `jti` of a notification, in bytes.
const MAX_JTI_LEN: usize = 256;
/// The oldest notification acted on, by its `iat`: 23 hours. A claimed notification is
/// remembered until its `exp` (at most a day, the flow store's longest), so a replay
/// after that is refused as stale here, whatever `exp` it carries.
pub const NOTIFICATION_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(23 * 3600);
/// How much of an unknown event type an error keeps.
const MAX_REPORTED_KIND_LEN: usize = 64;

/// What can go wrong in the Sign in with Apple building blocks. Each has a stable
/// [`code`](Self::code); no message carries key material, secrets or tokens.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppleError {
    /// `APPLE_PRIVATE_KEY` is not a P-256 key in PKCS#8 PEM (`-----BEGIN PRIVATE
    /// KEY-----`), as Apple issues it in its `.p8` file.
    #[error("the Sign in with Apple key is not a P-256 PKCS#8 PEM key")]
    InvalidPrivateKey(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The client-secret lifetime is longer than Apple accepts
    /// ([`MAX_CLIENT_SECRET_LIFETIME`]).
    #[error("a client secret may live at most 15777000 s; {} s asked", lifetime.as_secs())]
    LifetimeTooLong {
        /// The lifetime asked for.
        lifetime: Duration,
    },
    /// The client-secret lifetime is shorter than [`MIN_CLIENT_SECRET_LIFETIME`].
    #[error("a client secret must live at least 300 s; {} s asked", lifetime.as_secs())]
    LifetimeTooShort {
        /// The lifetime asked for.
        lifetime: Duration,
    },
    /// A client secret could not be made (the clock reads before 1970, or signing
    /// failed).
    #[error("the Apple client secret could not be signed")]
    Signing(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An id token's claims are not what Apple sends: `sub` missing or empty, or a
    /// claim of the wrong type or value (`email_verified: "yes"`, `real_user_status: 3`).
    #[error("the Apple id token's claims are invalid")]
    InvalidClaims(#[source] serde_json::Error),
    /// The nonce from the client is empty or longer than [`MAX_NATIVE_NONCE_LEN`].
    #[error("the nonce is empty or too long")]
    NonceMalformed,
    /// The nonce from the client equals the token's nonce claim: the app gave Apple the
    /// raw nonce, or gave us the hash.
    #[error("the nonce given to Apple was not hashed")]
    NonceNotHashed,
    /// The token's nonce claim is not the SHA-256 of the client's nonce.
    #[error("the nonce does not match the id token")]
    NonceMismatch,
    /// A notification body or its claims are not what Apple sends.
    #[error("the Apple notification is malformed: {reason}")]
    NotificationMalformed {
        /// What is wrong, briefly.
        reason: &'static str,
        /// The JSON error, when parsing failed.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// A notification body or its `events` string is over its size limit.
    #[error("the Apple notification is too large")]
    NotificationTooLarge,
    /// The event's `type` is not one this code knows.
    #[error("unknown Apple notification event type {kind:?}")]
    UnknownEvent {
        /// The type Apple sent, cut to 64 bytes.
        kind: String,
    },
    /// The notification JWT is not signed by Apple: not RS256, no or an unknown key id
    /// (after fetching Apple's keys again), or a signature that does not verify.
    #[error("the Apple notification's signature is invalid")]
    NotificationBadSignature(#[source] IdTokenError),
    /// The notification's `iss` is not Apple's.
    #[error("the Apple notification was issued by someone else")]
    NotificationWrongIssuer,
    /// The notification's `aud` names none of our client ids.
    #[error("the Apple notification is not for this application")]
    NotificationWrongAudience,
    /// The notification's `exp` is past (beyond the leeway), or its `iat` is older than
    /// [`NOTIFICATION_MAX_AGE`].
    #[error("the Apple notification has expired")]
    NotificationExpired,
    /// The notification's `iat` (or `nbf`) is in the future (beyond the leeway).
    #[error("the Apple notification is not valid yet")]
    NotificationNotYetValid,
    /// Apple's signing keys could not be fetched (and none were cached): worth
    /// retrying.
    #[error("Apple's signing keys are unavailable")]
    KeysUnavailable(#[source] IdTokenError),
}

impl AppleError {
    /// A stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            AppleError::InvalidPrivateKey(_) => "apple_private_key_invalid",
            AppleError::LifetimeTooLong { .. } => "apple_client_secret_lifetime_too_long",
            AppleError::LifetimeTooShort { .. } => "apple_client_secret_lifetime_too_short",
            AppleError::Signing(_) => "apple_client_secret_signing_failed",
            AppleError::InvalidClaims(_) => "apple_claims_invalid",
            AppleError::NonceMalformed => "apple_nonce_malformed",
            AppleError::NonceNotHashed => "apple_nonce_not_hashed",
            AppleError::NonceMismatch => "apple_nonce_mismatch",
            AppleError::NotificationMalformed { .. } => "apple_notification_malformed",
            AppleError::NotificationTooLarge => "apple_notification_too_large",
            AppleError::UnknownEvent { .. } => "apple_notification_unknown_event",
            AppleError::NotificationBadSignature(_) => "apple_notification_bad_signature",
            AppleError::NotificationWrongIssuer => "apple_notification_wrong_issuer",
            AppleError::NotificationWrongAudience => "apple_notification_wrong_audience",
            AppleError::NotificationExpired => "apple_notification_expired",
            AppleError::NotificationNotYetValid => "apple_notification_not_yet_valid",
            AppleError::KeysUnavailable(_) => "apple_keys_unavailable",
        }
    }

    /// Whether trying again later could succeed: only when Apple's keys could not be
    /// fetched; every other check is on the input alone.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AppleError::KeysUnavailable(_))
    }
}

// ---------------------------------------------------------------------------------------
// Client secrets
// ---------------------------------------------------------------------------------------

/// Makes and caches the ES256 client secrets Apple's token endpoint asks for.
///
/// The JWT has the header `{"alg": "ES256", "kid": <key id>}` and the claims `iss` (the
/// team id), `iat` (now), `exp` (now plus the [lifetime](Self::lifetime)), `aud`
/// ([`APPLE_ISSUER`]) and `sub` (the client id it is for).
/// [`secret_for`](Self::secret_for) hands out the same secret for a client id until less
/// than the [renewal margin](Self::renewal_margin) of it is left, then signs a new one.
///
/// Its `Debug` shows the team id, key id and lifetime, never the key or a secret.
///
/// ```no_run
/// use std::time::SystemTime;
/// use upcoach_auth::apple::ClientSecretSigner;
/// use upcoach_auth::config::AuthConfig;
/// use upcoach_core::config::Settings;
///
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = AuthConfig::from_env()?;
/// let apple = config.apple.as_ref().expect("APPLE_* set");
/// let signer = ClientSecretSigner::from_config(apple)?;
/// let secret = signer.secret_for("com.example.web", SystemTime::now())?;
/// # let _ = secret; Ok(()) }
/// ```
pub struct ClientSecretSigner {
    team_id: String,
    key_id: String,
    key: EncodingKey,
    lifetime: Duration,
    cache: Mutex<HashMap<String, CachedSecret>>,
}

/// A signed secret and its validity, in seconds since the epoch.
struct CachedSecret {
    jwt: String,
    issued_at: u64,
    expires_at: u64,
}

impl CachedSecret {
    /// Whether it may still be handed out at `now`: issued no later than `now` (a clock
    /// that went back gets a new one) and at least `margin` left.
    fn usable_at(&self, now: u64, margin: u64) -> bool {
        self.issued_at <= now && now.saturating_add(margin) <= self.expires_at
    }
}

/// The claims of a client secret, in the order Apple documents them.
#[derive(Serialize)]
struct ClientSecretClaims<'a> {
    iss: &'a str,
    iat: u64,
    exp: u64,
    aud: &'a str,
    sub: &'a str,
}

impl ClientSecretSigner {
    /// A signer for `team_id` with the key `key_id`, whose `.p8` file (PKCS#8 PEM of a
    /// P-256 key) is `private_key_pem`, making secrets of
    /// [`DEFAULT_CLIENT_SECRET_LIFETIME`].
    ///
    /// The key is tried once here, so a PEM that does not hold a usable P-256 key is
    /// [`AppleError::InvalidPrivateKey`] now rather than at the first sign-in.
    pub fn new(
        team_id: impl Into<String>,
        key_id: impl Into<String>,
        private_key_pem: &str,
    ) -> Result<Self, AppleError> {
        let key = p256_encoding_key(private_key_pem)?;
        Ok(Self {
            team_id: team_id.into(),
            key_id: key_id.into(),
            key,
            lifetime: DEFAULT_CLIENT_SECRET_LIFETIME,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// A signer from the `APPLE_*` settings.
    pub fn from_config(config: &AppleConfig) -> Result<Self, AppleError> {
        Self::new(
            config.team_id.clone(),
            config.key_id.clone(),
            config.private_key.expose(),
        )
    }

    /// The same signer making secrets of `lifetime`, which must lie between
    /// [`MIN_CLIENT_SECRET_LIFETIME`] and [`MAX_CLIENT_SECRET_LIFETIME`] (Apple refuses
    /// longer ones, and this signer never makes them). Cached secrets are dropped.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Result<Self, AppleError> {
        if lifetime > MAX_CLIENT_SECRET_LIFETIME {
            return Err(AppleError::LifetimeTooLong { lifetime });
        }
        if lifetime < MIN_CLIENT_SECRET_LIFETIME {
            return Err(AppleError::LifetimeTooShort { lifetime });
        }
        self.lifetime = lifetime;
        self.cache
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(self)
    }

    /// How long each secret is valid (`exp - iat`, in whole seconds).
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// How much validity a cached secret must have left to be handed out again: a tenth
    /// of the lifetime, at least a minute (six minutes for the default hour). A secret
    /// handed out then still outlives the request it goes into and a few minutes of
    /// clock skew between us and Apple.
    pub fn renewal_margin(&self) -> Duration {
        (self.lifetime / 10).max(MIN_RENEWAL_MARGIN)
    }

    /// The client secret for `client_id` (the Services ID for web sign-in, the bundle id
    /// for native), valid at `now`.
    ///
    /// The cached one is returned while at least the [renewal margin](Self::renewal_margin)
    /// of it is left and it was not issued after `now`; otherwise a new one is signed
    /// and cached. Secrets are kept for at most [`MAX_CACHED_CLIENT_IDS`] client ids:
    /// when a new client id finds the cache full, the secrets due for renewal are
    /// dropped first and, if none is, the one expiring soonest; the dropped client id
    /// simply gets a new secret the next time it is asked for.
    pub fn secret_for(&self, client_id: &str, now: SystemTime) -> Result<String, AppleError> {
        let now = unix_seconds(now)?;
        let margin = self.renewal_margin().as_secs();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cached) = cache.get(client_id)
            && cached.usable_at(now, margin)
        {
            return Ok(cached.jwt.clone());
        }
        // Signed under the lock: concurrent callers wait for this secret instead of
        // each signing their own.
        let (jwt, expires_at) = self.sign(client_id, now)?;
        if !cache.contains_key(client_id) && cache.len() >= MAX_CACHED_CLIENT_IDS {
            cache.retain(|_, cached| cached.usable_at(now, margin));
            if cache.len() >= MAX_CACHED_CLIENT_IDS
                && let Some(soonest) = cache
                    .iter()
                    .min_by_key(|(_, cached)| cached.expires_at)
                    .map(|(id, _)| id.clone())
            {
                cache.remove(&soonest);
            }
        }
        cache.insert(
            client_id.to_owned(),
            CachedSecret {
                jwt: jwt.clone(),
                issued_at: now,
                expires_at,
            },
        );
        Ok(jwt)
    }

    /// A new secret for `client_id` issued at `now` (seconds), and its `exp`.
    fn sign(&self, client_id: &str, now: u64) -> Result<(String, u64), AppleError> {
        let exp = now
            .checked_add(self.lifetime.as_secs())
            .ok_or_else(|| AppleError::Signing("the expiry is out of range".into()))?;
        // Apple documents a header of `alg` and `kid` only, so no `typ`.
        let mut header = Header::new(Algorithm::ES256);
        header.typ = None;
        header.kid = Some(self.key_id.clone());
        let claims = ClientSecretClaims {
            iss: &self.team_id,
            iat: now,
            exp,
            aud: APPLE_ISSUER,
            sub: client_id,
        };
        let jwt = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| AppleError::Signing(Box::new(e)))?;
        Ok((jwt, exp))
    }
}

impl fmt::Debug for ClientSecretSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("ClientSecretSigner");
        out.field("team_id", &self.team_id)
            .field("key_id", &self.key_id)
            .field("lifetime", &self.lifetime);
        // `try_lock`: formatting never waits on (or deadlocks with) a signing caller.
        match self.cache.try_lock() {
            Ok(cache) => out.field("cached_client_ids", &cache.len()),
            Err(_) => out.field("cached_client_ids", &format_args!("(busy)")),
        };
        out.finish_non_exhaustive()
    }
}

/// The ES256 signing key in `pem`, tried once.
///
/// The crate's `use_pem` feature is off, so the PEM is read here: the `PRIVATE KEY`
/// label of PKCS#8, base64 between the lines, whitespace (including `\r`) ignored.
fn p256_encoding_key(pem: &str) -> Result<EncodingKey, AppleError> {
    let invalid = |why: &'static str| AppleError::InvalidPrivateKey(why.into());
    let body = pem
        .trim()
        .strip_prefix("-----BEGIN PRIVATE KEY-----")
        .and_then(|rest| rest.strip_suffix("-----END PRIVATE KEY-----"))
        .ok_or_else(|| {
            invalid("expected -----BEGIN PRIVATE KEY----- ... -----END PRIVATE KEY-----")
        })?;
    let mut base64: Vec<u8> = body.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let der = STANDARD.decode(&base64);
    wipe(&mut base64);
    let mut der = der.map_err(|_| invalid("the PEM body is not base64"))?;
    let key = EncodingKey::from_ec_der(&der);
    wipe(&mut der);
    // `from_ec_der` only keeps the bytes; signing parses them as a PKCS#8 P-256 key.
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), &Map::new(), &key)
        .map_err(|e| AppleError::InvalidPrivateKey(Box::new(e)))?;
    Ok(key)
}

/// Overwrites a copy of key material (best effort: `EncodingKey` zeroizes its own).
fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

fn unix_seconds(now: SystemTime) -> Result<u64, AppleError> {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| AppleError::Signing("the clock reads before 1970".into()))
}

// ---------------------------------------------------------------------------------------
// Id-token claims
// ---------------------------------------------------------------------------------------

/// Apple's `real_user_status`: how sure Apple is that the account belongs to a person.
/// Sent only by native sign-in on iOS 14 and later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RealUserStatus {
    /// 0: this device does not support the check.
    Unsupported,
    /// 1: Apple cannot tell.
    Unknown,
    /// 2: very likely a real person.
    LikelyReal,
}

impl RealUserStatus {
    /// The status for Apple's number, if it is 0, 1 or 2.
    pub fn from_code(code: u64) -> Option<Self> {
        match code {
            0 => Some(RealUserStatus::Unsupported),
            1 => Some(RealUserStatus::Unknown),
            2 => Some(RealUserStatus::LikelyReal),
            _ => None,
        }
    }

    /// Apple's number for the status.
    pub fn code(self) -> u8 {
        match self {
            RealUserStatus::Unsupported => 0,
            RealUserStatus::Unknown => 1,
            RealUserStatus::LikelyReal => 2,
        }
    }
}

/// Reads a JSON integer 0, 1 or 2; anything else (3, -1, `"2"`, `2.0`) is an error.
impl<'de> Deserialize<'de> for RealUserStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Code;
        impl Visitor<'_> for Code {
            type Value = RealUserStatus;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the integer 0, 1 or 2")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                RealUserStatus::from_code(v)
                    .ok_or_else(|| E::invalid_value(Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .ok()
                    .and_then(RealUserStatus::from_code)
                    .ok_or_else(|| E::invalid_value(Unexpected::Signed(v), &self))
            }
        }
        deserializer.deserialize_any(Code)
    }
}

/// The claims of a verified Apple id token that Apple spells its own way.
///
/// `email_verified`, `is_private_email` and `nonce_supported` are read from a JSON
/// boolean or the exact strings `"true"` and `"false"`; absent or `null` means `false`
/// (`None` for `nonce_supported`), and any other value (`"yes"`, `"TRUE"`, `1`) is an
/// error. `real_user_status` must be 0, 1 or 2 when present. Other claims are ignored;
/// `iss`, `aud`, `exp` and the signature are the verifier's business.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AppleClaims {
    /// Apple's stable id for the user within the team.
    pub sub: String,
    /// The address, when the user shared one (possibly a private relay address).
    #[serde(default)]
    pub email: Option<String>,
    /// Whether Apple verified the address (Apple's addresses always are).
    #[serde(default, deserialize_with = "bool_or_string")]
    pub email_verified: bool,
    /// Whether the address is a private relay address.
    #[serde(default, deserialize_with = "bool_or_string")]
    pub is_private_email: bool,
    /// How likely the user is a real person (native sign-in only).
    #[serde(default)]
    pub real_user_status: Option<RealUserStatus>,
    /// The nonce, as Apple received it (for native apps, the SHA-256 of ours).
    #[serde(default)]
    pub nonce: Option<String>,
    /// Whether the platform supports nonces (absent on the web).
    #[serde(default, deserialize_with = "optional_bool_or_string")]
    pub nonce_supported: Option<bool>,
}

impl AppleClaims {
    /// The Apple claims of a verified id token (its
    /// [`all`](crate::oidc::IdTokenClaims::all) map); `sub` must be present and
    /// non-empty.
    pub fn from_claims(claims: &Map<String, Value>) -> Result<Self, AppleError> {
        let parsed = AppleClaims::deserialize(claims).map_err(AppleError::InvalidClaims)?;
        if parsed.sub.is_empty() {
            return Err(AppleError::InvalidClaims(de::Error::invalid_value(
                Unexpected::Str(""),
                &"a non-empty sub",
            )));
        }
        Ok(parsed)
    }
}

/// A JSON boolean, `"true"`, `"false"`, or `null` (`None`).
struct BoolOrString;

impl<'de> Visitor<'de> for BoolOrString {
    type Value = Option<bool>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a boolean or the string \"true\" or \"false\"")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Some(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        match v {
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

fn bool_or_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(deserializer.deserialize_any(BoolOrString)?.unwrap_or(false))
}

fn optional_bool_or_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<bool>, D::Error> {
    deserializer.deserialize_any(BoolOrString)
}

// ---------------------------------------------------------------------------------------
// Native nonce
// ---------------------------------------------------------------------------------------

/// Checks the nonce of a native sign-in.
///
/// The app makes a random nonce, gives Apple its SHA-256 as lowercase hex (Apple puts
/// that in the token's `nonce` claim) and gives us the nonce itself. The rule, in order:
///
/// 1. `raw_nonce_from_client` empty or longer than [`MAX_NATIVE_NONCE_LEN`] bytes:
///    [`AppleError::NonceMalformed`].
/// 2. It equals `nonce_claim`: [`AppleError::NonceNotHashed`]. Either the app gave Apple
///    the raw nonce, or it gave us the hash; both mean the same value went both ways.
/// 3. The lowercase hex SHA-256 of it differs from `nonce_claim` (compared in constant
///    time): [`AppleError::NonceMismatch`]. Uppercase hex in the claim is a mismatch.
///
/// Any string is a valid raw nonce, a 64-character hex one too: an app that gives us
/// `h` and Apple SHA-256(`h`) passes, and must, since that is what hashing a hex
/// nonce looks like. This only ties the token to the nonce; that the nonce is one we
/// issued and have not seen used is the caller's to check.
pub fn check_native_nonce(
    raw_nonce_from_client: &str,
    nonce_claim: &str,
) -> Result<(), AppleError> {
    if raw_nonce_from_client.is_empty() || raw_nonce_from_client.len() > MAX_NATIVE_NONCE_LEN {
        return Err(AppleError::NonceMalformed);
    }
    let raw = raw_nonce_from_client.as_bytes();
    let claim = nonce_claim.as_bytes();
    if bool::from(raw.ct_eq(claim)) {
        return Err(AppleError::NonceNotHashed);
    }
    let expected = lower_hex(&Sha256::digest(raw));
    if !bool::from(expected.as_bytes().ct_eq(claim)) {
        return Err(AppleError::NonceMismatch);
    }
    Ok(())
}

fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Server-to-server notifications
// ---------------------------------------------------------------------------------------

/// What an Apple server-to-server notification reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AppleEventKind {
    /// `email-disabled`: the user stopped mail forwarding to their private relay address.
    EmailDisabled,
    /// `email-enabled`: the user turned mail forwarding to the relay address back on.
    EmailEnabled,
    /// `consent-revoked`: the user stopped using Sign in with Apple with our app.
    ConsentRevoked,
    /// `account-delete`: the user deleted their Apple account.
    AccountDelete,
}

impl AppleEventKind {
    /// Apple's name for it (`"email-disabled"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            AppleEventKind::EmailDisabled => "email-disabled",
            AppleEventKind::EmailEnabled => "email-enabled",
            AppleEventKind::ConsentRevoked => "consent-revoked",
            AppleEventKind::AccountDelete => "account-delete",
        }
    }

    /// The kind Apple's name stands for, if known (exact, case-sensitive).
    pub fn from_apple(name: &str) -> Option<Self> {
        match name {
            "email-disabled" => Some(AppleEventKind::EmailDisabled),
            "email-enabled" => Some(AppleEventKind::EmailEnabled),
            "consent-revoked" => Some(AppleEventKind::ConsentRevoked),
            "account-delete" => Some(AppleEventKind::AccountDelete),
            _ => None,
        }
    }
}

/// One event of a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppleEvent {
    /// What happened.
    pub kind: AppleEventKind,
    /// The user, as in their id tokens' `sub`.
    pub sub: String,
    /// The address concerned (sent with the e-mail events).
    pub email: Option<String>,
    /// Whether that address is a private relay address (boolean or `"true"`/`"false"`;
    /// absent means `false`).
    pub is_private_email: bool,
    /// When it happened, as Apple sends it (milliseconds since the epoch, per Apple's
    /// documentation).
    pub event_time: u64,
}

/// The fields of an event besides `type`.
#[derive(Deserialize)]
struct EventFields {
    sub: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default, deserialize_with = "bool_or_string")]
    is_private_email: bool,
    event_time: u64,
}

/// A server-to-server notification, read from the claims of its verified JWT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppleNotification {
    /// The JWT's `jti`, when it has one.
    pub jti: Option<String>,
    /// The JWT's `exp`, in seconds since the epoch, when it has one (a verified
    /// notification always does): how long its key must be remembered.
    pub expires_at: Option<u64>,
    /// The event.
    pub event: AppleEvent,
}

impl AppleNotification {
    /// Reads the claims of a verified notification JWT (the `payload` of the request;
    /// see [`notification_payload`]).
    ///
    /// `events` must be a string of at most [`MAX_EVENTS_LEN`] bytes holding a JSON
    /// object with a known `type` ([`AppleError::UnknownEvent`] otherwise), a non-empty
    /// `sub` and an integer `event_time`; `email` and `is_private_email` are optional. A
    /// `jti`, when present, must be a non-empty string of at most 256 bytes. Every other
    /// shape is [`AppleError::NotificationMalformed`] or
    /// [`AppleError::NotificationTooLarge`]; nothing panics.
    pub fn from_claims(claims: &Map<String, Value>) -> Result<Self, AppleError> {
        let jti = match claims.get("jti") {
            None | Some(Value::Null) => None,
            Some(Value::String(jti)) if !jti.is_empty() && jti.len() <= MAX_JTI_LEN => {
                Some(jti.clone())
            }
            Some(_) => return Err(malformed("jti is not a short string", None)),
        };
        let events = match claims.get("events") {
            Some(Value::String(events)) => events,
            None | Some(Value::Null) => return Err(malformed("no events claim", None)),
            Some(_) => return Err(malformed("events is not a string", None)),
        };
        if events.len() > MAX_EVENTS_LEN {
            return Err(AppleError::NotificationTooLarge);
        }
        let event: Map<String, Value> = serde_json::from_str(events)
            .map_err(|e| malformed("events is not a JSON object", Some(e)))?;
        let kind = match event.get("type") {
            Some(Value::String(name)) => {
                AppleEventKind::from_apple(name).ok_or_else(|| AppleError::UnknownEvent {
                    kind: truncated(name, MAX_REPORTED_KIND_LEN).to_owned(),
                })?
            }
            None => return Err(malformed("the event has no type", None)),
            Some(_) => return Err(malformed("the event type is not a string", None)),
        };
        let fields = EventFields::deserialize(&event)
            .map_err(|e| malformed("the event's fields are invalid", Some(e)))?;
        if fields.sub.is_empty() {
            return Err(malformed("the event's sub is empty", None));
        }
        let expires_at = claims.get("exp").and_then(Value::as_u64);
        Ok(Self {
            jti,
            expires_at,
            event: AppleEvent {
                kind,
                sub: fields.sub,
                email: fields.email,
                is_private_email: fields.is_private_email,
                event_time: fields.event_time,
            },
        })
    }

    /// A key to process this notification once: `apple:jti:<jti>` when the JWT has a
    /// `jti`, else `apple:event:` and the hex SHA-256 of the type, `event_time` and
    /// `sub` (so a resent event without `jti` has the same key).
    pub fn idempotency_key(&self) -> String {
        match &self.jti {
            Some(jti) => format!("apple:jti:{jti}"),
            None => {
                // Type and time hold no newline, so the encoding is unambiguous.
                let mut hash = Sha256::new();
                hash.update(self.event.kind.as_str());
                hash.update(b"\n");
                hash.update(self.event.event_time.to_string());
                hash.update(b"\n");
                hash.update(&self.event.sub);
                format!("apple:event:{}", lower_hex(&hash.finalize()))
            }
        }
    }
}

/// The notification JWT in the body Apple posts, `{"payload": "<JWT>"}`, of at most
/// [`MAX_NOTIFICATION_BODY_LEN`] bytes. Verify it before reading its claims.
pub fn notification_payload(body: &[u8]) -> Result<String, AppleError> {
    #[derive(Deserialize)]
    struct Body {
        payload: String,
    }
    if body.len() > MAX_NOTIFICATION_BODY_LEN {
        return Err(AppleError::NotificationTooLarge);
    }
    let body: Body = serde_json::from_slice(body)
        .map_err(|e| malformed("the body is not {\"payload\": \"<JWT>\"}", Some(e)))?;
    if body.payload.is_empty() {
        return Err(malformed("the payload is empty", None));
    }
    Ok(body.payload)
}

fn malformed(reason: &'static str, source: Option<serde_json::Error>) -> AppleError {
    AppleError::NotificationMalformed { reason, source }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests;
