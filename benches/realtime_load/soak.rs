//! `soak`: the reference server under churn for `--minutes` (10), then idle, with its
//! resident memory, open files and live tasks sampled along the way.
//!
//! `--workers N` (16) loops each, as fast as the server answers: a dev sign-in (admin,
//! as the worker's own user, the same every round),
//! a refresh rotation, a cached read (`GET /api/analytics/security-events`, every tenth
//! loop a tag invalidation first), a WebSocket that subscribes to `public:soak`, reads
//! what comes for up to 200 ms and closes, an SSE stream resumed from a stale cursor
//! (`public:soak=1`) read for its first bytes and dropped, and a logout. Beside them, one
//! publisher broadcasts to `public:soak` every 50 ms. With `REDIS_URL` the server
//! broadcasts and caches through Redis; with `DATABASE_URL` it keeps users, sessions and
//! the audit log in Postgres (in a schema of the run's own). Without them, every
//! sign-in's session stays in the process (revoked ones until they expire), so memory
//! grows with the churn by design.
//!
//! Samples: after a 20 s warm-up of the same churn and 15 s idle (the baseline), every
//! minute under churn, and after 15 s idle at the end. The verdict: open files and tasks
//! back at the idle baseline (within 5), and resident memory at the idle end within 10 %
//! of the first minute under churn (when pools, buffers and caches have filled).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

use crate::Args;
use crate::driver::{Proc, Res, SharedRedis, delete_redis_keys};
use crate::http::Client;
use crate::report::{Table, thousands};

/// Outcomes per operation: `(ok, failed)`, and the first few failures' texts.
#[derive(Default)]
struct Tally {
    counts: Mutex<BTreeMap<&'static str, (u64, u64)>>,
    examples: Mutex<Vec<String>>,
}

impl Tally {
    fn note(&self, op: &'static str, result: Result<(), String>) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let entry = counts.entry(op).or_default();
        match result {
            Ok(()) => entry.0 += 1,
            Err(why) => {
                entry.1 += 1;
                let mut examples = self.examples.lock().unwrap_or_else(|e| e.into_inner());
                if examples.len() < 10 {
                    examples.push(format!("{op}: {why}"));
                }
            }
        }
    }

    fn totals(&self) -> (u64, u64) {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .values()
            .fold((0, 0), |(ok, failed), (o, f)| (ok + o, failed + f))
    }
}

/// One sample of the server process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_s: u64,
    rss_kib: u64,
    fds: u64,
    tasks: u64,
    ok: u64,
    failed: u64,
}

