//! The Server-Sent Events transport: API.md's record format, a cursor in every `id:`
//! that resumes every room exactly on any process, gzip flushed per record.
//!
//! Where the server offers its connections ([`ConnectionHandoff`], as upcoach's accept
//! loop does), a stream takes its connection over once the response head is out and
//! writes its records to the socket itself: the HTTP server's per-connection buffers
//! are freed for the stream's whole life. The head then says HTTP/1.0 and the body runs
//! until the close, which is how an SSE stream ends anyway. Elsewhere (axum's `serve`,
//! say) the records go through the response body.

use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use upcoach_core::TokenError;
use upcoach_core::http::{ConnectionHandoff, HandedOff};

use crate::cursor::{Cursor, MAX_CURSOR_ROOMS};
use crate::hub::{Hub, Inner, RealtimeBody, Transport};
use crate::respond::{
    bearer, error_response, origin_allowed, origin_refused, query_param, refusal_response,
    token_refused, verify,
};
use crate::session::{GONE, Outbound, Session, SubscribeError, TOO_SLOW};
use crate::wire::reset_json;

/// Records buffered between the connection's task and hyper; past it the task waits
/// (and its event queue, bounded, fills if the client stays stuck).
const CHUNKS_IN_FLIGHT: usize = 8;

impl Hub {
    /// Answers `GET /api/dashboard/realtime/sse?rooms=a,b`: token from the header or
    /// `access_token=`, cursor from `Last-Event-ID` or `last_event_id=`. Every room is
    /// checked before the stream starts (403 if any is refused); then each room
    /// resumes exactly after the cursor's position, or announces `reset`.
    pub async fn sse<B>(&self, request: Request<B>) -> Response<RealtimeBody> {
        let hub = &self.inner;
        if request.method() != http::Method::GET {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            );
        }
        let allowed_origin = match origin_allowed(hub, request.headers()) {
            Ok(origin) => origin,
            Err(()) => return origin_refused(),
        };
        let rooms = match rooms_of(&request) {
            Ok(rooms) => rooms,
            Err(message) => {
                return error_response(StatusCode::BAD_REQUEST, "invalid_rooms", message);
            }
        };
        let cursor = request
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| query_param(&request, "last_event_id"));
        let cursor = match cursor.as_deref().map(str::parse::<Cursor>).transpose() {
            Ok(cursor) => cursor,
            Err(e) => {
                return error_response(StatusCode::BAD_REQUEST, "invalid_cursor", e.to_string());
            }
        };
        let token = match bearer(&request) {
            Ok(token) => token,
            Err(e) => {
                sse_auth_failed(hub, &e);
                return token_refused(&e);
            }
        };
        let principal = match verify(hub, &token).await {
            Ok(principal) => principal,
            Err(e) => {
                sse_auth_failed(hub, &e);
                return token_refused(&e);
            }
        };
        let gzip = hub.config.sse_gzip && accepts_gzip(&request);
        // The token is verified before a place is taken, so a stream without a valid
        // one never holds a place.
        let slot = match hub.reserve(Transport::Sse) {
            Ok(slot) => slot,
            Err(refusal) => return refusal_response(hub, refusal),
        };
        let expires_at = principal.expires_at;
        let mut session = Session::new(slot);
        if let Err(refusal) = session.authenticate(principal) {
            return refusal_response(hub, refusal);
        }
        let mut out = Vec::new();
        let mut start = Cursor::default();
        for room in &rooms {
            let since = cursor.as_ref().and_then(|c| c.get(room));
            if let Err(e) = session.subscribe(room, since, &mut out).await {
                let status = match e {
                    SubscribeError::Forbidden => StatusCode::FORBIDDEN,
                    SubscribeError::Broker => StatusCode::SERVICE_UNAVAILABLE,
                    SubscribeError::Unauthenticated => StatusCode::UNAUTHORIZED,
                    SubscribeError::InvalidRoom(_) | SubscribeError::TooManyRooms => {
                        StatusCode::BAD_REQUEST
                    }
                };
                session.end_reason = e.code();
                let mut response = error_response(status, e.code(), e.message());
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
                }
                return response;
            }
            // Where the stream starts in this room: after the replay, or at the head
            // when the cursor could not be used (history gone, or ahead of the room).
            let resumed = out
                .iter()
                .any(|o| matches!(o, Outbound::Reset { room: r, .. } if &**r == room));
            if let (Some(since), false) = (since, resumed) {
                // A cursor without an epoch takes the room's from here on.
                let head = out.iter().find_map(|o| match o {
                    Outbound::Subscribed { room: r, head } if &**r == room => Some(*head),
                    _ => None,
                });
                start.set(room, since.or_epoch(head.map_or(0, |h| h.epoch)));
            }
        }
        let handoff = request
            .extensions()
            .get::<ConnectionHandoff>()
            .and_then(ConnectionHandoff::respond);
        let (sink, mut response) = match handoff {
            Some((response, connection)) => {
                (Sink::Handoff(connection), response.map(BodyExt::boxed))
            }
            None => {
                let (chunks, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
                (
                    Sink::Body(chunks),
                    Response::new(ChannelBody { rx }.boxed()),
                )
            }
        };
        let mut stream = Stream {
            session,
            cursor: start,
            gzip: gzip.then(|| Box::new(GzEncoder::new(Vec::new(), Compression::fast()))),
            sink,
            text: String::new(),
        };
        let deadline = tokio::time::Instant::now()
            + expires_at
                .duration_since(hub.clock.now())
                .unwrap_or(Duration::ZERO);
        // The stream is lent to `run`, not moved: an async fn's by-value arguments are
        // stored in its future beside the locals they move into, and this task lives
        // as long as the stream.
        tokio::spawn(async move { stream.run(out, deadline).await });

        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        if gzip {
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        if let Some(origin) = allowed_origin {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        response
    }
}

fn sse_auth_failed(hub: &Inner, error: &TokenError) {
    hub.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
    hub.record(
        "auth_failure",
        None,
        serde_json::json!({ "transport": "sse", "code": error.code(), "stage": "handshake" }),
    );
}

fn rooms_of<B>(request: &Request<B>) -> Result<Vec<String>, &'static str> {
    let Some(list) = query_param(request, "rooms") else {
        return Err("rooms= is required: a comma-separated list of rooms");
    };
    let mut rooms: Vec<String> = Vec::new();
    for room in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        if crate::validate_room(room).is_err() {
            return Err("a room name is not valid (ASCII letters, digits and _ - . : @)");
        }
        if !rooms.iter().any(|r| r == room) {
            rooms.push(room.to_owned());
        }
    }
    if rooms.is_empty() {
        return Err("rooms= names no room");
    }
    if rooms.len() > MAX_CURSOR_ROOMS {
        return Err("too many rooms for one stream");
    }
    Ok(rooms)
}

