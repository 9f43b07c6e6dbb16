//! [`AppleProvider`]: Sign in with Apple as an [`AuthProvider`] (the web flow with
//! `response_mode=form_post`, native id tokens and native authorization codes), and
//! Apple's server-to-server notifications verified against Apple's keys.
//!
//! Nothing is fetched when the provider is built: Apple's keys come from `APPLE_KEYS_URL`
//! on first use, through one [`JwksCache`] shared by id tokens and notifications.

use std::sync::Arc;

use async_trait::async_trait;
use oauth2::reqwest;
use serde_json::{Map, Value};
use upcoach_core::Clock;
use url::Url;

use super::{
    AppleClaims, AppleError, AppleNotification, ClientSecretSigner, MAX_NATIVE_NONCE_LEN,
    check_native_nonce, malformed, notification_payload,
};
use crate::config::AppleConfig;
use crate::google::provider_http_client;
use crate::oidc::{
    IdTokenError, IdTokenRules, IdTokenVerifier, JwksCache, number_claim, read_capped, string_claim,
};
use crate::{
    AuthProvider, AuthorizationRequest, Error, NativeCredential, ProviderId, VerifiedIdentity,
};

/// The most bytes read from one answer of Apple's token endpoint.
const MAX_TOKEN_ANSWER: usize = 64 * 1024;
/// The longest authorization code sent on to Apple (Apple's are about 100 bytes).
const MAX_CODE_LEN: usize = 4 * 1024;

/// Which of our Apple client ids a token is issued to, and so how its nonce is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AppleClient {
    /// The Services ID (`APPLE_WEB_CLIENT_ID`) of the web flow. We sent Apple the nonce
    /// ourselves, so the id token must carry exactly it.
    Web,
    /// The app's bundle id (`APPLE_MOBILE_CLIENT_ID`) of native sign-in. The app gave
    /// Apple the SHA-256 (lowercase hex) of its nonce and us the nonce itself, so the id
    /// token must carry that hash ([`check_native_nonce`]).
    Native,
}

/// One verified Sign in with Apple id token: the identity, and the claims Apple spells
/// its own way (`is_private_email`, `real_user_status`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppleSignIn {
    /// Who signed in (`name` is always `None`: Apple gives the name only once, in the
    /// web callback's `user` form field, never in the id token).
    pub identity: VerifiedIdentity,
    /// Apple's claims of the same token.
    pub claims: AppleClaims,
}

