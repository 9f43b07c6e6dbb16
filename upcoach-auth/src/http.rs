//! The HTTP face of sign-in (feature `http`): the routes of API.md's Auth table as
//! framework-agnostic handlers over [`http::Request`], and each error's status.
//!
//! A host mounts [`AuthRoutes`] on its router; the handlers take the path's
//! `{provider}` already percent-decoded, read what they need from the request, and
//! answer `http::Response<Full<Bytes>>` (axum takes it as it is).
//!
//! | route | handler |
//! |---|---|
//! | `GET /auth/{provider}/authorize` | [`AuthRoutes::authorize`] |
//! | `GET` or `POST /auth/{provider}/callback` | [`AuthRoutes::callback`] |
//! | `POST /auth/{provider}/token` | [`AuthRoutes::token`] |
//! | `POST /auth/exchange` | [`AuthRoutes::exchange`] |
//! | `POST /auth/refresh` | [`AuthRoutes::refresh`] |
//! | `POST /auth/logout` | [`AuthRoutes::logout`] |
//! | `GET /auth/me` | [`AuthRoutes::me`] |
//! | `POST` or `DELETE /auth/link/{provider}` | [`AuthRoutes::link`], [`AuthRoutes::unlink`] |
//! | `GET /.well-known/jwks.json` | [`AuthRoutes::jwks`] |
//!
//! JSON routes answer 415 to anything but `Content-Type: application/json`, so a
//! cross-site form or `text/plain` POST never reaches them. The client's address comes
//! from the [`ClientAddr`](upcoach_core::http::ClientAddr) extension the server sets.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use upcoach_auth::http::AuthRoutes;
//! use upcoach_auth::session::{AccessTokens, SigningKey};
//! use upcoach_auth::sessions::Sessions;
//! use upcoach_core::SystemClock;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let tokens = Arc::new(AccessTokens::new(SigningKey::generate()?, Arc::new(SystemClock)));
//! let routes = AuthRoutes::new(Arc::new(Sessions::builder(tokens, "http://127.0.0.1:8080").build()));
//!
//! let cross_site = http::Request::post("/auth/refresh")
//!     .header("content-type", "text/plain")
//!     .body(Full::new(Bytes::from_static(br#"{"refresh_token":"x"}"#)))?;
//! assert_eq!(routes.refresh(cross_site).await.status(), 415);
//!
//! let me = http::Request::get("/auth/me").body(Full::new(Bytes::new()))?;
//! assert_eq!(routes.me(me).await.status(), 401);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use serde::Deserialize;
use upcoach_core::Role;
use upcoach_core::event::ClientFacts;
use upcoach_core::http::{
    ApiError, DEFAULT_JSON_LIMIT, HttpError, JsonBody, client_facts, empty_response,
    error_response, json_response, query_param, read_body, read_json,
};

use crate::flow::FlowError;
use crate::refresh::RefreshError;
use crate::sessions::{AuthError, CallbackOutcome, Sessions};
use crate::users::UserError;
use crate::web::{CallbackParams, FLOW_COOKIE, FLOW_TTL, LoginProof, SignInError};

/// The flow cookie's name behind https (see [`AuthRoutes`]).
pub const FLOW_COOKIE_HOST: &str = "__Host-upcoach_flow";
use crate::{Error, NativeCredential};

/// An answer of these routes.
pub type Answer = Response<JsonBody>;

