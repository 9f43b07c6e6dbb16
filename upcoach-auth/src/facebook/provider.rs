//! [`FacebookProvider`]: Facebook Login (classic access tokens) as an [`AuthProvider`].

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use oauth2::reqwest;
use upcoach_core::{Clock, Secret};
use url::Url;

use super::{DebugToken, FacebookError, FacebookProfile, appsecret_proof};
use crate::config::FacebookConfig;
use crate::google::provider_http_client;
use crate::oidc::read_capped;
use crate::oidc::{IdTokenRules, IdTokenVerifier, JwksCache};
use crate::{
    AuthProvider, AuthorizationRequest, Error, NativeCredential, ProviderId, VerifiedIdentity,
};

/// The most bytes read from one Graph API answer.
const MAX_GRAPH_ANSWER: usize = 64 * 1024;

/// Facebook Login: the login dialog with PKCE, the code exchange, and an access token
/// checked with `debug_token` (valid, issued to our app, for a user, not expired)
/// before `/me` is read. Every Graph call carries `appsecret_proof`, so the app can be
/// set to require it.
///
/// - The identity's subject is the app-scoped user id; the profile's `id` must be that
///   user. Facebook does not say whether it verified the e-mail address, so
///   `email_verified` is always `false`: a Facebook address never links accounts by
///   itself (see [`LinkingPolicy`](crate::users::LinkingPolicy)).
/// - Native apps send the access token (`NativeCredential::AccessToken`), or a Limited
///   Login id token with the raw nonce they asked for (`NativeCredential::IdToken`),
///   verified against Facebook's published keys (fetched on first use), its issuer, our
///   app id as audience, and the nonce.
/// - Errors: a refused token has its own code (`facebook_token_invalid`,
///   `facebook_token_foreign_app`, `facebook_token_expired`, …); a code Facebook does
///   not take is [`Error::CodeRejected`]; anything else Facebook answers is
///   [`Error::ProviderUnavailable`], never with a token or Facebook's message in it.
///
/// ```
/// use std::sync::Arc;
/// use upcoach_auth::config::AuthConfig;
/// use upcoach_auth::facebook::FacebookProvider;
/// use upcoach_auth::{AuthProvider, AuthorizationRequest, ProviderId};
/// use upcoach_core::SystemClock;
/// use upcoach_core::config::Settings;
///
/// let config = AuthConfig::from_lookup(|name| match name {
///     "FACEBOOK_APP_ID" => Some("1234567890".into()),
///     "FACEBOOK_APP_SECRET" => Some("app-secret".into()),
///     _ => None,
/// })
/// .unwrap();
/// let callback = "https://app.example/auth/facebook/callback";
/// let facebook =
///     FacebookProvider::new(config.facebook.as_ref().unwrap(), callback, Arc::new(SystemClock))
///         .unwrap();
/// assert_eq!(facebook.id(), ProviderId::FACEBOOK);
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let url = facebook
///     .authorization_url(&AuthorizationRequest {
///         state: "state".into(),
///         nonce: "nonce".into(),
///         code_challenge: "challenge".into(),
///         redirect_uri: callback.into(),
///     })
///     .await
///     .unwrap();
/// assert!(url.as_str().starts_with("https://www.facebook.com/v19.0/dialog/oauth?"));
/// # });
/// ```
pub struct FacebookProvider {
    app_id: String,
    app_secret: Secret,
    /// `app_id|app_secret`, the app access token `debug_token` is asked with.
    app_token: Secret,
    /// The `appsecret_proof` of `app_token`, the same for every call.
    app_token_proof: Secret,
    graph_url: String,
    dialog_url: Url,
    redirect_uri: String,
    http: reqwest::Client,
    /// Limited Login id tokens.
    limited: IdTokenVerifier,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for FacebookProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FacebookProvider")
            .field("app_id", &self.app_id)
            .field("graph_url", &self.graph_url)
            .field("redirect_uri", &self.redirect_uri)
            .finish_non_exhaustive()
    }
}

