//! The browser sign-in flow around a provider (RFC 9700 §2.1, §4.4, §4.5; RFC 7636):
//! state, nonce and a PKCE S256 verifier kept server-side in a [`FlowStore`] for ten
//! minutes and used once; the flow bound to the browser that started it by a cookie;
//! the provider it was started for recorded (mix-up defence); `return_to` only from an
//! exact allow-list; and a one-time, 60 s `login_code` instead of tokens in a URL.
//!
//! The login code is bound to the browser that began the sign-in, so a code planted by
//! someone else (login CSRF: an attacker finishes a sign-in in their own browser and
//! sends the victim the `return_to?login_code=` link) is refused: redeeming it needs
//! either that browser's flow cookie, or the verifier whose S256 challenge the web app
//! passed as `login_challenge` when it began ([`LoginProof`]).
//!
//! Two things around the flow live in [`Sessions`](crate::sessions::Sessions): the
//! quota on flows started (per address and in total, checked after
//! [`WebSignIn::check_start`] and before anything is stored), and the device the
//! session is bound to when the flow ends (the browser's device cookie, set at
//! `authorize`, or the web app's `X-Device-Id`, at the exchange; without either, a
//! random id the answer carries and the routes set as the device cookie: see
//! `upcoach_auth::http`, feature `http`).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use upcoach_core::{SessionId, UserId};

use crate::flow::{FlowError, FlowStore, FlowStoreExt};
use crate::refresh::{DeviceFingerprint, DeviceId};
use crate::{AuthProvider, AuthorizationRequest, Error, ProviderId, VerifiedIdentity};

/// How long a started sign-in may take.
pub const FLOW_TTL: Duration = Duration::from_secs(600);
/// How long a login code may wait to be exchanged.
pub const LOGIN_CODE_TTL: Duration = Duration::from_secs(60);
/// The cookie that binds a flow to its browser.
pub const FLOW_COOKIE: &str = "upcoach_flow";

/// Why a browser sign-in step was refused. Each has a stable [`code`](Self::code).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignInError {
    /// `return_to` is not exactly one of the allowed URLs.
    #[error("return_to is not an allowed URL")]
    ReturnToNotAllowed,
    /// The callback has no `state`.
    #[error("the callback carries no state")]
    StateMissing,
    /// The `state` is unknown, expired or already used.
    #[error("the sign-in state is unknown, expired or already used")]
    StateInvalid,
    /// The flow was started in another browser (its cookie is missing or different).
    #[error("this sign-in was started in another browser")]
    BrowserMismatch,
    /// The callback arrived on another provider's route than the flow was started for.
    #[error("this sign-in was started with another provider")]
    ProviderMismatch,
    /// The callback names another issuer (RFC 9207 `iss`) than the flow expects.
    #[error("the callback names another issuer than this sign-in expects")]
    IssuerMismatch,
    /// The provider reported an error (the user declined, say).
    #[error("the provider did not grant access")]
    ProviderDenied,
    /// The callback has no `code`.
    #[error("the callback carries no code")]
    CodeMissing,
    /// The login code is unknown, expired or already used.
    #[error("the login code is unknown, expired or already used")]
    LoginCodeInvalid,
    /// The login code was redeemed without proof that this browser began the sign-in:
    /// neither its flow cookie nor the verifier of its `login_challenge`.
    #[error("this login code was issued to another browser")]
    LoginCodeBrowserMismatch,
    /// `login_challenge` is not a base64url S256 challenge (43 characters).
    #[error("login_challenge must be the base64url SHA-256 of a verifier (43 characters)")]
    LoginChallengeInvalid,
    /// The provider step failed.
    #[error(transparent)]
    Provider(#[from] Error),
    /// The flow store failed.
    #[error(transparent)]
    Store(#[from] FlowError),
}

impl SignInError {
    /// A stable snake_case code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            SignInError::ReturnToNotAllowed => "return_to_not_allowed",
            SignInError::StateMissing => "state_missing",
            SignInError::StateInvalid => "state_invalid",
            SignInError::BrowserMismatch => "flow_browser_mismatch",
            SignInError::ProviderMismatch => "flow_provider_mismatch",
            SignInError::IssuerMismatch => "flow_issuer_mismatch",
            SignInError::ProviderDenied => "provider_denied",
            SignInError::CodeMissing => "code_missing",
            SignInError::LoginCodeInvalid => "login_code_invalid",
            SignInError::LoginCodeBrowserMismatch => "login_code_browser_mismatch",
            SignInError::LoginChallengeInvalid => "login_challenge_invalid",
            SignInError::Provider(e) => e.code(),
            SignInError::Store(e) => e.code(),
        }
    }

    /// Whether trying again later could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SignInError::Provider(e) => e.is_retryable(),
            SignInError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// What the server keeps about a started sign-in.
