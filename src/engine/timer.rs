//! A hierarchical timing wheel, owned by one shard thread and driven by its loop.
//!
//! Six levels of 64 slots over ticks of `tick_ms` (10 ms by default): level 0 spans 640 ms,
//! level 5 about 22 years. Scheduling and cancelling are O(1): an entry lives in a slab,
//! and a slot holds `(id, generation)` pairs. Cancel just frees the slab entry; the stale
//! pair left in its slot is skipped when the slot is reached, because the generation no
//! longer matches (a reused id has a new generation). Advancing visits each elapsed tick's
//! level-0 slot and, at level boundaries, moves the next window of a higher level down.
//!
//! There is no lock and no shared heap: each shard has its own wheel, and other threads
//! reach it only through the shard's queues.

use slab::Slab;

const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
const LEVELS: usize = 6;
/// The furthest deadline representable, in ticks from now.
const MAX_DELTA: u64 = (1 << (SLOT_BITS as usize * LEVELS)) - 1;

/// Handle to a scheduled entry, for [`TimerWheel::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerId {
    id: u32,
    generation: u32,
}

#[derive(Debug)]
struct Entry<T> {
    deadline: u64,
    generation: u32,
    value: T,
}

/// The wheel. `T` is what a firing entry yields.
#[derive(Debug)]
pub struct TimerWheel<T> {
    tick_ms: u64,
    /// Ticks elapsed since the wheel's origin.
    now: u64,
    slots: Vec<Vec<(u32, u32)>>,
    /// One bit per slot per level: set while the slot holds anything (stale pairs too), so
    /// an advance over empty stretches jumps instead of visiting every tick.
    occupied: [u64; LEVELS],
    entries: Slab<Entry<T>>,
    next_generation: u32,
    /// Cancelled pairs still sitting in slots. When they outnumber the live entries the
    /// slots are compacted, so cancel-heavy use (a client refreshing as often as it may)
    /// cannot grow the wheel's memory without bound between sweeps of a slow level.
    stale: usize,
}

impl<T> TimerWheel<T> {
    /// A wheel with the given tick (resolution), starting at time 0.
    pub fn new(tick_ms: u64) -> TimerWheel<T> {
        TimerWheel {
            tick_ms: tick_ms.max(1),
            now: 0,
            slots: (0..SLOTS * LEVELS).map(|_| Vec::new()).collect(),
            occupied: [0; LEVELS],
            entries: Slab::new(),
            next_generation: 0,
            stale: 0,
        }
    }

    /// Resolution in milliseconds.
    pub fn tick_ms(&self) -> u64 {
        self.tick_ms
    }

    /// Scheduled entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The wheel's current time in milliseconds since its origin (a multiple of the tick).
    pub fn now_ms(&self) -> u64 {
        self.now * self.tick_ms
    }

    /// Schedules `value` to fire at `at_ms` (milliseconds since the wheel's origin). A time
    /// already past fires at the next tick. Deadlines are rounded up to the tick, so an
    /// entry never fires early.
    pub fn schedule(&mut self, at_ms: u64, value: T) -> TimerId {
        let deadline = at_ms.div_ceil(self.tick_ms).max(self.now + 1).min(self.now + MAX_DELTA);
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let id = self.entries.insert(Entry { deadline, generation, value }) as u32;
        self.place(id, generation, deadline);
        TimerId { id, generation }
    }

    /// Cancels an entry; returns its value if it had not fired or been cancelled yet.
    pub fn cancel(&mut self, t: TimerId) -> Option<T> {
        match self.entries.get(t.id as usize) {
            Some(e) if e.generation == t.generation => {
                let value = self.entries.remove(t.id as usize).value;
                self.stale += 1;
                if self.stale > 1024 && self.stale > 2 * self.entries.len() {
                    self.compact();
                }
                Some(value)
            }
            _ => None,
        }
    }

