//! Entry points for the project's fuzz targets (`fuzz/`, see the README's "Hostile input
//! and soak"): parsers that run on untrusted input before any signature is checked, and
//! that the public API reaches only behind a key fetch or a request body. Not an API
//! for hosts: hidden from the docs, and free to change.

use jsonwebtoken::Algorithm;

use crate::oidc::{IdTokenError, IdTokenRules, MAX_ID_TOKEN_LEN};

/// What [`IdTokenVerifier::verify`](crate::oidc::IdTokenVerifier::verify) reads from a
/// token before it fetches a key or checks the signature: the pinned algorithm and the
/// `kid`, or why the token is refused. Never panics.
pub fn id_token_header(
    rules: &IdTokenRules,
    token: &str,
) -> Result<(Algorithm, String), IdTokenError> {
    if token.len() > MAX_ID_TOKEN_LEN {
        return Err(IdTokenError::Malformed);
    }
    crate::oidc::token_header(rules, token)
}

/// The one `signed_request` field of a Facebook callback's form body, as
/// `POST /auth/facebook/deauthorize` and `/data-deletion` read it, or the error code
/// they answer with. Never panics.
#[cfg(feature = "http")]
pub fn signed_request_field(body: &[u8]) -> Result<String, &'static str> {
    crate::http::signed_request_field(body).map_err(|e| e.code)
}