#[derive(Debug, Serialize, Deserialize)]
struct FlowState {
    provider: ProviderId,
    /// The issuer the flow expects (mix-up defence).
    issuer: Option<String>,
    nonce: String,
    pkce_verifier: String,
    redirect_uri: String,
    /// SHA-256 of the browser cookie, base64url.
    browser: String,
    return_to: Option<String>,
    platform: Option<String>,
    /// The web app's S256 challenge for redeeming the login code, if it gave one.
    #[serde(default)]
    login_challenge: Option<String>,
    /// The fingerprint (base64url) of the browser's device at `authorize`: a provider
    /// that comes back by a cross-site `POST` gets no `SameSite=Lax` device cookie, so
    /// the callback takes the device from here. Never the device id itself.
    #[serde(default)]
    device: Option<String>,
}

/// The longest display name taken from a callback's `user`.
pub const MAX_POSTED_NAME_LEN: usize = 256;

/// The name in Sign in with Apple's `user` JSON
/// (`{"name":{"firstName":"Ada","lastName":"Lovelace"},"email":"..."}`): its parts
/// joined by a space, or `None` when the JSON is malformed, has no name, or the name is
/// longer than [`MAX_POSTED_NAME_LEN`] or holds control characters.
///
/// ```
/// use upcoach_auth::web::posted_name;
///
/// let user = r#"{"name":{"firstName":"Ada","lastName":"Lovelace"},"email":"a@example.com"}"#;
/// assert_eq!(posted_name(user).as_deref(), Some("Ada Lovelace"));
/// assert_eq!(posted_name(r#"{"name":{"firstName":"Ada"}}"#).as_deref(), Some("Ada"));
/// assert_eq!(posted_name("not json"), None);
/// assert_eq!(posted_name(r#"{"name":{"firstName":"A\u0000"}}"#), None);
/// ```
pub fn posted_name(user: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Posted {
        name: Option<Name>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Name {
        first_name: Option<String>,
        last_name: Option<String>,
    }
    if user.len() > 4 * MAX_POSTED_NAME_LEN {
        return None;
    }
    let name = serde_json::from_str::<Posted>(user).ok()?.name?;
    let parts: Vec<&str> = [&name.first_name, &name.last_name]
        .into_iter()
        .flatten()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect();
    let joined = parts.join(" ");
    (!joined.is_empty()
        && joined.len() <= MAX_POSTED_NAME_LEN
        && !joined.chars().any(char::is_control))
    .then_some(joined)
}

/// A started sign-in: where to send the browser and the cookie to set on it.
#[derive(Debug)]
pub struct Started {
    /// The provider's authorization URL.
    pub redirect: url::Url,
    /// The value of the [`FLOW_COOKIE`] cookie to set (random; only its hash is kept).
    pub browser_cookie: String,
    /// Whether the provider comes back by a cross-site `POST`
    /// ([`AuthProvider::cross_site_callback`]), so the cookie must be `SameSite=None`.
    pub cross_site: bool,
}

/// What the provider's callback carries.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct CallbackParams {
    /// The `state` sent.
    pub state: Option<String>,
    /// The authorization code.
    pub code: Option<String>,
    /// An error the provider reports instead of a code.
    pub error: Option<String>,
    /// The issuer, for providers that send it (RFC 9207).
    pub iss: Option<String>,
    /// Sign in with Apple's `user`: JSON with the person's name, posted on the first
    /// authorization only. Not signed by anyone: a display name, never an identity.
    pub user: Option<String>,
}

