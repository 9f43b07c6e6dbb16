//! [`AuthProvider`]: turns a provider's credential into a [`VerifiedIdentity`].

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Error;

/// A sign-in provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderId {
    /// Google (OpenID Connect).
    Google,
    /// Sign in with Apple.
    Apple,
    /// Facebook Login.
    Facebook,
}

impl ProviderId {
    /// `google`, `apple` or `facebook`, as in routes and the `user_identities` table.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderId::Google => "google",
            ProviderId::Apple => "apple",
            ProviderId::Facebook => "facebook",
        }
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProviderId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "google" => Ok(ProviderId::Google),
            "apple" => Ok(ProviderId::Apple),
            "facebook" => Ok(ProviderId::Facebook),
            _ => Err(Error::UnknownProvider),
        }
    }
}

/// Who the provider says the person is, after every check passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedIdentity {
    /// The provider.
    pub provider: ProviderId,
    /// The provider's stable subject identifier (`sub`); with `provider`, the key of an
    /// identity.
    pub subject: String,
    /// The e-mail address the provider reported, if any.
    pub email: Option<String>,
    /// Whether the provider says it verified that address.
    pub email_verified: bool,
    /// A display name, if the provider gave one.
    pub name: Option<String>,
    /// Until when the credential that proved this identity is still accepted by the
    /// verifier (an id token's `exp` plus the verifier's leeway, as
    /// [`IdTokenVerifier::accepted_until`](crate::oidc::IdTokenVerifier::accepted_until)
    /// computes it), so a caller can remember a one-time nonce at least that long; `None`
    /// when the credential carries no expiry.
    #[serde(default)]
    pub expires_at: Option<SystemTime>,
}

/// A credential a native app obtained from the provider itself.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NativeCredential {
    /// An OpenID Connect id token and the raw nonce the app sent with its request.
    IdToken {
        /// The id token (a JWT).
        id_token: String,
        /// The raw nonce, which the token must carry (hashed, for Apple).
        nonce: Option<String>,
    },
    /// An OAuth access token (Facebook classic login).
    AccessToken(String),
}

impl fmt::Debug for NativeCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NativeCredential::IdToken { .. } => {
                f.write_str("NativeCredential::IdToken([redacted])")
            }
            NativeCredential::AccessToken(_) => {
                f.write_str("NativeCredential::AccessToken([redacted])")
            }
        }
    }
}

/// One sign-in provider: its authorization URL, its code exchange and its native
/// sign-in, each ending in a [`VerifiedIdentity`] only when every check passed.
///
/// [`GoogleProvider`](crate::google::GoogleProvider) and
/// [`FacebookProvider`](crate::facebook::FacebookProvider) implement it; Apple is still
/// to come. A provider of your own looks like this:
///
/// ```
/// use async_trait::async_trait;
/// use upcoach_auth::{AuthProvider, AuthorizationRequest, Error, NativeCredential, ProviderId, VerifiedIdentity};
///
/// /// Accepts one fixed test credential; never for production.
/// #[derive(Debug)]
/// struct Fixture;
///
/// #[async_trait]
/// impl AuthProvider for Fixture {
///     fn id(&self) -> ProviderId {
///         ProviderId::Google
///     }
///     fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, Error> {
///         let mut url = url::Url::parse("https://provider.invalid/authorize").unwrap();
///         url.query_pairs_mut()
///             .append_pair("state", &request.state)
///             .append_pair("nonce", &request.nonce)
///             .append_pair("code_challenge", &request.code_challenge)
///             .append_pair("code_challenge_method", "S256")
///             .append_pair("redirect_uri", &request.redirect_uri);
///         Ok(url)
///     }
///     async fn exchange_code(&self, _code: &str, _request: &AuthorizationRequest, _verifier: &str)
///         -> Result<VerifiedIdentity, Error> {
///         Err(Error::InvalidCredential { reason: "fixture has no codes" })
///     }
///     async fn verify_native(&self, credential: &NativeCredential) -> Result<VerifiedIdentity, Error> {
///         match credential {
///             NativeCredential::IdToken { id_token, .. } if id_token == "fixture" => Ok(VerifiedIdentity {
///                 provider: ProviderId::Google,
///                 subject: "1".into(),
///                 email: None,
///                 email_verified: false,
///                 name: None,
///                 expires_at: None,
///             }),
///             _ => Err(Error::InvalidCredential { reason: "unknown fixture credential" }),
///         }
///     }
/// }
/// ```
#[async_trait]
pub trait AuthProvider: fmt::Debug + Send + Sync + 'static {
    /// Which provider this is.
    fn id(&self) -> ProviderId;

    /// The provider's issuer identifier, stored with each flow so that a callback naming
    /// another issuer (RFC 9207 `iss`) is refused. `None` for providers without one.
    fn issuer(&self) -> Option<&str> {
        None
    }

    /// Where to send the browser to start a sign-in.
    fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, Error>;

    /// Exchanges an authorization code (with the PKCE `verifier` kept for this flow) and
    /// verifies the identity it yields against `request`.
    async fn exchange_code(
        &self,
        code: &str,
        request: &AuthorizationRequest,
        verifier: &str,
    ) -> Result<VerifiedIdentity, Error>;

    /// Verifies a credential obtained by a native app.
    async fn verify_native(&self, credential: &NativeCredential)
    -> Result<VerifiedIdentity, Error>;
}

/// The public half of one authorization-code flow, as sent to the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationRequest {
    /// The `state` value binding the callback to this flow.
    pub state: String,
    /// The `nonce` the id token must carry.
    pub nonce: String,
    /// The PKCE S256 challenge of the flow's verifier.
    pub code_challenge: String,
    /// The exact redirect URI registered with the provider.
    pub redirect_uri: String,
}
