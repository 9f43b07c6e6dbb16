//! Postgres: the pool, the embedded migrations and a latency check.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::ServiceUrl;

/// The project's migrations, embedded at compile time from `upcoach-core/migrations`.
///
/// They create `users`, `user_identities`, `refresh_tokens`, `security_events`,
/// `websocket_events` and `system_alerts` in the first schema of the connection's
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
}

impl Default for PgPoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            slow_statement_threshold: Duration::from_secs(1),
        }
    }
}

/// Connects a pool to `url` and checks that a connection can be made.
pub async fn connect(url: &ServiceUrl, config: &PgPoolConfig) -> Result<PgPool, PgError> {
    let options: PgConnectOptions = url.expose().parse().map_err(PgError::Options)?;
    connect_with(options, config)
        .await
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
    let options = options
        .log_statements(LevelFilter::Trace)
        .log_slow_statements(LevelFilter::Trace, config.slow_statement_threshold);
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .acquire_time_level(LevelFilter::Trace)
        .connect_with(options)
        .await
}

/// Applies [`MIGRATOR`]: a no-op when everything is applied already.
pub async fn migrate(pool: &PgPool) -> Result<(), PgError> {
    MIGRATOR.run(pool).await.map_err(PgError::Migrate)
}

/// Round-trips `SELECT 1` and returns how long it took.
pub async fn ping(pool: &PgPool) -> Result<Duration, PgError> {
    let start = Instant::now();
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map_err(PgError::Query)?;
    Ok(start.elapsed())
}
