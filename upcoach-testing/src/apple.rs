//! [`AppleStandIn`]: a loopback stand-in for the REST endpoints of Sign in with Apple —
//! the public keys (`GET /auth/keys`) and the token endpoint (`POST /auth/token`) —
//! answering with Apple's documented JSON shapes.
//!
//! The token endpoint authenticates the client the way Apple does: `client_secret` must
//! be an ES256 JWT signed with the team's key (header `kid` = the key id; claims `iss` =
//! the team id, `iat`, `exp` no more than [`MAX_CLIENT_SECRET_LIFETIME`] after `iat`
//! and in the future, `aud` = `https://appleid.apple.com`, `sub` = the request's
//! `client_id`). The stand-in verifies it with the team's *public* key and answers
//! `invalid_client` otherwise, counting each such answer
//! ([`client_secret_failures`](AppleStandIn::client_secret_failures)), so a test can
//! prove the client under test made a correct secret.
//!
//! Identity tokens and server-to-server notifications are RS256 JWTs signed with "Apple's"
//! key, whose public half `/auth/keys` serves under [`APPLE_KEY_ID`]. Every answer is
//! `application/json`; nothing a client sends makes it panic.
//!
//! All keys here are test-only (see [`TEST_TEAM_PRIVATE_KEY`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use upcoach_testing::apple::{
//!     AppleStandIn, AppleUser, TEST_KEY_ID, TEST_TEAM_ID, TEST_TEAM_PUBLIC_KEY,
//!     test_client_secret,
//! };
//!
//! let apple = AppleStandIn::start(TEST_TEAM_ID, TEST_KEY_ID, TEST_TEAM_PUBLIC_KEY).await;
//! let user = AppleUser::new("001234.abcdef.0042", "ada@example.com");
//! let code = apple.issue_code(&user, "com.example.web", Some("https://app.example/cb"), None);
//! let secret = test_client_secret("com.example.web");
//! // ... point the provider at `apple.token_url()` / `apple.keys_url()`, issuer
//! // `apple.issuer()`, and sign in with `code` ...
//! # let _ = (code, secret);
//! assert_eq!(apple.token_calls(), 0);
//! # }
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderMap, HeaderValue, PRAGMA};
use hyper::{Method, Request, StatusCode};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::serve::{Answer, accept_loop, json_answer};
use tokio::task::JoinHandle;

/// Apple's issuer, the default `iss` of what the stand-in signs and the `aud` a client
/// secret must name.
pub const APPLE_ISSUER: &str = "https://appleid.apple.com";
/// The `kid` of the stand-in's RS256 signing key (in `/auth/keys` and in the header of
/// every token it signs, including [`sign_with_foreign_key`](AppleStandIn::sign_with_foreign_key)'s).
pub const APPLE_KEY_ID: &str = "UPCtestRS1";
/// The longest a client secret may live, `exp - iat` in seconds (Apple's six months).
pub const MAX_CLIENT_SECRET_LIFETIME: u64 = 15_777_000;
/// How far in the future a client secret's `iat` may lie (clock skew), in seconds.
pub const CLIENT_SECRET_LEEWAY: u64 = 60;
/// How long an authorization code from [`AppleStandIn::issue_code`] is valid, in seconds.
pub const CODE_LIFETIME: u64 = 300;
/// `exp - iat` of an identity token, in seconds.
pub const ID_TOKEN_LIFETIME: u64 = 600;
/// `exp - iat` of a notification from [`AppleStandIn::notification`], in seconds.
pub const NOTIFICATION_LIFETIME: u64 = 300;
/// `expires_in` of an access token from the token endpoint, in seconds.
pub const ACCESS_TOKEN_EXPIRES_IN: u64 = 3600;
/// Most authorization codes one stand-in issues.
pub const MAX_CODES: usize = 10_000;
/// Most refresh tokens one stand-in issues (one per successful code exchange).
pub const MAX_TOKENS: usize = 10_000;

/// The team id to start the stand-in with alongside [`TEST_TEAM_PRIVATE_KEY`].
pub const TEST_TEAM_ID: &str = "UPC0TEAM01";
/// The key id of [`TEST_TEAM_PRIVATE_KEY`].
pub const TEST_KEY_ID: &str = "UPC0KEY001";

/// A team key (the `.p8` file Apple hands out): a P-256 key, PKCS#8 PEM.
///
/// TEST-ONLY, published here, never to be used for anything real. Made once with
/// `openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt`.
pub const TEST_TEAM_PRIVATE_KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgHYtQe+I0LJmbgkBi\n\
n288f1BYi1g02rUfreLRZBzk57KhRANCAARC/vfpM0agmavkXKDaW5QUBuWv4nMp\n\
J5ULIw046C3aLgzFs8g99XzO64fN3r3oSxXMmy3gK7vmqdEWxyMh6L9n\n\
-----END PRIVATE KEY-----";

