//! A `subscribe` and an `unsubscribe` on a shard: the symbol list resolved against the
//! feed ([`resolve`], a typed [`ResolveError`]), a `Plan` per new instrument (live,
//! snapshot, replay from the feed log, gap + snapshot, skip ahead), then the reply, the
//! snapshot or replay and the index update in one synchronous step between two dispatches.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::core::{gap_json, ConnKey, ShardCore};
use super::stats::{GapReason, ResumeResult};
use crate::feeds::log::Availability;
use crate::feeds::Feed;
use tickgate_proto::codec::{Record, FLAG_REPLAY, FLAG_SNAPSHOT};
use tickgate_proto::control::{ErrorCode, InstrumentInfo, MaxRate, ServerMsg};

/// Why a symbol list cannot be resolved against a feed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ResolveError {
    /// An empty list (answered `bad_request`).
    #[error("`symbols` must not be empty")]
    Empty,
    /// `*` next to other symbols (answered `bad_request`).
    #[error("`*` must be the only entry of `symbols`")]
    WildcardNotAlone,
    /// A symbol the feed does not have (answered `unknown_symbol`); at most 32 characters
    /// of it are kept, for the message.
    #[error("no symbol `{symbol}` in feed {feed}")]
    UnknownSymbol {
        /// The symbol as shown.
        symbol: String,
        /// The feed's name.
        feed: String,
    },
}

impl ResolveError {
    /// The error code of the reply.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            ResolveError::Empty | ResolveError::WildcardNotAlone => ErrorCode::BadRequest,
            ResolveError::UnknownSymbol { .. } => ErrorCode::UnknownSymbol,
        }
    }
}

/// Resolves a symbol list against a feed: `["*"]` is every instrument; a repeated symbol
/// is subscribed and reported once; an empty list is refused.
pub(crate) fn resolve(feed: &Feed, symbols: &[String]) -> Result<Vec<u32>, ResolveError> {
    if symbols.is_empty() {
        return Err(ResolveError::Empty);
    }
    if symbols.len() == 1 && symbols[0] == "*" {
        return Ok((0..feed.instrument_count() as u32).collect());
    }
    let mut out = Vec::with_capacity(symbols.len());
    let mut seen = HashSet::with_capacity(symbols.len());
    for s in symbols {
        if s == "*" {
            return Err(ResolveError::WildcardNotAlone);
        }
        match feed.instrument_index(s) {
            Some(i) => {
                if seen.insert(i) {
                    out.push(i);
                }
            }
            None => {
                let symbol: String = s.chars().take(32).collect();
                return Err(ResolveError::UnknownSymbol { symbol, feed: feed.name().to_owned() });
            }
        }
    }
    Ok(out)
}

/// How a newly subscribed instrument starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// Live from the next seq.
    Live,
    /// Last trade and quote first (SNAPSHOT), then live.
    Snapshot,
    /// Records after this seq from the resume buffer (REPLAY), then live.
    Replay(u64),
    /// The buffer no longer holds what follows this seq: `gap` + snapshot.
    Unavailable(u64),
    /// The client is ahead of this node: live records up to this seq are not sent.
    Skip(u64),
}

impl ShardCore {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn subscribe(
        &mut self,
        key: ConnKey,
        id: Option<i64>,
        feed_name: &str,
        symbols: &[String],
        snapshot: bool,
        resume: (Option<BTreeMap<String, u64>>, Option<u64>),
        max_rate: Option<MaxRate>,
    ) {
        let (resume, client_epoch) = resume;
        let throttle = match max_rate.map(|r| super::groups::interval_of(r.0)) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => return self.send_error(key, id, ErrorCode::BadRequest, e),
        };
        let catalog = self.catalog.clone();
        let Some(feed) = catalog.by_name(feed_name) else {
            return self.refuse_unknown_feed(key, id, feed_name);
        };
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if conn.out.is_closed() {
            return;
        }
        if !conn.principal.entitlements.can_read(feed.name()) {
            return self.send_error(
                key,
                id,
                ErrorCode::InsufficientScope,
                format!("token lacks md:read:{} or md:read:*", feed.name()),
            );
        }
        let instruments = match resolve(feed, symbols) {
            Ok(v) => v,
            Err(e) => return self.send_error(key, id, e.code(), e.to_string()),
        };
        if let Some(r) = &resume {
            if let Some(unknown) = r.keys().find(|s| feed.instrument_index(s).is_none()) {
                let shown: String = unknown.chars().take(32).collect();
                return self.send_error(
                    key,
                    id,
                    ErrorCode::UnknownSymbol,
                    format!("resume names unknown symbol `{shown}`"),
                );
            }
        }
        let f = feed.idx as u16;
        let new: Vec<u32> = instruments.iter().copied().filter(|i| !conn.subs.contains_key(&(f, *i))).collect();
        if conn.subs.len() + new.len() > self.limits.max_subscriptions {
            return self.send_error(
                key,
                id,
                ErrorCode::LimitExceeded,
                format!("at most {} subscribed instruments per connection", self.limits.max_subscriptions),
            );
        }

