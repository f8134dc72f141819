//! The server-wide outbound budget (`limits.max_outbound_total_bytes`): all connections'
//! backlogs together, on every shard, stay within one bound.
//!
//! How: each shard publishes its queued bytes at every stats flush (100 ms, through its
//! [`super::ShardInbox`]) and sums everybody's. Over the budget, each shard sheds its
//! [`share`] of the excess (proportional to its own backlog, so the shards together shed
//! the excess without talking to each other) from its **largest** backlogs first, under
//! their feeds' policy ([`ShardCore::shed`]). Clients that keep up hold at most one
//! dispatch cycle's output each, so the largest backlogs are those of readers that fell
//! behind. The bound is checked every 100 ms: the total can pass it by what 100 ms of
//! traffic adds before it is brought back.

use super::conflate::Conflation;
use super::core::{ConnKey, ShardCore};
use tickgate_proto::close::Reason;

/// This shard's part of the excess: the bytes it must shed, given its own backlog `mine`,
/// the server's `total` and the `budget`. The shares of all shards add up to at least the
/// excess.
pub(crate) fn share(mine: usize, total: usize, budget: usize) -> usize {
    if total <= budget {
        return 0;
    }
    let excess = (total - budget) as u128;
    (excess * mine as u128).div_ceil(total as u128) as usize
}

impl ShardCore {
    /// Sheds at least `want` bytes of backlog, the largest backlogs first: a connection
    /// subscribed only to `conflate` feeds starts conflating (what it has queued still goes
    /// out; nothing more queues until it has caught up, then it gets the latest quotes and
    /// gaps, as in `dispatch`), any other is closed with 4008 and its backlog dropped.
    /// Returns the bytes shed (what was queued on the connections it acted on).
    pub fn shed(&mut self, want: usize) -> usize {
        if want == 0 {
            return 0;
        }
        let mut largest: Vec<(usize, ConnKey)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                !c.out.is_closed() && c.out.bytes() > 0 && c.rare.as_ref().is_none_or(|r| r.conflation.is_none())
            })
            .map(|(k, c)| (c.out.bytes(), k))
            .collect();
        largest.sort_unstable_by_key(|&(bytes, _)| std::cmp::Reverse(bytes));
        let mut shed = 0;
        for (bytes, key) in largest {
            if shed >= want {
                break;
            }
            let Some(c) = self.conns.get_mut(key) else { continue };
            let conflating_only = !c.subs.is_empty()
                && c.subs.keys().all(|(f, _)| self.conflate.get(*f as usize).copied().unwrap_or(false));
            if conflating_only {
                c.rare.get_or_insert_with(Default::default).conflation = Some(Conflation::default());
                self.stats.budget_conflations += 1;
                self.stats.conflate_episodes += 1;
            } else {
                tracing::info!(session = %c.session, backlog_bytes = bytes, "slow consumer: one of the largest backlogs with the server over its outbound budget");
                self.stats.budget_disconnects += 1;
                self.stats.slow_disconnects += 1;
                self.terminate(key, Reason::SlowConsumer);
            }
            shed += bytes;
        }
        shed
    }
}

#[cfg(test)]
mod tests {
    use super::super::core::CoreLimits;
    use super::super::outbound::OutItem;
    use super::super::testkit::{self, tick};
    use super::*;
    use crate::auth::validate::Principal;

    #[test]
    fn shares_add_up_to_the_excess() {
        assert_eq!(share(100, 1000, 1000), 0);
        assert_eq!(share(0, 2000, 1000), 0);
        // Three shards with 1000, 600 and 400 bytes against a budget of 1000: 1000 to shed.
        let shares: Vec<usize> = [1000, 600, 400].iter().map(|&m| share(m, 2000, 1000)).collect();
        assert_eq!(shares, vec![500, 300, 200]);
        assert!(share(1, 3, 1) * 3 >= 2, "rounded up, never short");
    }

    /// The largest backlogs go first, only as many as the excess asks for; a connection
    /// that keeps up (a small backlog) is left alone.
    #[test]
    fn the_largest_backlogs_are_shed_first() {
        let mut core = testkit::core_with(CoreLimits { max_outbound_bytes: 1 << 30, ..testkit::limits() });
        let keys: Vec<ConnKey> = (0..3)
            .map(|i| {
                let h = core.add_conn(Principal::unauthenticated(&format!("c{i}"), "i"), format!("s{i}"));
                core.handle(h.key, testkit::subscribe(&["A"]));
                testkit::drain(&mut core, h.key);
                h.key
            })
            .collect();
        // Backlogs of 10, 100 and 50 ticks: the writers of 0 and 2 took part of theirs.
        for seq in 1..=100 {
            core.dispatch(&tick(seq));
            if seq == 90 {
                testkit::drain(&mut core, keys[0]);
            }
            if seq == 50 {
                testkit::drain(&mut core, keys[2]);
            }
        }
        let bytes: Vec<usize> = keys.iter().map(|&k| core.conns[k].out.bytes()).collect();
        assert!(bytes[1] > bytes[2] && bytes[2] > bytes[0], "{bytes:?}");
        // Asking for a bit more than the largest backlog takes the two largest.
        let shed = core.shed(bytes[1] + 1);
        assert_eq!(shed, bytes[1] + bytes[2]);
        assert_eq!(core.stats.budget_disconnects, 2);
        for (k, closed) in [(keys[0], false), (keys[1], true), (keys[2], true)] {
            let items = testkit::drain(&mut core, k);
            let got_4008 = items.iter().any(|i| matches!(i, OutItem::Close { code: 4008, .. }));
            assert_eq!(got_4008, closed, "connection {k}: {items:?}");
        }
        assert_eq!(core.shed(0), 0);
    }
}
