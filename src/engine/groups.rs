//! The state of throttled subscriptions (protocol v1.1 `max_rate`), without the shard it
//! lives in: [`Group`] (an instrument's subscribers at one rate, what they are owed, the
//! update plan), [`Throttles`] (a shard's groups, where each instrument's are, when each
//! is due) and the range checks of `max_rate` and `max_bytes_per_s`. How the shard feeds
//! and flushes them is `super::throttle`.
//!
//! An update, in seq order (what [`Group::plan`] plans):
//! - the held trades (and `gap`s of the source, reason `source_gap`), each with its own seq;
//! - the latest quote at its place in seq order (its `replaced` says which quotes it stood
//!   for, so a member that was not sent them gets it flagged CONFLATED);
//! - trades past the bound as one `gap` (reason `throttled`), split around the quote.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

// tokio's Instant follows the runtime's clock, so tests can drive intervals with paused time.
use tokio::time::Instant;

use super::stats::GapReason;
use tickgate_proto::codec::{Record, RTYPE_TRADE};

/// Key of a group in the shard's slab.
pub(super) type GroupId = usize;

/// Most members of one group. An instrument's subscribers at one rate beyond it form more
/// groups, whose updates are spread over the interval (see [`Throttles::join`]): one flush
/// writes at most this many connections, so the last of them waits a fraction of what it
/// would behind all of them.
pub(super) const MAX_GROUP_MEMBERS: usize = 256;

/// Phases per interval that groups of one instrument and rate are spread over.
const PHASES: u32 = 4;

/// Lowest and highest `max_rate` accepted (updates per second per instrument).
pub(crate) const RATE_RANGE: (f64, f64) = (0.01, 1000.0);

/// Lowest and highest `max_bytes_per_s` accepted (besides 0, no cap).
pub(crate) const BYTE_RATE_RANGE: (u64, u64) = (1024, 1 << 40);

/// The interval of a `max_rate`: `None` for 0 (not throttled).
pub(crate) fn interval_of(rate: f64) -> Result<Option<Duration>, String> {
    if rate == 0.0 {
        return Ok(None);
    }
    if !(RATE_RANGE.0..=RATE_RANGE.1).contains(&rate) {
        return Err(format!(
            "`max_rate` must be 0 (not throttled) or between {} and {} updates per second",
            RATE_RANGE.0, RATE_RANGE.1
        ));
    }
    Ok(Some(Duration::from_secs_f64(1.0 / rate)))
}

/// A `max_bytes_per_s`: `None` for 0 (no cap).
pub(crate) fn byte_rate_of(n: u64) -> Result<Option<u64>, String> {
    match n {
        0 => Ok(None),
        n if (BYTE_RATE_RANGE.0..=BYTE_RATE_RANGE.1).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "`max_bytes_per_s` must be 0 (no cap) or between {} and {}",
            BYTE_RATE_RANGE.0, BYTE_RATE_RANGE.1
        )),
    }
}

/// A subscriber of a group.
#[derive(Debug, Clone, Copy)]
pub(super) struct Member {
    /// The connection (its `core::ConnKey`).
    pub(super) key: usize,
    /// The next seq this member expects: what the group planned below it, the member has
    /// (or must not get, having resumed ahead).
    pub(super) cursor: u64,
}

/// What a group holds between updates, besides the latest quote.
#[derive(Debug, Clone, Copy)]
enum Held {
    Trade(Record),
    /// Seqs `from..=to` the source never delivered.
    SourceGap {
        from: u64,
        to: u64,
    },
}

/// One item of an update plan.
#[derive(Debug, Clone, Copy)]
pub(super) enum Item {
    /// A record; `replaced` is the seq of the last quote it replaced (0: none).
    Record { rec: Record, replaced: u64 },
    /// A `gap` from the member's cursor up to `to`.
    Gap { to: u64, reason: GapReason },
}

/// The subscribers of one instrument at one rate, and what they are owed.
#[derive(Debug)]
pub(super) struct Group {
    pub(super) feed: u16,
    pub(super) instr: u32,
    pub(super) interval: Duration,
    /// Unique per shard (slab keys are reused): due-heap entries name it.
    pub(super) serial: u64,
    /// The earliest moment of the next update.
    pub(super) next_due: Instant,
    /// Has an entry in the due heap (something is held for the next update).
    pub(super) scheduled: bool,
    held: Vec<Held>,
    quote: Option<Record>,
    /// Seq of the last quote the held quote replaced (0: none).
    replaced: u64,
    /// Trades (and source gaps) past the bound: one range, named by a `gap`.
    overflow: Option<(u64, u64)>,
    pub(super) members: Vec<Member>,
}

impl Group {
    pub(super) fn is_idle(&self) -> bool {
        self.held.is_empty() && self.quote.is_none() && self.overflow.is_none()
    }

