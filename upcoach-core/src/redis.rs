//! [`RedisConnection`]: one multiplexed Redis connection (to a single node or to a
//! Redis Cluster) that reconnects by itself, replaces a link that went silent, and
//! reports its state; [`PubSubSource`]: where its pub/sub connections come from.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

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
/// [`ConnectionManager`], or its [`ClusterConnection`] for a Redis Cluster) that replaces
/// a link gone silent and remembers whether it last worked.
///
/// - **Redis Cluster**: [`connect`](Self::connect) to a `redis+cluster://` URL (see
///   [`ServiceUrl::cluster_seeds`]) and every command is routed to the node that owns its
///   keys; the cluster's own redirections (`MOVED`, `ASK`) and failovers are followed.
///   Keys that one command or script touches together must share a hash tag
///   (`{...}`), as every upcoach component's keys do. A pipeline whose commands fall in
///   different slots (and is not a transaction) is split by the slot of each command's
///   first key and its parts sent concurrently, each in order; the answers come back in
///   the pipeline's order.
/// - **Commands**: it implements [`ConnectionLike`], so `query_async(&mut conn)`, pipelines
///   and scripts run on it directly. Clones share one multiplexed TCP connection (each
///   command only takes a read lock long enough to clone a handle); clone it into each
///   component.
/// - **Closed links** (reset, refused, EOF) are reconnected by the manager on the next
///   command.
/// - **Silent links** (the socket stays open but nothing comes back: a half-open
///   connection, a stuck proxy, a paused server) time commands out without ever closing,
///   and the manager would keep using them. Once [`STALL_TIMEOUTS`] commands in a row
///   have timed out on the link in use, and nothing has succeeded on it for twice the
///   response timeout (a merely slow server answers something in that time), a fresh
///   manager is connected in the background and takes over (counted in
///   [`replacements`](Self::replacements)). Until then commands keep failing, each after
///   the response timeout.
/// - **State**: call [`spawn_monitor`](Self::spawn_monitor) so the state stays current,
///   and a dead or silent link is replaced, even while idle. Its pings are also what
///   notices a silent link when every other caller gives up sooner than the response
///   timeout (as the tiered cache does): a command cut off by its caller is not counted.
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
/// let mut conn = redis.clone();
/// let _: () = redis::cmd("SET").arg("greeting").arg("hi").query_async(&mut conn).await?;
///
/// // The same on a three-node cluster:
/// let url = ServiceUrl::parse(
///     "redis+cluster://127.0.0.1:7001?addr=127.0.0.1:7002&addr=127.0.0.1:7003",
///     &["redis", "redis+cluster"],
/// )?;
/// let cluster = RedisConnection::connect(&url, RedisOptions::default()).await?;
/// assert!(cluster.is_cluster());
/// # let _ = latency; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisConnection {
    shared: Arc<Shared>,
}

/// Commands timing out in a row before a [`RedisConnection`] replaces its link.
pub const STALL_TIMEOUTS: u32 = 3;

#[derive(Debug)]
struct Shared {
    /// The manager in use and its generation (bumped by each replacement), so that
    /// late answers on a replaced link are not held against its successor.
    current: RwLock<(u64, Link)>,
    /// What a replacement is made from; `None` for a connection made from a bare
    /// manager, which cannot be replaced.
    origin: Option<Origin>,
    /// Where pub/sub connections come from; `None` for a bare manager.
    pubsub: Option<PubSubSource>,
    state: AtomicU8,
    last_latency_micros: AtomicU64,
    url: String,
    timeouts: AtomicU32,
    /// When a command last succeeded, in microseconds since `born`.
    last_success_micros: AtomicU64,
    born: Instant,
    replacing: AtomicBool,
    replacements: AtomicU64,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field("url", &self.shared.url)
            .field("state", &self.state())
            .field("replacements", &self.replacements())
            .finish()
    }
}

impl RedisConnection {
    /// Where this connection's users open pub/sub connections of their own (one node of
    /// a cluster at a time: Redis Cluster carries `PUBLISH` to every node); `None` for
    /// one made from a bare manager.
    pub fn pubsub(&self) -> Option<&PubSubSource> {
        self.shared.pubsub.as_ref()
    }

