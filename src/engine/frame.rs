//! What goes on a stream connection's socket: the [`Frame`] its writer takes next, and the
//! [`DirectPort`] through which the shard may write frames itself (`super::direct`). A
//! leaf: the core, the connection-task API and the direct writer all use it.

use bytes::Bytes;

/// What [`DirectPort::write`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wrote {
    /// The kernel took all of it.
    All,
    /// The kernel took part of it or none (or the socket failed): the port keeps the rest
    /// and the connection's task must finish (or see the failure) itself.
    Rest,
}

/// A connection's socket as its shard may write it between dispatch cycles.
pub(crate) trait DirectPort {
    /// The socket is the shard's to write now: the task is not writing and nothing of
    /// its own (a partial write, tungstenite's pong) waits to go out first.
    fn free(&self) -> bool;

    /// Writes a data frame (`Frame::Text` or `Frame::Binary`) without waiting.
    fn write(&self, frame: Frame) -> Wrote;
}

impl std::fmt::Debug for dyn DirectPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectPort")
    }
}

/// What the writer puts on the socket next.
#[derive(Debug)]
pub(crate) enum Frame {
    /// A JSON control message.
    Text(String),
    /// A sealed batch of records, stamped with its send time.
    Binary(Bytes),
    /// Close the connection with this code and reason; nothing follows it.
    Close {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: &'static str,
    },
}
