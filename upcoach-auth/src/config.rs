//! Sign-in's settings: `AuthConfig::from_env()` ([`Settings`]), reading `UPCOACH_PUBLIC_URL`,
//! `AUTH_*`, `GOOGLE_*`, `APPLE_*` and `FACEBOOK_*`.
//!
//! ```
//! use upcoach_auth::config::AuthConfig;
//! use upcoach_core::config::Settings;
//!
//! let env = [("GOOGLE_CLIENT_ID", "web.apps.googleusercontent.com"), ("GOOGLE_CLIENT_SECRET", "s3cret")];
//! let config = AuthConfig::from_lookup(|name| {
//!     env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
//! })?;
//! assert_eq!(config.google.unwrap().issuer_url, "https://accounts.google.com");
//!
//! let err = AuthConfig::from_lookup(|name| (name == "GOOGLE_CLIENT_SECRET").then(|| "s3cret".into()))
//!     .unwrap_err();
//! assert!(err.to_string().contains("GOOGLE_CLIENT_ID") && !err.to_string().contains("s3cret"));
//! # Ok::<(), upcoach_core::config::ConfigErrors>(())
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use upcoach_core::{Clock, Secret};

use crate::ProviderId;
use crate::oidc::OpenIdConfig;
use crate::refresh::RefreshPolicy;
use crate::session::{AccessTokens, SigningKey};
use upcoach_core::config::{Env, Settings, parse_origin};
use url::Url;

/// `AUTH_SIGNING_KEY` or `AUTH_PREVIOUS_SIGNING_KEY` is not a base64url Ed25519 seed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a base64url Ed25519 seed of 32 bytes")]
pub struct InvalidSigningKey(pub &'static str);

/// Why a development server (`--dev`) may not start, or its key could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevModeError {
    /// It would listen beyond loopback.
    #[error(
        "--dev refuses to start: it hands out tokens for any user, so it listens on loopback only (UPCOACH_ADDR is {0})"
    )]
    NotLoopback(SocketAddr),
    /// The public URL is https: this looks like production.
    #[error("--dev refuses to start: UPCOACH_PUBLIC_URL is https, which looks like production")]
    Https,
    /// `AUTH_SIGNING_KEY` is not a key.
    #[error(transparent)]
    Key(#[from] InvalidSigningKey),
    /// No key could be generated.
    #[error("could not generate the development signing key")]
    Generate(#[source] crate::Error),
}

/// The default of `AUTH_SESSION_LIFETIME_DAYS`.
pub const DEFAULT_SESSION_LIFETIME_DAYS: u32 = 90;

/// Everything sign-in reads from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthConfig {
    /// `UPCOACH_PUBLIC_URL`: the server's address as browsers and providers reach it
    /// (`https://api.example.com`), from which callback URLs are made; `None` leaves
    /// the default to the server (`http://` + its listening address).
    pub public_url: Option<String>,
    /// `AUTH_RETURN_TO_ALLOWLIST`: comma-separated URLs a web sign-in may return to
    /// (`https://app.example.com/signed-in`), matched exactly: no other path, query or
    /// host. Empty allows none (sign-in then answers with tokens, no redirect).
    pub return_to_allowlist: Vec<String>,
    /// `AUTH_SIGNING_KEY`: the Ed25519 seed (32 bytes, base64url) that signs access
    /// tokens. Without a key no tokens are issued (a development server makes one).
    pub signing_key: Option<Secret>,
    /// `AUTH_PREVIOUS_SIGNING_KEY`: the key before it, still accepted and published
    /// until its tokens expire.
    pub previous_signing_key: Option<Secret>,
    /// `AUTH_REFRESH_GRACE_SECONDS`: how long after a refresh token's rotation the same
    /// token may be presented again for a sibling (default 0, at most 60), for clients
    /// whose answer got lost; within it a stolen token is not detected.
    pub refresh_grace: Duration,
    /// `AUTH_SESSION_LIFETIME_DAYS`: how long a sign-in's refresh tokens keep working,
    /// whatever the rotations (default 90, 1 to 365).
    pub session_lifetime: Duration,
    /// `AUTH_MEMORY_MAX_USERS`: the most users an in-memory user store holds (default
    /// [`DEFAULT_MAX_USERS`](crate::users::DEFAULT_MAX_USERS), 1 to 10,000,000); past
    /// it, new accounts are refused with `user_store_full`. No bound in Postgres.
    pub memory_max_users: usize,
    /// `AUTH_MEMORY_MAX_SESSIONS`: the most sign-in sessions (refresh-token families)
    /// an in-memory refresh store holds (default
    /// [`DEFAULT_MAX_FAMILIES`](crate::refresh::DEFAULT_MAX_FAMILIES), 1 to
    /// 10,000,000); past it, new sign-ins are refused with `refresh_store_full`. No
    /// bound in Postgres.
    pub memory_max_sessions: usize,
    /// `AUTH_MEMORY_MAX_REFRESH_TOKENS`: the most refresh tokens, rotated ones
    /// included, an in-memory refresh store holds (default
    /// [`DEFAULT_MAX_TOKENS`](crate::refresh::DEFAULT_MAX_TOKENS), 1 to 100,000,000);
    /// past it, sign-ins and refreshes are refused with `refresh_store_full`. No
    /// bound in Postgres.
    pub memory_max_refresh_tokens: usize,
    /// `GOOGLE_*`: Google sign-in, when any of its variables is set.
    pub google: Option<GoogleConfig>,
    /// `APPLE_*`: Sign in with Apple, when any of its variables is set.
    pub apple: Option<AppleConfig>,
    /// `FACEBOOK_*`: Facebook Login, when any of its variables is set.
    pub facebook: Option<FacebookConfig>,
    /// `OIDC_PROVIDERS=gitlab,keycloak` and, for each name, `OIDC_<NAME>_ISSUER`,
    /// `OIDC_<NAME>_CLIENT_ID`, `OIDC_<NAME>_CLIENT_SECRET` (required),
    /// `OIDC_<NAME>_SCOPES` (space- or comma-separated; default `openid email profile`),
    /// `OIDC_<NAME>_AUDIENCES` (other client ids, comma-separated) and
    /// `OIDC_<NAME>_TRUSTED_FOR_LINKING` (default false), where `<NAME>` is the name in
    /// capitals with `-` as `_`: other OpenID Connect providers, each under its name.
    pub openid: Vec<OpenIdConfig>,
}

