//! What both transports need from the HTTP request, and their refusals.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use upcoach_core::{Principal, TokenError};

use crate::hub::{Inner, RealtimeBody, Refusal};

/// API.md's error answer: `{"error":{"code","message"}}`.
pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<RealtimeBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let mut response = Response::new(body_from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub(crate) fn body_from(bytes: impl Into<Bytes>) -> RealtimeBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub(crate) fn refusal_response(refusal: Refusal) -> Response<RealtimeBody> {
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
    };
    let mut response = error_response(status, refusal.code(), message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

/// The query parameter `name`, percent-decoded.
pub(crate) fn query_param<B>(request: &Request<B>, name: &str) -> Option<String> {
    let query = request.uri().query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The bearer token from `Authorization`, else from `access_token=`.
pub(crate) fn bearer<B>(request: &Request<B>) -> Option<String> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned())
            .filter(|t| !t.is_empty());
    }
    query_param(request, "access_token").filter(|t| !t.is_empty())
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
    let status = if error.is_retryable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::UNAUTHORIZED
    };
    let mut response = error_response(status, error.code(), &error.to_string());
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}