impl FacebookProvider {
    /// The provider of `config`, with `redirect_uri` as its one callback.
    pub fn new(
        config: &FacebookConfig,
        redirect_uri: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        let dialog_url = Url::parse(&config.dialog_url)
            .map_err(|_| Error::ProviderUnavailable("the login dialog is not a URL".into()))?;
        let http = provider_http_client()?;
        let limited = IdTokenVerifier::new(
            IdTokenRules::rs256(
                [config.limited_login_issuer.clone()],
                [config.app_id.clone()],
            ),
            Arc::new(JwksCache::new(
                config.limited_login_jwks_url.clone(),
                http.clone(),
            )),
            clock.clone(),
        );
        let app_token = format!("{}|{}", config.app_id, config.app_secret.expose());
        Ok(Self {
            app_id: config.app_id.clone(),
            app_secret: config.app_secret.clone(),
            app_token_proof: Secret::new(appsecret_proof(&app_token, &config.app_secret)),
            app_token: Secret::new(app_token),
            graph_url: config.graph_url.trim_end_matches('/').to_owned(),
            dialog_url,
            redirect_uri: redirect_uri.to_owned(),
            http,
            limited,
            clock,
        })
    }

    /// The callback URL registered with Facebook.
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// The identity behind a user access token, after `debug_token` accepted it.
    async fn identity_of(&self, access_token: &str) -> Result<VerifiedIdentity, Error> {
        // A 4xx here is about our own app token (a wrong or rotated secret), not the
        // user's: Facebook reports a bad user token inside the answer.
        let debug = self
            .graph(
                false,
                "debug_token",
                &[
                    ("input_token", access_token),
                    ("access_token", self.app_token.expose()),
                    ("appsecret_proof", self.app_token_proof.expose()),
                ],
            )
            .await?;
        let token = DebugToken::from_json(&debug)
            .and_then(|d| d.check(&self.app_id, self.clock.now()))
            .map_err(refused)?;
        let proof = appsecret_proof(access_token, &self.app_secret);
        let me = self
            .graph(
                true,
                "me",
                &[
                    ("fields", "id,name,email"),
                    ("access_token", access_token),
                    ("appsecret_proof", &proof),
                ],
            )
            .await?;
        let profile = FacebookProfile::from_json(&me).map_err(refused)?;
        if profile.id != token.user_id {
            return Err(Error::InvalidCredential {
                reason: "facebook_profile_mismatch",
            });
        }
        Ok(VerifiedIdentity {
            provider: ProviderId::FACEBOOK,
            subject: token.user_id,
            email: profile.email,
            email_verified: false,
            name: profile.name,
            expires_at: token.expires_at.filter(|at| *at > SystemTime::UNIX_EPOCH),
        })
    }

    /// `GET <graph>/<path>?<query>`: the answer's body when 2xx. With `user_token`
    /// (the call is made with the user's token), a 4xx with an OAuth error about the
    /// token (Graph code 190) is `facebook_token_invalid`; anything else is
    /// unavailable.
    async fn graph(
        &self,
        user_token: bool,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Vec<u8>, Error> {
        let (status, body) = self.get(path, query).await?;
        if status.is_success() {
            return Ok(body);
        }
        if user_token && status.is_client_error() && graph_error_code(&body) == Some(190) {
            return Err(Error::InvalidCredential {
                reason: "facebook_token_invalid",
            });
        }
        Err(Error::ProviderUnavailable(
            format!("the Graph API answered {status} to /{path}").into(),
        ))
    }

    /// One GET, its status and at most [`MAX_GRAPH_ANSWER`] bytes of body. Errors carry
    /// no URL (the query holds tokens).
    async fn get(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<(reqwest::StatusCode, Vec<u8>), Error> {
        let unavailable = |e: reqwest::Error| Error::ProviderUnavailable(Box::new(e.without_url()));
        let mut url = Url::parse(&format!("{}/{path}", self.graph_url))
            .map_err(|_| Error::ProviderUnavailable("the Graph API URL is not a URL".into()))?;
        url.query_pairs_mut().extend_pairs(query);
        let mut response = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(unavailable)?;
        let body = read_capped(&mut response, MAX_GRAPH_ANSWER, "a Graph API answer")
            .await
            .map_err(Error::ProviderUnavailable)?;
        Ok((response.status(), body))
    }
}

/// A refusal of the token or profile as our error: a malformed answer is Facebook
/// failing, the rest is the credential's fault.
fn refused(error: FacebookError) -> Error {
    match error {
        FacebookError::TokenMalformed(_) | FacebookError::ProfileMalformed(_) => {
            Error::ProviderUnavailable(Box::new(error))
        }
        other => Error::InvalidCredential {
            reason: other.code(),
        },
    }
}

/// The Graph error code of an error answer (`{"error":{"code":190,…}}`).
fn graph_error_code(body: &[u8]) -> Option<i64> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("error")?.get("code")?.as_i64()
}

#[async_trait]
impl AuthProvider for FacebookProvider {
    fn id(&self) -> ProviderId {
        ProviderId::FACEBOOK
    }