/// The public half of [`TEST_TEAM_PRIVATE_KEY`], SPKI PEM (`openssl pkey -pubout`).
pub const TEST_TEAM_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----\n\
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEQv736TNGoJmr5Fyg2luUFAblr+Jz\n\
KSeVCyMNOOgt2i4MxbPIPfV8zuuHzd696EsVzJst4Cu75qnRFscjIei/Zw==\n\
-----END PUBLIC KEY-----";

/// "Apple's" identity-token signing key: RSA 2048, PKCS#1 PEM. TEST-ONLY; made once with
/// `openssl genrsa -traditional 2048`.
const APPLE_SIGNING_KEY: &str = "-----BEGIN RSA PRIVATE KEY-----\n\
MIIEowIBAAKCAQEArbWnTC+Crvp9Fz+gx+pYqF/+dq+d+EotsRF0DKS1hQMTRf6w\n\
kUuo5WmESvTpHp2u3x/Do7kZGMc5wraWkBkzuokCguwTZAtzeVsSxK35dQ3tlZlb\n\
6JD8UiYoA98D6U/KfFiiK1RLjvX31fuv3gIK1frARCut0WPhbSGBk/68pqEAYInQ\n\
IQlygxY3CNBicpPBIgcUca7T+sAOUL/1XR+JyZ7V8VM7PFaQfzNMFJTORX8LFnD2\n\
ZUQoUJEZjJFpy8WL6VzwCLyO59KIl/ai6VblskWsUB6o1gG/xWo1D/pEN+p5KXKa\n\
St2adlBcsPteafQZg4Jary8t42GmUSHWa6KdMwIDAQABAoIBAB9NluJRxXkGxrgD\n\
zVN5VZSyB8cXip4NsAIypPkKTXO0xCpe5S6ptbvxsddYHxJXVAX9UWIVnwIqFKyT\n\
/rnk8L9ypTM2m5/xuFNsKAutVkDTy7ajtj5Isk+TdK6N58SJjnGt/ztTq3INvSWg\n\
f2bAc3dwAmnGfUI4f40M9q7WvuQ/3zErk1tCtmBpxTzNCXZV0yBM7K0zv8RELPPh\n\
Hvh9zsEYYJ8UFNX8wasaE4lfEpiQ7WCUs/6Yl4dNXJKAtMkWiFItOxUllCpHWc4Z\n\
NmaHs8xFFFva7V4n3oWK2Ddr8WeceY2DF5y4VMH3mqxRgrVH57Fnc6ZaexJkPVgZ\n\
7iFg4RECgYEA1YvIWLmiFlGFtNdzxBuV93jgb7d9OF9U2sS/mlzZgDUgbaqOuAo7\n\
u1Zln08Sex4CWgdrM2rBtX0lHAGHq+zpnD9FW0mkd2ge89hF927TheXrDB+U00s6\n\
g1GJvjPy0YQN7V/Y5sR71R6dJAgU7sKczIZWUZWyB0FhqAKw3DNALc8CgYEA0D5v\n\
FYmxziT9KLMclI49GEzwFYeBOfnBnvmCe6eDT8rgm7R6pAM0opzdfCQt1JIwemau\n\
QztwlZjrUjby3d6dIWAC6uyZu4G0ywnukTZRCL7wWotV08jVRJKKiy+ydUUj7GDj\n\
gdiq1QeplUN+R58iTVnK8fQHapdvzoYfVqn9t10CgYEAu0Ku149BogyvEVx1+hyu\n\
r6riNVVUi6CdipJJ6xVM7e6ol0KfkKf4pVkoGEGA1VIFgelLinUtlPc/GYYF8S/5\n\
07hwG5NClCtMKU0YXdhjyOFL8v+mxHsNvqY8Af0QC8afZ+9LB2J5rPQBnN0xbgZe\n\
9cM/4p9A1Lfy6SAi85ZFy2UCgYA6/YSwQDpLIDVKwzpUZtqtuJXGM4WK69JKe3nY\n\
F4LeJqVr1jtrnLDbY75mPUVyUxtCgTXaO8tPxWrb9k7kRPyUCMOq0u1VrY+OeLjJ\n\
D+7yoEwsCg59GQY5D54JgbB3AegEPQoVrU/vWuVSMDVkipLIAKi505wKOO3mPh5A\n\
iZUizQKBgDr1nLUW9iuMfPtgCMq6CFMuXvKK1xuV6KFjv1OQ1OMwk7qoFzCLID0g\n\
u4O/Wwqz182JkJKtGcDJI1vXlXMXmL5+8k9NrVPGGsUDCBENbQ+7x8gozQubjxrB\n\
KSDPJ+mosi/zCKaoLkqh5CcZbZsRsE05qbrnCDHCgLoRqnlzrvKi\n\
-----END RSA PRIVATE KEY-----";

