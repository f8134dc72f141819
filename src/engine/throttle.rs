//! Throttled subscriptions (protocol v1.1 `max_rate`): at most one update per interval per
//! instrument, carrying the latest quote and the trades since the previous update.
//!
//! Subscribers of one instrument that asked for the same rate share a group
//! (`super::groups`, the state; this module is how the shard feeds and flushes it): a tick is
//! absorbed once per group (not once per subscriber), and when the group's interval has
//! passed, one update plan is built and queued to every member. What the shard keeps per
//! group is bounded: at most `limits.max_trades_per_update` trades (and source gaps), the
//! latest quote, and one range of trades dropped past that bound.
//!
//! What an update holds and in which order is `Group::plan`'s (see `super::groups`).
//! Replaced quotes are never named: any record that follows seqs the member was not sent
//! (and that no `gap` named) carries CONFLATED, which says exactly that those seqs were
//! quotes replaced by later ones. A trade is never skipped without a `gap` naming it.
//!
//! The first tick after a quiet interval goes out at once (the update is due; a group past
//! an instrument's first 256 subscribers at that rate starts up to three quarters of an
//! interval later); later ones wait for the interval's end, so the lag a throttle adds is at
//! most one interval.
//! Members differ only in where they start (`Member::cursor`: a member that joined within
//! the interval, or resumed ahead of this node, skips what it must not get twice).

use std::cmp::Reverse;
use std::time::Duration;

// tokio's Instant follows the runtime's clock, so tests can drive intervals with paused time.
use tokio::time::Instant;

use super::core::{gap_json, ConnKey, ShardCore, Sub};
use super::groups::{GroupId, Item, Member};
use tickgate_proto::codec::{Record, FLAG_CONFLATED};

impl ShardCore {
    /// Dispatch's part for throttled subscribers of the tick's instrument: the tick is held
    /// once per group; a group whose update is due (the first tick after a quiet interval)
    /// is flushed at once, any other waits for [`ShardCore::flush_throttled`].
    #[cold]
    pub(super) fn dispatch_throttled(&mut self, f: usize, i: usize, rec: &Record) {
        let now = Instant::now();
        for k in 0..self.throttles.groups_of(f, i) {
            let gid = self.throttles.by_instr[f][i][k];
            let max = self.throttles.max_held;
            let g = &mut self.throttles.groups[gid];
            if g.absorb(rec, max) {
                self.stats.throttle_replaced += 1;
            }
            if !g.scheduled {
                if now >= g.next_due {
                    self.flush_group(gid, now);
                } else {
                    self.throttles.schedule(gid);
                }
            }
        }
    }

    /// A source gap `from..=to` for the throttled subscribers of an instrument: held in
    /// seq order, before the record that follows it.
    #[cold]
    pub(super) fn source_gap_throttled(&mut self, f: usize, i: usize, from: u64, to: u64) {
        let max = self.throttles.max_held;
        for k in 0..self.throttles.groups_of(f, i) {
            let gid = self.throttles.by_instr[f][i][k];
            self.throttles.groups[gid].absorb_gap(from, to, max);
        }
    }

    /// Queues every update that is due by `now`. Called by the shard loop after each
    /// dispatch cycle and when the earliest due time ([`ShardCore::next_throttle_due`])
    /// comes.
    pub fn flush_throttled(&mut self, now: Instant) {
        while let Some(&Reverse((t, gid, serial))) = self.throttles.due.peek() {
            if t > now {
                break;
            }
            self.throttles.due.pop();
            let live = self.throttles.groups.get_mut(gid).filter(|g| g.serial == serial && g.scheduled);
            if let Some(g) = live {
                g.scheduled = false;
                self.flush_group(gid, now);
            }
        }
    }

    /// When the shard loop must call [`ShardCore::flush_throttled`] next, if ever.
    pub fn next_throttle_due(&self) -> Option<Instant> {
        self.throttles.next_due()
    }

