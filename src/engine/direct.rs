//! Writes from the shard loop itself: after a dispatch cycle, the shard puts the frames it
//! queued for a connection straight on that connection's socket, socket after socket,
//! instead of waking one writer task per connection to do it.
//!
//! Why: at one write per tick and subscriber, waking a task (the notify, the task's
//! scheduling and poll, its `select!`) cost about as much user-space time as everything
//! else of a write, and the writes of one cycle spread over as many task polls ran the
//! kernel's send path colder than a loop of writes does (docs/benchmarks.md §18).
//!
//! Only where nothing can interleave: the connection registered a `DirectPort` (plain
//! TCP, no `engine.write_delay_us`), has no `max_bytes_per_s`, no close queued, and its
//! port says the socket is free (its task is not in the middle of a write and has nothing
//! of its own waiting to go out). Everything else, and whatever the socket does not take
//! at once, is the task's as before: the port keeps the rest of a partial write and the
//! task is woken to finish it, blocked-socket and slow-consumer handling included.

use bytes::Bytes;
use prometheus::local::LocalHistogram;
use tickgate_proto::now_ns;

use super::core::ShardCore;
use super::frame::{Frame, Wrote};
use super::outbound::{BatchBuf, OutItem};

/// Writes what this cycle queued for the connections it listed (`Woken::direct`: those
/// with a port that the cycle would have woken), each through its port when it may; wakes
/// the task of every other.
pub(super) fn write_queued(core: &mut ShardCore, latency: &LocalHistogram, batch_records: &LocalHistogram) {
    // Taken out while the core is borrowed for the writes, and put back for its capacity.
    let mut keys = std::mem::take(&mut core.woken.direct);
    for key in keys.drain(..) {
        let Some(c) = core.conns.get(key) else { continue };
        let Some(port) = c.direct.clone() else {
            c.notify.notify_one();
            continue;
        };
        if c.byte_rate.is_some() || c.out.is_closed() || !port.free() {
            c.notify.notify_one();
            continue;
        }
        let now = now_ns();
        // An expired connection is closed instead (which wakes its task).
        if core.expire_if_due(key, now) {
            continue;
        }
        let mut wrote = false;
        while let Some(item) = core.pop(key) {
            let frame = match item {
                OutItem::Text(s) => {
                    core.stats.frames += 1;
                    core.stats.bytes += s.len() as u64;
                    Frame::Text(s)
                }
                OutItem::Batch(b) => Frame::Binary(seal(core, latency, batch_records, b, now)),
                // `is_closed` was false and this loop queues nothing: unreachable, but a
                // close is the task's either way.
                close @ OutItem::Close { .. } => {
                    if let Some(c) = core.conns.get_mut(key) {
                        c.out.unpop(close);
                    }
                    break;
                }
            };
            wrote = true;
            if port.write(frame) == Wrote::Rest {
                break;
            }
        }
        if wrote {
            core.stats.flushes += 1;
        }
        // Whatever is left (the rest of a partial write, a conflation's tail, a close)
        // is the task's.
        if let Some(c) = core.conns.get(key) {
            if !c.out.is_empty() || !port.free() {
                c.notify.notify_one();
            }
        }
    }
    core.woken.direct = keys;
}

