//! A cap on open connections, per process and per client address.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::protect::TrustedProxies;
use crate::limit::ip_subject;

/// How many connections a server holds open at once: at most `max_total` in the
/// process and `max_per_address` from one client address (IPv6 grouped by /64). A
/// server asks for a [`ConnectionPermit`] when it accepts a connection and keeps it
/// until the connection ends (upgraded WebSockets included).
///
/// Trusted proxies (a load balancer in front) count against the process total only:
/// every client behind them shares their address.
///
/// ```
/// use upcoach_core::http::{ConnectionLimits, ConnectionRefused};
///
/// let limits = ConnectionLimits::new(3, 2);
/// let ip = "203.0.113.7".parse().unwrap();
/// let first = limits.try_acquire(ip).unwrap();
/// let _second = limits.try_acquire(ip).unwrap();
/// assert_eq!(limits.try_acquire(ip).unwrap_err(), ConnectionRefused::Address);
/// let _other = limits.try_acquire("203.0.113.8".parse().unwrap()).unwrap();
/// assert_eq!(limits.try_acquire("203.0.113.9".parse().unwrap()).unwrap_err(), ConnectionRefused::Process);
/// drop(first);
/// assert!(limits.try_acquire(ip).is_ok(), "a closed connection gives its place back");
/// ```
#[derive(Clone)]
pub struct ConnectionLimits {
    inner: Arc<Inner>,
}

struct Inner {
    max_total: usize,
    max_per_address: usize,
    proxies: TrustedProxies,
    open: AtomicUsize,
    per_address: Mutex<HashMap<String, usize>>,
    refused_process: AtomicU64,
    refused_address: AtomicU64,
}

impl fmt::Debug for ConnectionLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionLimits")
            .field("max_total", &self.inner.max_total)
            .field("max_per_address", &self.inner.max_per_address)
            .field("open", &self.open())
            .finish()
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionRefused {
    /// The process holds its most connections.
    #[error("the server holds its most connections")]
    Process,
    /// The client's address holds its most connections.
    #[error("this address holds its most connections")]
    Address,
}

impl ConnectionRefused {
    /// A complete HTTP/1.1 answer to write on the refused socket before closing it:
    /// 503 (process full) or 429 (address full), `Retry-After: 1`, `Connection: close`,
    /// and the usual JSON error body.
    pub fn http_response(self) -> &'static [u8] {
        match self {
            ConnectionRefused::Process => concat!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n",
                "retry-after: 1\r\nconnection: close\r\ncontent-length: 87\r\n\r\n",
                r#"{"error":{"code":"too_many_connections","message":"the server is full; retry shortly"}}"#
            )
            .as_bytes(),
            ConnectionRefused::Address => concat!(
                "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n",
                "retry-after: 1\r\nconnection: close\r\ncontent-length: 106\r\n\r\n",
                r#"{"error":{"code":"too_many_connections_from_address","message":"this address holds its most connections"}}"#
            )
            .as_bytes(),
        }
    }
}

/// One admitted connection; gives its place back when dropped.
pub struct ConnectionPermit {
    inner: Arc<Inner>,
    address: Option<String>,
}

impl fmt::Debug for ConnectionPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionPermit")
            .field("address", &self.address)
            .finish()
    }
}

impl ConnectionLimits {
    /// At most `max_total` connections, `max_per_address` from one address (0 turns
    /// the per-address cap off).
    pub fn new(max_total: usize, max_per_address: usize) -> Self {
        Self::with_proxies(max_total, max_per_address, TrustedProxies::none())
    }

    /// [`new`](Self::new), with `proxies` exempt from the per-address cap.
    pub fn with_proxies(max_total: usize, max_per_address: usize, proxies: TrustedProxies) -> Self {
        Self {
            inner: Arc::new(Inner {
                max_total,
                max_per_address,
                proxies,
                open: AtomicUsize::new(0),
                per_address: Mutex::new(HashMap::new()),
                refused_process: AtomicU64::new(0),
                refused_address: AtomicU64::new(0),
            }),
        }
    }