    /// Queues a group's update to every member; the next one is due an interval from now.
    fn flush_group(&mut self, gid: GroupId, now: Instant) {
        let Some(g) = self.throttles.groups.get_mut(gid).filter(|g| !g.is_idle()) else { return };
        // The plan buffer is reused from update to update (taken here, put back below).
        let mut plan = std::mem::take(&mut self.throttles.plan);
        g.plan(&mut plan, true);
        g.next_due = now + g.interval;
        let (f, i) = (g.feed, g.instr);
        let mut members = std::mem::take(&mut g.members);
        for m in &mut members {
            self.deliver_update(m, f, i, &plan);
        }
        if let Some(g) = self.throttles.groups.get_mut(gid) {
            g.members = members;
        }
        self.throttles.plan = plan;
    }

    /// Queues one member's share of an update plan: records at or after its cursor (flagged
    /// CONFLATED when quotes it was not sent precede them), gaps from its cursor.
    fn deliver_update(&mut self, m: &mut Member, f: u16, i: u32, plan: &[Item]) {
        let ctx = self.queue_ctx(f as usize);
        let Some(c) = self.conns.get_mut(m.key) else { return };
        if c.out.is_closed() {
            return;
        }
        let mut queued = false;
        // The latest quote is flagged when it replaced any quote this member was not sent
        // (since its last update), even when a flagged trade stands between them.
        let start = m.cursor;
        for item in plan {
            match *item {
                Item::Record { rec, replaced } => {
                    let seq = rec.seq();
                    if seq < m.cursor {
                        continue;
                    }
                    let skipped = seq > m.cursor || (replaced != 0 && replaced >= start);
                    let rec = if skipped { rec.with_flags(FLAG_CONFLATED) } else { rec };
                    let expected = m.cursor;
                    m.cursor = seq + 1;
                    Self::queue(c, m.key, f, i, expected, &rec, &ctx, &mut self.over, &mut self.stats, &mut self.woken);
                    queued = true;
                }
                Item::Gap { to, reason } => {
                    if to < m.cursor {
                        continue;
                    }
                    let from = m.cursor;
                    m.cursor = to + 1;
                    queued = true;
                    if let Some(cf) = c.rare.as_deref_mut().and_then(|r| r.conflation.as_mut()).filter(|_| ctx.conflate)
                    {
                        // Behind on a `conflate` feed: the conflation's own gap will name it.
                        cf.absorb_gap(f, i, from, to);
                        continue;
                    }
                    let Some(feed) = self.catalog.get(f as usize) else { continue };
                    let was_empty = c.out.is_empty();
                    c.out.push_text(gap_json(feed, i, (from, to), reason));
                    self.stats.gap(reason);
                    if was_empty {
                        c.notify.notify_one();
                        self.woken.count += 1;
                    }
                }
            }
        }
        if queued {
            self.stats.throttle_updates += 1;
        }
    }

    /// Puts a subscription under the throttle `to` (`None`: not throttled): it leaves its
    /// current group or the live index, getting what its group held for it first, and
    /// joins its new place at the seq it expects next.
    pub(super) fn set_throttle(&mut self, key: ConnKey, f: u16, i: u32, to: Option<Duration>) {
        let Some(&sub) = self.conns.get(key).and_then(|c| c.subs.get(&(f, i))) else { return };
        let last = self.instr[f as usize][i as usize].last_seq;
        let cursor = match sub {
            Sub::Throttled(gid, _) if to == self.throttles.groups.get(gid).map(|g| g.interval) => return,
            Sub::Throttled(gid, pos) => {
                let mut plan = std::mem::take(&mut self.throttles.plan);
                let mut member = None;
                if let Some(g) = self.throttles.groups.get_mut(gid) {
                    g.plan(&mut plan, false);
                    member = g.members.get(pos as usize).copied();
                }
                let mut cursor = last + 1;
                if let Some(mut m) = member {
                    self.deliver_update(&mut m, f, i, &plan);
                    cursor = m.cursor;
                }
                self.throttles.plan = plan;
                cursor
            }
            Sub::Live(_) => {
                // A live subscription that resumed ahead of this node skips up to a seq.
                let upto = self
                    .conns
                    .get_mut(key)
                    .and_then(|c| c.rare.as_deref_mut())
                    .and_then(|r| r.skip_upto.remove(&(f, i)));
                upto.map_or(last + 1, |u| (u + 1).max(last + 1))
            }
        };
        self.unindex(key, f, i, sub);
        // The subscription was just sent what it was owed: a group made for it starts an
        // interval from now (a group that exists keeps its own cadence).
        let first_due = to.map_or_else(Instant::now, |t| Instant::now() + t);
        self.index_sub(key, (f, i), to, cursor, first_due);
    }

