//! An HTTP/1.1 accept loop for hyper services (feature `server`): the peer's address in
//! every request ([`ClientAddr`]), a deadline for request headers, a cap on open
//! connections per process and per address ([`ConnectionLimits`]), upgrades (WebSocket)
//! a graceful drain on shutdown, and the hand-over of a connection to a long-lived
//! response ([`ConnectionHandoff`]); [`ConnectionService`] hands it a stack of tower
//! layers. The reference server runs on it; a host with its own loop (axum's `serve`)
//! keeps its own and takes the pieces it lacks.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::handoff::lock;
use super::{ClientAddr, ConnectionHandoff, ConnectionLimits, HandoffStream, HeldStream};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Puts the peer's address into each request's extensions ([`ClientAddr`]), where the
/// crates read it for audit records, and the connection's [`ConnectionHandoff`].
#[derive(Debug, Clone)]
struct WithPeer<S> {
    inner: S,
    peer: std::net::SocketAddr,
    handoff: ConnectionHandoff,
}

impl<S, B> hyper::service::Service<http::Request<B>> for WithPeer<S>
where
    S: hyper::service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: http::Request<B>) -> Self::Future {
        let extensions = request.extensions_mut();
        extensions.insert(ClientAddr(self.peer));
        extensions.insert(self.handoff.clone());
        self.inner.call(request)
    }
}

/// A tower service as hyper's, for one connection ([`serve`] clones it for each): every
/// request goes to the connection's own `S`, called in place once it says it is ready,
/// as upcoach's layers always are at once. hyper-util's `TowerToHyperService` clones the
/// whole stack of layers for every request instead, which touches every shared
/// reference count in it. A service that is not ready at once is cloned and waited for,
/// as there.
#[derive(Debug)]
pub struct ConnectionService<S> {
    service: Mutex<S>,
}

impl<S> ConnectionService<S> {
    /// `service`, for hyper.
    pub fn new(service: S) -> Self {
        Self {
            service: Mutex::new(service),
        }
    }
}

impl<S: Clone> Clone for ConnectionService<S> {
    fn clone(&self) -> Self {
        Self::new(lock(&self.service).clone())
    }
}

impl<S, R> hyper::service::Service<R> for ConnectionService<S>
where
    S: tower_service::Service<R> + Clone + Send + 'static,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ConnectionFuture<S::Future, S::Response, S::Error>;

    fn call(&self, request: R) -> Self::Future {
        let mut service = lock(&self.service);
        match service.poll_ready(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(Ok(())) => ConnectionFuture::Called {
                future: service.call(request),
            },
            Poll::Ready(Err(error)) => ConnectionFuture::Failed { error: Some(error) },
            Poll::Pending => {
                let mut service = service.clone();
                ConnectionFuture::Waiting {
                    future: Box::pin(async move {
                        std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                        service.call(request).await
                    }),
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`ConnectionService`].
    #[project = ConnectionFutureProj]
    #[allow(missing_docs)]
    pub enum ConnectionFuture<F, T, E> {
        /// The service was ready and called.
        Called {
            #[pin]
            future: F,
        },
        /// The service said it failed.
        Failed { error: Option<E> },
        /// The service was not ready: a clone of it is waited for, then called.
        Waiting {
            future: Pin<Box<dyn Future<Output = Result<T, E>> + Send>>,
        },
    }
}

impl<F, T, E> std::fmt::Debug for ConnectionFuture<F, T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionFuture")
    }
}

impl<F, T, E> Future for ConnectionFuture<F, T, E>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ConnectionFutureProj::Called { future } => future.poll(cx),
            ConnectionFutureProj::Failed { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Pending,
            },
            ConnectionFutureProj::Waiting { future } => future.as_mut().poll(cx),
        }
    }
}

/// A connection's spare tokio timer, see [`ConnectionTimer`].
type Spare = Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>;

/// hyper's timer for one connection. hyper asks for a header-read deadline for every
/// request on a connection; each deadline reuses the connection's one tokio timer. A
/// timer left set for an earlier deadline (the previous request's) is not moved on
/// every request: it wakes early once, and is then moved to the deadline it serves.
/// So a request registers no timer with the runtime, and touches none of its shared
/// state, where a fresh timer per request would.
#[derive(Debug, Default)]
struct ConnectionTimer {
    spare: Spare,
}

