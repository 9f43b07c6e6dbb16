//! [`OpenIdProvider`]: any OpenID Connect provider, from configuration alone.
//!
//! Discovery (`{issuer}/.well-known/openid-configuration`), the authorization-code flow
//! with PKCE and a nonce (through the `oauth2` crate), id tokens verified against the
//! provider's JWKS, and UserInfo when the id token carries no address. Google is one
//! such provider ([`OpenIdConfig::google`]); Microsoft, GitLab, Keycloak or a company's
//! own IdP are others, each under its own [`ProviderId`].
//!
//! Nothing is fetched when the provider is made: discovery runs on the first sign-in
//! (and again after a failure, at most every [`DISCOVERY_RETRY`]), the keys on the first
//! id token. A server therefore starts while a provider is down, and that provider's
//! sign-ins answer `provider_unavailable` until it is back.
//!
//! UserInfo: some providers put `email` only there (OIDC Core §5.3). In the
//! authorization-code flow, when the id token has no `email` and discovery advertised a
//! `userinfo_endpoint`, that endpoint is asked with the access token (bounded time, no
//! redirects, at most 64 KiB of JSON). Its `sub` must equal the id token's, else the
//! sign-in is refused (`userinfo_subject_mismatch`); then `email`, `email_verified` (only
//! the JSON boolean `true` counts) and, when the id token had none, `name` are taken from
//! it. Native sign-in has an id token only, so it never consults UserInfo.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use tokio::sync::OnceCell;
use upcoach_core::{Clock, Secret};

use super::{IdTokenClaims, IdTokenRules, IdTokenVerifier, JwksCache, read_capped};
use crate::{
    AuthProvider, AuthorizationRequest, Error, NativeCredential, ProviderId, VerifiedIdentity,
};

/// The largest UserInfo answer read.
const MAX_USERINFO_BYTES: usize = 64 * 1024;
/// The largest discovery document read.
const MAX_DISCOVERY_BYTES: usize = 64 * 1024;
/// How long after a failed discovery the next sign-in tries again (until then it fails
/// at once, so a provider that is down is not asked once per request).
pub const DISCOVERY_RETRY: Duration = Duration::from_secs(5);
/// The scopes asked for when the configuration names none.
pub const DEFAULT_SCOPES: [&str; 3] = ["openid", "email", "profile"];

/// How to reach and trust one OpenID Connect provider.
///
/// ```
/// use upcoach_auth::ProviderId;
/// use upcoach_auth::oidc::OpenIdConfig;
/// use upcoach_core::Secret;
///
/// let gitlab = OpenIdConfig::new(
///     "gitlab".parse::<ProviderId>()?,
///     "https://gitlab.com",
///     "8f3c0a1d2b",
///     Secret::new("gloas-..."),
/// )
/// .scopes(["openid", "email"])
/// .trusted_for_linking(true);
/// assert_eq!(gitlab.name, "gitlab".parse()?);
/// # Ok::<(), upcoach_auth::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenIdConfig {
    /// The provider's name in routes and stored identities.
    pub name: ProviderId,
    /// The issuer, where discovery starts; id tokens must name it as `iss`.
    pub issuer_url: String,
    /// Other spellings of the issuer its id tokens may carry (Google's
    /// `accounts.google.com`).
    pub other_issuers: Vec<String>,
    /// The OAuth client of the web flow.
    pub client_id: String,
    /// That client's secret.
    pub client_secret: Secret,
    /// Other client ids an id token may be issued to (native apps' own clients).
    pub other_audiences: Vec<String>,
    /// The scopes asked for; `openid` is always among them.
    pub scopes: Vec<String>,
    /// Whether this provider's verified addresses link to an existing account by
    /// themselves (see [`LinkingPolicy`](crate::users::LinkingPolicy)); only for a
    /// provider that verifies addresses and whose users cannot choose an address they do
    /// not own.
    pub trusted_for_linking: bool,
    /// Google's `hd`: only accounts of this Workspace domain sign in.
    pub hosted_domain: Option<String>,
}

impl OpenIdConfig {
    /// A provider called `name` at `issuer_url`, with the web client `client_id` and
    /// its secret; [`DEFAULT_SCOPES`], not trusted for linking.
    pub fn new(
        name: ProviderId,
        issuer_url: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: Secret,
    ) -> Self {
        Self {
            name,
            issuer_url: issuer_url.into().trim_end_matches('/').to_owned(),
            other_issuers: Vec::new(),
            client_id: client_id.into(),
            client_secret,
            other_audiences: Vec::new(),
            scopes: DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect(),
            trusted_for_linking: false,
            hosted_domain: None,
        }
    }

