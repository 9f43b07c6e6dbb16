//! The hub: connections, rooms, fan-out, limits and shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::AbortHandle;
use upcoach_core::event::{Event, EventLog, WebSocketEvent};
use upcoach_core::{Clock, SystemClock, TokenVerifier, UserId};

use crate::access::{DefaultRoomAccess, RoomAccess};
use crate::direct::{Batch, Gate, Mark};
use crate::pending::PendingAuth;
use crate::wire::Encoded;
use crate::{Broadcaster, BrokerState, Position, Replay, Result, RoomEvent};

/// The body of every response the hub answers with: empty for a WebSocket upgrade or
/// a refusal's JSON, a stream of records for SSE.
pub type RealtimeBody = BoxBody<Bytes, Infallible>;

/// Limits and timings of the hub. `Default` gives API.md's values.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Events queued per connection before it counts as too slow and is closed (4008
    /// on WebSocket, end of stream on SSE). Default 1,024.
    pub queue_capacity: usize,
    /// Open connections of both kinds together; past it new ones get 503. Default 10,000.
    pub max_connections: usize,
    /// Open connections per user; past it new ones get 429 (token at the upgrade) or
    /// close 1013 (token sent later). Default 32.
    pub max_connections_per_user: usize,
    /// WebSocket connections opened without a token that have not authenticated yet,
    /// from all addresses together. They hold no place in `max_connections` until
    /// their `{"type":"auth"}` comes (then they take one, or close 1013 when none is
    /// left); past this, such upgrades get 429 `too_many_pending_connections` with
    /// `Retry-After`. A connection whose token was refused at the upgrade counts here
    /// too until it is closed. Default 256.
    pub max_pending_auth: usize,
    /// The same per client address: [`ClientAddr`](upcoach_core::http::ClientAddr) in
    /// the request's extensions, IPv6 grouped by /64 (as
    /// [`ip_subject`](upcoach_core::limit::ip_subject) does). Requests without a
    /// `ClientAddr` all share one budget, so a host must insert it (behind a proxy:
    /// the client's address, not the proxy's). Default 4.
    pub max_pending_auth_per_address: usize,
    /// Rooms one connection may read. Default 32.
    pub max_rooms_per_connection: usize,
    /// How often a WebSocket gets a ping. Default 25 s.
    pub ws_ping_interval: Duration,
    /// How long after a ping a WebSocket may stay silent before it is closed; also how
    /// long any write may wait for the client to take it before the connection is
    /// dropped (`write_timeout`), never past the connection's auth deadline or token
    /// expiry. Default 10 s.
    pub ws_pong_timeout: Duration,
    /// How often an SSE stream gets a `: ping` comment. Default 15 s.
    pub sse_ping_interval: Duration,
    /// The `retry:` an SSE stream announces first. Default 3 s.
    pub sse_retry: Duration,
    /// How long a WebSocket opened without a token has to send `{"type":"auth"}`.
    /// Default 5 s.
    pub auth_timeout: Duration,
    /// A WebSocket that reads no room for this long is closed (1000). Default 5 min.
    pub idle_timeout: Duration,
    /// The largest WebSocket message (and frame) accepted from a client. Default 16 KiB.
    pub max_message_size: usize,
    /// Bad client messages tolerated (each answered with an `error`) before the
    /// connection is closed with 4400. Default 5.
    pub max_bad_messages: u32,
    /// Events fetched per replay round trip. Default 500.
    pub replay_page: usize,
    /// Browser origins (`Origin` header, exact match) allowed to connect; requests
    /// without an `Origin` (not from a browser) are always allowed. Default none.
    pub allowed_origins: Vec<String>,
    /// How long a closing connection may take to flush its close frame or last
    /// records. Default 5 s.
    pub close_timeout: Duration,
    /// Whether SSE is gzip-compressed for clients that accept it (flushed per
    /// record). Default true.
    pub sse_gzip: bool,
    /// The WebSocket read buffer allocated per connection, and the most read from the
    /// socket at once. Default 2 KiB: a dashboard's client sends small messages (a
    /// subscription, a token), and every idle connection holds this buffer, so 10,000
    /// of them hold 20 MiB (tungstenite's own default of 128 KiB would be 1.25 GiB). A
    /// larger message, up to `max_message_size`, is still read whole, in several reads.
    pub ws_read_buffer: usize,
    /// Whether a room's fan-out writes an event to a WebSocket's socket itself, with one
    /// non-blocking send, while the connection has nothing else to write (its task is
    /// then not woken at all). It needs the socket to be plain TCP as the server hands
    /// it to hyper: `upcoach_core::http::serve`, or hyper's `http1` connection over a
    /// `TokioIo<TcpStream>`. Other connections (TLS; axum's `serve`, whose
    /// hyper-util builder wraps the stream), and every event the socket does not take
    /// whole at once, go through the connection's queue and task. Default true; false
    /// sends everything through the queues.
    pub direct_writes: bool,
}

