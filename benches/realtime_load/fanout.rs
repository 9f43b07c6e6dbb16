//! The fan-out scenario: 10,000 WebSocket subscribers of one room, publishes at each
//! rate of a ladder; ours in memory, the bare loop, socketioxide (Socket.IO over
//! WebSocket), and ours over Redis.

use std::time::Duration;

use crate::driver::{Fleet, FleetPlan, Kind, Res, Server, SharedRedis, machine_ticks, publish};
use crate::report::{Table, ms, ms_summary, thousands};
use crate::scenarios::{RUNS, Settings};

/// The template sized for 10,000 proxied WebSockets: two workers, `reuseport`, each
/// worker's open-file limit raised, no access log, and no cap per client address (each
/// client process holds thousands of the connections).
fn sized(config: String) -> String {
    let lines = config.lines().map(|line| match line.trim_start() {
        l if l.starts_with("listen ") => line.replace(';', " reuseport;"),
        l if l.starts_with("access_log ") => "    access_log off;".to_owned(),
        _ => line.to_owned(),
    });
    lines
        .collect::<Vec<_>>()
        .join("\n")
        .replace("worker_processes 1;", "worker_processes 2;")
        .replace("worker_rlimit_nofile 16384;", "worker_rlimit_nofile 19500;")
        .replace("worker_connections 8192;", "worker_connections 19000;")
        .replace("limit_conn per_client 256;", "")
}

/// One rate of one fan-out run.
#[derive(Debug, Clone)]
struct Step {
    label: &'static str,
    round: usize,
    rate: f64,
    subscribers: u64,
    offered: f64,
    /// Events received during the publishing window, per second.
    delivered: f64,
    /// Received after the drain, over expected.
    complete: f64,
    /// Events expected: publishes accepted times subscribers.
    expected: u64,
    /// Expected and not received after the drain.
    missing: u64,
    latency: String,
    p99_us: u64,
    /// From the broadcaster's `ts` stamp: the fan-out alone, without the publish request.
    stamped: String,
    stamped_p99_us: u64,
    round_trip_p99_us: u64,
    server_cpu: f64,
    client_cpu: f64,
    machine_busy: f64,
    closed: u64,
    sustained: bool,
}

/// 10,000 WebSocket subscribers of one room; publishes at each rate of the ladder until
/// one is not sustained. Ours in memory, the bare loop, socketioxide, ours over Redis
/// (publish on one process, subscribers on another), one after the other under the same
/// client load. Every other round runs them in the opposite order, so that a machine
/// whose speed drifts during the run (a shared host's does) weighs on each server alike.
pub(crate) async fn fanout(s: &Settings, redis: Option<&SharedRedis>) -> Res<()> {
    let mut steps: Vec<Step> = Vec::new();
    for round in 1..=s.rounds {
        let mut order = RUNS;
        if round % 2 == 0 {
            order.reverse();
        }
        for label in order {
            if !s.runs.iter().any(|r| r == label) {
                continue;
            }
            let redis = match (label, redis) {
                ("ours+redis" | "ours+nginx", None) => {
                    println!("\nfan-out: {label} needs REDIS_URL: skipped");
                    continue;
                }
                ("ours+nginx", _) if upcoach_testing::Nginx::binary().is_none() => {
                    println!(
                        "\nfan-out: {label} needs nginx (apt-get install nginx-light): skipped"
                    );
                    continue;
                }
                ("ours+redis" | "ours+nginx", Some(redis)) => Some(redis),
                _ => None,
            };
            steps.extend(fanout_run(s, label, round, redis).await?);
        }
    }
    print_fanout(s, &steps);
    Ok(())
}