        // The reply, the snapshot/replay and the index update happen in one synchronous
        // step on the shard thread, between two dispatches: the snapshot is exactly the
        // state after the last dispatched tick, a replay ends exactly at the last
        // dispatched seq, and the next tick dispatched is the next seq.
        let fi = feed.idx;
        let shard_epoch = self.epochs[fi];
        let infos: Vec<InstrumentInfo> = instruments
            .iter()
            .map(|&i| InstrumentInfo {
                symbol: feed.symbol(i).to_owned(),
                id: Feed::instrument_id(i),
                seq: self.instr[fi][i as usize].last_seq,
            })
            .collect();
        // Seqs of another epoch mean nothing here: those instruments get a snapshot, and
        // the reply's `epoch` tells the client why. (No `reset` message: it would also
        // void the tracking of the connection's other instruments of this feed.)
        let epoch_mismatch = resume.is_some() && client_epoch.is_some_and(|e| e != shard_epoch);
        let mut plans: BTreeMap<u32, Plan> = BTreeMap::new();
        let mut wants: HashMap<u32, (u64, u64)> = HashMap::new();
        for &i in &new {
            let last = self.instr[fi][i as usize].last_seq;
            let plan = match resume.as_ref().and_then(|r| r.get(feed.symbol(i)).copied()) {
                None if snapshot => Plan::Snapshot,
                None => Plan::Live,
                Some(_) if epoch_mismatch => Plan::Snapshot,
                Some(n) if n == last => Plan::Live,
                Some(n) if n > last => Plan::Skip(n),
                Some(n) => {
                    wants.insert(i, (n, last));
                    Plan::Replay(n)
                }
            };
            plans.insert(i, plan);
        }
        let mut replay: Vec<(u32, Record)> = Vec::new();
        if !wants.is_empty() {
            let log = feed.log();
            wants.retain(|&i, &mut (after, upto)| {
                let ok = log.availability(shard_epoch, i, after, upto) == Availability::Replay;
                if !ok {
                    plans.insert(i, Plan::Unavailable(after));
                }
                ok
            });
            log.collect(&wants, &mut replay);
        }
        // A replay is bounded to half the outbound budget; a longer one is answered like
        // an expired one (gap + snapshot) rather than pushing the client over its budget.
        let replay_bytes: usize = replay.iter().map(|(_, r)| r.len()).sum();
        if replay_bytes > self.limits.max_outbound_bytes / 2 {
            replay.clear();
            for p in plans.values_mut() {
                if let Plan::Replay(n) = *p {
                    *p = Plan::Unavailable(n);
                }
            }
        }