    /// Admits a connection from `peer`, or says why not.
    pub fn try_acquire(&self, peer: IpAddr) -> Result<ConnectionPermit, ConnectionRefused> {
        let inner = &self.inner;
        if inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < inner.max_total).then_some(n + 1)
            })
            .is_err()
        {
            inner.refused_process.fetch_add(1, Ordering::Relaxed);
            return Err(ConnectionRefused::Process);
        }
        let mut permit = ConnectionPermit {
            inner: inner.clone(),
            address: None,
        };
        if inner.max_per_address == 0 || inner.proxies.contains(peer) {
            return Ok(permit);
        }
        let key = ip_subject(peer);
        let mut per_address = inner.lock();
        let count = per_address.entry(key.clone()).or_insert(0);
        if *count >= inner.max_per_address {
            drop(per_address);
            inner.refused_address.fetch_add(1, Ordering::Relaxed);
            return Err(ConnectionRefused::Address);
        }
        *count += 1;
        drop(per_address);
        permit.address = Some(key);
        Ok(permit)
    }

    /// Admits a freshly accepted `stream` from `peer`: the stream with its place, or,
    /// over a cap, `None` after writing the canned refusal on it (a fresh socket's send
    /// buffer takes it whole, so nothing waits) and closing it. The accept loop of any
    /// host calls this (`upcoach_core::http::serve` does; an axum host's `Listener`).
    pub fn admit(
        &self,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
    ) -> Option<HeldStream<tokio::net::TcpStream>> {
        match self.try_acquire(peer.ip()) {
            Ok(permit) => Some(HeldStream {
                stream,
                _permit: Some(permit),
            }),
            Err(refused) => {
                let _ = stream.try_write(refused.http_response());
                tracing::debug!(%peer, %refused, "connection refused");
                None
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Connections refused so far: (process full, address full).
    pub fn refused(&self) -> (u64, u64) {
        (
            self.inner.refused_process.load(Ordering::Relaxed),
            self.inner.refused_address.load(Ordering::Relaxed),
        )
    }
}

pin_project_lite::pin_project! {
    /// A connection's stream with its place among the open connections
    /// ([`ConnectionLimits::admit`]): the place is given back when the stream closes,
    /// also after an upgrade hands the stream to a WebSocket. Reads and writes go
    /// straight through.
    pub struct HeldStream<S> {
        #[pin]
        stream: S,
        _permit: Option<ConnectionPermit>,
    }
}

impl<S: AsyncRead> AsyncRead for HeldStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().stream.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for HeldStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
}

impl<S> HeldStream<S> {
    /// `stream` holding no place (no cap configured).
    pub fn unlimited(stream: S) -> Self {
        Self {
            stream,
            _permit: None,
        }
    }

    /// The same place, held by `f(stream)`: a protocol that takes the stream over
    /// (shares the socket, say) keeps the connection counted until it closes.
    pub fn map<T>(self, f: impl FnOnce(S) -> T) -> HeldStream<T> {
        HeldStream {
            stream: f(self.stream),
            _permit: self._permit,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for HeldStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldStream")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.per_address.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some(key) = self.address.take() {
            let mut per_address = self.inner.lock();
            if let Some(count) = per_address.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    per_address.remove(&key);
                }
            }
        }
        self.inner.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canned_answers_are_complete_http() {
        for refusal in [ConnectionRefused::Process, ConnectionRefused::Address] {
            let text = std::str::from_utf8(refusal.http_response()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(length, body.len(), "{refusal:?}");
            let _: serde_json::Value = serde_json::from_str(body).unwrap();
        }
    }

    #[test]
    fn ipv6_addresses_share_their_64_and_proxies_are_exempt() {
        let proxies = TrustedProxies::parse("10.0.0.1").unwrap();
        let limits = ConnectionLimits::with_proxies(100, 1, proxies);
        let _a = limits
            .try_acquire("2001:db8:0:1::1".parse().unwrap())
            .unwrap();
        assert_eq!(
            limits
                .try_acquire("2001:db8:0:1::2".parse().unwrap())
                .unwrap_err(),
            ConnectionRefused::Address
        );
        let _b = limits
            .try_acquire("2001:db8:0:2::1".parse().unwrap())
            .unwrap();
        let proxy = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..5).map(|_| limits.try_acquire(proxy).unwrap()).collect();
        assert_eq!(limits.open(), 7);
        drop(held);
        assert_eq!(limits.open(), 2);
        assert!(limits.inner.lock().len() == 2);
    }
}
