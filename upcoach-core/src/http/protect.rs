//! Rate limits in front of any tower/hyper service: the [`RateLimitLayer`].
//!
//! - **Who the client is**: the peer address the server recorded ([`ClientAddr`]), or,
//!   when that peer is one of the [`TrustedProxies`], the rightmost address of
//!   `X-Forwarded-For` that is not a trusted proxy. A forwarded header from anyone
//!   else is ignored. The layer writes the resolved address back into [`ClientAddr`]
//!   (port 0 when it came from the header), so every audit row downstream carries it.
//! - **Rules** ([`Rule`]) match a method and a path pattern (`/auth/{provider}/refresh`,
//!   matchit syntax) and are keyed by the client's address (IPv6 by /64), the signed-in
//!   user (anonymous callers fall back to their address), the route, or the
//!   `{provider}` of the path. [`default_rules`] guard the sign-in routes, broadcast and
//!   realtime connects; [`LimitConfig`] reads them from the environment.
//! - **Over a limit**: 429 `rate_limited` with `Retry-After` and the IETF draft's
//!   `RateLimit-Policy: "<rule>";q=<limit>;w=<seconds>` and
//!   `RateLimit: "<rule>";r=<remaining>;t=<seconds>` headers (allowed answers of a
//!   limited route carry the last two as well), and one `rate_limited` security event
//!   per rule, subject and window, not one per request.
//! - **When the limiter's store is down**: each rule says what happens
//!   ([`OnOutage`]): sign-in rules fail closed (503 `rate_limiter_unavailable`), the
//!   others fall back to a limiter in this process.
//! - **Token failures**: an answer of 401 whose [`ErrorCode`] starts with `token_`
//!   (a protected route refused the bearer) is recorded as a `token_rejected` security
//!   event with the client's facts.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower_service::Service;
//! use upcoach_core::http::ClientAddr;
//! use upcoach_core::http::protect::{KeyBy, RateLimitLayer, Rule};
//! use upcoach_core::limit::{MemoryLimiter, Quota};
//!
//! /// The host's own routes: here, one that always answers 200.
//! #[derive(Clone)]
//! struct Routes;
//! impl Service<Request<()>> for Routes {
//!     type Response = Response<Full<Bytes>>;
//!     type Error = Infallible;
//!     type Future = std::future::Ready<Result<Self::Response, Infallible>>;
//!     fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
//!         std::task::Poll::Ready(Ok(()))
//!     }
//!     fn call(&mut self, _: Request<()>) -> Self::Future {
//!         std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"{}")))))
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let rule = Rule::new("auth.refresh", "/auth/refresh", KeyBy::Address,
//!     Quota::new(2, std::time::Duration::from_secs(60)).unwrap());
//! let layer = RateLimitLayer::builder(Arc::new(MemoryLimiter::new())).rule(rule).build().unwrap();
//! let mut service = tower_layer::Layer::layer(&layer, Routes);
//! let request = || {
//!     let mut r = Request::post("/auth/refresh").body(()).unwrap();
//!     r.extensions_mut().insert(ClientAddr("203.0.113.7:50000".parse().unwrap()));
//!     r
//! };
//! assert_eq!(service.call(request()).await.unwrap().status(), StatusCode::OK);
//! let second = service.call(request()).await.unwrap();
//! assert_eq!(second.headers()["ratelimit"], r#""auth.refresh";r=0;t=60"#);
//! let refused = service.call(request()).await.unwrap();
//! assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(refused.headers()["retry-after"], "30");
//! assert_eq!(refused.headers()["ratelimit-policy"], r#""auth.refresh";q=2;w=60"#);
//! # });
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use serde_json::json;

use super::{ApiError, ClientAddr, ErrorCode, HttpError, error_response, facts_of};
use crate::config::{Env, Settings};
use crate::event::{Event, EventLog, SecurityEvent};
use crate::limit::{
    Decision, LimitError, MemoryLimiter, Quota, RateLimiter, ip_subject, validate_name,
};
use crate::{Clock, SystemClock, TokenVerifier};

/// The most (rule, subject) pairs remembered for "one event per window"; past it, the
/// oldest windows are forgotten first (an extra event, never a lost one).
const MAX_REPORTED: usize = 10_000;

/// The body of a response through the layer: the inner service's, or the layer's own
/// JSON answer.
pub type ProtectedBody<B> = Either<B, Full<Bytes>>;

/// Addresses of the proxies in front of the server whose `X-Forwarded-For` is
/// believed: single addresses or CIDR ranges (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// No proxy is trusted: forwarded headers are ignored.
    pub fn none() -> Self {
        Self(Vec::new())
    }

    /// A comma-separated list of addresses and CIDR ranges.
    ///
    /// ```
    /// use upcoach_core::http::protect::TrustedProxies;
    ///
    /// let proxies = TrustedProxies::parse("127.0.0.1, 10.0.0.0/8, fd00::/8").unwrap();
    /// assert!(proxies.contains("10.1.2.3".parse().unwrap()));
    /// assert!(!proxies.contains("11.0.0.1".parse().unwrap()));
    /// assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
    /// ```
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (addr, bits) = match item.split_once('/') {
                Some((addr, bits)) => (addr, Some(bits)),
                None => (item, None),
            };
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| format!("{item:?} is not an address or CIDR range"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                None => max,
                Some(b) => b
                    .parse::<u8>()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(|| format!("{item:?} has an invalid prefix length"))?,
            };
            nets.push((addr, bits));
        }
        Ok(Self(nets))
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0
            .iter()
            .any(|&(net, bits)| in_net(ip, canonical(net), bits))
    }

    /// Whether any proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The client's address: `peer`, unless `peer` is trusted and `X-Forwarded-For`
    /// names someone; then the rightmost forwarded address that is not a trusted proxy
    /// (what the nearest untrusted hop said). An unparsable header entry stops the walk
    /// at the last address believed.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            client = ip;
            if !self.contains(ip) {
                break;
            }
        }
        client
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// What a rule counts requests by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyBy {
    /// The client's address (IPv6 by /64).
    Address,
    /// The signed-in user of the bearer token; callers without a valid one by address.
    User,
    /// The route: one budget shared by every caller.
    Route,
    /// The `{provider}` of the path: one budget per provider, shared by every caller.
    Provider,
}

