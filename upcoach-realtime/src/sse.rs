//! The Server-Sent Events transport: API.md's record format, a cursor in every `id:`
//! that resumes every room exactly on any process, gzip flushed per record.

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
use sync_wrapper::SyncWrapper;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use upcoach_core::TokenError;

use crate::cursor::{Cursor, MAX_CURSOR_ROOMS};
use crate::hub::{Hub, Inner, RealtimeBody, Transport};
use crate::respond::{
    bearer, error_response, origin_allowed, origin_refused, query_param, refusal_response,
    token_refused, verify,
};
use crate::session::{Outbound, Session, SubscribeError};
use crate::wire::reset_json;

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
                start.set(room, since);
            }
        }
        let until = expires_at
            .duration_since(hub.clock.now())
            .unwrap_or(Duration::ZERO);
        // Until the stream decides otherwise, its end is the client's going away
        // (hyper drops the body).
        session.end_reason = "client went away";
        let stream = Stream::new(session, start, gzip, out, until);
        let body = SseBody {
            chunks: SyncWrapper::new(Box::pin(futures_util::stream::unfold(
                stream,
                |mut stream| async move {
                    let chunk = stream.next_chunk().await?;
                    Some((chunk, stream))
                },
            ))),
        };
        let mut response = Response::new(body.boxed());
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

/// One client's stream, polled by hyper through [`SseBody`]: no task and no channel
/// of its own, so an idle stream costs its session, its timer and its pending text.
struct Stream {
    session: Session,
    cursor: Cursor,
    gzip: Option<GzEncoder<Vec<u8>>>,
    shutdown: watch::Receiver<bool>,
    /// One timer for the ping and the token's expiry: whichever is first.
    timer: Pin<Box<Sleep>>,
    next_ping: Instant,
    expires: Instant,
    /// Records encoded and not yet handed to hyper.
    text: String,
    /// Why the stream ended, once it has: only the gzip trailer may follow.
    ended: bool,
}

impl Stream {
    /// The stream, with its first records (the `retry:`, the cursor, the replay)
    /// pending.
    fn new(
        session: Session,
        cursor: Cursor,
        gzip: bool,
        first: Vec<Outbound>,
        token_left: Duration,
    ) -> Self {
        let hub = session.hub().clone();
        let now = Instant::now();
        let next_ping = now + hub.config.sse_ping_interval;
        let expires = now + token_left;
        let mut stream = Stream {
            shutdown: hub.shutdown.subscribe(),
            session,
            cursor,
            gzip: gzip.then(|| GzEncoder::new(Vec::new(), Compression::fast())),
            timer: Box::pin(tokio::time::sleep_until(next_ping.min(expires))),
            next_ping,
            expires,
            text: String::new(),
            ended: false,
        };
        let retry = hub.config.sse_retry.as_millis();
        stream.text.push_str(&format!("retry: {retry}\n"));
        // Positions for rooms without a cursor come from their `subscribed` head.
        for item in &first {
            if let Outbound::Subscribed { room, seq } = item
                && stream.cursor.get(room).is_none()
            {
                stream.cursor.set(room, *seq);
            }
        }
        // An `id:` with no data sets the client's Last-Event-ID without dispatching
        // an event, so even a stream that never carries an event resumes exactly.
        stream.text.push_str(&format!("id: {}\n\n", stream.cursor));
        stream.encode(first);
        stream
    }

    /// The next chunk for the client: pending records, or the next ones to come;
    /// `None` once the stream has ended.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if !self.text.is_empty() {
                return self.take_text();
            }
            if self.ended {
                return None;
            }
            if let Some(reason) = self.wait().await {
                self.session.end_reason = reason;
                self.ended = true;
                // Ends the gzip member so the client's decoder sees a whole stream.
                return match self.gzip.take().map(GzEncoder::finish) {
                    Some(Ok(rest)) if !rest.is_empty() => Some(Bytes::from(rest)),
                    _ => None,
                };
            }
        }
    }

    /// Waits for something to send (it is then pending in `text`), or for a reason
    /// to end.
    async fn wait(&mut self) -> Option<&'static str> {
        let shared = self.session.shared.clone();
        let mut out = Vec::new();
        // Deliveries first, as on a WebSocket: the signals are polled when the queue is
        // empty, and the queue is bounded.
        tokio::select! {
            biased;
            delivery = self.session.next() => {
                let Some(delivery) = delivery else { return Some("queue closed") };
                self.session.accept(delivery, &mut out).await;
                while out.len() < 256 {
                    let Some(more) = self.session.try_next() else { break };
                    self.session.accept(more, &mut out).await;
                }
                self.encode(out);
            }
            () = crate::hub::stopping(&mut self.shutdown) => return Some("server shutting down"),
            () = shared.notify.notified() => {
                if shared.close_code().is_some() {
                    return Some("too slow: the send queue filled");
                }
            }
            () = self.timer.as_mut() => {
                let now = Instant::now();
                if now >= self.expires {
                    return Some("token_expired");
                }
                if now >= self.next_ping {
                    self.text.push_str(": ping\n\n");
                    self.next_ping = now + self.session.hub().config.sse_ping_interval;
                }
                let next = self.next_ping.min(self.expires);
                self.timer.as_mut().reset(next);
            }
        }
        None
    }

    /// Appends the records for `items` to the pending text.
    fn encode(&mut self, items: Vec<Outbound>) {
        for item in items {
            match item {
                Outbound::Subscribed { .. } => {}
                Outbound::Event(event) => {
                    self.cursor.set(&event.room, event.seq);
                    self.text.push_str(&format!(
                        "id: {}\nevent: {}\ndata: {}\n\n",
                        self.cursor, event.event, event.json
                    ));
                }
                Outbound::Reset { room, reason } => {
                    let position = self
                        .session
                        .positions()
                        .find(|(r, _)| *r == &*room)
                        .map(|(_, seq)| seq);
                    if let Some(seq) = position {
                        self.cursor.set(&room, seq);
                    }
                    self.text.push_str(&format!(
                        "id: {}\nevent: reset\ndata: {}\n\n",
                        self.cursor,
                        reset_json(&room, reason)
                    ));
                }
            }
        }
    }

    /// The pending text as a chunk, compressed and flushed when gzip is on; `None`
    /// (the end of the stream) if the compressor fails.
    fn take_text(&mut self) -> Option<Bytes> {
        let text = std::mem::take(&mut self.text);
        match &mut self.gzip {
            None => Some(Bytes::from(text)),
            Some(gz) => {
                if gz.write_all(text.as_bytes()).is_err() || gz.flush().is_err() {
                    self.session.end_reason = "compression failed";
                    self.ended = true;
                    self.gzip = None;
                    return None;
                }
                Some(Bytes::from(std::mem::take(gz.get_mut())))
            }
        }
    }
}

/// The response body: the client's [`Stream`], advanced whenever hyper asks for more.
/// When the client goes away hyper drops it, and with it the session.
struct SseBody {
    chunks: SyncWrapper<Pin<Box<dyn futures_util::Stream<Item = Bytes> + Send>>>,
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.chunks
            .get_mut()
            .as_mut()
            .poll_next(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}