/// Another RSA 2048 key (PKCS#1 PEM) for [`AppleStandIn::sign_with_foreign_key`].
/// TEST-ONLY; made once with `openssl genrsa -traditional 2048`.
const FOREIGN_SIGNING_KEY: &str = "-----BEGIN RSA PRIVATE KEY-----\n\
MIIEpAIBAAKCAQEA+euG+KnufsB1ShlGp9lPhJSeFP1bKTIl1GFGzedDjIhL7JPB\n\
GeXTvsy27tMzImqr3BwmAMxABLKnhWPLL8/ovzJvOqXAbb+PmUxcrhr0/bOzFOAQ\n\
5HwtuBoNRxAz9GSFNdcf0OO8Ab4oy1WsMS135X1GttPPr2kBt8uN8wPfH6XDxhpy\n\
bdNRl6hx1e1Tzg6bfoawhx5CNZdWZW8n6wIN/445R712rFM5g8IhXquEIoKzcLcb\n\
rl6eyUCYGkUqte+lyt1nb4b6QWCYn//Qb7RlHqVMCj7a3H6vA3EdB+ry5J9rOVZx\n\
qQkxght7B/Ze0QbnpzKUrYWfecaMJbqqZ/t4xQIDAQABAoIBAASGwjdqIp8rJAwm\n\
FaVIiKnKjuMR1V8kZ0W68jwLUkO1bS0AoptUK6bWtTSLIMT+o8veusas20gagBwo\n\
uvn/E0r54Cr7MIqF6qH9+0zwFmJNQsp/9zOw/UYO5aq7dSkrBU2v9x9AlGRMFsKX\n\
OBJDz8lVByfPrFZPmdyqFkz5KRPfMJT6Y50k9WJnWCFqlrkwDkEZH0YMOjDPS40l\n\
XuQrUZNgX84QuWs8614J2IfNhxwoic2JWmq00ohj29iVx6y7Tc8k+PjWhc1vncPs\n\
bVggcMWCvOn/xKaw4TQrdowgsRUpZQTUqnm2tNoqRHzRZqar620teZ9DPJBi8LWk\n\
w7rKNlsCgYEA/dYXQ3MxIS4PlDVC9z3i6+KTb4QIvtXzbxqSaZOAGkhQGlS9rqJW\n\
GAK0jDfkr4KF4YEYGKPtqFWV4oYQoBWYo18BuzBLOlVgIH3lEJFLqm4opxPCjDiA\n\
KXQcSSonHWbaYgLW4cCOOC6moSn4FvsKgygol1PIuUASdsYyY0Pfh3MCgYEA/Azj\n\
9mvvG3bRroZ6b+DftW2SE5cLbPbNpShI4e1K1lAji+SV8DS8EyCsANIaqw2GrmQR\n\
GZ3MAWJHKsg2pGlVMGDriwQrClxLAazsGTu04KirkfJVhJGBEHHGy1AofquViLNZ\n\
Xy8lmGDwaiv6GJKmq0ZCKKvyso8S/v8nA40GwOcCgYEAyJWBVJ+WVy3aybc877tL\n\
sjMdZqXjc0oGT+mjgSI5vIsgIW6NZY6KkfaxTYxtffOacBRfQjln9/mJs7NVN+tY\n\
7uCIsa78A2Cr0YEqnejy7f6WyVBoD/4l6JwELhzNRAKe14x+2W4b9HGI4xoTHbXL\n\
HNGDIfHnT9w9uvXro11jKdkCgYEAlUaVJHacMCnY2YIvtV77Xxo7r3p/e9NXy/7l\n\
21iMQA1KYCnLW24ADVwGQp4syS3DnDkLn55DGna4K3BUXF894t8j4Ttgukwa6C0f\n\
z3n7ECsVIeTiHReH1tNrpzIcKZk5gLKntaXYoDyZZmgRQMhqCXoc6LWdkX8HAxre\n\
Yk39t/UCgYBbI2xLglPMwCneKclPX6/hitjKsuRSTGSK5pEnPD9nhQMO0CFiltTH\n\
V8YTsvjqtWPd1v1JK0ukxQXBLVCaHMaPRrO6R357iM26kGBkZQs/0es5P4VBpBt7\n\
9OqekJEREDnaPd9FTo+H9VP8dZWRELBcshZh5bBMQ8u84GvGm6G0FQ==\n\
-----END RSA PRIVATE KEY-----";

/// The DER prefix of a P-256 SubjectPublicKeyInfo holding an uncompressed point: the
/// `id-ecPublicKey` and `prime256v1` OIDs and the BIT STRING header.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A larger `/auth/token` body is refused (`invalid_request`).
const MAX_BODY_BYTES: usize = 16 * 1024;
/// How long a `/auth/token` body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const FORM: &str = "application/x-www-form-urlencoded";

/// A Sign in with Apple user as the stand-in knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppleUser {
    /// The team-scoped user id (`sub`).
    pub sub: String,
    /// The e-mail address (a `@privaterelay.appleid.com` one when hidden); when `None`
    /// the identity token has no `email`, `email_verified` or `is_private_email`.
    pub email: Option<String>,
    /// `email_verified`.
    pub email_verified: bool,
    /// `is_private_email`.
    pub is_private_email: bool,
    /// `real_user_status` (0 unsupported, 1 unknown, 2 likely real); left out when `None`.
    pub real_user_status: Option<u8>,
    /// Send `email_verified` and `is_private_email` as the strings `"true"`/`"false"`
    /// instead of JSON booleans, as Apple sometimes does.
    pub claims_as_strings: bool,
}

