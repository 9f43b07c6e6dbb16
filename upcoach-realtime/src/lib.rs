//! Live updates for upcoach servers: the [`Broadcaster`] seam.
//!
//! This crate is at its first step: the trait, the event it carries and its error type
//! are settled so producers and the other crates can code against them. The in-process
//! and Redis broadcasters, the hub, and the WebSocket and SSE transports are not built
//! yet.
//!
//! A room is a string (`metrics`, `user:{id}`); every event published to a room gets
//! the next sequence number of that room, across every process that shares the
//! broadcaster, so a client can resume exactly where it stopped.
//!
//! Implementing a broadcaster (one process, no history, for illustration only):
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::SystemTime;
//! use async_trait::async_trait;
//! use tokio::sync::broadcast;
//! use upcoach_realtime::{Broadcaster, Replay, Result, RoomEvent};
//!
//! #[derive(Debug, Default)]
//! struct Local {
//!     rooms: Mutex<HashMap<String, (u64, broadcast::Sender<RoomEvent>)>>,
//! }
//!
//! #[async_trait]
//! impl Broadcaster for Local {
//!     async fn publish(&self, room: &str, event: &str, data: serde_json::Value) -> Result<RoomEvent> {
//!         let mut rooms = self.rooms.lock().unwrap();
//!         let (seq, tx) = rooms.entry(room.to_owned()).or_insert_with(|| (0, broadcast::channel(64).0));
//!         *seq += 1;
//!         let published = RoomEvent { room: room.into(), seq: *seq, event: event.into(), data, ts: SystemTime::now() };
//!         let _ = tx.send(published.clone());
//!         Ok(published)
//!     }
//!     async fn subscribe(&self, room: &str) -> Result<broadcast::Receiver<RoomEvent>> {
//!         let mut rooms = self.rooms.lock().unwrap();
//!         Ok(rooms.entry(room.to_owned()).or_insert_with(|| (0, broadcast::channel(64).0)).1.subscribe())
//!     }
//!     async fn replay(&self, _room: &str, _after_seq: u64, _limit: usize) -> Result<Replay> {
//!         Ok(Replay::Gone { reason: "this broadcaster keeps no history" })
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let b = Local::default();
//! let mut rx = b.subscribe("metrics").await?;
//! let sent = b.publish("metrics", "tick", serde_json::json!({"rps": 12})).await?;
//! assert_eq!(rx.recv().await.unwrap().seq, sent.seq);
//! # Ok::<(), upcoach_realtime::Error>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// One event in one room, as every subscriber receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomEvent {
    /// The room.
    pub room: String,
    /// Its sequence number in the room: one more than the previous event's.
    pub seq: u64,
    /// The event's name (`metrics`, `alert`).
    pub event: String,
    /// The payload.
    pub data: serde_json::Value,
    /// When it was published.
    pub ts: SystemTime,
}

/// What history can give back after a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub enum Replay {
    /// Every event after the requested one (up to the limit), in order.
    Events(Vec<RoomEvent>),
    /// History no longer reaches back that far: the client must reset.
    Gone {
        /// Why, for the client's `reset` message.
        reason: &'static str,
    },
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
        matches!(self, Error::Backend { .. })
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Fan-out of room events to every subscriber, on this process and (for shared
/// backends) on every other.
#[async_trait]
pub trait Broadcaster: fmt::Debug + Send + Sync + 'static {
    /// Publishes an event to `room`, assigning it the room's next sequence number.
    async fn publish(&self, room: &str, event: &str, data: serde_json::Value) -> Result<RoomEvent>;

    /// Live events of `room` from now on. The receiver is bounded: a subscriber that
    /// falls behind sees `RecvError::Lagged` and must recover through [`replay`](Self::replay).
    async fn subscribe(&self, room: &str) -> Result<broadcast::Receiver<RoomEvent>>;

    /// The events of `room` after `after_seq`, at most `limit`, or [`Replay::Gone`] when
    /// history no longer reaches back that far.
    async fn replay(&self, room: &str, after_seq: u64, limit: usize) -> Result<Replay>;
}
