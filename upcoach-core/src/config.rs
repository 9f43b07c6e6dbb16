//! Configuration from the environment: [`Config::from_env`].
//!
//! The variable names are those of the system this project replaces (`GOOGLE_*`,
//! `APPLE_*`, `FACEBOOK_*`, `REDIS_URL`, `DATABASE_URL`, `WEBSOCKET_CORS_ORIGINS`,
//! `CACHE_PREFIX`, `PERFORMANCE_MONITORING_ENABLED`, `SLOW_QUERY_THRESHOLD`) plus this
//! project's own (`UPCOACH_*`, `AUTH_*`, `REALTIME_*`, `DATABASE_MAX_CONNECTIONS`). A
//! variable set to the empty string counts as unset.
//!
//! Every problem is reported at once, each naming its variable and what was expected;
//! values of secret variables are never repeated in errors, `Debug` or logs.
//!
//! ```
//! use upcoach_core::Config;
//!
//! let env = [("UPCOACH_ADDR", "0.0.0.0:9000"), ("SLOW_QUERY_THRESHOLD", "250")];
//! let config = Config::from_lookup(|name| {
//!     env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
//! })?;
//! assert_eq!(config.addr.port(), 9000);
//! assert_eq!(config.slow_query_threshold.as_millis(), 250);
//! assert!(config.redis_url.is_none(), "no REDIS_URL: in-memory backends");
//!
//! let err = Config::from_lookup(|name| (name == "SLOW_QUERY_THRESHOLD").then(|| "soon".into()))
//!     .unwrap_err();
//! assert!(err.to_string().contains("SLOW_QUERY_THRESHOLD"));
//! # Ok::<(), upcoach_core::config::ConfigErrors>(())
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use url::Url;

use crate::Secret;

/// The default listening address of the reference server.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";
/// The default key prefix of the cache (`CACHE_PREFIX`).
pub const DEFAULT_CACHE_PREFIX: &str = "upcoach";
/// The default of `AUTH_SESSION_LIFETIME_DAYS`.
pub const DEFAULT_SESSION_LIFETIME_DAYS: u32 = 90;
/// The default of `DATABASE_MAX_CONNECTIONS`.
pub const DEFAULT_DATABASE_MAX_CONNECTIONS: u32 = 16;
/// The default of `REALTIME_MAX_CONNECTIONS`.
pub const DEFAULT_REALTIME_MAX_CONNECTIONS: usize = 10_000;
/// The default of `REALTIME_MAX_CONNECTIONS_PER_USER`.
pub const DEFAULT_REALTIME_MAX_CONNECTIONS_PER_USER: usize = 32;

/// The default slow-query threshold (`SLOW_QUERY_THRESHOLD`), in milliseconds.
pub const DEFAULT_SLOW_QUERY_THRESHOLD_MS: u64 = 1000;