    /// Adds a subscription, live (`throttle` `None`) or to the group of its interval, at
    /// the seq it expects next; a group made for it has its first update due at `first_due`.
    pub(super) fn index_sub(
        &mut self,
        key: ConnKey,
        (f, i): (u16, u32),
        throttle: Option<Duration>,
        cursor: u64,
        first_due: Instant,
    ) {
        let last = self.instr[f as usize][i as usize].last_seq;
        let sub = match throttle {
            Some(interval) => {
                let (gid, pos) = self.throttles.join(key, (f, i), interval, cursor, first_due);
                Sub::Throttled(gid, pos)
            }
            None => {
                let list = &mut self.index[f as usize][i as usize];
                list.push(key);
                Sub::Live((list.len() - 1) as u32)
            }
        };
        let Some(c) = self.conns.get_mut(key) else { return };
        c.subs.insert((f, i), sub);
        if throttle.is_none() && cursor > last + 1 {
            c.rare.get_or_insert_with(Default::default).skip_upto.insert((f, i), cursor - 1);
        }
        self.subscriptions += 1;
    }

    /// Removes `key`'s membership `(gid, pos)`; the member moved into its place gets its
    /// new position.
    pub(super) fn leave_group(&mut self, f: u16, i: u32, gid: GroupId, pos: u32) {
        let (moved, gone) = self.throttles.leave(gid, pos);
        if gone.is_some() {
            self.subscriptions -= 1;
        }
        if let Some(k) = moved {
            if let Some(s) = self.conns.get_mut(k).and_then(|c| c.subs.get_mut(&(f, i))) {
                *s = Sub::Throttled(gid, pos);
            }
        }
    }

