//! The sign-in routes of API.md: provider authorize/callback/token, exchange, refresh,
//! logout, me, link, and the JWK Set.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Deserialize;
use upcoach_auth::refresh::{RefreshError, RefreshStore, RevokeReason};
use upcoach_auth::session::AccessTokens;
use upcoach_auth::users::{LinkingPolicy, User, UserError, UserStore};
use upcoach_auth::web::{CallbackParams, FLOW_COOKIE, LoginGrant, SignInError, WebSignIn};
use upcoach_auth::{AuthProvider, NativeCredential, ProviderId};
use upcoach_core::event::{Event, SecurityEvent};
use upcoach_core::{Principal, SessionId, TokenError, TokenVerifier};

use crate::Body;
use crate::app::App;
use crate::http_util::{ApiError, full, json_response, read_json};

/// The largest JSON body an auth route reads.
const BODY_LIMIT: usize = 16 * 1024;
/// How long a native sign-in's nonce is remembered against replay (an id token lives
/// an hour at most).
const NONCE_MEMORY: Duration = Duration::from_secs(3600);

/// Sign-in state of the app.
#[derive(Debug)]
pub(crate) struct Auth {
    pub(crate) refresh: Arc<dyn RefreshStore>,
    pub(crate) users: Arc<dyn UserStore>,
    pub(crate) web: WebSignIn,
    pub(crate) providers: HashMap<ProviderId, Arc<dyn AuthProvider>>,
    pub(crate) linking: LinkingPolicy,
    pub(crate) public_url: String,
}

impl Auth {
    pub(crate) fn callback_url(&self, provider: ProviderId) -> String {
        format!("{}/auth/{provider}/callback", self.public_url)
    }
}

fn unauthenticated(code: &'static str, message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

fn unavailable(code: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        code,
        "a sign-in dependency is unavailable; retry",
    )
}

fn tokens(app: &App) -> Result<&AccessTokens, ApiError> {
    app.tokens.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "signing_key_missing",
            "this server has no signing key (set AUTH_SIGNING_KEY, or start it with --dev)",
        )
    })
}

/// The bearer's principal.
pub(crate) async fn bearer(app: &App, request: &Request<Incoming>) -> Result<Principal, ApiError> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            unauthenticated("token_missing", "send Authorization: Bearer <access_token>")
        })?;
    let token = value
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            unauthenticated(
                "token_malformed",
                "expected Authorization: Bearer <access_token>",
            )
        })?;
    let tokens = app.tokens.as_ref().ok_or_else(|| {
        unauthenticated(
            "token_invalid",
            "this server issues no tokens (no signing key)",
        )
    })?;
    tokens.verify(token).await.map_err(|e| match e {
        TokenError::Unavailable(_) => unavailable(e.code()),
        e => unauthenticated(e.code(), &e.to_string()),
    })
}

fn security_event(
    app: &App,
    event_type: &str,
    principal_user: Option<upcoach_core::UserId>,
    details: serde_json::Value,
) {
    let mut event = SecurityEvent::new(event_type, app.clock.as_ref()).details(details);
    if let Some(user) = principal_user {
        event = event.user(user);
    }
    if let Err(e) = app.event_log.record(Event::Security(event)) {
        tracing::warn!(error = %e, event_type, "a security event was not logged");
    }
}

fn provider_of(app: &App, name: &str) -> Result<Arc<dyn AuthProvider>, ApiError> {
    let id: ProviderId = name.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_provider",
            "expected google, apple or facebook",
        )
    })?;
    app.auth.providers.get(&id).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "provider_not_configured",
            format!("{id} sign-in is not configured on this server"),
        )
    })
}

fn sign_in_error(e: &SignInError) -> ApiError {
    let status = if e.is_retryable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        match e {
            SignInError::ReturnToNotAllowed
            | SignInError::StateMissing
            | SignInError::CodeMissing => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNAUTHORIZED,
        }
    };
    let message = if status == StatusCode::SERVICE_UNAVAILABLE {
        "a sign-in dependency is unavailable; retry".to_owned()
    } else {
        e.to_string()
    };
    ApiError::new(status, e.code(), message)
}

fn user_error(e: &UserError) -> ApiError {
    let status = match e.code() {
        "account_exists" | "identity_taken" | "last_identity" => StatusCode::CONFLICT,
        "not_linked" | "unknown_user" => StatusCode::NOT_FOUND,
        _ if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, e.code(), e.to_string())
}

fn refresh_error(e: &RefreshError) -> ApiError {
    if e.is_retryable() {
        return unavailable(e.code());
    }
    match e {
        RefreshError::Random(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        ),
        e => unauthenticated(e.code(), &e.to_string()),
    }
}