/// The defaults with `WEBSOCKET_CORS_ORIGINS`, `REALTIME_MAX_CONNECTIONS`,
/// `REALTIME_MAX_CONNECTIONS_PER_USER`, `REALTIME_MAX_PENDING_AUTH` and
/// `REALTIME_MAX_PENDING_AUTH_PER_ADDRESS` read from the environment.
///
/// ```
/// use upcoach_core::config::Settings;
/// use upcoach_realtime::HubConfig;
///
/// let config = HubConfig::from_lookup(|n| (n == "REALTIME_MAX_CONNECTIONS").then(|| "19000".into()))?;
/// assert_eq!(config.max_connections, 19_000);
/// let config = HubConfig::from_lookup(|n| match n {
///     "REALTIME_MAX_PENDING_AUTH" => Some("1000".into()),
///     "REALTIME_MAX_PENDING_AUTH_PER_ADDRESS" => Some("16".into()),
///     _ => None,
/// })?;
/// assert_eq!((config.max_pending_auth, config.max_pending_auth_per_address), (1000, 16));
/// assert!(HubConfig::from_lookup(|n| (n == "REALTIME_MAX_PENDING_AUTH").then(|| "0".into())).is_err());
/// # Ok::<(), upcoach_core::config::ConfigErrors>(())
/// ```
impl upcoach_core::config::Settings for HubConfig {
    fn read(env: &mut upcoach_core::config::Env<'_>) -> Self {
        let defaults = Self::default();
        let count = "a whole number from 1 to 10000000";
        Self {
            allowed_origins: env.origins("WEBSOCKET_CORS_ORIGINS"),
            max_connections: env.number(
                "REALTIME_MAX_CONNECTIONS",
                defaults.max_connections,
                1..=10_000_000,
                count,
            ),
            max_connections_per_user: env.number(
                "REALTIME_MAX_CONNECTIONS_PER_USER",
                defaults.max_connections_per_user,
                1..=10_000_000,
                count,
            ),
            max_pending_auth: env.number(
                "REALTIME_MAX_PENDING_AUTH",
                defaults.max_pending_auth,
                1..=10_000_000,
                count,
            ),
            max_pending_auth_per_address: env.number(
                "REALTIME_MAX_PENDING_AUTH_PER_ADDRESS",
                defaults.max_pending_auth_per_address,
                1..=10_000_000,
                count,
            ),
            ..defaults
        }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            max_connections: 10_000,
            max_connections_per_user: 32,
            max_pending_auth: 256,
            max_pending_auth_per_address: 4,
            max_rooms_per_connection: 32,
            ws_ping_interval: Duration::from_secs(25),
            ws_pong_timeout: Duration::from_secs(10),
            sse_ping_interval: Duration::from_secs(15),
            sse_retry: Duration::from_secs(3),
            auth_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            max_message_size: 16 * 1024,
            max_bad_messages: 5,
            replay_page: 500,
            allowed_origins: Vec::new(),
            close_timeout: Duration::from_secs(5),
            sse_gzip: true,
            ws_read_buffer: 2 * 1024,
            direct_writes: true,
        }
    }
}

/// Counters of what the hub has done since it started, cheap to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HubStats {
    /// Open WebSocket connections.
    pub ws_connections: usize,
    /// Open SSE connections.
    pub sse_connections: usize,
    /// WebSocket connections open without a token yet (not in `ws_connections`):
    /// see [`HubConfig::max_pending_auth`].
    pub pending_auth_connections: usize,
    /// Rooms with at least one reader on this process.
    pub rooms: usize,
    /// Events handed to connections: to their queues, or to their sockets.
    pub delivered: u64,
    /// Of `delivered`, the events the fan-out wrote to a WebSocket's socket itself,
    /// without waking the connection's task ([`HubConfig::direct_writes`]).
    pub written_directly: u64,
    /// Connections closed because their queue filled.
    pub slow_consumers_closed: u64,
    /// Connections refused by a connection limit.
    pub refused: u64,
    /// WebSocket upgrades without a token refused by the pending-auth budget (also
    /// counted in `refused`).
    pub refused_pending: u64,
    /// Connections refused or closed for a missing, invalid or expired token.
    pub auth_failures: u64,
    /// Subscriptions refused by the access rules.
    pub denied_subscriptions: u64,
    /// `reset`s sent because history no longer reached back.
    pub resets: u64,
    /// Holes in a room's live stream filled from history.
    pub gaps_repaired: u64,
}

impl HubStats {
    /// These counts as gauges: `realtime_connections{transport}`,
    /// `realtime_pending_auth_connections`, `realtime_rooms`, `realtime_delivered`,
    /// `realtime_slow_consumers_closed`.
    pub fn gauges(&self) -> [upcoach_core::health::Gauge; 6] {
        use upcoach_core::health::Gauge;
        [
            Gauge::new(
                "realtime_connections",
                &[("transport", "ws")],
                self.ws_connections as f64,
            ),
            Gauge::new(
                "realtime_connections",
                &[("transport", "sse")],
                self.sse_connections as f64,
            ),
            Gauge::new(
                "realtime_pending_auth_connections",
                &[],
                self.pending_auth_connections as f64,
            ),
            Gauge::new("realtime_rooms", &[], self.rooms as f64),
            Gauge::new("realtime_delivered", &[], self.delivered as f64),
            Gauge::new(
                "realtime_slow_consumers_closed",
                &[],
                self.slow_consumers_closed as f64,
            ),
        ]
    }
}

/// One room in [`HubStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomStatus {
    /// The room.
    pub room: String,
    /// Connections of this process reading it.
    pub subscribers: usize,
}

/// Connection counts in [`HubStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConnectionCounts {
    /// Open WebSocket connections.
    pub ws: usize,
    /// Open SSE connections.
    pub sse: usize,
}

/// The realtime entry of a `/health` answer (`{"status","broker","connections"}`):
/// degraded while the broker is away, as this process's own events still flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RealtimeCheck {
    /// `ok`, or `degraded` without the broker.
    pub status: upcoach_core::health::Status,
    /// The broker's kind and link.
    pub broker: BrokerState,
    /// Open connections.
    pub connections: ConnectionCounts,
}

/// `GET /api/dashboard/realtime/status` of API.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HubStatus {
    /// This process.
    pub node_id: String,
    /// Seconds since the hub started.
    pub uptime_s: u64,
    /// Open connections.
    pub connections: ConnectionCounts,
    /// WebSocket connections open without a token yet, not in `connections`.
    pub pending_auth: usize,
    /// Rooms read on this process, busiest first.
    pub rooms: Vec<RoomStatus>,
    /// The broadcaster's broker.
    pub broker: BrokerState,
}

/// The realtime hub: rooms, the connections reading them and the transports that
/// serve them. Cheap to clone; every clone is the same hub.
///
/// ```
/// use std::sync::Arc;
/// use upcoach_realtime::{Hub, MemoryBroadcaster};
/// # #[derive(Debug)] struct NoTokens;
/// # #[async_trait::async_trait]
/// # impl upcoach_core::TokenVerifier for NoTokens {
/// #     async fn verify(&self, _: &str) -> Result<upcoach_core::Principal, upcoach_core::TokenError> {
/// #         Err(upcoach_core::TokenError::Missing)
/// #     }
/// # }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let hub = Hub::builder(Arc::new(MemoryBroadcaster::default()), Arc::new(NoTokens)).build();
/// let sent = hub.publish("metrics", "tick", serde_json::json!({"rps": 40})).await?;
/// assert_eq!(sent.seq, 1);
/// assert_eq!(hub.status().connections.ws, 0);
/// // In a hyper service: `hub.websocket(request).await` and `hub.sse(request).await`
/// // answer the two realtime routes.
/// # Ok::<(), upcoach_realtime::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Hub {
    pub(crate) inner: Arc<Inner>,
}

