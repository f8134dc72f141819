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
///
/// The delay is the larger of the configured one and the shard's load-adaptive one
/// ([`AdaptiveDelay`]), read at every wake-up.
#[derive(Debug)]
pub(crate) struct WritePacer {
    delay: Duration,
    last_write: Option<tokio::time::Instant>,
    holding: bool,
}

impl WritePacer {
    /// A pacer for `delay` (zero: write at every wake-up, unless the shard adds one).
    pub(crate) fn new(delay: Duration) -> WritePacer {
        WritePacer { delay, last_write: None, holding: false }
    }

    /// The writer was woken. `Some(until)`: hold the write until then (arm a timer and
    /// call [`WritePacer::release`] when it fires or `kill` fires); `None`: write now.
    /// `adaptive`: the shard's current load-adaptive delay.
    pub(crate) fn on_wake(&mut self, now: tokio::time::Instant, adaptive: Duration) -> Option<tokio::time::Instant> {
        let delay = self.delay.max(adaptive);
        let due = self.last_write.map(|t| t + delay);
        if let Some(due) = due.filter(|d| !self.holding && *d > now) {
            self.holding = true;
            return Some(due);
        }
        self.holding = false;
        None
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
        self.last_write = Some(now);
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

/// The shard's load-adaptive write delay (`engine.adaptive_write_delay_max_us`): when the
/// shard's thread wants more CPU than it gets, every connection's writes are coalesced over
/// a longer delay, so a saturated shard makes fewer, larger writes and its latency grows by
/// at most the delay instead of its backlogs growing without bound.
///
/// Judged every stats flush (100 ms) from the thread's demand: its CPU time plus its time
/// waiting for a CPU, over the wall time. Above [`AdaptiveDelay::HIGH`] the delay doubles
/// (from [`AdaptiveDelay::STEP`]) up to the maximum; below [`AdaptiveDelay::LOW`] it halves,
/// to zero under one step. The gap between the two keeps it from flapping.
#[derive(Debug)]
pub(crate) struct AdaptiveDelay {
    current: Duration,
    max: Duration,
}

impl AdaptiveDelay {
    /// Demand above which the delay grows.
    pub(crate) const HIGH: f64 = 0.9;
    /// Demand below which the delay shrinks.
    pub(crate) const LOW: f64 = 0.6;
    /// The first step up (and the smallest delay kept on the way down).
    pub(crate) const STEP: Duration = Duration::from_micros(250);

    /// No delay yet; at most `max` (zero: never any).
    pub(crate) fn new(max: Duration) -> AdaptiveDelay {
        AdaptiveDelay { current: Duration::ZERO, max }
    }

    /// Takes the demand of the last period; returns the new delay.
    pub(crate) fn update(&mut self, demand: f64) -> Duration {
        if demand > Self::HIGH {
            self.current = (self.current * 2).max(Self::STEP).min(self.max);
        } else if demand < Self::LOW {
            self.current /= 2;
            if self.current < Self::STEP {
                self.current = Duration::ZERO;
            }
        }
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Up by doubling while the shard is saturated, capped; steady in between; down by
    /// halving to zero once it is not.
    #[test]
    fn the_adaptive_delay_follows_the_demand_with_hysteresis() {
        let mut d = AdaptiveDelay::new(Duration::from_millis(2));
        let steps: Vec<u128> =
            [0.95, 0.95, 0.95, 0.95, 0.95, 0.7, 0.5, 0.5, 0.5, 0.5].iter().map(|&x| d.update(x).as_micros()).collect();
        assert_eq!(steps, vec![250, 500, 1000, 2000, 2000, 2000, 1000, 500, 250, 0]);
        let mut off = AdaptiveDelay::new(Duration::ZERO);
        assert_eq!(off.update(1.0), Duration::ZERO);
    }

    /// The pacer holds a write woken within the larger of its own and the shard's delay.
    #[tokio::test(start_paused = true)]
    async fn the_pacer_uses_the_larger_delay() {
        let mut p = WritePacer::new(Duration::ZERO);
        let t0 = tokio::time::Instant::now();
        assert_eq!(p.on_wake(t0, Duration::ZERO), None);
        p.wrote(t0);
        assert_eq!(p.on_wake(t0, Duration::ZERO), None, "no delay: write at once");
        p.wrote(t0);
        assert_eq!(
            p.on_wake(t0 + Duration::from_micros(100), Duration::from_millis(1)),
            Some(t0 + Duration::from_millis(1))
        );
    }
}