/// `{"access_token","token_type","expires_in","refresh_token","user"}` for a new or
/// rotated session of `user`.
fn token_response(
    app: &App,
    user: &User,
    session: SessionId,
    refresh_token: &str,
) -> Result<serde_json::Value, ApiError> {
    let issued = tokens(app)?
        .issue(user.id, user.roles.clone(), session)
        .map_err(|e| {
            tracing::error!(error = %e, "signing an access token failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal error",
            )
        })?;
    Ok(serde_json::json!({
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in.as_secs(),
        "refresh_token": refresh_token,
        "user": user,
    }))
}

/// Opens a refresh family for `user` and answers with its tokens.
pub(crate) async fn open_session(app: &App, user: &User) -> Result<serde_json::Value, ApiError> {
    tokens(app)?;
    let issued = app
        .auth
        .refresh
        .open_family(user.id, app.clock.now())
        .await
        .map_err(|e| refresh_error(&e))?;
    token_response(app, user, issued.family_id, issued.token.expose())
}

fn cookie<'a>(request: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn query<B>(request: &Request<B>) -> HashMap<String, String> {
    request
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) async fn route(
    app: &Arc<App>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (Method::GET, ["auth", provider, "authorize"]) => authorize(app, provider, &request).await,
        (Method::GET | Method::POST, ["auth", provider, "callback"]) => {
            callback(app, provider, request).await
        }
        (Method::POST, ["auth", provider, "token"])
            if !matches!(*provider, "refresh" | "logout" | "exchange" | "me") =>
        {
            native(app, provider, request).await
        }
        (Method::POST, ["auth", "exchange"]) => exchange(app, request).await,
        (Method::POST, ["auth", "refresh"]) => refresh(app, request).await,
        (Method::POST, ["auth", "logout"]) => logout(app, request).await,
        (Method::GET, ["auth", "me"]) => me(app, &request).await,
        (Method::POST, ["auth", "link", provider]) => link(app, provider, request).await,
        (Method::DELETE, ["auth", "link", provider]) => unlink(app, provider, &request).await,
        (_, ["auth", ..]) => Err(ApiError::not_found()),
        _ => Err(ApiError::not_found()),
    }
}

/// `GET /auth/{provider}/authorize?platform=web&return_to=`: 302 to the provider.
async fn authorize(
    app: &Arc<App>,
    provider: &str,
    request: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    tokens(app)?;
    let provider = provider_of(app, provider)?;
    let params = query(request);
    let started = app
        .auth
        .web
        .begin(
            provider.as_ref(),
            &app.auth.callback_url(provider.id()),
            params.get("return_to").map(String::as_str),
            params.get("platform").map(String::as_str),
        )
        .await
        .map_err(|e| sign_in_error(&e))?;
    let secure = if app.auth.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{FLOW_COOKIE}={}; Path=/auth/{}/callback; Max-Age=600; HttpOnly; SameSite=Lax{secure}",
        started.browser_cookie,
        provider.id()
    );
    let mut response = Response::new(full(Vec::new()));
    *response.status_mut() = StatusCode::FOUND;
    let h = response.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(started.redirect.as_str())
            .map_err(|_| unavailable("provider_unavailable"))?,
    );
    h.insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|_| unavailable("internal_error"))?,
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `GET|POST /auth/{provider}/callback`.
async fn callback(
    app: &Arc<App>,
    provider: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let provider = provider_of(app, provider)?;
    let browser = cookie(&request, FLOW_COOKIE).map(str::to_owned);
    let params: CallbackParams = if request.method() == Method::POST {
        let body = http_body_util::Limited::new(request.into_body(), BODY_LIMIT);
        let bytes = http_body_util::BodyExt::collect(body)
            .await
            .map_err(|_| {
                ApiError::bad_request("invalid_body", "expected a form body under 16 KiB")
            })?
            .to_bytes();
        serde_urlencoded_params(&bytes)
    } else {
        let q = query(&request);
        CallbackParams {
            state: q.get("state").cloned(),
            code: q.get("code").cloned(),
            error: q.get("error").cloned(),
            iss: q.get("iss").cloned(),
        }
    };
    let completed = match app
        .auth
        .web
        .complete(provider.as_ref(), &params, browser.as_deref())
        .await
    {
        Ok(completed) => completed,
        Err(e) => {
            security_event(
                app,
                "login_failed",
                None,
                serde_json::json!({"provider": provider.id(), "code": e.code()}),
            );
            return Err(sign_in_error(&e));
        }
    };
    let user = sign_in_user(app, &completed.identity, completed.platform.as_deref()).await?;
    let clear = format!(
        "{FLOW_COOKIE}=; Path=/auth/{}/callback; Max-Age=0; HttpOnly; SameSite=Lax",
        provider.id()
    );
    let mut response = match completed.return_to {
        Some(return_to) => {
            let grant = LoginGrant {
                user_id: user.id,
                provider: provider.id(),
                session_id: SessionId::new(),
            };
            let code = app
                .auth
                .web
                .issue_login_code(&grant)
                .await
                .map_err(|e| sign_in_error(&e))?;
            let mut url = url::Url::parse(&return_to).map_err(|_| unavailable("internal_error"))?;
            url.query_pairs_mut().append_pair("login_code", &code);
            let mut response = Response::new(full(Vec::new()));
            *response.status_mut() = StatusCode::FOUND;
            response.headers_mut().insert(
                header::LOCATION,
                HeaderValue::from_str(url.as_str()).map_err(|_| unavailable("internal_error"))?,
            );
            response
        }
        None => json_response(StatusCode::OK, &open_session(app, &user).await?),
    };
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(clear) = HeaderValue::from_str(&clear) {
        h.insert(header::SET_COOKIE, clear);
    }
    Ok(response)
}

