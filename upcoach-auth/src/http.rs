//! The HTTP face of sign-in (feature `http`): the routes of API.md's Auth table as
//! framework-agnostic handlers over [`http::Request`], and each error's status.
//!
//! A host mounts [`AuthRoutes`] on its router; the handlers take the path's
//! `{provider}` already percent-decoded, read what they need from the request, and
//! answer `http::Response<Full<Bytes>>` (axum takes it as it is).
//!
//! | route | handler |
//! |---|---|
//! | `GET /auth/{provider}/authorize` | [`AuthRoutes::authorize`] |
//! | `GET` or `POST /auth/{provider}/callback` | [`AuthRoutes::callback`] |
//! | `POST /auth/{provider}/token` | [`AuthRoutes::token`] |
//! | `POST /auth/exchange` | [`AuthRoutes::exchange`] |
//! | `POST /auth/refresh` | [`AuthRoutes::refresh`] |
//! | `POST /auth/logout` | [`AuthRoutes::logout`] |
//! | `GET /auth/me` | [`AuthRoutes::me`] |
//! | `POST` or `DELETE /auth/link/{provider}` | [`AuthRoutes::link`], [`AuthRoutes::unlink`] |
//! | `GET /.well-known/jwks.json` | [`AuthRoutes::jwks`] |
//!
//! JSON routes answer 415 to anything but `Content-Type: application/json`, so a
//! cross-site form or `text/plain` POST never reaches them. The client's address comes
//! from the [`ClientAddr`](upcoach_core::http::ClientAddr) extension the server sets.
//!
//! **Devices**: every refresh is checked against the device its session is bound to
//! ([`refresh::device`](crate::refresh::device)).
//!
//! - A native app names its device at `POST /auth/{provider}/token` (the
//!   [`DEVICE_ID_HEADER`] `X-Device-Id`, or `"device_id"` in the body; both must agree)
//!   and sends `X-Device-Id` on every `POST /auth/refresh`. No cookie is set for it.
//! - A browser gets its device id from the flow, as a cookie: `GET
//!   /auth/{provider}/authorize?platform=web` sets [`DEVICE_COOKIE`] (behind https
//!   [`DEVICE_COOKIE_HOST`]) when the request carries no valid one: a random id,
//!   `HttpOnly`, `SameSite=Lax`, `Max-Age` [`DEVICE_COOKIE_MAX_AGE`] (400 days, the
//!   most a browser keeps), named and scoped like the flow cookie (on `/auth` over
//!   plain http; `Secure` on `/` with the `__Host-` prefix behind https). The browser
//!   sends it back to `/auth/exchange` and `/auth/refresh` by itself, so a web app on
//!   the API's site that calls `POST /auth/refresh {"refresh_token"}` (with the
//!   browser's credentials) needs nothing more.
//! - At `POST /auth/exchange`, a callback that answers with tokens, and `POST
//!   /auth/refresh`, the device is `X-Device-Id` if the request has it, else the device
//!   cookie if it is valid, else none. A callback with neither takes the device the
//!   browser had (or was given) at `authorize`, which the flow keeps as a fingerprint:
//!   Sign in with Apple comes back by a cross-site `POST`, which carries no
//!   `SameSite=Lax` cookie, and its session still lands on the browser's device, whose
//!   cookie stays as it is. An exchange, or a callback of a flow that kept no device,
//!   with neither binds the session to a new random id, answers it as `device_id` (for
//!   a web app that cannot use the cookie: it sends it as `X-Device-Id` on every
//!   refresh) and sets it as the device cookie.
//!
//! An `X-Device-Id` that is not 8 to 128 of `A-Z a-z 0-9 . _ : -`, or given twice, is
//! 400 `invalid_device_id`; a device cookie like that, or two of them, is ignored (no
//! cookie; `authorize` replaces it). A refresh of a session bound to another device
//! (or presenting none) is 401 `device_mismatch`, and the session is revoked.
//!
//! The refresh token is the secret; the device cookie is the binding. The cookie opens
//! nothing by itself: it makes a refresh token that leaked out of the browser (a log,
//! a copied storage, a stolen backup) useless on another device. `HttpOnly` keeps it
//! from any page's script, `SameSite=Lax` keeps it off a cross-site `POST` (and the
//! JSON routes refuse what a cross-site form can send anyway), the `__Host-` prefix
//! keeps a sibling subdomain from setting or shadowing it, and the device id is never
//! logged, recorded in an event, or answered except as the `device_id` of a session
//! bound to an id the server made. It does not stop script running in the web app's
//! own page, in the same browser, from refreshing: that browser is the device.
//!
//! **Sign-ins started**: `GET /auth/{provider}/authorize` is admitted per address and in
//! total before it stores a flow ([`sessions`](crate::sessions)): 429
//! `too_many_sign_in_flows`, or 503 `sign_in_busy`, with `Retry-After`,
//! `RateLimit-Policy` and `RateLimit`; 503 `rate_limiter_unavailable` with
//! `Retry-After: 1` when the limiter is down.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use upcoach_auth::http::AuthRoutes;
//! use upcoach_auth::session::{AccessTokens, SigningKey};
//! use upcoach_auth::sessions::Sessions;
//! use upcoach_core::SystemClock;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let tokens = Arc::new(AccessTokens::new(SigningKey::generate()?, Arc::new(SystemClock)));
//! let routes = AuthRoutes::new(Arc::new(Sessions::builder(tokens, "http://127.0.0.1:8080").build()));
//!
//! let cross_site = http::Request::post("/auth/refresh")
//!     .header("content-type", "text/plain")
//!     .body(Full::new(Bytes::from_static(br#"{"refresh_token":"x"}"#)))?;
//! assert_eq!(routes.refresh(cross_site).await.status(), 415);
//!
//! let me = http::Request::get("/auth/me").body(Full::new(Bytes::new()))?;
//! assert_eq!(routes.me(me).await.status(), 401);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use serde::Deserialize;
use upcoach_core::Role;
use upcoach_core::event::ClientFacts;
use upcoach_core::http::{
    ApiError, DEFAULT_JSON_LIMIT, HttpError, JsonBody, client_facts, empty_response,
    error_response, json_response, query_param, read_body, read_json,
};

