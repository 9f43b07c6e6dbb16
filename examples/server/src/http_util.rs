//! The server's response body type.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

/// The body type of every response.
pub type Body = BoxBody<Bytes, Infallible>;

pub(crate) use crate::router::json as json_response;
