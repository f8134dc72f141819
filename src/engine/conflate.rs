//! Conflation state of one connection that fell behind on a `conflate` feed.
//!
//! While a connection is conflating, records of its conflate feeds are not queued: per
//! instrument the shard keeps the latest quote and the range of trades that were dropped.
//! When the writer has drained the queue below the low-water mark, [`Conflation::drain`]
//! says what to send, per instrument in seq order:
//!
//! - a `gap` (reason `slow_consumer`) naming every dropped seq before the quote, when a
//!   trade is among them (skipped quotes alone need no gap: the quote's CONFLATED flag
//!   says earlier quotes were skipped);
//! - the latest quote, flagged CONFLATED when earlier records of the instrument were
//!   skipped;
//! - a `gap` for the trades that came after that quote.
//!
//! So the client sees every seq, a gap naming it, or a CONFLATED quote standing for the
//! quotes it replaced, never a silent hole. State is one small entry per instrument the
//! connection is subscribed to, so it is bounded by the subscription limit.

use std::collections::BTreeMap;

use tickgate_proto::codec::{Record, RTYPE_TRADE};

#[derive(Debug, Clone, Copy)]
struct Pending {
    first_missing: u64,
    first_trade: u64,
    last_trade: u64,
    quote: Option<Record>,
}

/// What to send for one instrument when conflation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Emit {
    /// A `gap` message `from..=to`, reason `slow_consumer`.
    Gap {
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
    /// The latest quote; `conflated` when earlier records were skipped.
    Quote {
        /// The record.
        record: Record,
        /// Whether to set the CONFLATED flag.
        conflated: bool,
    },
}

/// Per-connection conflation state.
#[derive(Debug, Default)]
pub(crate) struct Conflation {
    pending: BTreeMap<(u16, u32), Pending>,
}

impl Conflation {
    /// Takes a record the connection could not be sent now; the connection expects
    /// `expected` next (below the record's seq when a throttle skipped quotes before it).
    pub(crate) fn absorb_after(&mut self, feed_idx: u16, instr: u32, expected: u64, rec: &Record) {
        let seq = rec.seq();
        let p = self.entry(feed_idx, instr, expected.min(seq));
        if rec.rtype() == RTYPE_TRADE {
            if p.first_trade == 0 {
                p.first_trade = seq;
            }
            p.last_trade = seq;
        } else {
            p.quote = Some(*rec);
        }
    }

    /// Takes a range `expected..=to` the connection will not be sent (a throttled
    /// subscription's `gap`): like dropped trades, it is named by a `gap` at the end.
    pub(crate) fn absorb_gap(&mut self, feed_idx: u16, instr: u32, expected: u64, to: u64) {
        let p = self.entry(feed_idx, instr, expected);
        if p.first_trade == 0 {
            p.first_trade = expected;
        }
        p.last_trade = p.last_trade.max(to);
    }

    fn entry(&mut self, feed_idx: u16, instr: u32, first_missing: u64) -> &mut Pending {
        self.pending.entry((feed_idx, instr)).or_insert(Pending {
            first_missing,
            first_trade: 0,
            last_trade: 0,
            quote: None,
        })
    }

    /// Whether something is pending for an instrument.
    pub(crate) fn has(&self, feed_idx: u16, instr: u32) -> bool {
        self.pending.contains_key(&(feed_idx, instr))
    }

    /// Forgets an instrument (unsubscribed).
    pub(crate) fn forget(&mut self, feed_idx: u16, instr: u32) {
        self.pending.remove(&(feed_idx, instr));
    }

    /// Forgets a feed (its epoch was reset: the pending seqs mean nothing any more).
    pub(crate) fn forget_feed(&mut self, feed_idx: u16) {
        self.pending.retain(|(f, _), _| *f != feed_idx);
    }

    /// What to send, in instrument order, each instrument's items in seq order.
    pub(crate) fn drain(self) -> Vec<(u16, u32, Emit)> {
        let mut out = Vec::with_capacity(self.pending.len() * 2);
        for ((f, i), p) in self.pending {
            match p.quote {
                Some(q) => {
                    let qs = q.seq();
                    if p.first_trade != 0 && p.first_trade < qs {
                        out.push((f, i, Emit::Gap { from: p.first_missing, to: qs - 1 }));
                    }
                    out.push((f, i, Emit::Quote { record: q, conflated: qs > p.first_missing }));
                    if p.last_trade > qs {
                        out.push((f, i, Emit::Gap { from: qs + 1, to: p.last_trade }));
                    }
                }
                None => out.push((f, i, Emit::Gap { from: p.first_missing, to: p.last_trade })),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{quote, trade};
    use super::*;

    fn run(recs: &[Record]) -> Vec<Emit> {
        let mut c = Conflation::default();
        for r in recs {
            c.absorb_after(0, 0, r.seq(), r);
        }
        c.drain().into_iter().map(|(_, _, e)| e).collect()
    }

    #[test]
    fn quotes_only_become_one_conflated_quote() {
        let q = quote(12);
        assert_eq!(run(&[quote(10), quote(11), q]), vec![Emit::Quote { record: q, conflated: true }]);
        let q = quote(5);
        assert_eq!(run(&[q]), vec![Emit::Quote { record: q, conflated: false }]);
    }

    #[test]
    fn trades_become_gaps_around_the_latest_quote() {
        let q = quote(12);
        assert_eq!(
            run(&[trade(10), quote(11), q, trade(13), trade(14)]),
            vec![
                Emit::Gap { from: 10, to: 11 },
                Emit::Quote { record: q, conflated: true },
                Emit::Gap { from: 13, to: 14 }
            ]
        );
        assert_eq!(run(&[trade(7), trade(8)]), vec![Emit::Gap { from: 7, to: 8 }]);
        let q = quote(20);
        assert_eq!(
            run(&[q, trade(21)]),
            vec![Emit::Quote { record: q, conflated: false }, Emit::Gap { from: 21, to: 21 }]
        );
    }
}