    /// The scopes to ask for (`openid` is added when missing).
    pub fn scopes<I>(mut self, scopes: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        if !self.scopes.iter().any(|s| s == "openid") {
            self.scopes.insert(0, "openid".to_owned());
        }
        self
    }

    /// Other client ids an id token may be issued to.
    pub fn other_audiences<I>(mut self, audiences: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.other_audiences = audiences.into_iter().map(Into::into).collect();
        self
    }

    /// Whether verified addresses link accounts automatically.
    pub fn trusted_for_linking(mut self, trusted: bool) -> Self {
        self.trusted_for_linking = trusted;
        self
    }

    /// Google as configured by `GOOGLE_*`: its two issuer spellings (when the issuer is
    /// Google's), `hd` when set, trusted for linking.
    pub fn google(config: &crate::config::GoogleConfig) -> Self {
        let mut out = Self::new(
            ProviderId::GOOGLE,
            config.issuer_url.clone(),
            config.client_id.clone(),
            config.client_secret.clone(),
        )
        .other_audiences(
            config
                .audiences()
                .into_iter()
                .filter(|a| *a != config.client_id),
        )
        .trusted_for_linking(true);
        if out.issuer_url == crate::config::GOOGLE_ISSUER {
            out.other_issuers = vec!["accounts.google.com".to_owned()];
        }
        out.hosted_domain = config.hosted_domain.clone();
        out
    }

    /// Every client id an id token may be issued to, without duplicates.
    pub fn audiences(&self) -> Vec<&str> {
        let mut out = vec![self.client_id.as_str()];
        for id in &self.other_audiences {
            if !out.contains(&id.as_str()) {
                out.push(id);
            }
        }
        out
    }
}

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
    /// The UserInfo endpoint, if the provider has one.
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
        let mut response = http
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| unavailable(Box::new(e.without_url())))?;
        if !response.status().is_success() {
            return Err(unavailable(
                format!("discovery answered {}", response.status()).into(),
            ));
        }
        let body = read_capped(&mut response, MAX_DISCOVERY_BYTES, "the discovery document")
            .await
            .map_err(unavailable)?;
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

/// What discovery made: the OAuth client, the id-token verifier and UserInfo.
#[derive(Debug)]
struct Endpoints {
    /// The issuer as discovery names it.
    issuer: String,
    oauth: OAuthClient,
    verifier: IdTokenVerifier,
    userinfo_endpoint: Option<String>,
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

/// One OpenID Connect provider, made from an [`OpenIdConfig`].
///
/// ```no_run
/// use std::sync::Arc;
/// use upcoach_auth::oidc::{OpenIdConfig, OpenIdProvider};
/// use upcoach_core::{Secret, SystemClock};
///
/// # fn run() -> Result<(), upcoach_auth::Error> {
/// let config = OpenIdConfig::new(
///     "keycloak".parse()?,
///     "https://sso.example.com/realms/staff",
///     "upcoach",
///     Secret::new("s3cr3t"),
/// );
/// let provider = OpenIdProvider::new(
///     &config,
///     "https://api.example.com/auth/keycloak/callback",
///     Arc::new(SystemClock),
/// )?;
/// // Nothing was fetched yet: discovery runs on the first sign-in.
/// # let _ = provider; Ok(()) }
/// ```
#[derive(Debug)]
pub struct OpenIdProvider {
    config: OpenIdConfig,
    redirect_uri: String,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
    endpoints: OnceCell<Endpoints>,
    /// Held while discovery runs: the sign-ins waiting for it see its outcome (and a
    /// failure's retry delay) rather than each running it again.
    discovering: tokio::sync::Mutex<()>,
    failed_at: Mutex<Option<Instant>>,
}

impl OpenIdProvider {
    /// The provider of `config`, with `redirect_uri` as its one callback. Nothing is
    /// fetched until the first sign-in.
    pub fn new(
        config: &OpenIdConfig,
        redirect_uri: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        RedirectUrl::new(redirect_uri.to_owned())
            .map_err(|_| Error::ProviderUnavailable("the redirect URI is not a URL".into()))?;
        Ok(Self {
            config: config.clone(),
            redirect_uri: redirect_uri.to_owned(),
            http: provider_http_client()?,
            clock,
            endpoints: OnceCell::new(),
            discovering: tokio::sync::Mutex::new(()),
            failed_at: Mutex::new(None),
        })
    }

    /// Like [`new`](Self::new), then runs discovery now, so a wrong issuer fails here
    /// rather than at the first sign-in.
    pub async fn discover(
        config: &OpenIdConfig,
        redirect_uri: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        let provider = Self::new(config, redirect_uri, clock)?;
        provider.endpoints().await?;
        Ok(provider)
    }

