//! The sharded fan-out engine.
//!
//! ```text
//!  source ──Ingest::publish_burst──► feed log (feeds::log), then
//!          └─push──► [ArrayQueue shard 0] ──► shard thread 0: dispatch ──► Outbound queues ──► ConnGuard::next_frame ──► socket
//!          └─push──► [ArrayQueue shard 1] ──► shard thread 1: dispatch ──► ...
//!
//!  lib.rs ── Engine::new ─► inboxes + control ── Engine::start ─► EngineHandle (owns the threads)
//!  admin  ── EngineCtl (weak) ─► ShardCtl::{Revoke, ListConnections}
//!  handshake/connection task ── stream::current() ─► ShardHandle::open ─► ConnGuard
//! ```
//!
//! Each shard is one OS thread running a single-threaded tokio runtime. It owns its
//! connections (their sockets, outbound queues and subscriptions) and its subscription
//! index, so dispatch is plain single-threaded code: no lock, no shared atomic per tick.
//! Ticks cross threads exactly once, through a bounded lock-free queue per shard.
//!
//! | module | holds |
//! |---|---|
//! | this one | [`Tick`], [`Inbound`], [`ShardInbox`] (a shard's cross-thread side), [`Ingest`] (append to the log, then queue for every shard) |
//! | `handle` | `Engine`, `EngineHandle` (start, drain and stop the shard threads), `EngineCtl` (revocation, admin listing) |
//! | `stream` | the connection task's API: `ShardHandle`, `ConnGuard` |
//! | `frame` | what goes on a socket: `Frame`, and `DirectPort` (the shard writing frames itself) |
//! | `pacer` | `WritePacer`: when a connection's writer writes (the write-hold policy, both halves) |
//! | `direct` | the shard writing a cycle's frames to plain sockets itself (`DirectPort`), instead of waking their tasks |
//! | [`stall`] | `WriteProgress`: when the kernel last took a connection's bytes (what makes a slow consumer) |
//! | [`shard`] | the shard thread, its loop, control requests, stats flusher, death policy |
//! | [`core`] | `ShardCore`: the synchronous state of a shard and the dispatch loop body |
//! | `stats` | `CoreStats`, `GapReason`, `ConnInfo` (plain data) |
//! | `budget` | the server-wide outbound budget: each shard's share of the excess, shed from its largest backlogs |
//! | `view` | what a shard reports of itself: queued bytes, the admin connection list |
//! | `index`, `session`, `subscribe` | the core's parts: registry and subscription index; deadlines, refresh, revocation; subscribe planning and replay |
//! | [`outbound`], `conflate`, [`timer`] | a connection's queue, conflation state, the expiry timer wheel |
//! | `groups`, `throttle` | throttled subscriptions (v1.1 `max_rate`): the groups per instrument and rate and their update plans; how the shard feeds and flushes them |
//!
//! The engine receives a validated [`crate::auth::validate::Principal`] (entitlements
//! and a deadline), never a token: refresh tokens are validated by the connection task.
//! See `docs/architecture.md` for the whole path.

pub(crate) mod budget;
pub(crate) mod conflate;
pub mod core;
mod direct;
mod frame;
mod groups;
pub(crate) mod handle;
mod index;
pub mod outbound;
pub(crate) mod pacer;
mod session;
pub mod shard;
pub mod stall;
pub(crate) mod stats;
pub(crate) mod stream;
pub(crate) mod subscribe;
#[cfg(test)]
pub(crate) mod testkit;
mod throttle;
pub mod timer;
mod view;

pub(crate) use handle::{Engine, EngineCtl, EngineHandle};
pub(crate) use pacer::WritePacer;
pub(crate) use stream::{ConnGuard, DirectPort, Frame, ShardHandle, Wrote};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::feeds::log::FeedLog;
use crate::feeds::Catalog;
use tickgate_proto::codec::Record;

/// One tick on its way to the shards: the encoded record plus the dense indices the
/// shards use to find subscribers without hashing.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    /// Dense feed index in the catalog.
    pub feed_idx: u16,
    /// Dense instrument index in the feed.
    pub instr: u32,
    /// The record as it goes on the wire.
    pub record: Record,
}

/// What travels through a shard's inbound queue, in source order.
#[derive(Debug, Clone, Copy)]
pub enum Inbound {
    /// A tick to dispatch.
    Tick(Tick),
    /// The feed restarted its numbering: subscribers get `reset` before any record of the
    /// new epoch (queue order guarantees "before").
    Reset {
        /// Dense feed index.
        feed_idx: u16,
        /// The new epoch.
        epoch: u64,
    },
}

