//! Sign-in for upcoach servers.
//!
//! - [`session`]: our own short-lived access tokens (EdDSA JWTs with `kid`, current and
//!   previous key), a [`TokenVerifier`](upcoach_core::TokenVerifier) for them, and
//!   their JWK Set.
//! - [`refresh`]: opaque refresh tokens stored as hashes, rotated on every use, reuse
//!   revoking the family ([`RefreshStore`](refresh::RefreshStore): memory, Postgres).
//! - [`oidc`]: id-token verification with pinned algorithms and a cached, rate-limited
//!   JWKS per issuer, and [`OpenIdProvider`](oidc::OpenIdProvider): any OpenID Connect
//!   provider from configuration (lazy discovery, code flow with PKCE through the
//!   `oauth2` crate, UserInfo, native id tokens).
//! - [`google`]: Google, one configured `OpenIdProvider`.
//! - [`apple`]: Sign in with Apple ([`AppleProvider`](apple::AppleProvider)): the ES256
//!   client secret (made and renewed, never pasted), the `form_post` web flow, native id
//!   tokens and codes with hashed nonces, and verified server-to-server notifications.
//! - [`facebook`]: Facebook Login ([`FacebookProvider`](facebook::FacebookProvider)):
//!   `debug_token` and `/me` with `appsecret_proof`, Limited Login, and `signed_request`
//!   verification for the deauthorize and data-deletion callbacks.
//! - [`deletion`]: data-deletion requests and their confirmation codes
//!   ([`DeletionStore`](deletion::DeletionStore): memory, Postgres).
//! - [`web`]: the browser flow around a provider (state, nonce, PKCE in a
//!   [`FlowStore`](flow::FlowStore), browser binding, `return_to` allow-list, login
//!   codes).
//! - [`users`]: users and their identities, keyed by (provider, subject), with the
//!   linking policy ([`UserStore`](users::UserStore): memory, Postgres).
//! - [`threat`]: sliding-window detectors (brute force, credential stuffing,
//!   refresh-token reuse, sign-in bursts) over the security events, as an
//!   [`EventLog`](upcoach_core::event::EventLog) wrapper that raises alerts and blocks
//!   offenders (state: memory, Redis).
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

pub mod apple;
pub mod config;
pub mod deletion;
mod digest;
pub mod facebook;
pub mod flow;
#[doc(hidden)]
pub mod fuzzing;
pub mod google;
#[cfg(feature = "http")]
pub mod http;
pub mod oidc;
mod provider;
pub mod refresh;
pub mod session;
pub mod sessions;
#[cfg(feature = "testing")]
pub mod testing;
pub mod threat;
pub mod users;
pub mod web;

pub use provider::{
    AuthProvider, AuthorizationRequest, NativeCredential, ProviderId, VerifiedIdentity,
};

/// What can go wrong in sign-in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The provider name is not a valid one ([`ProviderId`]).
    #[error("unknown provider: a provider name is lowercase letters, digits and -")]
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
    /// The provider's id token was refused.
    #[error(transparent)]
    IdToken(#[from] oidc::IdTokenError),
    /// The account is not of the configured Google Workspace domain.
    #[error("this account is not of the allowed hosted domain")]
    WrongHostedDomain,
    /// The provider refused the authorization code (used before, expired, or the PKCE
    /// verifier does not match).
    #[error("the provider refused the authorization code")]
    CodeRejected,
    /// The provider could not be reached or answered unexpectedly.
    #[error("the sign-in provider is unavailable")]
    ProviderUnavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The provider refused this server's own credentials (OAuth `invalid_client` or
    /// `unauthorized_client`: a wrong client secret, key or client id). Trying again
    /// does not help until the configuration is fixed; it is logged as an error.
    #[error("the sign-in provider refused this server's client credentials")]
    ProviderMisconfigured(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// A stable, snake_case code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            Error::UnknownProvider => "unknown_provider",
            Error::InvalidCredential { reason } => reason,
            Error::Crypto(_) => "internal_error",
            Error::IdToken(e) => e.code(),
            Error::WrongHostedDomain => "wrong_hosted_domain",
            Error::CodeRejected => "authorization_code_rejected",
            Error::ProviderUnavailable(_) => "provider_unavailable",
            Error::ProviderMisconfigured(_) => "provider_misconfigured",
        }
    }

    /// Whether trying again later could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::ProviderUnavailable(_) => true,
            Error::IdToken(e) => e.is_retryable(),
            _ => false,
        }
    }
}
