//! Sign in with Google: one [`OpenIdProvider`] configured by `GOOGLE_*`
//! ([`OpenIdConfig::google`]): Google's issuer (or `GOOGLE_ISSUER_URL`), its two issuer
//! spellings, the web, mobile and extra client ids as audiences, `hd` when
//! `GOOGLE_HOSTED_DOMAIN` is set, and addresses trusted for linking.
//!
//! ```no_run
//! use std::sync::Arc;
//! use upcoach_auth::config::AuthConfig;
//! use upcoach_core::config::Settings;
//! use upcoach_core::SystemClock;
//!
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = AuthConfig::from_env()?;
//! let google = config.google.as_ref().expect("GOOGLE_* set");
//! let provider = upcoach_auth::google::provider(
//!     google,
//!     "https://api.example.com/auth/google/callback",
//!     Arc::new(SystemClock),
//! )?;
//! # let _ = provider; Ok(()) }
//! ```

use std::sync::Arc;

use upcoach_core::Clock;

use crate::Error;
use crate::config::GoogleConfig;
pub use crate::oidc::provider_http_client;
use crate::oidc::{OpenIdConfig, OpenIdProvider};

/// Google sign-in: an [`OpenIdProvider`] named `google`.
pub type GoogleProvider = OpenIdProvider;

/// The Google provider of `config`, with `redirect_uri` as its callback; discovery runs
/// on the first sign-in.
pub fn provider(
    config: &GoogleConfig,
    redirect_uri: &str,
    clock: Arc<dyn Clock>,
) -> Result<GoogleProvider, Error> {
    OpenIdProvider::new(&OpenIdConfig::google(config), redirect_uri, clock)
}
