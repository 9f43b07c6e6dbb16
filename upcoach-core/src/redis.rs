//! [`RedisConnection`]: one multiplexed Redis connection that reconnects by itself and
//! reports its state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::ServiceUrl;

/// Whether the connection last worked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisState {
    /// Not used yet.
    Unknown,
    /// The last command or ping succeeded.
    Connected,
    /// The last command or ping failed; the manager reconnects on the next use.
    Disconnected,
}

impl RedisState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => RedisState::Connected,
            2 => RedisState::Disconnected,
            _ => RedisState::Unknown,
        }
    }

    /// `unknown`, `connected` or `disconnected`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisState::Unknown => "unknown",
            RedisState::Connected => "connected",
            RedisState::Disconnected => "disconnected",
        }
    }
}

/// Timeouts and retries of a [`RedisConnection`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// How long one connection attempt may take (default 2 s).
    pub connection_timeout: Duration,
    /// How long one command may wait for its answer (default 2 s).
    pub response_timeout: Duration,
    /// Reconnection attempts per failure before the error reaches the caller (default 3;
    /// the next command starts over).
    pub reconnect_retries: usize,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            connection_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            reconnect_retries: 3,
        }
    }
}

/// What can go wrong connecting to Redis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisConnectError {
    /// The URL is not usable by the client.
    #[error("REDIS_URL could not be used")]
    Url(#[source] redis::RedisError),
    /// No connection could be made.
    #[error("could not connect to Redis at {url}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// Why.
        #[source]
        source: redis::RedisError,
    },
}

/// A self-reconnecting, multiplexed Redis connection (the `redis` crate's
/// [`ConnectionManager`]) that remembers whether it last worked.
///
/// Clone the [`manager`](Self::manager) into each component: clones share one TCP
/// connection with no lock around it. Call [`spawn_monitor`](Self::spawn_monitor) so
/// the state stays current (and a dead connection is replaced) even when idle.
///
/// ```no_run
/// use upcoach_core::config::ServiceUrl;
/// use upcoach_core::redis::{RedisConnection, RedisOptions, RedisState};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let url = ServiceUrl::parse("redis://127.0.0.1:6379", &["redis"])?;
/// let redis = RedisConnection::connect(&url, RedisOptions::default()).await?;
/// let latency = redis.ping().await?;
/// assert_eq!(redis.state(), RedisState::Connected);
/// let mut conn = redis.manager();
/// let _: () = redis::cmd("SET").arg("greeting").arg("hi").query_async(&mut conn).await?;
/// # let _ = latency; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisConnection {
    manager: ConnectionManager,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: AtomicU8,
    last_latency_micros: AtomicU64,
    url: String,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field("url", &self.shared.url)
            .field("state", &self.state())
            .finish()
    }
}

impl RedisConnection {
    /// Connects to `url`, failing if Redis does not answer within the connection timeout.
    pub async fn connect(
        url: &ServiceUrl,
        options: RedisOptions,
    ) -> Result<Self, RedisConnectError> {
        let client = redis::Client::open(url.expose()).map_err(RedisConnectError::Url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connection_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(options.reconnect_retries)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|source| RedisConnectError::Connect {
                url: url.redacted(),
                source,
            })?;
        let shared = Arc::new(Shared {
            state: AtomicU8::new(1),
            last_latency_micros: AtomicU64::new(0),
            url: url.redacted(),
        });
        Ok(Self { manager, shared })
    }

    /// A handle to the shared connection, to run commands on.
    pub fn manager(&self) -> ConnectionManager {
        self.manager.clone()
    }

    /// Sends `PING`, records the outcome in [`state`](Self::state) and returns the
    /// round-trip time.
    pub async fn ping(&self) -> Result<Duration, redis::RedisError> {
        let mut conn = self.manager.clone();
        let start = Instant::now();
        let result: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
        let elapsed = start.elapsed();
        self.observe(result.as_ref().map(|_| ()).map_err(|e| e.to_string()).err());
        result.map(|_| {
            self.shared
                .last_latency_micros
                .store(elapsed.as_micros() as u64, Ordering::Relaxed);
            elapsed
        })
    }

    /// Records the outcome of a command run elsewhere on [`manager`](Self::manager), so
    /// the state follows real traffic; logs each change of state.
    pub fn observe(&self, error: Option<String>) {
        let new = if error.is_none() {
            RedisState::Connected
        } else {
            RedisState::Disconnected
        };
        let old = RedisState::from_u8(self.shared.state.swap(new as u8, Ordering::Relaxed));
        if old != new {
            match error {
                Some(error) => {
                    tracing::warn!(url = %self.shared.url, %error, "Redis connection lost; reconnecting on next use")
                }
                None => tracing::info!(url = %self.shared.url, "Redis connection is back"),
            }
        }
    }

    /// Whether the connection last worked.
    pub fn state(&self) -> RedisState {
        RedisState::from_u8(self.shared.state.load(Ordering::Relaxed))
    }

    /// The round-trip time of the last successful [`ping`](Self::ping).
    pub fn last_latency(&self) -> Duration {
        Duration::from_micros(self.shared.last_latency_micros.load(Ordering::Relaxed))
    }

    /// Pings every `every` in the background, so the state is current and a broken
    /// connection is replaced before the next caller needs it. Stops when the returned
    /// handle is aborted or the runtime ends.
    pub fn spawn_monitor(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let _ = this.ping().await;
            }
        })
    }
}