/// Whether `Accept-Encoding` accepts gzip (a `q=0` refuses it).
fn accepts_gzip<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

struct Stream {
    session: Session,
    cursor: Cursor,
    /// Boxed: most streams are not compressed, and the encoder is 144 bytes.
    gzip: Option<Box<GzEncoder<Vec<u8>>>>,
    sink: Sink,
    text: String,
}

/// Where a stream's bytes go.
enum Sink {
    /// Through the response body, which the HTTP server writes.
    Body(mpsc::Sender<Bytes>),
    /// To the connection, once the server hands it over (right after the head).
    Handoff(oneshot::Receiver<HandedOff>),
    /// To the connection, written here; `unsent` is what a write given up on (the
    /// token's expiry, the shutdown) left of its chunk, written first; `received`
    /// counts what the client sent after its request.
    Socket {
        io: HandedOff,
        unsent: Bytes,
        received: usize,
    },
}

/// The end reason of a stream whose client sent more than [`MAX_CLIENT_BYTES`] after
/// its request.
const TALKING: &str = "client sent data after its request";

/// What a client may send after its request on a connection the stream took over,
/// read and dropped; past it the stream ends. An SSE client sends nothing: this only
/// keeps a client that does from making the server read for it without end.
const MAX_CLIENT_BYTES: usize = 4096;

