//! A connection's outbound queue: the ordered list of what the shard has decided to send
//! and the socket has not yet taken.
//!
//! Control messages and data share one queue so the order the protocol promises
//! (`subscribed` before the snapshot, a `gap` before later records, `shutdown` before the
//! close) is simply queue order. Records are appended to the open batch at the back, so a
//! connection gets one binary message per dispatch cycle however many ticks it received.
//! The byte total is what the slow-consumer budget (`limits.max_outbound_bytes`) counts.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use tickgate_proto::codec::{write_batch_header, Record, BATCH_HEADER_LEN, MAX_BATCH_RECORDS};

/// Distinct feeds tracked per batch for the per-feed delivery counter; a record of a
/// fifth feed seals the batch and opens a new one.
const FEEDS_PER_BATCH: usize = 4;

/// Initial capacity of a batch buffer: the header plus a few records.
const INITIAL_BATCH_CAPACITY: usize = 512;

/// A batch being filled.
#[derive(Debug)]
pub struct BatchBuf {
    buf: BytesMut,
    count: usize,
    oldest_recv_ns: i64,
    feeds: [(u16, u32); FEEDS_PER_BATCH],
    nfeeds: usize,
}

impl BatchBuf {
    fn new(capacity: usize) -> BatchBuf {
        let mut buf = BytesMut::with_capacity(capacity.max(BATCH_HEADER_LEN + 128));
        buf.resize(BATCH_HEADER_LEN, 0);
        BatchBuf { buf, count: 0, oldest_recv_ns: i64::MAX, feeds: [(0, 0); FEEDS_PER_BATCH], nfeeds: 0 }
    }

    /// Appends a record if it fits; returns false when the batch must be sealed first.
    #[inline]
    fn try_push(&mut self, feed_idx: u16, rec: &Record, max_bytes: usize) -> bool {
        let bytes = rec.as_bytes();
        if self.count >= MAX_BATCH_RECORDS || self.buf.len() + bytes.len() > max_bytes {
            return false;
        }
        match self.feeds[..self.nfeeds].iter_mut().find(|(f, _)| *f == feed_idx) {
            Some((_, n)) => *n += 1,
            None if self.nfeeds < FEEDS_PER_BATCH => {
                self.feeds[self.nfeeds] = (feed_idx, 1);
                self.nfeeds += 1;
            }
            None => return false,
        }
        self.buf.extend_from_slice(bytes);
        self.count += 1;
        self.oldest_recv_ns = self.oldest_recv_ns.min(rec.ts_recv_ns());
        true
    }

    /// Number of records.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Ingest time of the oldest record (for the fan-out latency histogram).
    pub fn oldest_recv_ns(&self) -> i64 {
        self.oldest_recv_ns
    }

    /// `(feed_idx, records)` pairs for the per-feed delivery counter.
    pub fn feed_counts(&self) -> &[(u16, u32)] {
        &self.feeds[..self.nfeeds]
    }

    /// Seals the batch: writes the header with the send time and returns the message.
    pub fn finish(mut self, send_ts_ns: u64) -> Bytes {
        // count <= MAX_BATCH_RECORDS (u16::MAX) is enforced by try_push.
        write_batch_header(&mut self.buf[..BATCH_HEADER_LEN], self.count as u16, send_ts_ns);
        self.buf.freeze()
    }
}

/// An entry of the outbound queue.
#[derive(Debug)]
pub enum OutItem {
    /// A JSON control message.
    Text(String),
    /// A binary batch of records.
    Batch(BatchBuf),
    /// Close the connection with this code; nothing after it is sent.
    Close {
        /// WebSocket close code.
        code: u16,
        /// Close reason.
        reason: &'static str,
    },
}

impl OutItem {
    fn size(&self) -> usize {
        match self {
            OutItem::Text(s) => s.len(),
            OutItem::Batch(b) => b.buf.len(),
            OutItem::Close { .. } => 0,
        }
    }
}

/// The per-connection queue with its byte count.
#[derive(Debug, Default)]
pub struct Outbound {
    items: VecDeque<OutItem>,
    bytes: usize,
    closed: bool,
    /// Length of the last batch taken by the writer (initial capacity of the next).
    size_hint: usize,
}

