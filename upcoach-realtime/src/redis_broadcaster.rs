//! The Redis broadcaster: one Lua script numbers, stores and publishes each event;
//! pub/sub carries live events to every process, a stream per room keeps history.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::broadcast;
use upcoach_core::redis::{PubSubSource, RedisConnection, RedisOptions};
use upcoach_core::{Clock, SystemClock};

use crate::{
    Broadcaster, BrokerState, Error, HistoryLimits, Position, Replay, Result, RoomEvent,
    Subscription, encode_data, new_epoch, validate_event_name, validate_room,
};

/// Live events buffered per room on this process (see [`Subscription`]).
const CHANNEL_CAPACITY: usize = 1024;

/// `KEYS[1]` the room's counter, `KEYS[2]` its stream, `KEYS[3]` its epoch; `ARGV[1]`
/// `ts|event|data`, `ARGV[2]` the counter's (and epoch's) TTL (ms), `ARGV[3]` MAXLEN,
/// `ARGV[4]` the stream's TTL (ms), `ARGV[5]` the channel, `ARGV[6]` a fresh epoch,
/// used when the numbering starts (event 1) or has none (its epoch was lost alone).
/// Numbering, storing and publishing in one script keeps the room's order the same in
/// history and on the wire. A numbering that starts drops what is left of an old
/// stream: its ids would be ahead of the new ones.
const PUBLISH: &str = r"
local seq = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local epoch = redis.call('GET', KEYS[3])
if seq == 1 or not epoch then
  epoch = ARGV[6]
  if seq == 1 then redis.call('DEL', KEYS[2]) end
end
redis.call('SET', KEYS[3], epoch, 'PX', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[5], seq .. '.' .. epoch .. '|' .. ARGV[1])
return {seq, tonumber(epoch)}
";

/// How the Redis broadcaster names things and how long it keeps them.
#[derive(Debug, Clone)]
pub struct RedisBroadcasterOptions {
    /// Key and channel prefix (default `upcoach:rt`): `<prefix>:{<room>}:seq`,
    /// `<prefix>:{<room>}:epoch`, `<prefix>:{<room>}:log` (same hash slot, so Redis
    /// Cluster works) and the channel `<prefix>:ch:<room>`.
    pub prefix: String,
    /// History kept per room.
    pub history: HistoryLimits,
    /// How long a room's counter outlives its last event (default 30 days). A room
    /// idle for longer starts again at 1 under a new epoch; old cursors then get
    /// `reset`.
    pub counter_ttl: Duration,
    /// How long the subscriber waits for Redis when (re)connecting and for a
    /// liveness ping (default 2 s).
    pub timeout: Duration,
    /// How often the subscriber pings Redis to notice a dead connection (default 5 s).
    pub ping_interval: Duration,
    /// The clock that stamps events and ages history.
    pub clock: Arc<dyn Clock>,
}

impl Default for RedisBroadcasterOptions {
    fn default() -> Self {
        Self {
            prefix: "upcoach:rt".into(),
            history: HistoryLimits::default(),
            counter_ttl: Duration::from_secs(30 * 86_400),
            timeout: Duration::from_secs(2),
            ping_interval: Duration::from_secs(5),
            clock: Arc::new(SystemClock),
        }
    }
}

/// Publishes through Redis so that subscribers on every process sharing it receive
/// each room's events in order, numbered by one counter per room; history for replay
/// lives in a Redis stream per room (`MAXLEN ~`, plus an age bound).
///
/// One dedicated pub/sub connection per process carries live events; it reconnects
/// by itself, resubscribes, and fills the hole the outage left from history (or the
/// hub announces `reset` when history no longer has it).
///
/// ```no_run
/// use upcoach_realtime::{Broadcaster, RedisBroadcaster, RedisBroadcasterOptions};
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let b = RedisBroadcaster::connect("redis://127.0.0.1:6379", RedisBroadcasterOptions::default()).await?;
/// let sent = b.publish("alerts", "fired", serde_json::json!({"rule": "p95"})).await?;
/// println!("alerts is at seq {}", sent.seq);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RedisBroadcaster {
    inner: Arc<Inner>,
    subscriber: tokio::task::JoinHandle<()>,
}