/// What a rule does when the limiter cannot decide (Redis unreachable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOutage {
    /// Refuse with 503 `rate_limiter_unavailable`: for sign-in routes, where an
    /// unlimited window is what an attacker waits for.
    FailClosed,
    /// Count in this process instead (each process then enforces the budget alone).
    Local,
}

/// One limit: which requests (methods and a path pattern), counted by what, how many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    name: String,
    methods: Vec<Method>,
    path: String,
    key: KeyBy,
    quota: Quota,
    outage: OnOutage,
}

impl Rule {
    /// A rule named `name` (the `RateLimit-Policy` name and the event's `rule`) for
    /// every method on `path` (matchit syntax: `/auth/{provider}/token`), failing
    /// closed when the limiter's store is down.
    pub fn new(name: impl Into<String>, path: impl Into<String>, key: KeyBy, quota: Quota) -> Self {
        Self {
            name: name.into(),
            methods: Vec::new(),
            path: path.into(),
            key,
            quota,
            outage: OnOutage::FailClosed,
        }
    }

    /// Only these methods.
    pub fn methods(mut self, methods: &[Method]) -> Self {
        self.methods = methods.to_vec();
        self
    }

    /// What to do when the limiter's store is down.
    pub fn on_outage(mut self, outage: OnOutage) -> Self {
        self.outage = outage;
        self
    }

    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The rule's quota.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// The rule's path pattern.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What the rule counts by.
    pub fn key(&self) -> KeyBy {
        self.key
    }

    /// What the rule does when the limiter's store is down.
    pub fn outage(&self) -> OnOutage {
        self.outage
    }
}

fn quota(limit: u32, secs: u64) -> Quota {
    Quota::new(limit, Duration::from_secs(secs)).unwrap_or_else(|| unreachable!())
}

