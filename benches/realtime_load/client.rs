//! The client role (`--role client`): opens WebSocket, SSE or Socket.IO connections, keeps
//! reading them, counts events and times each from the publish time it carries.
//!
//! `--transport ws|sse|socketio --targets A,B --tokens T1,T2 --count N --room R
//! [--source 127.0.1.x] --concurrency C`: connection `i` goes to target `i % targets`
//! with that target's token. `socketio` is Socket.IO v4 over WebSocket (Engine.IO v4):
//! the open packet `0{..}`, `40{"room"}` to join the default namespace and the room,
//! `40{"sid"}` back, then events as `42["event",{..}]`, each ping `2` answered with `3`.
//! Once every attempt has ended it prints
//! `connected <ok> <failed>`, the `connect` histogram (TCP connect to the 101 or the SSE
//! response head) and, for WebSocket, the `ready` one (to `subscribed`, or Socket.IO's
//! `40{"sid"}`). Then it answers
//! commands on stdin: `reset` (`ok`), `count` (`count <events> <closed>`), `report`
//! (`report <events> <closed> <last_us> <close codes>`, the `latency` histogram from the
//! publish time in the data, and the `stamped` one from the event's `ts`),
//! `quit`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::Args;
use crate::report::{histogram, histogram_line, unix_us};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Ws,
    Sse,
    Socketio,
}

#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    token: String,
}

/// What every connection of this process adds to.
#[derive(Debug)]
struct Stats {
    events: u64,
    last_us: u64,
    latency: Histogram<u64>,
    /// From the server's `ts` (when the broadcaster numbered the event; milliseconds).
    stamped: Histogram<u64>,
    closed: u64,
    codes: BTreeMap<u16, u64>,
}

type Shared = Rc<RefCell<Stats>>;

/// How an attempt to connect went: connect and ready times, or why it failed.
type Attempt = Result<(Duration, Duration), String>;

pub(crate) fn run(args: &Args) -> ExitCode {
    let transport = match args.get("transport") {
        Some("sse") => Transport::Sse,
        Some("socketio") => Transport::Socketio,
        _ => Transport::Ws,
    };
    let addrs: Vec<SocketAddr> = args
        .get("targets")
        .unwrap_or("")
        .split(',')
        .filter_map(|a| a.parse().ok())
        .collect();
    let tokens: Vec<&str> = args.get("tokens").unwrap_or("").split(',').collect();
    if addrs.is_empty() || tokens.len() != addrs.len() {
        eprintln!("client: --targets and --tokens must name the same number of servers");
        return ExitCode::from(2);
    }
    let targets: Vec<Target> = addrs
        .into_iter()
        .zip(tokens)
        .map(|(addr, token)| Target {
            addr,
            token: token.to_owned(),
        })
        .collect();
    let count: usize = args.parsed("count", 1);
    let concurrency: usize = args.parsed::<usize>("concurrency", 32).max(1);
    let room = args.get("room").unwrap_or("public:bench").to_owned();
    let source: Option<IpAddr> = args.get("source").and_then(|s| s.parse().ok());

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("client: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let stats: Shared = Rc::new(RefCell::new(Stats {
            events: 0,
            last_us: 0,
            latency: histogram(),
            stamped: histogram(),
            closed: 0,
            codes: BTreeMap::new(),
        }));
        let gate = Rc::new(Semaphore::new(concurrency));
        let (done, mut attempts) = mpsc::unbounded_channel::<Attempt>();
        let targets = Rc::new(targets);
        let room: Rc<str> = Rc::from(room);
        for i in 0..count {
            let (targets, room, stats, gate, done) = (
                targets.clone(),
                room.clone(),
                stats.clone(),
                gate.clone(),
                done.clone(),
            );
            tokio::task::spawn_local(async move {
                let target = &targets[i % targets.len()];
                match transport {
                    Transport::Ws => {
                        ws_connection(target, &room, source, &stats, &gate, done).await
                    }
                    Transport::Sse => {
                        sse_connection(target, &room, source, &stats, &gate, done).await
                    }
                    Transport::Socketio => {
                        socketio_connection(target, &room, source, &stats, &gate, done).await
                    }
                }
            });
        }
        drop(done);
        let mut connect = histogram();
        let mut ready = histogram();
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
        while let Some(attempt) = attempts.recv().await {
            match attempt {
                Ok((c, r)) => {
                    ok += 1;
                    connect.saturating_record(c.as_micros() as u64);
                    ready.saturating_record(r.as_micros() as u64);
                }
                Err(reason) => {
                    failed += 1;
                    *reasons.entry(reason).or_default() += 1;
                }
            }
            if ok + failed == count as u64 {
                break;
            }
        }
        for (reason, n) in &reasons {
            eprintln!("client: {n} connection(s) failed: {reason}");
        }
        println!("connected {ok} {failed}");
        println!("{}", histogram_line("connect", &connect));
        println!("{}", histogram_line("ready", &ready));
        commands(&stats).await;
    });
    // Connections are not closed one by one: the process exits and the kernel resets them.
    ExitCode::SUCCESS
}

