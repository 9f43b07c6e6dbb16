//! [`AuthProvider`]: turns a provider's credential into a [`VerifiedIdentity`].

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Error;

/// A sign-in provider's name, as in routes (`/auth/{provider}`), in the
/// `user_identities` table and in security events: 1 to [`ProviderId::MAX_LEN`] bytes of
/// lowercase ASCII letters, digits and `-`, starting with a letter.
///
/// The three providers this crate implements have constants; a generic OpenID Connect
/// provider gets the name its configuration gives it. The name is held inline, so a
/// `ProviderId` is `Copy` and costs no allocation.
///
/// ```
/// use upcoach_auth::ProviderId;
///
/// let gitlab: ProviderId = "gitlab".parse()?;
/// assert_eq!(gitlab.as_str(), "gitlab");
/// assert_eq!("google".parse::<ProviderId>()?, ProviderId::GOOGLE);
/// assert!("GitLab".parse::<ProviderId>().is_err());
/// assert!("../etc".parse::<ProviderId>().is_err());
/// # Ok::<(), upcoach_auth::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderId {
    len: u8,
    bytes: [u8; ProviderId::MAX_LEN],
}

impl ProviderId {
    /// The longest name, in bytes.
    pub const MAX_LEN: usize = 32;
    /// Google (OpenID Connect).
    pub const GOOGLE: ProviderId = ProviderId::from_static("google");
    /// Sign in with Apple.
    pub const APPLE: ProviderId = ProviderId::from_static("apple");
    /// Facebook Login.
    pub const FACEBOOK: ProviderId = ProviderId::from_static("facebook");

    /// The name `name`, if it is a valid provider name.
    pub const fn new(name: &str) -> Option<Self> {
        let src = name.as_bytes();
        if src.is_empty() || src.len() > Self::MAX_LEN || !src[0].is_ascii_lowercase() {
            return None;
        }
        let mut bytes = [0u8; Self::MAX_LEN];
        let mut i = 0;
        while i < src.len() {
            let b = src[i];
            if !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                return None;
            }
            bytes[i] = b;
            i += 1;
        }
        Some(Self {
            len: src.len() as u8,
            bytes,
        })
    }

    /// A name known when the program is written, for constants.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid provider name; in a `const` that is a compile error.
    pub const fn from_static(name: &'static str) -> Self {
        match Self::new(name) {
            Some(id) => id,
            None => panic!("not a valid provider name"),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (see `new`).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProviderId({:?})", self.as_str())
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
        Self::new(s).ok_or(Error::UnknownProvider)
    }
}

impl Serialize for ProviderId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ProviderId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::new(&name).ok_or_else(|| {
            serde::de::Error::invalid_value(serde::de::Unexpected::Str(&name), &"a provider name")
        })
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
    /// An authorization code the provider gave a native app (Sign in with Apple's
    /// `authorizationCode`), exchanged with the app's own client id, and the raw nonce
    /// the id token it yields must carry (hashed, for Apple).
    AuthorizationCode {
        /// The one-time code.
        code: String,
        /// The raw nonce the app sent with its request.
        nonce: Option<String>,
    },
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
            NativeCredential::AuthorizationCode { .. } => {
                f.write_str("NativeCredential::AuthorizationCode([redacted])")
            }
        }
    }
}

/// One sign-in provider: its authorization URL, its code exchange and its native
/// sign-in, each ending in a [`VerifiedIdentity`] only when every check passed.
///
/// [`OpenIdProvider`](crate::oidc::OpenIdProvider) (Google and any OpenID provider),
/// [`AppleProvider`](crate::apple::AppleProvider) and
/// [`FacebookProvider`](crate::facebook::FacebookProvider) implement it. A provider of
/// your own looks like this:
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
///         ProviderId::GOOGLE
///     }
///     async fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, Error> {
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
///                 provider: ProviderId::GOOGLE,
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

    /// The provider's own say on whether its verified addresses link to an existing
    /// account by themselves ([`LinkingPolicy`](crate::users::LinkingPolicy)), used
    /// when the host sets no policy of its own; `None` (the default) leaves it to
    /// [`LinkingPolicy::default`](crate::users::LinkingPolicy::default).
    fn trusted_for_linking(&self) -> Option<bool> {
        None
    }

    /// Whether the provider sends the browser back by a cross-site `POST`
    /// (`response_mode=form_post`, as Sign in with Apple does), so the flow cookie must
    /// be `SameSite=None; Secure` to come along. `false` (a `GET` redirect, for which
    /// the default `SameSite=Lax` cookie comes along) unless a provider says otherwise.
    fn cross_site_callback(&self) -> bool {
        false
    }

    /// Where to send the browser to start a sign-in.
    async fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, Error>;

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