    /// Holds a record for the next update; true when it replaced a held quote.
    pub(super) fn absorb(&mut self, rec: &Record, max_held: usize) -> bool {
        let seq = rec.seq();
        if rec.rtype() != RTYPE_TRADE {
            let old = self.quote.replace(*rec);
            if let Some(q) = old {
                self.replaced = q.seq();
            }
            return old.is_some();
        }
        match &mut self.overflow {
            Some((_, to)) => *to = seq,
            None if self.held.len() >= max_held => self.overflow = Some((seq, seq)),
            None => self.held.push(Held::Trade(*rec)),
        }
        false
    }

    /// Holds a source gap `from..=to` (the record after it follows at once).
    pub(super) fn absorb_gap(&mut self, from: u64, to: u64, max_held: usize) {
        match &mut self.overflow {
            Some((_, t)) => *t = to,
            None if self.held.len() >= max_held => self.overflow = Some((from, to)),
            None => self.held.push(Held::SourceGap { from, to }),
        }
    }

    /// The update of what is held, in seq order (see the module doc). `take`: forget it.
    pub(super) fn plan(&mut self, out: &mut Vec<Item>, take: bool) {
        out.clear();
        let mut quote = self.quote;
        let replaced = self.replaced;
        let quote_before = |out: &mut Vec<Item>, seq: u64, quote: &mut Option<Record>| {
            if let Some(q) = quote.filter(|q| q.seq() < seq) {
                out.push(Item::Record { rec: q, replaced });
                *quote = None;
            }
        };
        for h in &self.held {
            match *h {
                Held::Trade(r) => {
                    quote_before(out, r.seq(), &mut quote);
                    out.push(Item::Record { rec: r, replaced: 0 });
                }
                Held::SourceGap { from, to } => {
                    quote_before(out, from, &mut quote);
                    out.push(Item::Gap { to, reason: GapReason::SourceGap });
                }
            }
        }
        if let Some((from, to)) = self.overflow {
            quote_before(out, from, &mut quote);
            if let Some(q) = quote.filter(|q| q.seq() < to) {
                out.push(Item::Gap { to: q.seq() - 1, reason: GapReason::Throttled });
                out.push(Item::Record { rec: q, replaced });
                quote = None;
            }
            out.push(Item::Gap { to, reason: GapReason::Throttled });
        }
        if let Some(q) = quote {
            out.push(Item::Record { rec: q, replaced });
        }
        if take {
            self.held.clear();
            self.quote = None;
            self.replaced = 0;
            self.overflow = None;
        }
    }
}

/// The shard's throttled subscriptions: the groups, where each instrument's are, and when
/// each group's next update is due.
#[derive(Debug)]
pub(super) struct Throttles {
    pub(super) groups: slab::Slab<Group>,
    /// `by_instr[feed][instrument]` → the instrument's groups (per rate asked, as many as
    /// `MAX_GROUP_MEMBERS` makes).
    pub(super) by_instr: Vec<Vec<Vec<GroupId>>>,
    /// Groups holding something, by due time (entries of removed or already flushed
    /// groups are skipped when they come up: the serial and `scheduled` tell).
    pub(super) due: BinaryHeap<Reverse<(Instant, GroupId, u64)>>,
    next_serial: u64,
    /// Reused for every update plan.
    pub(super) plan: Vec<Item>,
    /// Trades one update carries at most.
    pub(super) max_held: usize,
}

impl Throttles {
    /// No throttled subscription yet, for feeds of these instrument counts.
    pub(super) fn new(instruments: impl Iterator<Item = usize>, max_held: usize) -> Throttles {
        Throttles {
            groups: slab::Slab::new(),
            by_instr: instruments.map(|n| vec![Vec::new(); n]).collect(),
            due: BinaryHeap::new(),
            next_serial: 0,
            plan: Vec::new(),
            max_held: max_held.max(1),
        }
    }

    /// Whether an instrument has throttled subscribers on this shard (the dispatch loop's
    /// one test for the common case).
    #[inline]
    pub(super) fn has(&self, f: usize, i: usize) -> bool {
        self.groups_of(f, i) != 0
    }

    /// Groups of the instrument.
    pub(super) fn groups_of(&self, f: usize, i: usize) -> usize {
        self.by_instr.get(f).and_then(|v| v.get(i)).map_or(0, Vec::len)
    }

