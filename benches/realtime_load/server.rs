//! The server roles: the reference server in-process (`--role server`), and the bare
//! baseline (`--role bare`): tokio-tungstenite's `accept_async` and one
//! `tokio::sync::broadcast` channel forwarding each published text to every connection,
//! published to through the same `POST /api/dashboard/realtime/broadcast/{room}`. Its
//! SSE baseline (`GET /api/dashboard/realtime/sse`) is a bare hyper HTTP/1 connection
//! whose body is that channel's receiver: what any SSE stream on hyper costs.
//!
//! Each prints `ready <addr>` once it listens and stops on `quit` (or end of input). The
//! Socket.IO comparison (`--role socketio`, in `socketio.rs`) shares this runtime, listener
//! and queue length.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use upcoach_core::config::Settings;
use upcoach_server::ServerConfig;
use upcoach_server::{App, Options, ServeOptions};

use crate::Args;
use crate::http::{read_body, read_head};

/// The WebSocket read buffer every server gives each connection: the hub's default,
/// read from it so the two cannot drift apart, and the baselines differ from ours by
/// the hub and nothing else.
pub(crate) fn ws_read_buffer() -> usize {
    upcoach_realtime::HubConfig::default().ws_read_buffer
}

/// Events a slow connection may have waiting: the bare loop's channel holds as many, and
/// so do the hub's queue and each Socket.IO connection's buffer.
pub(crate) const EVENT_QUEUE: usize = 1024;

pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // What the reference server's command line builds: one worker per core.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Listens with a backlog long enough for bursts of handshakes.
pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Resolves on `quit` or at the end of standard input; answers `stats` with
/// `stats tasks=<live tasks>`.
pub(crate) async fn quit_requested() {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match line.trim() {
            "quit" => return,
            // The soak's sample of this process's live tasks.
            "stats" => println!(
                "stats tasks={}",
                tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks()
            ),
            _ => {}
        }
    }
}

