//! The WebSocket loop skeleton that stream and publisher connections both run.
//!
//! Holds [`accept`] (the upgraded socket, with a role's size limits, its writes timed by
//! [`Timed`]), [`drive`] (the
//! loop: the role's own events first, then the peer's frames, then the heartbeat), the
//! [`Role`] trait a kind of connection plugs into it, [`Step`] and [`Ended`] (what a
//! handler asks for, how the connection ended), [`CloseStyle`] and [`close`] (the close
//! handshake), and [`read_error_close`] (the close a read error calls for, spec §11).
//!
//! What the skeleton does for every role: pongs feed the [`Heartbeat`], a ping goes out
//! every `server.heartbeat_ms` (through [`Role::guard`], so a stream's kill can abandon
//! it), a heartbeat timeout is counted in `tickgate_heartbeat_timeouts_total`, a close
//! from the peer is answered (tungstenite queued the reply; it is flushed) and ends the
//! loop, a `Step::Close` sends the close frame in the role's [`CloseStyle`]. What a role
//! adds: its events (a stream: engine wake-ups, held writes, a refresh being validated;
//! a publisher: the end of its edge session), its text and binary messages, and what a
//! heartbeat timeout means for it (a stream queues the close behind its data through the
//! engine; a publisher closes at once).
//!
//! The loop is generic over the role (monomorphised: no box, no dynamic call, no lock
//! per frame); a stream's frames are written inside its event handler.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role as WsRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::sock::Sock;
use crate::engine::stall::WriteProgress;
use crate::metrics::Metrics;
use crate::server::heartbeat::{Beat, Heartbeat};
use tickgate_proto::close::Reason;

/// An upgraded server-side WebSocket, over a socket whose accepted writes are timed.
pub(crate) type Ws = WebSocketStream<Timed<Sock>>;

/// A socket (any async I/O) that marks a [`WriteProgress`] each time the kernel accepts
/// bytes: how the shard tells a socket that stopped taking data from a writer that is
/// merely waiting on a large write a reader drains piece by piece. One clock read per
/// accepted write.
///
/// It also keeps two facts the connection loop uses to leave the WebSocket layer alone
/// when it has nothing to do, which on a stream that writes a frame per tick is most of
/// the time:
/// - whether a read can make progress ([`Timed::read_may_progress`]): after a read the
///   socket had no data for, not until the socket signals readable again. The loop then
///   skips tungstenite's read attempt (its wakers, buffers and the socket's readiness
///   check) on every engine wake-up;
/// - whether tungstenite may still hold bytes of its own writes
///   ([`Timed::tungstenite_may_hold`]: a pong, ping or close it could not finish), which
///   the stream's `writev` outbox must flush first. tungstenite writes with plain
///   `write`s and the outbox only with `writev`, which is how the two are told apart.
#[derive(Debug)]
pub(crate) struct Timed<T> {
    inner: T,
    progress: WriteProgress,
    read: Arc<ReadWake>,
    /// `read` as a waker, built once (a tokio socket keeps a waker it already holds).
    read_waker: Waker,
    /// The last read found no data: only a wake-up through `read_waker` changes that.
    read_parked: bool,
    /// A plain `write` returned `Pending` and no flush completed since (shared with the
    /// shard's direct port, which must then leave the socket to the task).
    plain_pending: Rc<Cell<bool>>,
}