impl AppleUser {
    /// A user with a verified, not private, `email`, `real_user_status` 2 (likely real)
    /// and boolean claims.
    pub fn new(sub: &str, email: &str) -> Self {
        Self {
            sub: sub.to_owned(),
            email: Some(email.to_owned()),
            email_verified: true,
            is_private_email: false,
            real_user_status: Some(2),
            claims_as_strings: false,
        }
    }
}

/// `claims` signed ES256 with the P-256 key `private_key_pem` (PKCS#8 PEM, a `.p8`
/// file), the header naming `key_id` as `kid` (and no `typ`, as Apple documents): a
/// client secret when the claims are those of one.
///
/// # Panics
///
/// When `private_key_pem` is not a PKCS#8 PEM P-256 private key.
pub fn sign_es256(private_key_pem: &str, key_id: &str, claims: &Value) -> String {
    let der = pem_der(private_key_pem, "PRIVATE KEY")
        .expect("a PKCS#8 PEM (-----BEGIN PRIVATE KEY-----)");
    let mut header = Header::new(Algorithm::ES256);
    header.typ = None;
    header.kid = Some(key_id.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&der))
        .unwrap_or_else(|e| panic!("cannot sign with the given P-256 key: {e}"))
}

/// A correct client secret for `client_id` made with the test team key
/// ([`TEST_TEAM_ID`], [`TEST_KEY_ID`], [`TEST_TEAM_PRIVATE_KEY`]), valid for an hour
/// from now.
pub fn test_client_secret(client_id: &str) -> String {
    let iat = now();
    sign_es256(
        TEST_TEAM_PRIVATE_KEY,
        TEST_KEY_ID,
        &json!({
            "iss": TEST_TEAM_ID,
            "iat": iat,
            "exp": iat + 3600,
            "aud": APPLE_ISSUER,
            "sub": client_id,
        }),
    )
}

/// A Sign in with Apple stand-in on `127.0.0.1:<random port>`; stops when dropped.
///
/// Answers:
///
/// - `GET /auth/keys`: `{"keys":[{"kty":"RSA","kid":APPLE_KEY_ID,"use":"sig",
///   "alg":"RS256","n","e":"AQAB"}]}`.
/// - `POST /auth/token`, an `application/x-www-form-urlencoded` body with `client_id`,
///   `client_secret` (in the body: HTTP Basic is not read), `grant_type` and
///   - `authorization_code`: `code` (and `redirect_uri`, which must equal the one the
///     code was issued with; for a code issued without one it is not looked at) →
///     `{"access_token","token_type":"Bearer","expires_in":3600,"refresh_token",
///     "id_token"}`;
///   - `refresh_token`: `refresh_token` → the same without `refresh_token`.
///
///   Errors are 400 `{"error": ...}`, checked in this order: `invalid_request` (a body
///   that is not a form, too large, a repeated parameter, a missing `client_id`,
///   `grant_type`, `code` or `refresh_token`), `unsupported_grant_type`,
///   `invalid_client` (missing or wrong client secret, counted), `invalid_grant`
///   (unknown, used or expired code; code or refresh token of another client id;
///   `redirect_uri` mismatch). A code is consumed by its first presentation from an
///   authenticated client, whatever the outcome; a client that fails authentication
///   does not consume it.
///
/// Another method gets 405, another path 404, both with a JSON `error`.
#[derive(Debug)]
pub struct AppleStandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    team_id: String,
    key_id: String,
    team_key: DecodingKey,
    issuer: String,
    apple_key: EncodingKey,
    foreign_key: EncodingKey,
    /// The `/auth/keys` document.
    jwks: Value,
    books: Mutex<Books>,
    token_calls: AtomicUsize,
    key_calls: AtomicUsize,
    client_secret_failures: AtomicUsize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are left out.
        f.debug_struct("Shared")
            .field("team_id", &self.team_id)
            .field("key_id", &self.key_id)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Books {
    codes: HashMap<String, CodeGrant>,
    used_codes: HashSet<String>,
    refresh_tokens: HashMap<String, RefreshGrant>,
}

struct CodeGrant {
    user: AppleUser,
    client_id: String,
    redirect_uri: Option<String>,
    nonce: Option<String>,
    /// When the user signed in (`auth_time`), seconds since the epoch.
    issued_at: u64,
    expires_at: u64,
}

