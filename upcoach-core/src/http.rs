//! The one HTTP face every upcoach crate shares (feature `http`): the bearer-token
//! parser, the JSON error body, the [`HttpError`] trait that every crate's error
//! implements, JSON request bodies (`application/json` only, bounded), and the client
//! facts a request carries.
//!
//! - [`bearer_token`] reads `Authorization: Bearer <token>` (the scheme is matched
//!   case-insensitively, RFC 9110 §11.1); [`bearer_token_or_query`] also takes
//!   `access_token=` from the query, for browsers' `EventSource` and WebSocket.
//! - [`HttpError`]: `status()`, `code()`, `is_retryable()`; [`error_response`] turns
//!   any of them into `{"error":{"code","message"}}`. A server error never shows its
//!   internal message: only a fixed text per status.
//! - [`read_json`]: `415` unless `Content-Type: application/json`, `413` past the limit,
//!   `400 invalid_json` for anything serde refuses.
//! - [`authenticate`] and [`require_admin`]: a bearer token to a [`Principal`].
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, StatusCode};
//! use http_body_util::Full;
//! use upcoach_core::http::{self, ApiError, HttpError};
//!
//! let request = Request::get("/auth/me")
//!     .header("authorization", "bearer abc.def.ghi")
//!     .body(())
//!     .unwrap();
//! assert_eq!(http::bearer_token(request.headers()).unwrap(), "abc.def.ghi");
//!
//! let missing = http::bearer_token(Request::get("/").body(()).unwrap().headers()).unwrap_err();
//! assert_eq!((missing.status(), missing.code()), (StatusCode::UNAUTHORIZED, "token_missing"));
//!
//! let response: http::Response<Full<Bytes>> =
//!     http::error_response(&ApiError::not_found());
//! assert_eq!(response.status(), StatusCode::NOT_FOUND);
//! ```

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
pub use http::{HeaderMap, Request, Response, StatusCode};
use http::{HeaderValue, header};
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::ClientFacts;
use crate::{Principal, TokenError, TokenVerifier};

/// The body type of the JSON answers built here.
pub type JsonBody = Full<Bytes>;

/// The default bound of a JSON request body: 16 KiB.
pub const DEFAULT_JSON_LIMIT: usize = 16 * 1024;

/// The longest bearer token accepted, in bytes.
pub const MAX_BEARER_LEN: usize = 8 * 1024;

/// An error that can be answered over HTTP: a status, a stable snake_case code, and
/// whether retrying later could succeed. Implemented by every upcoach crate's error.
///
/// ```
/// use http::StatusCode;
/// use upcoach_core::http::HttpError;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("the coach is on holiday")]
/// struct OnHoliday;
///
/// impl HttpError for OnHoliday {
///     fn status(&self) -> StatusCode { StatusCode::CONFLICT }
///     fn code(&self) -> &'static str { "coach_on_holiday" }
/// }
///
/// let response: http::Response<bytes::Bytes> = upcoach_core::http::error_response(&OnHoliday);
/// let response = response.map(|body| String::from_utf8(body.to_vec()).unwrap());
/// assert_eq!(response.status(), 409);
/// assert_eq!(response.body(), r#"{"error":{"code":"coach_on_holiday","message":"the coach is on holiday"}}"#);
/// ```
pub trait HttpError: std::error::Error {
    /// The status to answer with.
    fn status(&self) -> StatusCode;

    /// A stable snake_case code for clients.
    fn code(&self) -> &'static str;

    /// Whether trying again later could succeed (a dependency was down).
    fn is_retryable(&self) -> bool {
        self.status() == StatusCode::SERVICE_UNAVAILABLE
    }

    /// The text for people. Server errors get a fixed text per status, so no internal
    /// detail (a backend's message, an address) reaches a client; others their
    /// `Display`.
    fn message(&self) -> Cow<'_, str> {
        match self.status() {
            StatusCode::SERVICE_UNAVAILABLE => {
                Cow::Borrowed("a dependency is unavailable; retry shortly")
            }
            status if status.is_server_error() => Cow::Borrowed("internal error"),
            _ => Cow::Owned(self.to_string()),
        }
    }

    /// Headers the answer carries besides the body (`WWW-Authenticate`, `Retry-After`).
    fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        Vec::new()
    }
}

