//! One connection's view of its rooms, shared by both transports: subscribing with
//! replay, and turning queued deliveries into an exact, gap-free stream per room.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;
use upcoach_core::Principal;

use crate::hub::{ConnShared, Delivery, Inner, Refusal, Slot, Subscriber, Transport};
use crate::pending::PendingPermit;
use crate::wire::Encoded;
use crate::{Error, Position, Replay, validate_room};

/// What a session hands its transport to write, in order.
#[derive(Debug)]
pub(crate) enum Outbound {
    Subscribed {
        room: Arc<str>,
        head: Position,
    },
    Event(Arc<Encoded>),
    Reset {
        room: Arc<str>,
        reason: &'static str,
        /// Where the reader resumes.
        at: Position,
    },
}

/// Why a subscription was refused.
#[derive(Debug)]
pub(crate) enum SubscribeError {
    Unauthenticated,
    InvalidRoom(Error),
    Forbidden,
    TooManyRooms,
    Broker,
}

impl SubscribeError {
    pub(crate) fn code(&self) -> &'static str {
        match self {
            SubscribeError::Unauthenticated => "unauthenticated",
            SubscribeError::InvalidRoom(_) => "invalid_room",
            SubscribeError::Forbidden => "forbidden",
            SubscribeError::TooManyRooms => "too_many_rooms",
            SubscribeError::Broker => "broker_unavailable",
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            SubscribeError::Unauthenticated => "authenticate first".into(),
            SubscribeError::InvalidRoom(e) => e.to_string(),
            SubscribeError::Forbidden => "this room is not open to you".into(),
            SubscribeError::TooManyRooms => "this connection reads the most rooms it may".into(),
            SubscribeError::Broker => "the realtime broker is unavailable; retry".into(),
        }
    }
}

#[derive(Debug)]
struct Reading {
    room: Arc<str>,
    /// The last sequence number handed to the client, and the numbering it belongs to
    /// (0 while not known: the room had no event when the reader joined, and the first
    /// event tells): the mark of the room's subscriber, which the fan-out moves when it
    /// writes an event to the socket itself.
    subscriber: Arc<Subscriber>,
}

impl Reading {
    fn position(&self) -> Position {
        self.subscriber.mark.get()
    }

    fn set(&mut self, at: Position) {
        self.subscriber.mark.set(at);
    }

    /// The last sequence number handed to the client.
    fn last(&self) -> u64 {
        self.position().seq
    }

    /// The numbering of [`Reading::last`]; 0 while not known.
    fn epoch(&self) -> u32 {
        self.position().epoch
    }

    /// Whether a restart reset of the room (new numbering's `head`, old numbering's
    /// last `old`) has nothing to tell this reader: it is in the new numbering already.
    fn already_in(&self, head: Position, old: u64) -> bool {
        match (self.epoch(), head.epoch) {
            // A broadcaster without epochs: a reader below the old numbering's end read
            // its position from the new one.
            (0, 0) => self.last() < old,
            // Joined the room before its new numbering's first event: nothing missed
            // if the reset resumes from the very start.
            (0, _) => self.last() == 0 && head.seq == 0,
            (mine, new) => mine == new,
        }
    }
}

/// What holds a connection's place in the hub.
#[derive(Debug)]
enum Place {
    /// Not authenticated yet: a place in the pending-auth budget, none among the
    /// shared connections.
    Pending(
        #[expect(dead_code, reason = "held for its drop, which gives the place back")]
        PendingPermit,
    ),
    /// A place among the shared connections (and, once authenticated, in its user's
    /// count).
    Admitted(Slot),
}

/// The end reason of a connection whose client left.
pub(crate) const GONE: &str = "client went away";

/// The end reason of a connection whose client stopped reading (its queue filled).
pub(crate) const TOO_SLOW: &str = "too slow: the send queue filled";

#[derive(Debug)]
pub(crate) struct Session {
    hub: Arc<Inner>,
    /// The connection's id in the rooms it reads and in its records.
    id: u64,
    transport: Transport,
    place: Place,
    pub(crate) principal: Option<Principal>,
    pub(crate) shared: Arc<ConnShared>,
    tx: mpsc::Sender<Delivery>,
    rx: mpsc::Receiver<Delivery>,
    rooms: Vec<Reading>,
    opened: Instant,
    /// Why the connection ended, for the disconnect record.
    pub(crate) end_reason: &'static str,
}

impl Session {
    /// A session holding a shared place already (its token came with the request).
    pub(crate) fn new(slot: Slot) -> Self {
        let (hub, transport) = (slot.hub().clone(), slot.transport());
        Self::with_place(hub, transport, Place::Admitted(slot))
    }

    /// A WebSocket session waiting for its token: it takes a shared place when it
    /// authenticates.
    pub(crate) fn pending(permit: PendingPermit) -> Self {
        let hub = permit.hub().clone();
        Self::with_place(hub, Transport::WebSocket, Place::Pending(permit))
    }

