//! What both transports need from the HTTP request, and their refusals.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use upcoach_core::http::HttpError;
use upcoach_core::{Principal, TokenError};

use crate::hub::{Inner, RealtimeBody, Refusal};

/// API.md's error answer: `{"error":{"code","message"}}`.
pub(crate) fn error_response(
    status: StatusCode,
    code: &'static str,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> Response<RealtimeBody> {
    http_error(&upcoach_core::http::ApiError::new(status, code, message))
}

/// The answer of any error, with the realtime body type.
pub(crate) fn http_error(error: &(impl HttpError + ?Sized)) -> Response<RealtimeBody> {
    upcoach_core::http::error_response::<Full<Bytes>>(error)
        .map(|body| body.map_err(|never: Infallible| match never {}).boxed())
}

pub(crate) fn body_from(bytes: impl Into<Bytes>) -> RealtimeBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// The answer to a connection the hub did not admit. `Retry-After` is 5 s, or the
/// auth timeout for the pending-auth budget (a place there comes back within it).
pub(crate) fn refusal_response(hub: &Inner, refusal: Refusal) -> Response<RealtimeBody> {
    let (status, message) = match refusal {
        Refusal::ShuttingDown => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ),
        Refusal::TooManyConnections => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the server holds as many realtime connections as it may",
        ),
        Refusal::TooManyForUser => (
            StatusCode::TOO_MANY_REQUESTS,
            "this user holds as many realtime connections as it may",
        ),
        Refusal::TooManyPending => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections are waiting to authenticate; \
             send the token with the upgrade or retry later",
        ),
    };
    let retry_after = match refusal {
        Refusal::TooManyPending => {
            let timeout = hub.config.auth_timeout;
            // Whole seconds, rounded up, at least one.
            (timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0)).max(1)
        }
        _ => 5,
    };
    let mut response = error_response(status, refusal.code(), message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

/// The query parameter `name`, percent-decoded.
pub(crate) fn query_param<B>(request: &Request<B>, name: &str) -> Option<String> {
    upcoach_core::http::query_param(request.uri().query(), name).map(|v| v.into_owned())
}

/// The bearer token from `Authorization`, else from `access_token=` (the one parser
/// of every crate: [`upcoach_core::http::bearer_token_or_query`]).
pub(crate) fn bearer<B>(request: &Request<B>) -> Result<String, TokenError> {
    upcoach_core::http::bearer_token_or_query(request).map(|t| t.into_owned())
}

/// Whether the request's `Origin` (if any) is allowed. Absent means not a browser.
pub(crate) fn origin_allowed(hub: &Inner, headers: &HeaderMap) -> Result<Option<HeaderValue>, ()> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(None);
    };
    let text = origin.to_str().map_err(|_| ())?;
    if hub.config.allowed_origins.iter().any(|o| o == text) {
        Ok(Some(origin.clone()))
    } else {
        Err(())
    }
}

pub(crate) fn origin_refused() -> Response<RealtimeBody> {
    error_response(
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
        "this origin may not open realtime connections",
    )
}

/// Verifies a token and checks its expiry by the hub's clock.
pub(crate) async fn verify(hub: &Inner, token: &str) -> Result<Principal, TokenError> {
    let principal = hub.verifier.verify(token).await?;
    if principal.is_expired(hub.clock.as_ref()) {
        return Err(TokenError::Expired);
    }
    Ok(principal)
}

pub(crate) fn token_refused(error: &TokenError) -> Response<RealtimeBody> {
    http_error(error)
}
