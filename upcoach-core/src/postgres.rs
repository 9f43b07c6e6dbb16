//! Postgres: the pool, the embedded migrations and a latency check.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::config::ServiceUrl;

/// The project's migrations, embedded at compile time from `upcoach-core/migrations`.
///
/// They create `users`, `user_identities`, `refresh_families`, `refresh_tokens`,
/// `data_deletion_requests`, `security_events`, `websocket_events` and `system_alerts`
/// in the first schema of the connection's
/// `search_path`; running them again is a no-op.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// What can go wrong talking to Postgres at start-up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The URL could not be turned into connection options.
    #[error("DATABASE_URL could not be used")]
    Options(#[source] sqlx::Error),
    /// No connection could be made in time.
    #[error("could not connect to Postgres at {url}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("applying the database migrations failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("Postgres query failed")]
    Query(#[source] sqlx::Error),
}

impl PgError {
    /// Whether trying again later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PgError::Connect { .. } | PgError::Query(_))
    }
}

/// Pool settings with defaults that suit one reference-server process.
#[derive(Debug, Clone)]
pub struct PgPoolConfig {
    /// Most connections (default 16).
    pub max_connections: u32,
    /// How long to wait for a connection before failing (default 5 s).
    pub acquire_timeout: Duration,
    /// Statements slower than this are marked slow in sqlx's statement events (default
    /// 1 s; the reference server uses `SLOW_QUERY_THRESHOLD`). They stay at `TRACE` like
    /// every other statement: sqlx's event carries the SQL text with its literals, which
    /// must not reach an ordinary log.
    pub slow_statement_threshold: Duration,
    /// How long one statement may run, waits for row locks included, before Postgres
    /// cancels it: the query then fails with SQLSTATE `57014` (`query_canceled`), which
    /// a store reports as it reports any failed statement (the refresh store: its
    /// retryable `refresh_store_unavailable`), and its connection goes back to the pool. Without it a transaction stuck while holding a lock would hold
    /// every request that needs the row, and their connections, for as long as it
    /// lasts. Default 10 s; `Duration::ZERO` leaves Postgres' own setting (by default
    /// no limit). Set on each connection as `statement_timeout`, in whole milliseconds
    /// (at least 1), in the connection's startup `options`; [`migrate`] lifts it for the
    /// migrations.
    ///
    /// A pooler between the server and Postgres may not pass startup options on:
    /// PgBouncer refuses a connection that sets a parameter it does not track, or drops
    /// the parameter when `ignore_startup_parameters` lists `options`. Behind one, set
    /// `Duration::ZERO` and put the limit on the database role instead
    /// (`ALTER ROLE app SET statement_timeout = '10s'`).
    pub statement_timeout: Duration,
}

impl Default for PgPoolConfig {
    fn default() -> Self {
        Self {
            max_connections: crate::config::DEFAULT_DATABASE_MAX_CONNECTIONS,
            acquire_timeout: Duration::from_secs(5),
            slow_statement_threshold: Duration::from_secs(1),
            statement_timeout: crate::config::DEFAULT_DATABASE_STATEMENT_TIMEOUT,
        }
    }
}

/// A [`PgPool`] that counts the tasks waiting for one of its connections.
///
/// sqlx's pool reports its size and idle connections, but not how many tasks are queued
/// for a connection: the queue is private, and nothing is reported when an acquire
/// starts. Every query of the upcoach crates therefore takes its connection through
/// [`MeteredPool::acquire`], which counts the caller from the moment it asks until it
/// holds a connection, fails or gives up (a dropped or timed-out acquire leaves the count
/// too). That count includes the brief moment of taking an idle connection and sqlx's
/// liveness check of it, so a pool with idle connections shows at most a few.
///
/// Clones share one count. Hand every store clones of the same `MeteredPool` so that
/// [`waiting`](Self::waiting) covers them all; each [`MeteredPool::new`] starts a count
/// of its own.
///
/// ```no_run
/// use upcoach_core::postgres::MeteredPool;
///
/// # async fn demo() -> Result<(), sqlx::Error> {
/// let pool = MeteredPool::new(sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?);
/// let mut conn = pool.acquire().await?;
/// sqlx::query("SELECT 1").execute(&mut *conn).await?;
/// println!("waiting for a connection: {}", pool.waiting());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MeteredPool {
    pool: PgPool,
    waiting: Arc<WaitCount>,
}

#[derive(Debug, Default)]
struct WaitCount {
    now: AtomicUsize,
    peak: AtomicUsize,
}

/// Counts one waiter for as long as it lives.
struct Waiter<'a>(&'a WaitCount);

impl WaitCount {
    fn enter(&self) -> Waiter<'_> {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Waiter(self)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
    }
}

impl MeteredPool {
    /// The pool as gauges: `db_pool_connections{state=idle|busy}`, `db_pool_waiters`
    /// and `db_pool_waiters_peak` (which [`take_peak_waiting`](Self::take_peak_waiting)
    /// resets).
    pub fn gauges(&self) -> [crate::health::Gauge; 4] {
        use crate::health::Gauge;
        let idle = self.num_idle() as f64;
        [
            Gauge::new("db_pool_connections", &[("state", "idle")], idle),
            Gauge::new(
                "db_pool_connections",
                &[("state", "busy")],
                f64::from(self.size()) - idle,
            ),
            Gauge::new("db_pool_waiters", &[], self.waiting() as f64),
            Gauge::new("db_pool_waiters_peak", &[], self.take_peak_waiting() as f64),
        ]
    }
}

