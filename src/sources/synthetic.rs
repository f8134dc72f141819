//! The synthetic source: a seeded random walk of top-of-book quotes with trades printed
//! inside the spread, in lots of 100, at a fixed open-loop rate.
//!
//! Each tick's `ts_event_ns` is its *scheduled* time (start + k / rate), not the time it
//! was actually generated, so a load generator measuring `receive - ts_event_ns` sees
//! every stall (no coordinated omission).

use std::time::Duration;

use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::engine::{Ingest, Tick};
use crate::feeds::SyntheticDef;
use tickgate_proto::codec::{Body, Quote, Record, Trade, FIXED_SCALE};
use tickgate_proto::now_ns;

/// Price increment: one cent.
const TICK: i64 = FIXED_SCALE / 100;
/// Size increment: one lot of 100 shares.
const LOT: u64 = 100 * FIXED_SCALE as u64;
/// Most ticks generated in one wake-up, so a stalled generator catches up in bounded steps.
const MAX_BURST: u64 = 50_000;

struct Book {
    bid: i64,
    ask: i64,
    seq: u64,
}

/// A deterministic tick generator for one feed: the same seed yields the same bodies in
/// the same order, whatever the rate or the machine.
pub(crate) struct Generator {
    rng: ChaCha8Rng,
    books: Vec<Book>,
    quote_ratio: f64,
    feed_idx: usize,
    feed_id: u16,
}

impl Generator {
    /// A generator for `instruments` instruments.
    pub(crate) fn new(def: &SyntheticDef, feed_idx: usize, feed_id: u16, instruments: usize) -> Generator {
        let mut rng = ChaCha8Rng::seed_from_u64(def.seed);
        let start = (def.start_price * FIXED_SCALE as f64) as i64;
        let start = start - start % TICK;
        let books = (0..instruments)
            .map(|_| {
                // Spread the instruments' prices out so they are told apart at a glance.
                let mid = (start + rng.random_range(-2000..=2000) * TICK).max(10 * TICK);
                Book { bid: mid - TICK, ask: mid + TICK, seq: 0 }
            })
            .collect();
        Generator { rng, books, quote_ratio: def.quote_ratio, feed_idx, feed_id }
    }

    /// Produces the next tick, stamped with the given times.
    pub(crate) fn next_tick(&mut self, ts_event_ns: i64, ts_recv_ns: i64) -> Tick {
        let i = self.rng.random_range(0..self.books.len());
        let rng = &mut self.rng;
        let book = &mut self.books[i];
        let body = if rng.random_bool(self.quote_ratio) {
            // Walk the mid by at most one tick and redraw a 1-3 tick spread.
            let mid2 = book.bid + book.ask; // twice the mid, stays integral
            let step = rng.random_range(-1i64..=1) * 2 * TICK;
            let mid2 = (mid2 + step).max(20 * TICK);
            let half = rng.random_range(1i64..=3) * TICK;
            let bid = (mid2 / 2 - half / 2) / TICK * TICK;
            let ask = (bid + half).max(bid + TICK);
            book.bid = bid;
            book.ask = ask;
            Body::Quote(Quote {
                bid_px: bid,
                bid_sz: rng.random_range(1u64..=20) * LOT,
                ask_px: ask,
                ask_sz: rng.random_range(1u64..=20) * LOT,
            })
        } else {
            let ticks = ((book.ask - book.bid) / TICK).max(0);
            let price = book.bid + rng.random_range(0..=ticks) * TICK;
            let side = if price * 2 >= book.bid + book.ask { 1 } else { 2 };
            Body::Trade(Trade { price, size: rng.random_range(1u64..=10) * LOT, side })
        };
        book.seq += 1;
        let instr = i as u32;
        Tick {
            feed_idx: self.feed_idx as u16,
            instr,
            record: Record::encode(
                self.feed_id,
                crate::feeds::Feed::instrument_id(instr),
                book.seq,
                ts_event_ns,
                ts_recv_ns,
                &body,
                0,
            ),
        }
    }
}

/// Runs a synthetic feed until `cancel` fires. `lag` receives, once per burst, how late the
/// oldest tick of the burst is against its schedule.
pub(crate) async fn run(
    def: SyntheticDef,
    mut generator: Generator,
    ingest: Ingest,
    lag: prometheus::Histogram,
    cancel: CancellationToken,
) {
    let start = tokio::time::Instant::now();
    let start_wall = now_ns() as i64;
    let period_ns = 1e9 / def.rate_per_s;
    let mut emitted: u64 = 0;
    let mut burst: Vec<Tick> = Vec::new();
    loop {
        // Checked every round: a generator that is behind schedule never sleeps, and must
        // still stop promptly when asked.
        if cancel.is_cancelled() {
            return;
        }
        let elapsed = start.elapsed().as_nanos() as f64;
        let due = ((elapsed / period_ns) as u64).saturating_sub(emitted).min(MAX_BURST);
        if due == 0 {
            let next_at = start + Duration::from_nanos(((emitted + 1) as f64 * period_ns) as u64);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next_at) => continue,
            }
        }
        let recv = now_ns() as i64;
        let oldest = start_wall + ((emitted + 1) as f64 * period_ns) as i64;
        lag.observe((recv - oldest).max(0) as f64 / 1e9);
        burst.clear();
        for _ in 0..due {
            emitted += 1;
            let scheduled = start_wall + (emitted as f64 * period_ns) as i64;
            burst.push(generator.next_tick(scheduled, recv));
        }
        // One log lock per burst; the ticks then go to the shard queues.
        if !ingest.publish_burst(&burst, &cancel).await {
            return;
        }
        ingest.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickgate_proto::codec::{Body, RTYPE_QUOTE, RTYPE_TRADE};

    fn def() -> SyntheticDef {
        SyntheticDef { seed: 7, rate_per_s: 1000.0, quote_ratio: 0.6, start_price: 50.0 }
    }

    #[test]
    fn same_seed_same_ticks_and_plausible_values() {
        let mut a = Generator::new(&def(), 0, 1, 5);
        let mut b = Generator::new(&def(), 0, 1, 5);
        let mut seqs = [0u64; 5];
        let mut bids = [0i64; 5];
        let mut asks = [0i64; 5];
        let (mut trades, mut quotes) = (0, 0);
        for k in 0..10_000 {
            let ta = a.next_tick(k, k);
            let tb = b.next_tick(k, k);
            assert_eq!(ta.record.as_bytes(), tb.record.as_bytes());
            let i = ta.instr as usize;
            seqs[i] += 1;
            assert_eq!(ta.record.seq(), seqs[i], "seq per instrument is 1, 2, 3, ...");
            match ta.record.body() {
                Body::Quote(q) => {
                    quotes += 1;
                    assert_eq!(ta.record.rtype(), RTYPE_QUOTE);
                    assert!(q.bid_px < q.ask_px, "crossed book");
                    assert_eq!(q.bid_sz % LOT, 0);
                    bids[i] = q.bid_px;
                    asks[i] = q.ask_px;
                }
                Body::Trade(t) => {
                    trades += 1;
                    assert_eq!(ta.record.rtype(), RTYPE_TRADE);
                    if bids[i] > 0 {
                        assert!(t.price >= bids[i] && t.price <= asks[i], "trade outside the spread");
                    }
                    assert_eq!(t.size % LOT, 0);
                    assert!(t.side == 1 || t.side == 2);
                }
            }
        }
        assert!(quotes > 5000 && trades > 3000, "quotes {quotes} trades {trades}");
    }
}
