//! The driver's side of the child processes: starting servers and client fleets,
//! talking to them, reading their memory and CPU time from /proc, publishing at a rate.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};

use crate::http;
use crate::report::{histogram, merge_line, unix_us};

pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// One child process: this executable in a role, with its stdin and stdout.
#[derive(Debug)]
pub(crate) struct Proc {
    name: String,
    child: tokio::process::Child,
    pub(crate) pid: u32,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Proc {
    /// Starts `current_exe --role ...` with its open-file limit raised to the hard one.
    pub(crate) fn spawn(name: &str, args: &[String]) -> Res<Self> {
        let exe = std::env::current_exe()?;
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(r#"ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$0" "$@""#)
            .arg(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("the child exited at once")?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next line starting with `prefix` (others are skipped), without the prefix.
    pub(crate) async fn expect(&mut self, prefix: &str, timeout: Duration) -> Res<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .map_err(|_| format!("{}: no `{prefix}` within {timeout:?}", self.name))??
                .ok_or_else(|| format!("{}: exited before `{prefix}`", self.name))?;
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok(rest.trim_start().to_owned());
            }
        }
    }

    pub(crate) async fn send(&mut self, command: &str) -> Res<()> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Asks the child to stop and waits for it (killing it after `grace`).
    pub(crate) async fn quit(mut self, grace: Duration) {
        let _ = self.send("quit").await;
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            eprintln!("{} did not stop within {grace:?}; killing it", self.name);
            let _ = self.child.kill().await;
        }
    }

    /// Resident memory from /proc/<pid>/status, in KiB.
    pub(crate) fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// User plus system CPU time used so far, in seconds.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return 0.0;
        };
        let Some((_, fields)) = stat.rsplit_once(')') else {
            return 0.0;
        };
        let fields: Vec<&str> = fields.split_whitespace().collect();
        // Field 14 (utime) and 15 (stime); the first after ')' is field 3.
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
            .sum();
        ticks as f64 / clock_ticks()
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Busy and total CPU time of the whole machine (all cores), in ticks, from /proc/stat.
pub(crate) fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Which server a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The reference server, in-memory broadcaster.
    Ours,
    /// The bare tokio-tungstenite broadcast loop.
    Bare,
    /// socketioxide on axum: Socket.IO v4 over WebSocket.
    Socketio,
}

impl Kind {
    /// The name of its runs and table rows.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Ours => "ours",
            Kind::Bare => "bare",
            Kind::Socketio => "socketio",
        }
    }

    /// The client role's `--transport` for its WebSocket subscribers.
    pub(crate) fn ws_transport(self) -> &'static str {
        match self {
            Kind::Ours | Kind::Bare => "ws",
            Kind::Socketio => "socketio",
        }
    }
}

/// A running server process.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) proc: Proc,
    pub(crate) addr: SocketAddr,
    pub(crate) kind: Kind,
}

/// Where the servers share Redis: its URL and the key prefix of this run.
#[derive(Debug, Clone)]
pub(crate) struct SharedRedis {
    pub(crate) url: String,
    pub(crate) prefix: String,
}

impl Server {
    pub(crate) async fn start(
        kind: Kind,
        redis: Option<&SharedRedis>,
        max_connections: usize,
    ) -> Res<Self> {
        let mut args = vec![
            "--role".to_owned(),
            match kind {
                Kind::Ours => "server",
                Kind::Bare => "bare",
                Kind::Socketio => "socketio",
            }
            .to_owned(),
            "--addr".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--max-connections".to_owned(),
            max_connections.to_string(),
        ];
        if let Some(redis) = redis {
            args.extend([
                "--redis".to_owned(),
                redis.url.clone(),
                "--prefix".to_owned(),
                redis.prefix.clone(),
            ]);
        }
        let name = match kind {
            Kind::Ours => "server",
            Kind::Bare => "bare server",
            Kind::Socketio => "socketio server",
        };
        let mut proc = Proc::spawn(name, &args)?;
        let addr = proc
            .expect("ready", Duration::from_secs(30))
            .await?
            .parse()?;
        Ok(Self { proc, addr, kind })
    }

    /// A token for a new user (any string for the comparison servers, which read none).
    pub(crate) async fn token(&self, roles: &[&str]) -> Res<String> {
        match self.kind {
            Kind::Ours => Ok(http::dev_token(self.addr, roles).await?),
            Kind::Bare | Kind::Socketio => Ok(self.kind.label().to_owned()),
        }
    }

    /// Open WebSocket and SSE connections as the server counts them (`status` route;
    /// ours and the Socket.IO server have it).
    pub(crate) async fn open_connections(&self, admin: &str) -> Res<(u64, u64)> {
        let mut client = http::Client::connect(self.addr).await?;
        let (status, body) = client.get("/api/dashboard/realtime/status", admin).await?;
        if status != 200 {
            return Err(format!("status answered {status}").into());
        }
        let json: serde_json::Value = serde_json::from_slice(&body)?;
        let ws = json["connections"]["ws"].as_u64().unwrap_or(0);
        let sse = json["connections"]["sse"].as_u64().unwrap_or(0);
        Ok((ws, sse))
    }