    /// The configuration.
    pub fn config(&self) -> &OpenIdConfig {
        &self.config
    }

    /// The callback URL registered with the provider.
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// The id-token verifier (its rules and key cache), running discovery first if it
    /// has not run.
    pub async fn id_tokens(&self) -> Result<&IdTokenVerifier, Error> {
        Ok(&self.endpoints().await?.verifier)
    }

    /// What discovery made, running it when it has not succeeded yet.
    async fn endpoints(&self) -> Result<&Endpoints, Error> {
        if let Some(endpoints) = self.endpoints.get() {
            return Ok(endpoints);
        }
        let _discovering = self.discovering.lock().await;
        let recently_failed = self
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < DISCOVERY_RETRY);
        if recently_failed {
            return Err(Error::ProviderUnavailable(
                "discovery failed moments ago; trying again shortly".into(),
            ));
        }
        let result = self
            .endpoints
            .get_or_try_init(|| async {
                let discovery = Discovery::fetch(&self.http, &self.config.issuer_url).await?;
                self.endpoints_of(discovery)
            })
            .await;
        if result.is_err() {
            *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        result
    }

    fn endpoints_of(&self, discovery: Discovery) -> Result<Endpoints, Error> {
        let invalid = |what: &'static str| Error::ProviderUnavailable(what.into());
        // Codes, the client secret and the keys that vouch for every sign-in travel
        // these: never in clear text when the issuer itself is https.
        if self.config.issuer_url.starts_with("https://") {
            for (endpoint, what) in [
                (
                    &discovery.authorization_endpoint,
                    "the authorization endpoint of an https issuer is not https",
                ),
                (
                    &discovery.token_endpoint,
                    "the token endpoint of an https issuer is not https",
                ),
                (
                    &discovery.jwks_uri,
                    "the JWKS URI of an https issuer is not https",
                ),
            ] {
                if !endpoint.starts_with("https://") {
                    return Err(invalid(what));
                }
            }
        }
        let mut issuers = vec![discovery.issuer.clone()];
        issuers.extend(self.config.other_issuers.iter().cloned());
        let rules = IdTokenRules::rs256(issuers, self.config.audiences());
        let keys = JwksCache::new(discovery.jwks_uri.clone(), self.http.clone());
        let verifier = IdTokenVerifier::new(rules, Arc::new(keys), self.clock.clone());
        let oauth = oauth2::Client::new(ClientId::new(self.config.client_id.clone()))
            .set_client_secret(ClientSecret::new(
                self.config.client_secret.expose().to_owned(),
            ))
            .set_auth_uri(
                AuthUrl::new(discovery.authorization_endpoint)
                    .map_err(|_| invalid("the authorization endpoint is not a URL"))?,
            )
            .set_token_uri(
                TokenUrl::new(discovery.token_endpoint)
                    .map_err(|_| invalid("the token endpoint is not a URL"))?,
            )
            .set_redirect_uri(
                RedirectUrl::new(self.redirect_uri.clone())
                    .map_err(|_| invalid("the redirect URI is not a URL"))?,
            );
        Ok(Endpoints {
            issuer: discovery.issuer,
            oauth,
            verifier,
            // Not checked here: a provider that never needs it keeps working; a bad URL
            // fails the one request that uses it.
            userinfo_endpoint: discovery.userinfo_endpoint,
        })
    }

    /// Verifies `id_token` (and the hosted domain, when one is required).
    async fn verified_claims(
        &self,
        verifier: &IdTokenVerifier,
        id_token: &str,
        nonce: Option<&str>,
    ) -> Result<IdTokenClaims, Error> {
        let claims = verifier.verify(id_token, nonce).await?;
        if let Some(domain) = &self.config.hosted_domain
            && claims.string("hd") != Some(domain.as_str())
        {
            return Err(Error::WrongHostedDomain);
        }
        Ok(claims)
    }