/// Builds a [`Hub`]: [`Hub::builder`].
#[derive(Debug)]
pub struct HubBuilder {
    broadcaster: Arc<dyn Broadcaster>,
    verifier: Arc<dyn TokenVerifier>,
    events: Option<Arc<dyn EventLog>>,
    access: Arc<dyn RoomAccess>,
    clock: Arc<dyn Clock>,
    config: HubConfig,
    node_id: Option<String>,
}

impl HubBuilder {
    /// Records connects, disconnects, auth failures and denied subscriptions in
    /// `websocket_events` through `events` (default: not recorded).
    pub fn events(mut self, events: Arc<dyn EventLog>) -> Self {
        self.events = Some(events);
        self
    }

    /// Replaces the default room rules.
    pub fn access(mut self, access: Arc<dyn RoomAccess>) -> Self {
        self.access = access;
        self
    }

    /// The clock that token expiry is judged by (default the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Limits and timings.
    pub fn config(mut self, config: HubConfig) -> Self {
        self.config = config;
        self
    }

    /// This process's name in status answers (default a random UUID).
    pub fn node_id(mut self, node_id: impl Into<String>) -> Self {
        self.node_id = Some(node_id.into());
        self
    }

    /// The hub.
    pub fn build(self) -> Hub {
        let mut config = self.config;
        config.queue_capacity = config.queue_capacity.max(1);
        config.replay_page = config.replay_page.max(1);
        config.ws_read_buffer = config.ws_read_buffer.max(256);
        let fan_out_parts = std::thread::available_parallelism().map_or(1, usize::from);
        Hub {
            inner: Arc::new(Inner {
                broadcaster: self.broadcaster,
                verifier: self.verifier,
                events: self.events,
                access: self.access,
                clock: self.clock,
                config,
                node_id: self
                    .node_id
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                started: Instant::now(),
                rooms: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
                open: AtomicUsize::new(0),
                ws: AtomicUsize::new(0),
                sse: AtomicUsize::new(0),
                per_user: Mutex::new(HashMap::new()),
                pending: PendingAuth::default(),
                all_closed: Notify::new(),
                shutdown: watch::channel(false).0,
                counters: Counters::default(),
                fan_out_parts,
                fan_out_slots: Arc::new(tokio::sync::Semaphore::new(fan_out_parts)),
            }),
        }
    }
}

impl Hub {
    /// A hub publishing through `broadcaster` and checking tokens with `verifier`.
    pub fn builder(
        broadcaster: Arc<dyn Broadcaster>,
        verifier: Arc<dyn TokenVerifier>,
    ) -> HubBuilder {
        HubBuilder {
            broadcaster,
            verifier,
            events: None,
            access: Arc::new(DefaultRoomAccess),
            clock: Arc::new(SystemClock),
            config: HubConfig::default(),
            node_id: None,
        }
    }

    /// Publishes an event to `room` (on every process sharing the broadcaster).
    pub async fn publish(
        &self,
        room: &str,
        event: &str,
        data: serde_json::Value,
    ) -> Result<Arc<RoomEvent>> {
        self.inner.broadcaster.publish(room, event, data).await
    }

    /// The broadcaster behind the hub.
    pub fn broadcaster(&self) -> &Arc<dyn Broadcaster> {
        &self.inner.broadcaster
    }

    /// The configuration in force.
    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// What API.md's status route answers.
    pub fn status(&self) -> HubStatus {
        let mut rooms: Vec<RoomStatus> = self
            .inner
            .lock_rooms()
            .values()
            .map(|room| RoomStatus {
                room: room.name.to_string(),
                subscribers: room.read_subscribers().len(),
            })
            .collect();
        rooms.sort_by(|a, b| b.subscribers.cmp(&a.subscribers).then(a.room.cmp(&b.room)));
        HubStatus {
            node_id: self.inner.node_id.clone(),
            uptime_s: self.inner.started.elapsed().as_secs(),
            connections: self.connection_counts(),
            pending_auth: self.inner.pending.count(),
            rooms,
            broker: self.broker_state(),
        }
    }

    /// Open connections, without [`status`](Self::status)'s walk over the rooms: cheap
    /// enough for a health check answered thousands of times a second.
    pub fn connection_counts(&self) -> ConnectionCounts {
        ConnectionCounts {
            ws: self.inner.ws.load(Ordering::Relaxed),
            sse: self.inner.sse.load(Ordering::Relaxed),
        }
    }

    /// What the broadcaster says about its broker.
    pub fn broker_state(&self) -> BrokerState {
        self.inner.broadcaster.state()
    }

    /// The hub's entry in a `/health` answer.
    pub fn health_check(&self) -> RealtimeCheck {
        use upcoach_core::health::Status;
        let broker = self.broker_state();
        RealtimeCheck {
            status: if broker.connected {
                Status::Ok
            } else {
                Status::Degraded
            },
            broker,
            connections: self.connection_counts(),
        }
    }

    /// Counters, cheap enough to read on every metrics tick.
    pub fn stats(&self) -> HubStats {
        let c = &self.inner.counters;
        HubStats {
            ws_connections: self.inner.ws.load(Ordering::Relaxed),
            sse_connections: self.inner.sse.load(Ordering::Relaxed),
            pending_auth_connections: self.inner.pending.count(),
            rooms: self.inner.lock_rooms().len(),
            delivered: c.delivered.load(Ordering::Relaxed),
            written_directly: c.direct.load(Ordering::Relaxed),
            slow_consumers_closed: c.slow.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            refused_pending: c.refused_pending.load(Ordering::Relaxed),
            auth_failures: c.auth_failures.load(Ordering::Relaxed),
            denied_subscriptions: c.denied.load(Ordering::Relaxed),
            resets: c.resets.load(Ordering::Relaxed),
            gaps_repaired: c.gaps.load(Ordering::Relaxed),
        }
    }

