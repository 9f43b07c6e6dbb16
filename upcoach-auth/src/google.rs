//! Sign in with Google: OpenID discovery, the authorization-code flow with PKCE (through
//! the `oauth2` crate), and native sign-in by id token.
//!
//! The identity comes from the verified id token. Google puts `email` there; other
//! OpenID providers (`GOOGLE_ISSUER_URL` may name any issuer) may put it only in UserInfo
//! (OIDC Core §5.3). So in the authorization-code flow, when the id token has no `email`
//! and discovery advertised a `userinfo_endpoint`, that endpoint is asked with the access
//! token (`Authorization: Bearer`, the provider HTTP client: bounded time, no redirects;
//! at most 64 KiB of JSON). Its `sub` must equal the id token's, else the sign-in is
//! refused (`userinfo_subject_mismatch`); then `email`, `email_verified` (only the JSON
//! boolean `true` counts) and, when the id token had none, `name` are taken from it. An
//! endpoint that fails or cannot be reached is [`Error::ProviderUnavailable`] (retryable).
//! Native sign-in has an id token only, so it never consults UserInfo.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{GOOGLE_ISSUER, GoogleConfig};
use async_trait::async_trait;
use oauth2::TokenResponse as _;
use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    ExtraTokenFields, PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenUrl, reqwest,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use upcoach_core::Clock;

use crate::oidc::{IdTokenClaims, IdTokenRules, IdTokenVerifier, JwksCache, read_capped};
use crate::{
    AuthProvider, AuthorizationRequest, Error, NativeCredential, ProviderId, VerifiedIdentity,
};

/// The two spellings of Google's issuer that its id tokens carry.
const GOOGLE_ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];
/// The largest UserInfo answer read.
const MAX_USERINFO_BYTES: usize = 64 * 1024;

/// The token endpoint's answer, with the id token OpenID adds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdTokenField {
    id_token: Option<String>,
}

impl ExtraTokenFields for IdTokenField {}

type TokenResponse = StandardTokenResponse<IdTokenField, BasicTokenType>;
type OAuthClient = oauth2::Client<
    BasicErrorResponse,
    TokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// What OpenID discovery says about a provider.
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    /// The issuer.
    pub issuer: String,
    /// Where browsers are sent to sign in.
    pub authorization_endpoint: String,
    /// Where codes are exchanged.
    pub token_endpoint: String,
    /// The provider's signing keys.
    pub jwks_uri: String,
    /// The UserInfo endpoint, if the provider has one (asked for the e-mail address
    /// when an id token carries none).
    #[serde(default)]
    pub userinfo_endpoint: Option<String>,
}

impl Discovery {
    /// Fetches `{issuer}/.well-known/openid-configuration` and checks that it names
    /// the same issuer (OpenID Discovery §4.3).
    pub async fn fetch(http: &reqwest::Client, issuer: &str) -> Result<Self, Error> {
        let issuer = issuer.trim_end_matches('/');
        let url = format!("{issuer}/.well-known/openid-configuration");
        let unavailable =
            |e: Box<dyn std::error::Error + Send + Sync>| Error::ProviderUnavailable(e);
        let response = http
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| unavailable(Box::new(e)))?;
        if !response.status().is_success() {
            return Err(unavailable(
                format!("discovery answered {}", response.status()).into(),
            ));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| unavailable(Box::new(e)))?;
        let discovery: Discovery =
            serde_json::from_slice(&body).map_err(|e| unavailable(Box::new(e)))?;
        if discovery.issuer.trim_end_matches('/') != issuer {
            return Err(unavailable(
                format!("discovery at {url} names another issuer").into(),
            ));
        }
        Ok(discovery)
    }
}

/// Google sign-in, configured from [`GoogleConfig`].
///
/// ```no_run
/// use std::sync::Arc;
/// use upcoach_auth::google::GoogleProvider;
/// use upcoach_auth::config::AuthConfig;
/// use upcoach_core::config::Settings;
/// use upcoach_core::SystemClock;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = AuthConfig::from_env()?;
/// let google = config.google.as_ref().expect("GOOGLE_* set");
/// let provider = GoogleProvider::discover(
///     google,
///     "https://api.example.com/auth/google/callback",
///     Arc::new(SystemClock),
/// )
/// .await?;
/// # let _ = provider; Ok(()) }
/// ```
#[derive(Debug)]
pub struct GoogleProvider {
    oauth: OAuthClient,
    issuer: String,
    http: reqwest::Client,
    verifier: IdTokenVerifier,
    userinfo_endpoint: Option<String>,
    hosted_domain: Option<String>,
    redirect_uri: String,
}

