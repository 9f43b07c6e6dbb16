//! `cargo run -p upcoach-axum-example` (add `-- --dev` to serve `POST /dev/token`)
//!
//! The upcoach crates embedded in an axum app: sign-in's routes, the realtime WebSocket
//! and SSE handlers and the admin broadcast and status routes on an [`axum::Router`],
//! behind the response cache and the request timing layers. The reference server
//! (`examples/server`) composes the same parts behind bare hyper; this example shows
//! they need nothing of it. Backends are in memory.
//!
//! ```no_run
//! # async fn demo() -> Result<(), upcoach_axum_example::Error> {
//! use std::{net::SocketAddr, sync::Arc};
//! use upcoach_auth::config::AuthConfig;
//! use upcoach_auth::threat::ThreatConfig;
//! use upcoach_core::config::Settings;
//! use upcoach_core::http::protect::LimitConfig;
//! use upcoach_axum_example::{App, CappedListener, Peer, router};
//! use upcoach_realtime::HubConfig;
//!
//! let addr: SocketAddr = "127.0.0.1:8080".parse()?;
//! let (limits, threats) = (LimitConfig::from_env()?, ThreatConfig::from_env()?);
//! let app = App::new(&AuthConfig::from_env()?, HubConfig::from_env()?, &limits, &threats, addr, false).await?;
//! let listener = CappedListener::new(tokio::net::TcpListener::bind(addr).await?, limits.connection_limits());
//! let service = router(Arc::new(app)).into_make_service_with_connect_info::<Peer>();
//! axum::serve(listener, service).await?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use axum::{Router, http::StatusCode};
use upcoach_auth::config::AuthConfig;
use upcoach_auth::http::AuthRoutes;
use upcoach_auth::refresh::MemoryRefreshStore;
use upcoach_auth::sessions::Sessions;
use upcoach_auth::threat::{self, ThreatConfig, ThreatDetector};
use upcoach_cache::{
    CacheRule, MemoryStore, MemoryTagVersions, ResponseCacheLayer, TieredCache, TieredOptions,
};
use upcoach_core::event::{AggregatingLog, EventLog, MemoryEventLog};
use upcoach_core::http::protect::{LimitConfig, RateLimitLayer};
use upcoach_core::http::{
    ApiError, ClientAddr, ConnectionLimits, HeldStream, HttpError, authenticate, error_response,
};
use upcoach_core::limit::MemoryLimiter;
use upcoach_core::{Clock, Principal, SystemClock, TokenVerifier};
use upcoach_perf::{MatchedRoute, RequestMetrics, RequestTimingLayer, RouteTable};
use upcoach_realtime::{Broadcaster, Hub, HubConfig, MemoryBroadcaster};

/// What went wrong while building an [`App`].
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The crates' parts that the router mounts.
#[derive(Debug)]
pub struct App {
    /// Sign-in's routes, over [`Sessions`] (users, refresh tokens, providers).
    pub auth: AuthRoutes,
    /// Rooms, WebSocket and SSE.
    pub hub: Hub,
    /// Checks bearer tokens for the realtime admin routes and the response cache.
    pub verifier: Arc<dyn TokenVerifier>,
    /// Latency by route template, recorded by the timing layer.
    pub requests: Arc<RequestMetrics>,
    /// What the response cache layer stores into.
    pub cache: Arc<TieredCache>,
    /// Security and realtime events of sign-in and the hub.
    pub events: Arc<dyn EventLog>,
    /// Whether `POST /dev/token` is mounted.
    pub dev: bool,
    /// Rate limits in front of the routes (in memory).
    pub limits: RateLimitLayer,
    /// The dashboard page under `/dashboard` (its live figures need the `metrics` room,
    /// which this example does not feed; alerts and security events come through).
    pub dashboard: upcoach_dashboard::Dashboard,
}

