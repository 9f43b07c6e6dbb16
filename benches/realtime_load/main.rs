//! Realtime load: connections, fan-out and the Redis broadcaster of the reference
//! server, beside a bare tokio-tungstenite broadcast loop and a socketioxide (Socket.IO)
//! server measured in the same run.
//!
//! ```text
//! cargo bench --bench realtime_load -- connections  # 10,000 WebSocket, 10,000 SSE on ours; 10,000 on bare, on socketio
//! cargo bench --bench realtime_load -- fanout       # 10,000 subscribers: ours, bare, socketio, ours over Redis
//! cargo bench --bench realtime_load -- hold         # 50,000 idle WebSocket on 3 servers sharing Redis
//! cargo bench --bench realtime_load -- all          # the three, in that order
//! cargo bench --bench realtime_load -- soak         # 10 minutes of churn; RSS, files, tasks
//! ```
//!
//! `soak` (see `soak.rs`) takes `--minutes N` (10) and `--workers N` (16).
//!
//! Options (after the scenario): `--connections N` (10000), `--clients N` client
//! processes (2; `hold`: 4), `--concurrency N` handshakes in flight per client process
//! (32), `--rates 10,20,40,...` publishes/s for `fanout`, `--seconds N` per rate (10),
//! `--rounds N` (1), `--runs ours,bare,socketio,ours+redis` (which fan-out runs; that is
//! the default; `ours+nginx` adds two of ours sharing Redis behind nginx, with
//! subscribers and publishes through it, against `ours` direct), `--hold-connections N` (50000), `--hold-servers N` (3),
//! `--hold-seconds N` (30). The Redis parts need `REDIS_URL` (skipped, said so, without
//! it); they write under a fresh `CACHE_PREFIX` and delete it afterwards.
//!
//! One executable plays every part: the driver re-executes itself (`--role server`,
//! `--role bare`, `--role socketio`, `--role client`) and talks to each child over its
//! stdin and stdout. The socketio role is socketioxide as a tower layer on axum: its
//! subscribers speak Socket.IO v4 over WebSocket and join the room in their connect
//! packet; publishes go through the same `POST /api/dashboard/realtime/broadcast/{room}`
//! as for the others and are emitted to the room once each. The fan-out tables print
//! ours / bare and ours / socketio for delivered events/s, and the goals: ours' best
//! sustained delivered/s >= 1.2x socketioxide's with every event delivered, and ours' p99
//! at the lowest rate <= 0.8x the bare loop's.
//! The load generator and the servers share this machine's cores, so absolute figures
//! are pessimistic; the ratios to the comparison servers, measured under the same client
//! load, are the result. Under `cargo test` (no `--bench` flag) it exits at once.

mod client;
mod driver;
mod fanout;
mod http;
mod report;
mod scenarios;
mod server;
mod soak;
mod socketio;

use std::collections::HashMap;
use std::process::ExitCode;

/// Command-line options: positionals and `--name value` pairs.
#[derive(Debug, Default)]
pub(crate) struct Args {
    positional: Vec<String>,
    named: HashMap<String, String>,
    bench: bool,
}

impl Args {
    fn parse(raw: impl Iterator<Item = String>) -> Self {
        let mut args = Args::default();
        let mut raw = raw.peekable();
        while let Some(arg) = raw.next() {
            if arg == "--bench" {
                args.bench = true;
            } else if let Some(name) = arg.strip_prefix("--") {
                match raw.next_if(|next| !next.starts_with("--")) {
                    Some(value) => args.named.insert(name.to_owned(), value),
                    None => args.named.insert(name.to_owned(), String::new()),
                };
            } else {
                args.positional.push(arg);
            }
        }
        args
    }

    /// A named option as text.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.named.get(name).map(String::as_str)
    }

    /// A named option parsed, or `default`; exits with a message when it does not parse.
    pub(crate) fn parsed<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("--{name}: cannot read {v:?}");
                std::process::exit(2)
            }),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse(std::env::args().skip(1));
    match args.get("role") {
        Some("server") => return server::run_ours(&args),
        Some("bare") => return server::run_bare(&args),
        Some("socketio") => return socketio::run(&args),
        Some("client") => return client::run(&args),
        Some(other) => {
            eprintln!("unknown role {other:?}");
            return ExitCode::from(2);
        }
        None => {}
    }
    if !args.bench {
        // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do.
        println!("realtime_load: run it with `cargo bench --bench realtime_load -- <scenario>`");
        return ExitCode::SUCCESS;
    }
    let scenario = args.positional.first().map(String::as_str).unwrap_or("");
    let known = ["connections", "fanout", "hold", "all", "soak"];
    if !known.contains(&scenario) {
        eprintln!(
            "usage: cargo bench --bench realtime_load -- <{}> [options]\n(see the top of benches/realtime_load/main.rs)",
            known.join("|")
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(scenarios::run(scenario, &args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("realtime_load failed: {e}");
            ExitCode::FAILURE
        }
    }
}
