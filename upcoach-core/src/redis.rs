//! [`RedisConnection`]: one multiplexed Redis connection (to a single node or to a
//! Redis Cluster) that reconnects by itself, replaces a link that went silent, and
//! reports its state; [`PubSubSource`]: where its pub/sub connections come from.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
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
///   different slots, or that holds a multi-key command (and is not a transaction), is
///   split: the common single-key commands as one sequence per key, the sequences run
///   concurrently; any other command (a script, a multi-key command) waits for what
///   came before it and holds back what comes after. The answers come back in the
///   pipeline's order, and each key sees its commands in order. A failure fails the
///   pipeline after the commands running beside it have run: retry only pipelines that
///   may run twice. A transaction across slots is refused, as Redis Cluster refuses it.
///   During a slot migration, a pipeline the cluster client sends whole (one slot) may
///   fail after some of its commands ran, some more than once (the client re-sends it
///   after `ASK`): the upcoach components' pipelines tolerate that.
/// - **A cluster node gone silent**: the cluster client keeps using a node's link that
///   stopped answering while the others answer, so [`ping`](Self::ping) (which asks
///   every node) counts: two timed-out pings in a row replace the whole cluster link.
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

/// Pings timing out in a row before a [`RedisConnection`] to a cluster replaces its link.
pub const CLUSTER_PING_TIMEOUTS: u32 = 2;

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
    /// Pings in a row that timed out (counted for a cluster link only).
    ping_timeouts: AtomicU32,
    /// When a ping last had an answer, in microseconds since `born`.
    last_ping_micros: AtomicU64,
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
        self.generation().1
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
        let pubsub = PubSubSource::for_cluster(seeds)?;
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
            shared: Arc::new_cyclic(|shared| Shared {
                current: RwLock::new((0, link)),
                origin,
                pubsub: pubsub.map(|source| source.linked(shared.clone())),
                ping_timeouts: AtomicU32::new(0),
                last_ping_micros: AtomicU64::new(0),
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

    /// The generation of the link in use and whether it is a cluster link, without
    /// cloning the link.
    fn generation(&self) -> (u64, bool) {
        let current = self
            .shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner());
        (current.0, matches!(current.1, Link::Cluster(_)))
    }

    /// How long a link may go without an answer before a run of timeouts replaces it:
    /// twice the response timeout (1 s assumed for a manager of unknown make).
    fn patience(&self) -> Duration {
        self.shared
            .origin
            .as_ref()
            .and_then(Origin::response_timeout)
            .unwrap_or(Duration::from_secs(1))
            * 2
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
        if self.generation().0 != generation {
            return;
        }
        match result {
            Err(e) if e.is_timeout() => {
                let n = shared.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
                let now = shared.born.elapsed().as_micros() as u64;
                let quiet = now.saturating_sub(shared.last_success_micros.load(Ordering::Relaxed));
                let patience = self.patience();
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
    ///
    /// On a cluster the ping goes to every node, and [`CLUSTER_PING_TIMEOUTS`] timed-out
    /// pings in a row replace the cluster link: the cluster client would keep using a
    /// node's link that went silent as long as the other nodes answer.
    pub async fn ping(&self) -> Result<Duration, redis::RedisError> {
        let mut conn = self.clone();
        let (generation, cluster) = self.generation();
        let start = Instant::now();
        let result: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
        let elapsed = start.elapsed();
        if cluster {
            self.after_cluster_ping(generation, &result);
        }
        self.observe(result.as_ref().map(|_| ()).map_err(|e| e.to_string()).err());
        result.map(|_| {
            self.shared
                .last_latency_micros
                .store(elapsed.as_micros() as u64, Ordering::Relaxed);
            elapsed
        })
    }

    /// Counts a cluster ping's timeout; a run of [`CLUSTER_PING_TIMEOUTS`] replaces the
    /// link of generation `generation`.
    ///
    /// As for commands, a merely slow cluster is not replaced: the run must also have
    /// had no ping answered for twice the response timeout. Pings sent on a link that
    /// was replaced since do not count.
    fn after_cluster_ping<T>(&self, generation: u64, result: &RedisResult<T>) {
        let shared = &self.shared;
        if self.generation().0 != generation {
            return;
        }
        let now = shared.born.elapsed().as_micros() as u64;
        match result {
            Err(e) if e.is_timeout() => {
                let quiet = now.saturating_sub(shared.last_ping_micros.load(Ordering::Relaxed));
                let patience = self.patience();
                let run = shared.ping_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
                if run >= CLUSTER_PING_TIMEOUTS && quiet >= patience.as_micros() as u64 {
                    shared.ping_timeouts.store(0, Ordering::Relaxed);
                    self.replace(generation);
                }
            }
            _ => {
                shared.ping_timeouts.store(0, Ordering::Relaxed);
                shared.last_ping_micros.store(now, Ordering::Relaxed);
            }
        }
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
                    if !pipeline.is_transaction() && holds_multi_key_command(pipeline) {
                        // The cluster client routes a pipeline by its single-key commands
                        // only; a multi-key one inside would meet CROSSSLOT on the server.
                        split_by_key(cluster, pipeline).await
                    } else {
                        match cluster.req_packed_commands(pipeline, offset, count).await {
                            // The cluster client refuses a pipeline that spans slots
                            // before sending any of it (answers of commands it sent come
                            // back as values, not as this error), so nothing has run yet.
                            Err(e)
                                if e.kind()
                                    == redis::ErrorKind::Server(
                                        redis::ServerErrorKind::CrossSlot,
                                    )
                                    && !pipeline.is_transaction() =>
                            {
                                split_by_key(cluster, pipeline).await
                            }
                            other => other,
                        }
                    }
                }
            };
            self.after(generation, &result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        match &self
            .shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
        {
            Link::Single(manager) => manager.get_db(),
            Link::Cluster(_) => 0,
        }
    }
}

/// Commands whose one key is their first argument: the only ones a split pipeline
/// groups by key. Anything else is sent on its own and routed by the cluster client
/// (which splits multi-key commands such as `MGET` and `DEL` by slot).
const SINGLE_KEY: &[&str] = &[
    "APPEND",
    "DECR",
    "DECRBY",
    "EXPIRE",
    "EXPIREAT",
    "GET",
    "GETDEL",
    "GETEX",
    "GETSET",
    "HDEL",
    "HEXISTS",
    "HGET",
    "HGETALL",
    "HINCRBY",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HMSET",
    "HSET",
    "HSETNX",
    "HVALS",
    "INCR",
    "INCRBY",
    "INCRBYFLOAT",
    "LINDEX",
    "LLEN",
    "LPOP",
    "LPUSH",
    "LRANGE",
    "LREM",
    "LTRIM",
    "PERSIST",
    "PEXPIRE",
    "PEXPIREAT",
    "PSETEX",
    "PTTL",
    "RPOP",
    "RPUSH",
    "SADD",
    "SCARD",
    "SET",
    "SETEX",
    "SETNX",
    "SISMEMBER",
    "SMEMBERS",
    "SREM",
    "STRLEN",
    "TTL",
    "TYPE",
    "XADD",
    "XDEL",
    "XLEN",
    "XRANGE",
    "XREVRANGE",
    "XTRIM",
    "ZADD",
    "ZCARD",
    "ZINCRBY",
    "ZPOPMAX",
    "ZPOPMIN",
    "ZRANGE",
    "ZRANGEBYSCORE",
    "ZREM",
    "ZREMRANGEBYSCORE",
    "ZSCORE",
];

/// Commands that take any number of keys (one or more, each an argument).
const MULTI_KEY: &[&str] = &["DEL", "EXISTS", "MGET", "TOUCH", "UNLINK"];

/// The key of a command from [`SINGLE_KEY`], or of a [`MULTI_KEY`] command given
/// exactly one key; `None` for any other.
fn single_key(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter();
    let (Some(redis::Arg::Simple(name)), Some(redis::Arg::Simple(key))) =
        (args.next(), args.next())
    else {
        return None;
    };
    let is = |list: &[&str]| {
        list.iter()
            .any(|known| name.eq_ignore_ascii_case(known.as_bytes()))
    };
    (is(SINGLE_KEY) || (is(MULTI_KEY) && args.next().is_none())).then_some(key)
}

/// Whether a pipeline holds a command that may name keys of several slots.
fn holds_multi_key_command(pipeline: &Pipeline) -> bool {
    pipeline.cmd_iter().any(|cmd| {
        let mut args = cmd.args_iter();
        matches!(args.next(), Some(redis::Arg::Simple(name))
            if MULTI_KEY.iter().any(|known| name.eq_ignore_ascii_case(known.as_bytes())))
            && args.len() > 1
    })
}

/// Runs a pipeline that spans slots, keeping each key's commands in order:
///
/// - the commands of [`single_key`] form one sequence per key, sent one command at a
///   time (so that a redirection during a slot migration, `ASK`, applies to one
///   command, never to a batch the new node only half accepts); the sequences of
///   different keys run concurrently;
/// - any other command (a script, a multi-key or subcommand command) is a barrier: it
///   runs after everything before it and before anything after it, routed by the
///   cluster client itself.
///
/// The answers are put back in the pipeline's order. Every command before a failure
/// runs; the first failure is the answer.
async fn split_by_key(cluster: &ClusterConnection, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let mut ordered = vec![Value::Nil; commands.len()];
    let mut at = 0;
    while at < commands.len() {
        // The run of single-key commands from `at`, as one sequence per key.
        let mut sequences: Vec<Vec<usize>> = Vec::new();
        let mut by_key: std::collections::HashMap<&[u8], usize> = std::collections::HashMap::new();
        let mut end = at;
        while end < commands.len() {
            let Some(key) = single_key(commands[end]) else {
                break;
            };
            let slot = *by_key.entry(key).or_insert_with(|| {
                sequences.push(Vec::new());
                sequences.len() - 1
            });
            sequences[slot].push(end);
            end += 1;
        }
        let commands = &commands;
        let runs = sequences.iter().map(|indices| async move {
            let mut conn = cluster.clone();
            let mut answers = Vec::with_capacity(indices.len());
            for &index in indices {
                answers.push((index, conn.req_packed_command(commands[index]).await?));
            }
            Ok::<_, redis::RedisError>(answers)
        });
        for run in futures_util::future::join_all(runs).await {
            for (index, value) in run? {
                ordered[index] = value;
            }
        }
        if end < commands.len() {
            ordered[end] = cluster.clone().req_packed_command(commands[end]).await?;
            end += 1;
        }
        at = end;
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
/// in turn (each attempt starts at the node after the last one used, so a node that is
/// down costs one attempt, not every one). On a cluster, `PUBLISH` reaches subscribers on
/// every node, so any one node will do; the source made by [`RedisConnection`] for a
/// cluster asks the cluster for its nodes (`CLUSTER NODES`) before each attempt, so a
/// seed that failed over or went away is replaced by the nodes serving now.
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
#[derive(Clone)]
pub struct PubSubSource {
    nodes: Arc<RwLock<Arc<[redis::Client]>>>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    cluster: Option<ClusterNodes>,
}

/// How a cluster's source finds the nodes serving now.
#[derive(Clone)]
struct ClusterNodes {
    /// The cluster link to ask (weak: the connection owns its source).
    link: std::sync::Weak<Shared>,
    seeds: Arc<[redis::Client]>,
    /// The seeds' credentials and settings, for a node found by address.
    template: redis::ConnectionInfo,
    /// When the cluster was last asked.
    asked: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for PubSubSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSubSource")
            .field("nodes", &self.nodes().len())
            .field("cluster", &self.cluster.is_some())
            .finish()
    }
}

/// How long a cluster's source waits for `CLUSTER NODES` before using the nodes it knew
/// (at most; and at most half the link's response timeout).
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a cluster's source asks for the cluster's nodes, at most.
const DISCOVERY_EVERY: Duration = Duration::from_secs(1);

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
            nodes: Arc::new(RwLock::new(nodes.into())),
            next: Arc::default(),
            cluster: None,
        })
    }

    /// The seeds of a cluster, to be linked to its connection by
    /// [`RedisConnection::with_parts`].
    fn for_cluster(seeds: Vec<redis::Client>) -> RedisResult<Self> {
        let mut source = Self::from_nodes(seeds)?;
        let seeds = source.nodes();
        source.cluster = Some(ClusterNodes {
            link: std::sync::Weak::new(),
            template: seeds[0].get_connection_info().clone(),
            seeds,
            asked: Arc::default(),
        });
        Ok(source)
    }

    fn linked(mut self, link: std::sync::Weak<Shared>) -> Self {
        if let Some(cluster) = &mut self.cluster {
            cluster.link = link;
        }
        self
    }

    fn nodes(&self) -> Arc<[redis::Client]> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Opens a pub/sub connection on the next node that accepts one.
    pub async fn open(&self) -> RedisResult<redis::aio::PubSub> {
        if let Some(cluster) = &self.cluster {
            self.discover(cluster).await;
        }
        let nodes = self.nodes();
        let count = nodes.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for i in 0..count {
            match nodes[(start + i) % count].get_async_pubsub().await {
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

    /// Replaces the node list with the cluster's healthy nodes (then any seed not among
    /// them); keeps the list it had when the cluster does not answer.
    async fn discover(&self, cluster: &ClusterNodes) {
        {
            let mut last = cluster.asked.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < DISCOVERY_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let Some(shared) = cluster.link.upgrade() else {
            return;
        };
        // At most half the link's response timeout: the caller's own limit on opening
        // must leave time to try the nodes.
        let wait = shared
            .origin
            .as_ref()
            .and_then(Origin::response_timeout)
            .map_or(DISCOVERY_TIMEOUT, |t| (t / 2).min(DISCOVERY_TIMEOUT));
        let mut conn = RedisConnection { shared };
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("NODES");
        let asked = cmd.query_async::<String>(&mut conn);
        let Ok(Ok(text)) = tokio::time::timeout(wait, asked).await else {
            return;
        };
        let mut addrs: Vec<(String, u16)> = cluster_node_addrs(&text);
        // The same order whichever node answered, so the rotation walks every node.
        addrs.sort();
        if addrs.is_empty() {
            return;
        }
        let mut nodes: Vec<redis::Client> = Vec::with_capacity(addrs.len() + cluster.seeds.len());
        for (host, port) in addrs.drain(..) {
            let info = cluster
                .template
                .clone()
                .set_addr(redis::ConnectionAddr::Tcp(host, port));
            if let Ok(client) = redis::Client::open(info) {
                nodes.push(client);
            }
        }
        for seed in cluster.seeds.iter() {
            let addr = seed.get_connection_info().addr();
            if !nodes.iter().any(|n| n.get_connection_info().addr() == addr) {
                nodes.push(seed.clone());
            }
        }
        *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = nodes.into();
    }
}

/// The addresses of the nodes in a `CLUSTER NODES` answer that are connected and not
/// failing.
fn cluster_node_addrs(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let bad = ["fail", "fail?", "handshake", "noaddr"];
            if flags.split(',').any(|f| bad.contains(&f)) || fields.get(7) != Some(&"connected") {
                return None;
            }
            let addr = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
            (!host.is_empty()).then(|| (host.to_owned(), port))
        })
        .collect()
}

impl From<redis::Client> for PubSubSource {
    fn from(client: redis::Client) -> Self {
        Self {
            nodes: Arc::new(RwLock::new(Arc::new([client]))),
            next: Arc::default(),
            cluster: None,
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

    /// A connection to `REDIS_CLUSTER_URL`; `None` (skip) when unset, unless
    /// `UPCOACH_REQUIRE_SERVICES=1`.
    async fn cluster_connection() -> Option<RedisConnection> {
        let Ok(url) = std::env::var("REDIS_CLUSTER_URL") else {
            assert!(
                std::env::var("UPCOACH_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "REDIS_CLUSTER_URL is required"
            );
            return None;
        };
        let url = ServiceUrl::parse(&url, &["redis+cluster"]).unwrap();
        let options = RedisOptions {
            connection_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_millis(100),
            reconnect_retries: 1,
        };
        Some(RedisConnection::connect(&url, options).await.unwrap())
    }

    #[tokio::test]
    async fn on_a_cluster_timed_out_pings_with_no_answer_replace_the_link_once() {
        let Some(conn) = cluster_connection().await else {
            return;
        };
        conn.after_cluster_ping(0, &Ok(()));
        // Two in a row, but a ping was answered 0 ms ago: a slow cluster, kept.
        conn.after_cluster_ping(0, &Err::<(), _>(timeout()));
        conn.after(0, &Ok(())); // other nodes' answers do not end the run
        conn.after_cluster_ping(0, &Err::<(), _>(timeout()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(conn.replacements(), 0, "answered too recently");
        // Past twice the 100 ms response timeout with no answer: replaced.
        tokio::time::sleep(Duration::from_millis(250)).await;
        conn.after_cluster_ping(0, &Err::<(), _>(timeout()));
        until_replaced(&conn, 1).await;
        assert!(conn.is_cluster(), "the new link is a cluster link");
        // Late timeouts of pings sent on the old link do not count against the new one.
        tokio::time::sleep(Duration::from_millis(250)).await;
        for _ in 0..4 {
            conn.after_cluster_ping(0, &Err::<(), _>(timeout()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(conn.replacements(), 1);
        conn.ping().await.unwrap();
        let source = conn.pubsub().unwrap().clone();
        source.open().await.unwrap();
    }

    #[test]
    fn cluster_nodes_lists_the_healthy_nodes() {
        let text = "\
a1 10.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 10.0.0.2:7002@17002,node-b.example master - 0 1 2 connected 5461-10922
c3 10.0.0.3:7003@17003 master,fail - 0 1 3 disconnected 10923-16383
d4 :0@0 handshake,noaddr - 0 0 0 disconnected
e5 ::1:7005@17005 slave a1 0 1 1 connected
";
        assert_eq!(
            cluster_node_addrs(text),
            vec![
                ("10.0.0.1".to_owned(), 7001),
                ("10.0.0.2".to_owned(), 7002),
                ("::1".to_owned(), 7005),
            ]
        );
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