impl Default for AuthConfig {
    /// No providers, no key, no allowed return URLs.
    fn default() -> Self {
        Self {
            public_url: None,
            return_to_allowlist: Vec::new(),
            signing_key: None,
            previous_signing_key: None,
            refresh_grace: Duration::ZERO,
            session_lifetime: Duration::from_secs(
                u64::from(DEFAULT_SESSION_LIFETIME_DAYS) * 24 * 3600,
            ),
            memory_max_users: crate::users::DEFAULT_MAX_USERS,
            memory_max_sessions: crate::refresh::DEFAULT_MAX_FAMILIES,
            memory_max_refresh_tokens: crate::refresh::DEFAULT_MAX_TOKENS,
            google: None,
            apple: None,
            facebook: None,
            openid: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// The refresh-token policy: `AUTH_REFRESH_GRACE_SECONDS` and
    /// `AUTH_SESSION_LIFETIME_DAYS`.
    pub fn refresh_policy(&self) -> RefreshPolicy {
        RefreshPolicy::default()
            .with_grace(self.refresh_grace)
            .with_family_lifetime(self.session_lifetime)
    }

    /// An in-memory user store with `AUTH_MEMORY_MAX_USERS`.
    pub fn memory_user_store(&self) -> crate::users::MemoryUserStore {
        crate::users::MemoryUserStore::new().with_max_users(self.memory_max_users)
    }

    /// An in-memory refresh store with [`refresh_policy`](Self::refresh_policy),
    /// `AUTH_MEMORY_MAX_SESSIONS` and `AUTH_MEMORY_MAX_REFRESH_TOKENS`.
    pub fn memory_refresh_store(&self) -> crate::refresh::MemoryRefreshStore {
        crate::refresh::MemoryRefreshStore::new(self.refresh_policy())
            .with_max_families(self.memory_max_sessions)
            .with_max_tokens(self.memory_max_refresh_tokens)
    }

    /// Where sign-in keeps users, refresh-token families and data-deletion requests:
    /// Postgres when `postgres` is given (refresh tokens with
    /// [`refresh_policy`](Self::refresh_policy)), else memory bounded by this
    /// configuration ([`memory_stores`](Self::memory_stores)). Hand them to
    /// [`SessionsBuilder::stores`](crate::sessions::SessionsBuilder::stores).
    ///
    /// ```
    /// use upcoach_auth::config::AuthConfig;
    /// use upcoach_core::config::Settings;
    ///
    /// let config = AuthConfig::from_lookup(|n| (n == "AUTH_MEMORY_MAX_USERS").then(|| "50".into()))?;
    /// let stores = config.stores(None);
    /// assert_eq!(stores.memory.expect("no Postgres: in memory").users.max_users(), 50);
    /// # Ok::<(), upcoach_core::config::ConfigErrors>(())
    /// ```
    #[cfg(feature = "postgres")]
    pub fn stores(&self, postgres: Option<&upcoach_core::postgres::MeteredPool>) -> AuthStores {
        match postgres {
            Some(pool) => AuthStores {
                refresh: Arc::new(
                    crate::refresh::PgRefreshStore::new(pool.clone())
                        .with_policy(self.refresh_policy()),
                ),
                users: Arc::new(crate::users::PgUserStore::new(pool.clone())),
                deletions: Arc::new(crate::deletion::PgDeletionStore::new(pool.clone())),
                memory: None,
            },
            None => {
                let memory = self.memory_stores();
                AuthStores {
                    refresh: memory.refresh.clone(),
                    users: memory.users.clone(),
                    deletions: Arc::new(crate::deletion::MemoryDeletionStore::new()),
                    memory: Some(memory),
                }
            }
        }
    }

    /// Both in-memory stores, bounded by this configuration, for a server without
    /// Postgres.
    pub fn memory_stores(&self) -> MemoryAuthStores {
        MemoryAuthStores {
            users: std::sync::Arc::new(self.memory_user_store()),
            refresh: std::sync::Arc::new(self.memory_refresh_store()),
        }
    }

    /// Our access tokens signed by `AUTH_SIGNING_KEY` (also accepting
    /// `AUTH_PREVIOUS_SIGNING_KEY`), or `None` without a key.
    pub fn access_tokens(
        &self,
        clock: Arc<dyn Clock>,
    ) -> Result<Option<AccessTokens>, InvalidSigningKey> {
        let Some(seed) = &self.signing_key else {
            return Ok(None);
        };
        let mut tokens = AccessTokens::new(signing_key(seed, "AUTH_SIGNING_KEY")?, clock);
        if let Some(previous) = &self.previous_signing_key {
            tokens = tokens.with_previous_key(signing_key(previous, "AUTH_PREVIOUS_SIGNING_KEY")?);
        }
        Ok(Some(tokens))
    }

    /// The access tokens of a development server (one that hands out tokens for any
    /// user) listening on `addr`: refused beyond loopback or behind an https public URL;
    /// signed by `AUTH_SIGNING_KEY` when set (so several local processes share one key),
    /// else by a key made now and lost at exit. Always logs loudly that it is on.
    pub fn dev_access_tokens(
        &self,
        addr: SocketAddr,
        clock: Arc<dyn Clock>,
    ) -> Result<AccessTokens, DevModeError> {
        if !addr.ip().is_loopback() {
            return Err(DevModeError::NotLoopback(addr));
        }
        if self
            .public_url
            .as_deref()
            .is_some_and(|url| url.starts_with("https://"))
        {
            return Err(DevModeError::Https);
        }
        let (tokens, key) = match self.access_tokens(clock.clone())? {
            Some(tokens) => (tokens, "AUTH_SIGNING_KEY"),
            None => {
                let key = SigningKey::generate().map_err(DevModeError::Generate)?;
                (
                    AccessTokens::new(key, clock),
                    "generated at start, lost at exit",
                )
            }
        };
        tracing::warn!(
            signing_key = key,
            "DEVELOPMENT MODE (--dev): tokens for any user and role are handed out. \
             Never run this in production."
        );
        Ok(tokens)
    }
}

impl Settings for AuthConfig {
    fn read(r: &mut Env<'_>) -> Self {
        let defaults = Self::default();
        let refresh_grace = Duration::from_secs(r.number(
            "AUTH_REFRESH_GRACE_SECONDS",
            defaults.refresh_grace.as_secs(),
            0..=60,
            "a whole number of seconds from 0 to 60",
        ));
        let session_lifetime = Duration::from_secs(
            r.number(
                "AUTH_SESSION_LIFETIME_DAYS",
                u64::from(DEFAULT_SESSION_LIFETIME_DAYS),
                1..=365,
                "a whole number of days from 1 to 365",
            ) * 24
                * 3600,
        );
        let public_url = r
            .get("UPCOACH_PUBLIC_URL")
            .and_then(|v| match parse_origin(v.trim()) {
                Some(origin) => Some(origin),
                None => {
                    r.invalid_because(
                        "UPCOACH_PUBLIC_URL",
                        "the server's public origin such as https://api.example.com",
                        Some(v.clone()),
                        Some("scheme://host[:port] with no path"),
                    );
                    None
                }
            });
        let return_to_allowlist = match r.get("AUTH_RETURN_TO_ALLOWLIST") {
            None => Vec::new(),
            Some(v) => {
                let mut urls = Vec::new();
                for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    match Url::parse(part) {
                        Ok(url)
                            if matches!(url.scheme(), "https" | "http")
                                && url.host_str().is_some()
                                && url.username().is_empty()
                                && url.password().is_none()
                                && url.query().is_none()
                                && url.fragment().is_none() =>
                        {
                            urls.push(url.to_string());
                        }
                        _ => r.invalid_because(
                            "AUTH_RETURN_TO_ALLOWLIST",
                            "comma-separated URLs such as https://app.example.com/signed-in",
                            (!part.contains('@')).then(|| part.to_owned()),
                            Some("each is an http(s) URL with a host and path, without query or fragment"),
                        ),
                    }
                }
                urls
            }
        };
        let signing_key = r.secret_optional("AUTH_SIGNING_KEY");
        let previous_signing_key = r.secret_optional("AUTH_PREVIOUS_SIGNING_KEY");
        let memory_max_users = r.number(
            "AUTH_MEMORY_MAX_USERS",
            defaults.memory_max_users,
            1..=10_000_000,
            "a whole number of users from 1 to 10000000",
        );
        let memory_max_sessions = r.number(
            "AUTH_MEMORY_MAX_SESSIONS",
            defaults.memory_max_sessions,
            1..=10_000_000,
            "a whole number of sessions from 1 to 10000000",
        );
        let memory_max_refresh_tokens = r.number(
            "AUTH_MEMORY_MAX_REFRESH_TOKENS",
            defaults.memory_max_refresh_tokens,
            1..=100_000_000,
            "a whole number of tokens from 1 to 100000000",
        );
        let google = read_google(r);
        let apple = read_apple(r);
        let facebook = read_facebook(r);
        let openid = read_openid(r);
        Self {
            public_url,
            return_to_allowlist,
            signing_key,
            previous_signing_key,
            refresh_grace,
            session_lifetime,
            memory_max_users,
            memory_max_sessions,
            memory_max_refresh_tokens,
            google: google.flatten(),
            apple: apple.flatten(),
            facebook: facebook.flatten(),
            openid,
        }
    }
}

/// Google sign-in (`GOOGLE_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GoogleConfig {
    /// `GOOGLE_CLIENT_ID`: the OAuth client used for the web authorization-code flow.
    pub client_id: String,
    /// `GOOGLE_CLIENT_SECRET`: that client's secret.
    pub client_secret: Secret,
    /// `GOOGLE_WEB_CLIENT_ID`: another accepted audience for id tokens (web apps).
    pub web_client_id: Option<String>,
    /// `GOOGLE_MOBILE_CLIENT_ID`: another accepted audience for id tokens (native apps).
    pub mobile_client_id: Option<String>,
    /// `GOOGLE_ISSUER_URL`: where discovery starts (default
    /// `https://accounts.google.com`; tests point it at their own provider).
    pub issuer_url: String,
    /// `GOOGLE_HOSTED_DOMAIN`: only accounts of this Google Workspace domain (`hd`).
    pub hosted_domain: Option<String>,
}