struct RefreshGrant {
    user: AppleUser,
    client_id: String,
    auth_time: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// The DER between `-----BEGIN {label}-----` and `-----END {label}-----`.
fn pem_der(pem: &str, label: &str) -> Option<Vec<u8>> {
    let body = pem
        .trim()
        .strip_prefix(&format!("-----BEGIN {label}-----"))?
        .strip_suffix(&format!("-----END {label}-----"))?;
    let base64: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD.decode(base64).ok()
}

/// The RS256 key in a PKCS#1 PEM of this file.
fn rsa_key(pem: &str) -> EncodingKey {
    let der = pem_der(pem, "RSA PRIVATE KEY").expect("the embedded RSA keys are PKCS#1 PEM");
    EncodingKey::from_rsa_der(&der)
}

/// `true`/`false`, or `"true"`/`"false"` when `as_string`.
fn flag(value: bool, as_string: bool) -> Value {
    if as_string {
        json!(value.to_string())
    } else {
        json!(value)
    }
}

/// `at_hash`: base64url of the left half of SHA-256 of the access token.
fn at_hash(access_token: &str) -> String {
    let digest = Sha256::digest(access_token.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest[..16])
}

/// An opaque token: `prefix`, 64 hex digits and Apple's `.0.` style suffix.
fn opaque(prefix: &str) -> String {
    format!(
        "{prefix}{}{}.0.upct.{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl AppleStandIn {
    /// Starts a stand-in on `127.0.0.1:0` whose client secrets must name `team_id` (as
    /// `iss`) and `key_id` (as `kid`) and verify with `team_public_key_pem`, the SPKI PEM
    /// (`-----BEGIN PUBLIC KEY-----`) of the team's P-256 key. What it signs has the
    /// issuer [`APPLE_ISSUER`].
    ///
    /// # Panics
    ///
    /// When `team_public_key_pem` is not the SPKI PEM of a P-256 key, or the loopback
    /// port cannot be bound.
    pub async fn start(team_id: &str, key_id: &str, team_public_key_pem: &str) -> Self {
        Self::start_with_issuer(team_id, key_id, team_public_key_pem, APPLE_ISSUER).await
    }

    /// [`start`](Self::start), but what the stand-in signs has the issuer `issuer`.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub async fn start_with_issuer(
        team_id: &str,
        key_id: &str,
        team_public_key_pem: &str,
        issuer: &str,
    ) -> Self {
        let spki = pem_der(team_public_key_pem, "PUBLIC KEY")
            .expect("the team public key is an SPKI PEM (-----BEGIN PUBLIC KEY-----)");
        let point = spki
            .strip_prefix(P256_SPKI_PREFIX.as_slice())
            .filter(|point| point.len() == 65 && point[0] == 0x04)
            .expect("the team public key is an uncompressed P-256 key");
        let apple_key = rsa_key(APPLE_SIGNING_KEY);
        let jwk = Jwk::from_encoding_key(&apple_key, Algorithm::RS256)
            .expect("the public half of the embedded RSA key");
        let AlgorithmParameters::RSA(rsa) = jwk.algorithm else {
            unreachable!("an RSA key gives RSA parameters");
        };
        let jwks = json!({ "keys": [{
            "kty": "RSA",
            "kid": APPLE_KEY_ID,
            "use": "sig",
            "alg": "RS256",
            "n": rsa.n,
            "e": rsa.e,
        }]});
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Apple stand-in on loopback");
        let addr = listener.local_addr().expect("stand-in address");
        let shared = Arc::new(Shared {
            team_id: team_id.to_owned(),
            key_id: key_id.to_owned(),
            team_key: DecodingKey::from_ec_der(point),
            issuer: issuer.to_owned(),
            apple_key,
            foreign_key: rsa_key(FOREIGN_SIGNING_KEY),
            jwks,
            books: Mutex::new(Books::default()),
            token_calls: AtomicUsize::new(0),
            key_calls: AtomicUsize::new(0),
            client_secret_failures: AtomicUsize::new(0),
        });
        let served = shared.clone();
        let accept = tokio::spawn(accept_loop(listener, move |request| {
            let shared = served.clone();
            async move { shared.answer(request).await }
        }));
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// [`base_url`](Self::base_url)`/auth/token`.
    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.base_url())
    }

    /// [`base_url`](Self::base_url)`/auth/keys`.
    pub fn keys_url(&self) -> String {
        format!("{}/auth/keys", self.base_url())
    }

