//! A hub behind a small hyper server, tokens on demand, and clients for both transports.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, protocol::CloseFrame};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use upcoach_core::http::ClientAddr;
use upcoach_core::{Principal, Role, SessionId, TokenError, TokenVerifier, UserId};
use upcoach_realtime::Hub;

pub const WAIT: Duration = Duration::from_secs(10);

/// Waits until `done` holds, polling every 10 ms for at most `within` (the server side
/// runs on its own tasks); fails naming `what`.
pub async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`until`] within [`WAIT`].
pub async fn eventually(what: &str, done: impl FnMut() -> bool) {
    until(what, WAIT, done).await;
}

/// Tokens issued by the test: each maps to a principal.
#[derive(Debug, Default)]
pub struct Tokens {
    issued: Mutex<HashMap<String, Principal>>,
}

impl Tokens {
    pub fn issue(&self, user: UserId, roles: &[Role], ttl: Duration) -> String {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let principal = Principal::new(
            user,
            roles.to_vec(),
            SessionId::new(),
            SystemTime::now() + ttl,
        );
        self.issued.lock().unwrap().insert(token.clone(), principal);
        token
    }

    pub fn admin(&self) -> String {
        self.issue(UserId::new(), &[Role::ADMIN], Duration::from_secs(900))
    }
}

#[async_trait]
impl TokenVerifier for Tokens {
    async fn verify(&self, bearer: &str) -> Result<Principal, TokenError> {
        let principal = self.issued.lock().unwrap().get(bearer).cloned();
        let principal = principal.ok_or(TokenError::Invalid {
            reason: "unknown test token",
        })?;
        if principal.expires_at <= SystemTime::now() {
            return Err(TokenError::Expired);
        }
        Ok(principal)
    }
}

tokio::task_local! {
    /// Set (by [`on_both_servers!`]) for a test run on the plain hyper loop.
    pub static PLAIN_HYPER: bool;
}