impl Drop for RedisBroadcaster {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

struct Inner {
    manager: RedisConnection,
    options: RedisBroadcasterOptions,
    script: redis::Script,
    rooms: Mutex<HashMap<String, LocalRoom>>,
    /// The live pub/sub connection's command half; `None` while reconnecting. Held
    /// across (re)subscription so a room added meanwhile is never missed.
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    connected: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroadcaster")
            .field("prefix", &self.options.prefix)
            .field("connected", &self.connected.load(Ordering::Relaxed))
            .finish()
    }
}

#[derive(Debug)]
struct LocalRoom {
    tx: broadcast::Sender<Arc<RoomEvent>>,
    /// The newest position forwarded to this process's subscribers.
    last: Option<Position>,
}

fn backend(source: redis::RedisError) -> Error {
    Error::Backend {
        backend: "redis",
        source: Box::new(source),
    }
}

fn corrupt(what: &'static str) -> Error {
    Error::Backend {
        backend: "redis",
        source: what.into(),
    }
}

impl RedisBroadcaster {
    /// Connects to `url` (commands through a [`RedisConnection`], which reconnects by
    /// itself and replaces a link gone silent; live events through a dedicated pub/sub
    /// connection).
    ///
    /// `url` is a `redis://` URL, or a `redis+cluster://` one for a Redis Cluster (see
    /// [`ServiceUrl::cluster_seeds`](upcoach_core::config::ServiceUrl::cluster_seeds)).
    pub async fn connect(url: &str, options: RedisBroadcasterOptions) -> Result<Self> {
        let url = upcoach_core::config::ServiceUrl::parse(url, upcoach_core::config::REDIS_SCHEMES)
            .map_err(|reason| Error::Backend {
                backend: "redis",
                source: format!("the Redis URL is not usable: {reason}").into(),
            })?;
        let redis_options = RedisOptions {
            connection_timeout: options.timeout,
            response_timeout: options.timeout,
            reconnect_retries: 2,
        };
        let manager = RedisConnection::connect(&url, redis_options)
            .await
            .map_err(|e| Error::Backend {
                backend: "redis",
                source: Box::new(e),
            })?;
        let pubsub = manager
            .pubsub()
            .cloned()
            .ok_or_else(|| corrupt("the connection has no pub/sub source"))?;
        Ok(Self::new(pubsub, manager, options))
    }

    /// The broadcaster of a server on `redis` (its keys and channels under
    /// `{prefix}:rt`), or `None` when the connection was made from a bare manager (no
    /// client for the subscription).
    pub fn on(
        redis: &RedisConnection,
        prefix: &str,
        clock: Arc<dyn upcoach_core::Clock>,
    ) -> Option<Self> {
        let options = RedisBroadcasterOptions {
            prefix: format!("{prefix}:rt"),
            clock,
            ..RedisBroadcasterOptions::default()
        };
        Some(Self::new(redis.pubsub()?.clone(), redis.clone(), options))
    }

    /// A broadcaster on an existing connection; `pubsub` opens the pub/sub connection
    /// (a `redis::Client` will do, or [`RedisConnection::pubsub`]).
    pub fn new(
        pubsub: impl Into<PubSubSource>,
        manager: RedisConnection,
        options: RedisBroadcasterOptions,
    ) -> Self {
        let inner = Arc::new(Inner {
            manager,
            options,
            script: redis::Script::new(PUBLISH),
            rooms: Mutex::new(HashMap::new()),
            sink: tokio::sync::Mutex::new(None),
            connected: AtomicBool::new(false),
        });
        let subscriber = tokio::spawn(run_subscriber(Arc::downgrade(&inner), pubsub.into()));
        Self { inner, subscriber }
    }
}