/// Sign in with Apple, configured from [`AppleConfig`].
///
/// - **Web**: the browser goes to [`authorization_url`](AuthProvider::authorization_url)
///   (`response_mode=form_post`, scope `name email`, our `state` and `nonce`); Apple
///   posts the code back to our callback; [`exchange_code`](AuthProvider::exchange_code)
///   redeems it at `APPLE_TOKEN_URL` as the Services ID, with an ES256
///   [client secret](ClientSecretSigner) signed for it, and verifies the id token (RS256
///   with Apple's keys, `iss` = `APPLE_ISSUER`, `aud` = the Services ID, `nonce` =
///   the flow's nonce).
/// - **Native**: [`verify_native`](AuthProvider::verify_native) takes the app's id token
///   and raw nonce (`aud` = the bundle id, the token's `nonce` = SHA-256 of the raw
///   nonce), or the app's authorization code and raw nonce: the code is redeemed as the
///   bundle id (no `redirect_uri`) and its id token checked the same way. An access token
///   is refused (`id_token_required`).
/// - **Notifications**: [`verify_notification`](Self::verify_notification) checks the JWT
///   Apple posts to our server-to-server endpoint and reads its event.
///
/// `email_verified` comes from Apple's claim, which may be a JSON boolean or the string
/// `"true"`; Apple's addresses, private relay ones included, are verified.
///
/// Errors: a code Apple does not take (`invalid_grant`, `invalid_request`) is
/// [`Error::CodeRejected`]; Apple refusing our client secret (`invalid_client`, a
/// configuration fault, logged) is [`Error::ProviderMisconfigured`], and any other
/// failure of the token endpoint [`Error::ProviderUnavailable`], never with a code,
/// secret or token in them; a refused
/// id token is [`Error::IdToken`] with its code; Apple's own checks keep their
/// [`AppleError`] code as [`Error::InvalidCredential`]'s reason (`apple_nonce_mismatch`,
/// `apple_nonce_not_hashed`, `apple_claims_invalid`, ...). Using a client id that is
/// not configured is `apple_web_not_configured` / `apple_native_not_configured`.
///
/// ```
/// use std::sync::Arc;
/// use upcoach_auth::apple::AppleProvider;
/// use upcoach_auth::config::AuthConfig;
/// use upcoach_auth::{AuthProvider, AuthorizationRequest, ProviderId};
/// use upcoach_core::SystemClock;
/// use upcoach_core::config::Settings;
/// # use upcoach_testing::apple::{TEST_KEY_ID, TEST_TEAM_ID, TEST_TEAM_PRIVATE_KEY};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let config = AuthConfig::from_lookup(|name| match name {
///     "APPLE_WEB_CLIENT_ID" => Some("com.example.web".into()),
///     "APPLE_MOBILE_CLIENT_ID" => Some("com.example.app".into()),
///     "APPLE_TEAM_ID" => Some(TEST_TEAM_ID.into()),
///     "APPLE_KEY_ID" => Some(TEST_KEY_ID.into()),
///     // The `.p8` file Apple gave for the key.
///     "APPLE_PRIVATE_KEY" => Some(TEST_TEAM_PRIVATE_KEY.into()),
///     _ => None,
/// })?;
/// let callback = "https://api.example.com/auth/apple/callback";
/// // No network here: Apple's keys are fetched when the first token is checked.
/// let apple = AppleProvider::new(config.apple.as_ref().unwrap(), callback, Arc::new(SystemClock))?;
/// assert_eq!(apple.id(), ProviderId::APPLE);
/// let url = apple
///     .authorization_url(&AuthorizationRequest {
///         state: "the-state".into(),
///         nonce: "the-nonce".into(),
///         code_challenge: "not-sent-to-apple".into(),
///         redirect_uri: callback.into(),
///     })
///     .await?;
/// assert!(url.as_str().starts_with(
///     "https://appleid.apple.com/auth/authorize?response_type=code&response_mode=form_post&"
/// ));
/// assert!(url.as_str().ends_with("&scope=name%20email"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
///
/// A server-to-server notification, as the endpoint Apple posts to would take it:
///
/// ```no_run
/// use upcoach_auth::apple::{AppleError, AppleEventKind, AppleProvider};
///
/// async fn on_notification(apple: &AppleProvider, body: &[u8]) -> Result<(), AppleError> {
///     let notification = apple.verify_notification(body).await?;
///     // Claim `notification.idempotency_key()` once (replays are the caller's to
///     // refuse), then act on the event.
///     if notification.event.kind == AppleEventKind::AccountDelete {
///         // ... end the sessions of `notification.event.sub` and unlink it ...
///     }
///     Ok(())
/// }
/// ```
pub struct AppleProvider {
    web: Option<Client>,
    native: Option<Client>,
    auth_url: Url,
    token_url: String,
    issuer: String,
    redirect_uri: String,
    http: reqwest::Client,
    signer: ClientSecretSigner,
    /// Notification JWTs: Apple's keys and issuer, any of our client ids.
    notifications: IdTokenVerifier,
    clock: Arc<dyn Clock>,
}

/// One of our client ids and the verifier of id tokens issued to it.
#[derive(Debug)]
struct Client {
    id: String,
    id_tokens: IdTokenVerifier,
}

impl std::fmt::Debug for AppleProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppleProvider")
            .field("web_client_id", &self.web.as_ref().map(|c| &c.id))
            .field("mobile_client_id", &self.native.as_ref().map(|c| &c.id))
            .field("issuer", &self.issuer)
            .field("token_url", &self.token_url)
            .field("redirect_uri", &self.redirect_uri)
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