async fn fanout_run(
    s: &Settings,
    label: &'static str,
    round: usize,
    redis: Option<&SharedRedis>,
) -> Res<Vec<Step>> {
    println!(
        "\nfan-out: {label}, round {round}, {} subscribers",
        s.connections
    );
    let kind = match label {
        "bare" => Kind::Bare,
        "socketio" => Kind::Socketio,
        _ => Kind::Ours,
    };
    let room = "public:bench";
    let max = s.connections + 1_000;
    let publisher = Server::start(kind, redis, max).await?;
    let subscriber = match redis {
        Some(_) => Some(Server::start(kind, redis, max).await?),
        None => None,
    };
    let servers: Vec<&Server> = std::iter::once(&publisher)
        .chain(subscriber.as_ref())
        .collect();
    let reading = subscriber.as_ref().unwrap_or(&publisher);
    let admin = publisher.token(&["admin"]).await?;
    // ours+nginx: both processes behind nginx; subscribers and publishes go through it.
    let nginx = match label {
        "ours+nginx" => Some(
            upcoach_testing::Nginx::start(&[publisher.addr, reading.addr], "127.0.0.2", sized)
                .await?,
        ),
        _ => None,
    };
    let via = nginx.as_ref().map(|n| n.addr());
    let plan = FleetPlan {
        transport: kind.ws_transport(),
        connections: s.connections,
        processes: s.clients,
        concurrency: s.concurrency,
        room: room.to_owned(),
    };
    let mut fleet = Fleet::open_via(&plan, &[reading], via).await?;
    println!(
        "  {} subscribed ({} failed) in {:.1} s",
        fleet.connected,
        fleet.failed,
        fleet.elapsed.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let subscribers = fleet.connected;
    let window = Duration::from_secs(s.seconds);
    let mut steps = Vec::new();
    for &rate in &s.rates {
        fleet.reset().await?;
        let nginx_cpu = || nginx.as_ref().map_or(0.0, |n| n.cpu_seconds());
        let server_cpu0: f64 =
            servers.iter().map(|s| s.proc.cpu_seconds()).sum::<f64>() + nginx_cpu();
        let client_cpu0 = fleet.cpu_seconds();
        let machine0 = machine_ticks();
        let published = publish(via.unwrap_or(publisher.addr), &admin, room, rate, window).await;
        let (in_window, _) = fleet.count().await?;
        let server_cpu =
            servers.iter().map(|s| s.proc.cpu_seconds()).sum::<f64>() + nginx_cpu() - server_cpu0;
        let client_cpu = fleet.cpu_seconds() - client_cpu0;
        let machine1 = machine_ticks();
        let expected = published.accepted * subscribers;
        let (after, closed) = fleet.wait_for(expected, Duration::from_secs(5)).await?;
        let received = fleet.report().await?;
        let seconds = published.elapsed.as_secs_f64();
        let busy = (machine1.0 - machine0.0) as f64 / (machine1.1 - machine0.1).max(1) as f64;
        let complete = after as f64 / expected.max(1) as f64;
        let sustained = closed == 0
            && published.failed == 0
            && seconds <= window.as_secs_f64() + 0.5
            && complete >= 0.999
            && received.latency.value_at_quantile(0.99) < 1_000_000;
        let step = Step {
            label,
            round,
            rate,
            subscribers,
            offered: published.accepted as f64 / seconds,
            delivered: in_window as f64 / seconds,
            complete,
            expected,
            missing: expected.saturating_sub(after),
            latency: ms_summary(&received.latency),
            p99_us: received.latency.value_at_quantile(0.99),
            stamped: ms_summary(&received.stamped),
            stamped_p99_us: received.stamped.value_at_quantile(0.99),
            round_trip_p99_us: published.round_trip.value_at_quantile(0.99),
            server_cpu: server_cpu / seconds,
            client_cpu: client_cpu / seconds,
            machine_busy: busy,
            closed,
            sustained,
        };
        println!(
            "  {rate:>5} publishes/s: {} published in {:.1} s ({} late, {} failed), {} delivered/s in the window, {:.2}% complete, latency p50/p99/max {} (from ts {}), server CPU {:.0}%, clients {:.0}%, machine {:.0}% busy, closed {}{}{}",
            published.accepted,
            seconds,
            published.late,
            published.failed,
            thousands(step.delivered as u64),
            complete * 100.0,
            step.latency,
            step.stamped,
            step.server_cpu * 100.0,
            step.client_cpu * 100.0,
            busy * 100.0,
            closed,
            if received.codes.is_empty() {
                String::new()
            } else {
                format!(" ({})", received.codes.join(","))
            },
            if sustained { "" } else { "  <- not sustained" },
        );
        steps.push(step);
        if !sustained {
            break;
        }
        // Let queues and the previous window's stragglers clear.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    fleet.quit().await;
    drop(nginx);
    publisher.stop().await;
    if let Some(subscriber) = subscriber {
        subscriber.stop().await;
    }
    Ok(steps)
}

fn print_fanout(s: &Settings, steps: &[Step]) {
    let mut table = Table::new(&[
        "run",
        "publishes/s",
        "subscribers",
        "delivered events/s",
        "complete",
        "latency p50 / p99 / max",
        "from ts p50 / p99 / max",
        "publish RTT p99",
        "server CPU",
        "clients CPU",
        "machine busy",
        "closed",
        "sustained",
    ]);
    for st in steps {
        table.row(vec![
            format!("{} #{}", st.label, st.round),
            format!("{:.1}", st.offered),
            thousands(st.subscribers),
            thousands(st.delivered as u64),
            format!("{:.2}%", st.complete * 100.0),
            st.latency.clone(),
            st.stamped.clone(),
            ms(st.round_trip_p99_us),
            format!("{:.0}%", st.server_cpu * 100.0),
            format!("{:.0}%", st.client_cpu * 100.0),
            format!("{:.0}%", st.machine_busy * 100.0),
            st.closed.to_string(),
            if st.sustained { "yes" } else { "no" }.to_owned(),
        ]);
    }
    table.print(&format!(
        "Fan-out to one room ({} s per rate; sustained = every publish answered within the window + 0.5 s, every event delivered (within 5 s of the window's end), latency p99 < 1 s, no connection closed)",
        s.seconds
    ));

    let mut ratios = Table::new(&[
        "round",
        "publishes/s",
        "ours delivered/s",
        "bare delivered/s",
        "socketio delivered/s",
        "ours / bare",
        "ours / socketio",
        "ours p99",
        "bare p99",
        "socketio p99",
        "ours p99 / bare p99",
        "ours+redis p99",
        "Redis adds (p99)",
        "Redis adds (p99 from ts)",
    ]);
    let find = |label: &str, round: usize, rate: f64| {
        steps
            .iter()
            .find(|st| st.label == label && st.round == round && st.rate == rate)
    };
    // The best sustained step of a run: the most events delivered per second.
    let best = |label: &str, round: usize| {
        steps
            .iter()
            .filter(|st| st.label == label && st.round == round && st.sustained)
            .max_by(|a, b| a.delivered.total_cmp(&b.delivered))
    };
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.3}", a / b)
        } else {
            "-".to_owned()
        }
    };
    let delivered =
        |st: Option<&Step>| st.map_or("-".to_owned(), |st| thousands(st.delivered as u64));
    let p99 = |st: Option<&Step>| st.map_or("-".to_owned(), |st| ms(st.p99_us));
    let mut goals = Vec::new();
    for round in 1..=s.rounds {
        for &rate in &s.rates {
            let (ours, bare, socketio, redis) = (
                find("ours", round, rate),
                find("bare", round, rate),
                find("socketio", round, rate),
                find("ours+redis", round, rate),
            );
            if ours.is_none() && bare.is_none() && socketio.is_none() && redis.is_none() {
                continue;
            }
            ratios.row(vec![
                round.to_string(),
                format!("{rate}"),
                delivered(ours),
                delivered(bare),
                delivered(socketio),
                match (ours, bare) {
                    (Some(o), Some(b)) => ratio(o.delivered, b.delivered),
                    _ => "-".to_owned(),
                },
                match (ours, socketio) {
                    (Some(o), Some(x)) => ratio(o.delivered, x.delivered),
                    _ => "-".to_owned(),
                },
                p99(ours),
                p99(bare),
                p99(socketio),
                match (ours, bare) {
                    (Some(o), Some(b)) => ratio(o.p99_us as f64, b.p99_us as f64),
                    _ => "-".to_owned(),
                },
                p99(redis),
                match (ours, redis) {
                    (Some(o), Some(r)) => {
                        format!("{:+.1} ms", (r.p99_us as f64 - o.p99_us as f64) / 1000.0)
                    }
                    _ => "-".to_owned(),
                },
                match (ours, redis) {
                    (Some(o), Some(r)) => format!(
                        "{:+.1} ms",
                        (r.stamped_p99_us as f64 - o.stamped_p99_us as f64) / 1000.0
                    ),
                    _ => "-".to_owned(),
                },
            ]);
        }
        let (ours, bare, socketio, redis) = (
            best("ours", round),
            best("bare", round),
            best("socketio", round),
            best("ours+redis", round),
        );
        let rate_of = |st: Option<&Step>| st.map_or(0.0, |st| st.delivered);
        ratios.row(vec![
            round.to_string(),
            "best sustained".to_owned(),
            delivered(ours),
            delivered(bare),
            delivered(socketio),
            ratio(rate_of(ours), rate_of(bare)),
            ratio(rate_of(ours), rate_of(socketio)),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            redis.map_or(String::new(), |r| {
                format!("({} /s)", thousands(r.delivered as u64))
            }),
            String::new(),
            String::new(),
        ]);
        goals.extend(goal_lines(s, round, ours, socketio, |label, rate| {
            find(label, round, rate)
        }));
    }
    goals.extend(p99_over_rounds(s, |label, round, rate| {
        find(label, round, rate)
    }));
    ratios.print("Ours against the bare tokio-tungstenite loop and socketioxide, and the Redis broadcaster's added latency (goals: ours / bare >= 0.8x; p99 <= 25 ms at 10 publishes/s; >= 500,000 events/s)");
    print_nginx(s, steps);
    if !goals.is_empty() {
        println!(
            "\nGoals against socketioxide and the bare loop (ours' best sustained delivered/s >= 1.2x socketioxide's with every event delivered; ours' p99 at the lowest rate <= 0.8x the bare loop's):"
        );
        for line in goals {
            println!("  {line}");
        }
    }
}