/// Everything the upcoach crates and the reference server read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// `UPCOACH_ADDR`: where the reference server listens (default `127.0.0.1:8080`).
    pub addr: SocketAddr,
    /// `REDIS_URL`: Redis for shared state (`redis://` or a `unix://` socket; no TLS in
    /// this build); `None` runs the in-memory backends.
    pub redis_url: Option<ServiceUrl>,
    /// `DATABASE_URL`: Postgres for users, refresh tokens and the audit log (no TLS in
    /// this build); `None` runs the in-memory backends.
    pub database_url: Option<ServiceUrl>,
    /// `WEBSOCKET_CORS_ORIGINS`: comma-separated origins (`https://app.example.com`)
    /// allowed to open realtime connections from a browser; empty allows none.
    pub websocket_cors_origins: Vec<String>,
    /// `CACHE_PREFIX`: prefix of every cache key in Redis (default `upcoach`).
    pub cache_prefix: String,
    /// `PERFORMANCE_MONITORING_ENABLED`: whether the timing layer records (default true).
    pub performance_monitoring_enabled: bool,
    /// `SLOW_QUERY_THRESHOLD`: statements slower than this are reported (milliseconds,
    /// default 1000).
    pub slow_query_threshold: Duration,
    /// `UPCOACH_METRICS_PUBLIC`: whether `GET /metrics` answers anyone (default true) or
    /// only an admin bearer token.
    pub metrics_public: bool,
    /// `AUTH_REFRESH_GRACE_SECONDS`: how long after a refresh token's rotation the same
    /// token may be presented again for a sibling (default 0, at most 60), for clients
    /// whose answer got lost; within it a stolen token is not detected.
    pub refresh_grace: Duration,
    /// `AUTH_SESSION_LIFETIME_DAYS`: how long a sign-in's refresh tokens keep working,
    /// whatever the rotations (default 90, 1 to 365).
    pub session_lifetime: Duration,
    /// `DATABASE_MAX_CONNECTIONS`: the most Postgres connections the pool opens (default
    /// 16, at most 1,000).
    pub database_max_connections: u32,
    /// `REALTIME_MAX_CONNECTIONS`: WebSocket and SSE connections one process holds
    /// before it answers 503 (default 10,000; the process's open-file limit must allow
    /// it).
    pub realtime_max_connections: usize,
    /// `REALTIME_MAX_CONNECTIONS_PER_USER`: realtime connections one user may hold
    /// (default 32).
    pub realtime_max_connections_per_user: usize,
    /// `UPCOACH_PUBLIC_URL`: the server's address as browsers and providers reach it
    /// (`https://api.example.com`), from which callback URLs are made; default
    /// `http://` + `UPCOACH_ADDR`.
    pub public_url: Option<String>,
    /// `AUTH_RETURN_TO_ALLOWLIST`: comma-separated URLs a web sign-in may return to
    /// (`https://app.example.com/signed-in`), matched exactly: no other path, query or
    /// host. Empty allows none (sign-in then answers with tokens, no redirect).
    pub return_to_allowlist: Vec<String>,
    /// `AUTH_SIGNING_KEY`: the Ed25519 seed (32 bytes, base64url) that signs access
    /// tokens; `AUTH_PREVIOUS_SIGNING_KEY`: the one before it, still accepted and
    /// published until its tokens expire. Without a key only `--dev` (which makes one)
    /// issues tokens.
    pub signing_key: Option<Secret>,
    /// `AUTH_PREVIOUS_SIGNING_KEY`: see [`signing_key`](Self::signing_key).
    pub previous_signing_key: Option<Secret>,
    /// `GOOGLE_*`: Google sign-in, when any of its variables is set.
    pub google: Option<GoogleConfig>,
    /// `APPLE_*`: Sign in with Apple, when any of its variables is set.
    pub apple: Option<AppleConfig>,
    /// `FACEBOOK_*`: Facebook Login, when any of its variables is set.
    pub facebook: Option<FacebookConfig>,
}

impl Default for Config {
    /// The configuration of an empty environment: in-memory backends, no providers.
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR
                .parse()
                .expect("DEFAULT_ADDR is a valid socket address"),
            redis_url: None,
            database_url: None,
            websocket_cors_origins: Vec::new(),
            cache_prefix: DEFAULT_CACHE_PREFIX.to_owned(),
            performance_monitoring_enabled: true,
            slow_query_threshold: Duration::from_millis(DEFAULT_SLOW_QUERY_THRESHOLD_MS),
            metrics_public: true,
            refresh_grace: Duration::ZERO,
            session_lifetime: Duration::from_secs(
                u64::from(DEFAULT_SESSION_LIFETIME_DAYS) * 24 * 3600,
            ),
            database_max_connections: DEFAULT_DATABASE_MAX_CONNECTIONS,
            realtime_max_connections: DEFAULT_REALTIME_MAX_CONNECTIONS,
            realtime_max_connections_per_user: DEFAULT_REALTIME_MAX_CONNECTIONS_PER_USER,
            public_url: None,
            return_to_allowlist: Vec::new(),
            signing_key: None,
            previous_signing_key: None,
            google: None,
            apple: None,
            facebook: None,
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
}

/// Facebook Login (`FACEBOOK_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FacebookConfig {
    /// `FACEBOOK_APP_ID`: the numeric app id.
    pub app_id: String,
    /// `FACEBOOK_APP_SECRET`: the app secret.
    pub app_secret: Secret,
}

/// A service URL (`REDIS_URL`, `DATABASE_URL`) whose password never shows in `Debug` or
/// `Display`.
///
/// ```
/// use upcoach_core::config::ServiceUrl;
///
/// let url = ServiceUrl::parse("postgres://app:hunter2@db:5432/app", &["postgres"]).unwrap();
/// assert_eq!(url.to_string(), "postgres://app:***@db:5432/app");
/// assert_eq!(url.expose(), "postgres://app:hunter2@db:5432/app");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceUrl(Url);