/// `--role server --addr A [--redis URL --prefix P] [--database URL] --max-connections N
/// [--rate-limits off]`
pub(crate) fn run_ours(args: &Args) -> ExitCode {
    let addr = args.get("addr").unwrap_or("127.0.0.1:0").to_owned();
    let redis = args.get("redis").map(str::to_owned);
    let database = args.get("database").map(str::to_owned);
    let prefix = args.get("prefix").map(str::to_owned);
    let max = args.parsed::<usize>("max-connections", 20_000).to_string();
    // `--rate-limits off`: the soak signs in and rotates from one address all along.
    let limits_off = args.get("rate-limits") == Some("off");
    let config = ServerConfig::from_lookup(|name| match name {
        "UPCOACH_ADDR" => Some(addr.clone()),
        "REDIS_URL" => redis.clone(),
        "DATABASE_URL" => database.clone(),
        "CACHE_PREFIX" => prefix.clone(),
        // The limits a load test needs: every client process is one user.
        "REALTIME_MAX_CONNECTIONS" | "REALTIME_MAX_CONNECTIONS_PER_USER" => Some(max.clone()),
        // Every client comes from 127.0.0.1: per-address rate limits would measure
        // themselves, not the fan-out.
        "RATE_LIMIT_REALTIME_CONNECT" | "RATE_LIMIT_REALTIME_BROADCAST" => Some("off".into()),
        "RATE_LIMIT_ENABLED" if limits_off => Some("false".into()),
        // Servers sharing Redis share a signing key, so a token from one is good on the
        // others (as behind a load balancer): the seed [7; 32].
        "AUTH_SIGNING_KEY" if redis.is_some() => {
            Some("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc".into())
        }
        _ => None,
    });
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("server: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let bind = config.addr;
        let app = App::start(
            config,
            Options {
                dev: true,
                ..Options::default()
            },
        )
        .await
        .map_err(|e| format!("the app did not start: {e}"))?;
        let listener = listen(bind).map_err(|e| format!("cannot listen on {bind}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        println!("ready {local}");
        let hub = app.hub().clone();
        let stop = async move {
            quit_requested().await;
            let stats = hub.stats();
            eprintln!(
                "server: {} events delivered, {} of them written to sockets by the fan-out itself",
                stats.delivered, stats.written_directly
            );
            hub.shutdown(Duration::from_secs(2)).await;
        };
        let options = ServeOptions {
            drain_timeout: Duration::from_secs(2),
            ..ServeOptions::default()
        };
        let served = upcoach_server::serve(listener, app.service(), stop, options).await;
        app.shutdown(Duration::from_secs(2)).await;
        served.map_err(|e| e.to_string())
    });
    // Connection tasks still open are dropped with the runtime, not awaited.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--role bare --addr A`
pub(crate) fn run_bare(args: &Args) -> ExitCode {
    let addr: SocketAddr = args.parsed("addr", SocketAddr::from(([127, 0, 0, 1], 0)));
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bare: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let listener = listen(addr)?;
        println!("ready {}", listener.local_addr()?);
        let (events, _) = broadcast::channel::<Utf8Bytes>(EVENT_QUEUE);
        let seq = Arc::new(AtomicU64::new(0));
        let accept = async {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(bare_connection(stream, events.clone(), seq.clone()));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        };
        tokio::select! {
            () = accept => {}
            () = quit_requested() => {}
        }
        Ok::<_, std::io::Error>(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A publisher (`POST ...`) or a WebSocket client, told apart by the first bytes.
async fn bare_connection(
    stream: TcpStream,
    events: broadcast::Sender<Utf8Bytes>,
    seq: Arc<AtomicU64>,
) {
    let mut first = [0u8; 4];
    let is_post = matches!(stream.peek(&mut first).await, Ok(4) if &first == b"POST");
    if is_post {
        let _ = bare_publisher(stream, &events, &seq).await;
        return;
    }
    const SSE: &[u8] = b"GET /api/dashboard/realtime/sse";
    let mut line = [0u8; SSE.len()];
    if matches!(stream.peek(&mut line).await, Ok(n) if n == SSE.len() && line == SSE) {
        bare_sse(stream, &events).await;
        return;
    }
    let config = WebSocketConfig::default().read_buffer_size(ws_read_buffer());
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let mut live = events.subscribe();
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    // The one client message the tool sends: `{"type":"subscribe","room"}`.
                    if text.as_str().contains("\"subscribe\"") {
                        let reply = r#"{"type":"subscribed","room":"bare","seq":0}"#;
                        if ws.send(Message::text(reply)).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            event = live.recv() => match event {
                Ok(text) => {
                    if ws.send(Message::Text(text)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// One SSE stream on a bare hyper HTTP/1 connection: a `retry:` first, then every
/// published text as a record, straight from the channel's receiver (no task or queue
/// of its own).
async fn bare_sse(stream: TcpStream, events: &broadcast::Sender<Utf8Bytes>) {
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    let events = events.clone();
    let service = hyper::service::service_fn(move |_request| {
        let live = events.subscribe();
        let first = futures_util::stream::once(async {
            Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from_static(
                b"retry: 3000\n\n",
            )))
        });
        let records = futures_util::stream::unfold(live, |mut live| async move {
            loop {
                match live.recv().await {
                    Ok(text) => {
                        let record = format!("event: event\ndata: {}\n\n", text.as_str());
                        return Some((Ok(Frame::data(bytes::Bytes::from(record))), live));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        let body = StreamBody::new(first.chain(records));
        let response = http::Response::builder()
            .header(http::header::CONTENT_TYPE, "text/event-stream")
            .header(http::header::CACHE_CONTROL, "no-store")
            .body(body);
        std::future::ready(response)
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

/// Serves `POST /api/dashboard/realtime/broadcast/{room}` `{"event","data"}` on a
/// keep-alive connection: numbers the event, encodes the frame once, sends it to the
/// channel, answers 202 `{"room","seq"}`.
async fn bare_publisher(
    stream: TcpStream,
    events: &broadcast::Sender<Utf8Bytes>,
    seq: &AtomicU64,
) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    while let Some(head) = read_head(&mut stream).await? {
        let body = read_body(&mut stream, &head).await?;
        let room = head
            .line
            .split(' ')
            .nth(1)
            .and_then(|path| path.strip_prefix("/api/dashboard/realtime/broadcast/"))
            .unwrap_or("")
            .to_owned();
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let event = parsed["event"].as_str().unwrap_or("event");
        let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
        let ts = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let frame = format!(
            r#"{{"type":"event","room":{},"seq":{n},"event":{},"data":{},"ts":{ts}}}"#,
            serde_json::Value::from(room.as_str()),
            serde_json::Value::from(event),
            parsed["data"],
        );
        let _ = events.send(Utf8Bytes::from(frame));
        let answer = serde_json::json!({ "room": room, "seq": n }).to_string();
        let response = format!(
            "HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        stream.get_mut().write_all(response.as_bytes()).await?;
    }
    Ok(())
}