impl AppleProvider {
    /// The provider of `config`, with `redirect_uri` as the one web callback. Nothing is
    /// fetched: Apple's keys are fetched on first use.
    ///
    /// A private key that is not a P-256 PKCS#8 PEM is [`Error::Crypto`] here (with the
    /// [`AppleError`] as source); a URL that does not parse, or a config without any
    /// client id, is [`Error::ProviderUnavailable`].
    pub fn new(
        config: &AppleConfig,
        redirect_uri: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        let unavailable = |what: &'static str| Error::ProviderUnavailable(what.into());
        let signer =
            ClientSecretSigner::from_config(config).map_err(|e| Error::Crypto(Box::new(e)))?;
        let auth_url = Url::parse(&config.auth_url)
            .map_err(|_| unavailable("the Apple authorization endpoint is not a URL"))?;
        Url::parse(&config.token_url)
            .map_err(|_| unavailable("the Apple token endpoint is not a URL"))?;
        Url::parse(redirect_uri).map_err(|_| unavailable("the redirect URI is not a URL"))?;
        let http = provider_http_client()?;
        let keys = Arc::new(JwksCache::new(config.keys_url.clone(), http.clone()));
        let verifier = |audiences: Vec<String>| {
            IdTokenVerifier::new(
                IdTokenRules::rs256([config.issuer.clone()], audiences),
                keys.clone(),
                clock.clone(),
            )
        };
        let client = |id: &Option<String>| {
            id.as_ref().map(|id| Client {
                id: id.clone(),
                id_tokens: verifier(vec![id.clone()]),
            })
        };
        let web = client(&config.web_client_id);
        let native = client(&config.mobile_client_id);
        let mut audiences: Vec<String> = web.iter().chain(&native).map(|c| c.id.clone()).collect();
        audiences.dedup();
        if audiences.is_empty() {
            return Err(unavailable(
                "Sign in with Apple needs APPLE_WEB_CLIENT_ID or APPLE_MOBILE_CLIENT_ID",
            ));
        }
        Ok(Self {
            notifications: verifier(audiences),
            web,
            native,
            auth_url,
            token_url: config.token_url.clone(),
            issuer: config.issuer.clone(),
            redirect_uri: redirect_uri.to_owned(),
            http,
            signer,
            clock,
        })
    }

    /// The web callback URL registered with Apple.
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// Apple's key cache, shared by id tokens and notifications (how often it fetched:
    /// [`JwksCache::fetches`]).
    pub fn keys(&self) -> &Arc<JwksCache> {
        self.notifications.keys()
    }

    /// Verifies an id token Apple issued to `client` and reads its identity.
    ///
    /// The token must be RS256 with one of Apple's keys, `iss` = `APPLE_ISSUER`, `aud` =
    /// that client id, not expired (see [`IdTokenVerifier`]), and carry `nonce`: as it is
    /// for [`AppleClient::Web`] (the nonce we sent), as its SHA-256 for
    /// [`AppleClient::Native`] (`nonce` is the raw nonce the app gives us; a token
    /// without a nonce claim is refused). An empty `nonce` is `nonce_required`. That the
    /// nonce is one we issued and is used once is the caller's to check, at least until
    /// [`expires_at`](VerifiedIdentity::expires_at).
    pub async fn verify_id_token(
        &self,
        id_token: &str,
        client: AppleClient,
        nonce: &str,
    ) -> Result<AppleSignIn, Error> {
        let verifier = &self.client(client)?.id_tokens;
        if nonce.is_empty() {
            // An empty nonce would accept any token carrying an empty one.
            return Err(Error::InvalidCredential {
                reason: "nonce_required",
            });
        }
        let claims = match client {
            AppleClient::Web => verifier.verify(id_token, Some(nonce)).await?,
            AppleClient::Native => {
                let claims = verifier.verify(id_token, None).await?;
                let hashed = claims
                    .nonce
                    .as_deref()
                    .ok_or(Error::IdToken(IdTokenError::NonceMissing))?;
                check_native_nonce(nonce, hashed).map_err(refused)?;
                claims
            }
        };
        let apple = AppleClaims::from_claims(&claims.all).map_err(refused)?;
        Ok(AppleSignIn {
            identity: VerifiedIdentity {
                provider: ProviderId::APPLE,
                subject: claims.sub.clone(),
                email: apple.email.clone(),
                email_verified: apple.email_verified,
                name: None,
                expires_at: verifier.accepted_until(&claims),
            },
            claims: apple,
        })
    }