    fn with_place(hub: Arc<Inner>, transport: Transport, place: Place) -> Self {
        let (tx, rx) = mpsc::channel(hub.config.queue_capacity);
        Session {
            id: hub.connection_id(),
            hub,
            transport,
            place,
            principal: None,
            shared: Arc::new(ConnShared::default()),
            tx,
            rx,
            rooms: Vec::new(),
            opened: Instant::now(),
            end_reason: "closed",
        }
    }

    pub(crate) fn hub(&self) -> &Arc<Inner> {
        &self.hub
    }

    /// Sets (or replaces, on a token refresh) who the connection acts for. A refresh
    /// for another user is refused by the caller before this. A pending connection
    /// takes its shared place here (and gives back its pending one); refused, it
    /// keeps the pending place until it closes.
    pub(crate) fn authenticate(&mut self, principal: Principal) -> Result<(), Refusal> {
        match &mut self.place {
            Place::Admitted(slot) => slot.claim_user(principal.user_id)?,
            Place::Pending(_) => {
                let mut slot = self.hub.reserve(self.transport)?;
                // Refused, the slot is dropped and so given back.
                slot.claim_user(principal.user_id)?;
                self.place = Place::Admitted(slot);
            }
        }
        if self.principal.is_none() {
            self.hub().record(
                "connect",
                Some(principal.user_id),
                serde_json::json!({ "transport": self.transport.as_str(), "connection": self.id }),
            );
        }
        self.principal = Some(principal);
        Ok(())
    }

    /// Rooms the current principal may no longer read (after a token refresh with
    /// fewer roles): they are dropped and returned.
    pub(crate) fn drop_forbidden(&mut self) -> Vec<Arc<str>> {
        let Some(principal) = &self.principal else {
            return Vec::new();
        };
        let hub = self.hub.clone();
        let (keep, drop): (Vec<_>, Vec<_>) = std::mem::take(&mut self.rooms)
            .into_iter()
            .partition(|r| hub.access.can_subscribe(principal, &r.room));
        self.rooms = keep;
        drop.into_iter()
            .map(|reading| self.stop_reading(reading))
            .collect()
    }

    /// Takes `reading` out of its room for good: its subscriber is retired while the
    /// gate is closed, so that a fan-out still holding it (one under way took its readers
    /// before the `leave`) writes it nothing once the gate opens again. The room's name.
    fn stop_reading(&self, reading: Reading) -> Arc<str> {
        self.shared.gate.shut();
        reading.subscriber.mark.retire();
        self.hub.leave(&reading.room, self.id);
        reading.room
    }

