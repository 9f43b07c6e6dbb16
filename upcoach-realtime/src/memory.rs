//! The in-process broadcaster: one process, history in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::broadcast;
use upcoach_core::{Clock, SystemClock};

use crate::{
    Broadcaster, BrokerState, Error, HistoryLimits, Position, Replay, Result, RoomEvent,
    Subscription, encode_data, new_epoch, validate_event_name, validate_room,
};

/// Live events buffered per room for subscribers that are momentarily busy; the hub
/// reads its subscription promptly and repairs a lag from history.
const CHANNEL_CAPACITY: usize = 1024;

/// Publishes to subscribers of this process only, with each room's history bounded by
/// [`HistoryLimits`]. The embedded default of the reference server.
///
/// Rooms are bounded too (default 100,000): past that, a room with neither subscribers
/// nor replayable history is forgotten to make space, and if none is, publishing to a
/// new room fails with [`Error::TooManyRooms`]. A forgotten room, like every room of a
/// restarted process, starts again at 1 under a new [`epoch`](crate::Position::epoch),
/// so a cursor from before gets `reset`, never events it would take for its own.
///
/// ```
/// use upcoach_realtime::{Broadcaster, MemoryBroadcaster, Replay};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let b = MemoryBroadcaster::default();
/// b.publish("public:news", "posted", serde_json::json!({"id": 1})).await?;
/// b.publish("public:news", "posted", serde_json::json!({"id": 2})).await?;
/// let Replay::Events(missed) = b.replay("public:news", 1.into(), 100).await? else { unreachable!() };
/// assert_eq!(missed[0].data["id"], 2);
/// # Ok::<(), upcoach_realtime::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct MemoryBroadcaster {
    rooms: Mutex<HashMap<String, RoomLog>>,
    limits: HistoryLimits,
    max_rooms: usize,
    clock: Arc<dyn Clock>,
}

#[derive(Debug)]
struct RoomLog {
    seq: u64,
    epoch: u32,
    tx: broadcast::Sender<Arc<RoomEvent>>,
    history: VecDeque<Arc<RoomEvent>>,
}

impl RoomLog {
    fn new() -> Self {
        Self {
            seq: 0,
            epoch: new_epoch(),
            tx: broadcast::channel(CHANNEL_CAPACITY).0,
            history: VecDeque::new(),
        }
    }

    fn trim(&mut self, limits: &HistoryLimits, now: SystemTime) {
        while self.history.len() > limits.max_events {
            self.history.pop_front();
        }
        while let Some(oldest) = self.history.front() {
            if is_expired(oldest, limits, now) {
                self.history.pop_front();
            } else {
                break;
            }
        }
    }
}

fn is_expired(event: &RoomEvent, limits: &HistoryLimits, now: SystemTime) -> bool {
    now.duration_since(event.ts)
        .is_ok_and(|age| age > limits.max_age)
}

impl Default for MemoryBroadcaster {
    fn default() -> Self {
        Self::new(HistoryLimits::default(), Arc::new(SystemClock))
    }
}

impl MemoryBroadcaster {
    /// A broadcaster keeping `limits` of history per room, timed by `clock`.
    pub fn new(limits: HistoryLimits, clock: Arc<dyn Clock>) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            limits,
            max_rooms: 100_000,
            clock,
        }
    }

    /// Changes the bound on rooms (default 100,000).
    pub fn with_max_rooms(mut self, max_rooms: usize) -> Self {
        self.max_rooms = max_rooms.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, RoomLog>> {
        // A panic elsewhere cannot leave a room half-updated: every change below is
        // a push, a pop or an increment.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes space for one more room, or says there is none.
    fn make_space(&self, rooms: &mut HashMap<String, RoomLog>, now: SystemTime) -> Result<()> {
        if rooms.len() < self.max_rooms {
            return Ok(());
        }
        rooms.retain(|_, log| {
            log.trim(&self.limits, now);
            log.tx.receiver_count() > 0 || !log.history.is_empty()
        });
        if rooms.len() < self.max_rooms {
            Ok(())
        } else {
            Err(Error::TooManyRooms {
                max: self.max_rooms,
            })
        }
    }
}

#[async_trait]
impl Broadcaster for MemoryBroadcaster {
    async fn publish(
        &self,
        room: &str,
        event: &str,
        data: serde_json::Value,
    ) -> Result<Arc<RoomEvent>> {
        validate_room(room)?;
        validate_event_name(event)?;
        encode_data(&data)?;
        let now = self.clock.now();
        let mut rooms = self.lock();
        if !rooms.contains_key(room) {
            self.make_space(&mut rooms, now)?;
            rooms.insert(room.to_owned(), RoomLog::new());
        }
        let log = rooms.get_mut(room).expect("inserted above");
        log.seq += 1;
        let published = Arc::new(RoomEvent {
            room: room.to_owned(),
            seq: log.seq,
            epoch: log.epoch,
            event: event.to_owned(),
            data,
            ts: now,
        });
        log.history.push_back(published.clone());
        log.trim(&self.limits, now);
        // Sent under the lock so subscribers see the room's events in sequence order.
        // No receiver is not an error: the event is in history.
        let _ = log.tx.send(published.clone());
        Ok(published)
    }

    async fn subscribe(&self, room: &str) -> Result<Subscription> {
        validate_room(room)?;
        let now = self.clock.now();
        let mut rooms = self.lock();
        if !rooms.contains_key(room) {
            self.make_space(&mut rooms, now)?;
        }
        let log = rooms.entry(room.to_owned()).or_insert_with(RoomLog::new);
        Ok(Subscription::new(log.tx.subscribe()))
    }

    async fn replay(&self, room: &str, after: Position, limit: usize) -> Result<Replay> {
        validate_room(room)?;
        let now = self.clock.now();
        let mut rooms = self.lock();
        let Some(log) = rooms.get_mut(room) else {
            return Ok(replay_from(
                &VecDeque::new(),
                Position::default(),
                after,
                limit,
            ));
        };
        log.trim(&self.limits, now);
        let head = Position::new(log.seq, log.epoch);
        Ok(replay_from(&log.history, head, after, limit))
    }

    async fn head(&self, room: &str) -> Result<Position> {
        validate_room(room)?;
        Ok(self
            .lock()
            .get(room)
            .map_or(Position::default(), |log| Position::new(log.seq, log.epoch)))
    }

    fn state(&self) -> BrokerState {
        BrokerState {
            kind: "memory",
            connected: true,
        }
    }
}

/// The answer to a replay from a contiguous, trimmed history whose newest event is at
/// `head` (epoch 0: the room has no numbering, it was never published to).
fn replay_from(
    history: &VecDeque<Arc<RoomEvent>>,
    head: Position,
    after: Position,
    limit: usize,
) -> Replay {
    if after.epoch != 0 && after.epoch != head.epoch && (head.epoch != 0 || after.seq > 0) {
        return Replay::Gone {
            reason: "room_restarted",
        };
    }
    let (after_seq, head) = (after.seq, head.seq);
    if after_seq > head {
        return Replay::Gone {
            reason: "cursor_ahead_of_room",
        };
    }
    if after_seq == head {
        return Replay::Events(Vec::new());
    }
    let Some(oldest) = history.front() else {
        return Replay::Gone {
            reason: "history_expired",
        };
    };
    if oldest.seq > after_seq + 1 {
        return Replay::Gone {
            reason: "history_expired",
        };
    }
    let skip = (after_seq + 1 - oldest.seq) as usize;
    Replay::Events(history.iter().skip(skip).take(limit).cloned().collect())
}