/// The reference routes' rules (API.md), by name, with the environment variable that
/// overrides each (`<limit>/<window>`, e.g. `30/1m`, or `off`).
///
/// | rule | route | by | default | outage |
/// |---|---|---|---|---|
/// | `auth.authorize` | `GET /auth/{provider}/authorize` | address | 30/1m | closed |
/// | `auth.callback` | `GET, POST /auth/{provider}/callback` | address | 30/1m | closed |
/// | `auth.token` | `POST /auth/{provider}/token` | address | 20/1m | closed |
/// | `auth.exchange` | `POST /auth/exchange` | address | 30/1m | closed |
/// | `auth.refresh` | `POST /auth/refresh` | address | 60/1m | closed |
/// | `auth.provider` | `/auth/{provider}/{step}` | provider | 3000/1m | closed |
/// | `realtime.broadcast` | `POST /api/dashboard/realtime/broadcast/{room}` | user | 600/1m | local |
/// | `realtime.connect` | `GET /api/dashboard/realtime/ws` and `/sse` | address | 60/1m | local |
pub const DEFAULT_RULES: [(&str, &str); 8] = [
    ("auth.authorize", "RATE_LIMIT_AUTH_AUTHORIZE"),
    ("auth.callback", "RATE_LIMIT_AUTH_CALLBACK"),
    ("auth.token", "RATE_LIMIT_AUTH_TOKEN"),
    ("auth.exchange", "RATE_LIMIT_AUTH_EXCHANGE"),
    ("auth.refresh", "RATE_LIMIT_AUTH_REFRESH"),
    ("auth.provider", "RATE_LIMIT_AUTH_PROVIDER"),
    ("realtime.broadcast", "RATE_LIMIT_REALTIME_BROADCAST"),
    ("realtime.connect", "RATE_LIMIT_REALTIME_CONNECT"),
];

/// The rules of [`DEFAULT_RULES`] with their default quotas.
pub fn default_rules() -> Vec<Rule> {
    use Method as M;
    let connect = |path: &str| {
        Rule::new("realtime.connect", path, KeyBy::Address, quota(60, 60))
            .methods(&[M::GET])
            .on_outage(OnOutage::Local)
    };
    vec![
        Rule::new(
            "auth.authorize",
            "/auth/{provider}/authorize",
            KeyBy::Address,
            quota(30, 60),
        )
        .methods(&[M::GET]),
        Rule::new(
            "auth.callback",
            "/auth/{provider}/callback",
            KeyBy::Address,
            quota(30, 60),
        )
        .methods(&[M::GET, M::POST]),
        Rule::new(
            "auth.token",
            "/auth/{provider}/token",
            KeyBy::Address,
            quota(20, 60),
        )
        .methods(&[M::POST]),
        Rule::new(
            "auth.exchange",
            "/auth/exchange",
            KeyBy::Address,
            quota(30, 60),
        )
        .methods(&[M::POST]),
        Rule::new(
            "auth.refresh",
            "/auth/refresh",
            KeyBy::Address,
            quota(60, 60),
        )
        .methods(&[M::POST]),
        Rule::new(
            "auth.provider",
            "/auth/{provider}/{step}",
            KeyBy::Provider,
            quota(3000, 60),
        ),
        Rule::new(
            "realtime.broadcast",
            "/api/dashboard/realtime/broadcast/{room}",
            KeyBy::User,
            quota(600, 60),
        )
        .methods(&[M::POST])
        .on_outage(OnOutage::Local),
        connect("/api/dashboard/realtime/ws"),
        connect("/api/dashboard/realtime/sse"),
    ]
}

/// The layer's settings from the environment.
///
/// | variable | default | meaning |
/// |---|---|---|
/// | `RATE_LIMIT_ENABLED` | `true` | `false` lets every request through unlimited |
/// | `TRUSTED_PROXIES` | none | addresses / CIDR ranges whose `X-Forwarded-For` is believed |
/// | `RATE_LIMIT_<RULE>` | see [`DEFAULT_RULES`] | `<limit>/<window>` (`30/1m`, `5/10s`) or `off` |
/// | `UPCOACH_MAX_CONNECTIONS` | 19000 | open connections per process |
/// | `UPCOACH_MAX_CONNECTIONS_PER_ADDRESS` | 256 | open connections per client address (0: no cap) |
///
/// ```
/// use upcoach_core::config::Settings;
/// use upcoach_core::http::protect::LimitConfig;
///
/// let env = [("RATE_LIMIT_AUTH_REFRESH", "5/10s"), ("RATE_LIMIT_AUTH_PROVIDER", "off")];
/// let config = LimitConfig::from_lookup(|n| env.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string())).unwrap();
/// let rules = config.rules();
/// let refresh = rules.iter().find(|r| r.name() == "auth.refresh").unwrap();
/// assert_eq!((refresh.quota().limit(), refresh.quota().window().as_secs()), (5, 10));
/// assert!(rules.iter().all(|r| r.name() != "auth.provider"));
///
/// let bad = LimitConfig::from_lookup(|n| (n == "RATE_LIMIT_AUTH_TOKEN").then(|| "lots".into()));
/// assert!(bad.unwrap_err().to_string().contains("RATE_LIMIT_AUTH_TOKEN"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimitConfig {
    /// `RATE_LIMIT_ENABLED`.
    pub enabled: bool,
    /// `TRUSTED_PROXIES`.
    pub trusted_proxies: TrustedProxies,
    /// The quota of each default rule (`None`: turned off).
    pub quotas: Vec<(&'static str, Option<Quota>)>,
    /// `UPCOACH_MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// `UPCOACH_MAX_CONNECTIONS_PER_ADDRESS`.
    pub max_connections_per_address: usize,
}

