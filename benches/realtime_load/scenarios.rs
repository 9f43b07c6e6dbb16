//! The scenarios: what is started, what is measured, and the tables printed.

use std::time::Duration;

use crate::Args;
use crate::driver::{
    Fleet, FleetPlan, Kind, Res, Server, SharedRedis, delete_redis_keys, machine_ticks, publish,
};
use crate::report::{Table, ms_summary, thousands, unix_us};

/// The fan-out runs `--runs` may name, in the order they run. `ours+nginx` (two of ours
/// sharing Redis behind nginx, subscribers and publishes through it) runs when named.
pub(crate) const RUNS: [&str; 5] = ["ours", "bare", "socketio", "ours+redis", "ours+nginx"];

const DEFAULT_RUNS: &str = "ours,bare,socketio,ours+redis";

/// The options every scenario reads.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) connections: usize,
    pub(crate) clients: usize,
    pub(crate) concurrency: usize,
    pub(crate) rates: Vec<f64>,
    pub(crate) seconds: u64,
    pub(crate) rounds: usize,
    pub(crate) hold_connections: usize,
    pub(crate) hold_servers: usize,
    pub(crate) hold_clients: usize,
    pub(crate) hold_seconds: u64,
    pub(crate) runs: Vec<String>,
}

impl Settings {
    fn from(args: &Args) -> Self {
        let rates = args
            .get("rates")
            .unwrap_or("10,20,30,40,50,60,80,100")
            .split(',')
            .filter_map(|r| r.trim().parse::<f64>().ok())
            .filter(|r| *r > 0.0)
            .collect();
        Self {
            connections: args.parsed("connections", 10_000),
            clients: args.parsed::<usize>("clients", 2).max(1),
            concurrency: args.parsed::<usize>("concurrency", 32).max(1),
            rates,
            seconds: args.parsed::<u64>("seconds", 10).max(1),
            rounds: args.parsed::<usize>("rounds", 1).max(1),
            hold_connections: args.parsed("hold-connections", 50_000),
            hold_servers: args.parsed::<usize>("hold-servers", 3).max(1),
            hold_clients: args.parsed::<usize>("hold-clients", 4).max(1),
            hold_seconds: args.parsed("hold-seconds", 30),
            runs: args
                .get("runs")
                .unwrap_or(DEFAULT_RUNS)
                .split(',')
                .map(|r| r.trim().to_owned())
                .collect(),
        }
    }
}

pub(crate) async fn run(scenario: &str, args: &Args) -> Res<()> {
    let settings = Settings::from(args);
    if let Some(unknown) = settings.runs.iter().find(|r| !RUNS.contains(&r.as_str())) {
        return Err(format!(
            "--runs: unknown run {unknown:?} (known: {})",
            RUNS.join(",")
        )
        .into());
    }
    machine_conditions().await;
    if std::env::var("REDIS_URL").is_ok_and(|url| url.starts_with("redis+cluster://")) {
        return Err(
            "REDIS_URL: this bench runs on one Redis node (redis://host:port); its \
                    clean-up scans one node's keys"
                .into(),
        );
    }
    let redis = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(SharedRedis {
            url,
            prefix: format!("rtload-{}-{}", std::process::id(), unix_us() / 1000),
        }),
        _ => {
            println!(
                "REDIS_URL is unset: the Redis parts (fan-out over Redis, 50k hold) are skipped"
            );
            None
        }
    };
    let result = match scenario {
        "connections" => connections(&settings).await,
        "fanout" => crate::fanout::fanout(&settings, redis.as_ref()).await,
        "hold" => hold(&settings, redis.as_ref()).await,
        "soak" => crate::soak::soak(args, redis.as_ref()).await,
        _ => {
            let mut result = connections(&settings).await;
            if result.is_ok() {
                result = crate::fanout::fanout(&settings, redis.as_ref()).await;
            }
            if result.is_ok() {
                result = hold(&settings, redis.as_ref()).await;
            }
            result
        }
    };
    if let Some(redis) = &redis {
        match delete_redis_keys(redis).await {
            Ok(n) => println!("\nRedis: deleted {n} key(s) under {}:*", redis.prefix),
            Err(e) => eprintln!(
                "Redis: could not delete the keys under {}:*: {e}",
                redis.prefix
            ),
        }
    }
    result
}