async fn commands(stats: &Shared) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match line.trim() {
            "reset" => {
                let mut s = stats.borrow_mut();
                s.events = 0;
                s.last_us = 0;
                s.latency.reset();
                s.stamped.reset();
                println!("ok");
            }
            "count" => {
                let s = stats.borrow();
                println!("count {} {}", s.events, s.closed);
            }
            "report" => {
                let s = stats.borrow();
                let codes: Vec<String> = s.codes.iter().map(|(c, n)| format!("{c}x{n}")).collect();
                let codes = if codes.is_empty() {
                    "-".to_owned()
                } else {
                    codes.join(",")
                };
                println!("report {} {} {} {codes}", s.events, s.closed, s.last_us);
                println!("{}", histogram_line("latency", &s.latency));
                println!("{}", histogram_line("stamped", &s.stamped));
            }
            "quit" => return,
            _ => {}
        }
    }
}

async fn tcp(target: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The publish time (unix µs) the tool puts in each event's data as `"t"`.
fn publish_time(text: &str) -> Option<u64> {
    number_after(text, text.find("\"t\":")? + 4)
}

/// The event's `ts` (unix ms, the last field of the frame), in µs.
fn stamp_time(text: &str) -> Option<u64> {
    number_after(text, text.rfind("\"ts\":")? + 5).map(|ms| ms * 1000)
}

fn number_after(text: &str, at: usize) -> Option<u64> {
    let digits = text[at..].bytes().take_while(u8::is_ascii_digit).count();
    text[at..at + digits].parse().ok()
}

/// Counts one event and times it from the stamps its text carries.
fn record(stats: &Shared, text: &str) {
    let now = unix_us();
    let mut s = stats.borrow_mut();
    s.events += 1;
    s.last_us = now;
    if let Some(sent) = publish_time(text) {
        s.latency.saturating_record(now.saturating_sub(sent));
    }
    if let Some(stamped) = stamp_time(text) {
        s.stamped.saturating_record(now.saturating_sub(stamped));
    }
}

fn closed(stats: &Shared, code: u16) {
    let mut s = stats.borrow_mut();
    s.closed += 1;
    *s.codes.entry(code).or_default() += 1;
}

async fn ws_connection(
    target: &Target,
    room: &str,
    source: Option<IpAddr>,
    stats: &Shared,
    gate: &Semaphore,
    done: mpsc::UnboundedSender<Attempt>,
) {
    let Ok(permit) = gate.acquire().await else {
        return;
    };
    let start = Instant::now();
    let opened = async {
        let stream = tcp(target.addr, source)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let url = format!(
            "ws://{}/api/dashboard/realtime/ws?access_token={}",
            target.addr, target.token
        );
        let config = WebSocketConfig::default().read_buffer_size(crate::server::ws_read_buffer());
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let connected = start.elapsed();
        let subscribe = format!(r#"{{"type":"subscribe","room":"{room}"}}"#);
        ws.send(Message::text(subscribe))
            .await
            .map_err(|e| format!("subscribe: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) if text.as_str().contains("\"subscribed\"") => break,
                Some(Ok(Message::Text(text))) => return Err(format!("subscribe answered {text}")),
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!("closed while subscribing: {frame:?}"));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("subscribe: {e}")),
                None => return Err("closed while subscribing".to_owned()),
            }
        }
        Ok((ws, connected, start.elapsed()))
    }
    .await;
    drop(permit);
    let mut ws = match opened {
        Ok((ws, connected, ready)) => {
            let _ = done.send(Ok((connected, ready)));
            ws
        }
        Err(e) => {
            let _ = done.send(Err(e));
            return;
        }
    };
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => {
                if text.as_str().starts_with(r#"{"type":"event""#) {
                    record(stats, text.as_str());
                }
            }
            Ok(Message::Close(frame)) => {
                closed(stats, frame.map_or(1005, |f| u16::from(f.code)));
                return;
            }
            Ok(_) => {}
            Err(_) => {
                closed(stats, 1006);
                return;
            }
        }
    }
    closed(stats, 1006);
}