impl Default for LimitConfig {
    fn default() -> Self {
        let defaults = default_rules();
        Self {
            enabled: true,
            trusted_proxies: TrustedProxies::none(),
            quotas: DEFAULT_RULES
                .iter()
                .map(|(name, _)| {
                    let rule = defaults.iter().find(|r| r.name == *name);
                    (*name, rule.map(|r| r.quota))
                })
                .collect(),
            max_connections: 19_000,
            max_connections_per_address: 256,
        }
    }
}

impl Settings for LimitConfig {
    fn read(env: &mut Env<'_>) -> Self {
        let mut config = Self {
            enabled: env.flag("RATE_LIMIT_ENABLED", true),
            ..Self::default()
        };
        if let Some(list) = env.get("TRUSTED_PROXIES") {
            match TrustedProxies::parse(&list) {
                Ok(proxies) => config.trusted_proxies = proxies,
                Err(_) => env.invalid(
                    "TRUSTED_PROXIES",
                    "comma-separated addresses or CIDR ranges (10.0.0.0/8)",
                    Some(list),
                ),
            }
        }
        for (i, (_, variable)) in DEFAULT_RULES.iter().enumerate() {
            let Some(value) = env.get(variable) else {
                continue;
            };
            match parse_quota(&value) {
                Some(quota) => config.quotas[i].1 = quota,
                None => env.invalid(
                    *variable,
                    "<limit>/<window> such as 30/1m or 5/10s, or off",
                    Some(value),
                ),
            }
        }
        config.max_connections = env.number(
            "UPCOACH_MAX_CONNECTIONS",
            config.max_connections,
            1..=1_000_000,
            "a number of connections from 1 to 1000000",
        );
        config.max_connections_per_address = env.number(
            "UPCOACH_MAX_CONNECTIONS_PER_ADDRESS",
            config.max_connections_per_address,
            0..=1_000_000,
            "a number of connections from 0 (no cap) to 1000000",
        );
        config
    }
}

/// `30/1m` → 30 per minute; `off` → `Some(None)`; anything else `None`.
fn parse_quota(text: &str) -> Option<Option<Quota>> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Some(None);
    }
    let (limit, window) = text.split_once('/')?;
    let limit: u32 = limit.trim().parse().ok()?;
    let window = crate::event::parse_window(window.trim())?;
    Quota::new(limit, window).map(Some)
}

impl LimitConfig {
    /// The default rules with this configuration's quotas (rules turned off left out).
    pub fn rules(&self) -> Vec<Rule> {
        default_rules()
            .into_iter()
            .filter_map(|mut rule| {
                let (_, quota) = self.quotas.iter().find(|(n, _)| *n == rule.name)?;
                rule.quota = (*quota)?;
                Some(rule)
            })
            .collect()
    }

    /// The connection caps of this configuration.
    pub fn connection_limits(&self) -> super::ConnectionLimits {
        super::ConnectionLimits::with_proxies(
            self.max_connections,
            self.max_connections_per_address,
            self.trusted_proxies.clone(),
        )
    }
}

/// Builds a [`RateLimitLayer`].
#[derive(Debug)]
pub struct RateLimitLayerBuilder {
    limiter: Arc<dyn RateLimiter>,
    rules: Vec<Rule>,
    proxies: TrustedProxies,
    verifier: Option<Arc<dyn TokenVerifier>>,
    events: Option<Arc<dyn EventLog>>,
    clock: Arc<dyn Clock>,
    enabled: bool,
}