/// `ours+nginx` against `ours` direct, rate by rate and at their best sustained: what
/// the hop through nginx and the second process change.
fn print_nginx(s: &Settings, steps: &[Step]) {
    if !steps.iter().any(|st| st.label == "ours+nginx") {
        return;
    }
    let mut table = Table::new(&[
        "round",
        "publishes/s",
        "ours delivered/s",
        "ours+nginx delivered/s",
        "nginx / direct",
        "ours p99",
        "ours+nginx p99",
        "p99 nginx / direct",
        "ours CPU",
        "ours+nginx CPU (2 servers + nginx)",
    ]);
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.3}", a / b)
        } else {
            "-".to_owned()
        }
    };
    let cell = |st: Option<&Step>, f: &dyn Fn(&Step) -> String| st.map_or("-".to_owned(), f);
    let pair = |a: Option<&Step>, b: Option<&Step>, f: &dyn Fn(&Step) -> f64| match (a, b) {
        (Some(a), Some(b)) => ratio(f(a), f(b)),
        _ => "-".to_owned(),
    };
    for round in 1..=s.rounds {
        let find = |label: &str, rate: f64| {
            (steps.iter()).find(|st| st.label == label && st.round == round && st.rate == rate)
        };
        let best = |label: &str| {
            (steps.iter())
                .filter(|st| st.label == label && st.round == round && st.sustained)
                .max_by(|a, b| a.delivered.total_cmp(&b.delivered))
        };
        let rows = s.rates.iter().map(|&rate| {
            (
                format!("{rate}"),
                find("ours", rate),
                find("ours+nginx", rate),
            )
        });
        let rows = rows.chain([(
            "best sustained".to_owned(),
            best("ours"),
            best("ours+nginx"),
        )]);
        for (rate, direct, nginx) in rows {
            if direct.is_none() && nginx.is_none() {
                continue;
            }
            table.row(vec![
                round.to_string(),
                rate,
                cell(direct, &|st| thousands(st.delivered as u64)),
                cell(nginx, &|st| thousands(st.delivered as u64)),
                pair(nginx, direct, &|st| st.delivered),
                cell(direct, &|st| ms(st.p99_us)),
                cell(nginx, &|st| ms(st.p99_us)),
                pair(nginx, direct, &|st| st.p99_us as f64),
                cell(direct, &|st| format!("{:.0}%", st.server_cpu * 100.0)),
                cell(nginx, &|st| format!("{:.0}%", st.server_cpu * 100.0)),
            ]);
        }
    }
    table.print("Through nginx to two of ours sharing Redis, against one of ours direct (same subscribers, same client load)");
}