/// A Socket.IO v4 client on the default namespace, over WebSocket only.
async fn socketio_connection(
    target: &Target,
    room: &str,
    source: Option<IpAddr>,
    stats: &Shared,
    gate: &Semaphore,
    done: mpsc::UnboundedSender<Attempt>,
) {
    let Ok(permit) = gate.acquire().await else {
        return;
    };
    let start = Instant::now();
    let opened = async {
        let stream = tcp(target.addr, source)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", target.addr);
        let config = WebSocketConfig::default().read_buffer_size(crate::server::ws_read_buffer());
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let connected = start.elapsed();
        let mut joining = false;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let text = text.as_str();
                    if text.starts_with('0') && !joining {
                        // The Engine.IO open packet: connect to "/" with the room as auth.
                        let connect = format!("40{}", serde_json::json!({ "room": room }));
                        ws.send(Message::text(connect))
                            .await
                            .map_err(|e| format!("connect packet: {e}"))?;
                        joining = true;
                    } else if text.starts_with("40") && joining {
                        break;
                    } else if text == "2" {
                        ws.send(Message::text("3"))
                            .await
                            .map_err(|e| format!("pong: {e}"))?;
                    } else {
                        return Err(format!("opening answered {text}"));
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!("closed while opening: {frame:?}"));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("opening: {e}")),
                None => return Err("closed while opening".to_owned()),
            }
        }
        Ok((ws, connected, start.elapsed()))
    }
    .await;
    drop(permit);
    let mut ws = match opened {
        Ok((ws, connected, ready)) => {
            let _ = done.send(Ok((connected, ready)));
            ws
        }
        Err(e) => {
            let _ = done.send(Err(e));
            return;
        }
    };
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => {
                let text = text.as_str();
                if text.starts_with(r#"42["event","#) {
                    record(stats, text);
                } else if text == "2" && ws.send(Message::text("3")).await.is_err() {
                    // The pong could not be written: the connection is gone.
                    closed(stats, 1006);
                    return;
                }
            }
            Ok(Message::Close(frame)) => {
                closed(stats, frame.map_or(1005, |f| u16::from(f.code)));
                return;
            }
            Ok(_) => {}
            Err(_) => {
                closed(stats, 1006);
                return;
            }
        }
    }
    closed(stats, 1006);
}

async fn sse_connection(
    target: &Target,
    room: &str,
    source: Option<IpAddr>,
    stats: &Shared,
    gate: &Semaphore,
    done: mpsc::UnboundedSender<Attempt>,
) {
    let Ok(permit) = gate.acquire().await else {
        return;
    };
    let start = Instant::now();
    let opened = async {
        let stream = tcp(target.addr, source).await.map_err(|e| format!("connect: {e}"))?;
        let mut stream = BufReader::with_capacity(1024, stream);
        let request = format!(
            "GET /api/dashboard/realtime/sse?rooms={room}&access_token={} HTTP/1.1\r\nhost: {}\r\naccept: text/event-stream\r\n\r\n",
            target.token, target.addr
        );
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("request: {e}"))?;
        let head = crate::http::read_head(&mut stream)
            .await
            .map_err(|e| format!("response: {e}"))?
            .ok_or("closed before answering")?;
        if !head.line.contains(" 200") {
            return Err(format!("answered {}", head.line));
        }
        Ok((stream, start.elapsed()))
    }
    .await;
    drop(permit);
    let mut stream = match opened {
        Ok((stream, connected)) => {
            let _ = done.send(Ok((connected, connected)));
            stream
        }
        Err(e) => {
            let _ = done.send(Err(e));
            return;
        }
    };
    // The stream is only drained here: SSE is measured for connections, not fan-out.
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let events = buf[..n].windows(6).filter(|w| w == b"event:").count() as u64;
                if events > 0 {
                    let mut s = stats.borrow_mut();
                    s.events += events;
                    s.last_us = unix_us();
                }
            }
        }
    }
    closed(stats, 0);
}