    pub(crate) async fn stop(self) {
        self.proc.quit(Duration::from_secs(10)).await;
    }
}

/// A fresh loopback source address for each client process, so that no two share
/// ephemeral ports (or the TIME_WAIT of an earlier run).
pub(crate) fn next_source() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    IpAddr::V4(Ipv4Addr::new(
        127,
        1,
        ((n / 250) % 250) as u8,
        (n % 250 + 1) as u8,
    ))
}

/// How a fleet of client processes should connect.
#[derive(Debug, Clone)]
pub(crate) struct FleetPlan {
    /// `ws`, `sse` or `socketio` (Socket.IO over WebSocket).
    pub(crate) transport: &'static str,
    pub(crate) connections: usize,
    pub(crate) processes: usize,
    pub(crate) concurrency: usize,
    pub(crate) room: String,
}

/// Client processes holding connections.
#[derive(Debug)]
pub(crate) struct Fleet {
    procs: Vec<Proc>,
    pub(crate) connected: u64,
    pub(crate) failed: u64,
    pub(crate) connect: Histogram<u64>,
    pub(crate) ready: Histogram<u64>,
    /// From the first process started to the last attempt ended.
    pub(crate) elapsed: Duration,
}

/// What the fleet received since its last reset.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) events: u64,
    pub(crate) closed: u64,
    pub(crate) last_us: u64,
    pub(crate) codes: Vec<String>,
    pub(crate) latency: Histogram<u64>,
    /// From the event's `ts` (stamped by the broadcaster, in milliseconds: up to 1 ms
    /// more than the truth).
    pub(crate) stamped: Histogram<u64>,
}

impl Fleet {
    /// Starts the client processes against `servers` (connection `i` of a process goes
    /// to server `i % servers`) and waits until every connection is open or failed.
    pub(crate) async fn open(plan: &FleetPlan, servers: &[&Server]) -> Res<Self> {
        Self::open_via(plan, servers, None).await
    }

    /// [`open`](Self::open), every connection to `via` (a load balancer in front of
    /// `servers`) when given, with tokens from the first server.
    pub(crate) async fn open_via(
        plan: &FleetPlan,
        servers: &[&Server],
        via: Option<std::net::SocketAddr>,
    ) -> Res<Self> {
        let servers = match via {
            Some(_) => &servers[..1],
            None => servers,
        };
        let started = Instant::now();
        let mut procs = Vec::new();
        let processes = plan.processes.max(1);
        for p in 0..processes {
            let count =
                plan.connections / processes + usize::from(p < plan.connections % processes);
            let mut tokens = Vec::new();
            for server in servers {
                tokens.push(server.token(&[]).await?);
            }
            let targets: Vec<String> = servers
                .iter()
                .map(|s| via.unwrap_or(s.addr).to_string())
                .collect();
            let args = vec![
                "--role".to_owned(),
                "client".to_owned(),
                "--transport".to_owned(),
                plan.transport.to_owned(),
                "--targets".to_owned(),
                targets.join(","),
                "--tokens".to_owned(),
                tokens.join(","),
                "--count".to_owned(),
                count.to_string(),
                "--room".to_owned(),
                plan.room.clone(),
                "--source".to_owned(),
                next_source().to_string(),
                "--concurrency".to_owned(),
                plan.concurrency.to_string(),
            ];
            procs.push(Proc::spawn(&format!("client {p}"), &args)?);
        }
        let mut fleet = Fleet {
            procs,
            connected: 0,
            failed: 0,
            connect: histogram(),
            ready: histogram(),
            elapsed: Duration::ZERO,
        };
        for proc in &mut fleet.procs {
            let counts = proc.expect("connected", Duration::from_secs(900)).await?;
            let mut counts = counts
                .split_whitespace()
                .map(|n| n.parse::<u64>().unwrap_or(0));
            fleet.connected += counts.next().unwrap_or(0);
            fleet.failed += counts.next().unwrap_or(0);
            merge_line(
                &mut fleet.connect,
                &proc.expect("hist connect", Duration::from_secs(10)).await?,
            );
            merge_line(
                &mut fleet.ready,
                &proc.expect("hist ready", Duration::from_secs(10)).await?,
            );
        }
        fleet.elapsed = started.elapsed();
        Ok(fleet)
    }

    pub(crate) fn pids(&self) -> impl Iterator<Item = &Proc> {
        self.procs.iter()
    }

    pub(crate) fn cpu_seconds(&self) -> f64 {
        self.procs.iter().map(Proc::cpu_seconds).sum()
    }

