//! [`FacebookStandIn`]: a loopback stand-in for the few Graph API endpoints a Facebook
//! sign-in uses — the code exchange (`/oauth/access_token`), token inspection
//! (`/debug_token`) and the profile (`/me`) — answering with Facebook's documented
//! JSON shapes, under a version prefix (`/v19.0` unless told otherwise).
//!
//! The app is set to require `appsecret_proof` (lowercase hex HMAC-SHA256 of the call's
//! `access_token`, keyed with the app secret) on `/debug_token` and `/me`, as a Facebook
//! app can be. Every answer is `application/json`; nothing a client sends makes it panic.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use upcoach_testing::facebook::{FacebookStandIn, FacebookUser, appsecret_proof};
//!
//! let graph = FacebookStandIn::start("123", "app-secret").await;
//! let user = FacebookUser::new("10001").with_name("Ada").with_email("ada@example.com");
//! let code = graph.issue_code(user, "https://app.example/callback");
//! let exchange = format!(
//!     "{}/oauth/access_token?client_id=123&client_secret=app-secret&code={code}\
//!      &redirect_uri=https%3A%2F%2Fapp.example%2Fcallback",
//!     graph.graph_url(),
//! );
//! // ... point the provider at `graph.graph_url()` and sign in with `code` ...
//! # let _ = (exchange, appsecret_proof("app-secret", "token"));
//! assert_eq!(graph.calls("/v19.0/me"), 0);
//! # }
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use hyper::{Method, StatusCode};
use serde_json::{Map, Value, json};
use sha2::Sha256;
use tokio::net::TcpListener;

use crate::serve::{Answer, accept_loop, json_answer};
use tokio::task::JoinHandle;

/// The Graph API version [`FacebookStandIn::start`] answers under.
pub const DEFAULT_GRAPH_VERSION: &str = "v19.0";
/// The app a token from [`FacebookStandIn::issue_foreign_token`] belongs to.
pub const FOREIGN_APP_ID: &str = "999";
/// The `application` name `/debug_token` reports.
pub const APPLICATION_NAME: &str = "upcoach test";
/// `expires_in` of a token from the code exchange (what Facebook answers: about 60 days).
pub const EXCHANGE_EXPIRES_IN: u64 = 5_183_944;
/// Most tokens one stand-in issues (by the `issue_*` calls and code exchanges together).
pub const MAX_TOKENS: usize = 10_000;
/// Most authorization codes one stand-in issues.
pub const MAX_CODES: usize = 10_000;

const SIXTY_DAYS: u64 = 60 * 24 * 3600;
const NINETY_DAYS: u64 = 90 * 24 * 3600;
const SCOPES: [&str; 2] = ["email", "public_profile"];
/// A longer query string is refused with a 400.
const MAX_QUERY_BYTES: usize = 8 * 1024;
/// Distinct paths [`FacebookStandIn::calls`] keeps counts for.
const MAX_COUNTED_PATHS: usize = 1024;
const MAX_COUNTED_PATH_BYTES: usize = 256;

const OAUTH: &str = "OAuthException";
const GRAPH_METHOD: &str = "GraphMethodException";

/// A Facebook user as the stand-in knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FacebookUser {
    /// The app-scoped user id (`id` of `/me`, `user_id` of `/debug_token`).
    pub id: String,
    /// The display name, when the user has one.
    pub name: Option<String>,
    /// The e-mail address, when the user shares one.
    pub email: Option<String>,
}

impl FacebookUser {
    /// A user with `id` and neither name nor e-mail.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            name: None,
            email: None,
        }
    }

    /// This user with `name`.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// This user with `email`.
    pub fn with_email(mut self, email: impl Into<String>) -> Self {
        self.email = Some(email.into());
        self
    }
}