impl HttpError for TokenError {
    fn status(&self) -> StatusCode {
        if self.is_retryable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::UNAUTHORIZED
        }
    }

    fn code(&self) -> &'static str {
        TokenError::code(self)
    }

    fn is_retryable(&self) -> bool {
        TokenError::is_retryable(self)
    }

    fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        if self.is_retryable() {
            Vec::new()
        } else {
            vec![(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))]
        }
    }
}

impl HttpError for crate::event::EventLogError {
    fn status(&self) -> StatusCode {
        match self {
            crate::event::EventLogError::InvalidEvent { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            crate::event::EventLogError::InvalidEvent { .. } => "invalid_event",
            _ => "event_log_unavailable",
        }
    }

    fn is_retryable(&self) -> bool {
        crate::event::EventLogError::is_retryable(self)
    }
}

/// An error answer made on the spot: a status, a code and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// The stable code.
    pub code: &'static str,
    /// The text for people.
    pub message: Cow<'static, str>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 `not_found`.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    /// 405 `method_not_allowed`, naming what the route accepts.
    pub fn method_not_allowed(allowed: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("this route accepts {allowed}"),
        )
    }

    /// 403 `forbidden`, naming what is needed.
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl HttpError for ApiError {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn code(&self) -> &'static str {
        self.code
    }

    fn message(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.message)
    }
}

/// `{"error":{"code","message"}}`, the body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// The code and the message.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ErrorDetail {
    /// The stable snake_case code.
    pub code: String,
    /// The text for people.
    pub message: String,
}

/// The code of an error answer, in its response's extensions: layers outside the
/// handler (the [`RateLimitLayer`](protect::RateLimitLayer)'s audit of token failures)
/// read it without parsing the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

/// The JSON answer of `error`, with its status and headers (and an [`ErrorCode`]
/// extension).
pub fn error_response<B: From<Bytes>>(error: &(impl HttpError + ?Sized)) -> Response<B> {
    let body = ErrorBody {
        error: ErrorDetail {
            code: error.code().to_owned(),
            message: error.message().into_owned(),
        },
    };
    let mut response = json_response(error.status(), &body);
    for (name, value) in error.headers() {
        response.headers_mut().insert(name, value);
    }
    response.extensions_mut().insert(ErrorCode(error.code()));
    if error.status().is_server_error() {
        tracing::debug!(code = error.code(), error = %error, "answered with a server error");
    }
    response
}

/// A JSON answer with `status`.
pub fn json_response<B: From<Bytes>, T: Serialize + ?Sized>(
    status: StatusCode,
    value: &T,
) -> Response<B> {
    match serde_json::to_vec(value) {
        Ok(bytes) => json_bytes_response(status, Bytes::from(bytes)),
        Err(e) => {
            tracing::error!(error = %e, "a response could not be serialized");
            json_bytes_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::from_static(INTERNAL_ERROR_BODY),
            )
        }
    }
}

/// The body of an answer that could not be written.
const INTERNAL_ERROR_BODY: &[u8] =
    br#"{"error":{"code":"internal_error","message":"internal error"}}"#;

