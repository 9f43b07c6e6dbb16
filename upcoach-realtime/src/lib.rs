#![doc = include_str!("../README.md")]

mod access;
mod coalesce;
mod cursor;
mod direct;
#[doc(hidden)]
pub mod fuzzing;
mod hub;
mod memory;
mod operate;
mod pending;
#[cfg(feature = "redis")]
mod redis_broadcaster;
mod respond;
mod session;
mod sse;
#[cfg(feature = "testing")]
pub mod testing;
mod wire;
mod ws;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::broadcast;

pub use access::{DefaultRoomAccess, RoomAccess};
pub use cursor::{Cursor, CursorError, MAX_CURSOR_ROOMS};
pub use hub::{
    ConnectionCounts, Hub, HubBuilder, HubConfig, HubStats, HubStatus, HubStopping, RealtimeBody,
    RealtimeCheck, RoomStatus,
};
pub use memory::MemoryBroadcaster;
pub use operate::PUBLISH_BODY_LIMIT;
#[cfg(feature = "redis")]
pub use redis_broadcaster::{RedisBroadcaster, RedisBroadcasterOptions};

/// The longest room name accepted.
pub const MAX_ROOM_LEN: usize = 128;
/// The longest event name accepted.
pub const MAX_EVENT_NAME_LEN: usize = 64;
/// The largest event payload accepted, as serialized JSON.
pub const MAX_EVENT_DATA_LEN: usize = 64 * 1024;

/// One event in one room, as every subscriber receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomEvent {
    /// The room.
    pub room: String,
    /// Its sequence number in the room: one more than the previous event's, across
    /// every process that shares the broadcaster.
    pub seq: u64,
    /// The numbering `seq` belongs to (see [`Position::epoch`]).
    pub epoch: u32,
    /// The event's name (`metrics`, `alert`).
    pub event: String,
    /// The payload.
    pub data: serde_json::Value,
    /// When it was published (milliseconds precision on the wire).
    pub ts: SystemTime,
}

impl RoomEvent {
    /// Where a reader stands once it has this event.
    pub fn position(&self) -> Position {
        Position::new(self.seq, self.epoch)
    }

    /// `ts` as milliseconds since the Unix epoch, as the wire carries it.
    pub fn ts_millis(&self) -> u64 {
        self.ts
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// Where a reader stands in a room: the last sequence number it has, and which
/// numbering of the room that number belongs to.
///
/// A room numbers its events 1, 2, 3… for as long as its count lives. When the count is
/// lost (a Redis without persistence restarts empty, a room's counter expires, an
/// in-memory room is forgotten or its process restarts), the room starts again at 1
/// under a new `epoch`, a random number drawn when the numbering starts (Redis: with
/// its event 1; in memory: when the room is made). Comparing
/// epochs is what tells "event 5 of the new numbering" from "event 5 of the old one":
/// a reader whose epoch is not the room's gets `reset` (`room_restarted`) instead of
/// events that look continuous but are not.
///
/// Epoch 0 means "not known": a Redis room with no event yet, or a client that resumes
/// with a bare sequence number (API.md's `since` without `epoch`, a cursor from before
/// epochs). Such a position is taken at its word, as before epochs existed.
///
/// ```
/// use upcoach_realtime::Position;
///
/// let p = Position::new(120, 7);
/// assert!(p.same_numbering(Position::new(3, 7)));
/// assert!(!p.same_numbering(Position::new(3, 8)));
/// assert!(p.same_numbering(Position::from(3)), "epoch 0 is not known: no conflict");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Position {
    /// The last sequence number the reader has (0: none).
    pub seq: u64,
    /// The room's numbering; 0 when not known.
    pub epoch: u32,
}

impl Position {
    /// `seq` in numbering `epoch`.
    pub const fn new(seq: u64, epoch: u32) -> Self {
        Self { seq, epoch }
    }

    /// This position, with `epoch` where its own is not known.
    pub(crate) fn or_epoch(self, epoch: u32) -> Self {
        if self.epoch == 0 {
            Self::new(self.seq, epoch)
        } else {
            self
        }
    }

