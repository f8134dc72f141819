//! The per-feed log: the feed's epoch, the last sequence number accepted per instrument,
//! and the resume buffer (a bounded ring of the most recent records).
//!
//! One [`FeedLog`] lives in each catalog feed behind an `RwLock`. Sources append to it
//! *before* they push the ticks to the shard queues, so whatever seq a shard has
//! dispatched is already in the log. A shard serving `resume` takes the read lock and
//! copies the records with `after < seq <= upto`, where `upto` is its own last dispatched
//! seq: records the source appended but this shard has not dispatched yet are left for
//! the live path. That is the whole fence: replay and live meet with no duplicate and
//! no hole, without stopping the source.
//!
//! The ring is bounded by record count and by age (ingest time); what falls out of it
//! is remembered per instrument as `evicted_upto`, so "is everything after `n` still
//! here?" is one comparison.

use std::collections::{HashMap, VecDeque};

use tickgate_proto::codec::Record;

/// Resume-buffer bounds of a feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingBounds {
    /// Most records kept (0 disables resume for the feed).
    pub records: usize,
    /// Records older than this (by ingest time) are dropped as new ones arrive.
    pub max_age_ns: i64,
}

impl Default for RingBounds {
    fn default() -> Self {
        RingBounds { records: 100_000, max_age_ns: 300_000_000_000 }
    }
}

/// What a resume request for one instrument can get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Every record after the client's seq is in the buffer (or there is none to send).
    Replay,
    /// Some of them fell out of the buffer, or the epoch changed.
    Unavailable,
}

/// Sequencing state and resume buffer of one feed.
#[derive(Debug)]
pub struct FeedLog {
    epoch: u64,
    last_seq: Vec<u64>,
    evicted_upto: Vec<u64>,
    ring: VecDeque<(u32, Record)>,
    bounds: RingBounds,
}