    /// Verifies a server-to-server notification, the body Apple posts
    /// (`{"payload": "<JWT>"}`), and reads its event.
    ///
    /// The JWT must be RS256 with one of Apple's keys (an unknown `kid` makes the key set
    /// be fetched again, at most every 30 s), `iss` = `APPLE_ISSUER`, `aud` one of our
    /// client ids, `exp` present and not past, `iat` present, not in the future and not
    /// older than [`NOTIFICATION_MAX_AGE`](super::NOTIFICATION_MAX_AGE), `nbf` (when
    /// present) not in the future, each with the verifier's leeway. Then [`AppleNotification::from_claims`]
    /// reads it.
    ///
    /// Replays are not detected here: the same JWT verifies until it expires. The caller
    /// must act on a notification only after claiming its
    /// [`idempotency_key`](AppleNotification::idempotency_key) once, and remember the key
    /// at least until the JWT's `exp` plus [the leeway](crate::oidc::DEFAULT_LEEWAY).
    ///
    /// Errors: [`AppleError::NotificationBadSignature`], `NotificationWrongIssuer`,
    /// `NotificationWrongAudience`, `NotificationExpired`, `NotificationNotYetValid`,
    /// the parsing errors of [`notification_payload`] and
    /// [`AppleNotification::from_claims`], and [`AppleError::KeysUnavailable`] (the one
    /// worth retrying: Apple will post again).
    pub async fn verify_notification(&self, body: &[u8]) -> Result<AppleNotification, AppleError> {
        let jwt = notification_payload(body)?;
        let claims = self
            .notifications
            .verified_payload(&jwt)
            .await
            .map_err(|e| match e {
                IdTokenError::KeysUnavailable(_) => AppleError::KeysUnavailable(e),
                IdTokenError::Malformed => malformed("the payload is not a JWT", None),
                other => AppleError::NotificationBadSignature(other),
            })?;
        self.check_notification_claims(&claims)?;
        AppleNotification::from_claims(&claims)
    }

    /// `iss`, `aud`, `exp`, `nbf` and `iat` of a notification whose signature verified.
    fn check_notification_claims(&self, claims: &Map<String, Value>) -> Result<(), AppleError> {
        let rules = self.notifications.rules();
        let leeway = rules.leeway.as_secs();
        let now = self.clock.unix_seconds();
        let iss = string_claim(claims, "iss")
            .map_err(|_| malformed("iss is not a string", None))?
            .ok_or_else(|| malformed("no iss claim", None))?;
        if !rules.issuers.iter().any(|ours| ours == iss) {
            return Err(AppleError::NotificationWrongIssuer);
        }
        let ours = |aud: &Value| {
            aud.as_str()
                .is_some_and(|aud| rules.audiences.iter().any(|ours| ours == aud))
        };
        match claims.get("aud") {
            None | Some(Value::Null) => return Err(malformed("no aud claim", None)),
            Some(one @ Value::String(_)) if ours(one) => {}
            Some(Value::Array(many)) if many.iter().any(ours) => {}
            Some(Value::String(_) | Value::Array(_)) => {
                return Err(AppleError::NotificationWrongAudience);
            }
            Some(_) => return Err(malformed("aud is not a string", None)),
        }
        let exp = number_claim(claims, "exp")
            .map_err(|_| malformed("exp is not a number", None))?
            .ok_or_else(|| malformed("no exp claim", None))?;
        if now > exp.saturating_add(leeway) {
            return Err(AppleError::NotificationExpired);
        }
        let nbf =
            number_claim(claims, "nbf").map_err(|_| malformed("nbf is not a number", None))?;
        let iat = number_claim(claims, "iat")
            .map_err(|_| malformed("iat is not a number", None))?
            .ok_or_else(|| malformed("no iat claim", None))?;
        if now.saturating_sub(iat) > super::NOTIFICATION_MAX_AGE.as_secs() {
            return Err(AppleError::NotificationExpired);
        }
        if [nbf, Some(iat)]
            .into_iter()
            .flatten()
            .any(|at| at > now.saturating_add(leeway))
        {
            return Err(AppleError::NotificationNotYetValid);
        }
        Ok(())
    }

    /// The client `kind`, if configured.
    fn client(&self, kind: AppleClient) -> Result<&Client, Error> {
        match kind {
            AppleClient::Web => self.web.as_ref().ok_or(Error::InvalidCredential {
                reason: "apple_web_not_configured",
            }),
            AppleClient::Native => self.native.as_ref().ok_or(Error::InvalidCredential {
                reason: "apple_native_not_configured",
            }),
        }
    }