    /// Open connections of both kinds (WebSocket connections that have not
    /// authenticated yet are not among them: [`HubStats::pending_auth_connections`]).
    pub fn connections(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Closes every connection (WebSocket with 1001, SSE by ending the stream after its
    /// last record) and refuses new ones; returns once all are gone or `timeout`
    /// passed, with the number still open (those waiting to authenticate included).
    pub async fn shutdown(&self, timeout: Duration) -> usize {
        self.inner.shutdown.send_replace(true);
        let deadline = tokio::time::Instant::now() + timeout;
        let open = || self.connections() + self.inner.pending.count();
        loop {
            let notified = self.inner.all_closed.notified();
            if open() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return open();
            }
        }
    }

    /// Whether [`shutdown`](Self::shutdown) has started.
    pub fn is_shutting_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// The hub's shutdown beside an HTTP server's drain. The first half is the
    /// `shutdown` future for the accept loop: once `signal` resolves, it starts
    /// [`shutdown`](Self::shutdown) in a task of its own (WebSocket 1001, SSE streams
    /// end at once, so no open stream holds the HTTP drain) and resolves. The second
    /// half says when that shutdown is over: SSE streams that took their connections
    /// over are outside the HTTP drain, and a stream's last bytes to a client slow to
    /// read take up to `close_timeout`, so it waits that and 2 s more. Wait for it
    /// before the event log's last flush, or their `disconnect` records may be lost.
    ///
    /// ```no_run
    /// # async fn run(hub: upcoach_realtime::Hub) {
    /// let (stopping, realtime) = hub.shutdown_on(upcoach_core::http::serve::shutdown_signal());
    /// // serve(listener, service, stopping, options).await;
    /// # stopping.await;
    /// realtime.finished().await;
    /// // event_log.flush().await;
    /// # }
    /// ```
    pub fn shutdown_on(
        &self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> (impl Future<Output = ()> + Send + 'static, HubStopping) {
        let hub = self.clone();
        let (done, finished) = tokio::sync::oneshot::channel();
        let stopping = async move {
            signal.await;
            tokio::spawn(async move {
                let wait = hub.config().close_timeout + Duration::from_secs(2);
                let left = hub.shutdown(wait).await;
                if left > 0 {
                    tracing::warn!(
                        connections = left,
                        "realtime connections still open after {wait:?}"
                    );
                }
                let _ = done.send(left);
            });
        };
        (stopping, HubStopping { finished })
    }
}

/// The second half of [`Hub::shutdown_on`].
#[derive(Debug)]
pub struct HubStopping {
    finished: tokio::sync::oneshot::Receiver<usize>,
}

impl HubStopping {
    /// Resolves once the hub's shutdown is over, with the connections still open then;
    /// `None` at once when the shutdown never started (the accept loop returned before
    /// the signal and dropped its `shutdown` future).
    pub async fn finished(self) -> Option<usize> {
        self.finished.await.ok()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) delivered: AtomicU64,
    pub(crate) direct: AtomicU64,
    pub(crate) slow: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) refused_pending: AtomicU64,
    pub(crate) auth_failures: AtomicU64,
    pub(crate) denied: AtomicU64,
    pub(crate) resets: AtomicU64,
    pub(crate) gaps: AtomicU64,
}

/// Which transport a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    WebSocket,
    Sse,
}

impl Transport {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
        }
    }
}

/// What a room task hands to a connection's queue.
#[derive(Debug, Clone)]
pub(crate) enum Delivery {
    Event(Arc<Encoded>),
    /// Behind a pointer like an event, so that every slot of every connection's queue
    /// is two words (a queue's first block of 32 slots is allocated with the queue).
    Reset(Arc<RoomReset>),
    /// The fan-out wrote part of a frame to the socket: the rest waits in the
    /// connection's gate (see [`crate::direct`]).
    Rest,
}

/// A room's history no longer reaches back: its readers get a `reset`.
#[derive(Debug)]
pub(crate) struct RoomReset {
    pub(crate) room: Arc<str>,
    pub(crate) reason: &'static str,
    /// The room's head when the reset was decided (read once for every reader):
    /// readers resume after it. `None` when the broker could not say.
    pub(crate) head: Option<Position>,
    /// The room's numbers started again (`head` is in the new numbering), after the
    /// old numbering reached this sequence number: its readers resume after `head`
    /// even where they had read past it. A reader already in the new numbering (it
    /// read its position from the restarted room) ignores the reset.
    pub(crate) restarted_from: Option<u64>,
}

/// The part of a connection that room tasks can reach.
#[derive(Debug, Default)]
pub(crate) struct ConnShared {
    /// 0 while open; otherwise the close code the hub decided on.
    close_code: AtomicU16,
    pub(crate) notify: Notify,
    /// Whether the fan-out may write to the socket itself.
    pub(crate) gate: Gate,
}

/// Close code for a connection whose queue filled.
pub(crate) const CLOSE_TOO_SLOW: u16 = 4008;

impl ConnShared {
    /// Asks the connection to close with `code`; the first request wins.
    pub(crate) fn close(&self, code: u16) {
        if self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.notify.notify_one();
        }
    }

    pub(crate) fn close_code(&self) -> Option<u16> {
        match self.close_code.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }
}

/// One connection reading one room: held by the room (its readers) and by the
/// connection's session.
#[derive(Debug)]
pub(crate) struct Subscriber {
    /// The connection's id.
    id: u64,
    tx: mpsc::Sender<Delivery>,
    shared: Arc<ConnShared>,
    /// Where the reader stands in the room: here, with what the fan-out reads for every
    /// event, rather than behind one more pointer.
    pub(crate) mark: Mark,
}