/// Ours' p99 over the bare loop's, in the same round at the same rate.
fn p99_ratio(ours: &Step, bare: &Step) -> f64 {
    ours.p99_us as f64 / (bare.p99_us as f64).max(1.0)
}

/// Over several rounds, the p99 goal judged by the median of the rounds' own ratios
/// (ours and the bare loop run back to back in each round, so each ratio cancels that
/// round's machine), with their range and the servers' CPU at that rate beside it.
fn p99_over_rounds<'a>(
    s: &Settings,
    find: impl Fn(&str, usize, f64) -> Option<&'a Step>,
) -> Option<String> {
    let lowest = s.rates.iter().copied().fold(f64::INFINITY, f64::min);
    let pairs: Vec<(&Step, &Step)> = (1..=s.rounds)
        .filter_map(|round| Some((find("ours", round, lowest)?, find("bare", round, lowest)?)))
        .collect();
    if pairs.len() < 2 {
        return None;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let m = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        (m, v[0], v[n - 1])
    };
    let (p99, low, high) = median(pairs.iter().map(|(o, b)| p99_ratio(o, b)).collect());
    let (cpu, _, _) = median(
        pairs
            .iter()
            .map(|(o, b)| o.server_cpu / b.server_cpu.max(1e-9))
            .collect(),
    );
    Some(format!(
        "all {} rounds: p99 at {lowest} publishes/s, median of the rounds' ratios ours / bare {p99:.2}x ({low:.2} to {high:.2}), server CPU ours / bare {cpu:.2} (median) (<= 0.8x): {}",
        pairs.len(),
        if p99 <= 0.8 { "met" } else { "NOT met" },
    ))
}