/// A JSON answer with `status` whose body is already written: `Content-Type:
/// application/json` and `bytes` as they are.
pub fn json_bytes_response<B: From<Bytes>>(status: StatusCode, bytes: Bytes) -> Response<B> {
    let mut response = Response::new(B::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A JSON body kept with the value it was written from, for a route polled far more
/// often than its value changes (`/health`): while the value compares equal, each
/// answer shares the kept bytes; another value is written (by serde) and kept instead.
///
/// ```
/// use bytes::Bytes;
/// use http::StatusCode;
/// use http_body_util::Full;
/// use upcoach_core::http::KeptJson;
///
/// let kept = KeptJson::default();
/// let first: Bytes = kept.bytes(serde_json::json!({"ws": 1}))?;
/// assert_eq!(first, r#"{"ws":1}"#);
/// assert_eq!(kept.bytes(serde_json::json!({"ws": 1}))?.as_ptr(), first.as_ptr(), "kept");
/// assert_eq!(kept.bytes(serde_json::json!({"ws": 2}))?, r#"{"ws":2}"#);
/// let answer = kept.response::<Full<Bytes>>(StatusCode::OK, serde_json::json!({"ws": 2}));
/// assert_eq!(answer.headers()["content-type"], "application/json");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug)]
pub struct KeptJson<T> {
    last: std::sync::Mutex<Option<(T, Bytes)>>,
}

impl<T> Default for KeptJson<T> {
    fn default() -> Self {
        Self {
            last: std::sync::Mutex::new(None),
        }
    }
}

impl<T: Serialize + PartialEq> KeptJson<T> {
    /// `value` as JSON: the kept bytes when they were written from an equal value.
    ///
    /// # Errors
    /// What serde says when `value` cannot be written (nothing is kept then).
    pub fn bytes(&self, value: T) -> serde_json::Result<Bytes> {
        let lock = || {
            self.last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some((said, bytes)) = &*lock()
            && *said == value
        {
            return Ok(bytes.clone());
        }
        // Written outside the lock: when values change often, callers would queue on it.
        let bytes = Bytes::from(serde_json::to_vec(&value)?);
        *lock() = Some((value, bytes.clone()));
        Ok(bytes)
    }

    /// A JSON answer with `status` and `value`'s [`bytes`](Self::bytes); `500` if
    /// `value` cannot be written.
    pub fn response<B: From<Bytes>>(&self, status: StatusCode, value: T) -> Response<B> {
        match self.bytes(value) {
            Ok(bytes) => json_bytes_response(status, bytes),
            Err(e) => {
                tracing::error!(error = %e, "a response could not be serialized");
                json_bytes_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Bytes::from_static(INTERNAL_ERROR_BODY),
                )
            }
        }
    }
}

/// An empty answer with `status` (`204`, `302`).
pub fn empty_response<B: From<Bytes>>(status: StatusCode) -> Response<B> {
    let mut response = Response::new(B::from(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// The token of `Authorization: Bearer <token>`.
///
/// [`TokenError::Missing`] without the header; [`TokenError::Malformed`] for another
/// scheme, an empty or oversized token, or bytes outside visible ASCII (a header that
/// is there but empty is malformed, never a reason to look elsewhere).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, TokenError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(TokenError::Missing)?;
    // Read as bytes in one pass over the token: a header value holds no control
    // character but tab, so the only blanks around the token are spaces and tabs, and a
    // token of visible ASCII makes the whole value visible ASCII.
    let bytes = value.as_bytes();
    let space = bytes
        .iter()
        .position(|&b| b == b' ')
        .ok_or(TokenError::Malformed)?;
    let token = bytes[space + 1..].trim_ascii();
    if !bytes[..space].eq_ignore_ascii_case(b"bearer") || token.is_empty() {
        return Err(TokenError::Malformed);
    }
    visible_token(token)
}

/// `token` as text if it is short enough and all visible ASCII; malformed otherwise.
fn visible_token(token: &[u8]) -> Result<&str, TokenError> {
    if token.len() > MAX_BEARER_LEN || !all_visible(token) {
        return Err(TokenError::Malformed);
    }
    std::str::from_utf8(token).map_err(|_| TokenError::Malformed)
}

/// Whether every byte is visible ASCII (`!` to `~`): no blank, no control, no
/// non-ASCII. Without a short cut, so the loop runs on whole vectors.
fn all_visible(bytes: &[u8]) -> bool {
    bytes.iter().fold(true, |ok, b| ok & b.is_ascii_graphic())
}

/// [`bearer_token`], or else the query's `access_token=` (percent-decoded): what a
/// browser's `EventSource` or WebSocket can send. A present but malformed header is
/// an error, never a reason to look at the query.
pub fn bearer_token_or_query<B>(request: &Request<B>) -> Result<Cow<'_, str>, TokenError> {
    match bearer_token(request.headers()) {
        Ok(token) => Ok(Cow::Borrowed(token)),
        Err(TokenError::Missing) => {
            let token =
                query_param(request.uri().query(), "access_token").ok_or(TokenError::Missing)?;
            checked_token(&token)?;
            Ok(Cow::Owned(token.into_owned()))
        }
        Err(e) => Err(e),
    }
}

fn checked_token(token: &str) -> Result<&str, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    visible_token(token.as_bytes())
}

/// The first value of `name` in `query`, percent-decoded (`+` is a space, as in forms).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<Cow<'a, str>> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

/// The principal of the request's bearer token, by `verifier`.
///
/// A token the verifier already knows ([`TokenVerifier::verify_known`]) is answered
/// without waiting.
pub async fn authenticate(
    verifier: &dyn TokenVerifier,
    headers: &HeaderMap,
) -> Result<Principal, TokenError> {
    let token = bearer_token(headers)?;
    match verifier.verify_known(token) {
        Some(known) => known,
        None => verifier.verify(token).await,
    }
}

/// Why a caller may not use an admin route.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// No valid token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A valid token without the role.
    #[error("this route needs the {0} role")]
    MissingRole(&'static str),
}

impl HttpError for AccessError {
    fn status(&self) -> StatusCode {
        match self {
            AccessError::Token(e) => e.status(),
            AccessError::MissingRole(_) => StatusCode::FORBIDDEN,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            AccessError::Token(e) => e.code(),
            AccessError::MissingRole(_) => "forbidden",
        }
    }

    fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        match self {
            AccessError::Token(e) => e.headers(),
            AccessError::MissingRole(_) => Vec::new(),
        }
    }
}

/// The principal of the request's bearer token if it has the `admin` role.
pub async fn require_admin(
    verifier: &dyn TokenVerifier,
    headers: &HeaderMap,
) -> Result<Principal, AccessError> {
    let principal = authenticate(verifier, headers).await?;
    if !principal.is_admin() {
        return Err(AccessError::MissingRole("admin"));
    }
    Ok(principal)
}

/// Whether the request says its body is JSON (`application/json`, parameters allowed).
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// 415 `unsupported_media_type` unless the request says `application/json`: a
/// cross-site form or `text/plain` POST (which needs no CORS preflight) never reaches a
/// JSON route.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    if is_json(headers) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ))
    }
}