impl Subscriber {
    /// Connection `id`, not placed in the room yet.
    pub(crate) fn new(id: u64, tx: mpsc::Sender<Delivery>, shared: Arc<ConnShared>) -> Self {
        Self {
            id,
            tx,
            shared,
            mark: Mark::unplaced(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Room {
    name: Arc<str>,
    subscribers: RwLock<HashMap<u64, Arc<Subscriber>>>,
    /// `None` until the broadcaster subscription is up; then whether it came up.
    ready: watch::Sender<Option<bool>>,
    task: Mutex<Option<AbortHandle>>,
}

impl Room {
    pub(crate) fn read_subscribers(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<Subscriber>>> {
        self.subscribers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_subscribers(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<Subscriber>>> {
        self.subscribers.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) broadcaster: Arc<dyn Broadcaster>,
    pub(crate) verifier: Arc<dyn TokenVerifier>,
    events: Option<Arc<dyn EventLog>>,
    pub(crate) access: Arc<dyn RoomAccess>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: HubConfig,
    node_id: String,
    started: Instant,
    rooms: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    next_conn: AtomicU64,
    open: AtomicUsize,
    ws: AtomicUsize,
    sse: AtomicUsize,
    per_user: Mutex<HashMap<UserId, usize>>,
    pub(crate) pending: PendingAuth,
    /// Notified when the last open (or the last pending) connection is gone.
    pub(crate) all_closed: Notify,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) counters: Counters,
    /// How many threads a large room's fan-out is shared among: the cores.
    fan_out_parts: usize,
    /// Threads the fan-outs of all rooms may hold at once (`fan_out_parts`).
    fan_out_slots: Arc<tokio::sync::Semaphore>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    ShuttingDown,
    TooManyConnections,
    TooManyForUser,
    /// The pending-auth budget of the client's address, or the total one, is spent.
    TooManyPending,
}

impl Refusal {
    pub(crate) fn code(self) -> &'static str {
        match self {
            Refusal::ShuttingDown => "shutting_down",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::TooManyForUser => "too_many_connections_for_user",
            Refusal::TooManyPending => "too_many_pending_connections",
        }
    }
}

/// A place among the hub's open connections; released on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    hub: Arc<Inner>,
    transport: Transport,
    user: Option<UserId>,
}

impl Slot {
    pub(crate) fn hub(&self) -> &Arc<Inner> {
        &self.hub
    }

    pub(crate) fn transport(&self) -> Transport {
        self.transport
    }

    /// Counts the connection against `user`'s limit.
    pub(crate) fn claim_user(&mut self, user: UserId) -> Result<(), Refusal> {
        if self.user == Some(user) {
            return Ok(());
        }
        let max = self.hub.config.max_connections_per_user;
        let mut per_user = self.hub.lock_per_user();
        let count = per_user.entry(user).or_insert(0);
        if *count >= max {
            if *count == 0 {
                per_user.remove(&user);
            }
            drop(per_user);
            self.hub.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::TooManyForUser);
        }
        *count += 1;
        drop(per_user);
        if let Some(previous) = self.user.replace(user) {
            self.hub.release_user(previous);
        }
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(user) = self.user.take() {
            self.hub.release_user(user);
        }
        let counter = match self.transport {
            Transport::WebSocket => &self.hub.ws,
            Transport::Sse => &self.hub.sse,
        };
        counter.fetch_sub(1, Ordering::AcqRel);
        if self.hub.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.hub.all_closed.notify_waiters();
        }
    }
}

impl Inner {
    pub(crate) fn lock_rooms(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Room>>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_per_user(&self) -> MutexGuard<'_, HashMap<UserId, usize>> {
        self.per_user.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release_user(&self, user: UserId) {
        let mut per_user = self.lock_per_user();
        if let Some(count) = per_user.get_mut(&user) {
            *count -= 1;
            if *count == 0 {
                per_user.remove(&user);
            }
        }
    }

    /// A new connection's id, unique in this hub.
    pub(crate) fn connection_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Admits one more connection, or says why not.
    pub(crate) fn reserve(self: &Arc<Self>, transport: Transport) -> Result<Slot, Refusal> {
        if *self.shutdown.borrow() {
            return Err(Refusal::ShuttingDown);
        }
        let max = self.config.max_connections;
        if self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::TooManyConnections);
        }
        match transport {
            Transport::WebSocket => self.ws.fetch_add(1, Ordering::AcqRel),
            Transport::Sse => self.sse.fetch_add(1, Ordering::AcqRel),
        };
        Ok(Slot {
            hub: self.clone(),
            transport,
            user: None,
        })
    }

    /// Records a `websocket_events` row, if a log is configured. A full log queue is
    /// reported by the log's own counters, not here.
    pub(crate) fn record(
        &self,
        event_type: &str,
        user: Option<UserId>,
        metadata: serde_json::Value,
    ) {
        if let Some(events) = &self.events {
            let mut row = WebSocketEvent::new(event_type, self.clock.as_ref()).metadata(metadata);
            if let Some(user) = user {
                row = row.user(user);
            }
            if let Err(e) = events.record(Event::WebSocket(row)) {
                tracing::debug!(error = %e, event_type, "a realtime event was not logged");
            }
        }
    }

    /// Adds `subscriber` to `room`'s readers and waits until the room's live feed is
    /// up. Events published after this returns reach it. Returns the room's name
    /// as its events carry it, so a reader can match them by pointer.
    pub(crate) async fn join(
        self: &Arc<Self>,
        room: &str,
        subscriber: Arc<Subscriber>,
    ) -> Result<Arc<str>> {
        let id = subscriber.id;
        let (room, created) = {
            let mut rooms = self.lock_rooms();
            let (room, created) = match rooms.get(room) {
                Some(room) => (room.clone(), false),
                None => {
                    let name: Arc<str> = Arc::from(room);
                    let fresh = Arc::new(Room {
                        name: name.clone(),
                        subscribers: RwLock::new(HashMap::new()),
                        ready: watch::channel(None).0,
                        task: Mutex::new(None),
                    });
                    rooms.insert(name, fresh.clone());
                    (fresh, true)
                }
            };
            room.write_subscribers().insert(id, subscriber);
            (room, created)
        };
        if created {
            let hub = self.clone();
            let task_room = room.clone();
            let handle = tokio::spawn(async move { hub.run_room(task_room).await });
            *room.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle.abort_handle());
        }
        let mut ready = room.ready.subscribe();
        let up = match ready.wait_for(Option::is_some).await {
            Ok(state) => state.unwrap_or(false),
            Err(_) => false,
        };
        if up {
            Ok(room.name.clone())
        } else {
            self.leave(&room.name, id);
            Err(crate::Error::Backend {
                backend: self.broadcaster.state().kind,
                source: "the room's live feed could not be opened".into(),
            })
        }
    }

