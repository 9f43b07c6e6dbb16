//! The application: backends chosen from the configuration, and the request service.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use upcoach_auth::config::MemoryAuthStores;
use upcoach_auth::http::AuthRoutes;
use upcoach_auth::refresh::spawn_purge;
use upcoach_auth::session::AccessTokens;
use upcoach_auth::sessions::Sessions;
use upcoach_auth::threat::{self, ThreatDetector};
use upcoach_cache::response::ResponseCache;
use upcoach_cache::{CacheRule, ResponseCacheLayer, TieredCache};
use upcoach_core::event::{AggregatingLog, EventLog, MemoryEventLog, PgEventLog};
use upcoach_core::health::{Gauge, SharedCheck};
use upcoach_core::http::protect::{RateLimit, RateLimitLayer};
use upcoach_core::limit::{MemoryLimiter, RateLimiter, RedisLimiter};
use upcoach_core::postgres::{self, MeteredPool, PgError, PgPoolConfig};
use upcoach_core::redis::{RedisConnectError, RedisConnection, RedisOptions};
use upcoach_core::{Clock, SystemClock};

use crate::config::ServerConfig;
use upcoach_perf::PerfSinks;
use upcoach_perf::slow::SlowQueryLog;
use upcoach_perf::{
    AlertEngine, AlertRule, MetricsSink, PerfMonitor, RequestMetrics, RequestTiming,
    RequestTimingLayer, RouteTable,
};
use upcoach_realtime::{Broadcaster, Hub, MemoryBroadcaster, RedisBroadcaster};

use crate::Body;

/// How the server was asked to run, beyond the environment.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--dev`: serve `POST /dev/token` with a signing key generated at start.
    pub dev: bool,
    /// The metrics sink and slow-query log to use, when the caller has already wired
    /// them into its `tracing` subscriber (see [`PerfSinks::sql_layer`]); made fresh
    /// otherwise, and then SQL statements are not timed.
    pub sinks: Option<PerfSinks>,
    /// Alert rules in place of [`AlertRule::defaults`] (the reference thresholds).
    pub alert_rules: Option<Vec<AlertRule>>,
    /// How often expired refresh-token families and tokens are deleted (default 10
    /// minutes, at least 1 ms; the first round runs one interval after start).
    pub refresh_purge_every: Option<Duration>,
}

