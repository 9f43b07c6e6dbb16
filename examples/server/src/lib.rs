//! The upcoach reference server: the crates composed behind hyper 1.x.
//!
//! Run it on its embedded, in-memory backends:
//!
//! ```text
//! cargo run --example server            # or: cargo run -p upcoach-server
//! cargo run --example server -- --dev   # also serves POST /dev/token
//! ```
//!
//! With `REDIS_URL` and `DATABASE_URL` set it uses Redis and Postgres, and applies the
//! migrations at start. Every route of `API.md` is a crate's; this crate only composes.
//!
//! Embedding it in a test:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use upcoach_server::{App, Options};
//!
//! let app = App::start(upcoach_server::ServerConfig::default(), Options::default()).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(upcoach_server::serve(listener, app.service(), async {
//!     let _ = stopped.await;
//! }, Default::default()));
//! // ... requests to http://{addr} ...
//! let _ = stop.send(());
//! server.await??;
//! # let _ = addr; Ok(()) }
//! ```

mod app;
mod cli;
mod config;
mod perf_routes;
mod router;
mod routes;

pub use app::{App, AppService, Backends, HttpService, Options, StartError};
pub use cli::cli_main;
pub use config::ServerConfig;
pub use router::RouteFuture;
pub use upcoach_perf::PerfSinks;
/// The body type of every response.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;
pub use upcoach_core::http::ApiError;
pub use upcoach_core::http::serve::{ServeOptions, serve};