impl hyper::rt::Timer for ConnectionTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let sleep = lock(&self.spare).take();
        Box::pin(ReusedSleep {
            deadline: deadline.into(),
            sleep,
            spare: self.spare.clone(),
        })
    }
}

/// A deadline of [`ConnectionTimer`]: the connection's tokio timer while it lives,
/// given back when dropped (a second deadline at the same time gets its own timer).
struct ReusedSleep {
    deadline: tokio::time::Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    spare: Spare,
}

impl Future for ReusedSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // Never later than the deadline; earlier only costs one early wake.
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        while sleep.as_mut().poll(cx).is_ready() {
            if sleep.deadline() >= deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

impl hyper::rt::Sleep for ReusedSleep {}

impl Drop for ReusedSleep {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            *lock(&self.spare) = Some(sleep);
        }
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
/// drain timeout) and returns. Upgraded connections, and connections handed over to a
/// response ([`ConnectionHandoff`]), are no longer HTTP: their owner (the realtime hub)
/// closes them.
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
    // connection, so each connection waits for its own stop signal: a oneshot, whose
    // receiver is polled lock-free (a shared watch channel locks on every poll of
    // every connection).
    let stops: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>> = Arc::default();
    let mut next_id = 0u64;
    let mut connections = tokio::task::JoinSet::new();
    let mut http = http1::Builder::new();
    http.header_read_timeout(options.header_read_timeout);
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
                    let handoff = ConnectionHandoff::new();
                    let stream = HandoffStream::new(stream, handoff.clone());
                    let connection = http
                        .clone()
                        .timer(ConnectionTimer::default())
                        .serve_connection(
                            TokioIo::new(stream),
                            WithPeer { inner: service.clone(), peer, handoff },
                        )
                        .with_upgrades();
                    let (stop, stopping) = oneshot::channel();
                    let id = next_id;
                    next_id += 1;
                    lock(&stops).insert(id, stop);
                    let stops = stops.clone();
                    connections.spawn(async move {
                        tokio::pin!(connection);
                        let result = tokio::select! {
                            result = connection.as_mut() => result,
                            _ = stopping => {
                                connection.as_mut().graceful_shutdown();
                                connection.await
                            }
                        };
                        lock(&stops).remove(&id);
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
    for (_, stop) in lock(&stops).drain() {
        let _ = stop.send(());
    }
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

/// Resolves when the process gets SIGINT (Ctrl-C) or, on Unix, SIGTERM, logging which:
/// the `shutdown` future of [`serve`] for a server run from a terminal or by a service
/// manager. A signal that cannot be listened for is logged and never resolves.
///
/// ```no_run
/// # async fn run() {
/// upcoach_core::http::serve::shutdown_signal().await;
/// // ... stop accepting, drain, exit
/// # }
/// ```
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::service::Service as _;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Ready after `busy` polls of its readiness (a failure instead when `fails`);
    /// answers with how many calls its clones have had.
    #[derive(Clone)]
    struct Busy {
        busy: Arc<AtomicUsize>,
        fails: bool,
        calls: Arc<AtomicUsize>,
    }

    impl tower_service::Service<()> for Busy {
        type Response = usize;
        type Error = &'static str;
        type Future = std::future::Ready<Result<usize, &'static str>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), &'static str>> {
            if self.busy.load(Ordering::SeqCst) > 0 {
                self.busy.fetch_sub(1, Ordering::SeqCst);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(if self.fails { Err("down") } else { Ok(()) })
        }

        fn call(&mut self, (): ()) -> Self::Future {
            std::future::ready(Ok(self.calls.fetch_add(1, Ordering::SeqCst) + 1))
        }
    }

    fn busy(polls: usize, fails: bool) -> ConnectionService<Busy> {
        ConnectionService::new(Busy {
            busy: Arc::new(AtomicUsize::new(polls)),
            fails,
            calls: Arc::default(),
        })
    }

    #[tokio::test]
    async fn a_connection_service_calls_when_ready_and_waits_when_not() {
        let ready = busy(0, false);
        assert_eq!(ready.call(()).await, Ok(1));
        assert_eq!(
            ready.clone().call(()).await,
            Ok(2),
            "clones share the inner state"
        );
        let waiting = busy(3, false);
        assert!(matches!(waiting.call(()), ConnectionFuture::Waiting { .. }));
        assert_eq!(waiting.call(()).await, Ok(1), "called once ready");
        assert_eq!(busy(0, true).call(()).await, Err("down"));
        assert_eq!(busy(2, true).call(()).await, Err("down"));
    }
}