impl App {
    /// Every part on in-memory backends, for a server listening on `addr`: sign-in as
    /// `auth` says (signing keys, providers, the `return_to` allow-list), the hub with
    /// `hub`'s limits. `dev` (loopback only) mounts `POST /dev/token` and, without
    /// `AUTH_SIGNING_KEY`, signs with a key made now; without either it fails.
    pub async fn new(
        auth: &AuthConfig,
        hub: HubConfig,
        limits: &LimitConfig,
        threats: &ThreatConfig,
        addr: SocketAddr,
        dev: bool,
    ) -> Result<Self, Error> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let rows = Arc::new(MemoryEventLog::default());
        // Floods of anonymous failures become counts (the closer task ends with the log).
        let aggregated = Arc::new(AggregatingLog::new(rows, Default::default(), clock.clone()));
        aggregated.spawn_closer(Duration::from_secs(15));
        let broadcaster = Arc::new(MemoryBroadcaster::default());
        // Threat detection sees every security event before aggregation; its alerts go
        // to the `alerts` and `security` rooms and block the offending address a while.
        let limiter = Arc::new(MemoryLimiter::new());
        let rooms = broadcaster.clone();
        let publisher = threat::room_publisher(move |room, event, data| {
            let rooms = rooms.clone();
            async move { rooms.publish(room, event, data).await }
        });
        let detector = ThreatDetector::builder(aggregated)
            .config(threats.clone())
            .limiter(limiter.clone())
            .publisher(publisher)
            .clock(clock.clone())
            .build();
        let events: Arc<dyn EventLog> = detector;
        let public_url = auth.public_url.clone();
        let public_url = public_url.unwrap_or_else(|| format!("http://{addr}"));
        let tokens = if dev {
            auth.dev_access_tokens(addr, clock.clone())?
        } else {
            auth.access_tokens(clock.clone())?
                .ok_or("set AUTH_SIGNING_KEY (or pass --dev)")?
        };
        let tokens = Arc::new(tokens);
        let sessions = Sessions::builder(tokens.clone(), public_url)
            .refresh_store(Arc::new(MemoryRefreshStore::new(auth.refresh_policy())))
            .events(events.clone())
            .clock(clock.clone())
            .configure(auth)
            .await?;
        let verifier: Arc<dyn TokenVerifier> = tokens;
        let limits = RateLimitLayer::builder(limiter)
            .config(limits)
            .verifier(verifier.clone())
            .events(events.clone())
            .build()?;
        let hub = Hub::builder(broadcaster, verifier.clone())
            .events(events.clone())
            .clock(clock)
            .config(hub)
            .build();
        let cache = Arc::new(TieredCache::new(
            Arc::new(MemoryStore::new(64 * 1024 * 1024)),
            Arc::new(MemoryTagVersions::default()),
            TieredOptions::default(),
        ));
        let sessions = Arc::new(sessions.build());
        let dashboard = upcoach_dashboard::Dashboard::new(&upcoach_dashboard::DashboardConfig {
            providers: sessions.provider_names(),
            dev_sign_in: dev,
        });
        Ok(Self {
            auth: AuthRoutes::new(sessions),
            dashboard,
            hub,
            verifier,
            requests: Arc::new(RequestMetrics::new(RouteTable::new(templates())?)),
            cache,
            events,
            dev,
            limits,
        })
    }
}

type AppState = State<Arc<App>>;

/// The routes, each template once: what the router mounts and the timing layer's labels.
fn table() -> Vec<(&'static str, MethodRouter<Arc<App>>)> {
    vec![
        (
            "/auth/{provider}/authorize",
            get(async |State(app): AppState, Param(p): Param, r: Request| {
                app.auth.authorize(&p, r).await
            }),
        ),
        ("/auth/{provider}/callback", get(callback).post(callback)),
        (
            "/auth/{provider}/token",
            post(async |State(app): AppState, Param(p): Param, r: Request| {
                app.auth.token(&p, r).await
            }),
        ),
        (
            "/auth/exchange",
            post(async |State(app): AppState, r: Request| app.auth.exchange(r).await),
        ),
        (
            "/auth/refresh",
            post(async |State(app): AppState, r: Request| app.auth.refresh(r).await),
        ),
        (
            "/auth/logout",
            post(async |State(app): AppState, r: Request| app.auth.logout(r).await),
        ),
        (
            "/auth/me",
            get(async |State(app): AppState, r: Request| app.auth.me(r).await),
        ),
        (
            "/auth/link/{provider}",
            post(async |State(app): AppState, Param(p): Param, r: Request| {
                app.auth.link(&p, r).await
            })
            .delete(async |State(app): AppState, Param(p): Param, r: Request| {
                app.auth.unlink(&p, r).await
            }),
        ),
        (
            "/auth/facebook/deauthorize",
            post(async |State(app): AppState, r: Request| app.auth.facebook_deauthorize(r).await),
        ),
        (
            "/auth/facebook/data-deletion",
            post(async |State(app): AppState, r: Request| app.auth.facebook_data_deletion(r).await),
        ),
        (
            "/auth/facebook/data-deletion/{code}",
            get(async |State(app): AppState, Param(code): Param| {
                app.auth.data_deletion_status(&code).await
            }),
        ),
        (
            "/auth/apple/notifications",
            post(async |State(app): AppState, r: Request| app.auth.apple_notifications(r).await),
        ),
        (
            "/.well-known/jwks.json",
            get(async |State(app): AppState| app.auth.jwks()),
        ),
        (
            "/dev/token",
            post(async |State(app): AppState, r: Request| app.auth.dev_token(r).await),
        ),
        // Every method and path under /dashboard: the page's crate answers (404, 405).
        ("/dashboard", any(dashboard)),
        ("/dashboard/", any(dashboard)),
        ("/dashboard/{*file}", any(dashboard)),
        (
            "/api/dashboard/realtime/ws",
            get(async |State(app): AppState, r: Request| app.hub.websocket(r).await),
        ),
        (
            "/api/dashboard/realtime/sse",
            get(async |State(app): AppState, r: Request| app.hub.sse(r).await),
        ),
        (
            "/api/dashboard/realtime/status",
            get(async |State(app): AppState, Caller(p): Caller| app.hub.status_route(&p)),
        ),
        (
            "/api/dashboard/realtime/broadcast/{room}",
            post(
                async |State(app): AppState, Param(room): Param, Caller(p): Caller, r: Request| {
                    app.hub.publish_route(&p, &room, r).await
                },
            ),
        ),
    ]
}