/// The waker a [`Timed`] socket's reads register: notes that the socket became readable,
/// then wakes the connection task through the waker of its last read.
#[derive(Debug, Default)]
struct ReadWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ReadWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Release: the task that sees `woken` polls the read after this store.
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<T> Timed<T> {
    fn new(inner: T) -> Timed<T> {
        let read = Arc::new(ReadWake::default());
        let read_waker = Waker::from(read.clone());
        Timed {
            inner,
            progress: WriteProgress::new(),
            read,
            read_waker,
            read_parked: false,
            plain_pending: Rc::new(Cell::new(false)),
        }
    }

    /// The socket's write progress, for the engine (`ConnGuard::track_writes`).
    pub(crate) fn progress(&self) -> &WriteProgress {
        &self.progress
    }

    /// False only while the last read found no data and the socket has not signalled
    /// readable since: reading now would only return `Pending` again.
    pub(crate) fn read_may_progress(&self) -> bool {
        !self.read_parked || self.read.woken.load(Ordering::Acquire)
    }

    /// Whether tungstenite may hold unwritten bytes (see the type's doc).
    pub(crate) fn tungstenite_may_hold(&self) -> bool {
        self.plain_pending.get()
    }

    /// The same fact, for the shard's direct port.
    pub(crate) fn tungstenite_holds(&self) -> Rc<Cell<bool>> {
        self.plain_pending.clone()
    }

    /// The socket under the wrapper.
    pub(crate) fn inner(&self) -> &T {
        &self.inner
    }

    /// Passes a write's result on, marking the progress when the kernel took bytes.
    fn accepted(&self, r: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.progress.mark();
            }
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Timed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        this.read.task.register(cx.waker());
        // Cleared before the read: a readiness signal during or after it sets it again.
        this.read.woken.store(false, Ordering::Relaxed);
        let r = Pin::new(&mut this.inner).poll_read(&mut Context::from_waker(&this.read_waker), buf);
        this.read_parked = r.is_pending();
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Timed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if r.is_pending() {
            self.plain_pending.set(true);
        }
        self.accepted(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.accepted(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        // tungstenite flushes the socket only once its own buffer is written out.
        if r.is_ready() {
            self.plain_pending.set(false);
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The peer's next message, read only when a read can make progress (see [`Timed`]).
/// While it cannot, the socket's readable signal wakes the task through the waker of the
/// last real read, which is this same task's.
fn next_message(ws: &mut Ws) -> impl Future<Output = Option<Result<Message, WsError>>> + '_ {
    std::future::poll_fn(move |cx| {
        if !ws.get_ref().read_may_progress() {
            return Poll::Pending;
        }
        ws.poll_next_unpin(cx)
    })
}

/// The end of a connection whose close frame could not be written (counted as 1006).
pub(crate) const UNDELIVERED: &str = "close frame not delivered";

/// Why the connection ended, for the log and (streams) `tickgate_closes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ended {
    /// The close code the peer was sent or sent (1006: none).
    pub(crate) code: u16,
    /// Why, for the log.
    pub(crate) reason: &'static str,
}

/// What a handler asks of the loop.
#[derive(Debug)]
pub(crate) enum Step {
    /// Keep going.
    Continue,
    /// Send this close frame (in the role's [`CloseStyle`]) and end.
    Close(Reason),
    /// The connection is over; the socket needs nothing more.
    End(Ended),
}

/// How a role closes: how long its close frame may take to reach the peer (it may sit
/// behind a full socket), and how long it then waits for the peer's reply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CloseStyle {
    /// Bound on writing and flushing the close frame.
    pub(crate) timeout: Duration,
    /// Bound on waiting for the peer's close reply (zero: do not wait).
    pub(crate) linger: Duration,
}

/// One kind of connection, plugged into [`drive`].
pub(crate) trait Role {
    /// The role's own event, produced by [`Role::event`].
    type Event;

    /// How this role's close handshake goes.
    const CLOSE: CloseStyle;

    /// Waits for the role's next event. Polled first on every turn of the loop, so it
    /// must be cancel-safe and must not borrow the socket.
    async fn event(&mut self) -> Self::Event;

    /// Handles an event from [`Role::event`].
    async fn on_event(&mut self, ws: &mut Ws, ev: Self::Event) -> Step;

    /// Handles a text or binary message from the peer.
    async fn on_message(&mut self, ws: &mut Ws, msg: Message) -> Step;

    /// No pong for two heartbeat intervals (already counted).
    fn on_heartbeat_timeout(&mut self) -> Step;

    /// The peer sent a close frame with this code (1005: none); its reply is flushed.
    fn closed_by_peer(&self, code: u16) -> Ended;

    /// The socket went away without a close frame.
    fn gone(&self) -> Ended;

    /// A read or ping-write error: by default the close spec §11 asks for.
    fn socket_error(&self, e: WsError) -> Step {
        match read_error_close(&e) {
            Some(why) => Step::Close(why),
            None => Step::End(Ended {
                code: 1006,
                reason: match e {
                    WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => "peer reset",
                    _ => "socket error",
                },
            }),
        }
    }

    /// Runs a socket write the role may need to abandon (`Err(None)`: abandoned). By
    /// default it just runs it.
    async fn guard<F>(&self, op: F) -> Result<(), Option<WsError>>
    where
        F: Future<Output = Result<(), WsError>>,
    {
        op.await.map_err(Some)
    }
}

/// Waits for the upgrade and wraps it as a server-side WebSocket with `config`. `None`:
/// the upgrade failed (the client went away).
pub(crate) async fn accept(on_upgrade: OnUpgrade, config: WebSocketConfig) -> Option<Ws> {
    match on_upgrade.await {
        Ok(u) => {
            let io = Timed::new(Sock::from_upgrade(u));
            Some(WebSocketStream::from_raw_socket(io, WsRole::Server, Some(config)).await)
        }
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            None
        }
    }
}