impl HttpError for Error {
    fn status(&self) -> StatusCode {
        match self {
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            Error::UnknownProvider => StatusCode::NOT_FOUND,
            Error::Crypto(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
    fn code(&self) -> &'static str {
        Error::code(self)
    }
    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}

impl HttpError for FlowError {
    fn status(&self) -> StatusCode {
        if self.is_retryable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
    fn code(&self) -> &'static str {
        FlowError::code(self)
    }
    fn is_retryable(&self) -> bool {
        FlowError::is_retryable(self)
    }
}

impl HttpError for SignInError {
    fn status(&self) -> StatusCode {
        match self {
            SignInError::Provider(e) => e.status(),
            SignInError::Store(e) => e.status(),
            SignInError::ReturnToNotAllowed
            | SignInError::StateMissing
            | SignInError::CodeMissing
            | SignInError::LoginChallengeInvalid => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
    fn code(&self) -> &'static str {
        SignInError::code(self)
    }
    fn is_retryable(&self) -> bool {
        SignInError::is_retryable(self)
    }
}

impl HttpError for UserError {
    fn status(&self) -> StatusCode {
        match self {
            UserError::AccountExists
            | UserError::IdentityTaken
            | UserError::ProviderAlreadyLinked { .. }
            | UserError::LastIdentity => StatusCode::CONFLICT,
            UserError::NotLinked { .. } | UserError::NotFound => StatusCode::NOT_FOUND,
            UserError::InvalidIdentity { .. } => StatusCode::BAD_REQUEST,
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
    fn code(&self) -> &'static str {
        UserError::code(self)
    }
    fn is_retryable(&self) -> bool {
        UserError::is_retryable(self)
    }
}

impl HttpError for RefreshError {
    fn status(&self) -> StatusCode {
        match self {
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            RefreshError::Random(_) => StatusCode::INTERNAL_SERVER_ERROR,
            RefreshError::NotOwner => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
    fn code(&self) -> &'static str {
        RefreshError::code(self)
    }
    fn is_retryable(&self) -> bool {
        RefreshError::is_retryable(self)
    }
}

impl HttpError for AuthError {
    fn status(&self) -> StatusCode {
        match self {
            AuthError::UnknownProvider | AuthError::ProviderNotConfigured(_) => {
                StatusCode::NOT_FOUND
            }
            AuthError::InvalidPlatform => StatusCode::BAD_REQUEST,
            AuthError::NonceReplayed
            | AuthError::CredentialLivesTooLong
            | AuthError::UserGone { .. } => StatusCode::UNAUTHORIZED,
            AuthError::Signing(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AuthError::Provider(e) => e.status(),
            AuthError::SignIn(e) => e.status(),
            AuthError::Users(e) => e.status(),
            AuthError::Refresh(e) => e.status(),
            AuthError::Flow(e) => e.status(),
        }
    }
    fn code(&self) -> &'static str {
        AuthError::code(self)
    }
    fn is_retryable(&self) -> bool {
        AuthError::is_retryable(self)
    }
}

/// Sign-in's routes over one [`Sessions`]; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct AuthRoutes {
    sessions: Arc<Sessions>,
    /// `Secure` on the flow cookie: the public URL is https.
    secure_cookie: bool,
}

fn fail(error: &(impl HttpError + ?Sized)) -> Answer {
    error_response(error)
}

fn no_store(mut response: Answer) -> Answer {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The value of cookie `name` in the request's `Cookie` headers, if it is there exactly
/// once. Two (a cookie "tossed" in by a sibling subdomain with a longer path, say) are
/// none: which one the browser meant cannot be told.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut values = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v);
    let first = values.next()?;
    values.next().is_none().then_some(first)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeBody {
    id_token: String,
    nonce: Option<String>,
    #[serde(default)]
    platform: Option<String>,
    /// Apple's first-sign-in user JSON (name); accepted, not used yet.
    #[serde(default, rename = "user")]
    _user: Option<serde_json::Value>,
}

impl NativeBody {
    fn into_parts(self) -> (NativeCredential, Option<String>) {
        (
            NativeCredential::IdToken {
                id_token: self.id_token,
                nonce: self.nonce,
            },
            self.platform,
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeBody {
    login_code: String,
    #[serde(default)]
    login_verifier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogoutBody {
    refresh_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenBody {
    sub: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

/// What a request body's error must turn into.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl AuthRoutes {
    /// The routes of `sessions`; the flow cookie is `Secure` when its public URL is
    /// https.
    pub fn new(sessions: Arc<Sessions>) -> Self {
        let secure_cookie = sessions.public_url().starts_with("https://");
        Self {
            sessions,
            secure_cookie,
        }
    }

    /// The service behind the routes.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// The flow cookie's name: behind https `__Host-upcoach_flow`, which no sibling
    /// subdomain can set or shadow; `upcoach_flow` on plain http (development).
    fn flow_cookie_name(&self) -> &'static str {
        if self.secure_cookie {
            FLOW_COOKIE_HOST
        } else {
            FLOW_COOKIE
        }
    }

    /// The flow cookie: `HttpOnly`, `SameSite=Lax`; behind https `Secure` on `/` with the
    /// `__Host-` prefix, else on `/auth` (the callback and the login-code exchange).
    fn flow_cookie(&self, value: &str, max_age: u64) -> Option<HeaderValue> {
        let attributes = if self.secure_cookie {
            "Path=/; Secure"
        } else {
            "Path=/auth"
        };
        HeaderValue::from_str(&format!(
            "{}={value}; {attributes}; Max-Age={max_age}; HttpOnly; SameSite=Lax",
            self.flow_cookie_name()
        ))
        .ok()
    }

    async fn principal(&self, headers: &HeaderMap) -> Result<upcoach_core::Principal, Answer> {
        upcoach_core::http::authenticate(self.sessions.as_ref(), headers)
            .await
            .map_err(|e| fail(&e))
    }

    /// `GET /auth/{provider}/authorize?platform=&return_to=&login_challenge=`: 302 to
    /// the provider, setting the flow cookie.
    pub async fn authorize<B>(&self, provider: &str, request: Request<B>) -> Answer {
        let query = request.uri().query();
        let facts = client_facts(request.headers(), request.extensions())
            .with_platform(query_param(query, "platform").map(Cow::into_owned));
        let return_to = query_param(query, "return_to");
        let challenge = query_param(query, "login_challenge");
        let started = match self
            .sessions
            .authorize(provider, return_to.as_deref(), challenge.as_deref(), &facts)
            .await
        {
            Ok(started) => started,
            Err(e) => return fail(&e),
        };
        let (Ok(location), Some(cookie)) = (
            HeaderValue::from_str(started.redirect.as_str()),
            self.flow_cookie(&started.browser_cookie, FLOW_TTL.as_secs()),
        ) else {
            return fail(&ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal error",
            ));
        };
        let mut response = empty_response(StatusCode::FOUND);
        response.headers_mut().insert(header::LOCATION, location);
        response.headers_mut().insert(header::SET_COOKIE, cookie);
        no_store(response)
    }

    /// `GET|POST /auth/{provider}/callback` (the query, or a form body for
    /// `response_mode=form_post`): 200 TokenResponse, or 302 to `return_to` with a
    /// login code.
    pub async fn callback<B>(&self, provider: &str, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let browser = cookie(request.headers(), self.flow_cookie_name()).map(str::to_owned);
        let params = if request.method() == Method::POST {
            match read_body(request.into_body(), DEFAULT_JSON_LIMIT).await {
                Ok(bytes) => callback_params(Some(&bytes)),
                Err(e) => return fail(&e),
            }
        } else {
            callback_params(request.uri().query().map(str::as_bytes))
        };
        let outcome = self
            .sessions
            .callback(provider, &params, browser.as_deref(), &facts)
            .await;
        let response = match outcome {
            Err(e) => return no_store(fail(&e)),
            Ok(CallbackOutcome::SignedIn(tokens)) => {
                let mut response = json_response(StatusCode::OK, &tokens);
                // Used: the browser needs the cookie no more.
                if let Some(clear) = self.flow_cookie("", 0) {
                    response.headers_mut().insert(header::SET_COOKIE, clear);
                }
                response
            }
            Ok(CallbackOutcome::Redirect(url)) => {
                let Ok(location) = HeaderValue::from_str(url.as_str()) else {
                    return fail(&AuthError::SignIn(SignInError::ReturnToNotAllowed));
                };
                // The cookie stays: it proves at the exchange that this browser began.
                let mut response = empty_response(StatusCode::FOUND);
                response.headers_mut().insert(header::LOCATION, location);
                response
            }
        };
        no_store(response)
    }

    /// `POST /auth/{provider}/token` `{"id_token","nonce","platform","user"?}`: a native
    /// sign-in.
    pub async fn token<B>(&self, provider: &str, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let body: NativeBody = match read_json(request, DEFAULT_JSON_LIMIT).await {
            Ok(body) => body,
            Err(e) => return fail(&e),
        };
        let (credential, platform) = body.into_parts();
        let facts = facts.with_platform(platform);
        match self
            .sessions
            .sign_in_with_token(provider, credential, &facts)
            .await
        {
            Ok(tokens) => no_store(json_response(StatusCode::OK, &tokens)),
            Err(e) => fail(&e),
        }
    }

    /// `POST /auth/exchange` `{"login_code","login_verifier"?}`: the tokens of a login
    /// code, for the browser that began (its flow cookie, or the verifier of its
    /// `login_challenge`).
    pub async fn exchange<B>(&self, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let browser = cookie(request.headers(), self.flow_cookie_name()).map(str::to_owned);
        let body: ExchangeBody = match read_json(request, DEFAULT_JSON_LIMIT).await {
            Ok(body) => body,
            Err(e) => return fail(&e),
        };
        let proof = LoginProof {
            browser_cookie: browser.as_deref(),
            login_verifier: body.login_verifier.as_deref(),
        };
        match self
            .sessions
            .exchange(&body.login_code, &proof, &facts)
            .await
        {
            Ok(tokens) => {
                let mut response = json_response(StatusCode::OK, &tokens);
                if let Some(clear) = self.flow_cookie("", 0) {
                    response.headers_mut().insert(header::SET_COOKIE, clear);
                }
                no_store(response)
            }
            Err(e) => fail(&e),
        }
    }

    /// `POST /auth/refresh` `{"refresh_token"}`: a rotated TokenResponse.
    pub async fn refresh<B>(&self, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let body: RefreshBody = match read_json(request, DEFAULT_JSON_LIMIT).await {
            Ok(body) => body,
            Err(e) => return fail(&e),
        };
        match self.sessions.refresh(&body.refresh_token, &facts).await {
            Ok(tokens) => no_store(json_response(StatusCode::OK, &tokens)),
            Err(e) => fail(&e),
        }
    }

    /// `POST /auth/logout` `{"refresh_token"?}` with a bearer: 204. A body, when there
    /// is one, must be JSON.
    pub async fn logout<B>(&self, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let principal = match self.principal(request.headers()).await {
            Ok(principal) => principal,
            Err(answer) => return answer,
        };
        let json = upcoach_core::http::require_json(request.headers());
        let bytes = match read_body(request.into_body(), DEFAULT_JSON_LIMIT).await {
            Ok(bytes) => bytes,
            Err(e) => return fail(&e),
        };
        let body = if bytes.is_empty() {
            LogoutBody::default()
        } else {
            if let Err(e) = json {
                return fail(&e);
            }
            match serde_json::from_slice(&bytes) {
                Ok(body) => body,
                Err(e) => {
                    return fail(&ApiError::bad_request(
                        "invalid_json",
                        format!("the request body is not valid JSON for this route: {e}"),
                    ));
                }
            }
        };
        match self
            .sessions
            .logout(&principal, body.refresh_token.as_deref(), &facts)
            .await
        {
            Ok(()) => empty_response(StatusCode::NO_CONTENT),
            Err(e) => fail(&e),
        }
    }

    /// `GET /auth/me` with a bearer: the User.
    pub async fn me<B>(&self, request: Request<B>) -> Answer {
        let principal = match self.principal(request.headers()).await {
            Ok(principal) => principal,
            Err(answer) => return answer,
        };
        match self.sessions.me(&principal).await {
            Ok(user) => json_response(StatusCode::OK, &user),
            Err(e) => fail(&e),
        }
    }

    /// `POST /auth/link/{provider}` (body as `/token`) with a bearer: the User.
    pub async fn link<B>(&self, provider: &str, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts = client_facts(request.headers(), request.extensions());
        let principal = match self.principal(request.headers()).await {
            Ok(principal) => principal,
            Err(answer) => return answer,
        };
        let body: NativeBody = match read_json(request, DEFAULT_JSON_LIMIT).await {
            Ok(body) => body,
            Err(e) => return fail(&e),
        };
        let (credential, platform) = body.into_parts();
        let facts = facts.with_platform(platform);
        match self
            .sessions
            .link(&principal, provider, credential, &facts)
            .await
        {
            Ok(user) => json_response(StatusCode::OK, &user),
            Err(e) => fail(&e),
        }
    }

    /// `DELETE /auth/link/{provider}` with a bearer: the User (409 `last_identity`).
    pub async fn unlink<B>(&self, provider: &str, request: Request<B>) -> Answer {
        let facts = client_facts(request.headers(), request.extensions());
        let principal = match self.principal(request.headers()).await {
            Ok(principal) => principal,
            Err(answer) => return answer,
        };
        match self.sessions.unlink(&principal, provider, &facts).await {
            Ok(user) => json_response(StatusCode::OK, &user),
            Err(e) => fail(&e),
        }
    }

    /// `GET /.well-known/jwks.json`: our public keys, cacheable for 5 minutes.
    pub fn jwks(&self) -> Answer {
        let mut response = json_response(StatusCode::OK, &self.sessions.tokens().jwks());
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=300"),
        );
        response
    }

    /// `POST /dev/token` `{"sub"?,"roles":[...]}`: a session for any user, created with
    /// those roles if new (an existing user keeps its roles). For development only:
    /// mount it only when the operator asked for it.
    pub async fn dev_token<B>(&self, request: Request<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let facts: ClientFacts = client_facts(request.headers(), request.extensions());
        // DNS rebinding: a page of another site that resolves its name to 127.0.0.1
        // reaches a loopback server with its own name in Host.
        if !loopback_host(request.headers()) {
            return fail(&ApiError::forbidden(
                "POST /dev/token answers only requests addressed to localhost or a loopback address",
            ));
        }
        let body: DevTokenBody = match read_json(request, DEFAULT_JSON_LIMIT).await {
            Ok(body) => body,
            Err(e) => return fail(&e),
        };
        let user_id = match body.sub.as_deref().map(str::parse).transpose() {
            Ok(user_id) => user_id.unwrap_or_default(),
            Err(e) => {
                return fail(&ApiError::bad_request(
                    "invalid_sub",
                    format!("sub is a user id (UUID): {e}"),
                ));
            }
        };
        if body.roles.len() > 16 {
            return fail(&ApiError::bad_request("invalid_roles", "at most 16 roles"));
        }
        let mut roles: Vec<Role> = Vec::with_capacity(body.roles.len());
        for role in &body.roles {
            match role.parse::<Role>() {
                Ok(role) if !roles.contains(&role) => roles.push(role),
                Ok(_) => {}
                Err(e) => return fail(&ApiError::bad_request("invalid_roles", e.to_string())),
            }
        }
        match self.sessions.issue_for(user_id, &roles, &facts).await {
            Ok(tokens) => no_store(json_response(StatusCode::OK, &tokens)),
            Err(e) => fail(&e),
        }
    }
}

/// Whether the request's `Host` is `localhost` or a loopback address (any port).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `state`, `code`, `error` and `iss` of a callback's query or form body.
fn callback_params(encoded: Option<&[u8]>) -> CallbackParams {
    let mut params = CallbackParams::default();
    for (key, value) in form_urlencoded::parse(encoded.unwrap_or_default()) {
        let slot = match &*key {
            "state" => &mut params.state,
            "code" => &mut params.code,
            "error" => &mut params.error,
            "iss" => &mut params.iss,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(value.into_owned());
        }
    }
    params
}