impl GoogleConfig {
    /// Every client id that an id token may be issued to, without duplicates.
    pub fn audiences(&self) -> Vec<&str> {
        let mut out = vec![self.client_id.as_str()];
        for id in [&self.web_client_id, &self.mobile_client_id]
            .into_iter()
            .flatten()
        {
            if !out.contains(&id.as_str()) {
                out.push(id);
            }
        }
        out
    }
}

/// Sign in with Apple (`APPLE_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppleConfig {
    /// `APPLE_WEB_CLIENT_ID`: the Services ID used on the web.
    pub web_client_id: Option<String>,
    /// `APPLE_MOBILE_CLIENT_ID`: the app's bundle id used by native sign-in.
    pub mobile_client_id: Option<String>,
    /// `APPLE_TEAM_ID`: the 10-character team id.
    pub team_id: String,
    /// `APPLE_KEY_ID`: the 10-character id of the Sign in with Apple key.
    pub key_id: String,
    /// `APPLE_PRIVATE_KEY`: that key, PEM (PKCS#8); `\n` escapes are turned into newlines.
    pub private_key: Secret,
    /// `APPLE_AUTH_URL`: where browsers sign in (default [`APPLE_AUTH_URL`]).
    pub auth_url: String,
    /// `APPLE_TOKEN_URL`: where codes are exchanged (default [`APPLE_TOKEN_URL`]).
    pub token_url: String,
    /// `APPLE_KEYS_URL`: Apple's signing keys (default [`APPLE_KEYS_URL`]), fetched on
    /// first use.
    pub keys_url: String,
    /// `APPLE_ISSUER`: the `iss` of Apple's identity tokens and notifications (default
    /// [`APPLE_ISSUER`]; tests name their stand-in's).
    pub issuer: String,
}