    /// [`base_url`](Self::base_url)`/auth/authorize`, for a provider's configuration: the
    /// stand-in does not serve it (tests drive the browser part themselves, with
    /// [`issue_code`](Self::issue_code)).
    pub fn authorize_url(&self) -> String {
        format!("{}/auth/authorize", self.base_url())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `iss` of what it signs ([`APPLE_ISSUER`] unless started
    /// [with another](Self::start_with_issuer)).
    pub fn issuer(&self) -> &str {
        &self.shared.issuer
    }

    /// The team id client secrets must name.
    pub fn team_id(&self) -> &str {
        &self.shared.team_id
    }

    /// The key id client secrets must name.
    pub fn key_id(&self) -> &str {
        &self.shared.key_id
    }

    /// The variables that point upcoach's Sign in with Apple at this stand-in, for the
    /// Services ID `web_client` (`APPLE_WEB_CLIENT_ID`) and the app's bundle id
    /// `app_client` (`APPLE_MOBILE_CLIENT_ID`): the test team key ([`TEST_TEAM_ID`],
    /// [`TEST_KEY_ID`], [`TEST_TEAM_PRIVATE_KEY`]), so a stand-in started with those and
    /// [`TEST_TEAM_PUBLIC_KEY`] accepts the client secrets, and its URLs and issuer.
    pub fn env(&self, web_client: &str, app_client: &str) -> Vec<(&'static str, String)> {
        vec![
            ("APPLE_WEB_CLIENT_ID", web_client.to_owned()),
            ("APPLE_MOBILE_CLIENT_ID", app_client.to_owned()),
            ("APPLE_TEAM_ID", TEST_TEAM_ID.to_owned()),
            ("APPLE_KEY_ID", TEST_KEY_ID.to_owned()),
            ("APPLE_PRIVATE_KEY", TEST_TEAM_PRIVATE_KEY.to_owned()),
            ("APPLE_AUTH_URL", self.authorize_url()),
            ("APPLE_TOKEN_URL", self.token_url()),
            ("APPLE_KEYS_URL", self.keys_url()),
            ("APPLE_ISSUER", self.issuer().to_owned()),
        ]
    }

    /// The `/auth/keys` document.
    pub fn jwks(&self) -> Value {
        self.shared.jwks.clone()
    }

    /// A one-time authorization code for `user` signing in to `client_id`, valid for
    /// [`CODE_LIFETIME`]; `redirect_uri` for a web sign-in (the exchange must then carry
    /// the same one), `None` for a native one. The identity token it is exchanged for
    /// carries `nonce` when given.
    ///
    /// # Panics
    ///
    /// Past [`MAX_CODES`] codes.
    pub fn issue_code(
        &self,
        user: &AppleUser,
        client_id: &str,
        redirect_uri: Option<&str>,
        nonce: Option<&str>,
    ) -> String {
        let mut books = self.shared.books();
        assert!(
            books.codes.len() + books.used_codes.len() < MAX_CODES,
            "the Apple stand-in issues at most {MAX_CODES} codes"
        );
        let code = opaque("c");
        let issued_at = now();
        books.codes.insert(
            code.clone(),
            CodeGrant {
                user: user.clone(),
                client_id: client_id.to_owned(),
                redirect_uri: redirect_uri.map(str::to_owned),
                nonce: nonce.map(str::to_owned),
                issued_at,
                expires_at: issued_at + CODE_LIFETIME,
            },
        );
        code
    }

    /// Makes an outstanding `code` expired, as if [`CODE_LIFETIME`] had passed: its
    /// exchange is then `invalid_grant`. An unknown or used code is ignored.
    pub fn expire_code(&self, code: &str) {
        if let Some(grant) = self.shared.books().codes.get_mut(code) {
            grant.expires_at = 0;
        }
    }

    /// An identity token for `user` and `client_id` issued now, as a native sign-in
    /// hands the app: RS256 with [`APPLE_KEY_ID`], `iss` = [`issuer`](Self::issuer),
    /// `aud` = `client_id`, `exp` = `iat` + [`ID_TOKEN_LIFETIME`], `nonce` when given.
    pub fn id_token(&self, user: &AppleUser, client_id: &str, nonce: Option<&str>) -> String {
        let iat = now();
        self.sign(
            self.shared
                .id_token_claims(user, client_id, nonce, iat, iat, None),
        )
    }

    /// A server-to-server notification for `client_id`: `iss`, `aud` = `client_id`,
    /// `iat`, `exp` = `iat` + [`NOTIFICATION_LIFETIME`], a fresh `jti` and `events` =
    /// `event.to_string()` (a JSON *string*, as Apple sends it; an `event` that is
    /// already a JSON string is used as it is). Apple posts it as `{"payload": <this>}`.
    pub fn notification(&self, client_id: &str, event: Value) -> String {
        let iat = now();
        let events = match event {
            Value::String(raw) => raw,
            other => other.to_string(),
        };
        self.sign(json!({
            "iss": self.shared.issuer,
            "aud": client_id,
            "iat": iat,
            "exp": iat + NOTIFICATION_LIFETIME,
            "jti": uuid::Uuid::new_v4().simple().to_string(),
            "events": events,
        }))
    }

    /// Any `claims` signed RS256 with the stand-in's key and [`APPLE_KEY_ID`] (no `typ`,
    /// as Apple's header), for tokens a test shapes itself (wrong `aud`, expired, ...).
    pub fn sign(&self, claims: Value) -> String {
        sign_rs256(&self.shared.apple_key, &claims)
    }

    /// `claims` signed RS256 with another RSA key under the same [`APPLE_KEY_ID`]: its
    /// signature does not verify with `/auth/keys`.
    pub fn sign_with_foreign_key(&self, claims: Value) -> String {
        sign_rs256(&self.shared.foreign_key, &claims)
    }

    /// Requests received on `/auth/token`, whatever their answer.
    pub fn token_calls(&self) -> usize {
        self.shared.token_calls.load(Ordering::SeqCst)
    }

    /// Requests received on `/auth/keys`, whatever their answer.
    pub fn key_calls(&self) -> usize {
        self.shared.key_calls.load(Ordering::SeqCst)
    }

    /// `/auth/token` calls answered `invalid_client`: a missing, malformed, wrongly
    /// signed or wrongly claimed client secret.
    pub fn client_secret_failures(&self) -> usize {
        self.shared.client_secret_failures.load(Ordering::SeqCst)
    }

    /// Stops the server and waits until it no longer accepts connections.
    pub async fn shutdown(mut self) {
        self.accept.abort();
        let _ = (&mut self.accept).await;
    }
}

impl Drop for AppleStandIn {
    fn drop(&mut self) {
        // The accept task owns every connection's task: aborting it ends them all.
        self.accept.abort();
    }
}

fn sign_rs256(key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.typ = None;
    header.kid = Some(APPLE_KEY_ID.to_owned());
    jsonwebtoken::encode(&header, claims, key).expect("the embedded RSA keys sign")
}

/// A token endpoint answer: not to be cached, as RFC 6749 has it.
fn token_answer(status: StatusCode, body: &Value) -> Answer {
    let mut answer = json_answer(status, body);
    let headers = answer.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    answer
}

/// 400 `{"error": error}`.
fn oauth_error(error: &str) -> Answer {
    token_answer(StatusCode::BAD_REQUEST, &json!({ "error": error }))
}

fn method_not_allowed(allow: &'static str) -> Answer {
    let mut answer = json_answer(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({ "error": "method_not_allowed" }),
    );
    answer
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    answer
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(FORM))
}

/// A form's parameters; a repeated one is refused.
fn parse_form(body: &[u8]) -> Option<HashMap<String, String>> {
    let mut params = HashMap::new();
    for (key, value) in url::form_urlencoded::parse(body) {
        if params
            .insert(key.into_owned(), value.into_owned())
            .is_some()
        {
            return None;
        }
    }
    Some(params)
}

/// A parameter, `None` when absent or empty.
fn param<'f>(form: &'f HashMap<String, String>, name: &str) -> Option<&'f str> {
    form.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// A NumericDate claim as whole seconds; `None` when absent, negative or not a number.