async fn machine_conditions() {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_default();
    let files = read("/proc/self/limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            l.split_whitespace()
                .skip(3)
                .take(2)
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_default();
    println!(
        "machine: {} cores ({cpu}), {memory}, kernel {}, load average {}, open files soft/hard {files}, ephemeral ports {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        read("/proc/sys/kernel/osrelease").trim(),
        read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        read("/proc/sys/net/ipv4/ip_local_port_range")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("-"),
    );
    let before = machine_ticks();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = machine_ticks();
    let busy = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
    println!(
        "CPU already busy before the run (other work on this machine): {:.0}% of all cores over 2 s",
        busy * 100.0
    );
    println!("load generator, servers and Redis share these cores: judge by the ratios");
}

fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// 10,000 WebSocket, then 10,000 SSE clients on our server, 10,000 WebSocket on the bare
/// loop and 10,000 Socket.IO (over WebSocket) on socketioxide: connect times and RSS per
/// idle connection, a fresh server each.
async fn connections(s: &Settings) -> Res<()> {
    let mut table = Table::new(&[
        "server",
        "transport",
        "open / failed",
        "server counts",
        "connect p50 / p99 / max",
        "subscribed p50 / p99 / max",
        "opened per s",
        "RSS before -> after",
        "RSS per connection",
    ]);
    // Bytes of RSS per idle connection, by server and transport, for the goal lines.
    let mut per_connection: Vec<(&str, &str, f64)> = Vec::new();
    for (kind, transport) in [
        (Kind::Ours, "ws"),
        (Kind::Ours, "sse"),
        (Kind::Bare, "ws"),
        (Kind::Bare, "sse"),
        (Kind::Socketio, "socketio"),
    ] {
        let label = kind.label();
        // Socket.IO is its own client protocol, carried over WebSocket.
        let shown = if transport == "socketio" {
            "ws (Socket.IO)"
        } else {
            transport
        };
        println!("\nconnections: {label} {shown}, {} clients", s.connections);
        let server = Server::start(kind, None, s.connections + 1_000).await?;
        let admin = server.token(&["admin"]).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = server.proc.rss_kib().unwrap_or(0);
        let plan = FleetPlan {
            transport,
            connections: s.connections,
            processes: s.clients,
            concurrency: s.concurrency,
            room: "public:idle".to_owned(),
        };
        let mut fleet = Fleet::open(&plan, &[&server]).await?;
        // Let the connections settle into idleness (queues drained, buffers returned).
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = server.proc.rss_kib().unwrap_or(0);
        let counts = match kind {
            Kind::Ours => {
                let (ws, sse) = server.open_connections(&admin).await?;
                format!("ws {ws}, sse {sse}")
            }
            Kind::Socketio => format!("sockets {}", server.open_connections(&admin).await?.0),
            Kind::Bare => "-".to_owned(),
        };
        let (_, closed) = fleet.count().await?;
        if closed > 0 {
            println!("  {closed} connection(s) closed while idle");
        }
        let per = (after.saturating_sub(before) as f64 * 1024.0) / fleet.connected.max(1) as f64;
        println!(
            "  open {} failed {} in {:.1} s; RSS {} -> {}: {} per connection",
            fleet.connected,
            fleet.failed,
            fleet.elapsed.as_secs_f64(),
            mib(before),
            mib(after),
            kib(per)
        );
        table.row(vec![
            label.to_owned(),
            shown.to_owned(),
            format!("{} / {}", thousands(fleet.connected), fleet.failed),
            counts,
            ms_summary(&fleet.connect),
            if transport != "sse" {
                ms_summary(&fleet.ready)
            } else {
                "(in connect)".to_owned()
            },
            format!(
                "{:.0}",
                fleet.connected as f64 / fleet.elapsed.as_secs_f64()
            ),
            format!("{} -> {}", mib(before), mib(after)),
            kib(per),
        ]);
        per_connection.push((label, transport, per));
        fleet.quit().await;
        server.stop().await;
    }
    table.print(&format!(
        "Connections ({} client processes, {} handshakes in flight each; bare sse: a bare hyper HTTP/1 connection streaming a channel)",
        s.clients, s.concurrency
    ));
    let find = |label: &str, transport: &str| {
        per_connection
            .iter()
            .find(|(l, t, _)| *l == label && *t == transport)
            .map(|(_, _, per)| *per)
    };
    println!("\nGoals (RSS per idle connection):");
    for (transport, goal_kib) in [("ws", 8.0), ("sse", 12.0)] {
        if let (Some(ours), Some(bare)) = (find("ours", transport), find("bare", transport)) {
            let met = if ours <= goal_kib * 1024.0 {
                "met"
            } else {
                "NOT met"
            };
            println!(
                "  {transport}: ours {} (<= {goal_kib} KiB: {met}); bare {}; ours / bare {:.2}x",
                kib(ours),
                kib(bare),
                ours / bare.max(1.0)
            );
        }
    }
    Ok(())
}

/// 50,000 idle WebSocket connections over several server processes sharing Redis,
/// held for a while, then one event published on the first reaches all of them.
async fn hold(s: &Settings, redis: Option<&SharedRedis>) -> Res<()> {
    let Some(redis) = redis else {
        println!("\nhold: skipped (REDIS_URL is unset; the servers share Redis)");
        return Ok(());
    };
    let n = s.hold_connections;
    let per_server = n.div_ceil(s.hold_servers);
    println!(
        "\nhold: {n} WebSocket connections over {} servers sharing Redis, {} client processes",
        s.hold_servers, s.hold_clients
    );
    let mut servers = Vec::new();
    for _ in 0..s.hold_servers {
        servers.push(Server::start(Kind::Ours, Some(redis), per_server + 500).await?);
    }
    let mut admins = Vec::new();
    for server in &servers {
        admins.push(server.token(&["admin"]).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<u64> = servers
        .iter()
        .map(|s| s.proc.rss_kib().unwrap_or(0))
        .collect();
    let room = "public:hold";
    let plan = FleetPlan {
        transport: "ws",
        connections: n,
        processes: s.hold_clients,
        concurrency: s.concurrency,
        room: room.to_owned(),
    };
    let refs: Vec<&Server> = servers.iter().collect();
    let mut fleet = Fleet::open(&plan, &refs).await?;
    println!(
        "  open {} failed {} in {:.1} s; holding for {} s",
        fleet.connected,
        fleet.failed,
        fleet.elapsed.as_secs_f64(),
        s.hold_seconds
    );
    tokio::time::sleep(Duration::from_secs(s.hold_seconds)).await;
    let after: Vec<u64> = servers
        .iter()
        .map(|s| s.proc.rss_kib().unwrap_or(0))
        .collect();
    let mut counted = 0;
    for (server, admin) in servers.iter().zip(&admins) {
        counted += server.open_connections(admin).await?.0;
    }
    let (_, closed) = fleet.count().await?;
    fleet.reset().await?;
    let probe = publish(
        servers[0].addr,
        &admins[0],
        room,
        1.0,
        Duration::from_millis(500),
    )
    .await;
    let expected = probe.accepted * fleet.connected;
    let (reached, _) = fleet.wait_for(expected, Duration::from_secs(15)).await?;
    let received = fleet.report().await?;
    let client_rss: u64 = fleet.pids().map(|p| p.rss_kib().unwrap_or(0)).sum();
    let grown: u64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    let per = grown as f64 * 1024.0 / fleet.connected.max(1) as f64;

    let mut table = Table::new(&[
        "servers",
        "open / failed",
        "servers count",
        "closed while held",
        "connect p50 / p99 / max",
        "subscribed p50 / p99 / max",
        "RSS per server (after)",
        "RSS per connection",
        "one event reached",
        "its latency p50 / p99 / max",
    ]);
    table.row(vec![
        s.hold_servers.to_string(),
        format!("{} / {}", thousands(fleet.connected), fleet.failed),
        thousands(counted),
        closed.to_string(),
        ms_summary(&fleet.connect),
        ms_summary(&fleet.ready),
        after.iter().map(|k| mib(*k)).collect::<Vec<_>>().join(", "),
        kib(per),
        format!("{} / {}", thousands(reached), thousands(expected)),
        ms_summary(&received.latency),
    ]);
    table.print(&format!(
        "Idle WebSocket connections held for {} s across processes sharing Redis (goal: 50,000); client processes' RSS {}",
        s.hold_seconds,
        mib(client_rss)
    ));
    fleet.quit().await;
    for server in servers {
        server.stop().await;
    }
    Ok(())
}