/// Apple's issuer, and the audience of the client secrets we sign.
pub const APPLE_ISSUER: &str = "https://appleid.apple.com";
/// Apple's authorization endpoint.
pub const APPLE_AUTH_URL: &str = "https://appleid.apple.com/auth/authorize";
/// Apple's token endpoint.
pub const APPLE_TOKEN_URL: &str = "https://appleid.apple.com/auth/token";
/// Apple's public signing keys.
pub const APPLE_KEYS_URL: &str = "https://appleid.apple.com/auth/keys";

/// Facebook Login (`FACEBOOK_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FacebookConfig {
    /// `FACEBOOK_APP_ID`: the numeric app id.
    pub app_id: String,
    /// `FACEBOOK_APP_SECRET`: the app secret.
    pub app_secret: Secret,
    /// `FACEBOOK_GRAPH_URL`: the Graph API with its version (default
    /// [`FACEBOOK_GRAPH_URL`]; tests point it at a stand-in). https, or http to a
    /// loopback address.
    pub graph_url: String,
    /// `FACEBOOK_DIALOG_URL`: the login dialog (default [`FACEBOOK_DIALOG_URL`]).
    pub dialog_url: String,
    /// `FACEBOOK_LIMITED_LOGIN_ISSUER`: the `iss` of Limited Login id tokens (default
    /// [`FACEBOOK_LIMITED_LOGIN_ISSUER`]).
    pub limited_login_issuer: String,
    /// `FACEBOOK_LIMITED_LOGIN_JWKS_URL`: their signing keys (default
    /// [`FACEBOOK_LIMITED_LOGIN_JWKS_URL`]), fetched on first use.
    pub limited_login_jwks_url: String,
}