/// `appsecret_proof` for `access_token`: lowercase hex HMAC-SHA256 keyed with
/// `app_secret`, as Facebook documents it.
pub fn appsecret_proof(app_secret: &str, access_token: &str) -> String {
    // HMAC takes a key of any length; this arm is never taken.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) else {
        return String::new();
    };
    mac.update(access_token.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A Graph API stand-in on `127.0.0.1:<random port>` for one app; stops when dropped.
///
/// Answers, all `GET` with query parameters (`{v}` is the version, `v19.0` by default):
///
/// - `/{v}/oauth/access_token?client_id&client_secret&redirect_uri&code`: a code from
///   [`issue_code`](Self::issue_code) for a new user token. A code is consumed on its
///   first use, whatever the outcome.
/// - `/{v}/debug_token?input_token&access_token=<app_id>|<app_secret>&appsecret_proof`:
///   what the token is; `is_valid: false` with error 190 for an unknown (no subcode),
///   revoked (460) or expired (463) one.
/// - `/{v}/me?fields&access_token&appsecret_proof`: the user, only the asked-for fields
///   (`id`, `name`, `email`; `id,name` when `fields` is absent; absent values left out).
///
/// The stand-in knows one app secret, so a [foreign](Self::issue_foreign_token) token is
/// answered by `/me` like any other (a proof made with this app's secret passes): only
/// `/debug_token`'s `app_id` tells it apart, which is what a provider must check.
#[derive(Debug)]
pub struct FacebookStandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    app_id: String,
    app_secret: String,
    /// `/v19.0`.
    prefix: String,
    books: Mutex<Books>,
    proof_failures: AtomicUsize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The app secret is left out.
        f.debug_struct("Shared")
            .field("app_id", &self.app_id)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Books {
    codes: HashMap<String, CodeGrant>,
    used_codes: HashSet<String>,
    tokens: HashMap<String, TokenGrant>,
    calls: HashMap<String, usize>,
}

struct CodeGrant {
    user: FacebookUser,
    redirect_uri: String,
}

struct TokenGrant {
    user: FacebookUser,
    app_id: String,
    expires_at: u64,
    revoked: bool,
}

/// Why a known token no longer works, with Facebook's subcode.
enum Invalid {
    Revoked,
    Expired(u64),
}

impl Invalid {
    fn subcode(&self) -> u32 {
        match self {
            Self::Revoked => 460,
            Self::Expired(_) => 463,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Revoked => "Error validating access token: The session has been invalidated \
                              because the user changed their password or Facebook has changed \
                              the session for security reasons."
                .to_owned(),
            Self::Expired(at) => format!(
                "Error validating access token: Session has expired at unix time {at}. \
                 The current time is unix time {}.",
                now()
            ),
        }
    }
}

impl TokenGrant {
    fn invalid(&self) -> Option<Invalid> {
        if self.revoked {
            Some(Invalid::Revoked)
        } else if self.expires_at <= now() {
            Some(Invalid::Expired(self.expires_at))
        } else {
            None
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

impl FacebookStandIn {
    /// Starts a stand-in for the app `app_id` / `app_secret`, answering under
    /// [`DEFAULT_GRAPH_VERSION`].
    pub async fn start(app_id: &str, app_secret: &str) -> Self {
        Self::start_with_version(app_id, app_secret, DEFAULT_GRAPH_VERSION).await
    }

    /// Starts a stand-in answering under `version` (`"v19.0"`, with or without a leading
    /// `/`).
    pub async fn start_with_version(app_id: &str, app_secret: &str, version: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Graph API stand-in on loopback");
        let addr = listener.local_addr().expect("stand-in address");
        let shared = Arc::new(Shared {
            app_id: app_id.to_owned(),
            app_secret: app_secret.to_owned(),
            prefix: format!("/{}", version.trim_matches('/')),
            books: Mutex::new(Books::default()),
            proof_failures: AtomicUsize::new(0),
        });
        let served = shared.clone();
        let accept = tokio::spawn(accept_loop(
            listener,
            move |request: hyper::Request<hyper::body::Incoming>| {
                let uri = request.uri();
                std::future::ready(served.answer(request.method(), uri.path(), uri.query()))
            },
        ));
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// [`base_url`](Self::base_url) with the version: `http://127.0.0.1:<port>/v19.0`.
    pub fn graph_url(&self) -> String {
        format!("{}{}", self.base_url(), self.shared.prefix)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The app id it answers for.
    pub fn app_id(&self) -> &str {
        &self.shared.app_id
    }

    /// The variables that point upcoach's Facebook Login at this stand-in: its app id and
    /// secret, its [`graph_url`](Self::graph_url), and the login dialog under the same
    /// version (`http://127.0.0.1:<port>/v19.0/dialog/oauth`, which the stand-in does not
    /// serve: tests drive the browser part themselves, with
    /// [`issue_code`](Self::issue_code)).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FACEBOOK_APP_ID", self.shared.app_id.clone()),
            ("FACEBOOK_APP_SECRET", self.shared.app_secret.clone()),
            ("FACEBOOK_GRAPH_URL", self.graph_url()),
            (
                "FACEBOOK_DIALOG_URL",
                format!("{}/dialog/oauth", self.graph_url()),
            ),
        ]
    }

    /// A one-time authorization code for `user`, valid only with `redirect_uri`.
    ///
    /// # Panics
    ///
    /// Past [`MAX_CODES`] codes.
    pub fn issue_code(&self, user: FacebookUser, redirect_uri: &str) -> String {
        let mut books = self.shared.books();
        assert!(
            books.codes.len() + books.used_codes.len() < MAX_CODES,
            "the Facebook stand-in issues at most {MAX_CODES} codes"
        );
        let code = format!(
            "AQ{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        books.codes.insert(
            code.clone(),
            CodeGrant {
                user,
                redirect_uri: redirect_uri.to_owned(),
            },
        );
        code
    }

    /// A user access token for this app, expiring in 60 days.
    ///
    /// # Panics
    ///
    /// Past [`MAX_TOKENS`] tokens.
    pub fn issue_token(&self, user: FacebookUser) -> String {
        self.issue(user, self.shared.app_id.clone(), now() + SIXTY_DAYS)
    }

    /// A valid user access token of another app ([`FOREIGN_APP_ID`]).
    ///
    /// # Panics
    ///
    /// Past [`MAX_TOKENS`] tokens.
    pub fn issue_foreign_token(&self, user: FacebookUser) -> String {
        self.issue(user, FOREIGN_APP_ID.to_owned(), now() + SIXTY_DAYS)
    }

    /// A user access token for this app that expired an hour ago: `/debug_token` says
    /// `is_valid: false`, error 190 subcode 463, with `expires_at` in the past.
    ///
    /// # Panics
    ///
    /// Past [`MAX_TOKENS`] tokens.
    pub fn issue_expired_token(&self, user: FacebookUser) -> String {
        self.issue(user, self.shared.app_id.clone(), now().saturating_sub(3600))
    }

    fn issue(&self, user: FacebookUser, app_id: String, expires_at: u64) -> String {
        self.shared
            .mint(user, app_id, expires_at)
            .unwrap_or_else(|| panic!("the Facebook stand-in issues at most {MAX_TOKENS} tokens"))
    }

    /// Invalidates `token` (as a password change does): afterwards `/debug_token` says
    /// `is_valid: false`, error 190 subcode 460, and `/me` refuses it. An unknown token is
    /// ignored.
    pub fn revoke(&self, token: &str) {
        if let Some(grant) = self.shared.books().tokens.get_mut(token) {
            grant.revoked = true;
        }
    }

    /// Requests received on `path` (such as `"/v19.0/me"`), whatever their answer.
    pub fn calls(&self, path: &str) -> usize {
        self.shared.books().calls.get(path).copied().unwrap_or(0)
    }

    /// Calls to `/debug_token` or `/me` refused for a missing or wrong `appsecret_proof`.
    pub fn proof_failures(&self) -> usize {
        self.shared.proof_failures.load(Ordering::SeqCst)
    }

    /// Stops the server and waits until it no longer accepts connections.
    pub async fn shutdown(mut self) {
        self.accept.abort();
        let _ = (&mut self.accept).await;
    }
}

impl Drop for FacebookStandIn {
    fn drop(&mut self) {
        // The accept task owns every connection's task: aborting it ends them all.
        self.accept.abort();
    }
}

/// Facebook's error shape: `{"error":{"message","type","code"[,"error_subcode"],"fbtrace_id"}}`.
fn graph_error(
    status: StatusCode,
    kind: &str,
    code: u32,
    subcode: Option<u32>,
    message: &str,
) -> Answer {
    let mut error = json!({ "message": message, "type": kind, "code": code });
    if let Some(subcode) = subcode {
        error["error_subcode"] = json!(subcode);
    }
    error["fbtrace_id"] = json!("x");
    json_answer(status, &json!({ "error": error }))
}

fn bad_request(kind: &str, code: u32, message: &str) -> Answer {
    graph_error(StatusCode::BAD_REQUEST, kind, code, None, message)
}

/// A query's parameters; a repeated one is refused.
fn parse_query(raw: Option<&str>) -> Result<HashMap<String, String>, &'static str> {
    let raw = raw.unwrap_or("");
    if raw.len() > MAX_QUERY_BYTES {
        return Err("The query string is too long.");
    }
    let mut params = HashMap::new();
    for (key, value) in url::form_urlencoded::parse(raw.as_bytes()) {
        if params
            .insert(key.into_owned(), value.into_owned())
            .is_some()
        {
            return Err("A query parameter is given more than once.");
        }
    }
    Ok(params)
}

/// A parameter, `None` when absent or empty.
fn param<'q>(query: &'q HashMap<String, String>, name: &str) -> Option<&'q str> {
    query
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

impl Shared {
    /// The books, even after a panic elsewhere poisoned the lock.
    fn books(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mint(&self, user: FacebookUser, app_id: String, expires_at: u64) -> Option<String> {
        let mut books = self.books();
        if books.tokens.len() >= MAX_TOKENS {
            return None;
        }
        let token = format!(
            "EAAU{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        books.tokens.insert(
            token.clone(),
            TokenGrant {
                user,
                app_id,
                expires_at,
                revoked: false,
            },
        );
        Some(token)
    }

    fn count_call(&self, path: &str) {
        let mut books = self.books();
        if let Some(count) = books.calls.get_mut(path) {
            *count += 1;
        } else if books.calls.len() < MAX_COUNTED_PATHS && path.len() <= MAX_COUNTED_PATH_BYTES {
            books.calls.insert(path.to_owned(), 1);
        }
    }

    fn answer(&self, method: &Method, path: &str, query: Option<&str>) -> Answer {
        self.count_call(path);
        let endpoint = path.strip_prefix(self.prefix.as_str()).unwrap_or("");
        if !matches!(endpoint, "/oauth/access_token" | "/debug_token" | "/me") {
            let shown: String = path.chars().take(200).collect();
            return graph_error(
                StatusCode::NOT_FOUND,
                OAUTH,
                2500,
                None,
                &format!("Unknown path components: {shown}"),
            );
        }
        if method != Method::GET {
            return bad_request(GRAPH_METHOD, 100, "Unsupported request method.");
        }
        let query = match parse_query(query) {
            Ok(query) => query,
            Err(why) => return bad_request(OAUTH, 100, why),
        };
        match endpoint {
            "/oauth/access_token" => self.exchange(&query),
            "/debug_token" => self.debug_token(&query),
            _ => self.me(&query),
        }
    }

    /// `/oauth/access_token`: a code for a user token.
    fn exchange(&self, query: &HashMap<String, String>) -> Answer {
        let code = param(query, "code");
        // Consumed first, whatever comes next.
        let (grant, used) = match code {
            Some(code) => {
                let mut books = self.books();
                let grant = books.codes.remove(code);
                if grant.is_some() {
                    books.used_codes.insert(code.to_owned());
                }
                (grant, books.used_codes.contains(code))
            }
            None => (None, false),
        };
        let refuse = |subcode, message: &str| {
            graph_error(StatusCode::BAD_REQUEST, OAUTH, 100, subcode, message)
        };
        if param(query, "client_id") != Some(self.app_id.as_str()) {
            return refuse(
                None,
                "Error validating application. Invalid application ID.",
            );
        }
        if param(query, "client_secret") != Some(self.app_secret.as_str()) {
            return refuse(None, "Error validating client secret.");
        }
        let Some(grant) = grant else {
            return match (code, used) {
                (None, _) => refuse(None, "Missing authorization code."),
                (Some(_), true) => refuse(Some(36009), "This authorization code has been used."),
                (Some(_), false) => refuse(None, "Invalid verification code format."),
            };
        };
        if query.get("redirect_uri").map(String::as_str) != Some(grant.redirect_uri.as_str()) {
            return refuse(
                Some(36008),
                "Error validating verification code. Please make sure your redirect_uri is \
                 identical to the one you used in the OAuth dialog request",
            );
        }
        let expires_at = now() + EXCHANGE_EXPIRES_IN;
        let Some(token) = self.mint(grant.user, self.app_id.clone(), expires_at) else {
            return refuse(
                None,
                &format!("The stand-in has issued its maximum of {MAX_TOKENS} tokens."),
            );
        };
        json_answer(
            StatusCode::OK,
            &json!({
                "access_token": token,
                "token_type": "bearer",
                "expires_in": EXCHANGE_EXPIRES_IN,
            }),
        )
    }

    /// A missing or wrong `appsecret_proof` for `access_token`, counted, as its answer.
    fn check_proof(&self, query: &HashMap<String, String>, access_token: &str) -> Option<Answer> {
        let message = match param(query, "appsecret_proof") {
            None => "API calls from the server require an appsecret_proof argument",
            Some(proof) if proof == appsecret_proof(&self.app_secret, access_token) => {
                return None;
            }
            Some(_) => "Invalid appsecret_proof provided in the API argument",
        };
        self.proof_failures.fetch_add(1, Ordering::SeqCst);
        Some(bad_request(GRAPH_METHOD, 100, message))
    }

    /// `/debug_token`: what `input_token` is, asked with the app access token.
    fn debug_token(&self, query: &HashMap<String, String>) -> Answer {
        let Some(access_token) = param(query, "access_token") else {
            return bad_request(
                OAUTH,
                104,
                "An access token is required to request this resource.",
            );
        };
        if access_token != format!("{}|{}", self.app_id, self.app_secret) {
            return bad_request(OAUTH, 190, "Invalid OAuth access token signature.");
        }
        if let Some(refused) = self.check_proof(query, access_token) {
            return refused;
        }
        let Some(input_token) = param(query, "input_token") else {
            return bad_request(GRAPH_METHOD, 100, "The parameter input_token is required");
        };
        let books = self.books();
        let Some(grant) = books.tokens.get(input_token) else {
            return json_answer(
                StatusCode::OK,
                &json!({ "data": {
                    "error": { "code": 190, "message": "Invalid OAuth access token - Cannot parse access token" },
                    "is_valid": false,
                    "scopes": [],
                }}),
            );
        };
        let issued = grant.expires_at.saturating_sub(SIXTY_DAYS);
        let mut data = json!({
            "app_id": grant.app_id,
            "type": "USER",
            "application": APPLICATION_NAME,
            "data_access_expires_at": issued + NINETY_DAYS,
            "expires_at": grant.expires_at,
            "is_valid": true,
            "scopes": SCOPES,
            "user_id": grant.user.id,
        });
        if let Some(invalid) = grant.invalid() {
            data["is_valid"] = json!(false);
            data["scopes"] = json!([]);
            data["error"] = json!({
                "code": 190,
                "message": invalid.message(),
                "subcode": invalid.subcode(),
            });
        }
        json_answer(StatusCode::OK, &json!({ "data": data }))
    }

    /// `/me`: the token's user, only the asked-for fields.
    fn me(&self, query: &HashMap<String, String>) -> Answer {
        let Some(access_token) = param(query, "access_token") else {
            return bad_request(
                OAUTH,
                2500,
                "An active access token must be used to query information about the current user.",
            );
        };
        let user = {
            let books = self.books();
            let Some(grant) = books.tokens.get(access_token) else {
                return bad_request(OAUTH, 190, "Invalid OAuth access token.");
            };
            if let Some(invalid) = grant.invalid() {
                return graph_error(
                    StatusCode::BAD_REQUEST,
                    OAUTH,
                    190,
                    Some(invalid.subcode()),
                    &invalid.message(),
                );
            }
            grant.user.clone()
        };
        if let Some(refused) = self.check_proof(query, access_token) {
            return refused;
        }
        let fields = query.get("fields").map_or("id,name", String::as_str);
        let mut profile = Map::new();
        profile.insert("id".to_owned(), json!(user.id));
        for field in fields.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let value = match field {
                "id" => continue,
                "name" => &user.name,
                "email" => &user.email,
                other => {
                    let shown: String = other.chars().take(100).collect();
                    return bad_request(
                        GRAPH_METHOD,
                        100,
                        &format!(
                            "(#100) Tried accessing nonexisting field ({shown}) on node type (User)"
                        ),
                    );
                }
            };
            if let Some(value) = value {
                profile.insert(field.to_owned(), json!(value));
            }
        }
        json_answer(StatusCode::OK, &Value::Object(profile))
    }
}
