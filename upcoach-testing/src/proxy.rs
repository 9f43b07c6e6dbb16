//! [`FaultProxy`]: a loopback TCP proxy whose link can be cut and restored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A TCP proxy on `127.0.0.1:<random port>` in front of a real service.
///
/// - [`cut`](Self::cut): every open connection is closed at once and new ones are
///   accepted and closed straight away, as when the service's host goes down.
/// - [`restore`](Self::restore): new connections are forwarded again.
/// - [`stall`](Self::stall): every open connection goes silent but stays open, as when
///   the service's host vanishes without closing anything (a half-open connection); new
///   connections are forwarded as usual. Only a liveness check notices this one.
///
/// The real service is never touched. The proxy stops when dropped.
///
/// ```no_run
/// # async fn demo() {
/// use upcoach_testing::FaultProxy;
///
/// let proxy = FaultProxy::start("127.0.0.1:6379".parse().unwrap()).await;
/// let url = format!("redis://{}", proxy.addr());
/// // ... connect a client to `url` ...
/// proxy.cut();
/// // ... the client sees the outage ...
/// proxy.restore();
/// # }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    cut: AtomicBool,
    /// Bumped on every cut; each link closes when it changes.
    generation: watch::Sender<u64>,
    /// Bumped on every stall; each open link stops forwarding when it changes.
    stalls: watch::Sender<u64>,
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl FaultProxy {
    /// Starts a proxy to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy on loopback");
        let addr = listener.local_addr().expect("proxy address");
        let (generation, _) = watch::channel(0);
        let (stalls, _) = watch::channel(0);
        let state = Arc::new(State {
            cut: AtomicBool::new(false),
            generation,
            stalls,
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, upstream, state.clone()));
        Self {
            addr,
            upstream,
            state,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The real service.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Closes every open link and refuses new ones until [`restore`](Self::restore). No
    /// byte read after this returns is forwarded.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.generation.send_modify(|g| *g += 1);
    }

    /// Silences every open link: nothing read after this returns crosses it either way,
    /// yet both sockets stay open (until [`cut`](Self::cut) or drop). New connections
    /// are forwarded.
    pub fn stall(&self) {
        self.state.stalls.send_modify(|g| *g += 1);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.state.cut.load(Ordering::SeqCst)
    }

    /// Connections forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Connections refused while cut so far.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors or a transient error: wait instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        // Subscribe before looking at the flag, so a cut between the two still closes
        // this link.
        let mut generation = state.generation.subscribe();
        generation.mark_unchanged();
        let stalls = state.stalls.subscribe();
        if state.cut.load(Ordering::SeqCst) {
            state.refused.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        }
        state.accepted.fetch_add(1, Ordering::Relaxed);
        // What this link was opened under: it forwards only while both still hold, so
        // no byte read after `cut` or `stall` returns crosses it.
        let opened = (*generation.borrow(), *stalls.borrow());
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let live =
                || *state.generation.borrow() == opened.0 && *state.stalls.borrow() == opened.1;
            tokio::select! {
                _ = pump(client_read, server_write, &live) => {}
                _ = pump(server_read, client_write, &live) => {}
                // A stalled link's pumps hold both sockets and move nothing (half-open)
                // until this: a cut, or the proxy dropped.
                _ = generation.changed() => {}
            }
            // Both sockets close here: the client sees its connection drop.
        });
    }
}

/// Copies `from` to `to` while `live()` holds; past that it reads on and forwards
/// nothing, until the link's task ends it.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    live: &impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) if live() => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Ok(_) => std::future::pending::<()>().await,
        }
    }
}
