//! When a connection's writer writes: [`WritePacer`], the write-hold decision in one place,
//! the writer's half (`on_wake`, `wrote`) and the dispatch loop's half (`must_wake`,
//! `flush_at`). It depends on nothing else in the engine, so both the shard's core and
//! the connection-task API (`stream`) can hold one.

use std::time::Duration;

/// When a connection's writer writes: the policy behind `engine.write_delay_us`.
///
/// The writer writes at most once per delay: woken less than a delay after its last
/// write, it holds what came in so it leaves with what arrives meanwhile, in one write.
/// The dispatch loop wakes a writer (`WritePacer::must_wake`) only when its queue
/// starts, and once more when the queue reaches `WritePacer::flush_at`, so a held
/// writer is woken early only for what must not wait: a full batch, a quarter of the
/// slow-consumer budget, or a close (which also fires `kill`).
#[derive(Debug)]
pub(crate) struct WritePacer {
    delay: Duration,
    last_write: Option<tokio::time::Instant>,
    holding: bool,
}

impl WritePacer {
    /// A pacer for `delay` (zero: write at every wake-up).
    pub(crate) fn new(delay: Duration) -> WritePacer {
        WritePacer { delay, last_write: None, holding: false }
    }

    /// The writer was woken. `Some(until)`: hold the write until then (arm a timer and
    /// call [`WritePacer::release`] when it fires or `kill` fires); `None`: write now.
    pub(crate) fn on_wake(&mut self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let due = self.last_write.map(|t| t + self.delay);
        if let Some(due) = due.filter(|d| !self.holding && *d > now) {
            self.holding = true;
            return Some(due);
        }
        self.holding = false;
        None
    }

    /// Whether writes are held at all (`engine.write_delay_us` > 0). When not, the writer
    /// need not tell the pacer anything, and saves the clock reads.
    pub(crate) fn delays(&self) -> bool {
        !self.delay.is_zero()
    }

    /// Whether a write is being held.
    pub(crate) fn holding(&self) -> bool {
        self.holding
    }

    /// The hold ended (its timer, or a termination, which is never held).
    pub(crate) fn release(&mut self) {
        self.holding = false;
    }

    /// The writer wrote and flushed at `now`.
    pub(crate) fn wrote(&mut self, now: tokio::time::Instant) {
        if !self.delay.is_zero() {
            self.last_write = Some(now);
        }
    }

    /// The queue length at which the dispatch loop wakes a writer a second time.
    #[inline]
    pub(crate) fn flush_at(max_batch_bytes: usize, budget: usize) -> usize {
        max_batch_bytes.min(budget / 4)
    }

    /// The dispatch loop's half: wake the writer when the queue starts (`was_empty`) or
    /// when it crosses `flush_at` (`before` → `after` bytes).
    #[inline]
    pub(crate) fn must_wake(was_empty: bool, before: usize, after: usize, flush_at: usize) -> bool {
        was_empty || (before < flush_at && after >= flush_at)
    }
}