/// The cross-thread side of a shard: its inbound tick queue and wake-up signal.
#[derive(Debug)]
pub struct ShardInbox {
    /// Bounded lock-free queue of ticks and epoch resets.
    pub queue: ArrayQueue<Inbound>,
    /// Wakes the shard's dispatch loop when it sleeps on an empty queue.
    pub notify: Notify,
    /// Open stream connections on this shard (for placement and the gauge).
    pub connections: AtomicUsize,
    /// Subscribed (connection, instrument) pairs on this shard.
    pub subscriptions: AtomicUsize,
    /// Entries in this shard's timer wheel.
    pub timers: AtomicUsize,
    /// Ticks that had to wait for queue space (the shard was behind).
    pub backpressure_waits: AtomicUsize,
    /// Outbound bytes queued on this shard's connections, as of its last stats flush (less
    /// what the budget shed since): every shard sums these for the server-wide budget
    /// (`super::budget`).
    pub queued_bytes: AtomicUsize,
    /// False once the shard's thread has ended (stopped, or died of a panic): nobody
    /// takes from the queue any more, so a source must not wait for space in it.
    alive: AtomicBool,
}

impl ShardInbox {
    /// An inbox with the given queue capacity.
    pub fn new(capacity: usize) -> ShardInbox {
        ShardInbox {
            queue: ArrayQueue::new(capacity),
            notify: Notify::new(),
            connections: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
            timers: AtomicUsize::new(0),
            backpressure_waits: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
        }
    }

    /// Whether the shard's thread still takes from the queue.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Marks the shard's thread as ended (the thread does it on its way out, panic or not).
    pub fn mark_dead(&self) {
        self.alive.store(false, Ordering::Release);
    }
}

/// The handle feed sources publish through. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Ingest {
    shards: Arc<[Arc<ShardInbox>]>,
    catalog: Arc<Catalog>,
    ingested: Arc<[prometheus::IntCounter]>,
}

impl Ingest {
    /// A handle over the given shard inboxes; `ingested[feed_idx]` counts ticks per feed.
    pub fn new(
        shards: Arc<[Arc<ShardInbox>]>,
        catalog: Arc<Catalog>,
        ingested: Arc<[prometheus::IntCounter]>,
    ) -> Ingest {
        Ingest { shards, catalog, ingested }
    }

    /// The catalog (each feed carries its log).
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Appends ticks (whose seqs are final) to their feed's log, then queues them for
    /// every shard. The log comes first so a shard never dispatches a seq the resume
    /// buffer has not seen. Returns false when cancelled while waiting for queue space.
    pub async fn publish_burst(&self, ticks: &[Tick], cancel: &CancellationToken) -> bool {
        self.append(ticks);
        self.enqueue(ticks, cancel).await
    }

    /// Appends ticks to their feeds' logs, one lock per run of ticks of the same feed.
    pub fn append(&self, ticks: &[Tick]) {
        let mut rest = ticks;
        while let Some(first) = rest.first() {
            let n = rest.iter().take_while(|t| t.feed_idx == first.feed_idx).count();
            if let Some(feed) = self.catalog.get(first.feed_idx as usize) {
                let mut log = feed.log_mut();
                for t in &rest[..n] {
                    log.append(t.instr, t.record);
                }
            }
            rest = &rest[n..];
        }
    }

    /// Prepares one feed's ticks under its log's write lock and appends them there, in
    /// one hold: `prepare` reads the log (its last seqs) and leaves in `ticks` what is to
    /// be appended; on `Err` nothing is appended. The publish source sequences a batch this
    /// way, so checking seqs and appending them cannot be split by another writer, and
    /// a batch costs one lock instead of a read lock and then a write lock. Call
    /// [`Ingest::enqueue`] with the same ticks afterwards (log first, then shards).
    pub fn append_with<E>(
        &self,
        feed_idx: u16,
        ticks: &mut Vec<Tick>,
        prepare: impl FnOnce(&FeedLog, &mut Vec<Tick>) -> Result<(), E>,
    ) -> Result<(), E> {
        let Some(feed) = self.catalog.get(feed_idx as usize) else {
            // Not a feed of this catalog: nothing to append, and nothing left to enqueue.
            ticks.clear();
            return Ok(());
        };
        let mut log = feed.log_mut();
        prepare(&log, ticks)?;
        for t in ticks.iter() {
            log.append(t.instr, t.record);
        }
        Ok(())
    }