/// The issuer of Facebook Limited Login id tokens.
pub const FACEBOOK_LIMITED_LOGIN_ISSUER: &str = "https://www.facebook.com";
/// Where Facebook publishes the keys of Limited Login id tokens.
pub const FACEBOOK_LIMITED_LOGIN_JWKS_URL: &str =
    "https://limited.facebook.com/.well-known/oauth/openid/jwks/";

/// The Graph API version this crate speaks, where Facebook calls go by default.
pub const FACEBOOK_GRAPH_URL: &str = "https://graph.facebook.com/v19.0";
/// Facebook's login dialog of that version.
pub const FACEBOOK_DIALOG_URL: &str = "https://www.facebook.com/v19.0/dialog/oauth";

/// Whether `url` may carry tokens: https, or http to a loopback address (a stand-in).
fn token_safe_url(url: &Url) -> bool {
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    };
    url.host().is_some()
        && url.query().is_none()
        && url.fragment().is_none()
        && url.username().is_empty()
        && url.password().is_none()
        && (url.scheme() == "https" || (url.scheme() == "http" && loopback))
}

const GOOGLE_VARS: &[&str] = &[
    "GOOGLE_CLIENT_ID",
    "GOOGLE_CLIENT_SECRET",
    "GOOGLE_WEB_CLIENT_ID",
    "GOOGLE_MOBILE_CLIENT_ID",
    "GOOGLE_ISSUER_URL",
    "GOOGLE_HOSTED_DOMAIN",
];

/// Google's issuer, where discovery starts by default.
pub const GOOGLE_ISSUER: &str = "https://accounts.google.com";
const APPLE_VARS: &[&str] = &[
    "APPLE_WEB_CLIENT_ID",
    "APPLE_MOBILE_CLIENT_ID",
    "APPLE_TEAM_ID",
    "APPLE_KEY_ID",
    "APPLE_PRIVATE_KEY",
    "APPLE_AUTH_URL",
    "APPLE_TOKEN_URL",
    "APPLE_KEYS_URL",
    "APPLE_ISSUER",
];
const FACEBOOK_VARS: &[&str] = &[
    "FACEBOOK_APP_ID",
    "FACEBOOK_APP_SECRET",
    "FACEBOOK_GRAPH_URL",
    "FACEBOOK_DIALOG_URL",
    "FACEBOOK_LIMITED_LOGIN_ISSUER",
    "FACEBOOK_LIMITED_LOGIN_JWKS_URL",
];

/// `None` when no variable of the provider is set; `Some(None)` when set but broken.
fn read_google(r: &mut Env<'_>) -> Option<Option<GoogleConfig>> {
    if GOOGLE_VARS.iter().all(|v| r.get(v).is_none()) {
        return None;
    }
    const BECAUSE: &str = "required once any GOOGLE_* variable is set";
    let client_id = r.identifier(
        "GOOGLE_CLIENT_ID",
        "the Google OAuth client id",
        Some(BECAUSE),
    );
    let client_secret = r.secret(
        "GOOGLE_CLIENT_SECRET",
        "the Google OAuth client secret",
        BECAUSE,
    );
    let web_client_id = r.identifier("GOOGLE_WEB_CLIENT_ID", "a Google OAuth client id", None);
    let mobile_client_id =
        r.identifier("GOOGLE_MOBILE_CLIENT_ID", "a Google OAuth client id", None);
    let issuer_url = match r.get("GOOGLE_ISSUER_URL") {
        None => Some(GOOGLE_ISSUER.to_owned()),
        Some(v) => match Url::parse(v.trim()) {
            Ok(url)
                if matches!(url.scheme(), "https" | "http")
                    && url.host_str().is_some()
                    && url.query().is_none()
                    && url.username().is_empty() =>
            {
                Some(v.trim().trim_end_matches('/').to_owned())
            }
            _ => {
                r.invalid(
                    "GOOGLE_ISSUER_URL",
                    "an issuer URL such as https://accounts.google.com",
                    shown_url(&v),
                );
                None
            }
        },
    };
    let hosted_domain = r.identifier("GOOGLE_HOSTED_DOMAIN", "a domain such as example.com", None);
    Some(Some(GoogleConfig {
        client_id: client_id?,
        client_secret: client_secret?,
        web_client_id,
        mobile_client_id,
        issuer_url: issuer_url?,
        hosted_domain,
    }))
}

