//! [`TokenVerifier`]: turns a bearer string into a [`Principal`], so the realtime and perf
//! crates can authenticate callers without depending on the auth crate.

use std::fmt;

use async_trait::async_trait;

use crate::Principal;

/// Why a bearer token was not accepted.
///
/// Every variant maps to 401 for an HTTP client (close code 4001 on a WebSocket), except
/// [`TokenError::Unavailable`], which means the verifier could not decide (503).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// No token was presented.
    #[error("no bearer token was presented")]
    Missing,
    /// The token is not a well-formed token of the expected kind.
    #[error("the bearer token is malformed")]
    Malformed,
    /// The token was valid once and has expired.
    #[error("the bearer token has expired")]
    Expired,
    /// The token's signature, issuer, audience or another check failed.
    #[error("the bearer token is invalid: {reason}")]
    Invalid {
        /// A short, stable reason (no token material).
        reason: &'static str,
    },
    /// The session behind the token has been revoked.
    #[error("the session has been revoked")]
    Revoked,
    /// The verifier could not reach what it needs to decide (a key store, say).
    #[error("the token could not be verified right now")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl TokenError {
    /// A stable, snake_case code for clients and logs.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Missing => "token_missing",
            TokenError::Malformed => "token_malformed",
            TokenError::Expired => "token_expired",
            TokenError::Invalid { .. } => "token_invalid",
            TokenError::Revoked => "token_revoked",
            TokenError::Unavailable(_) => "token_verifier_unavailable",
        }
    }

    /// Whether asking again later could succeed (only for [`TokenError::Unavailable`]).
    pub fn is_retryable(&self) -> bool {
        matches!(self, TokenError::Unavailable(_))
    }
}

/// Verifies a bearer token (the part after `Bearer `) and says who it belongs to.
///
/// Implementations must check the signature, the expiry (with the crate's
/// [`Clock`](crate::Clock)) and anything else that makes the token trustworthy; the
/// caller trusts the returned [`Principal`] as it is.
///
/// Implementing your own verifier:
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use async_trait::async_trait;
/// use upcoach_core::{Principal, Role, SessionId, TokenError, TokenVerifier, UserId};
///
/// /// Accepts exactly one static token; for a demo, never for production.
/// #[derive(Debug)]
/// struct OneToken {
///     token: String,
///     principal: Principal,
/// }
///
/// #[async_trait]
/// impl TokenVerifier for OneToken {
///     async fn verify(&self, bearer: &str) -> Result<Principal, TokenError> {
///         if bearer.is_empty() {
///             return Err(TokenError::Missing);
///         }
///         if upcoach_core::secret::constant_time_eq(bearer.as_bytes(), self.token.as_bytes()) {
///             Ok(self.principal.clone())
///         } else {
///             Err(TokenError::Invalid { reason: "unknown token" })
///         }
///     }
/// }
///
/// # tokio_test_block_on(async {
/// let verifier = OneToken {
///     token: "s3cret".into(),
///     principal: Principal::new(
///         UserId::new(),
///         vec![Role::ADMIN],
///         SessionId::new(),
///         SystemTime::now() + Duration::from_secs(60),
///     ),
/// };
/// assert!(verifier.verify("s3cret").await.unwrap().is_admin());
/// assert_eq!(verifier.verify("guess").await.unwrap_err().code(), "token_invalid");
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[async_trait]
pub trait TokenVerifier: fmt::Debug + Send + Sync + 'static {
    /// Verifies `bearer` and returns the principal it proves.
    async fn verify(&self, bearer: &str) -> Result<Principal, TokenError>;

    /// What [`verify`](Self::verify) would answer for `bearer` now, when that is known
    /// without waiting (a token verified before and remembered, say); `None` means
    /// "ask `verify`". Callers on a hot path, such as
    /// [`http::authenticate`](crate::http::authenticate), try this first and spare the
    /// boxed future of an `async` trait method. The default knows nothing.
    ///
    /// An answer given here must be the one `verify` would give: the same checks
    /// against the same clock.
    fn verify_known(&self, bearer: &str) -> Option<Result<Principal, TokenError>> {
        let _ = bearer;
        None
    }
}

/// A verifier that refuses every token with [`TokenError::Invalid`] and `reason`: for a
/// server that issues none (no signing key).
#[derive(Debug, Clone, Copy)]
pub struct RefuseAll {
    /// Why, as the refusal says.
    pub reason: &'static str,
}

#[async_trait]
impl TokenVerifier for RefuseAll {
    async fn verify(&self, _bearer: &str) -> Result<Principal, TokenError> {
        Err(TokenError::Invalid {
            reason: self.reason,
        })
    }
}