    /// Queues ticks already appended to their log for every shard. A full queue means
    /// that shard is behind: the source waits (backpressure) rather than dropping, so the
    /// engine itself never creates a gap. Returns false when cancelled while waiting.
    ///
    /// Shards are not woken here; call [`Ingest::flush`] after a burst so a burst of
    /// ticks costs one wake-up per shard, not one per tick.
    pub async fn enqueue(&self, ticks: &[Tick], cancel: &CancellationToken) -> bool {
        for tick in ticks {
            if let Some(c) = self.ingested.get(tick.feed_idx as usize) {
                c.inc();
            }
            if !self.push_all(Inbound::Tick(*tick), cancel).await {
                return false;
            }
        }
        true
    }

    /// Starts a new epoch for a feed: its log is emptied and every shard sends `reset`
    /// to the feed's subscribers before any record of the new epoch.
    pub async fn reset(&self, feed_idx: u16, epoch: u64, cancel: &CancellationToken) -> bool {
        let Some(feed) = self.catalog.get(feed_idx as usize) else { return true };
        feed.start_epoch(epoch);
        let ok = self.push_all(Inbound::Reset { feed_idx, epoch }, cancel).await;
        self.flush();
        ok
    }

    /// Queues `item` for every live shard, waiting while a live shard's queue is full. A
    /// shard whose thread has ended is skipped, and one that dies while the source waits
    /// for it is left at the next check (every 200 µs): its connections died with it, and
    /// waiting for it would stall every feed on every other shard. (A shard that panics
    /// also ends the process, see `shard::spawn`; this keeps an embedder's sources alive
    /// in between, and during shutdown.)
    async fn push_all(&self, item: Inbound, cancel: &CancellationToken) -> bool {
        for shard in self.shards.iter() {
            let mut t = item;
            loop {
                if !shard.is_alive() {
                    break;
                }
                match shard.queue.push(t) {
                    Ok(()) => break,
                    Err(back) => {
                        t = back;
                        shard.backpressure_waits.fetch_add(1, Ordering::Relaxed);
                        shard.notify.notify_one();
                        tokio::select! {
                            _ = cancel.cancelled() => return false,
                            _ = tokio::time::sleep(Duration::from_micros(200)) => {}
                        }
                    }
                }
            }
        }
        true
    }

    /// Wakes every shard that may be sleeping on an empty queue.
    pub fn flush(&self) {
        for shard in self.shards.iter() {
            shard.notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::{self, tick};
    use super::*;

    /// A source never waits forever for a shard whose thread is gone: the dead shard is
    /// skipped (at once, or at the next check when it dies during the wait) and the live
    /// ones get the tick.
    #[tokio::test]
    async fn push_all_skips_a_dead_shard_instead_of_waiting_for_it() {
        let catalog = testkit::catalog(&["A"]);
        let shards: Arc<[Arc<ShardInbox>]> = (0..2).map(|_| Arc::new(ShardInbox::new(16))).collect();
        let ingest = Ingest::new(
            shards.clone(),
            catalog,
            Arc::from(vec![prometheus::IntCounter::new("t", "t").expect("counter")]),
        );
        let never = CancellationToken::new();
        // Shard 0's queue is full and nobody takes from it.
        for seq in 1..=16 {
            assert!(ingest.enqueue(&[tick(seq)], &never).await);
        }
        assert_eq!((shards[0].queue.len(), shards[1].queue.len()), (16, 16));
        shards[1].queue.pop();
        // Shard 0 dies while the source waits for it: the wait ends and shard 1 still gets the tick.
        let dying = shards[0].clone();
        let waiting = tokio::spawn({
            let ingest = ingest.clone();
            async move { ingest.enqueue(&[tick(17)], &CancellationToken::new()).await }
        });
        tokio::task::yield_now().await;
        dying.mark_dead();
        let ok = tokio::time::timeout(Duration::from_secs(30), waiting).await.expect("the wait ended").expect("task");
        assert!(ok);
        assert_eq!(shards[1].queue.len(), 16);
        // Already dead: skipped without waiting.
        shards[1].queue.pop();
        assert!(ingest.enqueue(&[tick(18)], &never).await);
        assert_eq!((shards[0].queue.len(), shards[1].queue.len()), (16, 16));
    }
}