    /// Removes connection `id` from `room`; the last reader out stops the room's feed.
    pub(crate) fn leave(&self, room: &str, id: u64) {
        let mut rooms = self.lock_rooms();
        let Some(entry) = rooms.get(room) else { return };
        let mut subscribers = entry.write_subscribers();
        subscribers.remove(&id);
        if subscribers.is_empty() {
            drop(subscribers);
            if let Some(entry) = rooms.remove(room)
                && let Some(task) = entry.task.lock().unwrap_or_else(|e| e.into_inner()).take()
            {
                task.abort();
            }
        }
    }

    /// The room's live feed: from the broadcaster to every reader's queue, with holes
    /// filled from history.
    async fn run_room(self: Arc<Self>, room: Arc<Room>) {
        let mut feed = match self.broadcaster.subscribe(&room.name).await {
            Ok(feed) => feed,
            Err(e) => {
                tracing::warn!(room = %room.name, error = %e, "a room's live feed could not be opened");
                room.ready.send_replace(Some(false));
                let mut rooms = self.lock_rooms();
                if rooms.get(&room.name).is_some_and(|r| Arc::ptr_eq(r, &room)) {
                    rooms.remove(&room.name);
                }
                return;
            }
        };
        // Where the room stood when the feed opened, read before any reader reads its
        // own (they wait for `ready`): a first live event of another numbering is then
        // a restart too, and one at or below it in this numbering a repeat. An empty
        // room (or a head that could not be read) leaves it to the feed's first event,
        // which is then announced to readers of any other numbering.
        let mut last = match self.broadcaster.head(&room.name).await {
            Ok(head) if head != Position::default() => Some(head),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(room = %room.name, error = %e, "a room's head could not be read when its feed opened");
                None
            }
        };
        room.ready.send_replace(Some(true));
        // Events in order, gathered while more wait in the feed: fanned out together
        // once none waits (or the batch is full), so a room whose fan-out falls behind
        // costs each reader one send per batch.
        let mut batch = Gathered::default();
        loop {
            use tokio::sync::broadcast::error::{RecvError, TryRecvError};
            let next = if batch.events.is_empty() {
                feed.recv().await
            } else {
                // `try_recv` spends none of the task's budget: a room that stays behind
                // would otherwise keep its worker for many batches.
                tokio::task::coop::consume_budget().await;
                match feed.try_recv() {
                    Ok(event) => Ok(event),
                    Err(TryRecvError::Empty) => {
                        self.flush(&room, &mut batch).await;
                        continue;
                    }
                    Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                    Err(TryRecvError::Closed) => Err(RecvError::Closed),
                }
            };
            let event = match next {
                Ok(event) => event,
                // The hole shows as a jump in `seq` on the next event.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => {
                    self.flush(&room, &mut batch).await;
                    tracing::error!(room = %room.name, "the broadcaster closed a room's feed");
                    self.reset(&room, "broker_closed").await;
                    return;
                }
            };
            let in_step = last.is_some_and(|seen| {
                seen.epoch == event.epoch && seen.seq.checked_add(1) == Some(event.seq)
            });
            if !in_step {
                // Whatever this event turns out to be (a repeat, a hole, a restart), the
                // events before it go out first.
                self.flush(&room, &mut batch).await;
            }
            if let Some(seen) = last.filter(|_| !in_step) {
                let same_epoch = seen.epoch != 0 && seen.epoch == event.epoch;
                if same_epoch && event.seq <= seen.seq {
                    // Published before the head above was read: every reader's
                    // position is at or past it.
                    continue;
                }
                if !seen.same_numbering(event.position())
                    && !self.is_current(&room, event.epoch).await
                {
                    // An event of a numbering the room no longer has, still in flight
                    // after the head above was read in a newer one. (Skipped too when
                    // the head cannot be read: a real new numbering shows again with its
                    // next event, and the reset then covers this one.)
                    continue;
                }
                if !seen.same_numbering(event.position()) || event.seq <= seen.seq {
                    // The feed gives each event of a numbering once, in order: another
                    // epoch (or, from a broadcaster without epochs, a `seq` going back)
                    // means the room started again (its numbers were lost with its
                    // history). Every reader resumes from here, told that what came
                    // before is gone.
                    let head = Position::new(event.seq.saturating_sub(1), event.epoch);
                    self.restarted(&room, seen.seq, head).await;
                } else if event.seq > seen.seq + 1 {
                    let epoch = if seen.epoch == 0 {
                        event.epoch
                    } else {
                        seen.epoch
                    };
                    self.repair(&room, Position::new(seen.seq, epoch), event.seq)
                        .await;
                }
            }
            if last.is_none() && event.epoch != 0 {
                // The feed's first event, with nothing known before it. One of a
                // numbering the room no longer has (in flight while its keys went) is
                // not news; otherwise readers of another numbering (positioned by their
                // own head read) are told. Not counted as a reset: usually nobody is in
                // another numbering.
                if !self.is_current(&room, event.epoch).await {
                    continue;
                }
                let head = Position::new(event.seq.saturating_sub(1), event.epoch);
                self.announce(&room, head, 0).await;
            }
            last = Some(event.position());
            let encoded = Arc::new(Encoded::new(&event, room.name.clone()));
            if batch.push(encoded, self.batch_events()) {
                self.flush(&room, &mut batch).await;
            }
        }
    }

    /// The most events in one batch: [`BATCH_EVENTS`], and at most half a connection's
    /// queue, since a reader the socket takes none of gets the batch queued at once (a
    /// reader keeping up must not be closed as too slow for a burst).
    fn batch_events(&self) -> usize {
        BATCH_EVENTS.min(self.config.queue_capacity / 2).max(1)
    }

    /// Fans out the events gathered in `batch`, if any.
    async fn flush(self: &Arc<Self>, room: &Arc<Room>, batch: &mut Gathered) {
        if batch.events.is_empty() {
            return;
        }
        let events = std::mem::take(batch).events;
        let batch = Batch::new(events, self.config.direct_writes);
        self.fan_out(room, Outgoing::Events(batch)).await;
    }

    /// Fans out `events` (in order), in batches within the limits.
    async fn fan_out_events(self: &Arc<Self>, room: &Arc<Room>, events: Vec<Arc<Encoded>>) {
        let mut batch = Gathered::default();
        for event in events {
            if batch.push(event, self.batch_events()) {
                self.flush(room, &mut batch).await;
            }
        }
        self.flush(room, &mut batch).await;
    }

    /// Delivers the events between `seen` and `next` (both exclusive, in `seen`'s
    /// numbering) from history, or a reset when history no longer has them.
    async fn repair(self: &Arc<Self>, room: &Arc<Room>, seen: Position, next: u64) {
        let mut after = seen.seq;
        while after + 1 < next {
            let want = ((next - after - 1) as usize).min(self.config.replay_page);
            let from = Position::new(after, seen.epoch);
            match self.broadcaster.replay(&room.name, from, want).await {
                Ok(Replay::Events(events)) if !events.is_empty() => {
                    let mut page = Vec::with_capacity(events.len());
                    for event in events {
                        if event.seq <= after || event.seq >= next {
                            continue;
                        }
                        after = event.seq;
                        page.push(Arc::new(Encoded::new(&event, room.name.clone())));
                    }
                    self.fan_out_events(room, page).await;
                    self.counters.gaps.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Replay::Gone { reason }) => {
                    self.reset(room, reason).await;
                    return;
                }
                Ok(Replay::Events(_)) => {
                    self.reset(room, "history_expired").await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(room = %room.name, error = %e, "a hole in a room's feed could not be filled");
                    self.reset(room, "broker_unavailable").await;
                    return;
                }
            }
        }
    }

    /// The room started again at 1: `seen` was the feed's last event in the old
    /// numbering, `head` is the last before the one at hand in the new. Every reader
    /// still in the old numbering gets `reset` (`room_restarted`) and resumes after
    /// `head`, although it had read further.
    async fn restarted(self: &Arc<Self>, room: &Arc<Room>, seen: u64, head: Position) {
        tracing::warn!(room = %room.name, seen, head = head.seq, epoch = head.epoch, "a room started a new numbering: its readers get reset");
        self.counters.resets.fetch_add(1, Ordering::Relaxed);
        self.announce(room, head, seen).await;
    }

    /// Whether `epoch` is the room's numbering now, as its head says (false when the
    /// head cannot be read).
    async fn is_current(&self, room: &Room, epoch: u32) -> bool {
        matches!(self.broadcaster.head(&room.name).await, Ok(head) if head.epoch == epoch)
    }

    /// The numbering of `head` is the room's (the old one reached `old`): readers in
    /// another one get `reset` (`room_restarted`), readers in it (and readers that read
    /// nothing, when `head` is the numbering's start) nothing.
    async fn announce(self: &Arc<Self>, room: &Arc<Room>, head: Position, old: u64) {
        self.fan_out(
            room,
            Outgoing::Reset(Arc::new(RoomReset {
                room: room.name.clone(),
                reason: "room_restarted",
                head: Some(head),
                restarted_from: Some(old),
            })),
        )
        .await;
    }

    async fn reset(self: &Arc<Self>, room: &Arc<Room>, reason: &'static str) {
        self.counters.resets.fetch_add(1, Ordering::Relaxed);
        let head = self.broadcaster.head(&room.name).await.ok();
        self.fan_out(
            room,
            Outgoing::Reset(Arc::new(RoomReset {
                room: room.name.clone(),
                reason,
                head,
                restarted_from: None,
            })),
        )
        .await;
    }

    /// Hands `outgoing` to every reader: events straight to the socket where the
    /// reader's gate is open and it is in step (see [`crate::direct`]), anything else to
    /// the reader's queue, where a full queue closes its connection.
    ///
    /// A room of [`FAN_OUT_PART`] readers or more is written on the blocking pool, by up
    /// to one thread per core, each to its part of the readers: its milliseconds of
    /// sends (tens of them for 10,000 readers) would otherwise hold a worker from every
    /// other task, and tokio keeps a task spawned from a busy worker for that worker, so
    /// parts spawned as tasks would not even run at once. The next delivery starts when
    /// all parts are done, so each reader's order holds.
    async fn fan_out(self: &Arc<Self>, room: &Arc<Room>, outgoing: Outgoing) {
        // The readers as they are now, so that the room's lock is not held while they are
        // written to (joining and leaving wait for it, holding the hub's room table). A
        // reader that leaves meanwhile is written nothing: its mark was retired under its
        // closed gate (`Session::stop_reading`), and an event its queue still gets is one
        // it no longer reads.
        let readers: Arc<[Arc<Subscriber>]> = room.read_subscribers().values().cloned().collect();
        // What the sends copy into sockets, at most: a few hundred frames, or a
        // few batches of one, are written here.
        let bytes = match &outgoing {
            Outgoing::Events(batch) => batch.len_bytes(),
            Outgoing::Reset(_) => 0,
        };
        if readers.len() < FAN_OUT_PART && readers.len() * bytes < FAN_OUT_INLINE_BYTES {
            self.fan_out_part(room, &outgoing, &readers);
            return;
        }
        let outgoing = Arc::new(outgoing);
        let parts = self.fan_out_parts.min(readers.len() / FAN_OUT_PART).max(1);
        // At most a thread per core for all rooms' fan-outs together: the blocking pool
        // is shared with the host's blocking work, and more threads would not send faster.
        // Every permit is taken at once (no two rooms each holding part of what they
        // need), then one goes with each part, so it is held until that part is done
        // even if this task is dropped meanwhile.
        let mut slots = Some(
            self.fan_out_slots
                .clone()
                .acquire_many_owned(parts as u32)
                .await
                .expect("the fan-out's semaphore is never closed"),
        );
        let size = readers.len().div_ceil(parts);
        let mut handles = Vec::with_capacity(parts);
        for part in 0..parts {
            let (hub, room, outgoing) = (self.clone(), room.clone(), outgoing.clone());
            let readers = readers.clone();
            let range = part * size..readers.len().min((part + 1) * size);
            let slot = if part + 1 < parts {
                slots.as_mut().and_then(|all| all.split(1))
            } else {
                slots.take()
            };
            handles.push(tokio::task::spawn_blocking(move || {
                hub.fan_out_part(&room, &outgoing, &readers[range]);
                drop(slot);
            }));
        }
        for handle in handles {
            // A part that panicked has said so in the log; the others are delivered.
            let _ = handle.await;
        }
    }

    /// `readers` of `room` get `outgoing`.
    pub(crate) fn fan_out_part(
        &self,
        room: &Room,
        outgoing: &Outgoing,
        readers: &[Arc<Subscriber>],
    ) {
        let mut gone = Vec::new();
        let (mut queued, mut direct) = (0u64, 0u64);
        for subscriber in readers.chunks(WARM_RUN).flat_map(warm) {
            let mut gate = subscriber.shared.gate.lock();
            // Queued under the gate's lock: the task opens the gate only when it finds its
            // queue empty, under the same lock.
            let sent = match outgoing {
                Outgoing::Events(batch) => {
                    let wrote = gate.write(&subscriber.mark, batch);
                    direct += wrote.handed as u64;
                    let rest = &batch.events[wrote.handed..];
                    if rest.is_empty() && !wrote.partly {
                        continue;
                    }
                    gate.close_to_queue();
                    // The end of a frame begun, then the events not handed, in order.
                    let wake = wrote.partly.then_some(Delivery::Rest);
                    let events = rest.iter().map(|e| Delivery::Event(e.clone()));
                    let mut sent = Ok(());
                    for delivery in wake.into_iter().chain(events) {
                        let counted = matches!(delivery, Delivery::Event(_));
                        sent = subscriber.tx.try_send(delivery);
                        if sent.is_err() {
                            break;
                        }
                        queued += u64::from(counted);
                    }
                    sent
                }
                Outgoing::Reset(reset) => {
                    gate.close_to_queue();
                    subscriber.tx.try_send(Delivery::Reset(reset.clone()))
                }
            };
            match sent {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if subscriber.shared.close_code().is_none() {
                        self.counters.slow.fetch_add(1, Ordering::Relaxed);
                    }
                    subscriber.shared.close(CLOSE_TOO_SLOW);
                    gone.push(subscriber);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(subscriber),
            }
        }
        self.counters
            .delivered
            .fetch_add(queued + direct, Ordering::Relaxed);
        self.counters.direct.fetch_add(direct, Ordering::Relaxed);
        if !gone.is_empty() {
            // The connection leaves its other rooms itself when it closes.
            let mut subscribers = room.write_subscribers();
            for subscriber in gone {
                if subscribers
                    .get(&subscriber.id)
                    .is_some_and(|s| Arc::ptr_eq(s, subscriber))
                {
                    subscribers.remove(&subscriber.id);
                }
            }
        }
    }
}