    /// Whether the two may be in the same numbering: their epochs are equal, or one of
    /// them is not known.
    pub fn same_numbering(self, other: Position) -> bool {
        self.epoch == 0 || other.epoch == 0 || self.epoch == other.epoch
    }
}

impl From<u64> for Position {
    /// `seq` in a numbering not known (epoch 0).
    fn from(seq: u64) -> Self {
        Self::new(seq, 0)
    }
}

/// A fresh epoch for a numbering that starts: random, never 0.
pub(crate) fn new_epoch() -> u32 {
    let bits = uuid::Uuid::new_v4().as_u128();
    (bits as u32).max(1)
}

/// What history can give back after a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub enum Replay {
    /// Every event after the requested one (up to the limit), in order, without gaps.
    Events(Vec<Arc<RoomEvent>>),
    /// History no longer reaches back that far, the cursor is ahead of the room, or
    /// the room's numbering is not the cursor's (`room_restarted`): the client must
    /// reset.
    Gone {
        /// Why, for the client's `reset` message.
        reason: &'static str,
    },
}

/// How much history each room keeps for replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Events kept per room (default 1,000). The Redis broadcaster trims approximately
    /// (`MAXLEN ~`), so it may keep a few more, never fewer.
    pub max_events: usize,
    /// How old an event may be and still be replayed (default 10 minutes).
    pub max_age: Duration,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            max_events: 1_000,
            max_age: Duration::from_secs(600),
        }
    }
}

/// What can go wrong in a broadcaster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The room name is not acceptable.
    #[error("invalid room name: {reason}")]
    InvalidRoom {
        /// Why.
        reason: &'static str,
    },
    /// The event name is not acceptable.
    #[error("invalid event name: {reason}")]
    InvalidEvent {
        /// Why.
        reason: &'static str,
    },
    /// The payload is larger than [`MAX_EVENT_DATA_LEN`].
    #[error("event payload of {size} bytes is over the limit of {max}")]
    TooLarge {
        /// Its serialized size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The broadcaster holds as many rooms as it may; nothing was published.
    #[error("the broadcaster holds its maximum of {max} rooms")]
    TooManyRooms {
        /// The limit.
        max: usize,
    },
    /// The broker failed or did not answer in time.
    #[error("{backend} broadcaster failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Whether trying again later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Backend { .. } | Error::TooManyRooms { .. })
    }

    /// A stable snake_case code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRoom { .. } => "invalid_room",
            Error::InvalidEvent { .. } => "invalid_event",
            Error::TooLarge { .. } => "payload_too_large",
            Error::TooManyRooms { .. } => "too_many_rooms",
            Error::Backend { .. } => "broker_unavailable",
        }
    }
}

impl upcoach_core::http::HttpError for Error {
    fn status(&self) -> http::StatusCode {
        match self {
            Error::TooLarge { .. } => http::StatusCode::PAYLOAD_TOO_LARGE,
            e if e.is_retryable() => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }

    fn code(&self) -> &'static str {
        Error::code(self)
    }

    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks a room name: 1 to [`MAX_ROOM_LEN`] bytes of ASCII letters, digits and
/// `_ - . : @`. Commas, `=`, braces and whitespace are refused: cursors and Redis keys
/// rely on that.
pub fn validate_room(room: &str) -> Result<()> {
    if room.is_empty() {
        return Err(Error::InvalidRoom { reason: "empty" });
    }
    if room.len() > MAX_ROOM_LEN {
        return Err(Error::InvalidRoom {
            reason: "longer than 128 bytes",
        });
    }
    if !room
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
    {
        return Err(Error::InvalidRoom {
            reason: "only ASCII letters, digits and _ - . : @ are allowed",
        });
    }
    Ok(())
}

/// Checks an event name: 1 to [`MAX_EVENT_NAME_LEN`] bytes of ASCII letters, digits and
/// `_ - . :`. (`reset` and `subscribed` are taken by the protocol.)
pub fn validate_event_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidEvent { reason: "empty" });
    }
    if name.len() > MAX_EVENT_NAME_LEN {
        return Err(Error::InvalidEvent {
            reason: "longer than 64 bytes",
        });
    }
    if matches!(name, "reset" | "subscribed") {
        return Err(Error::InvalidEvent {
            reason: "reserved by the protocol",
        });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err(Error::InvalidEvent {
            reason: "only ASCII letters, digits and _ - . : are allowed",
        });
    }
    Ok(())
}

/// Serializes `data` once and checks its size: what every broadcaster does before it
/// publishes.
pub fn encode_data(data: &serde_json::Value) -> Result<String> {
    let json = serde_json::to_string(data).map_err(|e| Error::Backend {
        backend: "json",
        source: Box::new(e),
    })?;
    if json.len() > MAX_EVENT_DATA_LEN {
        return Err(Error::TooLarge {
            size: json.len(),
            max: MAX_EVENT_DATA_LEN,
        });
    }
    Ok(json)
}