impl RateLimitLayerBuilder {
    /// Adds one rule.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Adds rules.
    pub fn rules(mut self, rules: impl IntoIterator<Item = Rule>) -> Self {
        self.rules.extend(rules);
        self
    }

    /// Takes the rules, proxies and on/off switch of `config`.
    pub fn config(mut self, config: &LimitConfig) -> Self {
        self.rules.extend(config.rules());
        self.proxies = config.trusted_proxies.clone();
        self.enabled = config.enabled;
        self
    }

    /// Believes `X-Forwarded-For` from these proxies.
    pub fn trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.proxies = proxies;
        self
    }

    /// Verifies bearer tokens for rules keyed by user.
    pub fn verifier(mut self, verifier: Arc<dyn TokenVerifier>) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Records `rate_limited` and `token_rejected` security events here.
    pub fn events(mut self, events: Arc<dyn EventLog>) -> Self {
        self.events = Some(events);
        self
    }

    /// The clock of events and event windows.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The layer; an error names a rule whose name or path is unusable.
    pub fn build(self) -> Result<RateLimitLayer, String> {
        let mut router: matchit::Router<Vec<usize>> = matchit::Router::new();
        let mut paths: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, rule) in self.rules.iter().enumerate() {
            validate_name(&rule.name).map_err(|e| e.to_string())?;
            paths.entry(rule.path.as_str()).or_default().push(i);
        }
        for (path, rules) in paths {
            router
                .insert(path, rules)
                .map_err(|e| format!("rate-limit path {path:?}: {e}"))?;
        }
        // What each rule's path starts with before its first parameter: a path that
        // starts with none of them is matched by no rule, without asking the router.
        let mut prefixes: Vec<String> = self
            .rules
            .iter()
            .map(|rule| rule.path.split('{').next().unwrap_or_default().to_owned())
            .collect();
        prefixes.sort();
        prefixes.dedup_by(|longer, shorter| longer.starts_with(shorter.as_str()));
        Ok(RateLimitLayer {
            shared: Arc::new(Shared {
                prefixes,
                router,
                rules: self.rules,
                limiter: self.limiter,
                local: MemoryLimiter::new(),
                proxies: self.proxies,
                verifier: self.verifier,
                events: self.events,
                clock: self.clock,
                enabled: self.enabled,
                reported: Mutex::new(HashMap::new()),
                stats: Counters::default(),
            }),
        })
    }
}

/// Rate limits and client resolution around a service; see the [module](self) docs.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

#[doc(hidden)]
pub struct Shared {
    /// The rules' literal path prefixes (see [`RateLimitLayerBuilder::build`]).
    prefixes: Vec<String>,
    router: matchit::Router<Vec<usize>>,
    rules: Vec<Rule>,
    limiter: Arc<dyn RateLimiter>,
    local: MemoryLimiter,
    proxies: TrustedProxies,
    verifier: Option<Arc<dyn TokenVerifier>>,
    events: Option<Arc<dyn EventLog>>,
    clock: Arc<dyn Clock>,
    enabled: bool,
    /// (rule, subject) → when the window of its last `rate_limited` event ends.
    reported: Mutex<HashMap<(usize, String), SystemTime>>,
    stats: Counters,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("rules", &self.rules)
            .field("limiter", &self.limiter)
            .field("proxies", &self.proxies)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Counters {
    checked: AtomicU64,
    limited: AtomicU64,
    unavailable: AtomicU64,
    fell_back: AtomicU64,
    events: AtomicU64,
}

/// What the layer has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LimitStats {
    /// Rule checks made.
    pub checked: u64,
    /// Requests answered 429.
    pub limited: u64,
    /// Requests answered 503 because the limiter's store was down (fail-closed rules).
    pub unavailable: u64,
    /// Checks made by the local limiter because the store was down.
    pub fell_back: u64,
    /// `rate_limited` events recorded.
    pub events: u64,
}