/// The dashboard's page and files ([`upcoach_dashboard::Dashboard::answer`]).
async fn dashboard(State(app): AppState, request: Request) -> Response {
    let (method, path) = (request.method(), request.uri().path());
    match app.dashboard.answer(method, path, request.headers()) {
        Some(answer) => answer,
        None => error(&ApiError::not_found()),
    }
}

async fn callback(State(app): AppState, Param(provider): Param, request: Request) -> Response {
    app.auth.callback(&provider, request).await.into_response()
}

/// The route templates of [`router`], for a [`RouteTable`].
pub fn templates() -> Vec<&'static str> {
    table().into_iter().map(|(template, _)| template).collect()
}

/// The routes of `app` (`POST /dev/token` only when [`App::dev`]) behind the response
/// cache (the status route, per admin, for a second), the rate limits and the timing
/// layer. Serve it with
/// [`Router::into_make_service_with_connect_info`]`::<SocketAddr>()`: sign-in records
/// the client's address.
pub fn router(app: Arc<App>) -> Router {
    let status = CacheRule::new(
        "/api/dashboard/realtime/status",
        Duration::from_secs(1),
        &["realtime"],
    )
    .per_user()
    // A hit skips the handler's admin check: the layer repeats it.
    .authorize(|principal| principal.is_admin());
    let cache = ResponseCacheLayer::new(app.cache.clone(), vec![status])
        .with_verifier(app.verifier.clone());
    let timing = RequestTimingLayer::new(app.requests.clone());
    table()
        .into_iter()
        .filter(|(template, _)| app.dev || *template != "/dev/token")
        .fold(Router::new(), |router, (template, route)| {
            router.route(template, route)
        })
        .route_layer(middleware::from_fn(matched_route))
        .fallback(async || error(&ApiError::not_found()))
        .method_not_allowed_fallback(async || {
            let message = "this route does not take this method: see Allow";
            error(&ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                message,
            ))
        })
        .layer(cache)
        .layer(app.limits.clone())
        .layer(middleware::from_fn(client_addr))
        .layer(timing)
        .with_state(app)
}

/// The matched template, for the timing layer.
async fn matched_route(path: MatchedPath, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    response
        .extensions_mut()
        .insert(MatchedRoute::from(path.as_str().to_owned()));
    response
}

/// The peer's address as the crates read it (from [`CappedListener`]'s [`Peer`], or
/// from a plain `TcpListener`'s `SocketAddr`).
async fn client_addr(mut request: Request, next: Next) -> Response {
    let extensions = request.extensions();
    let peer = match extensions.get::<ConnectInfo<Peer>>() {
        Some(ConnectInfo(Peer(addr))) => Some(*addr),
        None => extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0),
    };
    if let Some(addr) = peer {
        request.extensions_mut().insert(ClientAddr(addr));
    }
    next.run(request).await
}

/// A `TcpListener` for [`axum::serve()`] that keeps to [`ConnectionLimits`]: a connection
/// over the process's or its address's cap is answered with the canned 503 or 429 and
/// closed unread, and an admitted one holds its place until it closes (also as a
/// WebSocket). Serve with `into_make_service_with_connect_info::<Peer>()`.
#[derive(Debug)]
pub struct CappedListener {
    inner: tokio::net::TcpListener,
    limits: ConnectionLimits,
}

impl CappedListener {
    /// `inner`, admitting connections by `limits`.
    pub fn new(inner: tokio::net::TcpListener, limits: ConnectionLimits) -> Self {
        Self { inner, limits }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = HeldStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    if let Some(held) = self.limits.admit(stream, peer) {
                        return (held, peer);
                    }
                }
                Err(e) => {
                    // Out of file descriptors or a transient error: wait, don't spin.
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// The peer's address of a connection from a [`CappedListener`], as axum's
/// `ConnectInfo`.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, CappedListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, CappedListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

fn error(e: &(impl HttpError + ?Sized)) -> Response {
    error_response::<axum::body::Body>(e)
}

/// A path parameter, percent-decoded (`public%3Anews` is `public:news`); 400
/// `invalid_path` as JSON when it is not UTF-8.
struct Param(String);

impl<S: Send + Sync> FromRequestParts<S> for Param {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(param)) => Ok(Self(param)),
            Err(_) => Err(error(&ApiError::bad_request(
                "invalid_path",
                "a path segment is not UTF-8 once percent-decoded",
            ))),
        }
    }
}

/// The principal of the request's bearer token; 401 as JSON without a valid one.
struct Caller(Principal);

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &Arc<App>,
    ) -> Result<Self, Response> {
        match authenticate(app.verifier.as_ref(), &parts.headers).await {
            Ok(principal) => Ok(Self(principal)),
            Err(e) => Err(error(&e)),
        }
    }
}