    /// Zeroes every process's counters and latency histogram.
    pub(crate) async fn reset(&mut self) -> Res<()> {
        for proc in &mut self.procs {
            proc.send("reset").await?;
        }
        for proc in &mut self.procs {
            proc.expect("ok", Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    /// Events received and connections closed since the last reset.
    pub(crate) async fn count(&mut self) -> Res<(u64, u64)> {
        for proc in &mut self.procs {
            proc.send("count").await?;
        }
        let (mut events, mut closed) = (0, 0);
        for proc in &mut self.procs {
            let line = proc.expect("count", Duration::from_secs(30)).await?;
            let mut v = line
                .split_whitespace()
                .map(|n| n.parse::<u64>().unwrap_or(0));
            events += v.next().unwrap_or(0);
            closed += v.next().unwrap_or(0);
        }
        Ok((events, closed))
    }

    /// Waits until `expected` events have arrived or `timeout` passed; the count.
    pub(crate) async fn wait_for(&mut self, expected: u64, timeout: Duration) -> Res<(u64, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let (events, closed) = self.count().await?;
            if events >= expected || Instant::now() >= deadline {
                return Ok((events, closed));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(crate) async fn report(&mut self) -> Res<Received> {
        for proc in &mut self.procs {
            proc.send("report").await?;
        }
        let mut received = Received {
            events: 0,
            closed: 0,
            last_us: 0,
            codes: Vec::new(),
            latency: histogram(),
            stamped: histogram(),
        };
        for proc in &mut self.procs {
            let line = proc.expect("report", Duration::from_secs(30)).await?;
            let mut v = line.split_whitespace();
            received.events += v.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            received.closed += v.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            let last = v.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            received.last_us = received.last_us.max(last);
            if let Some(codes) = v.next().filter(|c| *c != "-") {
                received.codes.push(codes.to_owned());
            }
            merge_line(
                &mut received.latency,
                &proc.expect("hist latency", Duration::from_secs(30)).await?,
            );
            merge_line(
                &mut received.stamped,
                &proc.expect("hist stamped", Duration::from_secs(30)).await?,
            );
        }
        Ok(received)
    }

    pub(crate) async fn quit(self) {
        for proc in self.procs {
            proc.quit(Duration::from_secs(20)).await;
        }
    }
}

/// What a publishing run did.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) accepted: u64,
    pub(crate) failed: u64,
    /// Publishes that started more than 5 ms after they were due (every connection busy).
    pub(crate) late: u64,
    /// The broadcast request's round trip.
    pub(crate) round_trip: Histogram<u64>,
    /// From the first publish due to the last answered.
    pub(crate) elapsed: Duration,
}

/// Publishes `{"event":"tick","data":{"t":<unix µs>,"n":<i>}}` to `room` at `rate` per
/// second for `duration`: publish `i` is due at `i / rate`, taken by whichever of a few
/// keep-alive connections is free, so a slow answer delays neither the schedule nor the
/// other publishes (until every connection is busy: then publishes start late, and
/// `late` counts them). `t` is stamped when the request is written.
pub(crate) async fn publish(
    addr: SocketAddr,
    token: &str,
    room: &str,
    rate: f64,
    duration: Duration,
) -> Published {
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let connections = ((rate / 10.0).ceil() as usize).clamp(2, 16);
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let path = std::sync::Arc::new(format!("/api/dashboard/realtime/broadcast/{room}"));
    let token = std::sync::Arc::new(token.to_owned());
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (token, path, next) = (token.clone(), path.clone(), next.clone());
        tasks.spawn(async move {
            let mut accepted = 0u64;
            let mut failed = 0u64;
            let mut late = 0u64;
            let mut round_trip = histogram();
            let mut client = http::Client::connect(addr).await.ok();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if tokio::time::Instant::now() > due + Duration::from_millis(5) {
                    late += 1;
                }
                tokio::time::sleep_until(due).await;
                if client.is_none() {
                    client = http::Client::connect(addr).await.ok();
                }
                let Some(conn) = client.as_mut() else {
                    failed += 1;
                    continue;
                };
                let sent = unix_us();
                let body = format!(r#"{{"event":"tick","data":{{"t":{sent},"n":{i}}}}}"#);
                match conn.post(&path, Some(&token), &body).await {
                    Ok((202, _)) => accepted += 1,
                    Ok((status, body)) => {
                        failed += 1;
                        if failed <= 3 {
                            eprintln!(
                                "publish answered {status}: {}",
                                String::from_utf8_lossy(&body)
                            );
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("publish failed: {e}");
                        client = None;
                    }
                }
                round_trip.saturating_record(unix_us().saturating_sub(sent));
            }
            (accepted, failed, late, round_trip)
        });
    }
    let mut published = Published {
        accepted: 0,
        failed: 0,
        late: 0,
        round_trip: histogram(),
        elapsed: Duration::ZERO,
    };
    while let Some(joined) = tasks.join_next().await {
        if let Ok((accepted, failed, late, round_trip)) = joined {
            published.accepted += accepted;
            published.failed += failed;
            published.late += late;
            let _ = published.round_trip.add(&round_trip);
        }
    }
    published.elapsed = start.elapsed();
    published
}

/// Deletes every key under the run's prefix; how many there were.
pub(crate) async fn delete_redis_keys(redis: &SharedRedis) -> Res<u64> {
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{}:*", redis.prefix);
    let mut cursor: u64 = 0;
    let mut deleted = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}