impl RateLimitLayer {
    /// A layer checking rules against `limiter`.
    pub fn builder(limiter: Arc<dyn RateLimiter>) -> RateLimitLayerBuilder {
        RateLimitLayerBuilder {
            limiter,
            rules: Vec::new(),
            proxies: TrustedProxies::none(),
            verifier: None,
            events: None,
            clock: Arc::new(SystemClock),
            enabled: true,
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> &[Rule] {
        &self.shared.rules
    }

    /// What the layer has done so far.
    pub fn stats(&self) -> LimitStats {
        let c = &self.shared.stats;
        LimitStats {
            checked: c.checked.load(Ordering::Relaxed),
            limited: c.limited.load(Ordering::Relaxed),
            unavailable: c.unavailable.load(Ordering::Relaxed),
            fell_back: c.fell_back.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
        }
    }
}

impl<S> tower_layer::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// What the rules need of a request: cheap clones, so no borrow of the request (whose
/// body need not be `Sync`) lives across an await.
struct Caller {
    addr: Option<ClientAddr>,
    headers: HeaderMap,
    method: Method,
}

impl Caller {
    fn of<B>(request: &Request<B>) -> Self {
        let mut headers = HeaderMap::new();
        for name in [header::AUTHORIZATION, header::USER_AGENT] {
            if let Some(value) = request.headers().get(&name) {
                headers.insert(name, value.clone());
            }
        }
        Self {
            addr: request.extensions().get::<ClientAddr>().copied(),
            headers,
            method: request.method().clone(),
        }
    }

    fn address_subject(&self) -> String {
        match self.addr {
            Some(ClientAddr(addr)) => ip_subject(addr.ip()),
            None => "ip:unknown".to_owned(),
        }
    }

    fn facts(&self) -> crate::event::ClientFacts {
        facts_of(self.addr, self.headers.get(header::USER_AGENT))
    }
}

/// A matched rule and the subject it counts.
struct Check {
    rule: usize,
    subject: String,
}

/// The strictest decision of a request (fewest remaining), for its headers.
struct Verdict {
    rule: usize,
    decision: Decision,
}

enum Outcome {
    Go(Option<Verdict>),
    Refuse(Response<Full<Bytes>>),
}

impl Shared {
    fn resolve_client<B>(&self, request: &mut Request<B>) {
        if self.proxies.is_empty() {
            return;
        }
        let Some(ClientAddr(peer)) = request.extensions().get::<ClientAddr>().copied() else {
            return;
        };
        let ip = self.proxies.client_ip(peer.ip(), request.headers());
        if ip != peer.ip() {
            request
                .extensions_mut()
                .insert(ClientAddr(SocketAddr::new(ip, 0)));
        }
    }

    /// The rules this request falls under, with their provider parameter.
    fn matching<B>(&self, request: &Request<B>) -> Option<(Vec<usize>, Option<String>)> {
        let path = request.uri().path();
        if !self.enabled || !self.prefixes.iter().any(|p| path.starts_with(p.as_str())) {
            return None;
        }
        let matched = self.router.at(path).ok()?;
        let rules: Vec<usize> = matched
            .value
            .iter()
            .copied()
            .filter(|&i| {
                let methods = &self.rules[i].methods;
                methods.is_empty() || methods.contains(request.method())
            })
            .collect();
        if rules.is_empty() {
            return None;
        }
        let provider = matched.params.get("provider").map(str::to_owned);
        Some((rules, provider))
    }

    async fn subjects(
        &self,
        request: &Caller,
        rules: &[usize],
        provider: Option<&str>,
    ) -> Vec<Check> {
        let mut user: Option<Option<String>> = None;
        let mut checks = Vec::with_capacity(rules.len());
        for &i in rules {
            let rule = &self.rules[i];
            let subject = match rule.key {
                KeyBy::Address => request.address_subject(),
                KeyBy::Route => format!("route:{}", rule.name),
                KeyBy::Provider => {
                    let name = provider.unwrap_or("none");
                    let subject = format!("provider:{name}");
                    if validate_name(&subject).is_ok() && name.len() <= 32 {
                        subject
                    } else {
                        "provider:invalid".to_owned()
                    }
                }
                KeyBy::User => {
                    if user.is_none() {
                        user = Some(match &self.verifier {
                            Some(v) => super::authenticate(v.as_ref(), &request.headers)
                                .await
                                .ok()
                                .map(|p| format!("user:{}", p.user_id)),
                            None => None,
                        });
                    }
                    user.clone()
                        .flatten()
                        .unwrap_or_else(|| request.address_subject())
                }
            };
            checks.push(Check { rule: i, subject });
        }
        checks
    }

    async fn decide(&self, request: &Caller, rules: &[usize], provider: Option<&str>) -> Outcome {
        let checks = self.subjects(request, rules, provider).await;
        let mut verdict: Option<Verdict> = None;
        for check in checks {
            let rule = &self.rules[check.rule];
            self.stats.checked.fetch_add(1, Ordering::Relaxed);
            let checked = match self
                .limiter
                .check_now(&rule.name, &check.subject, rule.quota)
            {
                Some(now) => now,
                None => {
                    self.limiter
                        .check(&rule.name, &check.subject, rule.quota)
                        .await
                }
            };
            let decision = match checked {
                Ok(decision) => decision,
                Err(LimitError::Unavailable(why)) => match rule.outage {
                    OnOutage::FailClosed => {
                        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(rule = %rule.name, error = %why, "rate limiter unavailable; refusing (fail closed)");
                        return Outcome::Refuse(unavailable());
                    }
                    OnOutage::Local => {
                        self.stats.fell_back.fetch_add(1, Ordering::Relaxed);
                        // In process: it always decides at once.
                        match self.local.check_now(&rule.name, &check.subject, rule.quota) {
                            Some(Ok(decision)) => decision,
                            _ => continue,
                        }
                    }
                },
                Err(e) => {
                    // A name the layer built cannot be invalid; never let it through
                    // unlimited silently either.
                    tracing::error!(rule = %rule.name, error = %e, "rate-limit check refused its input");
                    return Outcome::Refuse(unavailable());
                }
            };
            if !decision.allowed {
                self.stats.limited.fetch_add(1, Ordering::Relaxed);
                self.report(check.rule, &check.subject, request);
                return Outcome::Refuse(limited(rule, &decision));
            }
            if verdict
                .as_ref()
                .is_none_or(|v| decision.remaining < v.decision.remaining)
            {
                verdict = Some(Verdict {
                    rule: check.rule,
                    decision,
                });
            }
        }
        Outcome::Go(verdict)
    }

    /// Records one `rate_limited` event per rule, subject and window.
    fn report(&self, rule: usize, subject: &str, request: &Caller) {
        let Some(events) = &self.events else {
            return;
        };
        let now = self.clock.now();
        let window = self.rules[rule].quota.window();
        {
            let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            let key = (rule, subject.to_owned());
            if reported.get(&key).is_some_and(|until| *until > now) {
                return;
            }
            if reported.len() >= MAX_REPORTED {
                reported.retain(|_, until| *until > now);
                if reported.len() >= MAX_REPORTED {
                    reported.clear();
                }
            }
            reported.insert(key, now + window);
        }
        let facts = request.facts();
        let rule = &self.rules[rule];
        let event = SecurityEvent::new("rate_limited", self.clock.as_ref())
            .client(&facts)
            .details(json!({
                "rule": rule.name,
                "subject": subject.split(':').next().unwrap_or("unknown"),
                "limit": rule.quota.limit(),
                "window_s": window.as_secs(),
                "method": request.method.as_str(),
            }));
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = events.record(Event::Security(event)) {
            tracing::debug!(error = %e, "a rate_limited event was not logged");
        }
    }

    /// Records a `token_rejected` event when a protected route refused the bearer.
    fn audit<B>(&self, facts: &RequestFacts, response: &Response<B>) {
        if response.status() != StatusCode::UNAUTHORIZED {
            return;
        }
        let code = response
            .extensions()
            .get::<ErrorCode>()
            .map_or("unauthorized", |c| c.0);
        if code.starts_with("token_") || code == "unauthorized" {
            self.token_rejected(facts, code);
        }
    }

    fn token_rejected(&self, parts: &RequestFacts, code: &'static str) {
        let Some(events) = &self.events else {
            return;
        };
        let facts = facts_of(parts.addr, parts.user_agent.as_ref());
        let path = parts
            .path
            .as_ref()
            .map_or("", http::uri::PathAndQuery::path);
        let path: String = path.chars().take(200).collect();
        let event = SecurityEvent::new("token_rejected", self.clock.as_ref())
            .client(&facts)
            .details(json!({"code": code, "path": path}));
        if let Err(e) = events.record(Event::Security(event)) {
            tracing::debug!(error = %e, "a token_rejected event was not logged");
        }
    }
}

/// What the layer keeps of a request to audit its answer (cheap clones: the facts are
/// only built for a 401).
#[doc(hidden)]
pub struct RequestFacts {
    addr: Option<ClientAddr>,
    user_agent: Option<HeaderValue>,
    /// The request's path and query (only the path is recorded).
    path: Option<http::uri::PathAndQuery>,
}

impl fmt::Debug for RequestFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestFacts")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn limited(rule: &Rule, decision: &Decision) -> Response<Full<Bytes>> {
    let retry = decision.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests; retry in {retry} s"),
    );
    let mut response: Response<Full<Bytes>> = error_response(&error);
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry));
    rate_limit_headers(headers, rule, decision);
    response
}