/// An HTTP client for providers: no redirects followed (RFC 9700 §4.11), bounded time.
pub fn provider_http_client() -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Error::ProviderUnavailable(Box::new(e)))
}

impl GoogleProvider {
    /// Discovers the issuer of `config` (Google's unless `GOOGLE_ISSUER_URL` says
    /// otherwise) and builds the provider, with `redirect_uri` as the one callback.
    pub async fn discover(
        config: &GoogleConfig,
        redirect_uri: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        let http = provider_http_client()?;
        let discovery = Discovery::fetch(&http, &config.issuer_url).await?;
        let issuers: Vec<String> = if config.issuer_url.trim_end_matches('/') == GOOGLE_ISSUER {
            GOOGLE_ISSUERS.iter().map(|s| (*s).to_owned()).collect()
        } else {
            vec![discovery.issuer.clone()]
        };
        let rules = IdTokenRules::rs256(issuers, config.audiences());
        let keys = JwksCache::new(discovery.jwks_uri.clone(), http.clone());
        let verifier = IdTokenVerifier::new(rules, Arc::new(keys), clock);
        let invalid = |what: &'static str| Error::ProviderUnavailable(what.into());
        let oauth = oauth2::Client::new(ClientId::new(config.client_id.clone()))
            .set_client_secret(ClientSecret::new(config.client_secret.expose().to_owned()))
            .set_auth_uri(
                AuthUrl::new(discovery.authorization_endpoint.clone())
                    .map_err(|_| invalid("the authorization endpoint is not a URL"))?,
            )
            .set_token_uri(
                TokenUrl::new(discovery.token_endpoint.clone())
                    .map_err(|_| invalid("the token endpoint is not a URL"))?,
            )
            .set_redirect_uri(
                RedirectUrl::new(redirect_uri.to_owned())
                    .map_err(|_| invalid("the redirect URI is not a URL"))?,
            );
        Ok(Self {
            oauth,
            issuer: discovery.issuer.clone(),
            http,
            verifier,
            // Not checked here: a provider that never needs it keeps working; a bad URL
            // fails the one request that uses it.
            userinfo_endpoint: discovery.userinfo_endpoint.clone(),
            hosted_domain: config.hosted_domain.clone(),
            redirect_uri: redirect_uri.to_owned(),
        })
    }

    /// The id-token verifier (its rules and key cache).
    pub fn id_tokens(&self) -> &IdTokenVerifier {
        &self.verifier
    }

    /// The callback URL registered with Google.
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// Verifies `id_token` (and the hosted domain, when one is required).
    async fn verified_claims(
        &self,
        id_token: &str,
        nonce: Option<&str>,
    ) -> Result<IdTokenClaims, Error> {
        let claims = self.verifier.verify(id_token, nonce).await?;
        if let Some(domain) = &self.hosted_domain
            && claims.string("hd") != Some(domain.as_str())
        {
            return Err(Error::WrongHostedDomain);
        }
        Ok(claims)
    }

    fn identity_of(&self, claims: &IdTokenClaims) -> VerifiedIdentity {
        VerifiedIdentity {
            provider: ProviderId::Google,
            subject: claims.sub.clone(),
            email: claims.string("email").map(str::to_owned),
            email_verified: claims.email_verified(),
            name: claims.string("name").map(str::to_owned),
            expires_at: self.verifier.accepted_until(claims),
        }
    }

    /// The UserInfo claims for `access_token`, whose `sub` must be `subject`.
    async fn userinfo(
        &self,
        endpoint: &str,
        access_token: &str,
        subject: &str,
    ) -> Result<serde_json::Map<String, Value>, Error> {
        let unavailable =
            |e: Box<dyn std::error::Error + Send + Sync>| Error::ProviderUnavailable(e);
        // The access token goes there: never in clear text from an https issuer.
        if self.issuer.starts_with("https://") && !endpoint.starts_with("https://") {
            return Err(unavailable(
                "the userinfo endpoint of an https issuer is not https".into(),
            ));
        }
        let mut response = self
            .http
            .get(endpoint)
            .bearer_auth(access_token)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| unavailable(Box::new(e)))?;
        if !response.status().is_success() {
            return Err(unavailable(
                format!("the userinfo endpoint answered {}", response.status()).into(),
            ));
        }
        let body = read_capped(&mut response, MAX_USERINFO_BYTES, "the userinfo answer")
            .await
            .map_err(unavailable)?;
        let claims: serde_json::Map<String, Value> =
            serde_json::from_slice(&body).map_err(|e| unavailable(Box::new(e)))?;
        // OIDC Core §5.3.2: values of another subject must not be used.
        if claims.get("sub").and_then(Value::as_str) != Some(subject) {
            return Err(Error::InvalidCredential {
                reason: "userinfo_subject_mismatch",
            });
        }
        Ok(claims)
    }
}

