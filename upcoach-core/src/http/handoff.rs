//! A connection handed to the response that asked for it, once its head is written: a
//! long-lived stream (Server-Sent Events) then writes to the socket itself, and the
//! HTTP server's per-connection state (hyper keeps two 8 KiB buffers and a task per
//! connection) is freed for as long as the stream lives.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

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