use crate::flow::FlowError;
use crate::refresh::{DeviceId, InvalidDeviceId, RefreshError};
use crate::sessions::{AuthError, CallbackOutcome, Sessions, TokenResponse};
use crate::users::UserError;
use crate::web::{CallbackParams, FLOW_COOKIE, FLOW_TTL, LoginProof, SignInError, posted_name};

pub use crate::refresh::device::DEVICE_ID_HEADER;

use crate::{Error, NativeCredential};

/// The flow cookie's name behind https (see [`AuthRoutes`]).
pub const FLOW_COOKIE_HOST: &str = "__Host-upcoach_flow";
/// The cookie that carries a browser's device id, on plain http (see the [module
/// docs](self)).
pub const DEVICE_COOKIE: &str = "upcoach_device";
/// The device cookie's name behind https.
pub const DEVICE_COOKIE_HOST: &str = "__Host-upcoach_device";
/// How long a browser keeps its device cookie: 400 days, the longest a browser keeps
/// any cookie (RFC 6265bis), so one browser stays one device.
pub const DEVICE_COOKIE_MAX_AGE: Duration = Duration::from_secs(400 * 24 * 3600);

/// An answer of these routes.
pub type Answer = Response<JsonBody>;

impl HttpError for InvalidDeviceId {
    fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
    fn code(&self) -> &'static str {
        InvalidDeviceId::code(self)
    }
}

