//! The engine's API for a stream connection's task, which runs on its shard's thread:
//! [`ShardHandle`] (the shard the calling thread runs, from [`current`]), [`ConnGuard`]
//! (one registered connection: handle its control messages, take its next [`Frame`],
//! unregistered when dropped). When the writer writes is [`super::pacer::WritePacer`]'s
//! decision.
//!
//! The shard's state sits in a `RefCell` that only this module and the shard loop borrow;
//! every borrow ends before the method returns, so a connection task can never hold it
//! across an `.await`.

use std::rc::Rc;
use std::sync::atomic::Ordering;

use tokio::sync::Notify;

use super::core::ConnKey;
pub(crate) use super::frame::{DirectPort, Frame, Wrote};
use super::outbound::OutItem;
use super::shard::ShardLocal;
use crate::auth::validate::{AuthError, Principal};
use tickgate_proto::close::Reason;
use tickgate_proto::control::{ClientMsg, ErrorCode};
use tickgate_proto::now_ns;

/// The shard that owns the calling thread, if it is a shard thread.
pub(crate) fn current() -> Option<ShardHandle> {
    super::shard::current_local().map(ShardHandle)
}

/// A shard, as a connection task on its thread sees it. Cheap to clone (an `Rc`).
#[derive(Debug, Clone)]
pub(crate) struct ShardHandle(Rc<ShardLocal>);

impl ShardHandle {
    /// Shard number.
    pub(crate) fn id(&self) -> usize {
        self.0.id
    }

    /// True once shutdown began on this shard: new connections are refused.
    pub(crate) fn is_draining(&self) -> bool {
        self.0.core.borrow().is_draining()
    }

    /// Registers a stream connection (its `welcome` is queued) and counts it in the
    /// shard's placement gauge; the returned guard undoes both when dropped, on every
    /// exit path of the connection task.
    pub(crate) fn open(&self, principal: Principal, session: String) -> ConnGuard {
        let h = self.0.core.borrow_mut().add_conn(principal, session);
        self.0.inbox.connections.fetch_add(1, Ordering::Relaxed);
        ConnGuard { shard: self.0.clone(), key: h.key, notify: h.notify, kill: h.kill }
    }
}

/// One stream connection registered on its shard. Unregisters it (subscriptions, timers,
/// the placement count) when dropped.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    shard: Rc<ShardLocal>,
    key: ConnKey,
    notify: Rc<Notify>,
    kill: Rc<Notify>,
}

impl ConnGuard {
    /// Wakes the writer when something was queued (see [`super::pacer::WritePacer`] for when).
    pub(crate) fn wake(&self) -> &Notify {
        &self.notify
    }

    /// Fires when the engine decided a termination (slow consumer, expiry, revocation):
    /// a write blocked on a stalled socket must be abandoned for the close.
    pub(crate) fn kill(&self) -> &Notify {
        &self.kill
    }

    /// Handles a parsed control message (`refresh` goes through
    /// [`ConnGuard::refresh_begin`] instead: its token is validated outside the engine).
    pub(crate) fn handle(&self, msg: ClientMsg) {
        self.shard.core.borrow_mut().handle(self.key, msg);
    }

    /// Queues an `error` reply (counted by code).
    pub(crate) fn send_error(&self, id: Option<i64>, code: ErrorCode, message: String) {
        self.shard.core.borrow_mut().send_error(self.key, id, code, message);
    }

    /// Queues a close after what is queued and stops data to the connection.
    pub(crate) fn close(&self, why: Reason) {
        self.shard.core.borrow_mut().close(self.key, why);
    }

    /// The engine's half of a refresh before validation (refresh offered, rate limit).
    /// True: validate the token and hand the outcome to [`ConnGuard::refresh_apply`];
    /// false: it was answered already.
    pub(crate) fn refresh_begin(&self, id: Option<i64>) -> bool {
        self.shard.core.borrow_mut().refresh_begin(self.key, id)
    }

    /// Applies a validated refresh (new entitlements and deadline), or its refusal.
    pub(crate) fn refresh_apply(&self, id: Option<i64>, validated: Result<Principal, AuthError>) {
        self.shard.core.borrow_mut().refresh_apply(self.key, id, validated);
    }

    /// Takes the next frame to write, counting it (frames, bytes, per-feed deliveries,
    /// fan-out latency, batch size). A batch is stamped with its send time here; a
    /// connection past its token's deadline is closed instead (4001): its batches are
    /// dropped and the close is the next frame.
    pub(crate) fn next_frame(&self) -> Option<Frame> {
        let shard = &*self.shard;
        let mut core = shard.core.borrow_mut();
        loop {
            match core.pop(self.key)? {
                OutItem::Close { code, reason } => return Some(Frame::Close { code, reason }),
                OutItem::Text(s) => {
                    core.stats.frames += 1;
                    core.stats.bytes += s.len() as u64;
                    return Some(Frame::Text(s));
                }
                OutItem::Batch(b) => {
                    let now = now_ns();
                    if core.expire_if_due(self.key, now) {
                        continue;
                    }
                    return Some(Frame::Binary(super::direct::seal(
                        &mut core,
                        &shard.latency,
                        &shard.batch_records,
                        b,
                        now,
                    )));
                }
            }
        }
    }

    /// The writer is blocked on a write the socket does not take (`true`: the kernel send
    /// buffer is full), or its writes complete again (`false`). Only a socket that stays
    /// full with a backlog over the budget makes a slow consumer (`ShardCore::end_cycle`).
    pub(crate) fn write_blocked(&self, blocked: bool) {
        self.shard.core.borrow_mut().set_write_blocked(self.key, blocked);
    }

    /// Gives the shard the socket's write progress (see [`super::stall`]).
    pub(crate) fn track_writes(&self, progress: super::stall::WriteProgress) {
        self.shard.core.borrow_mut().track_writes(self.key, progress);
    }

    /// Lets the shard write this connection's data frames itself (`engine::direct`).
    pub(crate) fn direct(&self, port: Rc<dyn DirectPort>) {
        if let Some(c) = self.shard.core.borrow_mut().conns.get_mut(self.key) {
            c.direct = Some(port);
        }
    }

    /// The connection's `max_bytes_per_s` (protocol v1.1 `throttle`), if it set one: the
    /// writer spaces its writes to stay under it.
    pub(crate) fn byte_rate(&self) -> Option<u64> {
        self.shard.core.borrow().byte_rate(self.key)
    }

    /// Counts a socket flush (one per writer wake-up that wrote something).
    pub(crate) fn flushed(&self) {
        self.shard.core.borrow_mut().stats.flushes += 1;
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        // `try_`: a guard dropped while the shard's state is borrowed (only possible while
        // a panic unwinds the shard loop) must not panic again; the state dies with it.
        if let Ok(mut core) = self.shard.core.try_borrow_mut() {
            core.remove_conn(self.key);
        }
        self.shard.inbox.connections.fetch_sub(1, Ordering::Relaxed);
    }
}
