//! An HTTP/1.1 accept loop for hyper services (feature `server`): the peer's address in
//! every request ([`ClientAddr`]), a deadline for request headers, a cap on open
//! connections per process and per address ([`ConnectionLimits`]), upgrades (WebSocket)
//! and a graceful drain on shutdown. The reference server runs on it; a host with its
//! own loop (axum's `serve`) keeps its own and takes the pieces it lacks.

use std::future::Future;
use std::time::Duration;

use super::{ClientAddr, ConnectionLimits, HeldStream};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Puts the peer's address into each request's extensions ([`ClientAddr`]), where the
/// crates read it for audit records.
#[derive(Debug, Clone)]
struct WithPeer<S> {
    inner: S,
    peer: std::net::SocketAddr,
}

impl<S, B> hyper::service::Service<http::Request<B>> for WithPeer<S>
where
    S: hyper::service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(ClientAddr(self.peer));
        self.inner.call(request)
    }
}

/// How the accept loop behaves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How long in-flight requests may take to finish after shutdown starts (default 30 s).
    pub drain_timeout: Duration,
    /// How long a client may take to send its request headers (default 10 s).
    pub header_read_timeout: Duration,
    /// The cap on open connections (default: none). A connection over it gets a canned
    /// 503 or 429 answer ([`ConnectionRefused::http_response`](super::ConnectionRefused::http_response))
    /// and is closed before any of its bytes are read.
    pub limits: Option<ConnectionLimits>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            limits: None,
        }
    }
}

/// Serves HTTP/1.1 (with upgrades, for WebSocket) on `listener` with `service` until
/// `shutdown` completes, then stops accepting, lets in-flight requests finish (up to the
/// drain timeout) and returns. Upgraded connections are no longer HTTP: their owner
/// (the realtime hub) closes them.
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
    // hyper-util's GracefulShutdown does not take hyper's upgradeable HTTP/1
    // connection, so each connection watches this channel itself.
    let (stop, stopping) = watch::channel(false);
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
                    let stream = match &options.limits {
                        Some(limits) => match limits.admit(stream, peer) {
                            Some(held) => held,
                            None => continue,
                        },
                        None => HeldStream::unlimited(stream),
                    };
                    let connection = http
                        .serve_connection(
                            TokioIo::new(stream),
                            WithPeer { inner: service.clone(), peer },
                        )
                        .with_upgrades();
                    let mut stopping = stopping.clone();
                    connections.spawn(async move {
                        tokio::pin!(connection);
                        let result = tokio::select! {
                            result = connection.as_mut() => result,
                            () = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
                                connection.as_mut().graceful_shutdown();
                                connection.await
                            }
                        };
                        if let Err(e) = result {
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
    tracing::info!(
        connections = connections.len(),
        "shutting down: no new connections, draining in-flight requests"
    );
    stop.send_replace(true);
    let drained = tokio::time::timeout(options.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => {
            tracing::warn!(
                timeout = ?options.drain_timeout,
                remaining = connections.len(),
                "drain timeout reached; closing the remaining connections"
            );
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }
    }
    Ok(())
}