/// `identity` with the address (and, if it had none, the name) UserInfo reported.
fn with_userinfo(
    mut identity: VerifiedIdentity,
    info: &serde_json::Map<String, Value>,
) -> VerifiedIdentity {
    let string = |name: &str| info.get(name).and_then(Value::as_str).map(str::to_owned);
    identity.email = string("email");
    // Strictly, as for id tokens: only the JSON boolean `true` counts.
    identity.email_verified = matches!(info.get("email_verified"), Some(Value::Bool(true)));
    if identity.name.is_none() {
        identity.name = string("name");
    }
    identity
}

#[async_trait]
impl AuthProvider for GoogleProvider {
    fn id(&self) -> ProviderId {
        ProviderId::Google
    }

    fn issuer(&self) -> Option<&str> {
        Some(&self.issuer)
    }

    fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, Error> {
        if request.redirect_uri != self.redirect_uri {
            return Err(Error::InvalidCredential {
                reason: "redirect_uri_mismatch",
            });
        }
        let state = request.state.clone();
        let mut builder = self
            .oauth
            .authorize_url(move || CsrfToken::new(state))
            .add_scope(Scope::new("openid".into()))
            .add_scope(Scope::new("email".into()))
            .add_scope(Scope::new("profile".into()))
            .add_extra_param("nonce", request.nonce.clone())
            .add_extra_param("code_challenge", request.code_challenge.clone())
            .add_extra_param("code_challenge_method", "S256");
        if let Some(domain) = &self.hosted_domain {
            // A hint for Google's account chooser; the `hd` claim is what is checked.
            builder = builder.add_extra_param("hd", domain.clone());
        }
        Ok(builder.url().0)
    }

    async fn exchange_code(
        &self,
        code: &str,
        request: &AuthorizationRequest,
        verifier: &str,
    ) -> Result<VerifiedIdentity, Error> {
        let redirect = RedirectUrl::new(request.redirect_uri.clone()).map_err(|_| {
            Error::InvalidCredential {
                reason: "redirect_uri_mismatch",
            }
        })?;
        let response = self
            .oauth
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.to_owned()))
            .set_redirect_uri(Cow::Owned(redirect))
            .request_async(&self.http)
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(r)
                    if matches!(
                        r.error(),
                        BasicErrorResponseType::InvalidGrant
                            | BasicErrorResponseType::InvalidRequest
                    ) =>
                {
                    Error::CodeRejected
                }
                other => Error::ProviderUnavailable(Box::new(other)),
            })?;
        let id_token =
            response
                .extra_fields()
                .id_token
                .as_deref()
                .ok_or(Error::InvalidCredential {
                    reason: "no_id_token",
                })?;
        let claims = self.verified_claims(id_token, Some(&request.nonce)).await?;
        let identity = self.identity_of(&claims);
        match &self.userinfo_endpoint {
            Some(endpoint) if identity.email.is_none() => {
                let info = self
                    .userinfo(endpoint, response.access_token().secret(), &claims.sub)
                    .await?;
                Ok(with_userinfo(identity, &info))
            }
            _ => Ok(identity),
        }
    }

    async fn verify_native(
        &self,
        credential: &NativeCredential,
    ) -> Result<VerifiedIdentity, Error> {
        match credential {
            NativeCredential::IdToken { id_token, nonce } => {
                let nonce = nonce.as_deref().ok_or(Error::InvalidCredential {
                    reason: "nonce_required",
                })?;
                let claims = self.verified_claims(id_token, Some(nonce)).await?;
                Ok(self.identity_of(&claims))
            }
            _ => Err(Error::InvalidCredential {
                reason: "id_token_required",
            }),
        }
    }
}