    pub(crate) fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Starts reading `room`: with `since`, everything after it first (or a reset when
    /// history is gone), then live events. Appends what to send to `out`.
    pub(crate) async fn subscribe(
        &mut self,
        room: &str,
        since: Option<Position>,
        out: &mut Vec<Outbound>,
    ) -> Result<(), SubscribeError> {
        validate_room(room).map_err(SubscribeError::InvalidRoom)?;
        let Some(principal) = &self.principal else {
            return Err(SubscribeError::Unauthenticated);
        };
        let user = principal.user_id;
        let hub = self.hub.clone();
        if !hub.access.can_subscribe(principal, room) {
            hub.counters.denied.fetch_add(1, Ordering::Relaxed);
            hub.record(
                "subscription_denied",
                Some(user),
                serde_json::json!({ "room": room, "transport": self.transport.as_str() }),
            );
            return Err(SubscribeError::Forbidden);
        }
        // The fan-out writes nothing to the socket until the transport has written what
        // this answers (`subscribed`, the replay): the room's next event comes after them.
        self.shared.gate.shut();
        if let Some(existing) = self.rooms.iter().position(|r| &*r.room == room) {
            // Subscribing again moves the position (a client re-syncing one room).
            let reading = self.rooms.remove(existing);
            self.stop_reading(reading);
        }
        if self.rooms.len() >= hub.config.max_rooms_per_connection {
            return Err(SubscribeError::TooManyRooms);
        }
        // Not placed yet: the fan-out writes this reader nothing directly until the
        // session has placed it (and then only while the connection's gate is open,
        // which a WebSocket's task closed before it called this).
        let subscriber = Arc::new(Subscriber::new(
            self.id,
            self.tx.clone(),
            self.shared.clone(),
        ));
        let name = match hub.join(room, subscriber.clone()).await {
            Ok(name) => name,
            Err(e) => {
                tracing::warn!(room, error = %e, "a subscription failed: the broker is unavailable");
                return Err(SubscribeError::Broker);
            }
        };
        let positioned = self.position(&name, since, out).await;
        match positioned {
            Ok(at) => {
                subscriber.mark.set(at);
                self.rooms.push(Reading {
                    room: name,
                    subscriber,
                });
                Ok(())
            }
            Err(e) => {
                tracing::warn!(room, error = %e, "a subscription failed: the broker is unavailable");
                // Never placed, so never written to; retired all the same.
                self.stop_reading(Reading {
                    room: name,
                    subscriber,
                });
                Err(SubscribeError::Broker)
            }
        }
    }

    /// Where the client starts in a room it just joined: the head, after the replay
    /// of everything since `since`.
    async fn position(
        &self,
        room: &Arc<str>,
        since: Option<Position>,
        out: &mut Vec<Outbound>,
    ) -> Result<Position, Error> {
        let hub = &self.hub;
        let head = hub.broadcaster.head(room).await?;
        out.push(Outbound::Subscribed {
            room: room.clone(),
            head,
        });
        let Some(since) = since else {
            return Ok(head);
        };
        let gone = if !since.same_numbering(head) {
            // A cursor from another numbering (a restarted process or Redis): its
            // numbers mean nothing here, however they compare.
            Some("room_restarted")
        } else if since.seq > head.seq {
            // A cursor from before a restart, from a broadcaster without epochs.
            // Waiting for `seq` to pass it would silently drop events.
            Some("cursor_ahead_of_room")
        } else {
            None
        };
        if let Some(reason) = gone {
            hub.counters.resets.fetch_add(1, Ordering::Relaxed);
            out.push(Outbound::Reset {
                room: room.clone(),
                reason,
                at: head,
            });
            return Ok(head);
        }
        // The same numbering as the head (or one not known): the head's epoch.
        self.catch_up(room, Position::new(since.seq, head.epoch), head.seq, out)
            .await
    }

    /// Replays `room` from `after` up to at least `until` (in `after`'s numbering);
    /// the position reached.
    async fn catch_up(
        &self,
        room: &Arc<str>,
        mut after: Position,
        until: u64,
        out: &mut Vec<Outbound>,
    ) -> Result<Position, Error> {
        let hub = &self.hub;
        let page = hub.config.replay_page;
        while after.seq < until {
            match hub.broadcaster.replay(room, after, page).await? {
                Replay::Events(events) => {
                    let Some(newest) = events.last().map(|e| e.position()) else {
                        break;
                    };
                    for event in events {
                        if event.seq > after.seq {
                            out.push(Outbound::Event(Arc::new(Encoded::new(
                                &event,
                                room.clone(),
                            ))));
                        }
                    }
                    if newest.seq > after.seq {
                        after = newest;
                    }
                }
                Replay::Gone { reason } => {
                    let head = hub.broadcaster.head(room).await?;
                    hub.counters.resets.fetch_add(1, Ordering::Relaxed);
                    // History gone in the same numbering: resume past what was asked
                    // for. A numbering that changed (even to none yet): at its head.
                    let same = reason != "room_restarted" && head.same_numbering(after);
                    let at = if same {
                        Position::new(head.seq.max(until), head.epoch).or_epoch(after.epoch)
                    } else {
                        head
                    };
                    out.push(Outbound::Reset {
                        room: room.clone(),
                        reason,
                        at,
                    });
                    return Ok(at);
                }
            }
        }
        Ok(after)
    }

    /// Stops reading `room`; whether it was read.
    pub(crate) fn unsubscribe(&mut self, room: &str) -> bool {
        match self.rooms.iter().position(|r| &*r.room == room) {
            Some(i) => {
                let reading = self.rooms.remove(i);
                self.stop_reading(reading);
                true
            }
            None => false,
        }
    }

    /// The next queued delivery. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// A queued delivery if there is one.
    pub(crate) fn try_next(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }

    /// Whether nothing is queued.
    pub(crate) fn queue_is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Turns a delivery into what the client must see: nothing for a duplicate or a
    /// room no longer read, the missing events first when a hole shows.
    pub(crate) async fn accept(&mut self, delivery: Delivery, out: &mut Vec<Outbound>) {
        if let Some(after_hole) = self.accept_in_order(delivery, out) {
            // Boxed: a hole is rare, and its replay would otherwise enlarge the task of
            // every connection, idle or not, by the size of a broker round trip.
            Box::pin(self.repair_then_accept(after_hole, out)).await;
        }
    }

    /// The common case, without waiting: hands back an event that comes after a hole
    /// (the missing events must be fetched first).
    fn accept_in_order(
        &mut self,
        delivery: Delivery,
        out: &mut Vec<Outbound>,
    ) -> Option<Arc<Encoded>> {
        match delivery {
            Delivery::Event(event) => {
                let reading = self
                    .rooms
                    .iter_mut()
                    .find(|r| same_room(&r.room, &event.room))?;
                // Another numbering than the reader's: one it left already (the hub
                // announces a new numbering with a reset before its first event).
                if !reading.position().same_numbering(event.position()) {
                    return None;
                }
                let last = reading.last();
                if event.seq <= last {
                    return None;
                }
                if event.seq > last + 1 {
                    return Some(event);
                }
                let epoch = reading.epoch();
                reading.set(event.position().or_epoch(epoch));
                out.push(Outbound::Event(event));
                None
            }
            // The rest of a frame the fan-out began: the transport writes it first.
            Delivery::Rest => None,
            Delivery::Reset(reset) => {
                let reading = self
                    .rooms
                    .iter_mut()
                    .find(|r| same_room(&r.room, &reset.room))?;
                // Resume from the head: whatever the client missed is announced as gone.
                match (reset.restarted_from, reset.head) {
                    (Some(old), Some(head)) if reading.already_in(head, old) => {
                        // Positioned in the new numbering already: nothing was missed.
                        if reading.epoch() == 0 {
                            reading.set(Position::new(reading.last(), head.epoch));
                        }
                        return None;
                    }
                    (Some(_), Some(head)) => reading.set(head),
                    (None, Some(head)) if !reading.position().same_numbering(head) => {
                        reading.set(head);
                    }
                    (None, Some(head)) => {
                        let epoch = if head.epoch == 0 {
                            reading.epoch()
                        } else {
                            head.epoch
                        };
                        reading.set(Position::new(reading.last().max(head.seq), epoch));
                    }
                    (_, None) => {}
                }
                out.push(Outbound::Reset {
                    room: reset.room.clone(),
                    reason: reset.reason,
                    at: reading.position(),
                });
                None
            }
        }
    }

    /// Fills the hole before `event` from history (or announces a reset), then hands
    /// `event` on if it is still new.
    async fn repair_then_accept(&mut self, event: Arc<Encoded>, out: &mut Vec<Outbound>) {
        let Some(i) = self
            .rooms
            .iter()
            .position(|r| same_room(&r.room, &event.room))
        else {
            return;
        };
        let from = self.rooms[i].position().or_epoch(event.epoch);
        let room = self.rooms[i].room.clone();
        match self.catch_up(&room, from, event.seq - 1, out).await {
            Ok(reached) => self.rooms[i].set(reached),
            Err(_) => {
                // What lies before the event cannot be fetched: announced as gone, the
                // event follows.
                self.hub.counters.resets.fetch_add(1, Ordering::Relaxed);
                let reading = &mut self.rooms[i];
                if reading.position().same_numbering(event.position()) {
                    reading.set(Position::new(event.seq - 1, event.epoch));
                }
                out.push(Outbound::Reset {
                    room,
                    reason: "broker_unavailable",
                    at: reading.position(),
                });
            }
        }
        let reading = &mut self.rooms[i];
        if !reading.position().same_numbering(event.position()) || event.seq <= reading.last() {
            return;
        }
        if reading.last() + 1 < event.seq {
            // History ended before the event (it held nothing more): what lies between
            // is gone, and the client is told so rather than handed a jump.
            self.hub.counters.resets.fetch_add(1, Ordering::Relaxed);
            reading.set(Position::new(event.seq - 1, event.epoch));
            out.push(Outbound::Reset {
                room: reading.room.clone(),
                reason: "history_expired",
                at: reading.position(),
            });
        }
        let epoch = reading.epoch();
        reading.set(event.position().or_epoch(epoch));
        out.push(Outbound::Event(event));
    }
}

/// Whether two room names are the same room: by pointer first, as a reader keeps the
/// name its room's events carry (compared by text only if the room was made again).
fn same_room(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

impl Drop for Session {
    fn drop(&mut self) {
        let hub = self.hub.clone();
        for reading in std::mem::take(&mut self.rooms) {
            self.stop_reading(reading);
        }
        if let Some(principal) = &self.principal {
            hub.record(
                "disconnect",
                Some(principal.user_id),
                serde_json::json!({
                    "transport": self.transport.as_str(),
                    "connection": self.id,
                    "reason": self.end_reason,
                    "seconds": self.opened.elapsed().as_secs(),
                }),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use upcoach_core::token::RefuseAll;
    use upcoach_core::{Principal, Role, SessionId, SystemClock, UserId};

    use super::{Outbound, Session};
    use crate::Position;
    use crate::direct::Batch;
    use crate::hub::{Delivery, Outgoing, Transport};
    use crate::wire::Encoded;
    use crate::{HistoryLimits, Hub, MemoryBroadcaster};

    fn seqs(out: &[Outbound]) -> Vec<u64> {
        out.iter()
            .filter_map(|o| match o {
                Outbound::Event(e) => Some(e.seq),
                _ => None,
            })
            .collect()
    }

    /// A subscription, and an unsubscription, close the connection's gate before they
    /// move a reader: the fan-out cannot write the room's next event before the
    /// transport has written `subscribed` and the replay, nor one of a room dropped.
    #[tokio::test]
    async fn moving_a_reader_takes_the_socket_from_the_fan_out() {
        let (_client, socket) = crate::direct::tests::loopback().await;
        let (hub, mut session, _) = reader_of(3, None).await;
        session.shared.gate.attach(Arc::new(socket));
        let gate = &session.shared.gate;
        assert!(gate.open_if(|| true), "an idle connection lends its socket");
        let mut out = Vec::new();
        session.subscribe("alerts", None, &mut out).await.unwrap();
        assert!(!session.shared.gate.is_open(), "closed by the subscription");
        assert!(session.shared.gate.open_if(|| true));
        assert!(session.unsubscribe("alerts"));
        assert!(
            !session.shared.gate.is_open(),
            "closed by the unsubscription"
        );
        drop(hub);
    }

    /// A fan-out takes its list of readers before it writes: a reader that leaves the
    /// room meanwhile (and whose connection opens its gate again) is written nothing
    /// from that list, and what it is queued instead is dropped unread.
    #[tokio::test]
    async fn a_reader_that_left_is_written_nothing_from_a_list_taken_before() {
        use tokio::io::AsyncReadExt;

        let (mut client, socket) = crate::direct::tests::loopback().await;
        let (hub, mut session, _) = reader_of(2, None).await;
        session.shared.gate.attach(Arc::new(socket));
        let room = hub.inner.lock_rooms().get("metrics").cloned().unwrap();
        let taken: Vec<_> = room.read_subscribers().values().cloned().collect();
        let at = taken[0].mark.get();
        let event = |seq: u64| {
            let event = crate::RoomEvent {
                room: "metrics".into(),
                seq,
                epoch: at.epoch,
                event: "tick".into(),
                data: serde_json::json!(seq),
                ts: SystemTime::now(),
            };
            Arc::new(Encoded::new(&event, Arc::from("metrics")))
        };
        let first = event(at.seq + 1);
        assert!(session.shared.gate.open_if(|| true));
        let batch = |event| Outgoing::Events(Batch::new(vec![event], true));
        hub.inner.fan_out_part(&room, &batch(first.clone()), &taken);
        assert_eq!(
            hub.stats().written_directly,
            1,
            "a reader in step is written"
        );
        assert!(session.unsubscribe("metrics"));
        assert!(session.shared.gate.open_if(|| true), "idle again");
        hub.inner
            .fan_out_part(&room, &batch(event(at.seq + 2)), &taken);
        assert_eq!(
            hub.stats().written_directly,
            1,
            "the reader that left is not"
        );
        let mut out = Vec::new();
        while let Some(delivery) = session.try_next() {
            session.accept(delivery, &mut out).await;
        }
        assert!(out.is_empty(), "what was queued for it is dropped");
        let mut got = vec![0u8; first.frame.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, first.frame, "the one frame written");
        let mut more = [0u8; 1];
        let nothing = tokio::time::timeout(Duration::from_millis(50), client.read(&mut more)).await;
        assert!(nothing.is_err(), "and nothing after it");
    }

    /// The in-order path and the (boxed) repair path: an event after a hole brings
    /// the missing ones first, from history, each once and in order.
    #[tokio::test]
    async fn a_hole_before_a_delivery_is_filled_from_history_in_order() {
        let (hub, mut session, _) = reader_of(0, None).await;
        for n in 1..=4 {
            hub.publish("metrics", "tick", serde_json::json!(n))
                .await
                .unwrap();
        }
        let event = |seq: u64| {
            let room = hub.inner.broadcaster.clone();
            async move {
                let crate::Replay::Events(events) =
                    room.replay("metrics", (seq - 1).into(), 1).await.unwrap()
                else {
                    panic!("history holds the event");
                };
                Delivery::Event(Arc::new(Encoded::new(&events[0], Arc::from("metrics"))))
            }
        };
        let mut out = Vec::new();
        session.accept(event(1).await, &mut out).await;
        assert_eq!(seqs(&out), [1], "in order: handed on as it is");
        session.accept(event(4).await, &mut out).await;
        assert_eq!(seqs(&out), [1, 2, 3, 4], "the hole filled before it");
        session.accept(event(3).await, &mut out).await;
        session.accept(event(4).await, &mut out).await;
        assert_eq!(seqs(&out), [1, 2, 3, 4], "nothing twice");
    }

    /// A session subscribed to `metrics` from `since` on a hub whose room holds
    /// `events` events (the restarted room's new numbering, as the reader read it).
    async fn reader_of(events: u64, since: Option<Position>) -> (Hub, Session, Vec<Outbound>) {
        let broadcaster = MemoryBroadcaster::new(HistoryLimits::default(), Arc::new(SystemClock));
        let hub = Hub::builder(
            Arc::new(broadcaster),
            Arc::new(RefuseAll { reason: "unused" }),
        )
        .build();
        for n in 1..=events {
            hub.publish("metrics", "tick", serde_json::json!(n))
                .await
                .unwrap();
        }
        let (session, out) = join_since(&hub, since).await;
        (hub, session, out)
    }

    /// An admin's session of `hub` reading `metrics` from `since`, and what it was
    /// sent on subscribing.
    async fn join_since(hub: &Hub, since: Option<Position>) -> (Session, Vec<Outbound>) {
        let slot = hub.inner.reserve(Transport::Sse).unwrap();
        let mut session = Session::new(slot);
        let expires = SystemTime::now() + Duration::from_secs(60);
        let me = Principal::new(UserId::new(), vec![Role::ADMIN], SessionId::new(), expires);
        session.authenticate(me).unwrap();
        let mut out = Vec::new();
        session.subscribe("metrics", since, &mut out).await.unwrap();
        (session, out)
    }

    /// What the hub fans out when its feed, at `seen` in the old numbering, meets the
    /// restarted room's events: `reset` with the head before them, then the events.
    async fn restart_seen_by_the_feed(
        hub: &Hub,
        session: &mut Session,
        seen: u64,
    ) -> Vec<Outbound> {
        let crate::Replay::Events(events) = hub
            .inner
            .broadcaster
            .replay("metrics", Position::default(), 10)
            .await
            .unwrap()
        else {
            panic!("the room has its events");
        };
        let mut out = Vec::new();
        let reset = crate::hub::RoomReset {
            room: Arc::from("metrics"),
            reason: "room_restarted",
            head: Some(Position::new(0, events[0].epoch)),
            restarted_from: Some(seen),
        };
        session
            .accept(Delivery::Reset(Arc::new(reset)), &mut out)
            .await;
        for event in &events {
            let encoded = Encoded::new(event, Arc::from("metrics"));
            session
                .accept(Delivery::Event(Arc::new(encoded)), &mut out)
                .await;
        }
        out
    }

    /// A reader that joined after the room restarted, before this process's feed
    /// noticed (its position read from the new numbering): the feed's reset is not
    /// for it, and nothing comes twice.
    #[tokio::test]
    async fn a_reader_already_in_a_restarted_rooms_numbering_ignores_its_reset() {
        let (hub, mut session, out) = reader_of(2, Some(Position::default())).await;
        assert_eq!(seqs(&out), [1, 2], "caught up in the new numbering");
        let out = restart_seen_by_the_feed(&hub, &mut session, 20).await;
        assert!(out.is_empty(), "neither a reset nor a repeat");
    }

    /// A reader still in the old numbering (it read up to the feed's `seen`) is told,
    /// then gets the new numbering's events from 1.
    #[tokio::test]
    async fn a_reader_in_the_old_numbering_gets_reset_then_the_new_events() {
        let (hub, mut session, _) = reader_of(2, None).await;
        // As if it had read up to 20 of another numbering before the restart.
        session.rooms[0].set(Position::new(20, 7));
        let out = restart_seen_by_the_feed(&hub, &mut session, 20).await;
        assert!(
            matches!(
                &out[0],
                Outbound::Reset {
                    reason: "room_restarted",
                    ..
                }
            ),
            "a reset first"
        );
        assert_eq!(seqs(&out), [1, 2]);
    }

    /// A reader of the old numbering whose count is below the new one's: numbers alone
    /// would call it current and hand it event 2 of the new numbering as the next
    /// after its 1. The epoch tells: reset, then the new events from 1.
    #[tokio::test]
    async fn a_reader_behind_the_new_numberings_count_still_gets_reset() {
        let (hub, mut session, _) = reader_of(2, None).await;
        session.rooms[0].set(Position::new(1, 7));
        let out = restart_seen_by_the_feed(&hub, &mut session, 1).await;
        assert!(
            matches!(
                &out[0],
                Outbound::Reset {
                    reason: "room_restarted",
                    at,
                    ..
                } if at.seq == 0
            ),
            "a reset first, resuming from the start of the new numbering"
        );
        assert_eq!(seqs(&out), [1, 2]);
    }

    /// An event of a numbering the reader left (queued by the feed before the restart)
    /// is not delivered: its number means nothing in the reader's numbering.
    #[tokio::test]
    async fn an_event_of_a_numbering_left_is_not_delivered() {
        let (hub, mut session, _) = reader_of(2, None).await;
        let head = hub.inner.broadcaster.head("metrics").await.unwrap();
        let stale = crate::RoomEvent {
            room: "metrics".into(),
            seq: 3,
            epoch: head.epoch.wrapping_add(1).max(1),
            event: "tick".into(),
            data: serde_json::json!("old"),
            ts: SystemTime::now(),
        };
        let mut out = Vec::new();
        let delivery = Delivery::Event(Arc::new(Encoded::new(&stale, Arc::from("metrics"))));
        session.accept(delivery, &mut out).await;
        assert!(out.is_empty(), "dropped: {out:?}");
        hub.publish("metrics", "tick", serde_json::json!(3))
            .await
            .unwrap();
        let crate::Replay::Events(events) = hub
            .inner
            .broadcaster
            .replay("metrics", 2.into(), 10)
            .await
            .unwrap()
        else {
            panic!("the room has its events");
        };
        let delivery = Delivery::Event(Arc::new(Encoded::new(&events[0], Arc::from("metrics"))));
        session.accept(delivery, &mut out).await;
        assert_eq!(seqs(&out), [3], "the reader's own numbering goes on");
    }

    /// The hub's announcement of the numbering its feed met first (nothing known
    /// before it): a reader of another numbering is told and resumes in it; a reader
    /// that read nothing yet, or one in that numbering, hears nothing.
    #[tokio::test]
    async fn the_first_numbering_announced_resets_only_readers_of_another() {
        let (hub, mut session, _) = reader_of(2, None).await;
        session.rooms[0].set(Position::new(5, 7));
        let out = restart_seen_by_the_feed(&hub, &mut session, 0).await;
        assert!(
            matches!(
                &out[0],
                Outbound::Reset {
                    reason: "room_restarted",
                    ..
                }
            ),
            "{out:?}"
        );
        assert_eq!(seqs(&out), [1, 2]);

        let (hub, mut session, _) = reader_of(2, None).await;
        session.rooms[0].set(Position::default());
        let out = restart_seen_by_the_feed(&hub, &mut session, 0).await;
        assert_eq!(seqs(&out), [1, 2], "nothing read, nothing missed: {out:?}");
        assert_eq!(out.len(), 2, "no reset: {out:?}");

        let (hub, mut session, _) = reader_of(2, Some(Position::default())).await;
        let out = restart_seen_by_the_feed(&hub, &mut session, 0).await;
        assert!(out.is_empty(), "in that numbering already: {out:?}");
    }

    /// A broadcaster whose history holds nothing (as a flushed Redis answers a
    /// position at its empty head), or, `failing`, cannot be read at all.
    #[derive(Debug)]
    struct NoHistory(MemoryBroadcaster, bool);

    #[async_trait::async_trait]
    impl crate::Broadcaster for NoHistory {
        async fn publish(
            &self,
            room: &str,
            event: &str,
            data: serde_json::Value,
        ) -> crate::Result<Arc<crate::RoomEvent>> {
            self.0.publish(room, event, data).await
        }
        async fn subscribe(&self, room: &str) -> crate::Result<crate::Subscription> {
            self.0.subscribe(room).await
        }
        async fn replay(&self, _: &str, _: Position, _: usize) -> crate::Result<crate::Replay> {
            if self.1 {
                return Err(crate::Error::Backend {
                    backend: "test",
                    source: "history cannot be read".into(),
                });
            }
            Ok(crate::Replay::Events(Vec::new()))
        }
        async fn head(&self, room: &str) -> crate::Result<Position> {
            self.0.head(room).await
        }
        fn state(&self) -> crate::BrokerState {
            self.0.state()
        }
    }

    /// What a reader of `metrics` at its start makes of event 3 (a hole before it) on
    /// a hub of `broadcaster`, and the hub's count of resets.
    async fn third_event_after_a_hole(broadcaster: NoHistory) -> (Vec<Outbound>, u64) {
        let hub = Hub::builder(
            Arc::new(broadcaster),
            Arc::new(RefuseAll { reason: "unused" }),
        )
        .build();
        let mut session = join(&hub).await;
        let mut sent = Vec::new();
        for n in 1..=3 {
            sent.push(
                hub.publish("metrics", "tick", serde_json::json!(n))
                    .await
                    .unwrap(),
            );
        }
        let mut out = Vec::new();
        let third = Delivery::Event(Arc::new(Encoded::new(&sent[2], Arc::from("metrics"))));
        session.accept(third, &mut out).await;
        (out, hub.stats().resets)
    }

    /// History that cannot be read during a repair: one `reset` (`broker_unavailable`)
    /// before the event, counted once.
    #[tokio::test]
    async fn a_hole_history_cannot_be_read_for_is_announced_once() {
        let (out, resets) =
            third_event_after_a_hole(NoHistory(MemoryBroadcaster::default(), true)).await;
        assert!(
            matches!(
                &out[..],
                [Outbound::Reset { reason: "broker_unavailable", at, .. }, Outbound::Event(e)]
                    if at.seq == 2 && e.seq == 3
            ),
            "{out:?}"
        );
        assert_eq!(resets, 1);
    }

    /// History that ends short of an event after a hole: the client is told `reset`
    /// before the event, not handed a jump in `seq`.
    #[tokio::test]
    async fn a_hole_history_cannot_fill_is_announced_before_the_event() {
        let (out, _) =
            third_event_after_a_hole(NoHistory(MemoryBroadcaster::default(), false)).await;
        assert!(
            matches!(
                &out[..],
                [Outbound::Reset { reason: "history_expired", at, .. }, Outbound::Event(e)]
                    if at.seq == 2 && e.seq == 3
            ),
            "{out:?}"
        );
    }

    /// A broadcaster the test scripts: its head is what the test sets, its feed what
    /// the test sends, its history empty.
    #[derive(Debug)]
    struct Scripted {
        head: std::sync::Mutex<Position>,
        feed: tokio::sync::broadcast::Sender<Arc<crate::RoomEvent>>,
    }

    impl Scripted {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                head: std::sync::Mutex::new(Position::default()),
                feed: tokio::sync::broadcast::channel(16).0,
            })
        }

        fn set_head(&self, head: Position) {
            *self.head.lock().unwrap() = head;
        }

        /// Sends the event at `at` on the feed, the head moving to it.
        fn send(&self, at: Position) {
            self.set_head(at);
            let event = crate::RoomEvent {
                room: "metrics".into(),
                seq: at.seq,
                epoch: at.epoch,
                event: "tick".into(),
                data: serde_json::json!(at.seq),
                ts: SystemTime::now(),
            };
            self.feed.send(Arc::new(event)).unwrap();
        }
    }

    #[async_trait::async_trait]
    impl crate::Broadcaster for Scripted {
        async fn publish(
            &self,
            _: &str,
            _: &str,
            _: serde_json::Value,
        ) -> crate::Result<Arc<crate::RoomEvent>> {
            unreachable!("the test sends on the feed")
        }
        async fn subscribe(&self, _: &str) -> crate::Result<crate::Subscription> {
            Ok(crate::Subscription::new(self.feed.subscribe()))
        }
        async fn replay(&self, _: &str, _: Position, _: usize) -> crate::Result<crate::Replay> {
            Ok(crate::Replay::Events(Vec::new()))
        }
        async fn head(&self, _: &str) -> crate::Result<Position> {
            Ok(*self.head.lock().unwrap())
        }
        fn state(&self) -> crate::BrokerState {
            crate::BrokerState {
                kind: "scripted",
                connected: true,
            }
        }
    }

    /// A session of `hub` reading `metrics` from the head.
    async fn join(hub: &Hub) -> Session {
        join_since(hub, None).await.0
    }

    /// What `session` makes of the deliveries that reach it within 200 ms.
    async fn drain(session: &mut Session) -> Vec<Outbound> {
        let mut out = Vec::new();
        while let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_millis(200), session.next()).await
        {
            session.accept(delivery, &mut out).await;
        }
        out
    }

    fn kinds(out: &[Outbound]) -> Vec<String> {
        out.iter()
            .map(|o| match o {
                Outbound::Event(e) => format!("event {}@{}", e.seq, e.epoch),
                Outbound::Reset { reason, at, .. } => {
                    format!("reset {reason} {}@{}", at.seq, at.epoch)
                }
                Outbound::Subscribed { .. } => "subscribed".into(),
            })
            .collect()
    }

    /// Through the hub's room task: a feed opened on an empty room (nothing known) whose
    /// first event is of another numbering than a reader's own head read announces it
    /// to that reader; an event of a numbering the room no longer has is dropped; a
    /// real new numbering resets everyone once.
    #[tokio::test]
    async fn the_room_task_announces_a_first_numbering_and_drops_stale_events() {
        let broadcaster = Scripted::new();
        let hub = Hub::builder(
            broadcaster.clone(),
            Arc::new(RefuseAll { reason: "unused" }),
        )
        .build();
        // A joins an empty room: the feed opens knowing nothing.
        let mut a = join(&hub).await;
        // B joins later, its own head read in numbering 11 (events the feed has not
        // carried, as after a pub/sub outage).
        broadcaster.set_head(Position::new(5, 11));
        let mut b = join(&hub).await;

        // The feed's first event is of numbering 12.
        broadcaster.send(Position::new(1, 12));
        assert_eq!(
            kinds(&drain(&mut a).await),
            ["event 1@12"],
            "A read nothing: no reset"
        );
        assert_eq!(
            kinds(&drain(&mut b).await),
            ["reset room_restarted 0@12", "event 1@12"],
            "B was in numbering 11"
        );

        // An event of numbering 11 still in flight: the room's head says 12.
        broadcaster.send(Position::new(6, 11));
        broadcaster.set_head(Position::new(1, 12));
        broadcaster.send(Position::new(2, 12));
        assert_eq!(
            kinds(&drain(&mut a).await),
            ["event 2@12"],
            "the stale one dropped"
        );
        assert_eq!(kinds(&drain(&mut b).await), ["event 2@12"]);

        // A real new numbering: everyone is told once, then its events.
        broadcaster.send(Position::new(1, 13));
        for session in [&mut a, &mut b] {
            assert_eq!(
                kinds(&drain(session).await),
                ["reset room_restarted 0@13", "event 1@13"]
            );
        }
    }

    /// Resuming with a position from another numbering: `reset`, never the events
    /// after its number in this one.
    #[tokio::test]
    async fn a_position_from_another_numbering_resumes_with_reset() {
        let (_hub, _session, out) = reader_of(5, Some(Position::new(2, 7))).await;
        assert!(
            matches!(
                &out[..],
                [
                    Outbound::Subscribed { head, .. },
                    Outbound::Reset { reason: "room_restarted", at, .. },
                ] if at == head && head.seq == 5
            ),
            "{out:?}"
        );
        let (_hub, _session, out) = reader_of(5, Some(2.into())).await;
        assert_eq!(
            seqs(&out),
            [3, 4, 5],
            "an epoch not known is taken at its word"
        );
    }
}