impl Inner {
    fn rooms(&self) -> MutexGuard<'_, HashMap<String, LocalRoom>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn counter_key(&self, room: &str) -> String {
        format!("{}:{{{room}}}:seq", self.options.prefix)
    }

    fn epoch_key(&self, room: &str) -> String {
        format!("{}:{{{room}}}:epoch", self.options.prefix)
    }

    fn log_key(&self, room: &str) -> String {
        format!("{}:{{{room}}}:log", self.options.prefix)
    }

    fn channel(&self, room: &str) -> String {
        format!("{}:ch:{room}", self.options.prefix)
    }

    fn room_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.options.prefix.as_str())?
            .strip_prefix(":ch:")
    }

    /// Forwards an event to this process's subscribers, once and in order.
    ///
    /// An event of the numbering already forwarded at or below the last one is a
    /// repeat (a repair and pub/sub both carried it) and is dropped. An event of
    /// another epoch is a room that started again (a Redis that lost its keys, a
    /// counter that expired): it is forwarded, and the hub, seeing the epoch change,
    /// tells every reader `reset`.
    fn forward(&self, event: RoomEvent) {
        let mut rooms = self.rooms();
        let Some(local) = rooms.get_mut(&event.room) else {
            return;
        };
        if let Some(last) = local.last
            && last.same_numbering(event.position())
            && event.seq <= last.seq
            // A position without an epoch (a room numbered before epochs) met by an
            // event with one at or below it: a new numbering, not a repeat.
            && !(last.epoch == 0 && event.epoch != 0)
        {
            return;
        }
        local.last = Some(event.position());
        let _ = local.tx.send(Arc::new(event));
    }

    /// After a reconnect: forwards what each room published while the connection was
    /// down. What history no longer has shows as a jump in `seq`, which the hub turns
    /// into `reset`. A room whose numbering changed (Redis lost its keys) has its new
    /// numbering's events forwarded from 1, and the hub, seeing the epoch change,
    /// announces `reset` before them.
    async fn repair(&self) {
        let positions: Vec<(String, Position)> = self
            .rooms()
            .iter()
            .filter_map(|(room, local)| Some((room.clone(), local.last?)))
            .collect();
        // The command connection may have died in the same outage without noticing yet:
        // its first command then fails while it reconnects in the background, and the
        // next one goes through. A few retries for the whole pass, so a Redis that is
        // still down does not hold the subscriber here for long.
        let mut retries = 3u32;
        for (room, mut after) in positions {
            loop {
                match self.replay(&room, after, 500).await {
                    Ok(Replay::Events(events)) if !events.is_empty() => {
                        for event in events {
                            after = event.position();
                            self.forward(RoomEvent::clone(&event));
                        }
                    }
                    Ok(Replay::Gone {
                        reason: "room_restarted" | "cursor_ahead_of_room",
                    }) if after != Position::default() => {
                        tracing::warn!(
                            room,
                            "a room started a new numbering while the broker connection was down (Redis lost its keys): its readers get reset"
                        );
                        // Forward the new numbering from its start, whatever was
                        // forwarded of the old one.
                        if let Some(local) = self.rooms().get_mut(&room) {
                            local.last = None;
                        }
                        after = Position::default();
                    }
                    Ok(_) => break,
                    Err(_) if retries > 0 => {
                        retries -= 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => {
                        tracing::warn!(room, error = %e, "could not fill a room's hole after reconnecting");
                        break;
                    }
                }
            }
        }
    }

    async fn head(&self, room: &str) -> Result<Position> {
        validate_room(room)?;
        let mut conn = self.manager.clone();
        let (seq, epoch): (Option<u64>, Option<u32>) = redis::pipe()
            .atomic()
            .get(self.counter_key(room))
            .get(self.epoch_key(room))
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(Position::new(seq.unwrap_or(0), epoch.unwrap_or(0)))
    }

    async fn replay(&self, room: &str, after: Position, limit: usize) -> Result<Replay> {
        validate_room(room)?;
        let mut conn = self.manager.clone();
        let after_seq = after.seq;
        // One transaction, so the head, its epoch and the history are of one numbering.
        let (head, epoch, entries): (Option<u64>, Option<u32>, Vec<StreamEntry>) = redis::pipe()
            .atomic()
            .get(self.counter_key(room))
            .get(self.epoch_key(room))
            .cmd("XRANGE")
            .arg(self.log_key(room))
            .arg(format!("({after_seq}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let head = head.unwrap_or(0);
        let epoch = epoch.unwrap_or(0);
        if after.epoch != 0 && after.epoch != epoch && (epoch != 0 || after_seq > 0) {
            return Ok(Replay::Gone {
                reason: "room_restarted",
            });
        }
        if after_seq > head {
            return Ok(Replay::Gone {
                reason: "cursor_ahead_of_room",
            });
        }
        if after_seq == head || limit == 0 {
            return Ok(Replay::Events(Vec::new()));
        }
        let now = self.options.clock.now();
        let mut events = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let seq = id
                .split_once('-')
                .and_then(|(seq, _)| seq.parse::<u64>().ok())
                .ok_or_else(|| corrupt("a history entry has no sequence number"))?;
            let body = fields
                .chunks(2)
                .find(|pair| pair.first().is_some_and(|k| k == b"d"))
                .and_then(|pair| pair.get(1))
                .ok_or_else(|| corrupt("a history entry has no body"))?;
            events.push(Arc::new(decode(room, Position::new(seq, epoch), body)?));
        }
        let Some(first) = events.first() else {
            return Ok(Replay::Gone {
                reason: "history_expired",
            });
        };
        if first.seq != after_seq + 1 {
            return Ok(Replay::Gone {
                reason: "history_expired",
            });
        }
        if now
            .duration_since(first.ts)
            .is_ok_and(|age| age > self.options.history.max_age)
        {
            return Ok(Replay::Gone {
                reason: "history_expired",
            });
        }
        Ok(Replay::Events(events))
    }
}

/// One `XRANGE` entry: its id and its field/value pairs.
type StreamEntry = (String, Vec<Vec<u8>>);

/// Reads `ts|event|data` (the stream entry) into an event of `room` at `at`.
fn decode(room: &str, at: Position, body: &[u8]) -> Result<RoomEvent> {
    let text = std::str::from_utf8(body).map_err(|_| corrupt("an event is not UTF-8"))?;
    let mut parts = text.splitn(3, '|');
    let (Some(ts), Some(event), Some(data)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(corrupt("an event is not ts|event|data"));
    };
    let ts: u64 = ts
        .parse()
        .map_err(|_| corrupt("an event's time is not a number"))?;
    let data = serde_json::from_str(data).map_err(|_| corrupt("an event's data is not JSON"))?;
    Ok(RoomEvent {
        room: room.to_owned(),
        seq: at.seq,
        epoch: at.epoch,
        event: event.to_owned(),
        data,
        ts: SystemTime::UNIX_EPOCH + Duration::from_millis(ts),
    })
}

/// Reads a pub/sub payload `seq.epoch|ts|event|data` (`seq|…` from a publisher that
/// predates epochs: epoch not known).
fn decode_live(room: &str, payload: &[u8]) -> Result<RoomEvent> {
    let split = payload
        .iter()
        .position(|b| *b == b'|')
        .ok_or_else(|| corrupt("a live event has no sequence number"))?;
    let number = std::str::from_utf8(&payload[..split])
        .map_err(|_| corrupt("a live event's sequence number is not a number"))?;
    let (seq, epoch) = number.split_once('.').unwrap_or((number, "0"));
    let seq = seq
        .parse::<u64>()
        .ok()
        .filter(|seq| *seq > 0)
        .ok_or_else(|| corrupt("a live event's sequence number is not a number from 1"))?;
    let epoch = epoch
        .parse::<u32>()
        .map_err(|_| corrupt("a live event's epoch is not a number"))?;
    decode(room, Position::new(seq, epoch), &payload[split + 1..])
}

async fn run_subscriber(inner: Weak<Inner>, source: PubSubSource) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let timeout = strong.options.timeout;
        let ping_every = strong.options.ping_interval;
        let session = async {
            let pubsub = tokio::time::timeout(timeout, source.open())
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            let (sink, stream) = pubsub.split();
            let mut guard = strong.sink.lock().await;
            let channels: Vec<String> = strong.rooms().keys().map(|r| strong.channel(r)).collect();
            let mut subscribing = sink.clone();
            if !channels.is_empty() {
                tokio::time::timeout(timeout, subscribing.subscribe(&channels))
                    .await
                    .map_err(|_| "subscribe timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
            }
            *guard = Some(sink.clone());
            drop(guard);
            Ok::<_, String>((sink, stream))
        }
        .await;
        let (mut sink, mut stream) = match session {
            Ok(parts) => parts,
            Err(e) => {
                if strong.connected.swap(false, Ordering::AcqRel) {
                    tracing::warn!(error = %e, "realtime broker connection lost");
                }
                tracing::debug!(error = %e, "realtime broker reconnect failed");
                drop(strong);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        strong.repair().await;
        if !strong.connected.swap(true, Ordering::AcqRel) {
            tracing::info!("realtime broker connected");
        }
        backoff = Duration::from_millis(50);
        drop(strong);

        let mut ping = tokio::time::interval(ping_every);
        ping.tick().await;
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else { break };
                    let Some(strong) = inner.upgrade() else { return };
                    let Some(room) = strong.room_of(message.get_channel_name()) else { continue };
                    match decode_live(room, message.get_payload_bytes()) {
                        Ok(event) => strong.forward(event),
                        Err(e) => tracing::warn!(room, error = %e, "an undecodable live event was skipped; the next event repairs the hole"),
                    }
                }
                _ = ping.tick() => {
                    let Some(strong) = inner.upgrade() else { return };
                    // Liveness: a half-open connection would otherwise go unnoticed. Any
                    // reply will do: with a subscription, RESP2 answers `["pong", ""]`,
                    // not `PONG`.
                    let alive = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                    // Rooms nobody on this process reads any more are unsubscribed,
                    // under the sink's lock: a `subscribe` of the same room in between
                    // would otherwise send its SUBSCRIBE before this UNSUBSCRIBE and
                    // be left without live events.
                    let _subscribing = strong.sink.lock().await;
                    let idle: Vec<String> = {
                        let mut rooms = strong.rooms();
                        let idle: Vec<String> = rooms
                            .iter()
                            .filter(|(_, local)| local.tx.receiver_count() == 0)
                            .map(|(room, _)| room.clone())
                            .collect();
                        for room in &idle {
                            rooms.remove(room);
                        }
                        idle
                    };
                    if !idle.is_empty() {
                        let channels: Vec<String> = idle.iter().map(|r| strong.channel(r)).collect();
                        let _ = tokio::time::timeout(timeout, sink.unsubscribe(&channels)).await;
                    }
                }
            }
        }
        if let Some(strong) = inner.upgrade() {
            *strong.sink.lock().await = None;
            strong.connected.store(false, Ordering::Release);
            tracing::warn!("realtime broker connection lost; reconnecting");
        }
    }
}

