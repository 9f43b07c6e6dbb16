//! The command line: arguments, logging, signals.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::ServerConfig;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};
use upcoach_core::config::Settings;
use upcoach_perf::slow::SqlTimingLayer;

use crate::{App, Options, PerfSinks, serve};

/// The settings people change most, each a flag and an environment variable (a flag
/// wins); the rest are environment variables only.
#[derive(Debug, clap::Parser)]
#[command(
    name = "upcoach-server",
    version,
    about = "The upcoach reference server: sign-in, realtime, cache and performance monitoring.",
    after_help = "Also read from the environment: RUST_LOG (log filter, default info), \
                  UPCOACH_LOG_FORMAT=json (one JSON object per line), and the variables of \
                  the README's configuration table."
)]
struct Args {
    /// Serve POST /dev/token (tokens for any user and role) and the dashboard's dev
    /// sign-in; loopback only, never in production
    #[arg(long)]
    dev: bool,
    /// Where to listen [default: 127.0.0.1:8080]
    #[arg(long, env = "UPCOACH_ADDR", value_name = "HOST:PORT")]
    addr: Option<String>,
    /// Redis (redis://, unix://, or redis+cluster://host:port?addr=host:port for a
    /// cluster); in-memory backends when unset. With a password, prefer the variable
    /// (a flag's value shows in `ps`)
    #[arg(long, env = "REDIS_URL", value_name = "URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// PostgreSQL (postgres://); in-memory backends when unset; migrations run at
    /// start. With a password, prefer the variable: a flag's value shows in `ps`
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    database_url: Option<String>,
}

/// Runs the server from the command line and the environment until SIGINT or SIGTERM.
/// `--help` lists the flags beside their variables; a bad flag exits 2.
pub fn cli_main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    let mut options = Options {
        dev: args.dev,
        ..Options::default()
    };
    // Errors name the variable, which `--help` shows beside its flag.
    let config = ServerConfig::from_lookup(|name| match name {
        "UPCOACH_ADDR" => args.addr.clone(),
        "REDIS_URL" => args.redis_url.clone(),
        "DATABASE_URL" => args.database_url.clone(),
        _ => std::env::var(name).ok(),
    });
    let config = match config {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let sinks = PerfSinks::new(&config.perf);
    init_logging(&sinks);
    options.sinks = Some(sinks);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config, options))
}

/// Logs to stderr (filtered by `RUST_LOG`), and SQL timing into the perf sinks (which
/// reads sqlx's statement events whatever `RUST_LOG` says).
fn init_logging(sinks: &PerfSinks) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let sql = sinks
        .sql_layer()
        .with_filter(filter_fn(SqlTimingLayer::wants));
    let registry = tracing_subscriber::registry().with(sql);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if std::env::var("UPCOACH_LOG_FORMAT").is_ok_and(|f| f == "json") {
        registry.with(fmt.json().with_filter(filter)).init();
    } else {
        registry.with(fmt.with_filter(filter)).init();
    }
}

async fn run(config: ServerConfig, options: Options) -> ExitCode {
    let addr = config.addr;
    let app = match App::start(config, options).await {
        Ok(app) => app,
        Err(e) => {
            let chain = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source());
            let message: Vec<String> = chain.map(ToString::to_string).collect();
            tracing::error!(error = %message.join(": "), "could not start");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(%addr, error = %e, "could not listen (set UPCOACH_ADDR to another address)");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %local, "listening on http://{local}");

    // On the signal, realtime connections are told at once while HTTP requests drain;
    // the hub's shutdown is waited for before the event log's last flush.
    let (stopping, realtime) = app
        .hub()
        .shutdown_on(upcoach_core::http::serve::shutdown_signal());
    let result = serve(listener, app.service(), stopping, app.serve_options()).await;
    realtime.finished().await;
    app.shutdown(Duration::from_secs(5)).await;
    match result {
        Ok(()) => {
            tracing::info!("shut down cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server error");
            ExitCode::FAILURE
        }
    }
}
