//! Reading settings from the environment: [`Env`], which every crate's settings read
//! through (`AuthConfig`, `HubConfig`, `CacheConfig`, `PerfConfig`, and core's own
//! [`ServicesConfig`]), so a server composing them reports every problem at once.
//!
//! The variable names are those of the system this project replaces (`GOOGLE_*`,
//! `APPLE_*`, `FACEBOOK_*`, `REDIS_URL`, `DATABASE_URL`, `WEBSOCKET_CORS_ORIGINS`,
//! `CACHE_PREFIX`, `PERFORMANCE_MONITORING_ENABLED`, `SLOW_QUERY_THRESHOLD`) plus this
//! project's own (`UPCOACH_*`, `AUTH_*`, `REALTIME_*`, `DATABASE_MAX_CONNECTIONS`,
//! `DATABASE_STATEMENT_TIMEOUT_SECONDS`). A variable set to the empty string counts as
//! unset. Values of secret variables are never repeated in errors, `Debug` or logs.
//!
//! ```
//! use upcoach_core::config::{ServicesConfig, Settings};
//!
//! let env = [("DATABASE_URL", "postgres://app:hunter2@db/app"), ("DATABASE_MAX_CONNECTIONS", "40")];
//! let services = ServicesConfig::from_lookup(|name| {
//!     env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
//! })?;
//! assert_eq!(services.database_max_connections, 40);
//! assert_eq!(services.database_url.unwrap().to_string(), "postgres://app:***@db/app");
//! assert!(services.redis_url.is_none(), "no REDIS_URL: in-memory backends");
//! # Ok::<(), upcoach_core::config::ConfigErrors>(())
//! ```

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use url::Url;

use crate::Secret;

/// The URL schemes `REDIS_URL` takes: one node over TCP or a socket, or a Redis Cluster
/// (`redis+cluster://`, see [`ServiceUrl::cluster_seeds`]).
pub const REDIS_SCHEMES: &[&str] = &["redis", "unix", "redis+unix", "redis+cluster"];

/// The default of `DATABASE_MAX_CONNECTIONS`.
pub const DEFAULT_DATABASE_MAX_CONNECTIONS: u32 = 16;

/// The default of `DATABASE_STATEMENT_TIMEOUT_SECONDS`.
pub const DEFAULT_DATABASE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The shared services: `REDIS_URL`, `DATABASE_URL`, `DATABASE_MAX_CONNECTIONS`,
/// `DATABASE_STATEMENT_TIMEOUT_SECONDS`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServicesConfig {
    /// `REDIS_URL`: Redis for shared state (`redis://`, a `unix://` socket, or a Redis
    /// Cluster as `redis+cluster://host:port?addr=host:port&...`, see
    /// [`ServiceUrl::cluster_seeds`]; no TLS in this build); `None` runs the in-memory
    /// backends.
    pub redis_url: Option<ServiceUrl>,
    /// `DATABASE_URL`: Postgres for users, refresh tokens and the audit log (no TLS in
    /// this build); `None` runs the in-memory backends.
    pub database_url: Option<ServiceUrl>,
    /// `DATABASE_MAX_CONNECTIONS`: the most Postgres connections the pool opens (default
    /// 16, at most 1,000).
    pub database_max_connections: u32,
    /// `DATABASE_STATEMENT_TIMEOUT_SECONDS`: how long one Postgres statement may run,
    /// waits for row locks included, before Postgres cancels it and the request fails
    /// with a retryable error (default 10, at most 3,600; 0 for no limit). See
    /// [`PgPoolConfig::statement_timeout`](crate::postgres::PgPoolConfig::statement_timeout).
    pub database_statement_timeout: Duration,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            database_url: None,
            database_max_connections: DEFAULT_DATABASE_MAX_CONNECTIONS,
            database_statement_timeout: DEFAULT_DATABASE_STATEMENT_TIMEOUT,
        }
    }
}

