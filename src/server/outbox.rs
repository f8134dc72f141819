//! A stream's data frames on their way to the socket, written with `writev` rather than
//! through tungstenite.
//!
//! tungstenite's sink copies every frame (header and payload) into its own out buffer,
//! then writes that buffer; a partial write moves the rest to the front of the buffer.
//! A stream's data frames are server-to-client (never masked, always one final frame),
//! so their header is two to ten bytes the [`Outbox`] builds itself, and the payload
//! (a sealed batch, or a control message's JSON) is written from where the engine left
//! it: one `writev` of `[header, payload, header, payload, ...]`, no copy, and a partial
//! write only moves an offset.
//!
//! Why this cannot interleave with tungstenite's own writes (pongs, pings, closes):
//! the connection task writes the outbox only after flushing tungstenite (its buffer is
//! then empty), and while the outbox holds bytes the task does nothing else with the
//! socket: the outbox is written to the end before the task reads again (a read may
//! flush a queued pong) or sends a ping or a close.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tickgate_proto::ws;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::session::sock::try_sendmsg;
use crate::engine::stall::WriteProgress;
use crate::engine::{DirectPort, Frame, Wrote};

/// Frames per `writev` (two slices each, well under the kernel's 1,024-slice limit).
const FRAMES_PER_WRITE: usize = 32;

/// One frame: its header, built here, and its payload.
#[derive(Debug)]
struct Out {
    head: [u8; 10],
    head_len: u8,
    payload: Bytes,
}

impl Out {
    fn new(opcode: u8, payload: Bytes) -> Out {
        let (head, n) = ws::server_header(opcode, payload.len());
        Out { head, head_len: n as u8, payload }
    }

    fn len(&self) -> usize {
        self.head_len as usize + self.payload.len()
    }
}

/// Data frames accepted for writing and not yet taken by the kernel, in order.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    frames: VecDeque<Out>,
    /// Bytes of the front frame (header first) the kernel already took.
    front_done: usize,
    /// Bytes held, counting the front frame's written part out.
    bytes: usize,
}

impl Outbox {
    /// Queues a binary frame.
    pub(crate) fn binary(&mut self, payload: Bytes) {
        self.push(Out::new(ws::BINARY, payload));
    }

    /// Queues a text frame.
    pub(crate) fn text(&mut self, payload: String) {
        self.push(Out::new(ws::TEXT, Bytes::from(payload)));
    }

    fn push(&mut self, f: Out) {
        self.bytes += f.len();
        self.frames.push_back(f);
    }

    /// Bytes not yet written.
    pub(crate) fn len(&self) -> usize {
        self.bytes
    }

    /// Nothing left to write.
    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Writes what it holds to `io`, `writev` by `writev`, until all of it went out
    /// (`Ready(Ok)`), the socket stops taking data (`Pending`: woken when it is writable
    /// again) or fails. A partial write keeps its place: nothing is written twice.
    pub(crate) fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        mut io: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        while !self.frames.is_empty() {
            let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
            let mut n = 0;
            for (i, f) in self.frames.iter().take(FRAMES_PER_WRITE).enumerate() {
                let head = &f.head[..f.head_len as usize];
                let skip = if i == 0 { self.front_done } else { 0 };
                if skip < head.len() {
                    slices[n] = IoSlice::new(&head[skip..]);
                    slices[n + 1] = IoSlice::new(&f.payload);
                    n += 2;
                } else {
                    slices[n] = IoSlice::new(&f.payload[skip - head.len()..]);
                    n += 1;
                }
            }
            let written = match io.as_mut().poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(w)) => w,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.advance(written);
        }
        Poll::Ready(Ok(()))
    }

    /// The kernel took `n` more bytes: drop the frames it finished.
    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let Some(front) = self.frames.front() else { break };
            let left = front.len() - self.front_done;
            if n < left {
                self.front_done += n;
                return;
            }
            n -= left;
            self.front_done = 0;
            self.frames.pop_front();
        }
    }

    /// Writes what it holds to a plain TCP socket without waiting: `Ok(true)` when all of
    /// it went out, `Ok(false)` when the socket stopped taking data first.
    fn try_send(&mut self, tcp: &TcpStream, progress: &WriteProgress) -> std::io::Result<bool> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        // Readiness as tokio knows it: `try_io` does not wait, and a socket it believes
        // full is left to the task, whose wait registers for the signal.
        let mut io = DirectIo(tcp);
        let before = self.len();
        let r = self.poll_write(Pin::new(&mut io), &mut cx);
        if self.len() < before {
            progress.mark();
        }
        match r {
            Poll::Ready(Ok(())) => Ok(true),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(false),
        }
    }

    /// Writes everything it holds (see [`Outbox::poll_write`]).
    #[cfg(test)]
    pub(crate) async fn write_all<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> std::io::Result<()> {
        std::future::poll_fn(|cx| self.poll_write(Pin::new(&mut *io), cx)).await
    }
}