impl FeedLog {
    /// An empty log for `instruments` instruments.
    pub fn new(instruments: usize, epoch: u64, bounds: RingBounds) -> FeedLog {
        FeedLog {
            epoch,
            last_seq: vec![0; instruments],
            evicted_upto: vec![0; instruments],
            ring: VecDeque::with_capacity(bounds.records.min(4096)),
            bounds,
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last seq appended for an instrument in this epoch (0: none yet).
    pub fn last_seq(&self, instr: u32) -> u64 {
        self.last_seq.get(instr as usize).copied().unwrap_or(0)
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// True when the ring holds nothing.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// The ring's bounds.
    pub fn bounds(&self) -> RingBounds {
        self.bounds
    }

    /// Starts a new epoch: numbering restarts and the buffer is emptied (its records
    /// belong to the old numbering).
    pub fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.last_seq.iter_mut().for_each(|s| *s = 0);
        self.evicted_upto.iter_mut().for_each(|s| *s = 0);
        self.ring.clear();
    }

    /// Makes room for `additional` more records at once (never beyond the bound), so that
    /// a known burst, such as a warm start's window, is not appended through repeated
    /// doublings of the ring, each a copy into fresh memory.
    pub fn reserve(&mut self, additional: usize) {
        let want = (self.ring.len() + additional).min(self.bounds.records);
        self.ring.reserve(want.saturating_sub(self.ring.len()));
    }

    /// Appends a record whose seq is final. The caller has checked it is above
    /// [`FeedLog::last_seq`]; a jump (a source gap) is kept as it is.
    pub fn append(&mut self, instr: u32, rec: Record) {
        let i = instr as usize;
        let (Some(last), Some(evicted)) = (self.last_seq.get_mut(i), self.evicted_upto.get_mut(i)) else {
            return;
        };
        let seq = rec.seq();
        if *last == 0 {
            // Whatever came before the first record this log saw (a publisher continuing
            // its own numbering) was never here.
            *evicted = (*evicted).max(seq.saturating_sub(1));
        }
        *last = seq;
        if self.bounds.records == 0 {
            *evicted = seq;
            return;
        }
        self.ring.push_back((instr, rec));
        let oldest_allowed = rec.ts_recv_ns().saturating_sub(self.bounds.max_age_ns);
        while let Some(&(fi, front)) = self.ring.front() {
            if self.ring.len() <= self.bounds.records && front.ts_recv_ns() >= oldest_allowed {
                break;
            }
            if let Some(e) = self.evicted_upto.get_mut(fi as usize) {
                *e = (*e).max(front.seq());
            }
            self.ring.pop_front();
        }
    }

    /// Declares an instrument's seqs up to `upto` not replayable, as if they had been
    /// evicted: a source that starts from a last value and then a later window (a NATS
    /// edge's warm start) has nothing in between, and a resume from there must get
    /// `replay_unavailable` rather than a replay with a hole in it.
    pub fn mark_evicted(&mut self, instr: u32, upto: u64) {
        if let Some(e) = self.evicted_upto.get_mut(instr as usize) {
            *e = (*e).max(upto);
        }
    }

    /// Whether `seq > after` (up to `upto`) of an instrument can be replayed in `epoch`.
    pub fn availability(&self, epoch: u64, instr: u32, after: u64, upto: u64) -> Availability {
        if epoch != self.epoch {
            return Availability::Unavailable;
        }
        if after >= upto {
            return Availability::Replay;
        }
        match self.evicted_upto.get(instr as usize) {
            Some(&e) if after >= e => Availability::Replay,
            _ => Availability::Unavailable,
        }
    }

    /// Copies, in ingest order, the records of the requested instruments with
    /// `after < seq <= upto` (`wants`: instrument → (after, upto)). One pass over the
    /// ring whatever the number of instruments.
    pub fn collect(&self, wants: &HashMap<u32, (u64, u64)>, out: &mut Vec<(u32, Record)>) {
        if wants.is_empty() {
            return;
        }
        for &(instr, rec) in &self.ring {
            if let Some(&(after, upto)) = wants.get(&instr) {
                let s = rec.seq();
                if s > after && s <= upto {
                    out.push((instr, rec));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickgate_proto::codec::{Body, Quote};

    fn rec(instr: u32, seq: u64, recv: i64) -> Record {
        Record::encode(1, instr + 1, seq, 0, recv, &Body::Quote(Quote::default()), 0)
    }

    #[test]
    fn bounded_by_count_and_remembers_what_fell_out() {
        let mut log = FeedLog::new(2, 1, RingBounds { records: 4, max_age_ns: i64::MAX });
        for s in 1..=3 {
            log.append(0, rec(0, s, 0));
            log.append(1, rec(1, s, 0));
        }
        assert_eq!(log.len(), 4);
        // Both instruments lost seq 1.
        assert_eq!(log.availability(1, 0, 0, 3), Availability::Unavailable);
        assert_eq!(log.availability(1, 0, 1, 3), Availability::Replay);
        assert_eq!(log.availability(1, 1, 1, 3), Availability::Replay);
        assert_eq!(log.availability(1, 1, 0, 3), Availability::Unavailable);
        assert_eq!(log.availability(2, 1, 2, 3), Availability::Unavailable, "other epoch");
        let mut out = Vec::new();
        log.collect(&HashMap::from([(1, (1, 2))]), &mut out);
        assert_eq!(out.iter().map(|(_, r)| r.seq()).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn bounded_by_age() {
        let mut log = FeedLog::new(1, 1, RingBounds { records: 100, max_age_ns: 10 });
        for s in 1..=10 {
            log.append(0, rec(0, s, s as i64 * 5));
        }
        // Newest at 50: everything received before 40 is gone.
        assert_eq!(log.len(), 3);
        assert_eq!(log.availability(1, 0, 7, 10), Availability::Replay);
        assert_eq!(log.availability(1, 0, 6, 10), Availability::Unavailable);
    }

    #[test]
    fn a_log_joining_late_never_claims_earlier_seqs() {
        let mut log = FeedLog::new(1, 1, RingBounds::default());
        log.append(0, rec(0, 500, 0));
        assert_eq!(log.availability(1, 0, 499, 500), Availability::Replay);
        assert_eq!(log.availability(1, 0, 10, 500), Availability::Unavailable);
        log.reset(2);
        assert_eq!(log.last_seq(0), 0);
        assert!(log.is_empty());
        let off = FeedLog::new(1, 1, RingBounds { records: 0, max_age_ns: 0 });
        assert_eq!(off.availability(1, 0, 0, 0), Availability::Replay, "nothing to send");
    }
}