/// What a fan-out hands every reader of a room.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Events, written to sockets where they can be, else queued one by one.
    Events(Batch),
    /// Always queued.
    Reset(Arc<RoomReset>),
}

/// Events gathered for one batch, and their frames' size.
#[derive(Debug, Default)]
struct Gathered {
    events: Vec<Arc<Encoded>>,
    bytes: usize,
}

impl Gathered {
    /// Adds `event`; whether the batch is full (`most` events, or [`BATCH_BYTES`]).
    fn push(&mut self, event: Arc<Encoded>, most: usize) -> bool {
        self.bytes += event.frame.len();
        self.events.push(event);
        self.events.len() >= most || self.bytes >= BATCH_BYTES
    }
}

/// The most events a room gathers into one batch while its fan-out is behind (and at
/// most half a connection's queue: `Inner::batch_events`).
const BATCH_EVENTS: usize = 256;

/// A fan-out that copies more than this into sockets goes to the blocking pool, however
/// few its readers (256 readers of 1 KiB frames stay on the room's task).
const FAN_OUT_INLINE_BYTES: usize = 256 * 1024;
/// The most frame bytes a batch gathers (then it goes out): what a connection's task
/// gathers into one write too.
const BATCH_BYTES: usize = crate::coalesce::LIMIT;