/// Each test twice: `handed_over::name` on upcoach's accept loop, where an SSE stream
/// takes its connection over after the head, and `through_the_body::name` on a plain
/// hyper loop, where its records go through the response body.
#[macro_export]
macro_rules! on_both_servers {
    ($($(#[$meta:meta])* async fn $name:ident() $body:block)*) => {
        mod handed_over {
            #[allow(unused_imports)]
            use super::*;
            $($(#[$meta])* #[tokio::test] async fn $name() $body)*
        }
        mod through_the_body {
            #[allow(unused_imports)]
            use super::*;
            $($(#[$meta])* #[tokio::test] async fn $name() {
                support::PLAIN_HYPER.scope(true, async $body).await
            })*
        }
    };
}

/// Serves `hub` at `/ws` and `/sse` on a random port: on upcoach's accept loop
/// (`upcoach_core::http::serve`, which the reference server runs on), or on a plain
/// hyper loop within [`on_both_servers!`]'s second run. Either puts each request's peer
/// address in its extensions ([`ClientAddr`]).
pub async fn serve(hub: Hub) -> SocketAddr {
    if PLAIN_HYPER.try_with(|plain| *plain).unwrap_or(false) {
        return serve_plain(hub).await;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let hub = hub.clone();
            async move { Ok::<_, std::convert::Infallible>(route(&hub, request).await) }
        });
    tokio::spawn(upcoach_core::http::serve::serve(
        listener,
        service,
        std::future::pending(),
        upcoach_core::http::serve::ServeOptions::default(),
    ));
    addr
}

async fn route(
    hub: &Hub,
    request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<upcoach_realtime::RealtimeBody> {
    match request.uri().path() {
        "/ws" => hub.websocket(request).await,
        "/sse" => hub.sse(request).await,
        _ => {
            let mut r = hyper::Response::new(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
            r
        }
    }
}

/// The HTTP version an SSE stream's head says: 1.0 when it took its connection over (the
/// body runs until the close), 1.1 through a plain hyper loop (chunks).
pub fn sse_version() -> http::Version {
    if PLAIN_HYPER.try_with(|plain| *plain).unwrap_or(false) {
        http::Version::HTTP_11
    } else {
        http::Version::HTTP_10
    }
}

/// [`serve`] on a plain hyper loop: no connection is handed over.
pub async fn serve_plain(hub: Hub) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let hub = hub.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |mut request: hyper::Request<hyper::body::Incoming>| {
                        let hub = hub.clone();
                        request.extensions_mut().insert(ClientAddr(peer));
                        async move { Ok::<_, std::convert::Infallible>(route(&hub, request).await) }
                    },
                );
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to `addr`, with `token` in the Authorization header if given.
pub async fn ws(addr: SocketAddr, token: Option<&str>) -> Ws {
    ws_with(addr, "/ws", token, None)
        .await
        .expect("WebSocket handshake")
}

pub async fn ws_with(
    addr: SocketAddr,
    path_and_query: &str,
    token: Option<&str>,
    origin: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://{addr}{path_and_query}")
        .into_client_request()
        .unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

/// Like [`ws_with`], from the local address `from` (any of 127.0.0.0/8 on the
/// loopback): a client at another address.
pub async fn ws_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    path_and_query: &str,
    token: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut request = format!("ws://{addr}{path_and_query}")
        .into_client_request()
        .unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
        .await
        .map(|(ws, _)| ws)
}

pub async fn send(ws: &mut Ws, value: serde_json::Value) {
    ws.send(Message::Text(value.to_string().into()))
        .await
        .unwrap();
}

/// The next JSON text message (pings and pongs skipped); panics on close or timeout.
pub async fn recv(ws: &mut Ws) -> serde_json::Value {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("the connection stays open")
            .expect("a readable message");
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a JSON text message, got {other:?}"),
        }
    }
}

/// Reads until the server closes; returns the close code (`None` for a dropped TCP).
pub async fn closed(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the close in time")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f: CloseFrame| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

pub fn close_code(code: u16) -> CloseCode {
    CloseCode::from(code)
}

/// Subscribes and returns the `subscribed` seq.
pub async fn subscribe(ws: &mut Ws, room: &str, since: Option<u64>) -> u64 {
    let mut message = serde_json::json!({"type": "subscribe", "room": room});
    if let Some(since) = since {
        message["since"] = since.into();
    }
    send(ws, message).await;
    let reply = recv(ws).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["room"], room);
    reply["seq"].as_u64().unwrap()
}

/// One SSE record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Option<String>,
    pub retry: Option<u64>,
    pub comment: bool,
}

/// An open SSE response being read.
pub struct Sse {
    pub status: u16,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    body: hyper::body::Incoming,
    buffer: String,
    gunzip: Option<flate2::write::GzDecoder<Vec<u8>>>,
    _conn: tokio::task::JoinHandle<()>,
}

pub async fn sse(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> Sse {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = hyper::Request::get(format!("/sse?{query}")).header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let gunzip = parts
        .headers
        .get("content-encoding")
        .is_some_and(|v| v == "gzip")
        .then(|| flate2::write::GzDecoder::new(Vec::new()));
    Sse {
        status: parts.status.as_u16(),
        version: parts.version,
        headers: parts.headers,
        body,
        buffer: String::new(),
        gunzip,
        _conn: conn,
    }
}

impl Sse {
    /// The whole body of a refusal.
    pub async fn text(self) -> String {
        let bytes = self.body.collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// The next record (comments included); `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Record> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut record = Record::default();
                for line in block.lines().filter(|l| !l.is_empty()) {
                    if line.starts_with(':') {
                        record.comment = true;
                        continue;
                    }
                    let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                    match field {
                        "id" => record.id = Some(value.to_owned()),
                        "event" => record.event = Some(value.to_owned()),
                        "data" => record.data = Some(value.to_owned()),
                        "retry" => record.retry = value.parse().ok(),
                        _ => panic!("unknown SSE field {field:?}"),
                    }
                }
                return Some(record);
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("an SSE chunk in time")?;
            let Ok(frame) = frame else { return None };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let text = match &mut self.gunzip {
                None => data.to_vec(),
                Some(decoder) => {
                    use std::io::Write;
                    decoder.write_all(&data).unwrap();
                    decoder.flush().unwrap();
                    std::mem::take(decoder.get_mut())
                }
            };
            self.buffer.push_str(std::str::from_utf8(&text).unwrap());
        }
    }

    /// The next record that carries an event (skipping pings and id-only records).
    pub async fn next_event(&mut self) -> Record {
        loop {
            let record = self.next().await.expect("the stream stays open");
            if record.event.is_some() {
                return record;
            }
        }
    }
}