impl ServiceUrl {
    /// Parses `value` and checks that its scheme is one of `schemes`.
    pub fn parse(value: &str, schemes: &[&str]) -> Result<Self, &'static str> {
        let url = Url::parse(value).map_err(|_| "not a URL")?;
        if !schemes.contains(&url.scheme()) {
            return Err("the scheme is not one of those expected");
        }
        let socket = matches!(url.scheme(), "unix" | "redis+unix");
        if url.host_str().is_none_or(str::is_empty) && !socket {
            return Err("the URL has no host");
        }
        Ok(Self(url))
    }

    /// The full URL, password included; pass it to the client library, never to a log.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// The parsed URL, password included.
    pub fn url(&self) -> &Url {
        &self.0
    }

    /// The URL with the password replaced by `***`, for logs and banners.
    /// Query parameters are redacted too where they carry a password (`password`,
    /// `pass`, `sslpassword`, as the Postgres and Redis clients read them).
    pub fn redacted(&self) -> String {
        let mut url = self.0.clone();
        if url.password().is_some() {
            // Only fails for URLs that cannot have a password, which this one has.
            let _ = url.set_password(Some("***"));
        }
        if url.query().is_some() {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let secret = matches!(
                        k.to_ascii_lowercase().as_str(),
                        "password" | "pass" | "sslpassword"
                    );
                    (
                        k.into_owned(),
                        if secret {
                            "***".to_owned()
                        } else {
                            v.into_owned()
                        },
                    )
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.into()
    }
}

impl fmt::Debug for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceUrl({})", self.redacted())
    }
}

impl fmt::Display for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// One variable that is missing or has an unusable value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable} {problem}")]
pub struct ConfigError {
    /// The environment variable.
    pub variable: &'static str,
    /// What is wrong with it.
    pub problem: ConfigProblem,
}

/// What is wrong with a variable.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigProblem {
    /// It is required here and not set.
    Missing {
        /// What it should hold.
        expected: &'static str,
        /// Why it is required.
        because: &'static str,
    },
    /// It is set to something unusable.
    Invalid {
        /// What it should hold.
        expected: &'static str,
        /// The value, for non-secret variables only.
        got: Option<String>,
        /// Why the value was refused, when more can be said than `expected`.
        reason: Option<&'static str>,
    },
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigProblem::Missing { expected, because } => {
                write!(f, "is not set: expected {expected} ({because})")
            }
            ConfigProblem::Invalid {
                expected,
                got,
                reason,
            } => {
                write!(f, "is invalid: expected {expected}")?;
                if let Some(reason) = reason {
                    write!(f, "; {reason}")?;
                }
                match got {
                    Some(got) => write!(f, ", got {got:?}"),
                    None => f.write_str(" (value not shown: it may be secret)"),
                }
            }
        }
    }
}

/// Every problem found in the environment, in a stable order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The variables that have a problem.
    pub fn variables(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.iter().map(|e| e.variable)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} configuration problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads variables through a lookup function and collects problems.
struct Reader<F> {
    lookup: F,
    errors: Vec<ConfigError>,
}