    /// Redeems `code` at Apple's token endpoint as `client` (with `redirect_uri` for the
    /// web flow, none for native), returning the id token of the answer.
    async fn redeem(
        &self,
        client: &Client,
        code: &str,
        redirect_uri: Option<&str>,
    ) -> Result<String, Error> {
        if code.is_empty() || code.len() > MAX_CODE_LEN {
            return Err(Error::CodeRejected);
        }
        let secret = self
            .signer
            .secret_for(&client.id, self.clock.now())
            .map_err(|e| Error::Crypto(Box::new(e)))?;
        let form = token_form(&client.id, &secret, code, redirect_uri);
        let mut response = self
            .http
            .post(&self.token_url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| Error::ProviderUnavailable(Box::new(e.without_url())))?;
        let status = response.status();
        let body = read_capped(&mut response, MAX_TOKEN_ANSWER, "Apple's token answer")
            .await
            .map_err(Error::ProviderUnavailable)?;
        if !status.is_success() {
            return Err(token_error(status, &body, &client.id));
        }
        // No serde error as source: its message may quote the answer, tokens included.
        let answer: Map<String, Value> = serde_json::from_slice(&body).map_err(|_| {
            Error::ProviderUnavailable("Apple's token answer is not a JSON object".into())
        })?;
        match answer.get("id_token") {
            Some(Value::String(id_token)) if !id_token.is_empty() => Ok(id_token.clone()),
            _ => Err(Error::InvalidCredential {
                reason: "no_id_token",
            }),
        }
    }
}

/// The form of an authorization-code redemption.
fn token_form(client_id: &str, secret: &str, code: &str, redirect_uri: Option<&str>) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("client_id", client_id)
        .append_pair("client_secret", secret)
        .append_pair("code", code)
        .append_pair("grant_type", "authorization_code");
    if let Some(uri) = redirect_uri {
        form.append_pair("redirect_uri", uri);
    }
    form.finish()
}