/// Runs the loop to the connection's end.
pub(crate) async fn drive<R: Role>(ws: &mut Ws, role: &mut R, heartbeat: &mut Heartbeat, metrics: &Metrics) -> Ended {
    loop {
        let step = tokio::select! {
            // The role's events first: a stream's engine wake-ups carry its data, and
            // they must not wait behind a peer that floods control frames.
            biased;
            ev = role.event() => role.on_event(ws, ev).await,
            msg = next_message(ws) => match msg {
                None => Step::End(role.gone()),
                Some(Err(e)) => role.socket_error(e),
                Some(Ok(Message::Close(frame))) => {
                    // tungstenite queued the close reply; flush it and stop.
                    let _ = tokio::time::timeout(R::CLOSE.timeout, ws.flush()).await;
                    Step::End(role.closed_by_peer(frame.map(|f| u16::from(f.code)).unwrap_or(1005)))
                }
                Some(Ok(Message::Pong(_))) => {
                    heartbeat.pong();
                    Step::Continue
                }
                // tungstenite queued the pong: send it now rather than with the next read
                // (which may be long in coming: reads wait for the socket).
                Some(Ok(Message::Ping(_))) => match role.guard(ws.flush()).await {
                    Err(Some(e)) => role.socket_error(e),
                    Ok(()) | Err(None) => Step::Continue,
                },
                Some(Ok(Message::Frame(_))) => Step::Continue,
                Some(Ok(m)) => role.on_message(ws, m).await,
            },
            beat = heartbeat.tick() => match beat {
                Beat::TimedOut => {
                    metrics.heartbeat_timeouts.inc();
                    role.on_heartbeat_timeout()
                }
                Beat::Ping => match role.guard(ws.send(Message::Ping(Vec::new().into()))).await {
                    Err(Some(e)) => role.socket_error(e),
                    Ok(()) | Err(None) => Step::Continue,
                },
            },
        };
        match step {
            Step::Continue => {}
            Step::End(e) => return e,
            Step::Close(why) => {
                let (code, reason) = (why.code(), why.reason());
                let delivered = close(ws, code, reason, R::CLOSE).await;
                return if delivered { Ended { code, reason } } else { Ended { code: 1006, reason: UNDELIVERED } };
            }
        }
    }
}

/// Sends a close frame (behind whatever is already buffered) and, when `style.linger` is
/// not zero, waits briefly for the peer's reply, so the TCP close does not reset data the
/// peer has yet to read. Returns whether the close frame was written and flushed
/// (`false`: the peer was not taking data, or the socket failed; the connection is just
/// dropped).
pub(crate) async fn close(ws: &mut Ws, code: u16, reason: &str, style: CloseStyle) -> bool {
    // A close reason is at most 123 bytes (RFC 6455 §5.5: control frames carry 125).
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame { code: CloseCode::from(code), reason: reason[..end].to_owned().into() };
    if !matches!(tokio::time::timeout(style.timeout, ws.close(Some(frame))).await, Ok(Ok(()))) {
        return false;
    }
    if !style.linger.is_zero() {
        let _ = tokio::time::timeout(style.linger, async {
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
        })
        .await;
    }
    true
}

/// The close a read error calls for (spec §11); `None` when the socket is gone.
pub(crate) fn read_error_close(e: &WsError) -> Option<Reason> {
    Some(match e {
        // RFC 6455 §5.2: the most significant bit of a 64-bit length must be 0. tungstenite
        // reads such a length as a (huge) size, so it is told apart here from a frame that
        // is merely too big.
        WsError::Capacity(CapacityError::MessageTooLong { size, .. }) if (*size as u64) >> 63 == 1 => {
            Reason::LengthHighBit
        }
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => Reason::MessageTooBig,
        WsError::Capacity(_) => Reason::FrameTooBig,
        WsError::Utf8(_) => Reason::InvalidUtf8,
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => return None,
        WsError::Protocol(_) => Reason::ProtocolError,
        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => return None,
        _ => Reason::ProtocolError,
    })
}