impl CallbackParams {
    /// `state`, `code`, `error`, `iss` and `user` of a callback's query string or
    /// `application/x-www-form-urlencoded` body (Apple's `form_post`). The first of
    /// each counts and other fields are ignored. Any input reads: a byte that is not
    /// UTF-8 becomes U+FFFD, so a value is at most three times the input's length.
    pub fn from_form(encoded: &[u8]) -> Self {
        let mut params = Self::default();
        for (key, value) in url::form_urlencoded::parse(encoded) {
            let slot = match &*key {
                "state" => &mut params.state,
                "code" => &mut params.code,
                "error" => &mut params.error,
                "iss" => &mut params.iss,
                "user" => &mut params.user,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(value.into_owned());
            }
        }
        params
    }
}

/// A finished sign-in: who, and where the browser goes next.
#[derive(Debug)]
pub struct Completed {
    /// The identity the provider vouched for.
    pub identity: VerifiedIdentity,
    /// The allowed URL to return to, if the flow asked for one.
    pub return_to: Option<String>,
    /// The platform the flow named (`web`, ...).
    pub platform: Option<String>,
    /// What binds a login code to the browser that began: see [`LoginGrant::binding`].
    pub binding: BrowserBinding,
    /// The fingerprint of the device the browser had when it began, if one was given
    /// to [`WebSignIn::begin`].
    pub device: Option<DeviceFingerprint>,
}

/// What ties a login code to the browser that began the sign-in.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrowserBinding {
    /// SHA-256 (base64url) of the flow cookie.
    browser: String,
    /// The web app's S256 challenge, if it gave one.
    login_challenge: Option<String>,
}

impl std::fmt::Debug for BrowserBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrowserBinding")
            .field("login_challenge", &self.login_challenge.is_some())
            .finish_non_exhaustive()
    }
}

/// What a redeemer presents to show it is the browser that began the sign-in.
#[derive(Clone, Copy, Default)]
pub struct LoginProof<'a> {
    /// The [`FLOW_COOKIE`] the browser sends.
    pub browser_cookie: Option<&'a str>,
    /// The verifier of the `login_challenge` the web app gave at the start.
    pub login_verifier: Option<&'a str>,
}

impl std::fmt::Debug for LoginProof<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginProof")
            .field("browser_cookie", &self.browser_cookie.is_some())
            .field("login_verifier", &self.login_verifier.is_some())
            .finish()
    }
}

impl BrowserBinding {
    /// The binding of a browser holding `browser_cookie`, and of the app holding the
    /// verifier of `login_challenge` (base64url SHA-256), if given.
    pub fn new(browser_cookie: &str, login_challenge: Option<&str>) -> Self {
        Self {
            browser: hash(browser_cookie),
            login_challenge: login_challenge.map(str::to_owned),
        }
    }

    /// The S256 challenge (base64url, no padding) of `verifier`, as a web app computes
    /// it for `login_challenge`.
    pub fn challenge_of(verifier: &str) -> String {
        hash(verifier)
    }

    /// Whether `proof` comes from the browser that began: the verifier of its
    /// challenge when the app gave one, else its cookie (compared in constant time).
    pub fn accepts(&self, proof: &LoginProof<'_>) -> bool {
        match (&self.login_challenge, proof.login_verifier) {
            // The app chose a verifier: only it proves the redeemer, so a cookie tossed
            // in by another origin cannot stand in for it.
            (Some(challenge), Some(verifier)) => {
                bool::from(hash(verifier).as_bytes().ct_eq(challenge.as_bytes()))
            }
            (Some(_), None) => false,
            (None, _) => proof.browser_cookie.is_some_and(|cookie| {
                bool::from(hash(cookie).as_bytes().ct_eq(self.browser.as_bytes()))
            }),
        }
    }

    /// Whether `cookie` is the flow cookie of the browser that began (checked at the
    /// callback, whatever the login code's binding).
    pub(crate) fn same_browser(&self, cookie: Option<&str>) -> bool {
        cookie.is_some_and(|cookie| {
            bool::from(hash(cookie).as_bytes().ct_eq(self.browser.as_bytes()))
        })
    }
}

/// What a login code stands for; tokens are made only when it is exchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginGrant {
    /// The user who signed in.
    pub user_id: UserId,
    /// The provider used.
    pub provider: ProviderId,
    /// The session to open.
    pub session_id: SessionId,
    /// The browser that began the sign-in.
    pub binding: BrowserBinding,
}