fn seconds(claims: &Map<String, Value>, name: &str) -> Option<u64> {
    let value = claims.get(name)?;
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|v| v.is_finite() && *v >= 0.0 && *v < u64::MAX as f64)
            .map(|v| v as u64)
    })
}

impl Shared {
    /// The books, even after a panic elsewhere poisoned the lock.
    fn books(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn id_token_claims(
        &self,
        user: &AppleUser,
        client_id: &str,
        nonce: Option<&str>,
        iat: u64,
        auth_time: u64,
        access_token: Option<&str>,
    ) -> Value {
        let mut claims = json!({
            "iss": self.issuer,
            "aud": client_id,
            "exp": iat + ID_TOKEN_LIFETIME,
            "iat": iat,
            "sub": user.sub,
        });
        if let Some(access_token) = access_token {
            claims["at_hash"] = json!(at_hash(access_token));
        }
        if let Some(email) = &user.email {
            claims["email"] = json!(email);
            claims["email_verified"] = flag(user.email_verified, user.claims_as_strings);
            claims["is_private_email"] = flag(user.is_private_email, user.claims_as_strings);
        }
        claims["auth_time"] = json!(auth_time);
        claims["nonce_supported"] = json!(true);
        if let Some(nonce) = nonce {
            claims["nonce"] = json!(nonce);
        }
        if let Some(status) = user.real_user_status {
            claims["real_user_status"] = json!(status);
        }
        claims
    }

    async fn answer(&self, request: Request<Incoming>) -> Answer {
        match request.uri().path() {
            "/auth/keys" => {
                self.key_calls.fetch_add(1, Ordering::SeqCst);
                if request.method() != Method::GET {
                    return method_not_allowed("GET");
                }
                json_answer(StatusCode::OK, &self.jwks)
            }
            "/auth/token" => {
                self.token_calls.fetch_add(1, Ordering::SeqCst);
                if request.method() != Method::POST {
                    return method_not_allowed("POST");
                }
                if !is_form(request.headers()) {
                    return oauth_error("invalid_request");
                }
                let body = Limited::new(request.into_body(), MAX_BODY_BYTES).collect();
                match tokio::time::timeout(BODY_TIMEOUT, body).await {
                    Ok(Ok(body)) => self.token(&body.to_bytes()),
                    // Too large, cut off or too slow.
                    _ => oauth_error("invalid_request"),
                }
            }
            _ => json_answer(StatusCode::NOT_FOUND, &json!({ "error": "not_found" })),
        }
    }

    /// `/auth/token` with its form body.
    fn token(&self, body: &[u8]) -> Answer {
        let Some(form) = parse_form(body) else {
            return oauth_error("invalid_request");
        };
        let (Some(client_id), Some(grant_type)) =
            (param(&form, "client_id"), param(&form, "grant_type"))
        else {
            return oauth_error("invalid_request");
        };
        let grant = match grant_type {
            "authorization_code" => param(&form, "code"),
            "refresh_token" => param(&form, "refresh_token"),
            _ => return oauth_error("unsupported_grant_type"),
        };
        let Some(grant) = grant else {
            return oauth_error("invalid_request");
        };
        if !self.client_secret_valid(param(&form, "client_secret"), client_id) {
            self.client_secret_failures.fetch_add(1, Ordering::SeqCst);
            return oauth_error("invalid_client");
        }
        if grant_type == "authorization_code" {
            self.exchange_code(
                client_id,
                grant,
                form.get("redirect_uri").map(String::as_str),
            )
        } else {
            self.refresh(client_id, grant)
        }
    }

    /// Whether `secret` is an ES256 JWT of the team key for `client_id`, valid now.
    fn client_secret_valid(&self, secret: Option<&str>, client_id: &str) -> bool {
        let Some(secret) = secret else {
            return false;
        };
        let mut validation = Validation::new(Algorithm::ES256);
        // Every claim is checked below, against the system clock, without leeway.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        let Ok(data) =
            jsonwebtoken::decode::<Map<String, Value>>(secret, &self.team_key, &validation)
        else {
            return false;
        };
        if data.header.alg != Algorithm::ES256
            || data.header.kid.as_deref() != Some(self.key_id.as_str())
        {
            return false;
        }
        let claims = data.claims;
        let text = |name: &str| claims.get(name).and_then(Value::as_str);
        let (Some(iat), Some(exp)) = (seconds(&claims, "iat"), seconds(&claims, "exp")) else {
            return false;
        };
        let now = now();
        text("iss") == Some(self.team_id.as_str())
            && text("aud") == Some(APPLE_ISSUER)
            && text("sub") == Some(client_id)
            && iat <= now.saturating_add(CLIENT_SECRET_LEEWAY)
            && exp > now
            && exp > iat
            && exp - iat <= MAX_CLIENT_SECRET_LIFETIME
            && exp - now <= MAX_CLIENT_SECRET_LIFETIME
    }

    /// `grant_type=authorization_code` from an authenticated `client_id`.
    fn exchange_code(&self, client_id: &str, code: &str, redirect_uri: Option<&str>) -> Answer {
        let grant = {
            let mut books = self.books();
            // Consumed first, whatever comes next.
            let grant = books.codes.remove(code);
            if grant.is_some() {
                books.used_codes.insert(code.to_owned());
            }
            grant
        };
        let Some(grant) = grant else {
            // Unknown or used.
            return oauth_error("invalid_grant");
        };
        let redirect_ok = match &grant.redirect_uri {
            Some(expected) => redirect_uri == Some(expected.as_str()),
            None => true,
        };
        if grant.expires_at <= now() || grant.client_id != client_id || !redirect_ok {
            return oauth_error("invalid_grant");
        }
        let refresh_token = opaque("r");
        {
            let mut books = self.books();
            if books.refresh_tokens.len() >= MAX_TOKENS {
                return token_answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({ "error": "server_error" }),
                );
            }
            books.refresh_tokens.insert(
                refresh_token.clone(),
                RefreshGrant {
                    user: grant.user.clone(),
                    client_id: client_id.to_owned(),
                    auth_time: grant.issued_at,
                },
            );
        }
        let access_token = opaque("a");
        let id_token = sign_rs256(
            &self.apple_key,
            &self.id_token_claims(
                &grant.user,
                client_id,
                grant.nonce.as_deref(),
                now(),
                grant.issued_at,
                Some(&access_token),
            ),
        );
        token_answer(
            StatusCode::OK,
            &json!({
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": ACCESS_TOKEN_EXPIRES_IN,
                "refresh_token": refresh_token,
                "id_token": id_token,
            }),
        )
    }

    /// `grant_type=refresh_token` from an authenticated `client_id`.
    fn refresh(&self, client_id: &str, refresh_token: &str) -> Answer {
        let (user, auth_time) = {
            let books = self.books();
            match books.refresh_tokens.get(refresh_token) {
                Some(grant) if grant.client_id == client_id => {
                    (grant.user.clone(), grant.auth_time)
                }
                _ => return oauth_error("invalid_grant"),
            }
        };
        let access_token = opaque("a");
        let id_token = sign_rs256(
            &self.apple_key,
            &self.id_token_claims(
                &user,
                client_id,
                None,
                now(),
                auth_time,
                Some(&access_token),
            ),
        );
        token_answer(
            StatusCode::OK,
            &json!({
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": ACCESS_TOKEN_EXPIRES_IN,
                "id_token": id_token,
            }),
        )
    }
}
