//! The shard's view of itself for operators: queued bytes (a gauge) and the connection
//! list of `GET /admin/connections`. A separate module from `stats` because it reads the
//! core, which itself depends on the plain types in `stats`.

use super::core::ShardCore;
use super::stats::ConnInfo;

impl ShardCore {
    /// Outbound bytes queued on this shard's connections (sampled every 100 ms; O(conns)).
    pub fn queued_bytes(&self) -> usize {
        self.conns.iter().map(|(_, c)| c.out.bytes()).sum()
    }

    /// A snapshot of every connection for the admin view.
    pub fn connection_infos(&self, shard: usize) -> Vec<ConnInfo> {
        self.conns
            .iter()
            .map(|(_, c)| ConnInfo {
                session: c.session.clone(),
                sub: c.principal.sub.clone(),
                shard,
                subscriptions: c.subs.len(),
                queued_bytes: c.out.bytes(),
                token_exp: (c.principal.exp != u64::MAX).then_some(c.principal.exp),
                closing: c.out.is_closed(),
            })
            .collect()
    }
}