/// Live events of one room, from the moment [`Broadcaster::subscribe`] returned.
///
/// The buffer behind it is bounded: a subscriber that falls behind gets
/// [`broadcast::error::RecvError::Lagged`] and must fill the hole through
/// [`Broadcaster::replay`] (the hub does).
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Arc<RoomEvent>>,
}

impl Subscription {
    /// Wraps a receiver from the broadcaster's channel for the room.
    pub fn new(rx: broadcast::Receiver<Arc<RoomEvent>>) -> Self {
        Self { rx }
    }

    /// The next event, `Lagged(n)` when `n` were lost to the bound, or `Closed` when
    /// the broadcaster dropped the room.
    pub async fn recv(&mut self) -> Result<Arc<RoomEvent>, broadcast::error::RecvError> {
        self.rx.recv().await
    }

    /// The next event if one is waiting, without waiting: `Empty` when none is.
    pub fn try_recv(&mut self) -> Result<Arc<RoomEvent>, broadcast::error::TryRecvError> {
        self.rx.try_recv()
    }
}

/// What a broadcaster says about its broker, for status pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BrokerState {
    /// `memory` or `redis`.
    pub kind: &'static str,
    /// Whether live events currently flow in from the broker.
    pub connected: bool,
}

/// Fan-out of room events to every subscriber, on this process and (for shared
/// backends) on every other, with per-room sequence numbers and history for replay.
///
/// Implementing one (a toy that forwards to the in-memory broadcaster, to show the
/// surface):
///
/// ```
/// use std::sync::Arc;
/// use async_trait::async_trait;
/// use upcoach_realtime::{
///     Broadcaster, BrokerState, MemoryBroadcaster, Position, Replay, Result, RoomEvent,
///     Subscription,
/// };
///
/// #[derive(Debug, Default)]
/// struct Audited(MemoryBroadcaster);
///
/// #[async_trait]
/// impl Broadcaster for Audited {
///     async fn publish(&self, room: &str, event: &str, data: serde_json::Value) -> Result<Arc<RoomEvent>> {
///         println!("publishing {event} to {room}");
///         self.0.publish(room, event, data).await
///     }
///     async fn subscribe(&self, room: &str) -> Result<Subscription> {
///         self.0.subscribe(room).await
///     }
///     async fn replay(&self, room: &str, after: Position, limit: usize) -> Result<Replay> {
///         self.0.replay(room, after, limit).await
///     }
///     async fn head(&self, room: &str) -> Result<Position> {
///         self.0.head(room).await
///     }
///     fn state(&self) -> BrokerState {
///         self.0.state()
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let b = Audited::default();
/// let mut live = b.subscribe("metrics").await?;
/// let sent = b.publish("metrics", "tick", serde_json::json!({"rps": 12})).await?;
/// assert_eq!(sent.seq, 1);
/// assert_eq!(live.recv().await.unwrap().seq, 1);
/// assert_eq!(b.replay("metrics", Position::default(), 10).await?, Replay::Events(vec![sent.clone()]));
/// assert_eq!(b.head("metrics").await?, sent.position());
/// # Ok::<(), upcoach_realtime::Error>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait Broadcaster: fmt::Debug + Send + Sync + 'static {
    /// Publishes an event to `room`, assigning it the room's next sequence number, and
    /// keeps it in the room's history.
    async fn publish(
        &self,
        room: &str,
        event: &str,
        data: serde_json::Value,
    ) -> Result<Arc<RoomEvent>>;

    /// Live events of `room` from now on, in sequence order, each once within a
    /// numbering. An event of another epoch than the last one delivered means the room
    /// started again at 1 (its numbers were lost, as when a Redis without persistence
    /// restarts): the hub then tells every reader `reset` (`room_restarted`) and
    /// carries on from there.
    async fn subscribe(&self, room: &str) -> Result<Subscription>;

    /// The events of `room` after `after`, at most `limit`, or [`Replay::Gone`] when
    /// history no longer reaches back that far (`history_expired`), when `after.seq`
    /// is ahead of the head (`cursor_ahead_of_room`), or when `after.epoch` is known
    /// and is not the room's (`room_restarted`). `after` equal to the room's head
    /// gives an empty list.
    async fn replay(&self, room: &str, after: Position, limit: usize) -> Result<Replay>;

    /// The room's latest event's sequence number and the room's epoch (0 and 0 before
    /// the first event of a numbering, unless the broadcaster already drew one).
    async fn head(&self, room: &str) -> Result<Position>;

    /// The broker's kind and whether it is connected.
    fn state(&self) -> BrokerState;
}