    /// Drops every cancelled pair from the slots. O(slots + pairs), run only when the
    /// stale pairs outnumber the live entries twice over, so amortised O(1) per cancel.
    fn compact(&mut self) {
        let entries = &self.entries;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.retain(|&(id, g)| matches!(entries.get(id as usize), Some(e) if e.generation == g));
            if slot.is_empty() {
                self.occupied[i / SLOTS] &= !(1 << (i % SLOTS));
            }
        }
        self.stale = 0;
    }

    fn place(&mut self, id: u32, generation: u32, deadline: u64) {
        // The level is given by the highest bit in which the deadline differs from now:
        // entries of level L share all bits above level L's window with `now`.
        let diff = (deadline ^ self.now) | 1;
        let bit = 63 - diff.leading_zeros();
        let level = ((bit / SLOT_BITS) as usize).min(LEVELS - 1);
        let slot = ((deadline >> (SLOT_BITS as usize * level)) as usize) & (SLOTS - 1);
        self.slots[level * SLOTS + slot].push((id, generation));
        self.occupied[level] |= 1 << slot;
    }

    fn take_slot(&mut self, level: usize, slot: usize) -> Vec<(u32, u32)> {
        self.occupied[level] &= !(1 << slot);
        std::mem::take(&mut self.slots[level * SLOTS + slot])
    }

    /// Advances to `now_ms`, pushing the values of every entry due by then into `fired`,
    /// in deadline order (entries of one tick in scheduling order).
    pub fn advance(&mut self, now_ms: u64, fired: &mut Vec<T>) {
        let target = now_ms / self.tick_ms;
        while self.now < target {
            if self.entries.is_empty() {
                // Nothing can fire: jump straight to the target.
                self.now = target;
                return;
            }
            if self.occupied[0] == 0 {
                // Nothing at level 0: nothing happens before the next window boundary of
                // the lowest occupied level, so jump to just before it.
                if let Some(level) = (1..LEVELS).find(|&l| self.occupied[l] != 0) {
                    let span = 1u64 << (SLOT_BITS as usize * level);
                    let boundary = (self.now | (span - 1)) + 1;
                    if boundary - 1 > self.now {
                        self.now = (boundary - 1).min(target);
                        continue;
                    }
                }
            }
            self.now += 1;
            let t = self.now;
            // Cascade: at a boundary of level L's window, move that window's slot down.
            for level in 1..LEVELS {
                let shift = SLOT_BITS as usize * level;
                if t & ((1u64 << shift) - 1) != 0 {
                    break;
                }
                let slot = ((t >> shift) as usize) & (SLOTS - 1);
                let moved = self.take_slot(level, slot);
                for (id, generation) in moved {
                    match self.entries.get(id as usize) {
                        Some(e) if e.generation == generation => {
                            let d = e.deadline;
                            self.place(id, generation, d);
                        }
                        _ => self.stale = self.stale.saturating_sub(1),
                    }
                }
            }
            let idx = (t as usize) & (SLOTS - 1);
            let due = self.take_slot(0, idx);
            for (id, generation) in due {
                let live = matches!(self.entries.get(id as usize), Some(e) if e.generation == generation);
                if !live {
                    self.stale = self.stale.saturating_sub(1);
                    continue;
                }
                let deadline = self.entries[id as usize].deadline;
                if deadline <= t {
                    fired.push(self.entries.remove(id as usize).value);
                } else {
                    // Capped far-future entries come back around; place them again.
                    self.place(id, generation, deadline);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_to(w: &mut TimerWheel<u32>, ms: u64) -> Vec<u32> {
        let mut out = Vec::new();
        w.advance(ms, &mut out);
        out
    }

    #[test]
    fn fires_at_the_tick_never_early() {
        let mut w = TimerWheel::new(10);
        w.schedule(25, 1);
        assert!(run_to(&mut w, 29).is_empty());
        assert_eq!(run_to(&mut w, 30), vec![1]);
        assert!(w.is_empty());
    }

    #[test]
    fn cascades_between_levels() {
        let mut w = TimerWheel::new(10);
        // Level 1 (beyond 640 ms), level 2 (beyond 40.96 s) and level 3 (beyond 43 min).
        w.schedule(1_000, 1);
        w.schedule(50_000, 2);
        w.schedule(3_000_000, 3);
        w.schedule(650, 4);
        assert!(run_to(&mut w, 640).is_empty());
        assert_eq!(run_to(&mut w, 650), vec![4]);
        assert!(run_to(&mut w, 990).is_empty());
        assert_eq!(run_to(&mut w, 1_000), vec![1]);
        assert!(run_to(&mut w, 49_990).is_empty());
        assert_eq!(run_to(&mut w, 50_000), vec![2]);
        assert!(run_to(&mut w, 2_999_990).is_empty());
        assert_eq!(run_to(&mut w, 3_000_000), vec![3]);
    }

    #[test]
    fn exact_time_for_every_delta_across_boundaries() {
        // Start at odd offsets so slot and level boundaries fall everywhere.
        for start in [0u64, 7, 63, 64, 4095, 4096, 262_143] {
            let mut w = TimerWheel::new(1);
            assert!(run_to(&mut w, start).is_empty());
            let deltas: Vec<u64> = (1..300).chain([4095, 4096, 4097, 262_143, 262_144, 262_145]).collect();
            for (i, d) in deltas.iter().enumerate() {
                w.schedule(start + d, i as u32);
            }
            let mut now = start;
            let mut seen = 0;
            for (i, d) in deltas.iter().enumerate() {
                let at = start + d;
                if at > now + 1 {
                    assert!(run_to(&mut w, at - 1).is_empty(), "start {start} delta {d} early");
                }
                assert_eq!(run_to(&mut w, at), vec![i as u32], "start {start} delta {d}");
                now = at;
                seen += 1;
            }
            assert_eq!(seen, deltas.len());
            assert!(w.is_empty());
        }
    }

    #[test]
    fn cancel_and_reschedule() {
        let mut w = TimerWheel::new(10);
        let a = w.schedule(100, 1);
        let b = w.schedule(100, 2);
        assert_eq!(w.cancel(a), Some(1));
        assert_eq!(w.cancel(a), None, "double cancel");
        // The freed id is reused with a new generation: the stale handle cannot touch it.
        let c = w.schedule(200, 3);
        assert_eq!(w.cancel(a), None);
        assert_eq!(run_to(&mut w, 100), vec![2]);
        assert_eq!(w.cancel(b), None, "already fired");
        let c2 = w.schedule(150, 4);
        assert_eq!(w.cancel(c), Some(3));
        assert_eq!(run_to(&mut w, 1_000), vec![4]);
        assert_eq!(w.cancel(c2), None);
        assert!(w.is_empty());
    }

    #[test]
    fn many_entries_in_one_slot_and_past_deadlines() {
        let mut w = TimerWheel::new(10);
        for i in 0..10_000 {
            w.schedule(500, i);
        }
        w.schedule(0, 99_999);
        assert_eq!(run_to(&mut w, 10), vec![99_999], "a past deadline fires at the next tick");
        let fired = run_to(&mut w, 500);
        assert_eq!(fired.len(), 10_000);
        assert_eq!(fired[..3], [0, 1, 2], "scheduling order within a tick");
    }

    #[test]
    fn far_future_is_capped_not_lost() {
        let mut w = TimerWheel::new(1);
        w.schedule(u64::MAX / 2, 1);
        w.schedule(1, 2);
        assert_eq!(run_to(&mut w, 1), vec![2]);
        assert_eq!(w.len(), 1);
        // Jumping far ahead in one call fires it once its (capped) deadline passes.
        assert_eq!(run_to(&mut w, MAX_DELTA + 1), vec![1]);
    }

    #[test]
    fn matches_a_reference_model_under_random_operations() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(42);
        let mut w = TimerWheel::new(10);
        // Reference: value -> deadline tick; the wheel must fire each value exactly at
        // its deadline tick (rounded up), never earlier, never twice.
        let mut live: std::collections::HashMap<u32, (u64, TimerId)> = std::collections::HashMap::new();
        let mut now_ms = 0u64;
        for v in 0..20_000u32 {
            match rng.random_range(0..10) {
                0..=5 => {
                    let delta = match rng.random_range(0..4) {
                        0 => rng.random_range(0..700),
                        1 => rng.random_range(0..50_000),
                        2 => rng.random_range(0..5_000_000),
                        _ => rng.random_range(0..100),
                    };
                    let at = now_ms + delta;
                    let id = w.schedule(at, v);
                    live.insert(v, (at.div_ceil(10).max(now_ms / 10 + 1), id));
                }
                6 => {
                    if let Some(&k) = live.keys().next() {
                        let (_, id) = live.remove(&k).expect("present");
                        assert_eq!(w.cancel(id), Some(k));
                    }
                }
                _ => {
                    now_ms += rng.random_range(0..3_000);
                    let mut fired = Vec::new();
                    w.advance(now_ms, &mut fired);
                    for f in fired {
                        let (tick, _) = live.remove(&f).expect("fired once, and only if live");
                        assert!(tick <= now_ms / 10, "fired early");
                    }
                    assert!(live.values().all(|(tick, _)| *tick > now_ms / 10), "an entry is overdue");
                }
            }
            assert_eq!(w.len(), live.len());
        }
    }

    #[test]
    fn cancelled_pairs_do_not_accumulate() {
        let mut w = TimerWheel::new(10);
        let keep = w.schedule(3_600_000, 0u32);
        // A client refreshing over and over: each refresh cancels a far deadline.
        for i in 0..100_000u32 {
            let id = w.schedule(3_000_000 + u64::from(i), i);
            assert_eq!(w.cancel(id), Some(i));
        }
        let pairs: usize = w.slots.iter().map(Vec::len).sum();
        assert!(pairs <= 2 * 1024 + 2, "{pairs} pairs held for 1 live entry");
        assert_eq!(w.len(), 1);
        let mut fired = Vec::new();
        w.advance(3_600_000, &mut fired);
        assert_eq!(fired, vec![0]);
        assert_eq!(w.cancel(keep), None);
    }

    #[test]
    fn idle_wheel_jumps() {
        let mut w: TimerWheel<u32> = TimerWheel::new(10);
        assert!(run_to(&mut w, 1_000_000_000).is_empty());
        assert_eq!(w.now_ms(), 1_000_000_000);
        w.schedule(1_000_000_050, 7);
        assert_eq!(run_to(&mut w, 1_000_000_050), vec![7]);
    }
}