fn read_apple(r: &mut Env<'_>) -> Option<Option<AppleConfig>> {
    if APPLE_VARS.iter().all(|v| r.get(v).is_none()) {
        return None;
    }
    const BECAUSE: &str = "required once any APPLE_* variable is set";
    const TEN: &str = "the 10-character identifier from Apple's developer account";
    let web_client_id = r.identifier(
        "APPLE_WEB_CLIENT_ID",
        "the Services ID used on the web",
        None,
    );
    let mobile_client_id = r.identifier("APPLE_MOBILE_CLIENT_ID", "the app's bundle id", None);
    let none_set =
        r.get("APPLE_WEB_CLIENT_ID").is_none() && r.get("APPLE_MOBILE_CLIENT_ID").is_none();
    if none_set {
        r.missing(
            "APPLE_WEB_CLIENT_ID",
            "the Services ID used on the web, or APPLE_MOBILE_CLIENT_ID",
            "Sign in with Apple needs at least one client id",
        );
    }
    let mut ten_chars = |variable: &'static str| {
        let value = r.required(variable, TEN, BECAUSE)?;
        let value = value.trim().to_owned();
        if value.len() != 10 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
            r.invalid(variable, TEN, Some(value));
            return None;
        }
        Some(value)
    };
    let team_id = ten_chars("APPLE_TEAM_ID");
    let key_id = ten_chars("APPLE_KEY_ID");
    let private_key = r
        .secret("APPLE_PRIVATE_KEY", "the Sign in with Apple key as PEM (PKCS#8)", BECAUSE)
        .and_then(|key| {
            let pem = key.expose().replace("\\n", "\n");
            let pem = pem.trim();
            if pem.starts_with("-----BEGIN PRIVATE KEY-----")
                && pem.ends_with("-----END PRIVATE KEY-----")
            {
                Some(Secret::new(pem))
            } else {
                r.invalid_because(
                    "APPLE_PRIVATE_KEY",
                    "the Sign in with Apple key as PEM (PKCS#8)",
                    None,
                    Some("it must start with -----BEGIN PRIVATE KEY----- and end with -----END PRIVATE KEY-----"),
                );
                None
            }
        });
    let auth_url = provider_url(
        r,
        "APPLE_AUTH_URL",
        APPLE_AUTH_URL,
        "Apple's authorization endpoint, https (or http to a loopback address)",
    );
    let token_url = provider_url(
        r,
        "APPLE_TOKEN_URL",
        APPLE_TOKEN_URL,
        "Apple's token endpoint, https (or http to a loopback address)",
    );
    let keys_url = provider_url(
        r,
        "APPLE_KEYS_URL",
        APPLE_KEYS_URL,
        "Apple's key set URL, https (or http to a loopback address)",
    );
    let issuer = issuer_name(
        r,
        "APPLE_ISSUER",
        APPLE_ISSUER,
        "the iss of Apple's tokens, such as https://appleid.apple.com",
    );
    if web_client_id.is_none() && mobile_client_id.is_none() {
        return Some(None);
    }
    Some(Some(AppleConfig {
        web_client_id,
        mobile_client_id,
        team_id: team_id?,
        key_id: key_id?,
        private_key: private_key?,
        auth_url: auth_url?,
        token_url: token_url?,
        keys_url: keys_url?,
        issuer: issuer?,
    }))
}