impl MeteredPool {
    /// Counts the waiters of `pool`, starting from zero.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            waiting: Arc::default(),
        }
    }

    /// Takes a connection, counted in [`waiting`](Self::waiting) until it is held.
    ///
    /// Fails like [`PgPool::acquire`]: `PoolTimedOut` after the pool's acquire timeout,
    /// `PoolClosed` once the pool is closed.
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let _waiter = self.waiting.enter();
        self.pool.acquire().await
    }

    /// Tasks inside [`acquire`](Self::acquire) right now.
    pub fn waiting(&self) -> usize {
        self.waiting.now.load(Ordering::Relaxed)
    }

    /// The most tasks that were inside [`acquire`](Self::acquire) at once since the last
    /// call, which restarts the count from the present number. A ticker that samples
    /// [`waiting`](Self::waiting) every few seconds misses short queues; this does not.
    /// Give it one reader: two would split the intervals between them.
    pub fn take_peak_waiting(&self) -> usize {
        let now = self.waiting.now.load(Ordering::Relaxed);
        let peak = self.waiting.peak.swap(now, Ordering::Relaxed).max(now);
        // A waiter that arrived between the two reads must count in the next interval.
        self.waiting
            .peak
            .fetch_max(self.waiting.now.load(Ordering::Relaxed), Ordering::Relaxed);
        peak
    }

    /// Open connections, idle or in use.
    pub fn size(&self) -> u32 {
        self.pool.size()
    }

    /// Idle connections.
    pub fn num_idle(&self) -> usize {
        self.pool.num_idle()
    }

    /// The most connections the pool opens.
    pub fn max_connections(&self) -> u32 {
        self.pool.options().get_max_connections()
    }

    /// The pool itself, for what needs a [`PgPool`] (migrations, sqlx's own tooling).
    /// Connections taken through it directly are not counted.
    pub fn inner(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pool: waiters fail with `PoolClosed`, and this returns once every
    /// connection is closed.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Connects a pool to `url` and checks that a connection can be made.
pub async fn connect(url: &ServiceUrl, config: &PgPoolConfig) -> Result<MeteredPool, PgError> {
    let options: PgConnectOptions = url.expose().parse().map_err(PgError::Options)?;
    connect_with(options, config)
        .await
        .map(MeteredPool::new)
        .map_err(|source| PgError::Connect {
            url: url.redacted(),
            source,
        })
}

/// Connects a pool with explicit options (a test's schema, a proxy's port).
///
/// Every statement and every wait for a connection is reported to `tracing` (targets
/// `sqlx::query` and `sqlx::pool::acquire`) at `TRACE`, slow ones included (their SQL
/// text may hold literals), so a subscriber such as upcoach-perf's `SqlTimingLayer` can
/// time them all; with nobody listening at `TRACE` this costs nothing.
pub async fn connect_with(
    options: PgConnectOptions,
    config: &PgPoolConfig,
) -> Result<PgPool, sqlx::Error> {
    use log::LevelFilter;
    use sqlx::ConnectOptions;
    let mut options = options
        .log_statements(LevelFilter::Trace)
        .log_slow_statements(LevelFilter::Trace, config.slow_statement_threshold);
    if !config.statement_timeout.is_zero() {
        // Postgres reads a bare number as milliseconds; 0 would mean no limit.
        let ms = config.statement_timeout.as_millis().max(1);
        options = options.options([("statement_timeout", ms.to_string())]);
    }
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .acquire_time_level(LevelFilter::Trace)
        .connect_with(options)
        .await
}

/// Applies [`MIGRATOR`]: a no-op when everything is applied already.
///
/// The migrations run on one connection with no statement timeout
/// ([`PgPoolConfig::statement_timeout`]): building an index over a large table may take
/// longer than any request should. The connection's own limit is restored before it goes
/// back to the pool, or the connection is closed.
pub async fn migrate(pool: &PgPool) -> Result<(), PgError> {
    let mut conn = pool.acquire().await.map_err(PgError::Query)?;
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut *conn)
        .await
        .map_err(PgError::Query)?;
    let migrated = MIGRATOR.run(&mut *conn).await.map_err(PgError::Migrate);
    if sqlx::query("RESET statement_timeout")
        .execute(&mut *conn)
        .await
        .is_err()
    {
        // Not returned to the pool without its limit.
        let _ = sqlx::Connection::close(conn.detach()).await;
    }
    migrated
}

/// Round-trips `SELECT 1` and returns how long it took, the wait for a connection
/// included.
pub async fn ping(pool: &MeteredPool) -> Result<Duration, PgError> {
    let start = Instant::now();
    let mut conn = pool.acquire().await.map_err(PgError::Query)?;
    sqlx::query("SELECT 1")
        .execute(&mut *conn)
        .await
        .map_err(PgError::Query)?;
    Ok(start.elapsed())
}
