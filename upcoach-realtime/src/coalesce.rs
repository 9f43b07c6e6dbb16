//! One socket write per batch of WebSocket frames.
//!
//! tungstenite runs with a write buffer of 0 (so an idle connection keeps no buffer),
//! which makes it write each frame to the socket as soon as it is framed: a batch of
//! 256 queued events would cost 256 `sendto` calls. This adapter gathers what is
//! written until the next flush (up to [`LIMIT`]) and writes it at once; its buffer is
//! freed at every flush, so idle memory stays the same.
//!
//! It is also where the connection's task takes its socket back from the fan-out (see
//! [`crate::direct`]): whatever the task writes, tungstenite's own replies included,
//! passes here, and the first write after the gate was opened closes it and puts what
//! the fan-out left unwritten in front.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::hub::ConnShared;

/// The most gathered before a write is forced.
pub(crate) const LIMIT: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) struct Coalesce<S> {
    io: S,
    buf: Vec<u8>,
    written: usize,
    /// The connection's gate, when the fan-out may share its socket.
    shared: Option<Arc<ConnShared>>,
    /// Whether the gate is closed for sure (this side closed it, or never opened it).
    held: bool,
    /// Written to since the last completed flush: something may still wait, here or in
    /// tungstenite's own buffer.
    dirty: bool,
}

impl<S> Coalesce<S> {
    /// `shared`: the connection whose gate guards the socket, if the fan-out shares it.
    pub(crate) fn new(io: S, shared: Option<Arc<ConnShared>>) -> Self {
        Self {
            io,
            buf: Vec::new(),
            written: 0,
            shared,
            held: true,
            dirty: false,
        }
    }

    /// Takes the socket back from the fan-out (closes the gate), with what it left
    /// unwritten first. Called before every write, and when the task takes deliveries
    /// from its queue (one may be the wake-up for that rest). A session that moves a
    /// reader closes the gate itself (`Gate::shut`), leaving the rest for here.
    pub(crate) fn hold(&mut self) {
        if self.held {
            return;
        }
        self.held = true;
        if let Some(shared) = &self.shared {
            let rest = shared.gate.close();
            if !rest.is_empty() {
                // The gate opens only with nothing buffered here: the rest goes first.
                self.buf.extend_from_slice(&rest);
                self.dirty = true;
            }
        }
    }

    /// Whether something written is not out yet.
    pub(crate) fn pending(&self) -> bool {
        self.dirty || !self.buf.is_empty()
    }

    /// Lends the socket to the fan-out (opens the gate) if everything written is out and
    /// `idle` (nothing queued), which is checked under the gate's lock.
    pub(crate) fn release(&mut self, idle: impl FnOnce() -> bool) {
        if self.pending() {
            return;
        }
        if let Some(shared) = &self.shared
            && shared.gate.open_if(idle)
        {
            self.held = false;
        }
    }
}

impl<S> Drop for Coalesce<S> {
    fn drop(&mut self) {
        // Nothing more goes to this socket from the fan-out, and it lets go of it.
        if let Some(shared) = &self.shared {
            shared.gate.detach();
        }
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes out everything gathered, then frees the buffer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.hold();
        self.dirty = true;
        if self.buf.len() + data.len() > LIMIT {
            ready!(self.poll_drain(cx))?;
        }
        if data.len() >= LIMIT {
            return Pin::new(&mut self.io).poll_write(cx, data);
        }
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.dirty = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.hold();
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts the writes that reach the inner stream.
    #[derive(Debug, Default)]
    struct Counting {
        writes: usize,
        data: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.data.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_batch_is_one_write_and_the_buffer_is_freed_at_flush() {
        let mut out = Coalesce::new(Counting::default(), None);
        for i in 0..256u32 {
            out.write_all(&i.to_be_bytes()).await.unwrap();
        }
        assert_eq!(out.io.writes, 0, "nothing written before the flush");
        out.flush().await.unwrap();
        assert_eq!(out.io.writes, 1);
        assert_eq!(out.io.data.len(), 1024);
        assert_eq!(out.buf.capacity(), 0, "no memory kept while idle");
        let big = vec![7u8; LIMIT + 10];
        out.write_all(&big).await.unwrap();
        out.flush().await.unwrap();
        assert_eq!(
            &out.io.data[1024..],
            &big[..],
            "large writes pass through, in order"
        );
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut read_side = Coalesce::new(a, None);
        b.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        read_side.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