/// How long a stream waits for its connection: the server hands it over as soon as
/// the head is flushed, so only a server that does not keep the offer makes it wait.
const HANDOFF_WAIT: Duration = Duration::from_secs(10);

impl Sink {
    /// Resolves when the client has gone (the server dropped the body, or the
    /// connection read its end), or has sent more than [`MAX_CLIENT_BYTES`]; the end
    /// reason. Safe to cancel.
    async fn closed(&mut self) -> &'static str {
        match self {
            Sink::Body(chunks) => {
                chunks.closed().await;
                GONE
            }
            Sink::Socket { io, received, .. } => {
                let mut scratch = [0u8; 64];
                loop {
                    match io.read(&mut scratch).await {
                        Ok(0) | Err(_) => return GONE,
                        Ok(n) => {
                            *received += n;
                            if *received > MAX_CLIENT_BYTES {
                                return TALKING;
                            }
                        }
                    }
                }
            }
            Sink::Handoff(_) => std::future::pending().await,
        }
    }

    /// Writes what is left when a stream ends: the end of a record a send gave up on,
    /// the gzip `trailer`, then the close of a connection taken over.
    async fn finish(&mut self, trailer: Option<Vec<u8>>) {
        match self {
            Sink::Body(chunks) => {
                if let Some(trailer) = trailer {
                    let _ = chunks.send(Bytes::from(trailer)).await;
                }
            }
            Sink::Socket { io, unsent, .. } => {
                let _ = async {
                    io.write_all(unsent).await?;
                    if let Some(trailer) = trailer {
                        io.write_all(&trailer).await?;
                    }
                    io.shutdown().await
                }
                .await;
            }
            Sink::Handoff(_) => {}
        }
    }
}

/// `text` as it goes on the wire: itself, or compressed and flushed; `None` when the
/// encoder fails.
fn encoded(gzip: &mut Option<Box<GzEncoder<Vec<u8>>>>, text: String) -> Option<Bytes> {
    match gzip {
        None => Some(Bytes::from(text)),
        Some(gz) => {
            if gz.write_all(text.as_bytes()).is_err() || gz.flush().is_err() {
                return None;
            }
            Some(Bytes::from(std::mem::take(gz.get_mut())))
        }
    }
}

