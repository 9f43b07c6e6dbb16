//! `cargo run -p upcoach-axum-example [-- --dev]`: the axum example on `UPCOACH_ADDR`,
//! configured by the environment as the reference server is (`AUTH_SIGNING_KEY`,
//! `GOOGLE_*`, `UPCOACH_PUBLIC_URL`, `REALTIME_*`, ...). `--dev` serves
//! `POST /dev/token`, on a loopback address only.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use upcoach_auth::threat::ThreatConfig;
use upcoach_core::config::Settings;
use upcoach_core::http::protect::LimitConfig;

use upcoach_auth::config::AuthConfig;
use upcoach_axum_example::{App, CappedListener, Error, Peer, router};
use upcoach_core::SystemClock;
use upcoach_core::config::Env;
use upcoach_realtime::HubConfig;

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let dev = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--dev") => true,
        Some(other) => {
            eprintln!("unknown argument {other:?}: the only one is --dev");
            return ExitCode::from(2);
        }
    };
    match run(dev).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(dev: bool) -> Result<(), Error> {
    let mut env = Env::process();
    let addr = env.socket_addr("UPCOACH_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)));
    let (auth, hub) = (AuthConfig::read(&mut env), HubConfig::read(&mut env));
    let (limits, threats) = (LimitConfig::read(&mut env), ThreatConfig::read(&mut env));
    let (auth, hub, limits, threats) = env.finish((auth, hub, limits, threats))?;
    let app = Arc::new(App::new(&auth, hub, &limits, &threats, addr, dev).await?);
    let refresh = app.auth.sessions().refresh_store().clone();
    upcoach_auth::refresh::spawn_purge(
        refresh,
        Arc::new(SystemClock),
        Duration::from_secs(600),
        |_| {},
    );
    let listener = CappedListener::new(
        tokio::net::TcpListener::bind(addr).await?,
        limits.connection_limits(),
    );
    tracing::info!(
        "listening on http://{}",
        axum::serve::Listener::local_addr(&listener)?
    );
    let hub = app.hub.clone();
    let service = router(app).into_make_service_with_connect_info::<Peer>();
    axum::serve(listener, service)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            // Realtime streams would hold the drain: close them first.
            hub.shutdown(Duration::from_secs(5)).await;
        })
        .await?;
    Ok(())
}