    async fn authorization_url(&self, request: &AuthorizationRequest) -> Result<Url, Error> {
        if request.redirect_uri != self.redirect_uri {
            return Err(Error::InvalidCredential {
                reason: "redirect_uri_mismatch",
            });
        }
        let mut url = self.dialog_url.clone();
        url.query_pairs_mut()
            .append_pair("client_id", &self.app_id)
            .append_pair("redirect_uri", &request.redirect_uri)
            .append_pair("response_type", "code")
            .append_pair("scope", "email,public_profile")
            .append_pair("state", &request.state)
            .append_pair("code_challenge", &request.code_challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(url)
    }

    async fn exchange_code(
        &self,
        code: &str,
        request: &AuthorizationRequest,
        verifier: &str,
    ) -> Result<VerifiedIdentity, Error> {
        let (status, body) = self
            .get(
                "oauth/access_token",
                &[
                    ("client_id", &self.app_id),
                    ("client_secret", self.app_secret.expose()),
                    ("redirect_uri", &request.redirect_uri),
                    ("code", code),
                    ("code_verifier", verifier),
                ],
            )
            .await?;
        if status.is_client_error() {
            return Err(Error::CodeRejected);
        }
        if !status.is_success() {
            return Err(Error::ProviderUnavailable(
                format!("the Graph API answered {status} to the code exchange").into(),
            ));
        }
        #[derive(serde::Deserialize)]
        struct Tokens {
            access_token: String,
        }
        let tokens: Tokens =
            serde_json::from_slice(&body).map_err(|e| Error::ProviderUnavailable(Box::new(e)))?;
        self.identity_of(&tokens.access_token).await
    }

    async fn verify_native(
        &self,
        credential: &NativeCredential,
    ) -> Result<VerifiedIdentity, Error> {
        match credential {
            NativeCredential::AccessToken(token) if !token.is_empty() && token.len() <= 4096 => {
                self.identity_of(token).await
            }
            NativeCredential::AccessToken(_) => Err(Error::InvalidCredential {
                reason: "facebook_token_malformed",
            }),
            NativeCredential::IdToken { id_token, nonce } => {
                // Limited Login: the nonce is the raw one the app passed to the SDK.
                let nonce = nonce.as_deref().ok_or(Error::InvalidCredential {
                    reason: "nonce_required",
                })?;
                let claims = self.limited.verify(id_token, Some(nonce)).await?;
                Ok(VerifiedIdentity {
                    provider: ProviderId::FACEBOOK,
                    subject: claims.sub.clone(),
                    email: claims.string("email").map(str::to_owned),
                    email_verified: false,
                    name: claims.string("name").map(str::to_owned),
                    expires_at: self.limited.accepted_until(&claims),
                })
            }
            _ => Err(Error::InvalidCredential {
                reason: "access_token_or_id_token_required",
            }),
        }
    }
}
