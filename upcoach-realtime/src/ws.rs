//! The WebSocket transport: hyper's upgrade, tokio-tungstenite framing, API.md's
//! JSON messages.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use tokio::sync::futures::Notified;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use upcoach_core::http::ClientAddr;
use upcoach_core::{Principal, TokenError};

use crate::coalesce::Coalesce;
use crate::direct::Io;
use crate::hub::{ConnShared, Hub, Inner, RealtimeBody, Refusal, Transport};
use crate::respond::{
    bearer, body_from, error_response, origin_allowed, origin_refused, refusal_response, verify,
};
use crate::session::{GONE, Outbound, Session, TOO_SLOW};
use crate::wire::{ClientMessage, ServerMessage};

type Socket = WebSocketStream<Coalesce<Io>>;

/// Close codes of API.md.
const CLOSE_UNAUTHENTICATED: u16 = 4001;
const CLOSE_FORBIDDEN: u16 = 4003;
const CLOSE_MISUSE: u16 = 4400;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_TRY_LATER: u16 = 1013;

/// Deliveries written per flush, so one busy connection cannot starve its own reads.
const WRITE_BATCH: usize = 256;

impl Hub {
    /// Answers `GET /api/dashboard/realtime/ws`: checks the handshake, the origin,
    /// the token (header or `access_token=`) and the connection limits, then upgrades
    /// and serves the connection on its own task. Without a token the client has
    /// [`HubConfig::auth_timeout`](crate::HubConfig::auth_timeout) to send
    /// `{"type":"auth"}`; until then it counts against the pending-auth budget of its
    /// address ([`ClientAddr`] in the request's extensions) and of the hub
    /// ([`HubConfig::max_pending_auth`](crate::HubConfig::max_pending_auth)), not
    /// against the shared connections. Works with any body type, so hyper and axum
    /// hosts call it alike.
    pub async fn websocket<B>(&self, mut request: Request<B>) -> Response<RealtimeBody> {
        let hub = &self.inner;
        let headers = request.headers();
        let upgrade = headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let connection_upgrade = headers
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            });
        if request.method() != http::Method::GET || !upgrade || !connection_upgrade {
            let mut response = error_response(
                StatusCode::UPGRADE_REQUIRED,
                "websocket_required",
                "this route speaks WebSocket: send a GET with Upgrade: websocket",
            );
            response
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            return response;
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            let mut response = error_response(
                StatusCode::BAD_REQUEST,
                "unsupported_websocket_version",
                "only WebSocket version 13 is spoken",
            );
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return response;
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "missing_websocket_key",
                "Sec-WebSocket-Key is required",
            );
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        if origin_allowed(hub, headers).is_err() {
            return origin_refused();
        }
        // A bad token still upgrades, so that a browser sees close code 4001 (it
        // cannot read an HTTP refusal of a WebSocket handshake).
        let mut refused: Option<TokenError> = None;
        let mut principal: Option<Principal> = None;
        match bearer(&request) {
            Ok(token) => match verify(hub, &token).await {
                Ok(p) => principal = Some(p),
                Err(e) => refused = Some(e),
            },
            // No token yet: it may come as the first message.
            Err(TokenError::Missing) => {}
            Err(e) => refused = Some(e),
        }
        let mut session = match principal {
            // A shared place and the user's count are taken here, before the upgrade,
            // so a refusal is 503 or 429.
            Some(p) => {
                let slot = match hub.reserve(Transport::WebSocket) {
                    Ok(slot) => slot,
                    Err(refusal) => return refusal_response(hub, refusal),
                };
                let mut session = Box::new(Session::new(slot));
                if let Err(refusal) = session.authenticate(p) {
                    return refusal_response(hub, refusal);
                }
                session
            }
            // Without a valid token the client has proved nothing yet: it holds a
            // place of the small pending-auth budget (per address and in all), not a
            // shared one, until its `{"type":"auth"}` comes.
            None => {
                let ip = request.extensions().get::<ClientAddr>().map(|a| a.0.ip());
                match hub.admit_pending(ip) {
                    Ok(permit) => Box::new(Session::pending(permit)),
                    Err(refusal) => return refusal_response(hub, refusal),
                }
            }
        };
        let on_upgrade = hyper::upgrade::on(&mut request);
        let config = WebSocketConfig::default()
            .read_buffer_size(hub.config.ws_read_buffer)
            .write_buffer_size(0)
            .max_write_buffer_size(hub.config.queue_capacity.saturating_mul(64 * 1024))
            .max_message_size(Some(hub.config.max_message_size))
            .max_frame_size(Some(hub.config.max_message_size));
        let task = async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "a WebSocket upgrade did not complete");
                    session.end_reason = "upgrade_failed";
                    drop(session);
                    return;
                }
            };
            // The socket itself when it is plain TCP, shared with the fan-out (unless
            // the hub writes everything through the queues).
            let (io, tcp) = if session.hub().config.direct_writes {
                let Some(taken) = Io::take(upgraded) else {
                    session.end_reason = "upgrade_failed";
                    return;
                };
                taken
            } else {
                (Io::Upgraded(hyper_util::rt::TokioIo::new(upgraded)), None)
            };
            let gate = tcp.map(|tcp| {
                session.shared.gate.attach(tcp);
                session.shared.clone()
            });
            let socket = WebSocketStream::from_raw_socket(
                Coalesce::new(io, gate),
                Role::Server,
                Some(config),
            )
            .await;
            // Held here and lent to `serve`: a by-value argument of an async fn is
            // stored twice in its future.
            let mut conn = Connection::new(socket, session);
            serve(&mut conn, refused).await;
        };
        tokio::spawn(task);
        let mut response = Response::new(body_from(bytes::Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// What the connection's loop decided.
enum Step {
    Continue,
    Close(u16, &'static str),
    /// The peer is gone or unresponsive: no close handshake.
    Drop(&'static str),
}

struct Connection {
    socket: Socket,
    /// Boxed, so that the task holds it once while it waits for the upgrade and
    /// then in the connection (a move within an async block keeps both places).
    session: Box<Session>,
    out: Vec<Outbound>,
    bad_messages: u32,
    /// Whether a ping is out and no frame has come in since.
    awaiting_pong: bool,
    /// When the connection last read no room.
    idle_since: Option<Instant>,
    opened: Instant,
    last_ping: Instant,
    /// When the heartbeat is next due: a ping to send, or the answer to the last one
    /// overdue.
    next_beat: Instant,
    /// When the connection must have (re)authenticated by.
    deadline: Instant,
}

impl Connection {
    fn new(socket: Socket, session: Box<Session>) -> Self {
        let now = Instant::now();
        let hub = session.hub().clone();
        let mut conn = Connection {
            socket,
            session,
            out: Vec::new(),
            bad_messages: 0,
            awaiting_pong: false,
            idle_since: Some(now),
            opened: now,
            last_ping: now,
            next_beat: now + hub.config.ws_ping_interval,
            deadline: now,
        };
        conn.deadline = conn.auth_deadline(&hub);
        conn
    }
}

async fn serve(conn: &mut Connection, refused: Option<TokenError>) {
    let hub = conn.session.hub().clone();
    if let Some(e) = refused {
        auth_failed(&hub, &e, "handshake");
        Box::pin(conn.close(CLOSE_UNAUTHENTICATED, e.code())).await;
        return;
    }
    let mut shutdown = hub.shutdown.subscribe();
    let shared = conn.session.shared.clone();
    // Both signals are waited on by one future each for the connection's whole life,
    // not one per wake-up: each would otherwise register and unregister its waiter
    // (under a lock) for every event delivered. Each ends the connection, so neither
    // is polled again once it has fired.
    let stop = crate::hub::stopping(&mut shutdown);
    tokio::pin!(stop);
    let closed = shared.notify.notified();
    tokio::pin!(closed);
    // One timer for the heartbeat and the authentication deadline: whichever is first.
    let timer = tokio::time::sleep_until(conn.next_beat.min(conn.deadline));
    tokio::pin!(timer);
    // The same two signals as flags, read once per turn of the loop (an atomic load
    // each), so that a queue that never empties cannot keep either waiting.
    let mut shutdown_flag = hub.shutdown.subscribe();
    let step = loop {
        if shared.close_code().is_some() {
            break too_slow(&shared);
        }
        if shutdown_flag.has_changed().unwrap_or(true) && *shutdown_flag.borrow_and_update() {
            break Step::Close(CLOSE_GOING_AWAY, "server shutting down");
        }
        // Everything written and nothing queued: the fan-out may write to the socket
        // itself until this task writes again (see `crate::direct`).
        let session = &conn.session;
        conn.socket
            .get_mut()
            .release(|| session.principal.is_some() && session.queue_is_empty());
        // Deliveries first: the two signals are then polled once per wake-up (when
        // the queue is empty), not once per event. Neither waits long behind them: the
        // queue is bounded, and a write that blocks is given up on when either fires.
        let step = tokio::select! {
            biased;
            delivery = conn.session.next() => match delivery {
                Some(delivery) => conn.deliver(delivery, closed.as_mut(), stop.as_mut()).await,
                None => Step::Drop("queue closed"),
            },
            () = stop.as_mut() => Step::Close(CLOSE_GOING_AWAY, "server shutting down"),
            () = closed.as_mut() => too_slow(&shared),
            message = conn.socket.next() => {
                conn.awaiting_pong = false;
                match message {
                    Some(Ok(message)) => {
                        // Boxed: client messages are rare, and their handling (a
                        // subscription's replay, a token's verification) would
                        // otherwise enlarge every idle connection's task.
                        let step = Box::pin(conn.on_message(message)).await;
                        conn.deadline = conn.auth_deadline(&hub);
                        timer.as_mut().reset(conn.next_beat.min(conn.deadline));
                        // A client that never pauses keeps this arm ready, and the
                        // timer below might never get its turn: the deadline is read
                        // here as well (one clock read per client message).
                        if matches!(step, Step::Continue) && Instant::now() >= conn.deadline {
                            conn.deadline_passed(&hub)
                        } else {
                            step
                        }
                    }
                    Some(Err(tungstenite::Error::Capacity(_))) => Step::Close(CLOSE_TOO_BIG, "message too big"),
                    Some(Err(tungstenite::Error::Protocol(_))) => Step::Close(CLOSE_MISUSE, "protocol violation"),
                    Some(Err(_)) | None => Step::Drop(GONE),
                }
            },
            () = timer.as_mut() => {
                let step = if Instant::now() >= conn.deadline {
                    conn.deadline_passed(&hub)
                } else {
                    conn.heartbeat(&hub).await
                };
                timer.as_mut().reset(conn.next_beat.min(conn.deadline));
                step
            }
        };
        match step {
            Step::Continue => {}
            other => break other,
        }
    };
    match step {
        Step::Close(code, reason) => {
            conn.session.end_reason = reason;
            Box::pin(conn.close(code, reason)).await;
        }
        Step::Drop(reason) => conn.session.end_reason = reason,
        Step::Continue => {}
    }
}

/// The hub asked the connection to close: its queue filled (the only reason it asks).
fn too_slow(shared: &ConnShared) -> Step {
    Step::Close(
        shared.close_code().unwrap_or(crate::hub::CLOSE_TOO_SLOW),
        TOO_SLOW,
    )
}

fn auth_failed(hub: &Inner, error: &TokenError, stage: &str) {
    hub.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
    hub.record(
        "auth_failure",
        None,
        serde_json::json!({ "transport": "websocket", "code": error.code(), "stage": stage }),
    );
}

impl Connection {
    /// When the connection must have (re)authenticated: the auth timeout before the
    /// first token, then the token's expiry.
    fn auth_deadline(&self, hub: &Inner) -> Instant {
        match &self.session.principal {
            None => self.opened + hub.config.auth_timeout,
            Some(p) => {
                let left = p
                    .expires_at
                    .duration_since(hub.clock.now())
                    .unwrap_or(Duration::ZERO);
                Instant::now() + left
            }
        }
    }

    /// The deadline has passed: closes 4001, `token_missing` before the first token and
    /// `token_expired` after, and records the failure.
    fn deadline_passed(&self, hub: &Inner) -> Step {
        match self.session.principal {
            None => {
                auth_failed(hub, &TokenError::Missing, "auth_timeout");
                Step::Close(CLOSE_UNAUTHENTICATED, "token_missing")
            }
            Some(_) => {
                auth_failed(hub, &TokenError::Expired, "expired_on_connection");
                Step::Close(CLOSE_UNAUTHENTICATED, "token_expired")
            }
        }
    }

    /// When a write step that has to wait from now must be done by: the pong timeout (a
    /// client that takes nothing for that long is as gone as one that does not answer
    /// a ping), and never past the connection's deadline.
    fn write_limit(&self, hub: &Inner) -> impl Fn() -> Instant + Copy + use<> {
        let (pong_timeout, deadline) = (hub.config.ws_pong_timeout, self.deadline);
        move || (Instant::now() + pong_timeout).min(deadline)
    }

    /// The step after a bounded write. One the client did not take in time ends in the
    /// deadline's own close when that is what passed, otherwise the client counts as
    /// gone.
    fn written(&self, written: Written) -> Step {
        match written {
            Written::Done(step) => step,
            Written::TimedOut if Instant::now() >= self.deadline => {
                self.deadline_passed(self.session.hub())
            }
            Written::TimedOut => Step::Drop("write_timeout"),
        }
    }

    /// Sends one message, bounded like every write (see [`bounded`]).
    async fn send(&mut self, message: Message) -> Step {
        let limit = self.write_limit(self.session.hub());
        let written = bounded(self.socket.send(message), limit, std::future::pending()).await;
        self.written(written)
    }

    /// The timer fired before the deadline: either a ping is due, or the answer to the
    /// last one did not come in time. Sets when the heartbeat is next due.
    async fn heartbeat(&mut self, hub: &Inner) -> Step {
        let now = Instant::now();
        if now < self.next_beat {
            return Step::Continue;
        }
        if self.awaiting_pong {
            return Step::Drop("heartbeat_timeout");
        }
        let due = self.last_ping + hub.config.ws_ping_interval;
        if now < due {
            // The answer came: the next ping is due a whole interval after the last.
            self.next_beat = due;
            return Step::Continue;
        }
        if self.session.room_count() > 0 || self.session.principal.is_none() {
            self.idle_since = None;
        } else if let Some(since) = self.idle_since {
            if now.duration_since(since) >= hub.config.idle_timeout {
                return Step::Close(CLOSE_NORMAL, "idle");
            }
        } else {
            self.idle_since = Some(now);
        }
        self.last_ping = now;
        self.awaiting_pong = true;
        self.next_beat = now + hub.config.ws_pong_timeout;
        self.send(Message::Ping(bytes::Bytes::new())).await
    }

    /// Writes one delivery and whatever else is queued (up to a batch), then flushes;
    /// gives up on the write when the hub closes the connection (`closed`) or shuts
    /// down (`stop`).
    async fn deliver(
        &mut self,
        first: crate::hub::Delivery,
        closed: Pin<&mut Notified<'_>>,
        stop: Pin<&mut impl Future<Output = ()>>,
    ) -> Step {
        self.out.clear();
        // The socket is this task's from here (the rest of a frame the fan-out began,
        // if any, goes out first).
        self.socket.get_mut().hold();
        self.session.accept(first, &mut self.out).await;
        for _ in 1..WRITE_BATCH {
            match self.session.try_next() {
                Some(delivery) => self.session.accept(delivery, &mut self.out).await,
                None => break,
            }
        }
        if self.out.is_empty() && !self.socket.get_ref().pending() {
            return Step::Continue;
        }
        let shared = self.session.shared.clone();
        let limit = self.write_limit(self.session.hub());
        let signals = async {
            tokio::select! {
                biased;
                () = closed => too_slow(&shared),
                () = stop => Step::Close(CLOSE_GOING_AWAY, "server shutting down"),
            }
        };
        let signals = std::pin::pin!(signals);
        let written = write_all(&mut self.socket, &mut self.out, limit, signals).await;
        self.written(written)
    }

    async fn reply(&mut self, message: ServerMessage<'_>) -> Step {
        self.send(Message::Text(message.text())).await
    }

    async fn error(&mut self, code: &str, message: &str, room: Option<&str>) -> Step {
        self.reply(ServerMessage::Error {
            code,
            message,
            room,
        })
        .await
    }

    async fn bad_message(&mut self, message: &str) -> Step {
        self.bad_messages += 1;
        if self.bad_messages > self.session.hub().config.max_bad_messages {
            return Step::Close(CLOSE_MISUSE, "too many bad messages");
        }
        self.error("bad_message", message, None).await
    }

    async fn on_message(&mut self, message: Message) -> Step {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return self.bad_message("binary frames are not spoken here").await;
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Step::Continue,
            Message::Close(_) => return Step::Drop("client closed"),
        };
        let parsed = match ClientMessage::parse(text.as_str()) {
            Ok(parsed) => parsed,
            Err(_) => {
                return self
                    .bad_message(
                        "expected {\"type\":\"subscribe\"|\"unsubscribe\"|\"auth\"|\"ping\", ...}",
                    )
                    .await;
            }
        };
        match parsed {
            ClientMessage::Ping {} => self.reply(ServerMessage::Pong).await,
            ClientMessage::Auth { token } => self.on_auth(&token).await,
            ClientMessage::Subscribe { room, since, epoch } => {
                // An `epoch` without `since` names no position: nothing to resume.
                let since = since.map(|seq| crate::Position::new(seq, epoch.unwrap_or(0)));
                self.out.clear();
                let mut out = std::mem::take(&mut self.out);
                let result = self.session.subscribe(&room, since, &mut out).await;
                let step = match result {
                    Ok(()) => {
                        let limit = self.write_limit(self.session.hub());
                        let never = std::pin::pin!(std::future::pending());
                        let written = write_all(&mut self.socket, &mut out, limit, never).await;
                        self.written(written)
                    }
                    Err(e) => self.error(e.code(), &e.message(), Some(&room)).await,
                };
                self.out = out;
                step
            }
            ClientMessage::Unsubscribe { room } => {
                if self.session.unsubscribe(&room) {
                    Step::Continue
                } else {
                    self.error(
                        "not_subscribed",
                        "this connection does not read that room",
                        Some(&room),
                    )
                    .await
                }
            }
        }
    }

    async fn on_auth(&mut self, token: &str) -> Step {
        let hub = self.session.hub().clone();
        match verify(&hub, token).await {
            Ok(principal) => {
                if let Some(current) = &self.session.principal
                    && current.user_id != principal.user_id
                {
                    auth_failed(
                        &hub,
                        &TokenError::Invalid {
                            reason: "another user",
                        },
                        "refresh",
                    );
                    return Step::Close(CLOSE_FORBIDDEN, "token_user_mismatch");
                }
                // A connection that had no token yet takes its shared place here.
                if let Err(refusal) = self.session.authenticate(principal) {
                    return match refusal {
                        Refusal::ShuttingDown => {
                            Step::Close(CLOSE_GOING_AWAY, "server shutting down")
                        }
                        other => Step::Close(CLOSE_TRY_LATER, other.code()),
                    };
                }
                // The writes below are bounded by the new token's expiry, not the old.
                self.deadline = self.auth_deadline(&hub);
                for room in self.session.drop_forbidden() {
                    let step = self
                        .error(
                            "forbidden",
                            "this room is no longer open to you",
                            Some(&room),
                        )
                        .await;
                    if !matches!(step, Step::Continue) {
                        return step;
                    }
                }
                Step::Continue
            }
            Err(e) => {
                auth_failed(
                    &hub,
                    &e,
                    if self.session.principal.is_some() {
                        "refresh"
                    } else {
                        "first_message"
                    },
                );
                if self.session.principal.is_none() {
                    return Step::Close(CLOSE_UNAUTHENTICATED, e.code());
                }
                // The current token still holds until it expires.
                self.error(e.code(), &e.to_string(), None).await
            }
        }
    }

    /// Sends a close frame and waits (bounded) for it to leave and the client's reply.
    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from(reason),
        };
        let timeout = self.session.hub().config.close_timeout;
        let _ = tokio::time::timeout(timeout, async {
            // An error here can still mean the frame went out (tungstenite reports
            // the stream it could not read any more): the linger below then decides.
            if self.socket.close(Some(frame)).await.is_ok() {
                loop {
                    match self.socket.next().await {
                        // The client's answer: the handshake is done.
                        Some(Ok(Message::Close(_))) => return,
                        Some(Ok(_)) => {}
                        None | Some(Err(_)) => break,
                    }
                }
            }
            // Gone, or no longer readable as frames (the rest of a message too big to
            // read, say): what the client still sends is read and dropped until it
            // pauses, or it ends.
            linger(self.socket.get_mut()).await;
        })
        .await;
    }
}

/// How long a client that is being closed may pause before its socket is: see
/// [`linger`].
const LINGER_IDLE: Duration = Duration::from_millis(200);

/// Reads and drops what the client still sends, until it pauses for [`LINGER_IDLE`],
/// ends, or fails (the caller bounds the whole by the close timeout). Closing a socket
/// with unread data makes the kernel answer with a reset: a client still writing (the
/// rest of a 4 MiB frame) would see its write fail and report 1006, never reading the
/// close frame it was sent.
async fn linger(io: &mut Coalesce<Io>) {
    use tokio::io::AsyncRead;
    let mut sink = [0u8; 4096];
    loop {
        let mut buf = tokio::io::ReadBuf::new(&mut sink);
        let read = std::future::poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, &mut buf));
        match tokio::time::timeout(LINGER_IDLE, read).await {
            Ok(Ok(())) if !buf.filled().is_empty() => {}
            _ => return,
        }
    }
}