#[async_trait]
impl Broadcaster for RedisBroadcaster {
    async fn publish(
        &self,
        room: &str,
        event: &str,
        data: serde_json::Value,
    ) -> Result<Arc<RoomEvent>> {
        validate_room(room)?;
        validate_event_name(event)?;
        let json = encode_data(&data)?;
        let inner = &self.inner;
        let ts = inner.options.clock.now();
        let ts_ms = ts
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let body = format!("{ts_ms}|{event}|{json}");
        let mut conn = inner.manager.clone();
        let (seq, epoch): (u64, u32) = inner
            .script
            .key(inner.counter_key(room))
            .key(inner.log_key(room))
            .key(inner.epoch_key(room))
            .arg(body)
            .arg(inner.options.counter_ttl.as_millis().max(1) as u64)
            .arg(inner.options.history.max_events.max(1))
            .arg(inner.options.history.max_age.as_millis().max(1) as u64)
            .arg(inner.channel(room))
            .arg(new_epoch())
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(Arc::new(RoomEvent {
            room: room.to_owned(),
            seq,
            epoch,
            event: event.to_owned(),
            data,
            ts: SystemTime::UNIX_EPOCH + Duration::from_millis(ts_ms),
        }))
    }

    async fn subscribe(&self, room: &str) -> Result<Subscription> {
        validate_room(room)?;
        let inner = &self.inner;
        let mut sink = inner.sink.lock().await;
        let (rx, fresh) = {
            let mut rooms = inner.rooms();
            match rooms.get(room) {
                Some(local) => (local.tx.subscribe(), false),
                None => {
                    let (tx, rx) = broadcast::channel(CHANNEL_CAPACITY);
                    rooms.insert(room.to_owned(), LocalRoom { tx, last: None });
                    (rx, true)
                }
            }
        };
        if !fresh {
            return Ok(Subscription::new(rx));
        }
        let forget = |e: Error| {
            inner.rooms().remove(room);
            e
        };
        if let Some(live) = sink.as_mut() {
            tokio::time::timeout(inner.options.timeout, live.subscribe(inner.channel(room)))
                .await
                .map_err(|_| {
                    forget(Error::Backend {
                        backend: "redis",
                        source: "subscribing timed out".into(),
                    })
                })?
                .map_err(|e| forget(backend(e)))?;
        }
        // The position the room starts from here: a later reconnect fills the hole
        // after it, and anything at or before it is not live news to this process.
        // (Not connected: the subscriber subscribes the room when it reconnects.)
        let head = self.head(room).await.map_err(forget)?;
        drop(sink);
        if let Some(local) = inner.rooms().get_mut(room) {
            // A live event forwarded meanwhile is as new as the head or newer.
            local.last = Some(match local.last {
                Some(last) if !last.same_numbering(head) || last.seq >= head.seq => last,
                _ => head,
            });
        }
        Ok(Subscription::new(rx))
    }