        let mut prelude: Vec<String> = Vec::new();
        let mut snap: Vec<Record> = Vec::new();
        let mut skips: HashMap<u32, u64> = HashMap::new();
        for (&i, plan) in &plans {
            let st = &self.instr[fi][i as usize];
            match *plan {
                Plan::Live => {}
                Plan::Replay(_) => self.stats.resume(ResumeResult::Replayed),
                Plan::Skip(n) => {
                    skips.insert(i, n);
                }
                Plan::Unavailable(n) => {
                    // The client is told exactly which range it will not get, then gets
                    // the snapshot instead.
                    self.stats.resume(ResumeResult::Unavailable);
                    self.stats.gap(GapReason::ReplayUnavailable);
                    prelude.push(gap_json(feed, i, (n + 1, st.last_seq), GapReason::ReplayUnavailable));
                }
                Plan::Snapshot => {}
            }
            if matches!(plan, Plan::Snapshot | Plan::Unavailable(_)) {
                let mut recs: Vec<Record> = [st.last_trade, st.last_quote].into_iter().flatten().collect();
                recs.sort_by_key(Record::seq);
                snap.extend(recs.into_iter().map(|r| r.with_flags(FLAG_SNAPSHOT)));
            }
        }
        self.stats.replayed_records += replay.len() as u64;
        let reply = ServerMsg::Subscribed {
            id,
            feed: feed.name().to_owned(),
            epoch: shard_epoch,
            instruments: infos,
            max_rate,
        };
        let max_batch = self.limits.max_batch_bytes;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let was_empty = conn.out.is_empty();
        conn.out.push_text(reply.to_json());
        for m in prelude {
            conn.out.push_text(m);
        }
        for r in &snap {
            conn.out.push_record(f, r, max_batch);
        }
        // Replayed records in ingest order; a seq the source itself never delivered is
        // named by a `source_gap` before the record, as it was on the live path.
        let mut next: HashMap<u32, u64> = wants.iter().map(|(&i, &(after, _))| (i, after + 1)).collect();
        for (i, r) in &replay {
            if let Some(exp) = next.get_mut(i) {
                if r.seq() > *exp {
                    conn.out.push_text(gap_json(feed, *i, (*exp, r.seq() - 1), GapReason::SourceGap));
                    self.stats.gap(GapReason::SourceGap);
                }
                *exp = r.seq() + 1;
            }
            conn.out.push_record(f, &r.with_flags(FLAG_REPLAY), max_batch);
        }
        if was_empty {
            conn.notify.notify_one();
        }
        // Listed instruments subscribed before (the ones without a plan) take the new
        // throttle, when one was given.
        if let Some(t) = throttle {
            for &i in instruments.iter().filter(|i| !plans.contains_key(i)) {
                self.set_throttle(key, f, i, t);
            }
        }
        // Each new instrument continues after the last dispatched seq, or after the seq
        // of a client that resumed ahead of this node.
        for &i in &new {
            let last = self.instr[fi][i as usize].last_seq;
            let cursor = skips.get(&i).map_or(last + 1, |&n| n + 1);
            // The first tick after the subscription goes out at once (its snapshot or
            // replay is not an update).
            self.index_sub(key, (f, i), throttle.flatten(), cursor, tokio::time::Instant::now());
        }
    }

    /// `throttle` (protocol v1.1): a new `max_rate` for subscribed instruments and/or a new
    /// `max_bytes_per_s` for the connection, answered with `throttled`.
    pub(super) fn throttle(
        &mut self,
        key: ConnKey,
        id: Option<i64>,
        feed_name: Option<&str>,
        symbols: Option<&[String]>,
        max_rate: Option<MaxRate>,
        max_bytes_per_s: Option<u64>,
    ) {
        let byte_rate = match max_bytes_per_s.map(super::groups::byte_rate_of) {
            None => None,
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => return self.send_error(key, id, ErrorCode::BadRequest, e),
        };
        let rated = match (feed_name, symbols, max_rate) {
            (None, None, None) if byte_rate.is_some() => None,
            (None, None, None) => {
                let m = "`throttle` needs `feed`, `symbols` and `max_rate`, or `max_bytes_per_s`";
                return self.send_error(key, id, ErrorCode::BadRequest, m.into());
            }
            (Some(f), Some(s), Some(r)) => Some((f, s, r)),
            _ => {
                let m = "`feed`, `symbols` and `max_rate` go together";
                return self.send_error(key, id, ErrorCode::BadRequest, m.into());
            }
        };
        let mut applied = None;
        if let Some((feed_name, symbols, rate)) = rated {
            let interval = match super::groups::interval_of(rate.0) {
                Ok(t) => t,
                Err(e) => return self.send_error(key, id, ErrorCode::BadRequest, e),
            };
            let catalog = self.catalog.clone();
            let Some(feed) = catalog.by_name(feed_name) else {
                return self.refuse_unknown_feed(key, id, feed_name);
            };
            let f = feed.idx as u16;
            let Some(conn) = self.conns.get(key) else { return };
            let instruments: Vec<u32> = if symbols.len() == 1 && symbols[0] == "*" {
                let mut v: Vec<u32> = conn.subs.keys().filter(|(sf, _)| *sf == f).map(|(_, i)| *i).collect();
                v.sort_unstable();
                v
            } else {
                let v = match resolve(feed, symbols) {
                    Ok(v) => v,
                    Err(e) => return self.send_error(key, id, e.code(), e.to_string()),
                };
                if let Some(&i) = v.iter().find(|&&i| !conn.subs.contains_key(&(f, i))) {
                    let m = format!("`{}` is not subscribed", feed.symbol(i));
                    return self.send_error(key, id, ErrorCode::BadRequest, m);
                }
                v
            };
            for &i in &instruments {
                self.set_throttle(key, f, i, interval);
            }
            let symbols = instruments.iter().map(|&i| feed.symbol(i).to_owned()).collect();
            applied = Some((feed.name().to_owned(), symbols, rate));
        }
        if let (Some(b), Some(c)) = (byte_rate, self.conns.get_mut(key)) {
            c.byte_rate = b;
        }
        let (feed, symbols, max_rate) = match applied {
            Some((f, s, r)) => (Some(f), Some(s), Some(r)),
            None => (None, None, None),
        };
        self.send(key, &ServerMsg::Throttled { id, feed, symbols, max_rate, max_bytes_per_s });
    }

    /// Answers a request naming a feed that does not exist (`unknown_feed`; at most 32
    /// characters of the name are shown).
    fn refuse_unknown_feed(&mut self, key: ConnKey, id: Option<i64>, name: &str) {
        let shown: String = name.chars().take(32).collect();
        self.send_error(key, id, ErrorCode::UnknownFeed, format!("no feed `{shown}`"));
    }

    pub(super) fn unsubscribe(&mut self, key: ConnKey, id: Option<i64>, feed_name: &str, symbols: &[String]) {
        let catalog = self.catalog.clone();
        let Some(feed) = catalog.by_name(feed_name) else {
            return self.refuse_unknown_feed(key, id, feed_name);
        };
        let instruments = match resolve(feed, symbols) {
            Ok(v) => v,
            Err(e) => return self.send_error(key, id, e.code(), e.to_string()),
        };
        let f = feed.idx as u16;
        let removed = self.drop_subs(key, f, &instruments);
        let symbols = removed.iter().map(|&i| feed.symbol(i).to_owned()).collect();
        self.send(
            key,
            &ServerMsg::Unsubscribed { id, feed: feed.name().to_owned(), symbols, reason: "request".into() },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `*` alone is every instrument, repeats count once, and each refusal carries its
    /// own error code and the message the client reads.
    #[test]
    fn resolve_answers_with_typed_errors() {
        let catalog = crate::engine::testkit::catalog(&["A", "B"]);
        let feed = catalog.get(0).expect("feed");
        let syms = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(resolve(feed, &syms(&["*"])), Ok(vec![0, 1]));
        assert_eq!(resolve(feed, &syms(&["B", "A", "B"])), Ok(vec![1, 0]));
        let e = resolve(feed, &[]).unwrap_err();
        assert_eq!((e.code(), e.to_string().as_str()), (ErrorCode::BadRequest, "`symbols` must not be empty"));
        let e = resolve(feed, &syms(&["A", "*"])).unwrap_err();
        assert_eq!(
            (e.code(), e.to_string().as_str()),
            (ErrorCode::BadRequest, "`*` must be the only entry of `symbols`")
        );
        let long = "Z".repeat(40);
        let e = resolve(feed, &syms(&["A", &long])).unwrap_err();
        assert_eq!(e.code(), ErrorCode::UnknownSymbol);
        assert_eq!(e.to_string(), format!("no symbol `{}` in feed T", "Z".repeat(32)));
    }
}
