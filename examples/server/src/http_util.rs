//! Response bodies, JSON answers and the one place errors become HTTP.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;

/// The body type of every response.
pub type Body = BoxBody<Bytes, Infallible>;

/// An error answer: `{"error": {"code", "message"}}` with a fitting status.
///
/// `code` is stable and snake_case; `message` is for people and carries no internal
/// detail.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code.
    pub code: &'static str,
    /// The human text.
    pub message: String,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 404 `not_found`.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// The JSON response.
    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        });
        json_response(self.status, &body)
    }
}

/// A JSON response with `status`.
pub(crate) fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut response = Response::new(full(bytes));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "a response could not be serialized");
            let mut response = Response::new(full(
                &br#"{"error":{"code":"internal_error","message":"internal error"}}"#[..],
            ));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

/// A complete body from bytes.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// Reads a JSON request body of at most `limit` bytes.
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    body: hyper::body::Incoming,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the request body is larger than {limit} bytes"),
                )
            } else {
                ApiError::bad_request("bad_body", "the request body could not be read")
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON for this route: {e}"),
        )
    })
}