/// Readers per part of a room's fan-out at least: a smaller room is written by its own
/// task (a few hundred sends take about a millisecond, and a hand-over to the blocking
/// pool costs a thread wake-up).
const FAN_OUT_PART: usize = 256;

/// Readers the fan-out warms together ([`warm`]).
const WARM_RUN: usize = 16;

/// Brings what the fan-out reads first of each of `run` into the cache, all of them at
/// once, and gives the run back.
///
/// Each reader costs two waits on memory before its send: its own record (which points
/// to its connection) and its connection's gate. Between two readers the kernel's send
/// has pushed both out of the cache, so in a large room those waits were nearly all of
/// the fan-out's own time. Plain loads of different readers do not depend on each
/// other, so the processor has a run's worth in flight together: the run waits about
/// twice, not twice per reader. Only what needs no lock is read here.
fn warm(run: &[Arc<Subscriber>]) -> &[Arc<Subscriber>] {
    let mut shared: [Option<&ConnShared>; WARM_RUN] = [None; WARM_RUN];
    for (slot, subscriber) in shared.iter_mut().zip(run) {
        *slot = Some(&*subscriber.shared);
    }
    for conn in shared.iter().flatten() {
        std::hint::black_box(conn.gate.warm());
    }
    run
}

/// Resolves once the hub starts shutting down (or is gone).
pub(crate) async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // `changed` rather than `wait_for`: every connection waits on this for its whole
    // life, and `changed`'s future is the smaller.
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}
