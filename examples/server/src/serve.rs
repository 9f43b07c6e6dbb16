//! The accept loop with graceful shutdown.

use std::future::Future;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

/// How the accept loop behaves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How long in-flight requests may take to finish after shutdown starts (default 30 s).
    pub drain_timeout: Duration,
    /// How long a client may take to send its request headers (default 10 s).
    pub header_read_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves HTTP/1.1 on `listener` with `service` until `shutdown` completes, then stops
/// accepting, lets in-flight requests finish (up to the drain timeout) and returns.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    shutdown: impl Future<Output = ()>,
    options: ServeOptions,
) -> std::io::Result<()>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let connection = http.serve_connection(TokioIo::new(stream), service.clone());
                    let connection = graceful.watch(connection);
                    connections.spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors or a transient accept error: wait, don't spin.
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connection tasks so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }

    drop(listener);
    let in_flight = graceful.count();
    tracing::info!(
        connections = in_flight,
        "shutting down: no new connections, draining in-flight requests"
    );
    match tokio::time::timeout(options.drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => {
            tracing::warn!(
                timeout = ?options.drain_timeout,
                remaining = connections.len(),
                "drain timeout reached; closing the remaining connections"
            );
            connections.abort_all();
        }
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}