    /// Before an epoch reset of feed `f`: what the feed's groups hold goes out first (it
    /// belongs to the old epoch), and every member expects seq 1 of the new one.
    pub(super) fn reset_throttled(&mut self, f: u16) {
        let now = Instant::now();
        let gids: Vec<GroupId> =
            self.throttles.groups.iter().filter(|(_, g)| g.feed == f).map(|(gid, _)| gid).collect();
        for gid in gids {
            self.flush_group(gid, now);
            if let Some(g) = self.throttles.groups.get_mut(gid) {
                g.members.iter_mut().for_each(|m| m.cursor = 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::groups::MAX_GROUP_MEMBERS;
    use super::super::testkit::{quote, trade};
    use super::*;

    /// The core, driven as the shard loop drives it, with paused time.
    mod core {
        use super::super::super::core::ShardCore;
        use super::super::super::testkit::{self, texts};
        use super::super::super::Tick;
        use super::*;
        use crate::auth::validate::Principal;
        use crate::engine::core::ConnKey;
        use tickgate_proto::codec::{decode_batch, FLAG_CONFLATED};
        use tickgate_proto::control::{ClientMsg, MaxRate};

        fn tick(seq: u64, is_trade: bool) -> Tick {
            Tick { feed_idx: 0, instr: 0, record: if is_trade { trade(seq) } else { quote(seq) } }
        }

        fn throttled_subscriber(rate: f64) -> (ShardCore, ConnKey) {
            let mut core = testkit::core();
            let h = core.add_conn(Principal::unauthenticated("c", "i"), "s".into());
            let ClientMsg::Subscribe { id, feed, symbols, snapshot, resume, epoch, .. } = testkit::subscribe(&["A"])
            else {
                unreachable!()
            };
            let max_rate = Some(MaxRate(rate));
            core.handle(h.key, ClientMsg::Subscribe { id, feed, symbols, snapshot, resume, epoch, max_rate });
            let replies = texts(&testkit::drain(&mut core, h.key));
            assert!(replies.iter().any(|t| t.contains(r#""type":"subscribed""#) && t.contains(r#""max_rate":"#)));
            (core, h.key)
        }

        /// (seq, conflated) of the records queued, and the gap texts.
        fn received(core: &mut ShardCore, key: ConnKey) -> (Vec<(u64, bool)>, Vec<String>) {
            let mut recs = Vec::new();
            let mut gaps = Vec::new();
            for item in testkit::drain(core, key) {
                match item {
                    crate::engine::outbound::OutItem::Batch(b) => {
                        let msg = b.finish(0);
                        for r in decode_batch(&msg).expect("batch").records {
                            recs.push((r.seq(), r.flags() & FLAG_CONFLATED != 0));
                        }
                    }
                    crate::engine::outbound::OutItem::Text(t) => gaps.push(t),
                    crate::engine::outbound::OutItem::Close { .. } => panic!("closed"),
                }
            }
            (recs, gaps)
        }

        /// The first tick goes out at once; the rest of the interval waits for its end and
        /// arrives as the latest quote, flagged, plus every trade.
        #[tokio::test(start_paused = true)]
        async fn one_update_per_interval_with_every_trade_and_the_latest_quote() {
            let (mut core, key) = throttled_subscriber(20.0);
            core.dispatch(&tick(1, false));
            assert_eq!(received(&mut core, key).0, vec![(1, false)], "leading edge");
            for (seq, t) in [(2, false), (3, true), (4, false), (5, false), (6, true), (7, false)] {
                core.dispatch(&tick(seq, t));
            }
            core.flush_throttled(tokio::time::Instant::now());
            assert!(received(&mut core, key).0.is_empty(), "held until the interval ends");
            assert_eq!(core.next_throttle_due(), Some(tokio::time::Instant::now() + Duration::from_millis(50)));
            tokio::time::advance(Duration::from_millis(50)).await;
            core.flush_throttled(tokio::time::Instant::now());
            // Quote 2 was skipped before trade 3, quotes 4 and 5 before trade 6; quote 7
            // replaced them all.
            assert_eq!(received(&mut core, key).0, vec![(3, true), (6, true), (7, true)]);
            assert_eq!(core.stats.throttle_updates, 2);
            // Quiet for an interval: the next tick is due at once again.
            tokio::time::advance(Duration::from_millis(60)).await;
            core.flush_throttled(tokio::time::Instant::now());
            core.dispatch(&tick(8, true));
            assert_eq!(received(&mut core, key).0, vec![(8, false)]);
        }

        /// More trades in one interval than an update carries: the rest is one `gap`
        /// (reason `throttled`), then the latest quote.
        #[tokio::test(start_paused = true)]
        async fn trades_past_the_bound_are_a_throttled_gap() {
            let (mut core, key) = throttled_subscriber(10.0);
            core.dispatch(&tick(1, true));
            received(&mut core, key);
            let max = core.limits.max_trades_per_update as u64;
            for seq in 2..=max + 11 {
                core.dispatch(&tick(seq, true));
            }
            core.dispatch(&tick(max + 12, false));
            tokio::time::advance(Duration::from_millis(100)).await;
            core.flush_throttled(tokio::time::Instant::now());
            let (recs, texts) = received(&mut core, key);
            assert_eq!(recs.len() as u64, max + 1);
            assert_eq!(recs.last(), Some(&(max + 12, false)));
            assert_eq!(texts.len(), 1);
            let gap = &texts[0];
            assert!(gap.contains(r#""reason":"throttled""#), "{gap}");
            assert!(gap.contains(&format!(r#""from":{},"to":{}"#, max + 2, max + 11)), "{gap}");
        }

        /// `throttle` moves a subscription between live and throttled delivery without a hole
        /// or a repeat; what its group held for it comes first.
        #[tokio::test(start_paused = true)]
        async fn throttle_changes_a_live_subscription_in_place() {
            let (mut core, key) = throttled_subscriber(5.0);
            core.dispatch(&tick(1, false));
            core.dispatch(&tick(2, true));
            core.dispatch(&tick(3, false));
            let lift = |rate: f64| ClientMsg::Throttle {
                id: Some(9),
                feed: Some("T".into()),
                symbols: Some(vec!["*".into()]),
                max_rate: Some(MaxRate(rate)),
                max_bytes_per_s: None,
            };
            core.handle(key, lift(0.0));
            let (recs, texts) = received(&mut core, key);
            assert_eq!(recs, vec![(1, false), (2, false), (3, false)]);
            assert!(texts
                .iter()
                .any(|t| t.contains(r#""type":"throttled","id":9"#) && t.contains(r#""symbols":["A"]"#)));
            core.dispatch(&tick(4, false));
            assert_eq!(received(&mut core, key).0, vec![(4, false)], "live again");
            // Throttled again: it was just sent everything, so its first update waits one
            // interval (no two updates within one).
            core.handle(key, lift(2.0));
            core.dispatch(&tick(5, false));
            core.dispatch(&tick(6, false));
            assert_eq!(received(&mut core, key).0, vec![]);
            tokio::time::advance(Duration::from_millis(500)).await;
            core.flush_throttled(tokio::time::Instant::now());
            assert_eq!(received(&mut core, key).0, vec![(6, true)]);
            assert_eq!(core.subscription_count(), 1);
        }

        /// Past `MAX_GROUP_MEMBERS` subscribers at one rate, a second group takes the rest,
        /// its updates a quarter of an interval later: one flush never writes them all.
        #[tokio::test(start_paused = true)]
        async fn many_subscribers_are_served_in_staggered_groups() {
            let (mut core, first) = throttled_subscriber(10.0);
            let mut keys = vec![first];
            for n in 0..MAX_GROUP_MEMBERS {
                let h = core.add_conn(Principal::unauthenticated("c", "i"), format!("s{n}"));
                let ClientMsg::Subscribe { id, feed, symbols, snapshot, resume, epoch, .. } =
                    testkit::subscribe(&["A"])
                else {
                    unreachable!()
                };
                let max_rate = Some(MaxRate(10.0));
                core.handle(h.key, ClientMsg::Subscribe { id, feed, symbols, snapshot, resume, epoch, max_rate });
                testkit::drain(&mut core, h.key);
                keys.push(h.key);
            }
            assert_eq!(core.throttles.groups_of(0, 0), 2);
            core.dispatch(&tick(1, false));
            let got: Vec<bool> = keys.iter().map(|&k| !received(&mut core, k).0.is_empty()).collect();
            assert_eq!(got.iter().filter(|g| **g).count(), MAX_GROUP_MEMBERS, "the first group at once");
            tokio::time::advance(Duration::from_millis(25)).await;
            core.flush_throttled(tokio::time::Instant::now());
            let late: Vec<(u64, bool)> = keys.iter().flat_map(|&k| received(&mut core, k).0).collect();
            assert_eq!(late, vec![(1, false)], "the second group a quarter interval later");
        }

        /// Every malformed `throttle` gets its own `bad_request` (or `unknown_*`) message.
        #[tokio::test(start_paused = true)]
        async fn malformed_throttles_are_refused_with_a_reason() {
            let (mut core, key) = throttled_subscriber(5.0);
            let t = |feed: Option<&str>, symbols: Option<&[&str]>, rate: Option<f64>, bytes: Option<u64>| {
                ClientMsg::Throttle {
                    id: Some(1),
                    feed: feed.map(Into::into),
                    symbols: symbols.map(|s| s.iter().map(|x| (*x).to_owned()).collect()),
                    max_rate: rate.map(MaxRate),
                    max_bytes_per_s: bytes,
                }
            };
            let cases = [
                (t(None, None, None, None), "needs `feed`"),
                (t(Some("T"), None, Some(1.0), None), "go together"),
                (t(Some("T"), Some(&["A"]), Some(5000.0), None), "between 0.01 and 1000"),
                (t(None, None, None, Some(5)), "`max_bytes_per_s` must be 0"),
                (t(Some("X"), Some(&["A"]), Some(1.0), None), "no feed `X`"),
                (t(Some("T"), Some(&["B"]), Some(1.0), None), "`B` is not subscribed"),
                (t(Some("T"), Some(&["Z"]), Some(1.0), None), "no symbol `Z`"),
            ];
            for (msg, want) in cases {
                core.handle(key, msg);
                let texts = texts(&testkit::drain(&mut core, key));
                assert!(
                    texts.len() == 1 && texts[0].contains(r#""type":"error""#) && texts[0].contains(want),
                    "{texts:?}"
                );
            }
            core.handle(key, t(None, None, None, Some(65536)));
            assert_eq!(core.byte_rate(key), Some(65536));
            let texts = texts(&testkit::drain(&mut core, key));
            assert_eq!(texts, vec![r#"{"type":"throttled","id":1,"max_bytes_per_s":65536}"#.to_owned()]);
        }
    }
}