/// Seals a batch taken for the socket at `now` (its send time), counting it: fan-out
/// latency, records per batch, per-feed deliveries, frames and bytes.
pub(super) fn seal(
    core: &mut ShardCore,
    latency: &LocalHistogram,
    batch_records: &LocalHistogram,
    b: BatchBuf,
    now: u64,
) -> Bytes {
    let latency_ns = (now as i64).saturating_sub(b.oldest_recv_ns()).max(0);
    latency.observe(latency_ns as f64 / 1e9);
    batch_records.observe(b.count() as f64);
    for &(f, n) in b.feed_counts() {
        if let Some(d) = core.stats.delivered.get_mut(f as usize) {
            *d += n as u64;
        }
    }
    let bytes = b.finish(now);
    core.stats.frames += 1;
    core.stats.bytes += bytes.len() as u64;
    bytes
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    use std::future::Future;

    use super::super::core::ConnKey;
    use super::super::frame::DirectPort;
    use super::*;
    use crate::engine::testkit::{self, tick};
    use tickgate_proto::codec::decode_batch;

    /// A port that takes `takes` frames whole and then no more, and says whether the
    /// socket is free.
    #[derive(Default)]
    struct Recording {
        frames: RefCell<Vec<Frame>>,
        takes: Cell<usize>,
        busy: Cell<bool>,
        rest: Cell<bool>,
    }

    impl DirectPort for Recording {
        fn free(&self) -> bool {
            !self.busy.get() && !self.rest.get()
        }
        fn write(&self, frame: Frame) -> Wrote {
            self.frames.borrow_mut().push(frame);
            if self.takes.get() == 0 {
                self.rest.set(true);
                return Wrote::Rest;
            }
            self.takes.set(self.takes.get() - 1);
            Wrote::All
        }
    }

    fn seqs(frames: &[Frame]) -> Vec<u64> {
        frames
            .iter()
            .flat_map(|f| match f {
                Frame::Binary(b) => decode_batch(b).expect("a batch").records.iter().map(|r| r.seq()).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// Whether the connection's task was woken (and takes the wake-up).
    fn woken(core: &ShardCore, key: ConnKey) -> bool {
        let notify = core.conns[key].notify.clone();
        let n = std::pin::pin!(notify.notified());
        let waker = std::task::Waker::noop();
        n.poll(&mut std::task::Context::from_waker(waker)).is_ready()
    }

    fn setup(port: &Rc<Recording>) -> (ShardCore, ConnKey) {
        let mut core = testkit::core();
        let h = core.add_conn(crate::auth::validate::Principal::unauthenticated("c", "i"), "s".into());
        core.handle(h.key, testkit::subscribe(&["A"]));
        testkit::drain(&mut core, h.key);
        assert!(woken(&core, h.key), "the welcome woke the task");
        core.conns[h.key].direct = Some(port.clone());
        (core, h.key)
    }

    fn write(core: &mut ShardCore) {
        let reg = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).expect("histogram");
        write_queued(core, &reg.local(), &reg.local());
    }

    /// A cycle's records go out through the port, the task is not woken, and the frames
    /// are counted as the task's would be.
    #[test]
    fn a_free_port_takes_the_cycle_and_the_task_sleeps() {
        let port = Rc::new(Recording { takes: Cell::new(usize::MAX), ..Default::default() });
        let (mut core, key) = setup(&port);
        for seq in 1..=3 {
            core.dispatch(&tick(seq));
        }
        assert_eq!(core.woken.direct, vec![key], "listed once for the cycle");
        write(&mut core);
        assert_eq!(seqs(&port.frames.borrow()), vec![1, 2, 3]);
        assert!(core.conns[key].out.is_empty());
        assert!(!woken(&core, key), "nothing was left for the task");
        assert_eq!(core.stats.flushes, 1);
        core.dispatch(&tick(4));
        write(&mut core);
        assert_eq!(seqs(&port.frames.borrow()), vec![1, 2, 3, 4]);
    }

    /// A socket that stops taking data: the port keeps the rest, everything later stays
    /// queued in order, and the task is woken to finish; until the port is free again the
    /// shard writes nothing more and wakes the task instead.
    #[test]
    fn a_partial_write_hands_the_rest_to_the_task() {
        let port = Rc::new(Recording::default());
        let (mut core, key) = setup(&port);
        core.dispatch(&tick(1));
        write(&mut core);
        assert_eq!(seqs(&port.frames.borrow()), vec![1], "offered, kept by the port");
        assert!(woken(&core, key), "the task finishes the write");
        // The rest is in the port, not the queue: the next cycle lists the connection,
        // but its port is not free, so record 2 stays queued and the task is woken.
        core.dispatch(&tick(2));
        write(&mut core);
        assert_eq!(seqs(&port.frames.borrow()), vec![1]);
        assert!(woken(&core, key));
        let left = testkit::drain(&mut core, key);
        assert_eq!(left.len(), 1, "record 2 waits in the queue for the task");
        // The task finished; a busy port (the task mid-write) makes the shard wake it.
        port.rest.set(false);
        port.busy.set(true);
        core.dispatch(&tick(3));
        write(&mut core);
        assert_eq!(seqs(&port.frames.borrow()), vec![1]);
        assert!(woken(&core, key));
        assert_eq!(testkit::drain(&mut core, key).len(), 1, "record 3 is the task's");
    }

    /// A queued close, or a byte cap, leaves the whole queue to the task.
    #[test]
    fn closes_and_byte_caps_are_the_tasks() {
        let port = Rc::new(Recording { takes: Cell::new(usize::MAX), ..Default::default() });
        let (mut core, key) = setup(&port);
        core.conns[key].byte_rate = Some(1 << 20);
        core.dispatch(&tick(1));
        write(&mut core);
        assert!(port.frames.borrow().is_empty());
        assert!(woken(&core, key));
        core.conns[key].byte_rate = None;
        testkit::drain(&mut core, key);
        core.dispatch(&tick(2));
        core.close(key, tickgate_proto::close::Reason::HeartbeatTimeout);
        write(&mut core);
        assert!(port.frames.borrow().is_empty());
        assert!(woken(&core, key));
        let items = testkit::drain(&mut core, key);
        assert!(matches!(items.last(), Some(OutItem::Close { .. })), "{items:?}");
    }
}