/// The default of [`Options::refresh_purge_every`].
pub(crate) const REFRESH_PURGE_EVERY: Duration = Duration::from_secs(600);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// `--dev` was asked where it must not run: beyond loopback or behind https.
    #[error(transparent)]
    DevMode(#[from] upcoach_auth::config::DevModeError),
    /// Postgres is configured and could not be used.
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// Redis is configured and could not be reached.
    #[error(transparent)]
    Redis(#[from] RedisConnectError),
    /// `AUTH_SIGNING_KEY` or `AUTH_PREVIOUS_SIGNING_KEY` is not a base64url 32-byte seed.
    #[error(transparent)]
    SigningKey(#[from] upcoach_auth::config::InvalidSigningKey),
    /// A rate-limit rule could not be set up.
    #[error("rate limits: {0}")]
    Limits(String),
    /// A configured sign-in provider could not be set up (a bad key or URL).
    #[error("a configured sign-in provider could not be set up")]
    Provider(#[from] upcoach_auth::Error),
}

/// The backends in use, for the banner and `/health`.
#[derive(Debug, Clone)]
pub struct Backends {
    /// Postgres, when `DATABASE_URL` is set; every store shares this one pool, so its
    /// count of waiting tasks covers them all.
    pub postgres: Option<MeteredPool>,
    /// Redis, when `REDIS_URL` is set.
    pub redis: Option<RedisConnection>,
}

/// Everything a request handler can reach.
#[derive(Debug)]
pub struct App {
    pub(crate) config: ServerConfig,
    pub(crate) options: Options,
    pub(crate) backends: Backends,
    pub(crate) event_log: Arc<dyn EventLog>,
    /// Verifies bearer tokens (ours, or refuses all without a signing key).
    pub(crate) verifier: Arc<dyn upcoach_core::TokenVerifier>,
    pub(crate) cache: Arc<TieredCache>,
    response_cache: ResponseCacheLayer,
    limits: RateLimitLayer,
    pub(crate) perf: Arc<PerfMonitor>,
    pub(crate) slow_queries: Arc<SlowQueryLog>,
    pub(crate) started: Instant,
    /// `/health`'s Postgres, Redis and cache probes: each at most once a second.
    pub(crate) probes: [SharedCheck; 3],
    /// `/health`'s last body, kept while what it says stands.
    pub(crate) health_body: upcoach_core::http::KeptJson<crate::routes::Health>,
    pub(crate) hub: Hub,
    /// Sign-in, when the server has a signing key.
    pub(crate) auth: Option<AuthRoutes>,
    /// The bounded in-memory auth stores, when there is no Postgres.
    memory_auth: Option<MemoryAuthStores>,
    /// `GET /dashboard` and its files.
    pub(crate) dashboard: upcoach_dashboard::Dashboard,
    /// Background tasks to stop with the app.
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// How often the perf snapshot goes to the `metrics` room.
const METRICS_EVERY: Duration = Duration::from_secs(5);

impl App {
    /// Connects the configured backends (applying migrations on Postgres) and builds the
    /// application. Fails, naming the service, if a configured service does not answer.
    pub async fn start(config: ServerConfig, options: Options) -> Result<Arc<App>, StartError> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let mut tasks = Vec::new();

        let sinks = options
            .sinks
            .clone()
            .unwrap_or_else(|| PerfSinks::new(&config.perf));
        let prefix = &config.cache.prefix;
        let postgres = match &config.services.database_url {
            Some(url) => {
                let pool_config = PgPoolConfig {
                    max_connections: config.services.database_max_connections,
                    slow_statement_threshold: config.perf.slow_query_threshold,
                    statement_timeout: config.services.database_statement_timeout,
                    ..PgPoolConfig::default()
                };
                let pool = postgres::connect(url, &pool_config).await?;
                postgres::migrate(pool.inner()).await?;
                Some(pool)
            }
            None => None,
        };
        let redis = match &config.services.redis_url {
            Some(url) => {
                let redis = RedisConnection::connect(url, RedisOptions::default()).await?;
                tasks.push(redis.spawn_monitor(Duration::from_secs(5)));
                sinks.slow_queries.attach_redis(
                    redis.clone(),
                    format!("{prefix}:slow_queries"),
                    1000,
                );
                Some(redis)
            }
            None => None,
        };
        let rows: Arc<dyn EventLog> = match &postgres {
            Some(pool) => Arc::new(PgEventLog::new(pool.clone())),
            None => Arc::new(MemoryEventLog::default()),
        };
        // Floods of anonymous failures become counts, so the queue keeps real events.
        let aggregated = Arc::new(AggregatingLog::new(rows, Default::default(), clock.clone()));
        tasks.push(aggregated.spawn_closer(Duration::from_secs(15)));
        let security_feed = aggregated.subscribe();
        let limiter: Arc<dyn RateLimiter> = match &redis {
            Some(redis) => Arc::new(RedisLimiter::new(redis.clone(), format!("{prefix}:limit"))),
            None => Arc::new(MemoryLimiter::new()),
        };
        let cache = TieredCache::on(redis.as_ref(), &config.cache);
        let broadcaster: Arc<dyn Broadcaster> = match redis
            .as_ref()
            .and_then(|r| RedisBroadcaster::on(r, prefix, clock.clone()))
        {
            Some(redis) => Arc::new(redis),
            None => Arc::new(MemoryBroadcaster::new(Default::default(), clock.clone())),
        };
        // Threat detection sees every security event before aggregation thins them; its
        // alerts go to the `alerts` and `security` rooms and block the offender a while.
        let rooms = broadcaster.clone();
        let publisher = threat::room_publisher(move |room, event, data| {
            let rooms = rooms.clone();
            async move { rooms.publish(room, event, data).await }
        });
        let detector = ThreatDetector::builder(aggregated)
            .config(config.threat.clone())
            .redis(redis.as_ref(), prefix)
            .limiter(limiter.clone())
            .publisher(publisher)
            .clock(clock.clone())
            .build();
        let event_log: Arc<dyn EventLog> = detector.clone();
        let tokens = if options.dev {
            Some(config.auth.dev_access_tokens(config.addr, clock.clone())?)
        } else {
            config.auth.access_tokens(clock.clone())?
        }
        .map(Arc::new);
        let verifier: Arc<dyn upcoach_core::TokenVerifier> = match &tokens {
            Some(tokens) => tokens.clone(),
            None => Arc::new(upcoach_core::token::RefuseAll {
                reason: "this server issues no tokens (no signing key; start it with --dev)",
            }),
        };
        let hub_verifier = verifier.clone();
        let hub = Hub::builder(broadcaster, verifier.clone())
            .events(event_log.clone())
            .clock(clock.clone())
            .config(config.realtime.clone())
            .build();
        let perf = Arc::new(PerfMonitor::new(
            Arc::new(RequestMetrics::new(
                RouteTable::new(crate::router::templates())
                    .expect("the server's route templates are valid"),
            )),
            sinks.metrics.clone(),
            AlertEngine::new(
                options
                    .alert_rules
                    .clone()
                    .unwrap_or_else(AlertRule::defaults),
                event_log.clone(),
                clock.clone(),
            ),
        ));
        perf.tick(&Default::default());
        let stores = config.auth.stores(postgres.as_ref());
        let memory_auth = stores.memory.clone();
        tasks.push(perf.spawn(Duration::from_secs(5), {
            let memory_auth = memory_auth.clone();
            let metrics = perf.metrics().clone();
            let postgres = postgres.clone();
            let redis = redis.clone();
            let cache = cache.clone();
            let hub = hub.clone();
            let slow_queries = sinks.slow_queries.clone();
            let detector = detector.clone();
            move || {
                let sink: &dyn MetricsSink = &*metrics;
                let (stats, realtime) = (cache.stats(), hub.stats());
                let skipped = slow_queries.redis_skipped() as f64;
                let gauges = (stats.gauges().into_iter())
                    .chain(realtime.gauges())
                    .chain(postgres.iter().flat_map(MeteredPool::gauges))
                    .chain(redis.iter().flat_map(RedisConnection::gauges))
                    .chain(detector.stats().gauges())
                    .chain(memory_auth.iter().flat_map(MemoryAuthStores::gauges))
                    .chain([Gauge::new("slow_queries_redis_skipped", &[], skipped)]);
                for gauge in gauges {
                    sink.set_gauge(gauge.name, gauge.labels, gauge.value);
                }
                let mut values = std::collections::HashMap::new();
                if stats.l1_hits + stats.l2_hits + stats.misses
                    >= upcoach_perf::MIN_REQUESTS_FOR_ERROR_RATE
                {
                    values.insert(upcoach_perf::alert::metrics::CACHE_HIT_RATE, stats.hit_rate);
                }
                let open = realtime.ws_connections + realtime.sse_connections;
                values.insert(
                    upcoach_perf::alert::metrics::ACTIVE_CONNECTIONS,
                    open as f64,
                );
                values
            }
        }));

        let auth = match tokens {
            None => None,
            Some(tokens) => {
                let sessions = Sessions::builder(tokens, config.public_url())
                    .stores(&stores)
                    .redis(redis.as_ref(), prefix)
                    .events(event_log.clone())
                    .clock(clock.clone())
                    .configure(&config.auth)
                    .await?;
                Some(AuthRoutes::new(Arc::new(sessions.build())))
            }
        };
        // Expired refresh families and tokens, counted in `refresh_purged_total{what}`.
        let (metrics, every) = (sinks.metrics.clone(), options.refresh_purge_every);
        let every = every.unwrap_or(REFRESH_PURGE_EVERY);
        tasks.push(spawn_purge(
            stores.refresh,
            clock.clone(),
            every,
            move |purged| {
                for (what, n) in [("families", purged.families), ("tokens", purged.tokens)] {
                    metrics.increment_counter("refresh_purged_total", &[("what", what)], n);
                }
            },
        ));
        let alerts = perf.alerts().subscribe();
        // A button per configured provider, and under `--dev` the dev token.
        let dashboard = upcoach_dashboard::Dashboard::new(&upcoach_dashboard::DashboardConfig {
            providers: (auth.as_ref()).map_or_else(Vec::new, |a| a.sessions().provider_names()),
            dev_sign_in: options.dev && auth.is_some(),
        });
        let limits = RateLimitLayer::builder(limiter)
            .config(&config.limits)
            .verifier(verifier.clone())
            .events(event_log.clone())
            .clock(clock.clone())
            .build()
            .map_err(StartError::Limits)?;
        let app = App {
            limits,
            config,
            options,
            backends: Backends { postgres, redis },
            event_log,
            response_cache: {
                let rule = CacheRule::new(
                    "/api/analytics",
                    Duration::from_secs(300),
                    &["analytics", "dashboard"],
                )
                .per_user()
                // A hit skips the handler's admin check: the layer repeats it.
                .authorize(|principal| principal.is_admin());
                ResponseCacheLayer::new(cache.clone(), vec![rule]).with_verifier(verifier)
            },
            cache,
            verifier: hub_verifier,
            perf,
            slow_queries: sinks.slow_queries,
            started: Instant::now(),
            probes: std::array::from_fn(|_| SharedCheck::new(Duration::from_secs(1))),
            health_body: upcoach_core::http::KeptJson::default(),
            hub,
            auth,
            memory_auth,
            dashboard,
            tasks: std::sync::Mutex::new(tasks),
        };
        app.banner();
        let app = Arc::new(app);
        app.spawn_publishers(alerts, security_feed);
        Ok(app)
    }

    /// Publishes the perf snapshot to `metrics` every 5 s, each alert transition to
    /// `alerts` and each kept security event to `security`. The tasks hold the app
    /// weakly and end with it.
    fn spawn_publishers(
        self: &Arc<Self>,
        alerts: tokio::sync::broadcast::Receiver<upcoach_perf::AlertTransition>,
        security: tokio::sync::broadcast::Receiver<upcoach_core::event::SecurityEvent>,
    ) {
        let weak = Arc::downgrade(self);
        let snapshots = self
            .hub
            .spawn_every(METRICS_EVERY, "metrics", "metrics", move || {
                weak.upgrade()
                    .map(|app| crate::routes::realtime_snapshot(&app))
            });
        let transitions = self.hub.spawn_forward(alerts, "alerts", "alert");
        let security = self
            .hub
            .spawn_forward(security, "security", "security_event");
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.extend([snapshots, transitions, security]);
    }

    /// The realtime hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    fn banner(&self) {
        let describe = |url: Option<&upcoach_core::config::ServiceUrl>| match url {
            Some(url) => url.redacted(),
            None => "in-memory".to_owned(),
        };
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            postgres = %describe(self.config.services.database_url.as_ref()),
            redis = %describe(self.config.services.redis_url.as_ref()),
            dev = self.options.dev,
            performance_monitoring = self.config.perf.enabled,
            "upcoach reference server configured (an in-memory backend shares nothing with \
             other processes and keeps nothing across a restart)"
        );
    }

    /// The configuration in use.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The backends in use.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// The access-token issuer and verifier, when the server has a signing key (or
    /// `--dev`).
    pub fn access_tokens(&self) -> Option<&AccessTokens> {
        self.auth
            .as_ref()
            .map(|auth| auth.sessions().tokens().as_ref())
    }

    /// The sign-in service, when the server has a signing key (or `--dev`).
    pub fn sessions(&self) -> Option<&Arc<upcoach_auth::sessions::Sessions>> {
        self.auth.as_ref().map(AuthRoutes::sessions)
    }

    /// The bounded in-memory user and refresh-token stores, when there is no Postgres.
    pub fn memory_auth(&self) -> Option<&MemoryAuthStores> {
        self.memory_auth.as_ref()
    }

    /// The tiered cache (L2 in Redis when configured, in memory otherwise).
    pub fn cache(&self) -> &Arc<TieredCache> {
        &self.cache
    }

    /// The audit event log in use.
    pub fn event_log(&self) -> &Arc<dyn EventLog> {
        &self.event_log
    }

    /// The performance monitor.
    pub fn perf(&self) -> &Arc<PerfMonitor> {
        &self.perf
    }

    /// The request service, for [`serve`](crate::serve): the timing layer (a
    /// pass-through when `PERFORMANCE_MONITORING_ENABLED=false`), then rate limits, then
    /// the response cache and the routes.
    pub fn service(self: &Arc<Self>) -> HttpService {
        use tower_layer::Layer;
        let timing = if self.config.perf.enabled {
            RequestTimingLayer::new(self.perf.requests().clone())
        } else {
            RequestTimingLayer::disabled()
        };
        let routes = self.response_cache.layer(AppService { app: self.clone() });
        let service = timing.layer(self.limits.layer(routes));
        upcoach_core::http::serve::ConnectionService::new(service)
    }

    /// How [`serve`](crate::serve) should run this app: with its connection caps.
    pub fn serve_options(&self) -> crate::ServeOptions {
        crate::ServeOptions {
            limits: Some(self.config.limits.connection_limits()),
            ..crate::ServeOptions::default()
        }
    }

    /// The rate-limit layer, for its rules and counters.
    pub fn limits(&self) -> &RateLimitLayer {
        &self.limits
    }

    /// Stops background tasks and writes what the event log still holds, waiting at most
    /// `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        match tokio::time::timeout(timeout, self.event_log.flush()).await {
            Ok(Ok(())) => tracing::info!("event log flushed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "event log flush failed"),
            Err(_) => tracing::warn!(
                queued = self.event_log.stats().queued,
                "event log not flushed in time; queued events are lost"
            ),
        }
    }
}

/// The service [`App::service`] hands to hyper.
pub type HttpService = upcoach_core::http::serve::ConnectionService<
    RequestTiming<RateLimit<ResponseCache<AppService>>>,
>;

/// The routes of an [`App`], as a tower service.
#[derive(Debug, Clone)]
pub struct AppService {
    app: Arc<App>,
}

impl tower_service::Service<http::Request<Incoming>> for AppService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = crate::router::RouteFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        crate::router::handle(&self.app, request)
    }
}