/// Browser sign-in steps over a [`FlowStore`].
///
/// ```
/// use std::sync::Arc;
/// use upcoach_auth::flow::MemoryFlowStore;
/// use upcoach_auth::web::WebSignIn;
///
/// let web = WebSignIn::new(
///     Arc::new(MemoryFlowStore::default()),
///     vec!["https://app.example.com/signed-in".into()],
/// );
/// assert!(web.check_return_to("https://app.example.com/signed-in").is_ok());
/// assert!(web.check_return_to("https://app.example.com/signed-in/../admin").is_err());
/// assert!(web.check_return_to("https://app.example.com/signed-in?next=/x").is_err());
/// assert!(web.check_return_to("https://evil.example/signed-in").is_err());
/// ```
#[derive(Debug, Clone)]
pub struct WebSignIn {
    flows: Arc<dyn FlowStore>,
    return_to_allowlist: Arc<Vec<String>>,
}

fn random_token() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| Error::Crypto(Box::new(e)))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

fn hash(value: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(value.as_bytes()))
}

impl WebSignIn {
    /// Flows kept in `flows`; `return_to_allowlist` holds exact URLs.
    pub fn new(flows: Arc<dyn FlowStore>, return_to_allowlist: Vec<String>) -> Self {
        Self {
            flows,
            return_to_allowlist: Arc::new(return_to_allowlist),
        }
    }

