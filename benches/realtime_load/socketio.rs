//! The Socket.IO comparison (`--role socketio --addr A`): socketioxide as a tower layer on
//! an axum router, on the runtime and listener the other server roles use.
//!
//! A client connects on the default namespace (`/socket.io/`, Engine.IO v4 over
//! WebSocket) and joins the room its auth names (`40{"room":"public:bench"}`; the bench's
//! room without one) before the server answers `40{"sid"}`, so that answer means
//! subscribed, as `subscribed` does for ours and the bare loop.
//! `POST /api/dashboard/realtime/broadcast/{room}` with `{"event","data"}` numbers the
//! event and emits it once to the room (`io.to(room).emit`); each subscriber receives
//! `42["event",{"room","seq","event","data","ts"}]`, the bare loop's frame without its
//! `type` (about the same size), and the answer is 202 `{"room","seq"}` as there.
//! `GET /api/dashboard/realtime/status` counts the open sockets as ours does.
//!
//! Every connection's buffer holds as many events as the bare loop's channel
//! ([`EVENT_QUEUE`]; socketioxide's default is 128); an emit that finds it full is
//! dropped for that connection and counted (printed on `quit`). Pings are socketioxide's
//! (every 25 s, closed without a pong within 20 s).

use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde::Serialize;
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::{BroadcastError, SocketIo};

use crate::Args;
use crate::server::{EVENT_QUEUE, listen, quit_requested, runtime, ws_read_buffer};

/// The room a client joins when its auth names none.
const DEFAULT_ROOM: &str = "public:bench";

/// What the publish route shares.
#[derive(Debug)]
struct Publisher {
    io: SocketIo,
    seq: AtomicU64,
    /// Emits not queued for a connection (its buffer full, or it closed meanwhile).
    dropped: AtomicU64,
}

/// The event's data, in the bare loop's field order (`ts` last, where the client reads it).
#[derive(Debug, Serialize)]
struct Event<'a> {
    room: &'a str,
    seq: u64,
    event: &'a str,
    data: &'a serde_json::Value,
    ts: u64,
}

/// `--role socketio --addr A`
pub(crate) fn run(args: &Args) -> ExitCode {
    let addr: SocketAddr = args.parsed("addr", SocketAddr::from(([127, 0, 0, 1], 0)));
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("socketio: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let listener = listen(addr)?;
        let local = listener.local_addr()?;
        let (layer, io) = SocketIo::builder()
            .max_buffer_size(EVENT_QUEUE)
            .ws_read_buffer_size(ws_read_buffer())
            .build_layer();
        io.ns("/", (async |_: SocketRef| {}).with(join_room));
        let publisher = Arc::new(Publisher {
            io,
            seq: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/api/dashboard/realtime/broadcast/{room}", post(publish))
            .route("/api/dashboard/realtime/status", get(status))
            .with_state(publisher.clone())
            .layer(layer);
        let listener = listener.tap_io(|stream| {
            let _ = stream.set_nodelay(true);
        });
        println!("ready {local}");
        tokio::select! {
            served = axum::serve(listener, app).into_future() => served?,
            () = quit_requested() => {}
        }
        let dropped = publisher.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            eprintln!(
                "socketio: {dropped} event(s) not queued for a connection (buffer full or closed)"
            );
        }
        Ok::<_, std::io::Error>(())
    });
    // Open sockets are dropped with the runtime, not closed one by one.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("socketio: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Joins the room the auth names before the server answers the connect.
async fn join_room(
    socket: SocketRef,
    TryData(auth): TryData<serde_json::Value>,
) -> Result<(), Infallible> {
    let room = auth
        .ok()
        .and_then(|auth| auth["room"].as_str().map(str::to_owned))
        .unwrap_or_else(|| DEFAULT_ROOM.to_owned());
    socket.join(room);
    Ok(())
}

async fn publish(
    State(publisher): State<Arc<Publisher>>,
    Path(room): Path<String>,
    body: Bytes,
) -> impl IntoResponse {
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let n = publisher.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let event = Event {
        room: &room,
        seq: n,
        event: parsed["event"].as_str().unwrap_or("event"),
        data: &parsed["data"],
        ts,
    };
    match publisher.io.to(room.clone()).emit("event", &event).await {
        Ok(()) => {}
        Err(BroadcastError::Socket(failed)) => {
            publisher
                .dropped
                .fetch_add(failed.len() as u64, Ordering::Relaxed);
        }
        Err(e) => {
            let answer = serde_json::json!({ "error": e.to_string() }).to_string();
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "application/json")],
                answer,
            );
        }
    }
    let answer = serde_json::json!({ "room": room, "seq": n }).to_string();
    (
        StatusCode::ACCEPTED,
        [(header::CONTENT_TYPE, "application/json")],
        answer,
    )
}

/// `{"connections":{"ws","sse"}}` as ours answers: the default namespace's sockets.
async fn status(State(publisher): State<Arc<Publisher>>) -> impl IntoResponse {
    let ws = publisher.io.sockets().len();
    let answer = serde_json::json!({ "connections": { "ws": ws, "sse": 0 } }).to_string();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        answer,
    )
}