fn serde_urlencoded_params(bytes: &[u8]) -> CallbackParams {
    let mut params = CallbackParams::default();
    for (key, value) in url::form_urlencoded::parse(bytes) {
        match &*key {
            "state" => params.state = Some(value.into_owned()),
            "code" => params.code = Some(value.into_owned()),
            "error" => params.error = Some(value.into_owned()),
            "iss" => params.iss = Some(value.into_owned()),
            _ => {}
        }
    }
    params
}

/// Finds, links or creates the user of a verified identity, recording the outcome.
async fn sign_in_user(
    app: &App,
    identity: &upcoach_auth::VerifiedIdentity,
    platform: Option<&str>,
) -> Result<User, ApiError> {
    match app.auth.users.sign_in(identity, &app.auth.linking).await {
        Ok(signed_in) => {
            security_event(
                app,
                "login_success",
                Some(signed_in.user.id),
                serde_json::json!({
                    "provider": identity.provider,
                    "platform": platform,
                    "created": signed_in.created,
                    "linked": signed_in.linked,
                }),
            );
            Ok(signed_in.user)
        }
        Err(e) => {
            security_event(
                app,
                "login_failed",
                None,
                serde_json::json!({"provider": identity.provider, "code": e.code()}),
            );
            Err(user_error(&e))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeBody {
    id_token: String,
    nonce: Option<String>,
    #[serde(default)]
    platform: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<serde_json::Value>,
}

/// Verifies a native credential, refusing a replayed nonce.
async fn verify_native(
    app: &App,
    provider: &dyn AuthProvider,
    body: NativeBody,
) -> Result<upcoach_auth::VerifiedIdentity, ApiError> {
    let credential = NativeCredential::IdToken {
        id_token: body.id_token,
        nonce: body.nonce.clone(),
    };
    let identity = provider.verify_native(&credential).await.map_err(|e| {
        security_event(
            app,
            "login_failed",
            None,
            serde_json::json!({"provider": provider.id(), "code": e.code()}),
        );
        let status = if e.is_retryable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::UNAUTHORIZED
        };
        ApiError::new(status, e.code(), e.to_string())
    })?;
    let nonce = body.nonce.unwrap_or_default();
    let fresh = app
        .auth
        .web
        .claim_nonce(&nonce, NONCE_MEMORY)
        .await
        .map_err(|e| sign_in_error(&e))?;
    if !fresh {
        security_event(
            app,
            "login_failed",
            None,
            serde_json::json!({"provider": provider.id(), "code": "nonce_replayed"}),
        );
        return Err(unauthenticated(
            "nonce_replayed",
            "this nonce was used before",
        ));
    }
    Ok(identity)
}

/// `POST /auth/{provider}/token` `{"id_token","nonce","platform"}`.
async fn native(
    app: &Arc<App>,
    provider: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    tokens(app)?;
    let provider = provider_of(app, provider)?;
    let body: NativeBody = read_json(request.into_body(), BODY_LIMIT).await?;
    let platform = body.platform.clone();
    let identity = verify_native(app, provider.as_ref(), body).await?;
    let user = sign_in_user(app, &identity, platform.as_deref()).await?;
    Ok(json_response(
        StatusCode::OK,
        &open_session(app, &user).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeBody {
    login_code: String,
}

/// `POST /auth/exchange` `{"login_code"}`.
async fn exchange(app: &Arc<App>, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    tokens(app)?;
    let body: ExchangeBody = read_json(request.into_body(), BODY_LIMIT).await?;
    let grant = app
        .auth
        .web
        .redeem_login_code(&body.login_code)
        .await
        .map_err(|e| sign_in_error(&e))?;
    let user = app
        .auth
        .users
        .get(grant.user_id)
        .await
        .map_err(|e| user_error(&e))?
        .ok_or_else(|| unauthenticated("login_code_invalid", "the user no longer exists"))?;
    Ok(json_response(
        StatusCode::OK,
        &open_session(app, &user).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

/// `POST /auth/refresh` `{"refresh_token"}`.
async fn refresh(app: &Arc<App>, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    tokens(app)?;
    let body: RefreshBody = read_json(request.into_body(), BODY_LIMIT).await?;
    let rotation = match app
        .auth
        .refresh
        .rotate(&body.refresh_token, app.clock.now())
        .await
    {
        Ok(rotation) => rotation,
        Err(e) => {
            if let RefreshError::Reused { user_id, family_id } = &e {
                security_event(
                    app,
                    "refresh_token_reused",
                    Some(*user_id),
                    serde_json::json!({"family_id": family_id.to_string()}),
                );
            }
            return Err(refresh_error(&e));
        }
    };
    let user = app
        .auth
        .users
        .get(rotation.user_id)
        .await
        .map_err(|e| user_error(&e))?
        .ok_or_else(|| unauthenticated("refresh_token_revoked", "the user no longer exists"))?;
    let answer = token_response(app, &user, rotation.family_id, rotation.token.expose())?;
    Ok(json_response(StatusCode::OK, &answer))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogoutBody {
    refresh_token: Option<String>,
}

/// `POST /auth/logout` `{"refresh_token"?}`: 204, the family revoked.
async fn logout(app: &Arc<App>, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let principal = bearer(app, &request).await?;
    let has_body = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0");
    let body: LogoutBody = if has_body {
        read_json(request.into_body(), BODY_LIMIT).await?
    } else {
        LogoutBody::default()
    };
    let now = app.clock.now();
    let store = &app.auth.refresh;
    match body.refresh_token {
        // Only a family of the bearer's own user is revoked through a presented token.
        Some(token) => {
            store
                .revoke_presented(&token, now)
                .await
                .map_err(|e| refresh_error(&e))?;
        }
        None => {
            store
                .revoke_family(principal.session_id, RevokeReason::Logout, now)
                .await
                .map_err(|e| refresh_error(&e))?;
        }
    }
    security_event(
        app,
        "logout",
        Some(principal.user_id),
        serde_json::json!({"session": principal.session_id.to_string()}),
    );
    let mut response = Response::new(full(Vec::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

/// `GET /auth/me`.
async fn me(app: &Arc<App>, request: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let principal = bearer(app, request).await?;
    let user = app
        .auth
        .users
        .get(principal.user_id)
        .await
        .map_err(|e| user_error(&e))?
        .ok_or_else(|| unauthenticated("unknown_user", "the token's user no longer exists"))?;
    Ok(json_response(StatusCode::OK, &user))
}

/// `POST /auth/link/{provider}` (body as `/token`).
async fn link(
    app: &Arc<App>,
    provider: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let principal = bearer(app, &request).await?;
    let provider = provider_of(app, provider)?;
    let body: NativeBody = read_json(request.into_body(), BODY_LIMIT).await?;
    let identity = verify_native(app, provider.as_ref(), body).await?;
    let user = app
        .auth
        .users
        .link(principal.user_id, &identity)
        .await
        .map_err(|e| user_error(&e))?;
    security_event(
        app,
        "identity_linked",
        Some(user.id),
        serde_json::json!({"provider": provider.id()}),
    );
    Ok(json_response(StatusCode::OK, &user))
}

/// `DELETE /auth/link/{provider}`: 409 `last_identity` for the last way to sign in.
async fn unlink(
    app: &Arc<App>,
    provider: &str,
    request: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let principal = bearer(app, request).await?;
    let provider: ProviderId = provider.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_provider",
            "expected google, apple or facebook",
        )
    })?;
    let user = app
        .auth
        .users
        .unlink(principal.user_id, provider)
        .await
        .map_err(|e| user_error(&e))?;
    security_event(
        app,
        "identity_unlinked",
        Some(user.id),
        serde_json::json!({"provider": provider}),
    );
    Ok(json_response(StatusCode::OK, &user))
}