/// The error for a token endpoint answer of `status` (not 2xx) with `body`: a code Apple
/// does not take (`invalid_grant`, `invalid_request`) is [`Error::CodeRejected`];
/// `invalid_client` (our client secret or client id refused: a configuration fault) is
/// [`Error::ProviderMisconfigured`], logged as an error; anything else is
/// [`Error::ProviderUnavailable`].
fn token_error(status: reqwest::StatusCode, body: &[u8], client_id: &str) -> Error {
    let error = serde_json::from_slice::<Map<String, Value>>(body)
        .ok()
        .and_then(|answer| match answer.get("error") {
            Some(Value::String(error)) => Some(error.clone()),
            _ => None,
        })
        // Only a plain OAuth error code is repeated, never free text.
        .filter(|e| e.len() <= 64 && e.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    match error.as_deref() {
        Some("invalid_grant" | "invalid_request") if status.is_client_error() => {
            Error::CodeRejected
        }
        Some("invalid_client" | "unauthorized_client") => {
            tracing::error!(
                client_id,
                "Apple refused our client secret (invalid_client): check APPLE_TEAM_ID, \
                 APPLE_KEY_ID, APPLE_PRIVATE_KEY and that this client id belongs to the team"
            );
            Error::ProviderMisconfigured(
                "Apple's token endpoint refused our client credentials (invalid_client)".into(),
            )
        }
        Some(error) => Error::ProviderUnavailable(
            format!("Apple's token endpoint answered {status} ({error})").into(),
        ),
        None => {
            Error::ProviderUnavailable(format!("Apple's token endpoint answered {status}").into())
        }
    }
}

/// An Apple check's refusal as our error, keeping its stable code as the reason.
fn refused(error: AppleError) -> Error {
    tracing::debug!(code = error.code(), error = %error, "Apple sign-in refused");
    Error::InvalidCredential {
        reason: error.code(),
    }
}

/// `value` percent-encoded for a query, a space as `%20` (as Apple documents its
/// `scope=name%20email`) rather than the form encoding's `+`.
fn query_value(value: &str) -> String {
    // `byte_serialize` writes a literal `+` as `%2B`, so each `+` it writes is a space.
    url::form_urlencoded::byte_serialize(value.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[async_trait]
impl AuthProvider for AppleProvider {
    fn id(&self) -> ProviderId {
        ProviderId::APPLE
    }

    fn issuer(&self) -> Option<&str> {
        Some(&self.issuer)
    }

    /// `true`: Apple posts the callback (`response_mode=form_post`) from its own site.
    fn cross_site_callback(&self) -> bool {
        true
    }

    /// `{APPLE_AUTH_URL}?response_type=code&response_mode=form_post&client_id=<Services
    /// ID>&redirect_uri=..&state=..&nonce=..&scope=name%20email`.
    ///
    /// No `code_challenge`: Apple does not document PKCE. The flow is bound to the
    /// browser by `state` and our flow cookie, and the id token to the flow by the nonce
    /// (checked exactly in [`exchange_code`](AuthProvider::exchange_code)); the code is
    /// redeemed only with our client secret.
    async fn authorization_url(&self, request: &AuthorizationRequest) -> Result<Url, Error> {
        if request.redirect_uri != self.redirect_uri {
            return Err(Error::InvalidCredential {
                reason: "redirect_uri_mismatch",
            });
        }
        let web = self.client(AppleClient::Web)?;
        let query = [
            ("response_type", "code"),
            // Apple requires form_post when it is asked for the name or the e-mail.
            ("response_mode", "form_post"),
            ("client_id", web.id.as_str()),
            ("redirect_uri", request.redirect_uri.as_str()),
            ("state", request.state.as_str()),
            ("nonce", request.nonce.as_str()),
            ("scope", "name email"),
        ]
        .iter()
        .map(|(name, value)| format!("{name}={}", query_value(value)))
        .collect::<Vec<_>>()
        .join("&");
        let mut url = self.auth_url.clone();
        url.set_query(Some(&query));
        Ok(url)
    }

    /// Redeems the web flow's `code` as the Services ID and verifies its id token (the
    /// nonce exactly `request.nonce`). `verifier` is not used: no PKCE with Apple (see
    /// [`authorization_url`](AuthProvider::authorization_url)).
    async fn exchange_code(
        &self,
        code: &str,
        request: &AuthorizationRequest,
        _verifier: &str,
    ) -> Result<VerifiedIdentity, Error> {
        if request.redirect_uri != self.redirect_uri {
            return Err(Error::InvalidCredential {
                reason: "redirect_uri_mismatch",
            });
        }
        let web = self.client(AppleClient::Web)?;
        let id_token = self.redeem(web, code, Some(&request.redirect_uri)).await?;
        let signed_in = self
            .verify_id_token(&id_token, AppleClient::Web, &request.nonce)
            .await?;
        Ok(signed_in.identity)
    }

    /// An id token with the raw nonce, or an authorization code with the raw nonce
    /// (redeemed as the bundle id, without `redirect_uri`), both for the bundle id with
    /// the hashed nonce; see [`verify_id_token`](AppleProvider::verify_id_token). A
    /// missing nonce is `nonce_required`; an access token is `id_token_required`.
    async fn verify_native(
        &self,
        credential: &NativeCredential,
    ) -> Result<VerifiedIdentity, Error> {
        let nonce_required = Error::InvalidCredential {
            reason: "nonce_required",
        };
        match credential {
            NativeCredential::IdToken { id_token, nonce } => {
                let nonce = nonce.as_deref().ok_or(nonce_required)?;
                let signed_in = self
                    .verify_id_token(id_token, AppleClient::Native, nonce)
                    .await?;
                Ok(signed_in.identity)
            }
            NativeCredential::AuthorizationCode { code, nonce } => {
                let nonce = nonce.as_deref().ok_or(nonce_required)?;
                // A nonce that can never match must not spend the one-time code.
                if nonce.is_empty() || nonce.len() > MAX_NATIVE_NONCE_LEN {
                    return Err(refused(AppleError::NonceMalformed));
                }
                let native = self.client(AppleClient::Native)?;
                let id_token = self.redeem(native, code, None).await?;
                let signed_in = self
                    .verify_id_token(&id_token, AppleClient::Native, nonce)
                    .await?;
                Ok(signed_in.identity)
            }
            NativeCredential::AccessToken(_) => Err(Error::InvalidCredential {
                reason: "id_token_required",
            }),
        }
    }
}

#[cfg(test)]
mod tests;