/// How long a client may take to send a whole request body once the handler starts
/// reading it: 10 s. A body trickled a byte at a time holds a connection no longer.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a body of at most `limit` bytes within [`BODY_READ_TIMEOUT`]: 413
/// `payload_too_large` past the limit, 408 `request_timeout` past the deadline, 400
/// `bad_body` when it cannot be read.
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, ApiError>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    read_body_within(body, limit, BODY_READ_TIMEOUT).await
}

/// [`read_body`] with its own deadline for the whole body.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
/// use std::time::Duration;
/// use bytes::Bytes;
/// use futures_util::StreamExt;
/// use http_body_util::StreamBody;
/// use upcoach_core::http::{read_body_within, HttpError};
///
/// // A body whose second chunk never comes.
/// let chunks = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
///     http_body::Frame::data(Bytes::from_static(b"{")),
/// )])
/// .chain(futures_util::stream::pending());
/// let error = read_body_within(StreamBody::new(chunks), 1024, Duration::from_secs(10))
///     .await
///     .unwrap_err();
/// assert_eq!((error.status().as_u16(), error.code()), (408, "request_timeout"));
/// # });
/// ```
pub async fn read_body_within<B>(
    body: B,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, ApiError>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Ok(read) = tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s",
                deadline.as_secs_f64()
            ),
        ));
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is larger than {limit} bytes"),
            ))
        }
        Err(_) => Err(ApiError::bad_request(
            "bad_body",
            "the request body could not be read",
        )),
    }
}

/// Reads a JSON request of at most `limit` bytes: [`require_json`], then
/// [`read_body`], then serde (400 `invalid_json`).
pub async fn read_json<T, B>(request: Request<B>, limit: usize) -> Result<T, ApiError>
where
    T: DeserializeOwned,
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    require_json(request.headers())?;
    let bytes = read_body(request.into_body(), limit).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON for this route: {e}"),
        )
    })
}

mod connections;
mod handoff;
pub mod protect;
#[cfg(feature = "server")]
pub mod serve;

pub use connections::{ConnectionLimits, ConnectionPermit, ConnectionRefused, HeldStream};
pub use handoff::{
    ConnectionHandoff, HandedOff, HandoffBody, HandoffIo, HandoffStream, ServedStream,
};

/// The address of the peer that sent a request, as the server saw it: servers insert
/// it into each request's extensions (the reference server does; an axum host copies
/// `ConnectInfo` into it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// The longest user agent kept, in bytes; longer ones are cut.
pub const MAX_USER_AGENT_LEN: usize = 512;

/// What a request says about its client: the peer's address ([`ClientAddr`], when the
/// server recorded one) and `User-Agent` (bytes that are not UTF-8 replaced, cut to
/// [`MAX_USER_AGENT_LEN`] bytes). The platform is the caller's to add.
pub fn client_facts(headers: &HeaderMap, extensions: &http::Extensions) -> ClientFacts {
    facts_of(
        extensions.get::<ClientAddr>().copied(),
        headers.get(header::USER_AGENT),
    )
}