pub(crate) async fn soak(args: &Args, redis: Option<&SharedRedis>) -> Res<()> {
    let minutes: u64 = args.parsed("minutes", 10);
    let workers: usize = args.parsed("workers", 16);
    let mut server_args: Vec<String> = [
        "--role",
        "server",
        "--addr",
        "127.0.0.1:0",
        "--rate-limits",
        "off",
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some(redis) = redis {
        server_args.extend([
            "--redis".into(),
            redis.url.clone(),
            "--prefix".into(),
            redis.prefix.clone(),
        ]);
    }
    // With `DATABASE_URL`: users, sessions and the audit log in Postgres, in a schema
    // of the run's own (dropped afterwards).
    let schema = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => upcoach_testing::PgSchema::create().await,
        _ => None,
    };
    if let Some(schema) = &schema {
        let url = schema.url();
        let joint = if url.contains('?') { '&' } else { '?' };
        // `options=-c search_path=<schema>`, percent-encoded.
        let url = format!("{url}{joint}options=-c%20search_path%3D{}", schema.name());
        server_args.extend(["--database".into(), url]);
    }
    let mut server = Proc::spawn("server", &server_args)?;
    let addr: SocketAddr = server
        .expect("ready", Duration::from_secs(30))
        .await?
        .parse()?;
    println!(
        "soak: {minutes} min, {workers} workers, server {addr} (Redis: {}, Postgres: {})",
        if redis.is_some() { "yes" } else { "no" },
        if schema.is_some() { "yes" } else { "no" },
    );

    let tally = Arc::new(Tally::default());
    let published = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    // A warm-up round, then idle: the baseline the end is held to.
    let warm_up = churn_for(addr, workers, Duration::from_secs(20), &tally, &published);
    warm_up.await;
    tokio::time::sleep(IDLE).await;
    let warm = sample(&mut server, &tally, started).await?;
    let mut samples = vec![warm];
    println!("  warm-up done; idle: {}", describe(&warm));

    let mut churning = std::pin::pin!(churn_for(
        addr,
        workers,
        Duration::from_secs(minutes * 60),
        &tally,
        &published,
    ));
    let mut minute = tokio::time::interval(Duration::from_secs(60));
    minute.tick().await;
    loop {
        tokio::select! {
            () = &mut churning => break,
            _ = minute.tick() => {
                let now = sample(&mut server, &tally, started).await?;
                println!("  under churn: {}", describe(&now));
                samples.push(now);
            }
        }
    }
    tokio::time::sleep(IDLE).await;
    let idle = sample(&mut server, &tally, started).await?;
    samples.push(idle);

    let mut table = Table::new(&["at", "RSS MiB", "open files", "tasks", "ok", "failed"]);
    for s in &samples {
        table.row(vec![
            format!("{} s", s.at_s),
            format!("{:.1}", s.rss_kib as f64 / 1024.0),
            s.fds.to_string(),
            s.tasks.to_string(),
            thousands(s.ok),
            s.failed.to_string(),
        ]);
    }
    table.print("soak: the server process (first and last rows: after 15 s idle)");
    let counts = tally
        .counts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut ops = Table::new(&["operation", "ok", "failed"]);
    for (op, (ok, failed)) in &counts {
        ops.row(vec![(*op).to_owned(), thousands(*ok), failed.to_string()]);
    }
    ops.print("soak: operations");
    for example in tally
        .examples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        println!("  failure: {example}");
    }
    println!(
        "  {} broadcasts in {:.0} s",
        thousands(published.load(Ordering::Relaxed)),
        started.elapsed().as_secs_f64()
    );

    let flat_fds = idle.fds <= warm.fds + 5;
    let flat_tasks = idle.tasks <= warm.tasks + 5;
    // Memory: from the first minute under churn (pools, buffers and caches filled) to
    // the idle end; with less than a minute of churn, from the idle start.
    let from = if samples.len() > 2 { samples[1] } else { warm };
    let flat_rss = (idle.rss_kib as f64) <= from.rss_kib as f64 * 1.10;
    println!(
        "verdict: open files {} ({} -> {} idle), tasks {} ({} -> {} idle), RSS {} ({:.1} MiB at {} s -> {:.1} MiB idle)",
        if flat_fds { "flat" } else { "GREW" },
        warm.fds,
        idle.fds,
        if flat_tasks { "flat" } else { "GREW" },
        warm.tasks,
        idle.tasks,
        if flat_rss { "flat" } else { "GREW" },
        from.rss_kib as f64 / 1024.0,
        from.at_s,
        idle.rss_kib as f64 / 1024.0,
    );
    server.quit(Duration::from_secs(5)).await;
    if let Some(redis) = redis {
        let deleted = delete_redis_keys(redis).await?;
        println!("deleted {deleted} Redis keys under {}", redis.prefix);
    }
    if flat_fds && flat_tasks && flat_rss {
        Ok(())
    } else {
        Err("the server did not end flat (see the verdict)".into())
    }
}

/// How long the server idles before the baseline and the end sample.
const IDLE: Duration = Duration::from_secs(15);

fn describe(s: &Sample) -> String {
    format!(
        "{} s, RSS {:.1} MiB, {} open files, {} tasks, {} operations ({} failed)",
        s.at_s,
        s.rss_kib as f64 / 1024.0,
        s.fds,
        s.tasks,
        thousands(s.ok),
        s.failed
    )
}

/// `workers` churning loops and one publisher for `length`; resolves when all stopped.
async fn churn_for(
    addr: SocketAddr,
    workers: usize,
    length: Duration,
    tally: &Arc<Tally>,
    published: &Arc<AtomicU64>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let (tally, stop) = (tally.clone(), stop.clone());
        tasks.spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                churn(addr, worker, round, &tally).await;
                round += 1;
            }
        });
    }
    {
        let (tally, stop, published) = (tally.clone(), stop.clone(), published.clone());
        tasks.spawn(async move {
            let admin = match crate::http::dev_token(addr, &["admin"]).await {
                Ok(token) => token,
                Err(e) => return tally.note("broadcast", Err(e.to_string())),
            };
            let mut client = None;
            let mut ticker = tokio::time::interval(Duration::from_millis(50));
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                let result = broadcast(addr, &mut client, &admin).await;
                if result.is_ok() {
                    published.fetch_add(1, Ordering::Relaxed);
                } else {
                    client = None;
                }
                tally.note("broadcast", result);
            }
        });
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
}

async fn sample(server: &mut Proc, tally: &Tally, started: Instant) -> Res<Sample> {
    server.send("stats").await?;
    let tasks: u64 = server
        .expect("stats tasks=", Duration::from_secs(10))
        .await?
        .parse()?;
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid))
        .map(|entries| entries.count() as u64)
        .unwrap_or(0);
    let (ok, failed) = tally.totals();
    Ok(Sample {
        at_s: started.elapsed().as_secs(),
        rss_kib: server.rss_kib().unwrap_or(0),
        fds,
        tasks,
        ok,
        failed,
    })
}

