//! The socket a WebSocket runs over once the HTTP upgrade is done.
//!
//! hyper hands an upgraded connection back as [`Upgraded`]: the connection behind a
//! boxed trait object, with the bytes hyper read past the request in front of it. For a
//! plain TCP connection [`Sock::from_upgrade`] takes both apart again, so a stream's data
//! frames go from the outbox to the kernel with one `sendmsg` and no layer in between
//! (the trait object, hyper's rewind buffer, its I/O adapter, and the VFS `writev` path
//! `sendmsg` skips; docs/benchmarks.md §18). A TLS connection stays behind hyper's
//! `Upgraded`: its bytes must go through rustls anyway.

use std::io::IoSlice;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// An upgraded connection (see the module doc).
#[derive(Debug)]
pub(crate) enum Sock {
    /// Plain TCP, with what hyper had read past the upgrade request (served first). The
    /// stream is shared with the shard's direct writes (`server::outbox::TcpPort`); every
    /// tokio socket operation used here takes `&self`.
    Tcp {
        /// Bytes the client sent right behind its upgrade request.
        pre: Bytes,
        /// The connection itself.
        tcp: Rc<TcpStream>,
    },
    /// Anything else (TLS), through hyper's upgrade layers.
    Upgraded(TokioIo<Upgraded>),
}

impl Sock {
    /// Unwraps a plain TCP upgrade; keeps any other as it is.
    pub(crate) fn from_upgrade(u: Upgraded) -> Sock {
        match u.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => Sock::Tcp { pre: parts.read_buf, tcp: Rc::new(parts.io.into_inner()) },
            Err(u) => Sock::Upgraded(TokioIo::new(u)),
        }
    }

    /// The TCP stream of a plain connection.
    pub(crate) fn tcp(&self) -> Option<&Rc<TcpStream>> {
        match self {
            Sock::Tcp { tcp, .. } => Some(tcp),
            Sock::Upgraded(_) => None,
        }
    }
}

/// One `sendmsg` of `bufs` if tokio believes the socket takes data (`WouldBlock`, without
/// a syscall, if not): the shard's direct writes call it as it is, [`Sock`]'s own writes
/// through [`poll_send`].
pub(crate) fn try_sendmsg(tcp: &TcpStream, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
    tcp.try_io(Interest::WRITABLE, || socket2::SockRef::from(tcp).send_vectored(bufs))
}

/// Retries a non-blocking write (one that clears tokio's readiness when it blocks) until
/// the socket stops taking data (`Pending`, woken when it does again) or the write does
/// something other than block.
fn poll_send(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    mut op: impl FnMut() -> std::io::Result<usize>,
) -> Poll<std::io::Result<usize>> {
    loop {
        ready!(tcp.poll_write_ready(cx))?;
        match op() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return Poll::Ready(r),
        }
    }
}

impl AsyncRead for Sock {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Tcp { pre, tcp } => {
                if pre.has_remaining() {
                    let n = pre.len().min(buf.remaining());
                    buf.put_slice(&pre[..n]);
                    pre.advance(n);
                    return Poll::Ready(Ok(()));
                }
                loop {
                    ready!(tcp.poll_read_ready(cx))?;
                    match tcp.try_read(buf.initialize_unfilled()) {
                        Ok(n) => {
                            buf.advance(n);
                            return Poll::Ready(Ok(()));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
            Sock::Upgraded(u) => Pin::new(u).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Sock {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Sock::Tcp { tcp, .. } => poll_send(tcp, cx, || tcp.try_write(buf)),
            Sock::Upgraded(u) => Pin::new(u).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            // `sendmsg` rather than tokio's `writev`: the same iovecs, straight to the
            // socket layer. Readiness is tokio's, as for any of its own writes.
            Sock::Tcp { tcp, .. } => poll_send(tcp, cx, || try_sendmsg(tcp, bufs)),
            Sock::Upgraded(u) => Pin::new(u).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Sock::Tcp { .. } => true,
            Sock::Upgraded(u) => u.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            // TCP buffers nothing in user space.
            Sock::Tcp { .. } => Poll::Ready(Ok(())),
            Sock::Upgraded(u) => Pin::new(u).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Tcp { tcp, .. } => Poll::Ready(socket2::SockRef::from(&**tcp).shutdown(std::net::Shutdown::Write)),
            Sock::Upgraded(u) => Pin::new(u).poll_shutdown(cx),
        }
    }
}