impl Stream {
    /// Streams until the end (the token's expiry at `deadline`, the shutdown, the
    /// client gone or too slow) and records why.
    async fn run(&mut self, first: Vec<Outbound>, deadline: tokio::time::Instant) {
        let hub = self.session.hub().clone();
        let mut shutdown = hub.shutdown.subscribe();
        // Long-lived, like the WebSocket's: raced against every wait and every send.
        let stop = crate::hub::stopping(&mut shutdown);
        tokio::pin!(stop);
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        if let Sink::Handoff(connection) = &mut self.sink {
            let waited = tokio::select! {
                taken = tokio::time::timeout(HANDOFF_WAIT, connection) => match taken {
                    Ok(Ok(io)) => Ok(io),
                    // The connection closed before its head was out: the client left.
                    Ok(Err(_)) => Err(GONE),
                    Err(_) => Err("the server did not hand the connection over"),
                },
                () = stop.as_mut() => Err("server shutting down"),
                () = &mut expiry => Err("token_expired"),
            };
            match waited {
                Ok(io) => {
                    self.sink = Sink::Socket {
                        io,
                        unsent: Bytes::new(),
                        received: 0,
                    }
                }
                Err(reason) => {
                    self.session.end_reason = reason;
                    return;
                }
            }
        }
        let retry = hub.config.sse_retry.as_millis();
        self.text.push_str(&format!("retry: {retry}\n"));
        // Positions for rooms without a cursor come from their `subscribed` head.
        for item in &first {
            if let Outbound::Subscribed { room, head } = item
                && self.cursor.get(room).is_none()
            {
                self.cursor.set(room, *head);
            }
        }
        // An `id:` with no data sets the client's Last-Event-ID without dispatching
        // an event, so even a stream that never carries an event resumes exactly.
        self.text.push_str(&format!("id: {}\n\n", self.cursor));
        self.encode(first);
        let ping = hub.config.sse_ping_interval;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + ping, ping);
        let mut out = Vec::new();
        let shared = self.session.shared.clone();
        let reason = loop {
            // What is pending goes out first. A send waits while the client is not
            // reading (the first one too: a resume may replay megabytes), and must not
            // keep the stream (and its place) past the token's expiry or the shutdown.
            tokio::select! {
                biased;
                sent = self.send() => if !sent { break GONE },
                () = shared.notify.notified() => {
                    if shared.close_code().is_some() {
                        break TOO_SLOW;
                    }
                    continue;
                }
                () = &mut expiry => break "token_expired",
                () = stop.as_mut() => break "server shutting down",
            }
            tokio::select! {
                biased;
                () = stop.as_mut() => break "server shutting down",
                // Before the deliveries: a busy room must not keep a stream past its
                // token.
                () = &mut expiry => break "token_expired",
                () = shared.notify.notified() => {
                    if shared.close_code().is_some() {
                        break TOO_SLOW;
                    }
                }
                delivery = self.session.next() => {
                    let Some(delivery) = delivery else { break "queue closed" };
                    self.session.accept(delivery, &mut out).await;
                    while let Some(more) = self.session.try_next() {
                        self.session.accept(more, &mut out).await;
                        if out.len() >= 256 {
                            break;
                        }
                    }
                    self.encode(std::mem::take(&mut out));
                }
                _ = heartbeat.tick() => self.text.push_str(": ping\n\n"),
                reason = self.sink.closed() => break reason,
            }
        };
        self.session.end_reason = reason;
        // A client that went away, stopped reading or talks out of turn is not written
        // to again; otherwise the end of a record a send gave up on and the gzip
        // trailer go out, so the client's decoder sees a whole stream.
        if [GONE, TOO_SLOW, TALKING].contains(&reason) {
            return;
        }
        let trailer = self.gzip.take().and_then(|gz| gz.finish().ok());
        let _ = tokio::time::timeout(hub.config.close_timeout, self.sink.finish(trailer)).await;
    }

    /// Appends the records for `items` to the pending text.
    fn encode(&mut self, items: Vec<Outbound>) {
        for item in items {
            match item {
                Outbound::Subscribed { .. } => {}
                Outbound::Event(event) => {
                    self.cursor.set(&event.room, event.position());
                    self.text.push_str(&format!(
                        "id: {}\nevent: {}\ndata: {}\n\n",
                        self.cursor, event.event, event.json
                    ));
                }
                Outbound::Reset { room, reason, at } => {
                    self.cursor.set(&room, at);
                    self.text.push_str(&format!(
                        "id: {}\nevent: reset\ndata: {}\n\n",
                        self.cursor,
                        reset_json(&room, reason)
                    ));
                }
            }
        }
    }

    /// Sends the pending text (compressed and flushed when gzip is on); false when the
    /// client is gone. Safe to cancel, so a send given up on (the token's expiry, the
    /// shutdown) loses nothing the gzip trailer then counts: through the body, it waits
    /// for room in the channel before it takes the text or feeds the encoder; to the
    /// socket, what a write did not take stays in `unsent`, written first next time.
    async fn send(&mut self) -> bool {
        match &mut self.sink {
            Sink::Body(chunks) => {
                if self.text.is_empty() {
                    return true;
                }
                let Ok(permit) = chunks.reserve().await else {
                    return false;
                };
                let Some(chunk) = encoded(&mut self.gzip, std::mem::take(&mut self.text)) else {
                    return false;
                };
                permit.send(chunk);
                true
            }
            Sink::Socket { io, unsent, .. } => loop {
                if unsent.is_empty() {
                    if self.text.is_empty() {
                        return true;
                    }
                    match encoded(&mut self.gzip, std::mem::take(&mut self.text)) {
                        Some(chunk) => *unsent = chunk,
                        None => return false,
                    }
                }
                match io.write(unsent).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => bytes::Buf::advance(unsent, n),
                }
            },
            // Not reached: `run` waits for the connection before it sends.
            Sink::Handoff(_) => false,
        }
    }
}

/// The response body: chunks from the connection's task.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}