fn read_facebook(r: &mut Env<'_>) -> Option<Option<FacebookConfig>> {
    if FACEBOOK_VARS.iter().all(|v| r.get(v).is_none()) {
        return None;
    }
    const BECAUSE: &str = "required once any FACEBOOK_* variable is set";
    const APP_ID: &str = "the numeric Facebook app id";
    let app_id = r
        .required("FACEBOOK_APP_ID", APP_ID, BECAUSE)
        .and_then(|v| {
            let v = v.trim().to_owned();
            if v.is_empty() || v.len() > 32 || !v.bytes().all(|b| b.is_ascii_digit()) {
                r.invalid("FACEBOOK_APP_ID", APP_ID, Some(v));
                None
            } else {
                Some(v)
            }
        });
    let app_secret = r.secret("FACEBOOK_APP_SECRET", "the Facebook app secret", BECAUSE);
    let graph_url = provider_url(
        r,
        "FACEBOOK_GRAPH_URL",
        FACEBOOK_GRAPH_URL,
        "the Graph API with its version, https (or http to a loopback address)",
    );
    let dialog_url = provider_url(
        r,
        "FACEBOOK_DIALOG_URL",
        FACEBOOK_DIALOG_URL,
        "the login dialog URL, https (or http to a loopback address)",
    );
    let limited_login_jwks_url = provider_url(
        r,
        "FACEBOOK_LIMITED_LOGIN_JWKS_URL",
        FACEBOOK_LIMITED_LOGIN_JWKS_URL,
        "the JWKS URL of Limited Login tokens, https (or http to a loopback address)",
    );
    let limited_login_issuer = issuer_name(
        r,
        "FACEBOOK_LIMITED_LOGIN_ISSUER",
        FACEBOOK_LIMITED_LOGIN_ISSUER,
        "the iss of Limited Login tokens, such as https://www.facebook.com",
    );
    Some(Some(FacebookConfig {
        app_id: app_id?,
        app_secret: app_secret?,
        graph_url: graph_url?,
        dialog_url: dialog_url?,
        limited_login_issuer: limited_login_issuer?,
        limited_login_jwks_url: limited_login_jwks_url?,
    }))
}

/// The most providers `OIDC_PROVIDERS` may name.
pub const MAX_OPENID_PROVIDERS: usize = 16;

/// `OIDC_PROVIDERS=gitlab,keycloak`, then for each name `OIDC_<NAME>_ISSUER`,
/// `_CLIENT_ID`, `_CLIENT_SECRET` (required), `_SCOPES` (space- or comma-separated,
/// default `openid email profile`), `_AUDIENCES` (other client ids, comma-separated) and
/// `_TRUSTED_FOR_LINKING` (default false); `<NAME>` is the name in capitals with `-` as
/// `_`.
fn read_openid(r: &mut Env<'_>) -> Vec<OpenIdConfig> {
    const NAMES: &str = "comma-separated provider names (lowercase letters, digits and -, \
                         starting with a letter) other than google, apple, facebook and link";
    let Some(names) = r.get("OIDC_PROVIDERS") else {
        return Vec::new();
    };
    let mut out: Vec<OpenIdConfig> = Vec::new();
    let mut seen: Vec<ProviderId> = Vec::new();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let id = match name.parse::<ProviderId>() {
            // `link` would be taken for the linking routes (`/auth/link/{provider}`).
            Ok(id)
                if ![ProviderId::GOOGLE, ProviderId::APPLE, ProviderId::FACEBOOK].contains(&id)
                    && id.as_str() != "link"
                    && !seen.contains(&id)
                    && seen.len() < MAX_OPENID_PROVIDERS =>
            {
                id
            }
            _ => {
                r.invalid_because(
                    "OIDC_PROVIDERS",
                    NAMES,
                    Some(names.clone()),
                    Some("each name once, at most 16, none of google, apple, facebook and link"),
                );
                return Vec::new();
            }
        };
        seen.push(id);
        let var = |suffix: &str| {
            format!(
                "OIDC_{}_{suffix}",
                id.as_str().to_ascii_uppercase().replace('-', "_")
            )
        };
        const BECAUSE: &str = "required for each provider OIDC_PROVIDERS names";
        let issuer = match r.required(var("ISSUER"), "the provider's issuer URL", BECAUSE) {
            None => None,
            Some(v) => match Url::parse(v.trim()) {
                Ok(url) if token_safe_url(&url) => Some(v.trim().trim_end_matches('/').to_owned()),
                _ => {
                    r.invalid(
                        var("ISSUER"),
                        "the issuer URL, https (or http to a loopback address), \
                         such as https://gitlab.com",
                        shown_url(&v),
                    );
                    None
                }
            },
        };
        let client_id = r.identifier(var("CLIENT_ID"), "the OAuth client id", Some(BECAUSE));
        let client_secret = r.secret(var("CLIENT_SECRET"), "the OAuth client secret", BECAUSE);
        let scopes = match r.get(&var("SCOPES")) {
            None => None,
            Some(v) => {
                let scopes: Vec<String> = v
                    .split([' ', ','])
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                // RFC 6749 §3.3: a scope is printable ASCII without space, `"` or `\`.
                let valid = !scopes.is_empty()
                    && scopes.len() <= 32
                    && scopes.iter().all(|s| {
                        s.len() <= 128
                            && s.bytes()
                                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
                    });
                if valid {
                    Some(scopes)
                } else {
                    r.invalid(
                        var("SCOPES"),
                        "space-separated scopes such as \"openid email profile\"",
                        Some(v.clone()),
                    );
                    None
                }
            }
        };
        let mut audiences = Vec::new();
        if let Some(v) = r.get(&var("AUDIENCES")) {
            for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                if part.len() <= 256 && part.bytes().all(|b| b.is_ascii_graphic()) {
                    audiences.push(part.to_owned());
                } else {
                    r.invalid(
                        var("AUDIENCES"),
                        "comma-separated client ids",
                        Some(v.clone()),
                    );
                    break;
                }
            }
        }
        let trusted = r.flag(var("TRUSTED_FOR_LINKING"), false);
        let (Some(issuer), Some(client_id), Some(client_secret)) =
            (issuer, client_id, client_secret)
        else {
            continue;
        };
        let mut config = OpenIdConfig::new(id, issuer, client_id, client_secret)
            .other_audiences(audiences)
            .trusted_for_linking(trusted);
        if let Some(scopes) = scopes {
            config = config.scopes(scopes);
        }
        out.push(config);
    }
    out
}