/// How a bounded write ended.
enum Written {
    /// Written, failed, or ended by one of the signals: the step that follows.
    Done(Step),
    /// The client did not take it by its limit.
    TimedOut,
}

/// Runs one write to the client. The usual write is done on its first poll, and then
/// no timer is made and no clock is read (this is every delivery's path). One the
/// client is not taking is raced against `signals` and given up on at `limit()`: a
/// client that stops reading cannot keep its connection (or its place, or its session
/// past the token's expiry) by leaving a write blocked, since the one timer is not
/// polled while a write is.
fn bounded<W, L, S>(write: W, limit: L, signals: S) -> Bounded<W, L, S>
where
    W: Future<Output = Result<(), tungstenite::Error>>,
    L: Fn() -> Instant,
    S: Future<Output = Step>,
{
    Bounded {
        write,
        signals,
        limit,
        timer: None,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`bounded`]: written by hand, not as an `async fn`, so that the
    /// write is held once (an `async fn` keeps its by-value arguments beside the locals
    /// they move into) and the timer only exists, boxed, on the slow path. Every
    /// connection's task is as large as its largest await.
    struct Bounded<W, L, S> {
        #[pin]
        write: W,
        #[pin]
        signals: S,
        limit: L,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<W, L, S> Future for Bounded<W, L, S>
where
    W: Future<Output = Result<(), tungstenite::Error>>,
    L: Fn() -> Instant,
    S: Future<Output = Step>,
{
    type Output = Written;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Written> {
        use std::task::Poll;
        let this = self.project();
        if let Poll::Ready(result) = this.write.poll(cx) {
            return Poll::Ready(Written::Done(match result {
                Ok(()) => Step::Continue,
                Err(_) => Step::Drop(GONE),
            }));
        }
        if let Poll::Ready(step) = this.signals.poll(cx) {
            return Poll::Ready(Written::Done(step));
        }
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until((this.limit)())));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Written::TimedOut),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Writes `out`, each step bounded on its own: a message taken into the write buffer
/// (which, once the buffer passes its size, waits for the buffer to drain into the
/// socket), then the flush. So a client that keeps reading, only slowly, is not
/// dropped because a whole batch or replay took longer than the limit; small events,
/// the usual case, are buffered and flushed once per batch.
async fn write_all<S: Future<Output = Step>>(
    socket: &mut Socket,
    out: &mut Vec<Outbound>,
    limit: impl Fn() -> Instant + Copy,
    mut signals: Pin<&mut S>,
) -> Written {
    for item in out.drain(..) {
        let message = match item {
            Outbound::Event(event) => Message::Text(event.ws.clone()),
            Outbound::Subscribed { room, head } => Message::Text(
                ServerMessage::Subscribed {
                    room: &room,
                    seq: head.seq,
                    epoch: head.epoch,
                }
                .text(),
            ),
            Outbound::Reset { room, reason, at } => Message::Text(
                ServerMessage::Reset {
                    room: &room,
                    reason,
                    seq: at.seq,
                    epoch: at.epoch,
                }
                .text(),
            ),
        };
        match bounded(socket.feed(message), limit, signals.as_mut()).await {
            Written::Done(Step::Continue) => {}
            other => return other,
        }
    }
    bounded(socket.flush(), limit, signals).await
}