    /// `return_to` if it is exactly an allowed URL (compared after URL normalisation,
    /// so `..` segments and default ports cannot sneak past).
    pub fn check_return_to(&self, return_to: &str) -> Result<String, SignInError> {
        let url = url::Url::parse(return_to).map_err(|_| SignInError::ReturnToNotAllowed)?;
        if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
            return Err(SignInError::ReturnToNotAllowed);
        }
        let normal = url.to_string();
        // The raw text must be the normal form too: "/a/../b" normalises elsewhere.
        if normal != return_to && normal != format!("{return_to}/") {
            return Err(SignInError::ReturnToNotAllowed);
        }
        self.return_to_allowlist
            .iter()
            .find(|allowed| **allowed == normal)
            .cloned()
            .ok_or(SignInError::ReturnToNotAllowed)
    }

    /// What [`begin`](Self::begin) refuses before it stores anything: a `return_to`
    /// that is not allowed ([`check_return_to`](Self::check_return_to)), a
    /// `login_challenge` that is not 43 base64url characters. Returns the allowed
    /// `return_to`. Lets a caller refuse a bad request before it counts against a quota.
    pub fn check_start(
        &self,
        return_to: Option<&str>,
        login_challenge: Option<&str>,
    ) -> Result<Option<String>, SignInError> {
        let return_to = return_to.map(|r| self.check_return_to(r)).transpose()?;
        if let Some(challenge) = login_challenge
            && (challenge.len() != 43
                || !challenge
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(SignInError::LoginChallengeInvalid);
        }
        Ok(return_to)
    }

    /// Starts a sign-in with `provider`, returning to `redirect_uri` (the provider's
    /// callback route) and then to `return_to` if given. `device` is the browser's
    /// device, handed back as [`Completed::device`] (only its fingerprint is kept).
    pub async fn begin(
        &self,
        provider: &dyn AuthProvider,
        redirect_uri: &str,
        return_to: Option<&str>,
        platform: Option<&str>,
        login_challenge: Option<&str>,
        device: Option<&DeviceId>,
    ) -> Result<Started, SignInError> {
        let return_to = self.check_start(return_to, login_challenge)?;
        let state = random_token()?;
        let nonce = random_token()?;
        let pkce_verifier = random_token()?;
        let browser_cookie = random_token()?;
        let code_challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(pkce_verifier.as_bytes()));
        let request = AuthorizationRequest {
            state: state.clone(),
            nonce: nonce.clone(),
            code_challenge,
            redirect_uri: redirect_uri.to_owned(),
        };
        let redirect = provider.authorization_url(&request).await?;
        let flow = FlowState {
            provider: provider.id(),
            issuer: provider.issuer().map(str::to_owned),
            nonce,
            pkce_verifier,
            redirect_uri: redirect_uri.to_owned(),
            browser: hash(&browser_cookie),
            return_to,
            platform: platform.map(str::to_owned),
            login_challenge: login_challenge.map(str::to_owned),
            device: device.map(|d| URL_SAFE_NO_PAD.encode(d.fingerprint().as_bytes())),
        };
        self.flows
            .put_json(&format!("flow:{state}"), &flow, FLOW_TTL)
            .await?;
        Ok(Started {
            redirect,
            browser_cookie,
            cross_site: provider.cross_site_callback(),
        })
    }

    /// Finishes a sign-in at `provider`'s callback: the flow is taken (so it can never
    /// be used again, whatever happens next), then checked, then the code exchanged.
    pub async fn complete(
        &self,
        provider: &dyn AuthProvider,
        params: &CallbackParams,
        browser_cookie: Option<&str>,
    ) -> Result<Completed, SignInError> {
        let state = params
            .state
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or(SignInError::StateMissing)?;
        if state.len() > 128 || !state.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SignInError::StateInvalid);
        }
        let flow: FlowState = self
            .flows
            .take_json(&format!("flow:{state}"))
            .await?
            .ok_or(SignInError::StateInvalid)?;
        if flow.provider != provider.id() {
            return Err(SignInError::ProviderMismatch);
        }
        if flow.issuer.as_deref() != provider.issuer()
            || params
                .iss
                .as_deref()
                .is_some_and(|iss| flow.issuer.as_deref() != Some(iss))
        {
            return Err(SignInError::IssuerMismatch);
        }
        let binding = BrowserBinding {
            browser: flow.browser,
            login_challenge: flow.login_challenge,
        };
        // Written by `begin`; anything else is not a device (and binds none).
        let device = flow
            .device
            .and_then(|d| <[u8; 32]>::try_from(URL_SAFE_NO_PAD.decode(d).ok()?).ok())
            .map(DeviceFingerprint::from_bytes);
        if !binding.same_browser(browser_cookie) {
            return Err(SignInError::BrowserMismatch);
        }
        if params.error.is_some() {
            return Err(SignInError::ProviderDenied);
        }
        let code = params
            .code
            .as_deref()
            .filter(|c| !c.is_empty())
            .ok_or(SignInError::CodeMissing)?;
        let request = AuthorizationRequest {
            state: state.to_owned(),
            nonce: flow.nonce,
            code_challenge: URL_SAFE_NO_PAD.encode(Sha256::digest(flow.pkce_verifier.as_bytes())),
            redirect_uri: flow.redirect_uri,
        };
        let mut identity = provider
            .exchange_code(code, &request, &flow.pkce_verifier)
            .await?;
        if identity.name.is_none() {
            identity.name = params.user.as_deref().and_then(posted_name);
        }
        Ok(Completed {
            identity,
            return_to: flow.return_to,
            platform: flow.platform,
            binding,
            device,
        })
    }

    /// A one-time code for `grant`, valid for [`LOGIN_CODE_TTL`].
    pub async fn issue_login_code(&self, grant: &LoginGrant) -> Result<String, SignInError> {
        let code = random_token()?;
        self.flows
            .put_json(&format!("login:{}", hash(&code)), grant, LOGIN_CODE_TTL)
            .await?;
        Ok(code)
    }

    /// What `code` stands for, once, if `proof` shows this is the browser that began
    /// the sign-in ([`SignInError::LoginCodeBrowserMismatch`] otherwise). The code is
    /// used up either way.
    pub async fn redeem_login_code(
        &self,
        code: &str,
        proof: &LoginProof<'_>,
    ) -> Result<LoginGrant, SignInError> {
        if code.is_empty() || code.len() > 128 {
            return Err(SignInError::LoginCodeInvalid);
        }
        let grant: LoginGrant = self
            .flows
            .take_json(&format!("login:{}", hash(code)))
            .await?
            .ok_or(SignInError::LoginCodeInvalid)?;
        if !grant.binding.accepts(proof) {
            return Err(SignInError::LoginCodeBrowserMismatch);
        }
        Ok(grant)
    }

    /// Records a native sign-in's nonce as used; false if it was used before (a
    /// replayed id token).
    pub async fn claim_nonce(&self, nonce: &str, within: Duration) -> Result<bool, SignInError> {
        match self
            .flows
            .put(&format!("nonce:{}", hash(nonce)), b"1", within)
            .await
        {
            Ok(()) => Ok(true),
            Err(FlowError::KeyExists) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