    fn identity_of(&self, verifier: &IdTokenVerifier, claims: &IdTokenClaims) -> VerifiedIdentity {
        VerifiedIdentity {
            provider: self.config.name,
            subject: claims.sub.clone(),
            email: claims.string("email").map(str::to_owned),
            email_verified: claims.email_verified(),
            name: claims.string("name").map(str::to_owned),
            expires_at: verifier.accepted_until(claims),
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
        if self.config.issuer_url.starts_with("https://") && !endpoint.starts_with("https://") {
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
            .map_err(|e| unavailable(Box::new(e.without_url())))?;
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
impl AuthProvider for OpenIdProvider {
    fn id(&self) -> ProviderId {
        self.config.name
    }

    /// `OpenIdConfig::trusted_for_linking`.
    fn trusted_for_linking(&self) -> Option<bool> {
        Some(self.config.trusted_for_linking)
    }

    /// The issuer discovery named (exactly, trailing `/` and all, as RFC 9207's `iss`
    /// and the id tokens carry it); before discovery, the configured one.
    fn issuer(&self) -> Option<&str> {
        Some(
            self.endpoints
                .get()
                .map_or(self.config.issuer_url.as_str(), |e| e.issuer.as_str()),
        )
    }

    async fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, Error> {
        if request.redirect_uri != self.redirect_uri {
            return Err(Error::InvalidCredential {
                reason: "redirect_uri_mismatch",
            });
        }
        let endpoints = self.endpoints().await?;
        let state = request.state.clone();
        let mut builder = endpoints
            .oauth
            .authorize_url(move || CsrfToken::new(state))
            .add_scopes(self.config.scopes.iter().cloned().map(Scope::new))
            .add_extra_param("nonce", request.nonce.clone())
            .add_extra_param("code_challenge", request.code_challenge.clone())
            .add_extra_param("code_challenge_method", "S256");
        if let Some(domain) = &self.config.hosted_domain {
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
        let endpoints = self.endpoints().await?;
        let response = endpoints
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
                RequestTokenError::ServerResponse(r)
                    if matches!(
                        r.error(),
                        BasicErrorResponseType::InvalidClient
                            | BasicErrorResponseType::UnauthorizedClient
                    ) =>
                {
                    tracing::error!(
                        provider = %self.id(),
                        error = %r.error(),
                        "the provider refused our client credentials: check its client id \
                         and secret"
                    );
                    Error::ProviderMisconfigured(Box::new(RequestTokenError::<
                        oauth2::HttpClientError<reqwest::Error>,
                        _,
                    >::ServerResponse(r)))
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
        let claims = self
            .verified_claims(&endpoints.verifier, id_token, Some(&request.nonce))
            .await?;
        let identity = self.identity_of(&endpoints.verifier, &claims);
        match &endpoints.userinfo_endpoint {
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
                let endpoints = self.endpoints().await?;
                let claims = self
                    .verified_claims(&endpoints.verifier, id_token, Some(nonce))
                    .await?;
                Ok(self.identity_of(&endpoints.verifier, &claims))
            }
            _ => Err(Error::InvalidCredential {
                reason: "id_token_required",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery(issuer: &str, endpoint: &str) -> Discovery {
        Discovery {
            issuer: issuer.to_owned(),
            authorization_endpoint: format!("{endpoint}/authorize"),
            token_endpoint: format!("{endpoint}/token"),
            jwks_uri: format!("{endpoint}/jwks"),
            userinfo_endpoint: None,
        }
    }

    fn provider(issuer: &str) -> OpenIdProvider {
        let config = OpenIdConfig::new(
            "corp".parse().unwrap(),
            issuer,
            "client",
            upcoach_core::Secret::new("secret"),
        );
        OpenIdProvider::new(
            &config,
            "https://api.example.test/auth/corp/callback",
            Arc::new(upcoach_core::SystemClock),
        )
        .unwrap()
    }

    /// An https issuer whose discovery sends codes, the client secret or keys over
    /// plain http is refused, one endpoint at a time; an http issuer (a local test
    /// provider) may name http endpoints.
    #[test]
    fn an_https_issuer_must_name_https_endpoints() {
        let https = provider("https://sso.example.test");
        assert!(
            https
                .endpoints_of(discovery(
                    "https://sso.example.test",
                    "https://sso.example.test"
                ))
                .is_ok()
        );
        for (field, expected) in [
            ("authorization_endpoint", "the authorization endpoint"),
            ("token_endpoint", "the token endpoint"),
            ("jwks_uri", "the JWKS URI"),
        ] {
            let mut plain = discovery("https://sso.example.test", "https://sso.example.test");
            let downgraded = "http://sso.example.test/x".to_owned();
            match field {
                "authorization_endpoint" => plain.authorization_endpoint = downgraded,
                "token_endpoint" => plain.token_endpoint = downgraded,
                _ => plain.jwks_uri = downgraded,
            }
            let refused = https.endpoints_of(plain).expect_err(field);
            assert_eq!(refused.code(), "provider_unavailable");
            let shown = format!("{refused:?}");
            assert!(shown.contains(expected), "{field}: {shown}");
        }
        let http = provider("http://127.0.0.1:9");
        assert!(
            http.endpoints_of(discovery("http://127.0.0.1:9", "http://127.0.0.1:9"))
                .is_ok()
        );
    }
}