    /// When the next update is due, if anything is held.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((t, _, _))| *t)
    }

    pub(super) fn schedule(&mut self, gid: GroupId) {
        let Some(g) = self.groups.get_mut(gid) else { return };
        if !g.scheduled {
            g.scheduled = true;
            self.due.push(Reverse((g.next_due, gid, g.serial)));
        }
    }

    /// Adds a member to a group of the instrument at this interval with room for it (made
    /// when missing, with its first update due at `first_due`); returns the group and the
    /// member's position in it. The k-th group of an instrument and interval starts
    /// `k mod PHASES` quarters of an interval later, so the groups' updates (and their
    /// writes) are spread over the interval instead of coming all at once.
    pub(super) fn join(
        &mut self,
        key: usize,
        (f, i): (u16, u32),
        interval: Duration,
        cursor: u64,
        first_due: Instant,
    ) -> (GroupId, u32) {
        let list = &mut self.by_instr[f as usize][i as usize];
        let same = list.iter().filter(|&&g| self.groups[g].interval == interval).count() as u32;
        let room = list.iter().copied().find(|&g| {
            let g = &self.groups[g];
            g.interval == interval && g.members.len() < MAX_GROUP_MEMBERS
        });
        let gid = match room {
            Some(g) => g,
            None => {
                let first_due = first_due + interval * (same % PHASES) / PHASES;
                self.next_serial += 1;
                let g = self.groups.insert(Group {
                    feed: f,
                    instr: i,
                    interval,
                    serial: self.next_serial,
                    next_due: first_due,
                    scheduled: false,
                    held: Vec::new(),
                    quote: None,
                    replaced: 0,
                    overflow: None,
                    members: Vec::new(),
                });
                list.push(g);
                g
            }
        };
        let members = &mut self.groups[gid].members;
        members.push(Member { key, cursor });
        (gid, (members.len() - 1) as u32)
    }

    /// Removes the member at `pos` of group `gid`; returns the member moved into its place
    /// (whose position is now `pos`) and the removed member. An empty group is dropped.
    pub(super) fn leave(&mut self, gid: GroupId, pos: u32) -> (Option<usize>, Option<Member>) {
        let Some(g) = self.groups.get_mut(gid) else { return (None, None) };
        let pos = pos as usize;
        if pos >= g.members.len() {
            return (None, None);
        }
        let gone = g.members.swap_remove(pos);
        let moved = g.members.get(pos).map(|m| m.key);
        if g.members.is_empty() {
            let (f, i) = (g.feed as usize, g.instr as usize);
            self.groups.remove(gid);
            self.by_instr[f][i].retain(|&x| x != gid);
        }
        (moved, Some(gone))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{quote, trade};
    use super::*;

    fn group() -> Group {
        let mut t = Throttles::new([1].into_iter(), 2);
        let (gid, _) = t.join(0, (0, 0), Duration::from_millis(50), 1, Instant::now());
        t.groups.remove(gid)
    }

    /// What a plan says, as (seq or -to for gaps, replaced).
    fn shape(g: &mut Group) -> Vec<(i64, u64)> {
        let mut out = Vec::new();
        g.plan(&mut out, true);
        out.iter()
            .map(|i| match *i {
                Item::Record { rec, replaced } => (rec.seq() as i64, replaced),
                Item::Gap { to, .. } => (-(to as i64), 0),
            })
            .collect()
    }

    /// Trades in order with the latest quote at its place; replaced quotes are not planned.
    #[test]
    fn an_update_is_the_trades_and_the_latest_quote_in_seq_order() {
        let mut g = group();
        for r in [quote(1), trade(2), quote(3), quote(4)] {
            g.absorb(&r, 2);
        }
        assert_eq!(shape(&mut g), vec![(2, 0), (4, 3)]);
        assert!(g.is_idle());
        g.absorb(&quote(5), 2);
        g.absorb(&trade(6), 2);
        assert_eq!(shape(&mut g), vec![(5, 0), (6, 0)]);
    }

    /// Trades past the bound become one `gap`, split around a quote that falls inside it.
    #[test]
    fn trades_past_the_bound_become_a_gap_around_the_quote() {
        let mut g = group();
        for r in [trade(1), trade(2), trade(3), quote(4), trade(5)] {
            g.absorb(&r, 2);
        }
        assert_eq!(shape(&mut g), vec![(1, 0), (2, 0), (-3, 0), (4, 0), (-5, 0)]);
        for r in [trade(6), trade(7), trade(8), trade(9), quote(10)] {
            g.absorb(&r, 2);
        }
        assert_eq!(shape(&mut g), vec![(6, 0), (7, 0), (-9, 0), (10, 0)]);
        g.absorb_gap(11, 12, 2);
        g.absorb(&trade(13), 2);
        assert_eq!(shape(&mut g), vec![(-12, 0), (13, 0)]);
    }

    #[test]
    fn rates_and_byte_rates_are_checked() {
        assert_eq!(interval_of(0.0), Ok(None));
        assert_eq!(interval_of(20.0), Ok(Some(Duration::from_millis(50))));
        assert!(interval_of(0.001).is_err() && interval_of(1000.5).is_err() && interval_of(-1.0).is_err());
        assert_eq!(byte_rate_of(0), Ok(None));
        assert_eq!(byte_rate_of(4096), Ok(Some(4096)));
        assert!(byte_rate_of(10).is_err());
    }
}