    async fn replay(&self, room: &str, after: Position, limit: usize) -> Result<Replay> {
        self.inner.replay(room, after, limit).await
    }

    async fn head(&self, room: &str) -> Result<Position> {
        self.inner.head(room).await
    }

    fn state(&self) -> BrokerState {
        BrokerState {
            kind: "redis",
            connected: self.inner.connected.load(Ordering::Acquire),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::decode_live;
    use crate::Position;

    /// A live payload: `seq.epoch|ts|event|data`, or `seq|…` from a publisher before
    /// epochs; a sequence number must be a number from 1 (0 would wrap the hub's
    /// `seq - 1`).
    #[test]
    fn live_payloads_are_read_strictly() {
        let event = decode_live("x", b"5.77|1700000000000|tick|{\"n\":1}").unwrap();
        assert_eq!(
            (event.position(), event.event.as_str()),
            (Position::new(5, 77), "tick")
        );
        let legacy = decode_live("x", b"5|1700000000000|tick|null").unwrap();
        assert_eq!(legacy.position(), Position::new(5, 0));
        for bad in [
            &b"0.77|1700000000000|tick|null"[..],
            b"0|1700000000000|tick|null",
            b"-1|1700000000000|tick|null",
            b"5.x|1700000000000|tick|null",
            b"5.77|1700000000000|tick",
            b"no separator",
        ] {
            assert!(
                decode_live("x", bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
