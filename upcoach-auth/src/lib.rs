//! Sign-in for upcoach servers.
//!
//! What exists so far:
//! - [`session`]: our own short-lived access tokens (EdDSA JWTs with `kid`), a
//!   [`TokenVerifier`](upcoach_core::TokenVerifier) for them, and their JWK Set.
//! - [`AuthProvider`]: the seam the Google, Apple and Facebook providers will implement.
//!
//! Not built yet: the providers, id-token verification against provider JWKS, the
//! authorization-code flow and its flow store, refresh tokens, users and linking.
//!
//! ```
//! use std::sync::Arc;
//! use upcoach_auth::session::{AccessTokens, SigningKey};
//! use upcoach_core::{Role, SessionId, SystemClock, TokenVerifier, UserId};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let tokens = AccessTokens::new(SigningKey::generate()?, Arc::new(SystemClock));
//! let issued = tokens.issue(UserId::new(), vec![Role::COACH], SessionId::new())?;
//! assert!(tokens.verify(&issued.token).await.is_ok());
//! # Ok::<(), upcoach_auth::Error>(())
//! # }).unwrap();
//! ```

pub mod flow;
pub mod oidc;
mod provider;
pub mod refresh;
pub mod session;
#[cfg(feature = "testing")]
pub mod testing;
pub mod users;

pub use provider::{
    AuthProvider, AuthorizationRequest, NativeCredential, ProviderId, VerifiedIdentity,
};

/// What can go wrong in sign-in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The provider name is not `google`, `apple` or `facebook`.
    #[error("unknown provider: expected google, apple or facebook")]
    UnknownProvider,
    /// A provider credential failed a check.
    #[error("invalid credential: {reason}")]
    InvalidCredential {
        /// A short, stable reason.
        reason: &'static str,
    },
    /// Key generation, signing or key parsing failed.
    #[error("cryptographic operation failed")]
    Crypto(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// A stable, snake_case code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            Error::UnknownProvider => "unknown_provider",
            Error::InvalidCredential { .. } => "invalid_credential",
            Error::Crypto(_) => "internal_error",
        }
    }

    /// Whether trying again later could succeed.
    pub fn is_retryable(&self) -> bool {
        false
    }
}