/// A provider endpoint from `name` (see [`token_safe_url`]), `default` when unset.
fn provider_url(
    r: &mut Env<'_>,
    name: &'static str,
    default: &str,
    what: &'static str,
) -> Option<String> {
    match r.get(name) {
        None => Some(default.to_owned()),
        Some(v) => match Url::parse(v.trim()) {
            Ok(url) if token_safe_url(&url) => Some(v.trim().trim_end_matches('/').to_owned()),
            _ => {
                r.invalid(name, what, shown_url(&v));
                None
            }
        },
    }
}

/// A refused URL as an error may show it: not at all when it may hold a password.
fn shown_url(value: &str) -> Option<String> {
    (!value.contains('@')).then(|| value.to_owned())
}

/// An issuer name (`iss`, compared exactly) from `name`, `default` when unset.
fn issuer_name(
    r: &mut Env<'_>,
    name: &'static str,
    default: &str,
    what: &'static str,
) -> Option<String> {
    match r.get(name) {
        None => Some(default.to_owned()),
        Some(v) if !v.trim().is_empty() && v.trim().len() <= 256 => Some(v.trim().to_owned()),
        Some(v) => {
            r.invalid(name, what, Some(v.clone()));
            None
        }
    }
}

/// The signing key of a base64url seed of 32 bytes.
fn signing_key(seed: &Secret, variable: &'static str) -> Result<SigningKey, InvalidSigningKey> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(seed.expose().trim_end_matches('='))
        .map_err(|_| InvalidSigningKey(variable))?;
    let seed: [u8; 32] = bytes.try_into().map_err(|_| InvalidSigningKey(variable))?;
    Ok(SigningKey::from_seed(&seed))
}

/// The stores sign-in keeps its state in, as [`AuthConfig::stores`] chose them.
#[derive(Debug, Clone)]
pub struct AuthStores {
    /// Refresh-token families.
    pub refresh: Arc<dyn crate::refresh::RefreshStore>,
    /// Users and their identities.
    pub users: Arc<dyn crate::users::UserStore>,
    /// Data-deletion requests.
    pub deletions: Arc<dyn crate::deletion::DeletionStore>,
    /// The in-memory stores, for their gauges, when there is no Postgres.
    pub memory: Option<MemoryAuthStores>,
}

/// The in-memory user and refresh-token stores, when there is no Postgres: each has a
/// bound (`AUTH_MEMORY_MAX_USERS`, `AUTH_MEMORY_MAX_SESSIONS`,
/// `AUTH_MEMORY_MAX_REFRESH_TOKENS`) and says what it holds.
#[derive(Debug, Clone)]
pub struct MemoryAuthStores {
    /// Users and their identities.
    pub users: std::sync::Arc<crate::users::MemoryUserStore>,
    /// Refresh-token families.
    pub refresh: std::sync::Arc<crate::refresh::MemoryRefreshStore>,
}

impl MemoryAuthStores {
    /// What they hold and refused, as gauges: `auth_memory_users`,
    /// `auth_memory_users_refused_full`, `auth_memory_refresh_families`,
    /// `auth_memory_refresh_tokens`, `auth_memory_refresh_refused_full` and
    /// `auth_memory_refresh_evicted_revoked`.
    pub fn gauges(&self) -> [upcoach_core::health::Gauge; 6] {
        use upcoach_core::health::Gauge;
        let refresh = self.refresh.stats();
        [
            Gauge::new("auth_memory_users", &[], self.users.len() as f64),
            Gauge::new(
                "auth_memory_users_refused_full",
                &[],
                self.users.refused_full() as f64,
            ),
            Gauge::new("auth_memory_refresh_families", &[], refresh.families as f64),
            Gauge::new("auth_memory_refresh_tokens", &[], refresh.tokens as f64),
            Gauge::new(
                "auth_memory_refresh_refused_full",
                &[],
                refresh.refused_full as f64,
            ),
            Gauge::new(
                "auth_memory_refresh_evicted_revoked",
                &[],
                refresh.evicted_revoked as f64,
            ),
        ]
    }
}