    /// Whether this connection is to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.current().1, Link::Cluster(_))
    }

    /// The link as gauges: `redis_connected` (1 or 0) and `redis_links_replaced`.
    pub fn gauges(&self) -> [crate::health::Gauge; 2] {
        use crate::health::Gauge;
        let connected = self.state() == RedisState::Connected;
        [
            Gauge::new("redis_connected", &[], if connected { 1.0 } else { 0.0 }),
            Gauge::new("redis_links_replaced", &[], self.replacements() as f64),
        ]
    }
}

impl RedisConnection {
    /// Connects to `url`, failing if Redis does not answer within the connection timeout.
    ///
    /// A `redis+cluster://` URL connects to a Redis Cluster through its seed nodes (see
    /// [`ServiceUrl::cluster_seeds`]); any `redis://` or socket URL to one node.
    pub async fn connect(
        url: &ServiceUrl,
        options: RedisOptions,
    ) -> Result<Self, RedisConnectError> {
        let connected = if url.is_cluster() {
            let seeds = url.cluster_seeds().map_err(|reason| {
                RedisConnectError::Url(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "invalid redis+cluster:// URL",
                    reason.to_owned(),
                )))
            })?;
            let seeds = seeds
                .iter()
                .map(|seed| redis::Client::open(seed.expose()))
                .collect::<RedisResult<Vec<_>>>()
                .map_err(RedisConnectError::Url)?;
            Self::from_cluster_seeds(seeds, options, url.redacted()).await
        } else {
            let client = redis::Client::open(url.expose()).map_err(RedisConnectError::Url)?;
            Self::from_client(client, options, url.redacted()).await
        };
        connected.map_err(|source| RedisConnectError::Connect {
            url: url.redacted(),
            source,
        })
    }

    /// Connects to the Redis Cluster that `seeds` belong to (any of its nodes; the rest
    /// are found from them); `name` (no password in it) is what logs call it.
    pub async fn from_cluster_seeds(
        seeds: Vec<redis::Client>,
        options: RedisOptions,
        name: impl Into<String>,
    ) -> RedisResult<Self> {
        let infos: Vec<redis::ConnectionInfo> = seeds
            .iter()
            .map(|seed| seed.get_connection_info().clone())
            .collect();
        let client = ClusterClient::builder(infos)
            .connection_timeout(options.connection_timeout)
            .response_timeout(options.response_timeout)
            .retries(options.reconnect_retries.min(u32::MAX as usize) as u32)
            .build()?;
        let connection = client.get_async_connection().await?;
        let pubsub = PubSubSource::from_nodes(seeds)?;
        Ok(Self::with_parts(
            Link::Cluster(connection),
            Some(Origin::Cluster(client, options.response_timeout)),
            Some(pubsub),
            name.into(),
        ))
    }

    /// Connects with a client made elsewhere; `name` (no password in it) is what logs
    /// call this connection.
    pub async fn from_client(
        client: redis::Client,
        options: RedisOptions,
        name: impl Into<String>,
    ) -> RedisResult<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connection_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(options.reconnect_retries)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
        Ok(Self::with_parts(
            Link::Single(manager),
            Some(Origin::Single(client.clone(), config)),
            Some(PubSubSource::from(client)),
            name.into(),
        ))
    }

    /// Uses a manager made elsewhere as it is. Closed links are reconnected by the
    /// manager, but a link gone silent cannot be replaced, since the manager does not
    /// say how it was made: prefer [`connect`](Self::connect) or
    /// [`from_client`](Self::from_client).
    pub fn from_manager(manager: ConnectionManager) -> Self {
        Self::with_parts(
            Link::Single(manager),
            None,
            None,
            "a given ConnectionManager".into(),
        )
    }

    fn with_parts(
        link: Link,
        origin: Option<Origin>,
        pubsub: Option<PubSubSource>,
        url: String,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                current: RwLock::new((0, link)),
                origin,
                pubsub,
                state: AtomicU8::new(1),
                last_latency_micros: AtomicU64::new(0),
                url,
                timeouts: AtomicU32::new(0),
                last_success_micros: AtomicU64::new(0),
                born: Instant::now(),
                replacing: AtomicBool::new(false),
                replacements: AtomicU64::new(0),
            }),
        }
    }

    /// The link in use and its generation.
    fn current(&self) -> (u64, Link) {
        self.shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Links replaced after going silent, since start.
    pub fn replacements(&self) -> u64 {
        self.shared.replacements.load(Ordering::Relaxed)
    }

    /// Counts the outcome of a command sent on generation `generation`: a run of
    /// [`STALL_TIMEOUTS`] timeouts with no success for twice the response timeout starts
    /// a replacement. Answers from a replaced generation are ignored.
    fn after<T>(&self, generation: u64, result: &RedisResult<T>) {
        let shared = &self.shared;
        let current = shared.current.read().unwrap_or_else(|e| e.into_inner()).0;
        if current != generation {
            return;
        }
        match result {
            Err(e) if e.is_timeout() => {
                let n = shared.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
                let now = shared.born.elapsed().as_micros() as u64;
                let quiet = now.saturating_sub(shared.last_success_micros.load(Ordering::Relaxed));
                let patience = shared
                    .origin
                    .as_ref()
                    .and_then(Origin::response_timeout)
                    .unwrap_or(Duration::from_secs(1))
                    * 2;
                if n >= STALL_TIMEOUTS && quiet >= patience.as_micros() as u64 {
                    self.replace(generation);
                }
            }
            // An answer, even an error reply, shows the link is alive; a closed link is
            // the manager's to reconnect.
            _ => {
                if result.is_ok() || !result.as_ref().is_err_and(|e| e.is_io_error()) {
                    shared
                        .last_success_micros
                        .store(shared.born.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                if shared.timeouts.load(Ordering::Relaxed) != 0 {
                    shared.timeouts.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// Connects a fresh manager in the background and swaps it in for generation
    /// `generation`; at most one attempt at a time, and none for a connection made from a
    /// bare manager. A failed attempt starts the count of timeouts over.
    fn replace(&self, generation: u64) {
        let Some(origin) = self.shared.origin.clone() else {
            return;
        };
        if self.shared.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.shared.replacing.store(false, Ordering::Release);
            return;
        };
        let shared = self.shared.clone();
        runtime.spawn(async move {
            match origin.connect().await {
                Ok(fresh) => {
                    let old = {
                        let mut current =
                            shared.current.write().unwrap_or_else(|e| e.into_inner());
                        if current.0 == generation {
                            Some(std::mem::replace(&mut *current, (generation + 1, fresh)))
                        } else {
                            None
                        }
                    };
                    if old.is_some() {
                        shared.timeouts.store(0, Ordering::Relaxed);
                        shared.replacements.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(url = %shared.url, "Redis link went silent (commands kept timing out); replaced it with a new connection");
                    }
                    // The old manager (and its link) goes here, outside the lock.
                    drop(old);
                }
                Err(error) => {
                    shared.timeouts.store(0, Ordering::Relaxed);
                    tracing::warn!(url = %shared.url, %error, "replacing a silent Redis link failed; trying again after the next timeouts");
                }
            }
            shared.replacing.store(false, Ordering::Release);
        });
    }

    /// Sends `PING`, records the outcome in [`state`](Self::state) and returns the
    /// round-trip time.
    pub async fn ping(&self) -> Result<Duration, redis::RedisError> {
        let mut conn = self.clone();
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

    /// Records the outcome of a command run elsewhere on this connection, so the state
    /// follows real traffic; logs each change of state.
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

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut link) = self.current();
            let result = match &mut link {
                Link::Single(manager) => manager.send_packed_command(cmd).await,
                Link::Cluster(cluster) => cluster.req_packed_command(cmd).await,
            };
            self.after(generation, &result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut link) = self.current();
            let result = match &mut link {
                Link::Single(manager) => {
                    manager.send_packed_commands(pipeline, offset, count).await
                }
                Link::Cluster(cluster) => {
                    match cluster.req_packed_commands(pipeline, offset, count).await {
                        // The cluster client refuses a pipeline that spans slots before
                        // sending any of it (answers of commands it sent come back as
                        // values, not as this error), so nothing has run yet.
                        Err(e)
                            if e.kind()
                                == redis::ErrorKind::Server(redis::ServerErrorKind::CrossSlot)
                                && !pipeline.is_transaction() =>
                        {
                            split_by_slot(cluster, pipeline).await
                        }
                        other => other,
                    }
                }
            };
            self.after(generation, &result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        match &self.current().1 {
            Link::Single(manager) => manager.get_db(),
            Link::Cluster(_) => 0,
        }
    }
}

/// Runs a pipeline that spans slots as one pipeline per slot (of each command's first
/// key), concurrently, each keeping its commands' order; the answers are put back in
/// the pipeline's order.
async fn split_by_slot(
    cluster: &ClusterConnection,
    pipeline: &Pipeline,
) -> RedisResult<Vec<Value>> {
    let mut parts: Vec<(Option<Slot>, Pipeline, Vec<usize>)> = Vec::new();
    for (index, cmd) in pipeline.cmd_iter().enumerate() {
        let slot = match cmd.args_iter().nth(1) {
            Some(redis::Arg::Simple(key)) => Some(Slot::for_key(key)),
            _ => None,
        };
        let part = match parts.iter().position(|(s, _, _)| *s == slot) {
            Some(found) => found,
            None => {
                parts.push((slot, Pipeline::new(), Vec::new()));
                parts.len() - 1
            }
        };
        parts[part].1.add_command(cmd.clone());
        parts[part].2.push(index);
    }
    let answers = futures_util::future::try_join_all(parts.iter().map(|(_, part, _)| async move {
        cluster
            .clone()
            .req_packed_commands(part, 0, part.len())
            .await
    }))
    .await?;
    let mut ordered = vec![Value::Nil; pipeline.len()];
    for ((_, _, indices), values) in parts.iter().zip(answers) {
        if values.len() != indices.len() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "a split pipeline part answered the wrong number of times",
            )));
        }
        for (index, value) in indices.iter().zip(values) {
            ordered[*index] = value;
        }
    }
    Ok(ordered)
}

/// The link a [`RedisConnection`] sends on.
#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Single(_) => "Link::Single",
            Link::Cluster(_) => "Link::Cluster",
        })
    }
}