/// The goal lines of one round: ours' best sustained delivered/s against socketioxide's
/// (and whether every event of that step arrived), ours' p99 at the ladder's lowest rate
/// against the bare loop's.
fn goal_lines<'a>(
    s: &Settings,
    round: usize,
    ours: Option<&Step>,
    socketio: Option<&Step>,
    find: impl Fn(&str, f64) -> Option<&'a Step>,
) -> Vec<String> {
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut lines = Vec::new();
    match (ours, socketio) {
        (Some(o), Some(x)) => {
            let r = o.delivered / x.delivered.max(1.0);
            lines.push(format!(
                "round {round}: best sustained delivered/s, ours {} ({} publishes/s, {} of {} events missing) / socketio {} ({} publishes/s, {} missing) = {r:.2}x (>= 1.2x, every event delivered): {}",
                thousands(o.delivered as u64),
                o.rate,
                thousands(o.missing),
                thousands(o.expected),
                thousands(x.delivered as u64),
                x.rate,
                thousands(x.missing),
                met(r >= 1.2 && o.missing == 0),
            ));
        }
        (None, _) if s.runs.iter().any(|r| r == "ours") => {
            lines.push(format!("round {round}: ours sustained no rate"));
        }
        (Some(_), None) if s.runs.iter().any(|r| r == "socketio") => {
            lines.push(format!(
                "round {round}: socketio sustained no rate (ours did): met"
            ));
        }
        _ => {}
    }
    let lowest = s.rates.iter().copied().fold(f64::INFINITY, f64::min);
    if let (Some(o), Some(b)) = (find("ours", lowest), find("bare", lowest)) {
        let r = p99_ratio(o, b);
        lines.push(format!(
            "round {round}: p99 at {lowest} publishes/s, ours {} / bare {} = {r:.2}x (<= 0.8x): {}",
            ms(o.p99_us),
            ms(b.p99_us),
            met(r <= 0.8),
        ));
    }
    lines
}