/// One worker's loop: sign in, rotate, read through the cache, a WebSocket, an SSE
/// stream, sign out. Each step's outcome goes to `tally`.
async fn churn(addr: SocketAddr, worker: usize, round: u64, tally: &Tally) {
    let mut client = match Client::connect(addr).await {
        Ok(client) => client,
        Err(e) => return tally.note("connect", Err(e.to_string())),
    };
    let tokens = match expect_json(
        client.post("/dev/token", None, &sign_in_body(worker)).await,
        200,
    ) {
        Ok(tokens) => {
            tally.note("sign-in", Ok(()));
            tokens
        }
        Err(e) => return tally.note("sign-in", Err(e)),
    };
    let body = serde_json::json!({ "refresh_token": tokens["refresh_token"] }).to_string();
    let tokens = match expect_json(client.post("/auth/refresh", None, &body).await, 200) {
        Ok(rotated) => {
            tally.note("refresh", Ok(()));
            rotated
        }
        Err(e) => return tally.note("refresh", Err(e)),
    };
    let access = tokens["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if (round + worker as u64).is_multiple_of(10) {
        let invalidated = client
            .post(
                "/api/cache/invalidate",
                Some(&access),
                r#"{"tags":["analytics"]}"#,
            )
            .await;
        tally.note("cache invalidate", status_is(invalidated, 200));
    }
    let read = client
        .get("/api/analytics/security-events?window=1h", &access)
        .await;
    tally.note("cached read", status_is(read, 200));
    tally.note("websocket", websocket(addr, &access).await);
    tally.note("sse resume", sse(addr, &access).await);
    let body = serde_json::json!({ "refresh_token": tokens["refresh_token"] }).to_string();
    let out = client.post("/auth/logout", Some(&access), &body).await;
    tally.note("logout", status_is(out, 204));
}

/// Each worker signs in as a user of its own, the same one every round: the churn is of
/// sessions and connections, not of accounts (a new account per round would grow the
/// per-user caches and, in memory, the user store, by design).
fn sign_in_body(worker: usize) -> String {
    format!(r#"{{"sub":"00000000-0000-7000-8000-{worker:012}","roles":["admin"]}}"#)
}

fn status_is(answer: std::io::Result<(u16, Vec<u8>)>, want: u16) -> Result<(), String> {
    match answer {
        Ok((status, _)) if status == want => Ok(()),
        Ok((status, body)) => Err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn expect_json(
    answer: std::io::Result<(u16, Vec<u8>)>,
    want: u16,
) -> Result<serde_json::Value, String> {
    match answer {
        Ok((status, body)) if status == want => {
            serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
        }
        other => status_is(other, want).map(|()| serde_json::Value::Null),
    }
}

async fn broadcast(
    addr: SocketAddr,
    client: &mut Option<Client>,
    admin: &str,
) -> Result<(), String> {
    if client.is_none() {
        *client = Some(Client::connect(addr).await.map_err(|e| e.to_string())?);
    }
    let Some(connected) = client.as_mut() else {
        return Err("no connection".into());
    };
    let answer = connected
        .post(
            "/api/dashboard/realtime/broadcast/public:soak",
            Some(admin),
            r#"{"event":"tick","data":{"soak":true}}"#,
        )
        .await;
    status_is(answer, 202)
}

/// Subscribes to `public:soak`, reads for up to 200 ms, closes.
async fn websocket(addr: SocketAddr, access: &str) -> Result<(), String> {
    let url = format!("ws://{addr}/api/dashboard/realtime/ws?access_token={access}");
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let subscribe = r#"{"type":"subscribe","room":"public:soak"}"#;
    ws.send(tokio_tungstenite::tungstenite::Message::text(subscribe))
        .await
        .map_err(|e| e.to_string())?;
    let mut subscribed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, ws.next()).await {
        let message = message.map_err(|e| e.to_string())?;
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            subscribed |= text.as_str().contains(r#""type":"subscribed""#);
        }
    }
    let _ = ws.close(None).await;
    if subscribed {
        Ok(())
    } else {
        Err("no `subscribed` within 200 ms".into())
    }
}

/// Opens the SSE stream from a stale cursor, reads its first bytes, drops it.
async fn sse(addr: SocketAddr, access: &str) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET /api/dashboard/realtime/sse?rooms=public:soak&last_event_id=public:soak%3D1&access_token={access} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut first = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut first))
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let head = String::from_utf8_lossy(&first[..n]);
    // HTTP/1.0 where the stream took its connection over (its body runs until the close).
    if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(head.lines().next().unwrap_or("nothing").to_owned())
    }
}