/// What a replacement link is made from.
#[derive(Clone)]
enum Origin {
    Single(redis::Client, ConnectionManagerConfig),
    Cluster(ClusterClient, Duration),
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Single(..) => "Origin::Single",
            Origin::Cluster(..) => "Origin::Cluster",
        })
    }
}

impl Origin {
    fn response_timeout(&self) -> Option<Duration> {
        match self {
            Origin::Single(_, config) => config.response_timeout(),
            Origin::Cluster(_, timeout) => Some(*timeout),
        }
    }

    async fn connect(self) -> RedisResult<Link> {
        match self {
            Origin::Single(client, config) => ConnectionManager::new_with_config(client, config)
                .await
                .map(Link::Single),
            Origin::Cluster(client, _) => client.get_async_connection().await.map(Link::Cluster),
        }
    }
}

/// Where pub/sub connections come from: one node, or the nodes of a Redis Cluster tried
/// in turn (each attempt starts at the node after the last one tried, so a node that is
/// down costs one attempt, not every one). On a cluster, `PUBLISH` reaches subscribers on
/// every node, so any one node will do.
///
/// ```no_run
/// use upcoach_core::redis::PubSubSource;
///
/// # async fn demo() -> redis::RedisResult<()> {
/// let source = PubSubSource::from(redis::Client::open("redis://127.0.0.1:6379")?);
/// let mut pubsub = source.open().await?;
/// pubsub.subscribe("news").await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PubSubSource {
    nodes: Arc<[redis::Client]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
}