impl Settings for ServicesConfig {
    fn read(env: &mut Env<'_>) -> Self {
        let redis_url = env.service_url(
            "REDIS_URL",
            REDIS_SCHEMES,
            "a Redis URL such as redis://127.0.0.1:6379, or redis+cluster://host:port?addr=host:port for a Redis Cluster (rediss:// is not supported: this build has no TLS)",
        );
        let database_url = env.service_url(
            "DATABASE_URL",
            &["postgres", "postgresql"],
            "a Postgres URL such as postgres://user@127.0.0.1:5432/db",
        );
        let database_max_connections = env.number(
            "DATABASE_MAX_CONNECTIONS",
            DEFAULT_DATABASE_MAX_CONNECTIONS,
            1..=1000,
            "a whole number from 1 to 1000",
        );
        let database_statement_timeout = Duration::from_secs(env.number(
            "DATABASE_STATEMENT_TIMEOUT_SECONDS",
            DEFAULT_DATABASE_STATEMENT_TIMEOUT.as_secs(),
            0..=3600,
            "a whole number of seconds from 0 (no limit) to 3600",
        ));
        Self {
            redis_url,
            database_url,
            database_max_connections,
            database_statement_timeout,
        }
    }
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
        let scheme = "redis+cluster://";
        if let Some(rest) = value
            .get(..scheme.len())
            .filter(|start| start.eq_ignore_ascii_case(scheme))
            .map(|_| &value[scheme.len()..])
        {
            // The host part: after any user:password@, before any path or query.
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            let hosts = authority
                .rsplit_once('@')
                .map_or(authority, |(_, hosts)| hosts);
            if hosts.contains(',') {
                return Err("list further cluster seeds as ?addr=host:port, not with commas");
            }
        }
        let url = Url::parse(value).map_err(|_| "not a URL")?;
        if !schemes.contains(&url.scheme()) {
            return Err("the scheme is not one of those expected");
        }
        let socket = matches!(url.scheme(), "unix" | "redis+unix");
        if url.host_str().is_none_or(str::is_empty) && !socket {
            return Err("the URL has no host");
        }
        let url = Self(url);
        if url.is_cluster() {
            url.cluster_seeds()?;
        }
        Ok(url)
    }

    /// Whether this is a Redis Cluster URL (`redis+cluster://`).
    pub fn is_cluster(&self) -> bool {
        self.0.scheme() == "redis+cluster"
    }

    /// The seed nodes of a Redis Cluster URL, each as a plain `redis://` URL with the
    /// cluster URL's user and password.
    ///
    /// The form is `redis+cluster://[user:password@]host:port[?addr=host:port&addr=...]`:
    /// the first seed is the URL's own host, each `addr` adds one more (as go-redis
    /// reads cluster URLs). The path must be empty or `/0` (a cluster has only database
    /// 0), and `addr` is the only query parameter.
    ///
    /// ```
    /// use upcoach_core::config::ServiceUrl;
    ///
    /// let url = ServiceUrl::parse(
    ///     "redis+cluster://:s3cret@10.0.0.1:7000?addr=10.0.0.2:7000&addr=10.0.0.3:7000",
    ///     &["redis", "redis+cluster"],
    /// )
    /// .unwrap();
    /// let seeds = url.cluster_seeds().unwrap();
    /// assert_eq!(seeds[0].expose(), "redis://:s3cret@10.0.0.1:7000/");
    /// assert_eq!(seeds[2].expose(), "redis://:s3cret@10.0.0.3:7000/");
    /// assert_eq!(
    ///     url.to_string(),
    ///     "redis+cluster://:***@10.0.0.1:7000?addr=10.0.0.2:7000&addr=10.0.0.3:7000"
    /// );
    /// assert!(ServiceUrl::parse("redis+cluster://a:7000,b:7000", &["redis+cluster"]).is_err());
    /// ```
    pub fn cluster_seeds(&self) -> Result<Vec<ServiceUrl>, &'static str> {
        if !self.is_cluster() {
            return Err("not a redis+cluster:// URL");
        }
        if !matches!(self.0.path(), "" | "/" | "/0") {
            return Err("a Redis Cluster has only database 0: leave the path empty");
        }
        let mut seed = self.0.clone();
        seed.set_query(None);
        seed.set_path("/");
        seed.set_fragment(None);
        let seed = Url::parse(&seed.as_str().replacen("redis+cluster://", "redis://", 1))
            .map_err(|_| "not a URL")?;
        let mut seeds = vec![ServiceUrl(seed.clone())];
        if seed.port() == Some(0) {
            return Err("a seed's port must not be 0");
        }
        for (name, value) in self.0.query_pairs() {
            if name != "addr" {
                return Err("a redis+cluster:// URL takes only addr=host:port parameters");
            }
            // Exactly host:port: no user, password, path or query of its own.
            let addr = Url::parse(&format!("redis://{value}"))
                .ok()
                .filter(|a| a.username().is_empty() && a.password().is_none())
                .filter(|a| matches!(a.path(), "" | "/") && a.query().is_none())
                .filter(|a| a.fragment().is_none())
                .ok_or("each addr= must be host:port and nothing else")?;
            let (Some(host), Some(port)) = (addr.host_str(), addr.port()) else {
                return Err("each addr= must be host:port and nothing else");
            };
            if host.is_empty() || port == 0 {
                return Err("each addr= must be host:port and nothing else");
            }
            let mut next = seed.clone();
            next.set_host(Some(host))
                .map_err(|_| "an addr= host is not a valid host")?;
            next.set_port(Some(port))
                .map_err(|_| "an addr= port is not usable")?;
            seeds.push(ServiceUrl(next));
        }
        if seeds.len() > 64 {
            return Err("at most 64 seed addresses");
        }
        Ok(seeds)
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
        let secret = |k: &str| {
            matches!(
                k.to_ascii_lowercase().as_str(),
                "password" | "pass" | "sslpassword"
            )
        };
        // Rewritten (and so re-encoded) only when it holds a secret: a cluster URL's
        // `addr=host:port` list reads as written.
        if url.query_pairs().any(|(k, _)| secret(&k)) {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let value = if secret(&k) {
                        "***".to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), value)
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
    /// The environment variable (a name made at run time for per-provider variables
    /// such as `OIDC_GITLAB_ISSUER`).
    pub variable: Cow<'static, str>,
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
    pub fn variables(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().map(|e| e.variable.as_ref())
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

impl ConfigErrors {
    /// Every problem of `self` and then of `other`.
    pub fn merge(mut self, other: ConfigErrors) -> Self {
        self.0.extend(other.0);
        self
    }
}

/// A crate's settings: implement [`read`](Self::read) (every problem recorded in the
/// [`Env`], never returned early), and get [`from_env`](Self::from_env) and
/// [`from_lookup`](Self::from_lookup). A server composes several by calling each one's
/// `read` on one `Env`, so all their problems are reported together.
pub trait Settings: Sized {
    /// Reads the variables through `env`, recording problems there.
    fn read(env: &mut Env<'_>) -> Self;

    /// Reads the process environment.
    fn from_env() -> Result<Self, ConfigErrors> {
        let mut env = Env::process();
        let settings = Self::read(&mut env);
        env.finish(settings)
    }

    /// Reads variables through `lookup` (a map in tests, a secrets manager in a host).
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigErrors> {
        let mut env = Env::from_lookup(lookup);
        let settings = Self::read(&mut env);
        env.finish(settings)
    }
}

/// A variable's value by name.
type Lookup<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// Reads variables through a lookup function and collects every problem, so a
/// composition of several crates' settings reports them all at once. Each crate's
/// settings have a `read(&mut Env)` and a `from_env()`.
///
/// ```
/// use upcoach_core::config::{Env, ServicesConfig, Settings};
///
/// let mut env = Env::from_lookup(|name| (name == "DATABASE_MAX_CONNECTIONS").then(|| "0".into()));
/// let services = ServicesConfig::read(&mut env);
/// let errors = env.finish(services).unwrap_err();
/// assert_eq!(errors.variables().collect::<Vec<_>>(), ["DATABASE_MAX_CONNECTIONS"]);
/// ```
pub struct Env<'a> {
    lookup: Box<Lookup<'a>>,
    errors: Vec<ConfigError>,
}

impl fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Env")
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl<'a> Env<'a> {
    /// The process environment.
    pub fn process() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Variables through `lookup` (a map in tests, a secrets manager in a host).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String> + 'a) -> Self {
        Self {
            lookup: Box::new(lookup),
            errors: Vec::new(),
        }
    }

    /// `value` if no problem was recorded, else every problem, in the order found.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    /// The variable's value; a blank one counts as unset.
    pub fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    /// Records that `variable` is invalid, showing `got` (never for secrets).
    pub fn invalid(
        &mut self,
        variable: impl Into<Cow<'static, str>>,
        expected: &'static str,
        got: Option<String>,
    ) {
        let variable: Cow<'static, str> = variable.into();
        self.invalid_because(variable, expected, got, None);
    }

    /// Records that `variable` is invalid, and why.
    pub fn invalid_because(
        &mut self,
        variable: impl Into<Cow<'static, str>>,
        expected: &'static str,
        got: Option<String>,
        reason: Option<&'static str>,
    ) {
        let variable: Cow<'static, str> = variable.into();
        self.errors.push(ConfigError {
            variable,
            problem: ConfigProblem::Invalid {
                expected,
                got,
                reason,
            },
        });
    }

    /// Records that `variable` is required and not set.
    pub fn missing(
        &mut self,
        variable: impl Into<Cow<'static, str>>,
        expected: &'static str,
        because: &'static str,
    ) {
        let variable: Cow<'static, str> = variable.into();
        self.errors.push(ConfigError {
            variable,
            problem: ConfigProblem::Missing { expected, because },
        });
    }

    /// The value, or a recorded problem when unset.
    pub fn required(
        &mut self,
        variable: impl Into<Cow<'static, str>>,
        expected: &'static str,
        because: &'static str,
    ) -> Option<String> {
        let variable: Cow<'static, str> = variable.into();
        let value = self.get(&variable);
        if value.is_none() {
            self.missing(variable, expected, because);
        }
        value
    }

    /// A service URL with one of `schemes` (its value never repeated in errors).
    pub fn service_url(
        &mut self,
        variable: impl Into<Cow<'static, str>>,
        schemes: &[&str],
        expected: &'static str,
    ) -> Option<ServiceUrl> {
        let variable: Cow<'static, str> = variable.into();
        let value = self.get(&variable)?;
        match ServiceUrl::parse(value.trim(), schemes) {
            Ok(url) => Some(url),
            Err(reason) => {
                // A URL may carry a password: never repeat it.
                self.invalid_because(variable, expected, None, Some(reason));
                None
            }
        }
    }

    /// A client id: printable ASCII without spaces, at most 256 bytes; required when
    /// `because` says why.
    pub fn identifier(
        &mut self,
        variable: impl Into<Cow<'static, str>>,
        expected: &'static str,
        because: Option<&'static str>,
    ) -> Option<String> {
        let variable: Cow<'static, str> = variable.into();
        let value = match because {
            Some(because) => self.required(variable.clone(), expected, because)?,
            None => self.get(&variable)?,
        };
        let value = value.trim().to_owned();
        if value.len() > 256 || !value.bytes().all(|b| b.is_ascii_graphic()) {
            self.invalid(variable, expected, Some(value));
            return None;
        }
        Some(value)
    }

    /// A boolean: true/false, 1/0, yes/no, on/off.
    pub fn flag(&mut self, variable: impl Into<Cow<'static, str>>, default: bool) -> bool {
        let variable: Cow<'static, str> = variable.into();
        match self.get(&variable) {
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

    /// A required secret (never shown).
    pub fn secret(
        &mut self,
        variable: impl Into<Cow<'static, str>>,
        expected: &'static str,
        because: &'static str,
    ) -> Option<Secret> {
        let variable: Cow<'static, str> = variable.into();
        self.required(variable, expected, because).map(Secret::new)
    }

    /// An optional secret (never shown).
    pub fn secret_optional(&mut self, variable: impl Into<Cow<'static, str>>) -> Option<Secret> {
        let variable: Cow<'static, str> = variable.into();
        self.get(&variable)
            .map(|v| Secret::new(v.trim().to_owned()))
    }

    /// A socket address (`127.0.0.1:8080`, `[::]:8080`), or `default`.
    pub fn socket_addr(
        &mut self,
        variable: impl Into<Cow<'static, str>>,
        default: std::net::SocketAddr,
    ) -> std::net::SocketAddr {
        let variable: Cow<'static, str> = variable.into();
        let Some(v) = self.get(&variable) else {
            return default;
        };
        v.trim().parse().unwrap_or_else(|_| {
            self.invalid(
                variable,
                "a socket address such as 127.0.0.1:8080 or [::]:8080",
                Some(v.clone()),
            );
            default
        })
    }

    /// A whole number in `range` (`expected` says so in words), or `default`.
    pub fn number<T>(
        &mut self,
        variable: impl Into<Cow<'static, str>>,
        default: T,
        range: std::ops::RangeInclusive<T>,
        expected: &'static str,
    ) -> T
    where
        T: std::str::FromStr + PartialOrd,
    {
        let variable: Cow<'static, str> = variable.into();
        match self.get(&variable) {
            None => default,
            Some(v) => match v.trim().parse::<T>() {
                Ok(n) if range.contains(&n) => n,
                _ => {
                    self.invalid(variable, expected, Some(v.clone()));
                    default
                }
            },
        }
    }

    /// Comma-separated origins (`scheme://host[:port]`), `*` and paths refused.
    pub fn origins(&mut self, variable: impl Into<Cow<'static, str>>) -> Vec<String> {
        let variable: Cow<'static, str> = variable.into();
        let Some(v) = self.get(&variable) else {
            return Vec::new();
        };
        let mut origins = Vec::new();
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match parse_origin(part) {
                Some(origin) => origins.push(origin),
                None => {
                    // An origin with credentials in it is refused, and not repeated.
                    let shown = (!part.contains('@')).then(|| part.to_owned());
                    self.invalid_because(
                        variable.clone(),
                        "comma-separated origins such as https://app.example.com",
                        shown,
                        Some(
                            "each origin is scheme://host[:port] with no path; '*' is not accepted",
                        ),
                    );
                }
            }
        }
        origins
    }
}

/// Normalises `scheme://host[:port]`; `None` for anything else (paths, `*`, userinfo).
pub fn parse_origin(value: &str) -> Option<String> {
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
