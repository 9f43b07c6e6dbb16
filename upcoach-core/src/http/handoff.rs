//! A connection handed to the response that asked for it, once its head is written: a
//! long-lived stream (Server-Sent Events) then writes to the socket itself, and the
//! HTTP server's per-connection state (hyper keeps two 8 KiB buffers and a task per
//! connection) is freed for as long as the stream lives.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

/// What a handed-over connection is: a byte stream both ways.
pub trait HandoffIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> HandoffIo for T {}

/// A connection handed over, with whatever the server held for it (its place under the
/// connection caps is given back when this is dropped).
pub type HandedOff = Box<dyn HandoffIo>;

/// The offer of a connection to one of its responses, put into each request's
/// extensions by a server that can hand connections over (the accept loop of
/// [`serve`](super::serve), feature `server`). A host whose server cannot leaves it out,
/// and a handler then streams through the response body as usual.
///
/// For a handler, [`ConnectionHandoff::respond`] takes the offer (once per connection)
/// and gives the response to answer with and the receiver of the connection. That
/// response's head says the body runs until the connection closes (HTTP/1.0, no length)
/// and its body ([`HandoffBody`]) ends at once, so the server writes the head, flushes
/// it and would close the connection; instead, it sends the connection to the receiver.
/// Add headers to the response, but keep its version, its `Connection: close` and its
/// body.
///
/// Only that response's end arms the hand-over: if it is not what the server wrote (a
/// layer answered something else), the receiver reads an error at once and the
/// connection stays the server's. So does it when the client leaves first. A handler
/// that stops waiting drops the receiver, and the server then closes the connection as
/// usual.
///
/// ```
/// use upcoach_core::http::ConnectionHandoff;
///
/// let offer = ConnectionHandoff::new();
/// let (response, _connection) = offer.respond().expect("the first ask");
/// assert_eq!(response.version(), http::Version::HTTP_10);
/// assert!(offer.respond().is_none(), "one response per connection takes it");
/// ```
#[derive(Clone, Default)]
pub struct ConnectionHandoff {
    slot: Arc<Mutex<Slot>>,
}

#[derive(Default)]
enum Slot {
    /// Nobody asked yet.
    #[default]
    Open,
    /// A response waits for the connection; its body has not ended yet.
    Waiting(oneshot::Sender<HandedOff>),
    /// The asking response's body ended: its head is what the server wrote.
    Armed(oneshot::Sender<HandedOff>),
    /// Taken: asked for (and handed over, or not) already.
    Taken,
}

impl fmt::Debug for ConnectionHandoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &*lock(&self.slot) {
            Slot::Open => "open",
            Slot::Waiting(_) => "waiting",
            Slot::Armed(_) => "armed",
            Slot::Taken => "taken",
        };
        f.debug_struct("ConnectionHandoff")
            .field("state", &state)
            .finish()
    }
}

impl ConnectionHandoff {
    /// A fresh offer, for one connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the offer: the response to answer with (status 200, HTTP/1.0, a
    /// [`HandoffBody`]), and the receiver that gets the connection once the server has
    /// written and flushed that response's head. `None` when a request of this
    /// connection took it already.
    pub fn respond(&self) -> Option<(http::Response<HandoffBody>, oneshot::Receiver<HandedOff>)> {
        let mut slot = lock(&self.slot);
        if !matches!(*slot, Slot::Open) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        *slot = Slot::Waiting(tx);
        let mut response = http::Response::new(HandoffBody {
            handoff: Some(self.clone()),
        });
        *response.version_mut() = http::Version::HTTP_10;
        // The server closes after this response whatever else its head says, so an
        // armed hand-over never waits past it.
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        Some((response, rx))
    }

    /// For the server, when the connection would close: the sender of the response
    /// whose head it just wrote, if that response asked and its receiver still waits.
    pub(crate) fn armed(&self) -> Option<oneshot::Sender<HandedOff>> {
        let mut slot = lock(&self.slot);
        match std::mem::replace(&mut *slot, Slot::Taken) {
            Slot::Armed(tx) => (!tx.is_closed()).then_some(tx),
            // Not asked for, or its response not written yet: left as it is.
            other => {
                *slot = other;
                None
            }
        }
    }

    /// The asking response's body ended (`armed`) or was dropped before (not).
    fn settle(&self, armed: bool) {
        let mut slot = lock(&self.slot);
        match std::mem::replace(&mut *slot, Slot::Taken) {
            Slot::Waiting(tx) if armed => *slot = Slot::Armed(tx),
            // Dropped unwritten: the sender goes, and the asker hears it.
            Slot::Waiting(_) => {}
            other => *slot = other,
        }
    }
}