impl PubSubSource {
    /// The nodes of one cluster, tried in turn; an error when there are none.
    pub fn from_nodes(nodes: Vec<redis::Client>) -> RedisResult<Self> {
        if nodes.is_empty() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no Redis node to open pub/sub connections on",
            )));
        }
        Ok(Self {
            nodes: nodes.into(),
            next: Arc::default(),
        })
    }

    /// Opens a pub/sub connection on the next node that accepts one.
    pub async fn open(&self) -> RedisResult<redis::aio::PubSub> {
        let count = self.nodes.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for i in 0..count {
            match self.nodes[(start + i) % count].get_async_pubsub().await {
                Ok(pubsub) => {
                    self.next.store(start + i + 1, Ordering::Relaxed);
                    return Ok(pubsub);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no Redis node to open pub/sub connections on",
            ))
        }))
    }
}

impl From<redis::Client> for PubSubSource {
    fn from(client: redis::Client) -> Self {
        Self {
            nodes: Arc::new([client]),
            next: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout() -> redis::RedisError {
        std::io::Error::from(std::io::ErrorKind::TimedOut).into()
    }

    /// A connection to `REDIS_URL` with 100 ms timeouts; `None` (skip) when unset,
    /// unless `UPCOACH_REQUIRE_SERVICES=1`.
    async fn connection() -> Option<RedisConnection> {
        let Ok(url) = std::env::var("REDIS_URL") else {
            assert!(
                std::env::var("UPCOACH_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "REDIS_URL is required"
            );
            return None;
        };
        let options = RedisOptions {
            connection_timeout: Duration::from_millis(100),
            response_timeout: Duration::from_millis(100),
            reconnect_retries: 1,
        };
        let client = redis::Client::open(url).unwrap();
        Some(
            RedisConnection::from_client(client, options, "test")
                .await
                .unwrap(),
        )
    }

    async fn until_replaced(conn: &RedisConnection, n: u64) {
        for _ in 0..200 {
            if conn.replacements() == n && !conn.shared.replacing.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} replacements, expected {n}", conn.replacements());
    }

    #[tokio::test]
    async fn timeouts_right_after_an_answer_are_a_slow_server_not_a_silent_link() {
        let Some(conn) = connection().await else {
            return;
        };
        conn.after(0, &Ok(()));
        for _ in 0..10 {
            conn.after(0, &Err::<(), _>(timeout()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(conn.replacements(), 0, "an answer came 0 ms ago");
    }

    #[tokio::test]
    async fn a_run_of_timeouts_with_no_answer_replaces_the_link_once() {
        let Some(conn) = connection().await else {
            return;
        };
        conn.after(0, &Ok(()));
        tokio::time::sleep(Duration::from_millis(250)).await; // past 2 × 100 ms
        conn.after(0, &Err::<(), _>(timeout()));
        conn.after(0, &Err::<(), _>(timeout()));
        assert_eq!(conn.replacements(), 0, "two are not a run");
        conn.after(0, &Err::<(), _>(timeout()));
        until_replaced(&conn, 1).await;
        assert_eq!(conn.current().0, 1, "the new link is generation 1");

        // Late timeouts from generation 0 do not count against generation 1.
        tokio::time::sleep(Duration::from_millis(250)).await;
        for _ in 0..5 {
            conn.after(0, &Err::<(), _>(timeout()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(conn.replacements(), 1);
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        assert_eq!(pong, "PONG", "the new link works");
    }

    #[tokio::test]
    async fn an_error_reply_is_an_answer_and_ends_the_run() {
        let Some(conn) = connection().await else {
            return;
        };
        tokio::time::sleep(Duration::from_millis(250)).await;
        conn.after(0, &Err::<(), _>(timeout()));
        conn.after(0, &Err::<(), _>(timeout()));
        let reply: RedisResult<()> = redis::cmd("NO_SUCH_COMMAND")
            .query_async(&mut conn.clone())
            .await;
        assert!(reply.is_err() && !reply.as_ref().unwrap_err().is_io_error());
        conn.after(0, &Err::<(), _>(timeout()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(conn.replacements(), 0, "the server answered in between");
    }

    #[tokio::test]
    async fn a_bare_manager_is_never_replaced() {
        let Some(conn) = connection().await else {
            return;
        };
        let Link::Single(manager) = conn.current().1 else {
            panic!("REDIS_URL is one node")
        };
        let bare = RedisConnection::from_manager(manager);
        // Past twice the 1 s response timeout assumed for a manager of unknown make.
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        for _ in 0..5 {
            bare.after(0, &Err::<(), _>(timeout()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(bare.replacements(), 0);
    }
}
