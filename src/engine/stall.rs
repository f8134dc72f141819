//! When a connection's socket counts as stalled: [`WriteProgress`], the time the kernel last
//! took bytes of the connection's output.
//!
//! Why not just "how long the writer has waited": a writer waits on one operation (a whole
//! WebSocket flush of its buffer, up to megabytes), and a socket that takes that buffer in
//! small pieces while a reader drains it keeps the operation pending for seconds without
//! ever being full for long. Only the time since the kernel last accepted a byte says the
//! socket stopped taking data, which is what makes a slow consumer (`ShardCore::end_cycle`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

// tokio's Instant follows the runtime's clock, so tests can drive stalls with paused time.
use tokio::time::Instant;

/// The time of the last write the kernel accepted on one socket. The socket's I/O wrapper
/// marks it on every write of at least one byte; the shard reads it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WriteProgress {
    origin: Instant,
    /// Nanoseconds from `origin` to the last accepted write (0: none yet).
    last_ns: Arc<AtomicU64>,
}

impl Default for WriteProgress {
    fn default() -> Self {
        WriteProgress::new()
    }
}

impl WriteProgress {
    /// A tracker with no write yet.
    pub fn new() -> WriteProgress {
        WriteProgress { origin: Instant::now(), last_ns: Arc::new(AtomicU64::new(0)) }
    }

    /// Records that the kernel accepted bytes now.
    #[inline]
    pub fn mark(&self) {
        // Relaxed: a lone timestamp, read by the same thread (a shard owns its sockets).
        self.last_ns.store(self.origin.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// When the kernel last accepted bytes (the tracker's creation if it never did).
    pub fn last(&self) -> Instant {
        self.origin + std::time::Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_last_accepted_write_is_remembered() {
        let p = WriteProgress::new();
        let born = p.last();
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(p.last(), born, "nothing written yet");
        p.mark();
        assert_eq!(p.last(), born + Duration::from_millis(300));
        let copy = p.clone();
        tokio::time::advance(Duration::from_millis(50)).await;
        copy.mark();
        assert_eq!(p.last(), born + Duration::from_millis(350), "clones share the time");
    }
}