/// A connection's stream, handed to the response that asked for it
/// ([`ConnectionHandoff`]) where hyper would shut it down: hyper has then written and
/// flushed that response's head, and its body (delimited by the close) is the asker's
/// to write. Read and written through as is until then.
///
/// [`serve`](super::serve) gives hyper a [`ServedStream`]. A protocol that takes the
/// connection over by an upgrade (hyper's `Upgraded::downcast`) gets its stream back
/// with [`HandoffStream::into_inner`].
pub struct HandoffStream<S> {
    inner: Option<S>,
    handoff: ConnectionHandoff,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HandoffStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_read(cx, buf),
            // Handed over: nothing more for hyper.
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin + Send + tokio::io::AsyncRead + 'static> tokio::io::AsyncWrite
    for HandoffStream<S>
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write(cx, buf),
            None => Poll::Ready(Err(handed_over())),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(handed_over())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.inner.is_some()
            && let Some(asker) = self.handoff.armed()
            && let Some(inner) = self.inner.take()
        {
            // An asker that stopped waiting in the meantime gets nothing: the stream
            // comes back in the error and is dropped, which closes it.
            let _ = asker.send(Box::new(inner));
            return Poll::Ready(Ok(()));
        }
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

fn handed_over() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the connection was handed over",
    )
}

impl<S> HandoffStream<S> {
    #[cfg(feature = "server")]
    pub(crate) fn new(stream: S, handoff: ConnectionHandoff) -> Self {
        Self {
            inner: Some(stream),
            handoff,
        }
    }

    /// The stream, unless it was handed over already.
    pub fn into_inner(self) -> Option<S> {
        self.inner
    }
}

impl<S> fmt::Debug for HandoffStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandoffStream")
            .field("handed_over", &self.inner.is_none())
            .finish_non_exhaustive()
    }
}

/// What [`serve`](super::serve) gives hyper for each connection: the accepted socket,
/// with its place under the connection caps, offered to the response that asks for it.
/// After an upgrade, `hyper::upgrade::Upgraded::downcast::<hyper_util::rt::TokioIo<ServedStream>>()`
/// gives it back.
pub type ServedStream = HandoffStream<super::HeldStream<tokio::net::TcpStream>>;

/// Locks `mutex`, through a poisoning: what it guards stays consistent at every step.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The body of the response that takes its connection over
/// ([`ConnectionHandoff::respond`]): no length (so HTTP/1.0 delimits it by the
/// connection's close), and no bytes through the server: it ends at once, which arms the
/// hand-over, and the handler writes the rest to the connection itself. Dropped before
/// it ends (its response was not the one written), it tells the receiver so.
#[derive(Debug)]
pub struct HandoffBody {
    handoff: Option<ConnectionHandoff>,
}

impl http_body::Body for HandoffBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Some(handoff) = self.handoff.take() {
            handoff.settle(true);
        }
        std::task::Poll::Ready(None)
    }

    // Not `is_end_stream`: a server would then write `content-length: 0`.
}

impl Drop for HandoffBody {
    fn drop(&mut self) {
        if let Some(handoff) = self.handoff.take() {
            handoff.settle(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body::Body as _;

    /// Polls `body` to its end, as a server writing it does.
    fn end(body: &mut HandoffBody) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(matches!(
            std::pin::Pin::new(body).poll_frame(&mut cx),
            std::task::Poll::Ready(None)
        ));
    }

    #[test]
    fn only_a_written_response_whose_asker_waits_is_armed() {
        let offer = ConnectionHandoff::new();
        assert!(offer.armed().is_none(), "nobody asked");
        let (mut response, rx) = offer.respond().expect("the first ask");
        assert!(offer.armed().is_none(), "its body has not ended yet");
        end(response.body_mut());
        drop(rx);
        assert!(
            offer.armed().is_none(),
            "a response that stopped waiting is not handed anything"
        );
        assert!(offer.respond().is_none(), "taken for good");
    }

    #[test]
    fn a_response_dropped_unwritten_tells_its_asker_at_once() {
        let offer = ConnectionHandoff::new();
        let (response, mut rx) = offer.respond().expect("the first ask");
        drop(response);
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(offer.armed().is_none());
        assert!(offer.respond().is_none(), "taken for good");
    }

    #[tokio::test]
    async fn the_connection_reaches_the_asker() {
        let offer = ConnectionHandoff::new();
        let (mut response, mut rx) = offer.respond().expect("the first ask");
        end(response.body_mut());
        let tx = offer.armed().expect("armed");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        assert!(tx.send(Box::new(stream)).is_ok());
        assert!(rx.try_recv().is_ok());
        assert!(offer.armed().is_none(), "handed over once");
    }
}