/// A plain TCP socket written with `sendmsg` only while tokio believes it takes data.
struct DirectIo<'a>(&'a TcpStream);

impl AsyncWrite for DirectIo<'_> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match try_sendmsg(self.0, bufs) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Poll::Pending,
            r => Poll::Ready(r),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The shard's way onto a plain TCP stream's socket.
#[derive(Debug)]
pub(crate) struct TcpPort {
    /// The socket.
    pub(crate) tcp: Rc<TcpStream>,
    /// The outbox the connection task writes too. Both run on the shard's thread and
    /// never hold its borrow across an `.await`. The task waits on the socket only with
    /// bytes left in it (a write that is `Pending` has not finished), so an outbox that
    /// is not empty is also what says the task is mid-write.
    pub(crate) out: Rc<RefCell<Outbox>>,
    /// tungstenite may hold bytes of its own (`ws::Timed`): they go first, by the task.
    pub(crate) tungstenite_holds: Rc<Cell<bool>>,
    /// Marked when the kernel takes bytes, as the task's writes mark it.
    pub(crate) progress: WriteProgress,
}

impl DirectPort for TcpPort {
    fn free(&self) -> bool {
        !self.tungstenite_holds.get() && self.out.try_borrow().is_ok_and(|o| o.is_empty())
    }

    fn write(&self, frame: Frame) -> Wrote {
        let Ok(mut out) = self.out.try_borrow_mut() else { return Wrote::Rest };
        match frame {
            Frame::Binary(b) => out.binary(b),
            Frame::Text(t) => out.text(t),
            // Never handed over (`engine::direct`), but a close is the task's.
            Frame::Close { .. } => return Wrote::Rest,
        }
        match out.try_send(&self.tcp, &self.progress) {
            Ok(true) => Wrote::All,
            // The rest, or the failure, is the task's: its own write meets either.
            Ok(false) | Err(_) => Wrote::Rest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;

    /// A writer that takes at most `step` bytes per call and is `Pending` every other call,
    /// so frames are split at every possible offset, header bytes included.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            if self.calls.is_multiple_of(2) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let mut room = self.step;
            let mut took = 0;
            for b in bufs {
                let n = b.len().min(room);
                self.out.extend_from_slice(&b[..n]);
                room -= n;
                took += n;
                if room == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(took))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn payload(n: usize) -> Bytes {
        (0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
    }

    /// Sizes on both sides of each length encoding's edge (125/126, 65535/65536).
    const SIZES: [usize; 9] = [0, 1, 125, 126, 127, 65_535, 65_536, 70_000, 3];

    #[tokio::test]
    async fn frames_read_back_with_tungstenite_whatever_the_split() {
        for step in [1, 2, 3, 7, 64, 1 << 20] {
            let mut o = Outbox::default();
            for (i, &n) in SIZES.iter().enumerate() {
                if i % 3 == 1 {
                    o.text("é".repeat(n / 2));
                } else {
                    o.binary(payload(n));
                }
            }
            let total = o.len();
            let mut w = Trickle { out: Vec::new(), step, calls: 0 };
            o.write_all(&mut w).await.expect("writes");
            assert!(o.is_empty());
            assert_eq!(o.len(), 0);
            assert_eq!(w.out.len(), total, "step {step}");

            // A real WebSocket client reads the bytes back as the same messages.
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                std::io::Cursor::new(w.out),
                Role::Client,
                Some(tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()),
            )
            .await;
            let msgs: Vec<Message> = futures_util::StreamExt::collect::<Vec<_>>(ws)
                .await
                .into_iter()
                .take_while(|m| m.is_ok())
                .map(|m| m.expect("ok"))
                .collect();
            assert_eq!(msgs.len(), SIZES.len(), "step {step}");
            for (i, (&n, m)) in SIZES.iter().zip(&msgs).enumerate() {
                if i % 3 == 1 {
                    assert_eq!(m, &Message::text("é".repeat(n / 2)), "frame {i}");
                } else {
                    assert_eq!(m, &Message::Binary(payload(n)), "frame {i}");
                }
            }
        }
    }
}