fn unavailable() -> Response<Full<Bytes>> {
    let error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "rate_limiter_unavailable",
        "a dependency is unavailable; retry shortly",
    );
    let mut response: Response<Full<Bytes>> = error_response(&error);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
fn rate_limit_headers(headers: &mut HeaderMap, rule: &Rule, decision: &Decision) {
    let policy = format!(
        "\"{}\";q={};w={}",
        rule.name,
        rule.quota.limit(),
        rule.quota.window().as_secs().max(1)
    );
    let state = format!(
        "\"{}\";r={};t={}",
        rule.name,
        decision.remaining,
        decision.reset_after.as_secs_f64().ceil() as u64
    );
    if let (Ok(policy), Ok(state)) = (HeaderValue::try_from(policy), HeaderValue::try_from(state)) {
        headers.insert("ratelimit-policy", policy);
        headers.insert("ratelimit", state);
    }
}

impl<S, B, ResBody> tower_service::Service<Request<B>> for RateLimit<S>
where
    S: tower_service::Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<ProtectedBody<ResBody>>;
    type Error = S::Error;
    type Future = ProtectFuture<S::Future, S::Error, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let shared = &self.shared;
        shared.resolve_client(&mut request);
        let audit = shared.events.is_some().then(|| RequestFacts {
            addr: request.extensions().get::<ClientAddr>().copied(),
            user_agent: request.headers().get(header::USER_AGENT).cloned(),
            path: request.uri().path_and_query().cloned(),
        });
        let Some((rules, provider)) = shared.matching(&request) else {
            // No rule: no check, no box; only the answer is looked at (for a 401).
            return ProtectFuture::Pass {
                inner: self.inner.call(request),
                audit: audit.map(|a| (shared.clone(), a)),
            };
        };
        let caller = Caller::of(&request);
        let shared = shared.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        ProtectFuture::Checked {
            future: Box::pin(async move {
                let verdict = match shared.decide(&caller, &rules, provider.as_deref()).await {
                    Outcome::Go(verdict) => verdict,
                    Outcome::Refuse(response) => return Ok(response.map(Either::Right)),
                };
                let mut response = inner.call(request).await?;
                if let Some(audit) = &audit {
                    shared.audit(audit, &response);
                }
                if let Some(v) = verdict {
                    rate_limit_headers(response.headers_mut(), &shared.rules[v.rule], &v.decision);
                }
                Ok(response.map(Either::Left))
            }),
        }
    }
}

type Boxed<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

pin_project_lite::pin_project! {
    /// The future of [`RateLimit`]: the inner service's own future when no rule applies,
    /// a boxed check-then-call otherwise.
    #[project = ProtectProj]
    #[allow(missing_docs)]
    pub enum ProtectFuture<F, E, B> {
        /// No rule applies.
        Pass {
            #[pin]
            inner: F,
            audit: Option<(Arc<Shared>, RequestFacts)>,
        },
        /// Rules apply.
        Checked {
            future: Boxed<Response<ProtectedBody<B>>, E>,
        },
    }
}

impl<F, E, B> fmt::Debug for ProtectFuture<F, E, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProtectFuture")
    }
}

impl<F, E, B> Future for ProtectFuture<F, E, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ProtectedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ProtectProj::Pass { inner, audit } => {
                let response = std::task::ready!(inner.poll(cx))?;
                if let Some((shared, facts)) = audit.take() {
                    shared.audit(&facts, &response);
                }
                Poll::Ready(Ok(response.map(Either::Left)))
            }
            ProtectProj::Checked { future } => future.as_mut().poll(cx),
        }
    }
}

impl HttpError for LimitError {
    fn status(&self) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }

    fn code(&self) -> &'static str {
        LimitError::code(self)
    }
}