impl HttpError for Error {
    fn status(&self) -> StatusCode {
        match self {
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            Error::UnknownProvider => StatusCode::NOT_FOUND,
            Error::Crypto(_) | Error::ProviderMisconfigured(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
    fn code(&self) -> &'static str {
        Error::code(self)
    }
    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}

impl HttpError for FlowError {
    fn status(&self) -> StatusCode {
        if self.is_retryable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
    fn code(&self) -> &'static str {
        FlowError::code(self)
    }
    fn is_retryable(&self) -> bool {
        FlowError::is_retryable(self)
    }
}

impl HttpError for SignInError {
    fn status(&self) -> StatusCode {
        match self {
            SignInError::Provider(e) => e.status(),
            SignInError::Store(e) => e.status(),
            SignInError::ReturnToNotAllowed
            | SignInError::StateMissing
            | SignInError::CodeMissing
            | SignInError::LoginChallengeInvalid => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
    fn code(&self) -> &'static str {
        SignInError::code(self)
    }
    fn is_retryable(&self) -> bool {
        SignInError::is_retryable(self)
    }
}

impl HttpError for UserError {
    fn status(&self) -> StatusCode {
        match self {
            UserError::AccountExists
            | UserError::IdentityTaken
            | UserError::ProviderAlreadyLinked { .. }
            | UserError::LastIdentity
            | UserError::TooManyUnlinked { .. } => StatusCode::CONFLICT,
            UserError::NotLinked { .. } | UserError::NotFound => StatusCode::NOT_FOUND,
            UserError::InvalidIdentity { .. } => StatusCode::BAD_REQUEST,
            UserError::Full { .. } => StatusCode::SERVICE_UNAVAILABLE,
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
    fn code(&self) -> &'static str {
        UserError::code(self)
    }
    fn is_retryable(&self) -> bool {
        UserError::is_retryable(self)
    }
    fn message(&self) -> Cow<'_, str> {
        match self {
            UserError::Full { .. } | UserError::TooManyUnlinked { .. } => {
                Cow::Owned(self.to_string())
            }
            _ => generic_message(self),
        }
    }
}

/// The message of an error whose own text is not for clients: a dependency that is
/// down or an internal error says only that; anything else says what it is.
fn generic_message(error: &(impl HttpError + ?Sized)) -> Cow<'_, str> {
    match error.status() {
        StatusCode::SERVICE_UNAVAILABLE => {
            Cow::Borrowed("a dependency is unavailable; retry shortly")
        }
        status if status.is_server_error() => Cow::Borrowed("internal error"),
        _ => Cow::Owned(error.to_string()),
    }
}

impl HttpError for RefreshError {
    fn status(&self) -> StatusCode {
        match self {
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            RefreshError::Random(_) => StatusCode::INTERNAL_SERVER_ERROR,
            RefreshError::NotOwner => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
    fn code(&self) -> &'static str {
        RefreshError::code(self)
    }
    fn is_retryable(&self) -> bool {
        RefreshError::is_retryable(self)
    }
    fn message(&self) -> Cow<'_, str> {
        match self {
            RefreshError::Full { .. } => Cow::Owned(self.to_string()),
            _ => generic_message(self),
        }
    }
}

impl HttpError for AuthError {
    fn status(&self) -> StatusCode {
        match self {
            AuthError::UnknownProvider | AuthError::ProviderNotConfigured(_) => {
                StatusCode::NOT_FOUND
            }
            AuthError::InvalidPlatform => StatusCode::BAD_REQUEST,
            AuthError::NonceReplayed
            | AuthError::CredentialLivesTooLong
            | AuthError::UserGone { .. } => StatusCode::UNAUTHORIZED,
            AuthError::Signing(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AuthError::Provider(e) => e.status(),
            AuthError::SignIn(e) => e.status(),
            AuthError::Users(e) => e.status(),
            AuthError::Refresh(e) => e.status(),
            AuthError::Flow(e) => e.status(),
            AuthError::InvalidDeviceId(e) => e.status(),
            AuthError::TooManySignInFlows { .. } => StatusCode::TOO_MANY_REQUESTS,
            AuthError::SignInBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::FlowLimiter(upcoach_core::limit::LimitError::Unavailable(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AuthError::FlowLimiter(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AuthError::Facebook(crate::facebook::FacebookError::SignedRequestBadSignature) => {
                StatusCode::UNAUTHORIZED
            }
            AuthError::Facebook(_) => StatusCode::BAD_REQUEST,
            AuthError::Apple(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::Apple(crate::apple::AppleError::NotificationBadSignature(_)) => {
                StatusCode::UNAUTHORIZED
            }
            AuthError::Apple(_) => StatusCode::BAD_REQUEST,
            AuthError::NotificationReplayed => StatusCode::CONFLICT,
            AuthError::Deletion(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::Deletion(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AuthError::DeletionRequestNotFound => StatusCode::NOT_FOUND,
        }
    }
    fn code(&self) -> &'static str {
        AuthError::code(self)
    }
    fn is_retryable(&self) -> bool {
        AuthError::is_retryable(self)
    }
    fn message(&self) -> Cow<'_, str> {
        match self {
            // Not a dependency that is down: say what it is.
            AuthError::SignInBusy { .. }
            | AuthError::Users(UserError::Full { .. })
            | AuthError::Users(UserError::TooManyUnlinked { .. })
            | AuthError::Refresh(RefreshError::Full { .. }) => Cow::Owned(self.to_string()),
            AuthError::TooManySignInFlows { decision, .. } => Cow::Owned(format!(
                "{self} (in {} s)",
                retry_seconds(decision.retry_after)
            )),
            _ => generic_message(self),
        }
    }
    fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        let (rule, quota, decision) = match self {
            AuthError::TooManySignInFlows { quota, decision } => {
                (crate::sessions::FLOW_RULE, quota, decision)
            }
            AuthError::SignInBusy { quota, decision } => {
                (crate::sessions::FLOW_TOTAL_RULE, quota, decision)
            }
            AuthError::FlowLimiter(_) => {
                return vec![(header::RETRY_AFTER, HeaderValue::from_static("1"))];
            }
            _ => return Vec::new(),
        };
        let mut headers = vec![(
            header::RETRY_AFTER,
            HeaderValue::from(retry_seconds(decision.retry_after)),
        )];
        let policy = format!(
            "\"{rule}\";q={};w={}",
            quota.limit(),
            quota.window().as_secs().max(1)
        );
        let state = format!(
            "\"{rule}\";r={};t={}",
            decision.remaining,
            decision.reset_after.as_secs_f64().ceil() as u64
        );
        if let (Ok(policy), Ok(state)) =
            (HeaderValue::try_from(policy), HeaderValue::try_from(state))
        {
            headers.push((header::HeaderName::from_static("ratelimit-policy"), policy));
            headers.push((header::HeaderName::from_static("ratelimit"), state));
        }
        headers
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
fn retry_seconds(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

/// The device id of `X-Device-Id`, if the request has one: `invalid_device_id` when it
/// is not a valid id or the header is given twice.
pub fn device_id(headers: &HeaderMap) -> Result<Option<DeviceId>, InvalidDeviceId> {
    let mut values = headers.get_all(DEVICE_ID_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(InvalidDeviceId);
    }
    let text = value.to_str().map_err(|_| InvalidDeviceId)?;
    DeviceId::parse(text).map(Some)
}

/// Sign-in's routes over one [`Sessions`]; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct AuthRoutes {
    sessions: Arc<Sessions>,
    /// `Secure` and `__Host-` cookies: the public URL is https.
    secure_cookie: bool,
}

/// A cookie these routes set on a browser: its name on plain http and behind https.
#[derive(Debug, Clone, Copy)]
struct BrowserCookie {
    name: &'static str,
    host_name: &'static str,
}

/// The flow cookie: binds a started sign-in to its browser, for [`FLOW_TTL`].
const FLOW: BrowserCookie = BrowserCookie {
    name: FLOW_COOKIE,
    host_name: FLOW_COOKIE_HOST,
};

/// The device cookie: the browser's device id, for [`DEVICE_COOKIE_MAX_AGE`].
const DEVICE: BrowserCookie = BrowserCookie {
    name: DEVICE_COOKIE,
    host_name: DEVICE_COOKIE_HOST,
};

fn fail(error: &(impl HttpError + ?Sized)) -> Answer {
    error_response(error)
}

fn no_store(mut response: Answer) -> Answer {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The value of cookie `name` in the request's `Cookie` headers, if it is there exactly
/// once. Two (a cookie "tossed" in by a sibling subdomain with a longer path, say) are
/// none: which one the browser meant cannot be told.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut values = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v);
    let first = values.next()?;
    values.next().is_none().then_some(first)
}

/// A native sign-in's body: an id token and its nonce, or (Facebook classic login) an
/// access token; exactly one of the two.
#[derive(Debug, Deserialize)]
#[serde(try_from = "RawNativeBody")]
struct NativeBody {
    credential: NativeCredential,
    platform: Option<String>,
    device_id: Option<String>,
    /// The name in Apple's `user`, if it reads as one.
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNativeBody {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    /// A native app's authorization code (Sign in with Apple's `authorizationCode`).
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    platform: Option<String>,
    /// The device, as `X-Device-Id` gives it (sign-in only; linking ignores it).
    #[serde(default)]
    device_id: Option<String>,
    /// Apple's first-sign-in `user` (name), as an object or as its JSON text: see
    /// [`posted_name`].
    #[serde(default)]
    user: Option<serde_json::Value>,
}

impl TryFrom<RawNativeBody> for NativeBody {
    type Error = &'static str;

    fn try_from(raw: RawNativeBody) -> Result<Self, Self::Error> {
        let credential = match (raw.id_token, raw.access_token, raw.code, raw.nonce) {
            (Some(id_token), None, None, nonce) => NativeCredential::IdToken { id_token, nonce },
            (None, Some(token), None, None) => NativeCredential::AccessToken(token),
            (None, Some(_), None, Some(_)) => return Err("an access_token takes no nonce"),
            (None, None, Some(code), nonce) => NativeCredential::AuthorizationCode { code, nonce },
            _ => return Err("expected exactly one of id_token, access_token and code"),
        };
        // A display name only: one that does not read is none, never an error.
        let name = match raw.user {
            Some(serde_json::Value::String(text)) => posted_name(&text),
            Some(object @ serde_json::Value::Object(_)) => posted_name(&object.to_string()),
            _ => None,
        };
        Ok(Self {
            credential,
            platform: raw.platform,
            device_id: raw.device_id,
            name,
        })
    }
}

/// The most bytes of a Facebook callback's form body.
const MAX_SIGNED_REQUEST_FORM: usize = 16 * 1024;

/// The one `signed_request` field of a Facebook callback's
/// `application/x-www-form-urlencoded` body.
async fn signed_request_of<B>(request: Request<B>) -> Result<String, ApiError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/x-www-form-urlencoded",
        ));
    }
    let body = read_body(request.into_body(), MAX_SIGNED_REQUEST_FORM).await?;
    signed_request_field(&body)
}

/// The one `signed_request` field of a form body: none, or two, is an error.
pub(crate) fn signed_request_field(body: &[u8]) -> Result<String, ApiError> {
    let mut values = form_urlencoded::parse(body)
        .filter(|(k, _)| k == "signed_request")
        .map(|(_, v)| v.into_owned());
    match (values.next(), values.next()) {
        (Some(value), None) => Ok(value),
        _ => Err(ApiError::bad_request(
            "signed_request_malformed",
            "the form needs exactly one signed_request field",
        )),
    }
}

/// The device of a native sign-in: `X-Device-Id` or the body's `device_id`, which must
/// agree when both are given.
fn native_device(
    header: Option<DeviceId>,
    body: Option<&str>,
) -> Result<Option<DeviceId>, InvalidDeviceId> {
    let body = body.map(DeviceId::parse).transpose()?;
    match (header, body) {
        (Some(header), Some(body)) if header != body => Err(InvalidDeviceId),
        (header, body) => Ok(header.or(body)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeBody {
    login_code: String,
    #[serde(default)]
    login_verifier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogoutBody {
    refresh_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenBody {
    sub: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

/// What a request body's error must turn into.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl AuthRoutes {
    /// The routes of `sessions`; their cookies are `Secure` and `__Host-` prefixed when
    /// its public URL is https.
    pub fn new(sessions: Arc<Sessions>) -> Self {
        let secure_cookie = sessions.public_url().starts_with("https://");
        Self {
            sessions,
            secure_cookie,
        }
    }

    /// The service behind the routes.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// The name of `cookie` here: behind https its `__Host-` name, which no sibling
    /// subdomain can set or shadow; its plain name on http (development).
    fn cookie_name(&self, cookie: BrowserCookie) -> &'static str {
        if self.secure_cookie {
            cookie.host_name
        } else {
            cookie.name
        }
    }

    /// A `Set-Cookie` of `cookie`: `HttpOnly`, `SameSite=Lax`; behind https `Secure` on
    /// `/` with the `__Host-` prefix, else on `/auth` (the callback, the login-code
    /// exchange and the refresh). A `cross_site` one (the flow cookie of a provider that
    /// comes back by a cross-site `POST`) is `SameSite=None; Secure` instead, on plain
    /// http too (browsers keep `Secure` cookies from `http://localhost` only, so such a
    /// sign-in needs https or localhost).
    fn set_cookie(
        &self,
        cookie: BrowserCookie,
        value: &str,
        max_age: u64,
        cross_site: bool,
    ) -> Option<HeaderValue> {
        let path = if self.secure_cookie {
            "Path=/; Secure"
        } else if cross_site {
            "Path=/auth; Secure"
        } else {
            "Path=/auth"
        };
        let same_site = if cross_site { "None" } else { "Lax" };
        HeaderValue::from_str(&format!(
            "{}={value}; {path}; Max-Age={max_age}; HttpOnly; SameSite={same_site}",
            self.cookie_name(cookie)
        ))
        .ok()
    }

    /// The flow cookie's name (see [`cookie_name`](Self::cookie_name)).
    fn flow_cookie_name(&self) -> &'static str {
        self.cookie_name(FLOW)
    }

    /// The flow cookie, or (empty, `max_age` 0) its removal; `cross_site` for a
    /// provider that comes back by a cross-site `POST`.
    fn flow_cookie(&self, value: &str, max_age: u64, cross_site: bool) -> Option<HeaderValue> {
        self.set_cookie(FLOW, value, max_age, cross_site)
    }

    /// The device cookie carrying `device`, for [`DEVICE_COOKIE_MAX_AGE`].
    fn device_cookie(&self, device: &DeviceId) -> Option<HeaderValue> {
        self.set_cookie(
            DEVICE,
            device.expose(),
            DEVICE_COOKIE_MAX_AGE.as_secs(),
            false,
        )
    }

    /// The device id of the request's device cookie: none if it has none, two, or one
    /// that is not a valid device id (ignored, never an error: the browser cannot fix
    /// it, and `authorize` replaces it).
    fn cookie_device(&self, headers: &HeaderMap) -> Option<DeviceId> {
        cookie(headers, self.cookie_name(DEVICE)).and_then(|value| DeviceId::parse(value).ok())
    }

    /// The device a request presents: `X-Device-Id` if it has one (invalid: 400
    /// `invalid_device_id`), else its valid device cookie, else none.
    fn presented_device(&self, headers: &HeaderMap) -> Result<Option<DeviceId>, InvalidDeviceId> {
        Ok(device_id(headers)?.or_else(|| self.cookie_device(headers)))
    }

    /// The answer of a browser sign-in that ends with tokens (exchange, callback): the
    /// TokenResponse, the flow cookie cleared (used: the browser needs it no more) and,
    /// when the session is bound to a device id the server made (`device_id`), that id
    /// set as the device cookie, so the browser's refreshes carry it.
    /// `cross_site`: the flow cookie was set for a cross-site callback, and is cleared
    /// with the same attributes (a browser may keep a `Secure` cookie that an answer
    /// without `Secure` tries to clear).
    fn signed_in_browser(&self, tokens: &TokenResponse, cross_site: bool) -> Answer {
        let mut response = json_response(StatusCode::OK, tokens);
        if let Some(clear) = self.flow_cookie("", 0, cross_site) {
            response.headers_mut().insert(header::SET_COOKIE, clear);
        }
        let generated = tokens.device_id.as_deref().map(DeviceId::parse);
        if let Some(cookie) = generated
            .and_then(Result::ok)
            .and_then(|d| self.device_cookie(&d))
        {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        response
    }

    async fn principal(&self, headers: &HeaderMap) -> Result<upcoach_core::Principal, Answer> {
        upcoach_core::http::authenticate(self.sessions.as_ref(), headers)
            .await
            .map_err(|e| fail(&e))
    }

    /// `GET /auth/{provider}/authorize?platform=&return_to=&login_challenge=`: 302 to
    /// the provider, setting the flow cookie; with `platform=web`, also the device
    /// cookie when the browser has no valid one.
    pub async fn authorize<B>(&self, provider: &str, request: Request<B>) -> Answer {
        let query = request.uri().query();
        let facts = client_facts(request.headers(), request.extensions())
            .with_platform(query_param(query, "platform").map(Cow::into_owned));
        // The browser's device, or a new one for a web sign-in: the flow keeps it, so
        // a callback that comes cross-site (without the Lax device cookie) binds to it.
        let (device, new_device) = match self.cookie_device(request.headers()) {
            Some(device) => (Some(device), false),
            None if facts.platform.as_deref() == Some("web") => match DeviceId::generate() {
                Ok(device) => (Some(device), true),
                Err(e) => return fail(&AuthError::from(e)),
            },
            None => (None, false),
        };
        let return_to = query_param(query, "return_to");
        let challenge = query_param(query, "login_challenge");
        let started = match self
            .sessions
            .authorize(
                provider,
                return_to.as_deref(),
                challenge.as_deref(),
                device.as_ref(),
                &facts,
            )
            .await
        {
            Ok(started) => started,
            Err(e) => return fail(&e),
        };
        let (Ok(location), Some(cookie)) = (
            HeaderValue::from_str(started.redirect.as_str()),
            self.flow_cookie(
                &started.browser_cookie,
                FLOW_TTL.as_secs(),
                started.cross_site,
            ),
        ) else {
            return fail(&ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal error",
            ));
        };
        let mut response = empty_response(StatusCode::FOUND);
        response.headers_mut().insert(header::LOCATION, location);
        response.headers_mut().insert(header::SET_COOKIE, cookie);
        if let (true, Some(device)) = (new_device, &device) {
            // After the flow cookie: a client reading one `Set-Cookie` gets that one.
            if let Some(cookie) = self.device_cookie(device) {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
        }
        no_store(response)
    }

    /// `GET|POST /auth/{provider}/callback` (the query, or a form body for
    /// `response_mode=form_post`; only `POST` for a provider that posts its answer,
    /// else 405 `method_not_allowed`): 200 TokenResponse, or 302 to `return_to` with a
    /// login code. Tokens answered here are bound to the device presented
    /// (`X-Device-Id`, else the device cookie), or to a new one, set as the device
    /// cookie.
    pub async fn callback<B>(&self, provider: &str, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        // A provider asked to post its answer (Apple's form_post) never sends the
        // browser here by GET: a code in a URL would only land in history and logs.
        let cross_site = self.sessions.cross_site_callback(provider);
        if request.method() != Method::POST && cross_site {
            let mut response = fail(&ApiError::method_not_allowed(
                "POST: this provider posts its answer as a form",
            ));
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return no_store(response);
        }
        let facts = client_facts(request.headers(), request.extensions());
        let device = match self.presented_device(request.headers()) {
            Ok(device) => device,
            Err(e) => return fail(&e),
        };
        let browser = cookie(request.headers(), self.flow_cookie_name()).map(str::to_owned);
        let params = if request.method() == Method::POST {
            match read_body(request.into_body(), DEFAULT_JSON_LIMIT).await {
                Ok(bytes) => CallbackParams::from_form(&bytes),
                Err(e) => return fail(&e),
            }
        } else {
            CallbackParams::from_form(request.uri().query().unwrap_or_default().as_bytes())
        };
        let outcome = self
            .sessions
            .callback(
                provider,
                &params,
                browser.as_deref(),
                device.as_ref(),
                &facts,
            )
            .await;
        let response = match outcome {
            Err(e) => return no_store(fail(&e)),
            Ok(CallbackOutcome::SignedIn(tokens)) => self.signed_in_browser(&tokens, cross_site),
            Ok(CallbackOutcome::Redirect(url)) => {
                let Ok(location) = HeaderValue::from_str(url.as_str()) else {
                    return fail(&AuthError::SignIn(SignInError::ReturnToNotAllowed));
                };
                // The cookie stays: it proves at the exchange that this browser began.
                let mut response = empty_response(StatusCode::FOUND);
                response.headers_mut().insert(header::LOCATION, location);
                response
            }
        };
        no_store(response)
    }

    /// `POST /auth/{provider}/token` `{"id_token","nonce","platform","device_id"?,"user"?}`
    /// (the device also as `X-Device-Id`): a native sign-in, bound to the device when
    /// the app names one.
    pub async fn token<B>(&self, provider: &str, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let header = match device_id(request.headers()) {
            Ok(device) => device,
            Err(e) => return fail(&e),
        };
        let body: NativeBody = match read_json(request, DEFAULT_JSON_LIMIT).await {
            Ok(body) => body,
            Err(e) => return fail(&e),
        };
        let NativeBody {
            credential,
            platform,
            device_id: body_device,
            name,
        } = body;
        let device = match native_device(header, body_device.as_deref()) {
            Ok(device) => device,
            Err(e) => return fail(&e),
        };
        let facts = facts.with_platform(platform);
        match self
            .sessions
            .sign_in_with_token(provider, credential, name, device.as_ref(), &facts)
            .await
        {
            Ok(tokens) => no_store(json_response(StatusCode::OK, &tokens)),
            Err(e) => fail(&e),
        }
    }

    /// `POST /auth/exchange` `{"login_code","login_verifier"?}`: the tokens of a login
    /// code, for the browser that began (its flow cookie, or the verifier of its
    /// `login_challenge`), bound to the device presented (`X-Device-Id`, else the
    /// device cookie), or to a new one: `device_id` in the answer, and set as the
    /// device cookie.
    pub async fn exchange<B>(&self, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let device = match self.presented_device(request.headers()) {
            Ok(device) => device,
            Err(e) => return fail(&e),
        };
        let browser = cookie(request.headers(), self.flow_cookie_name()).map(str::to_owned);
        let body: ExchangeBody = match read_json(request, DEFAULT_JSON_LIMIT).await {
            Ok(body) => body,
            Err(e) => return fail(&e),
        };
        let proof = LoginProof {
            browser_cookie: browser.as_deref(),
            login_verifier: body.login_verifier.as_deref(),
        };
        match self
            .sessions
            .exchange(&body.login_code, &proof, device.as_ref(), &facts)
            .await
        {
            // Cleared as a same-site flow's cookie: behind https the attributes that
            // matter (`Path=/; Secure`) are the same for both kinds, and on plain http
            // a cross-site flow works only from localhost, which may clear either.
            Ok(tokens) => no_store(self.signed_in_browser(&tokens, false)),
            Err(e) => fail(&e),
        }
    }

    /// `POST /auth/refresh` `{"refresh_token"}` from the session's device
    /// (`X-Device-Id`, else the device cookie a browser sends by itself): a rotated
    /// TokenResponse.
    pub async fn refresh<B>(&self, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let device = match self.presented_device(request.headers()) {
            Ok(device) => device,
            Err(e) => return fail(&e),
        };
        let body: RefreshBody = match read_json(request, DEFAULT_JSON_LIMIT).await {
            Ok(body) => body,
            Err(e) => return fail(&e),
        };
        match self
            .sessions
            .refresh(&body.refresh_token, device.as_ref(), &facts)
            .await
        {
            Ok(tokens) => no_store(json_response(StatusCode::OK, &tokens)),
            Err(e) => fail(&e),
        }
    }

    /// `POST /auth/logout` `{"refresh_token"?}` with a bearer: 204. A body, when there
    /// is one, must be JSON.
    pub async fn logout<B>(&self, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let principal = match self.principal(request.headers()).await {
            Ok(principal) => principal,
            Err(answer) => return answer,
        };
        let json = upcoach_core::http::require_json(request.headers());
        let bytes = match read_body(request.into_body(), DEFAULT_JSON_LIMIT).await {
            Ok(bytes) => bytes,
            Err(e) => return fail(&e),
        };
        let body = if bytes.is_empty() {
            LogoutBody::default()
        } else {
            if let Err(e) = json {
                return fail(&e);
            }
            match serde_json::from_slice(&bytes) {
                Ok(body) => body,
                Err(e) => {
                    return fail(&ApiError::bad_request(
                        "invalid_json",
                        format!("the request body is not valid JSON for this route: {e}"),
                    ));
                }
            }
        };
        match self
            .sessions
            .logout(&principal, body.refresh_token.as_deref(), &facts)
            .await
        {
            Ok(()) => empty_response(StatusCode::NO_CONTENT),
            Err(e) => fail(&e),
        }
    }

    /// `GET /auth/me` with a bearer: the User.
    pub async fn me<B>(&self, request: Request<B>) -> Answer {
        let principal = match self.principal(request.headers()).await {
            Ok(principal) => principal,
            Err(answer) => return answer,
        };
        match self.sessions.me(&principal).await {
            Ok(user) => json_response(StatusCode::OK, &user),
            Err(e) => fail(&e),
        }
    }

    /// `POST /auth/link/{provider}` (body as `/token`) with a bearer: the User.
    pub async fn link<B>(&self, provider: &str, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let principal = match self.principal(request.headers()).await {
            Ok(principal) => principal,
            Err(answer) => return answer,
        };
        let body: NativeBody = match read_json(request, DEFAULT_JSON_LIMIT).await {
            Ok(body) => body,
            Err(e) => return fail(&e),
        };
        // Linking keeps the account's name: a posted one is for new accounts only.
        let facts = facts.with_platform(body.platform);
        let credential = body.credential;
        match self
            .sessions
            .link(&principal, provider, credential, &facts)
            .await
        {
            Ok(user) => json_response(StatusCode::OK, &user),
            Err(e) => fail(&e),
        }
    }

    /// `DELETE /auth/link/{provider}` with a bearer: the User (409 `last_identity`).
    pub async fn unlink<B>(&self, provider: &str, request: Request<B>) -> Answer {
        let facts = client_facts(request.headers(), request.extensions());
        let principal = match self.principal(request.headers()).await {
            Ok(principal) => principal,
            Err(answer) => return answer,
        };
        match self.sessions.unlink(&principal, provider, &facts).await {
            Ok(user) => json_response(StatusCode::OK, &user),
            Err(e) => fail(&e),
        }
    }

    /// `POST /auth/facebook/deauthorize` (form `signed_request`, from Facebook): see
    /// [`Sessions::facebook_deauthorized`]. 200 `{"status":"deauthorized"}` once
    /// verified and handled; 400 for a malformed request, 401 for a bad signature, 404
    /// when Facebook is not configured.
    pub async fn facebook_deauthorize<B>(&self, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let signed_request = match signed_request_of(request).await {
            Ok(signed_request) => signed_request,
            Err(e) => return fail(&e),
        };
        match self
            .sessions
            .facebook_deauthorized(&signed_request, &facts)
            .await
        {
            Ok(()) => json_response(
                StatusCode::OK,
                &serde_json::json!({"status": "deauthorized"}),
            ),
            Err(e) => fail(&e),
        }
    }

    /// `POST /auth/facebook/data-deletion` (form `signed_request`, from Facebook): see
    /// [`Sessions::facebook_data_deletion`]. 200 `{"url","confirmation_code"}` as
    /// Facebook expects, `url` being this request's status page; 400/401 as for the
    /// deauthorize callback, 404 when Facebook is not configured.
    pub async fn facebook_data_deletion<B>(&self, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let signed_request = match signed_request_of(request).await {
            Ok(signed_request) => signed_request,
            Err(e) => return fail(&e),
        };
        match self
            .sessions
            .facebook_data_deletion(&signed_request, &facts)
            .await
        {
            Ok(deletion) => {
                let code = deletion.code.as_str();
                let url = format!(
                    "{}/auth/facebook/data-deletion/{code}",
                    self.sessions.public_url()
                );
                no_store(json_response(
                    StatusCode::OK,
                    &serde_json::json!({"url": url, "confirmation_code": code}),
                ))
            }
            Err(e) => fail(&e),
        }
    }

    /// `GET /auth/facebook/data-deletion/{code}`: the status of a data-deletion request,
    /// `{"confirmation_code","provider","status","outcome","requested_at","completed_at"}`
    /// (times in seconds since the epoch; `outcome` and `completed_at` null while
    /// pending). 404 `deletion_request_not_found` for any other code.
    pub async fn data_deletion_status(&self, code: &str) -> Answer {
        let seconds = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        match self.sessions.data_deletion_status(code).await {
            Ok(deletion) => no_store(json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "confirmation_code": deletion.code.as_str(),
                    "provider": deletion.provider,
                    "status": deletion.status.as_str(),
                    "outcome": deletion.outcome.map(|o| o.as_str()),
                    "requested_at": seconds(deletion.requested_at),
                    "completed_at": deletion.completed_at.map(seconds),
                }),
            )),
            Err(e) => fail(&e),
        }
    }

    /// `POST /auth/apple/notifications` (`{"payload":"<JWT>"}`, from Apple): see
    /// [`Sessions::apple_notification`]. 200 `{"status":"handled"}`; 400 for a
    /// malformed or refused notification, 401 for a bad signature, 409
    /// `notification_replayed` for one handled before, 404 when Apple is not
    /// configured.
    pub async fn apple_notifications<B>(&self, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let body =
            match read_body(request.into_body(), crate::apple::MAX_NOTIFICATION_BODY_LEN).await {
                Ok(body) => body,
                Err(e) => return fail(&e),
            };
        match self.sessions.apple_notification(&body, &facts).await {
            Ok(()) => json_response(StatusCode::OK, &serde_json::json!({"status": "handled"})),
            Err(e) => fail(&e),
        }
    }

    /// `GET /.well-known/jwks.json`: our public keys, cacheable for 5 minutes.
    pub fn jwks(&self) -> Answer {
        let mut response = json_response(StatusCode::OK, &self.sessions.tokens().jwks());
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=300"),
        );
        response
    }

    /// `POST /dev/token` `{"sub"?,"roles":[...]}`: a session for any user, created with
    /// those roles if new (an existing user keeps its roles). For development only:
    /// mount it only when the operator asked for it.
    pub async fn dev_token<B>(&self, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts: ClientFacts = client_facts(request.headers(), request.extensions());
        // DNS rebinding: a page of another site that resolves its name to 127.0.0.1
        // reaches a loopback server with its own name in Host.
        if !loopback_host(request.headers()) {
            return fail(&ApiError::forbidden(
                "POST /dev/token answers only requests addressed to localhost or a loopback address",
            ));
        }
        // Behind a proxy the Host is the client's to choose, and the client anyone: a
        // forwarded request is never a local developer's.
        let headers = request.headers();
        if headers.contains_key("x-forwarded-for") || headers.contains_key(http::header::FORWARDED)
        {
            return fail(&ApiError::forbidden(
                "POST /dev/token answers only requests made to this process directly, not through a proxy",
            ));
        }
        let body: DevTokenBody = match read_json(request, DEFAULT_JSON_LIMIT).await {
            Ok(body) => body,
            Err(e) => return fail(&e),
        };
        let user_id = match body.sub.as_deref().map(str::parse).transpose() {
            Ok(user_id) => user_id.unwrap_or_default(),
            Err(e) => {
                return fail(&ApiError::bad_request(
                    "invalid_sub",
                    format!("sub is a user id (UUID): {e}"),
                ));
            }
        };
        if body.roles.len() > 16 {
            return fail(&ApiError::bad_request("invalid_roles", "at most 16 roles"));
        }
        let mut roles: Vec<Role> = Vec::with_capacity(body.roles.len());
        for role in &body.roles {
            match role.parse::<Role>() {
                Ok(role) if !roles.contains(&role) => roles.push(role),
                Ok(_) => {}
                Err(e) => return fail(&ApiError::bad_request("invalid_roles", e.to_string())),
            }
        }
        match self.sessions.issue_for(user_id, &roles, &facts).await {
            Ok(tokens) => no_store(json_response(StatusCode::OK, &tokens)),
            Err(e) => fail(&e),
        }
    }
}

/// Whether the request's `Host` is `localhost` or a loopback address (any port).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