impl<F: Fn(&str) -> Option<String>> Reader<F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    fn invalid(&mut self, variable: &'static str, expected: &'static str, got: Option<String>) {
        self.invalid_because(variable, expected, got, None);
    }

    fn invalid_because(
        &mut self,
        variable: &'static str,
        expected: &'static str,
        got: Option<String>,
        reason: Option<&'static str>,
    ) {
        self.errors.push(ConfigError {
            variable,
            problem: ConfigProblem::Invalid {
                expected,
                got,
                reason,
            },
        });
    }

    fn missing(&mut self, variable: &'static str, expected: &'static str, because: &'static str) {
        self.errors.push(ConfigError {
            variable,
            problem: ConfigProblem::Missing { expected, because },
        });
    }

    fn required(
        &mut self,
        variable: &'static str,
        expected: &'static str,
        because: &'static str,
    ) -> Option<String> {
        let value = self.get(variable);
        if value.is_none() {
            self.missing(variable, expected, because);
        }
        value
    }

    fn service_url(
        &mut self,
        variable: &'static str,
        schemes: &[&str],
        expected: &'static str,
    ) -> Option<ServiceUrl> {
        let value = self.get(variable)?;
        match ServiceUrl::parse(value.trim(), schemes) {
            Ok(url) => Some(url),
            Err(reason) => {
                // A URL may carry a password: never repeat it.
                self.invalid_because(variable, expected, None, Some(reason));
                None
            }
        }
    }

    /// A client id: printable ASCII without spaces, at most 256 bytes.
    fn identifier(
        &mut self,
        variable: &'static str,
        expected: &'static str,
        because: Option<&'static str>,
    ) -> Option<String> {
        let value = match because {
            Some(because) => self.required(variable, expected, because)?,
            None => self.get(variable)?,
        };
        let value = value.trim().to_owned();
        if value.len() > 256 || !value.bytes().all(|b| b.is_ascii_graphic()) {
            self.invalid(variable, expected, Some(value));
            return None;
        }
        Some(value)
    }

    /// A boolean: true/false, 1/0, yes/no, on/off.
    fn flag(&mut self, variable: &'static str, default: bool) -> bool {
        match self.get(variable) {
            None => default,
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    self.invalid(variable, "true or false", Some(v.clone()));
                    default
                }
            },
        }
    }

    fn secret(
        &mut self,
        variable: &'static str,
        expected: &'static str,
        because: &'static str,
    ) -> Option<Secret> {
        self.required(variable, expected, because).map(Secret::new)
    }

    fn secret_optional(&mut self, variable: &'static str) -> Option<Secret> {
        self.get(variable).map(|v| Secret::new(v.trim().to_owned()))
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigErrors> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup` (a map in tests, a secrets manager in a host).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigErrors> {
        let mut r = Reader {
            lookup,
            errors: Vec::new(),
        };
        let defaults = Config::default();

        let addr = match r.get("UPCOACH_ADDR") {
            None => defaults.addr,
            Some(v) => v.trim().parse().unwrap_or_else(|_| {
                r.invalid(
                    "UPCOACH_ADDR",
                    "a socket address such as 127.0.0.1:8080 or [::]:8080",
                    Some(v.clone()),
                );
                defaults.addr
            }),
        };

        let redis_url = r.service_url(
            "REDIS_URL",
            &["redis", "unix", "redis+unix"],
            "a Redis URL such as redis://127.0.0.1:6379 (rediss:// is not supported: this build has no TLS)",
        );
        let database_url = r.service_url(
            "DATABASE_URL",
            &["postgres", "postgresql"],
            "a Postgres URL such as postgres://user@127.0.0.1:5432/db",
        );

        let websocket_cors_origins = match r.get("WEBSOCKET_CORS_ORIGINS") {
            None => Vec::new(),
            Some(v) => {
                let mut origins = Vec::new();
                for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    match parse_origin(part) {
                        Some(origin) => origins.push(origin),
                        None => {
                            // An origin with credentials in it is refused, and not repeated.
                            let shown = (!part.contains('@')).then(|| part.to_owned());
                            r.invalid_because(
                                "WEBSOCKET_CORS_ORIGINS",
                                "comma-separated origins such as https://app.example.com",
                                shown,
                                Some("each origin is scheme://host[:port] with no path; '*' is not accepted"),
                            );
                        }
                    }
                }
                origins
            }
        };

        let cache_prefix = match r.get("CACHE_PREFIX") {
            None => defaults.cache_prefix,
            Some(v) => {
                let ok = (1..=64).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
                if !ok {
                    r.invalid(
                        "CACHE_PREFIX",
                        "1 to 64 characters of A-Z, a-z, 0-9, '_', '-', '.' or ':'",
                        Some(v.clone()),
                    );
                }
                v
            }
        };

        let performance_monitoring_enabled = r.flag(
            "PERFORMANCE_MONITORING_ENABLED",
            defaults.performance_monitoring_enabled,
        );
        let metrics_public = r.flag("UPCOACH_METRICS_PUBLIC", defaults.metrics_public);

        let slow_query_threshold = match r.get("SLOW_QUERY_THRESHOLD") {
            None => defaults.slow_query_threshold,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(ms) if ms > 0 && ms <= 3_600_000 => Duration::from_millis(ms),
                _ => {
                    r.invalid(
                        "SLOW_QUERY_THRESHOLD",
                        "a whole number of milliseconds from 1 to 3600000",
                        Some(v.clone()),
                    );
                    defaults.slow_query_threshold
                }
            },
        };

        let refresh_grace = match r.get("AUTH_REFRESH_GRACE_SECONDS") {
            None => defaults.refresh_grace,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(s) if s <= 60 => Duration::from_secs(s),
                _ => {
                    r.invalid(
                        "AUTH_REFRESH_GRACE_SECONDS",
                        "a whole number of seconds from 0 to 60",
                        Some(v.clone()),
                    );
                    defaults.refresh_grace
                }
            },
        };
        let session_lifetime = match r.get("AUTH_SESSION_LIFETIME_DAYS") {
            None => defaults.session_lifetime,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(d) if (1..=365).contains(&d) => Duration::from_secs(d * 24 * 3600),
                _ => {
                    r.invalid(
                        "AUTH_SESSION_LIFETIME_DAYS",
                        "a whole number of days from 1 to 365",
                        Some(v.clone()),
                    );
                    defaults.session_lifetime
                }
            },
        };
        let database_max_connections = match r.get("DATABASE_MAX_CONNECTIONS") {
            None => defaults.database_max_connections,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(n) if (1..=1000).contains(&n) => n,
                _ => {
                    r.invalid(
                        "DATABASE_MAX_CONNECTIONS",
                        "a whole number from 1 to 1000",
                        Some(v.clone()),
                    );
                    defaults.database_max_connections
                }
            },
        };

        let mut count = |name: &'static str, default: usize| match r.get(name) {
            None => default,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=10_000_000).contains(&n) => n,
                _ => {
                    r.invalid(name, "a whole number from 1 to 10000000", Some(v.clone()));
                    default
                }
            },
        };
        let realtime_max_connections = count(
            "REALTIME_MAX_CONNECTIONS",
            defaults.realtime_max_connections,
        );
        let realtime_max_connections_per_user = count(
            "REALTIME_MAX_CONNECTIONS_PER_USER",
            defaults.realtime_max_connections_per_user,
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

        let google = read_google(&mut r);
        let apple = read_apple(&mut r);
        let facebook = read_facebook(&mut r);

        if !r.errors.is_empty() {
            return Err(ConfigErrors(r.errors));
        }
        Ok(Config {
            addr,
            redis_url,
            database_url,
            websocket_cors_origins,
            cache_prefix,
            performance_monitoring_enabled,
            slow_query_threshold,
            metrics_public,
            refresh_grace,
            session_lifetime,
            database_max_connections,
            realtime_max_connections,
            realtime_max_connections_per_user,
            public_url,
            return_to_allowlist,
            signing_key,
            previous_signing_key,
            google: google.flatten(),
            apple: apple.flatten(),
            facebook: facebook.flatten(),
        })
    }
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
];
const FACEBOOK_VARS: &[&str] = &["FACEBOOK_APP_ID", "FACEBOOK_APP_SECRET"];

/// `None` when no variable of the provider is set; `Some(None)` when set but broken.
fn read_google<F: Fn(&str) -> Option<String>>(r: &mut Reader<F>) -> Option<Option<GoogleConfig>> {
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
                    Some(v.clone()),
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

fn read_apple<F: Fn(&str) -> Option<String>>(r: &mut Reader<F>) -> Option<Option<AppleConfig>> {
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
    if web_client_id.is_none() && mobile_client_id.is_none() {
        return Some(None);
    }
    Some(Some(AppleConfig {
        web_client_id,
        mobile_client_id,
        team_id: team_id?,
        key_id: key_id?,
        private_key: private_key?,
    }))
}

fn read_facebook<F: Fn(&str) -> Option<String>>(
    r: &mut Reader<F>,
) -> Option<Option<FacebookConfig>> {
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
    Some(Some(FacebookConfig {
        app_id: app_id?,
        app_secret: app_secret?,
    }))
}

/// Normalises `scheme://host[:port]`; `None` for anything else (paths, `*`, userinfo).
fn parse_origin(value: &str) -> Option<String> {
    let url = Url::parse(value).ok()?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
        || !(url.path() == "/" || url.path().is_empty())
    {
        return None;
    }
    Some(url.origin().ascii_serialization())
}

#[cfg(test)]
mod tests;