impl Outbound {
    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True once a close was queued: nothing more is accepted.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Appends a record to the open batch (or opens one).
    #[inline]
    pub fn push_record(&mut self, feed_idx: u16, rec: &Record, max_batch_bytes: usize) {
        if self.closed {
            return;
        }
        let len = rec.len();
        if let Some(OutItem::Batch(b)) = self.items.back_mut() {
            if b.try_push(feed_idx, rec, max_batch_bytes) {
                self.bytes += len;
                return;
            }
        }
        // A fresh batch is sized for a typical light cycle (a handful of records) and
        // grows by doubling: with thousands of connections, touching a large fresh
        // buffer per connection per cycle costs more in cache misses than the copy.
        // The size of this connection's previous batch is the best guess for the next.
        let mut b =
            BatchBuf::new(self.size_hint.clamp(INITIAL_BATCH_CAPACITY, max_batch_bytes.max(INITIAL_BATCH_CAPACITY)));
        let pushed = b.try_push(feed_idx, rec, max_batch_bytes.max(BATCH_HEADER_LEN + len));
        debug_assert!(pushed);
        self.bytes += b.buf.len();
        self.items.push_back(OutItem::Batch(b));
    }

    /// Appends a control message (it also seals the open batch).
    pub fn push_text(&mut self, text: String) {
        if self.closed {
            return;
        }
        self.bytes += text.len();
        self.items.push_back(OutItem::Text(text));
    }

    /// Queues a close after what is already queued.
    pub fn push_close(&mut self, code: u16, reason: &'static str) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.items.push_back(OutItem::Close { code, reason });
    }

    /// Drops everything queued and queues a close: used when the client is too slow to
    /// deserve the backlog.
    pub fn discard_and_close(&mut self, code: u16, reason: &'static str) {
        self.items.clear();
        self.bytes = 0;
        self.closed = false;
        self.push_close(code, reason);
    }

    /// Puts an item just taken back in front (the shard's direct writer hands a close it
    /// must not write back to the connection's task).
    pub(crate) fn unpop(&mut self, item: OutItem) {
        self.bytes += item.size();
        self.items.push_front(item);
    }

    /// Takes the next item for the socket.
    pub fn pop(&mut self) -> Option<OutItem> {
        let item = self.items.pop_front()?;
        let size = item.size();
        self.bytes -= size;
        if let OutItem::Batch(_) = item {
            self.size_hint = size;
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickgate_proto::codec::{decode_batch, Body, Trade};

    fn rec(seq: u64) -> Record {
        Record::encode(1, 1, seq, 0, seq as i64, &Body::Trade(Trade::default()), 0)
    }

    #[test]
    fn records_batch_until_a_control_message() {
        let mut o = Outbound::default();
        o.push_record(0, &rec(1), 65536);
        o.push_record(0, &rec(2), 65536);
        o.push_text("{}".into());
        o.push_record(0, &rec(3), 65536);
        assert_eq!(o.bytes(), 16 + 112 + 2 + 16 + 56);
        let Some(OutItem::Batch(b)) = o.pop() else { panic!("batch first") };
        assert_eq!(b.count(), 2);
        assert_eq!(b.oldest_recv_ns(), 1);
        let msg = b.finish(99);
        let d = decode_batch(&msg).expect("decodes");
        assert_eq!(d.send_ts_ns, 99);
        assert_eq!(d.records.iter().map(Record::seq).collect::<Vec<_>>(), vec![1, 2]);
        assert!(matches!(o.pop(), Some(OutItem::Text(_))));
        assert!(matches!(o.pop(), Some(OutItem::Batch(_))));
        assert_eq!(o.bytes(), 0);
    }

    #[test]
    fn batches_are_sealed_at_the_size_limit() {
        let mut o = Outbound::default();
        for s in 0..100 {
            o.push_record(0, &rec(s), 16 + 56 * 10);
        }
        let mut n = 0;
        while let Some(OutItem::Batch(b)) = o.pop() {
            assert_eq!(b.count(), 10);
            n += 1;
        }
        assert_eq!(n, 10);
    }

    #[test]
    fn close_is_final() {
        let mut o = Outbound::default();
        o.push_record(0, &rec(1), 65536);
        let slow = tickgate_proto::close::Reason::SlowConsumer;
        o.discard_and_close(slow.code(), slow.reason());
        o.push_record(0, &rec(2), 65536);
        o.push_text("late".into());
        assert!(matches!(o.pop(), Some(OutItem::Close { code: 4008, .. })));
        assert!(o.pop().is_none());
    }
}