/// [`client_facts`] from the two things it reads, for a layer that kept only those.
pub(crate) fn facts_of(addr: Option<ClientAddr>, user_agent: Option<&HeaderValue>) -> ClientFacts {
    let user_agent = user_agent
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .map(|ua| {
            let mut end = ua.len().min(MAX_USER_AGENT_LEN);
            while !ua.is_char_boundary(end) {
                end -= 1;
            }
            ua[..end].to_owned()
        })
        .filter(|ua| !ua.is_empty());
    ClientFacts {
        ip: addr.map(|a| a.0.ip()),
        user_agent,
        platform: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_json_value_serde_refuses_answers_500_and_keeps_nothing() {
        // JSON object keys are strings: serde refuses a map keyed by pairs.
        let refused = || std::collections::BTreeMap::from([((1u8, 2u8), 3u8)]);
        let kept = KeptJson::default();
        assert!(kept.bytes(refused()).is_err());
        let answer = kept.response::<http_body_util::Full<Bytes>>(StatusCode::OK, refused());
        assert_eq!(answer.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(kept.last.lock().unwrap().is_none(), "nothing kept");
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn bearer_tokens_are_parsed_one_way() {
        let ok = |v: &str| {
            bearer_token(&headers(&[("authorization", v)]))
                .map(str::to_owned)
                .map_err(|e| e.code())
        };
        assert_eq!(ok("Bearer a.b.c"), Ok("a.b.c".into()));
        assert_eq!(ok("bearer a.b.c"), Ok("a.b.c".into()));
        assert_eq!(ok("BEARER  a.b.c "), Ok("a.b.c".into()));
        assert_eq!(ok("Basic dXNlcg=="), Err("token_malformed"));
        assert_eq!(ok("Bearer"), Err("token_malformed"));
        assert_eq!(ok("Bearer "), Err("token_malformed"), "present but empty");
        assert_eq!(ok("Bearer a b"), Err("token_malformed"));
        assert_eq!(
            ok(&format!("Bearer {}", "x".repeat(MAX_BEARER_LEN + 1))),
            Err("token_malformed")
        );
        assert_eq!(
            bearer_token(&HeaderMap::new()).unwrap_err().code(),
            "token_missing"
        );
    }

    /// A verifier that knows `known` without waiting and refuses everything it is
    /// asked to verify, counting the calls.
    #[derive(Debug, Default)]
    struct KnowsOne {
        verified: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl TokenVerifier for KnowsOne {
        async fn verify(&self, _: &str) -> Result<Principal, TokenError> {
            self.verified
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(TokenError::Invalid { reason: "unknown" })
        }

        fn verify_known(&self, bearer: &str) -> Option<Result<Principal, TokenError>> {
            (bearer == "known").then(|| {
                Ok(Principal::new(
                    crate::UserId::new(),
                    vec![crate::Role::ADMIN],
                    crate::SessionId::new(),
                    std::time::SystemTime::now() + std::time::Duration::from_secs(60),
                ))
            })
        }
    }

    /// `authenticate` takes the verifier's known answer when it has one, and asks
    /// `verify` for anything else.
    #[tokio::test]
    async fn authenticate_takes_a_known_answer_and_asks_for_the_rest() {
        let verifier = KnowsOne::default();
        let known = authenticate(&verifier, &headers(&[("authorization", "Bearer known")])).await;
        assert!(known.unwrap().is_admin());
        assert_eq!(
            verifier.verified.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        let other = authenticate(&verifier, &headers(&[("authorization", "Bearer other")])).await;
        assert_eq!(other.unwrap_err().code(), "token_invalid");
        assert_eq!(
            verifier.verified.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    }

    /// [`bearer_token`] as it was first written, over the header's text.
    fn bearer_token_by_text(headers: &HeaderMap) -> Result<&str, TokenError> {
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(TokenError::Missing)?;
        let text = value.to_str().map_err(|_| TokenError::Malformed)?;
        let (scheme, token) = text.split_once(' ').ok_or(TokenError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(TokenError::Malformed);
        }
        checked_token(token.trim())
    }

    #[test]
    fn bearer_tokens_read_as_bytes_as_they_read_as_text() {
        let long = format!("Bearer {}", "x".repeat(MAX_BEARER_LEN));
        let longer = format!("{long}x");
        let values: Vec<&[u8]> = vec![
            b"Bearer a.b.c",
            b"bEaReR a.b.c",
            b"Bearer \t a.b.c \t ",
            b"Bearer\ta.b.c",
            b"\tBearer a.b.c",
            b"Bearer  ",
            b"Bearer \t",
            b"Bearer a\tb",
            b"Bearer a b",
            b"Bearer a.b.c\x7f",
            b"Bearer a.b.c\xc3\xa9",
            b"Bearer \xc2\xa0a.b.c",
            b"Bearer\xc3\xa9 a.b.c",
            b"Bearerx a.b.c",
            b" Bearer a.b.c",
            b"Token a.b.c",
            b"",
            b" ",
            long.as_bytes(),
            longer.as_bytes(),
        ];
        for value in values {
            // A value no header can hold (DEL) never reaches the parser.
            let Ok(value) = HeaderValue::from_bytes(value) else {
                continue;
            };
            let mut map = HeaderMap::new();
            map.insert(header::AUTHORIZATION, value);
            assert_eq!(
                bearer_token(&map).map_err(|e| e.code()),
                bearer_token_by_text(&map).map_err(|e| e.code()),
                "{:?}",
                map[header::AUTHORIZATION]
            );
        }
    }

    #[test]
    fn the_query_is_read_only_without_a_header() {
        let request = Request::get("/sse?access_token=a%2Eb&rooms=x")
            .body(())
            .unwrap();
        assert_eq!(bearer_token_or_query(&request).unwrap(), "a.b");
        let request = Request::get("/sse?access_token=q")
            .header("authorization", "Basic x")
            .body(())
            .unwrap();
        assert_eq!(
            bearer_token_or_query(&request).unwrap_err().code(),
            "token_malformed"
        );
        let request = Request::get("/sse?access_token=q")
            .header("authorization", "Bearer ")
            .body(())
            .unwrap();
        assert_eq!(
            bearer_token_or_query(&request).unwrap_err().code(),
            "token_malformed"
        );
        let request = Request::get("/sse?access_token=").body(()).unwrap();
        assert_eq!(
            bearer_token_or_query(&request).unwrap_err().code(),
            "token_missing"
        );
    }

    #[test]
    fn only_json_is_json() {
        assert!(is_json(&headers(&[("content-type", "application/json")])));
        assert!(is_json(&headers(&[(
            "content-type",
            "Application/JSON; charset=utf-8"
        )])));
        for other in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "application/jsonx",
        ] {
            assert!(!is_json(&headers(&[("content-type", other)])), "{other}");
        }
        assert_eq!(
            require_json(&HeaderMap::new()).unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }

    #[tokio::test]
    async fn json_bodies_are_bounded_and_typed() {
        let request = |ct: &str, body: &'static str| {
            Request::post("/")
                .header("content-type", ct)
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap()
        };
        let ok: serde_json::Value = read_json(request("application/json", r#"{"a":1}"#), 64)
            .await
            .unwrap();
        assert_eq!(ok["a"], 1);
        let e = read_json::<serde_json::Value, _>(request("text/plain", r#"{"a":1}"#), 64)
            .await
            .unwrap_err();
        assert_eq!(e.code, "unsupported_media_type");
        let e = read_json::<serde_json::Value, _>(request("application/json", "{}  "), 2)
            .await
            .unwrap_err();
        assert_eq!(e.code, "payload_too_large");
        let e = read_json::<serde_json::Value, _>(request("application/json", "nope"), 64)
            .await
            .unwrap_err();
        assert_eq!(e.code, "invalid_json");
    }

    #[test]
    fn server_errors_show_no_detail() {
        #[derive(Debug, thiserror::Error)]
        #[error("redis at 10.0.0.7:6379 refused")]
        struct Down;
        impl HttpError for Down {
            fn status(&self) -> StatusCode {
                StatusCode::SERVICE_UNAVAILABLE
            }
            fn code(&self) -> &'static str {
                "cache_unavailable"
            }
        }
        let response: Response<Full<Bytes>> = error_response(&Down);
        assert_eq!(response.status(), 503);
        assert!(Down.is_retryable());
        assert!(!Down.message().contains("10.0.0.7"));
    }

    #[test]
    fn facts_come_from_headers_and_the_peer() {
        let mut request = Request::get("/")
            .header("user-agent", "é".repeat(400))
            .body(())
            .unwrap();
        request
            .extensions_mut()
            .insert(ClientAddr("192.0.2.7:4000".parse().unwrap()));
        let facts = client_facts(request.headers(), request.extensions());
        assert_eq!(facts.ip, Some("192.0.2.7".parse().unwrap()));
        let ua = facts.user_agent.unwrap();
        assert!(ua.len() <= MAX_USER_AGENT_LEN && ua.starts_with('é'));
    }
}
