//! The synchronous heart of a shard: connections, the subscription index, last values and
//! the dispatch loop body. It does no I/O and takes no lock; the async shard wrapper
//! ([`super::shard`]) feeds it ticks and control messages and moves its outbound queues
//! to the sockets. Keeping it synchronous makes the ordering guarantees (snapshot fence,
//! close-after-data) easy to reason about and lets benches drive it without sockets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

// tokio's Instant follows the runtime's clock, so tests can drive expiry with paused time.
use tokio::time::Instant;

use slab::Slab;
use tokio::sync::Notify;

use super::conflate::{Conflation, Emit};
use super::outbound::{OutItem, Outbound};
pub use super::stats::{ConnInfo, CoreStats};
use super::stats::{GapReason, ResumeResult};
use super::stream::WritePacer;
use super::timer::{TimerId, TimerWheel};
use super::Tick;
use crate::auth::scopes::Entitlements;
use crate::auth::validate::{AuthError, Principal};
use crate::config::Config;
use crate::feeds::log::Availability;
use crate::feeds::{Catalog, Feed, SlowConsumerPolicy};
use tickgate_proto::close;
use tickgate_proto::codec::{Record, FLAG_CONFLATED, FLAG_REPLAY, FLAG_SNAPSHOT, RTYPE_TRADE};
use tickgate_proto::control::{ClientMsg, ErrorCode, FeedInfo, InstrumentInfo, ServerMsg};
use tickgate_proto::now_ns;

/// Key of a connection inside its shard.
pub type ConnKey = usize;

/// Limits the core enforces.
#[derive(Debug, Clone)]
pub struct CoreLimits {
    /// Outbound budget per connection (bytes).
    pub max_outbound_bytes: usize,
    /// Largest batch before a new one is opened.
    pub max_batch_bytes: usize,
    /// Subscribed instruments per connection.
    pub max_subscriptions: usize,
    /// Heartbeat interval announced in `welcome`.
    pub heartbeat_ms: u64,
    /// Grace after a token's `exp` before its connection is closed with 4001.
    pub expiry_grace_ms: u64,
    /// Minimum time between two in-band refreshes on one connection.
    pub min_refresh_interval_ms: u64,
    /// Timer wheel resolution.
    pub timer_tick_ms: u64,
    /// Whether in-band `refresh` is offered (the caller validates the new token; the
    /// engine only applies the validated principal). Off: `refresh` is answered
    /// `invalid_token` "token refresh is not available".
    pub refresh_offered: bool,
}

impl From<&Config> for CoreLimits {
    /// The one place the engine's limits are read from the configuration (whose defaults
    /// are the built-in ones). In-band refresh is offered: the server validates refresh
    /// tokens in the connection task.
    fn from(c: &Config) -> CoreLimits {
        CoreLimits {
            max_outbound_bytes: c.limits.max_outbound_bytes,
            max_batch_bytes: c.engine.max_batch_bytes,
            max_subscriptions: c.limits.max_subscriptions,
            heartbeat_ms: c.server.heartbeat_ms,
            expiry_grace_ms: c.auth.expiry_grace_ms,
            min_refresh_interval_ms: c.auth.min_refresh_interval_ms,
            timer_tick_ms: c.engine.timer_tick_ms,
            refresh_offered: true,
        }
    }
}

/// How a newly subscribed instrument starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
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

/// What a timer entry does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    /// Send `token_expiring`.
    Expiring,
    /// Close with 4001.
    Expire,
}

/// A timer entry: which connection (by key and serial, so a reused key is never hit) and
/// what to do.
#[derive(Debug, Clone, Copy)]
struct TimerEvent {
    key: ConnKey,
    serial: u64,
    kind: TimerKind,
}

/// Per-instrument state every shard keeps: the last seq it dispatched and the last trade
/// and quote (the snapshot).
#[derive(Debug, Default, Clone)]
struct InstrState {
    last_seq: u64,
    last_trade: Option<Record>,
    last_quote: Option<Record>,
}

/// State only a connection that fell behind or resumed ahead of this node needs. Boxed,
/// so a connection that keeps up carries one pointer and the dispatch loop tests one.
#[derive(Debug, Default)]
struct Rare {
    /// Set while the connection is behind on a `conflate` feed (see [`super::conflate`]).
    conflation: Option<Conflation>,
    /// Live records to skip per instrument: a `resume` that named a seq this node had not
    /// dispatched yet (a client coming from a node further ahead).
    skip_upto: HashMap<(u16, u32), u64>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.conflation.is_none() && self.skip_upto.is_empty()
    }
}

/// A stream connection as the shard sees it.
#[derive(Debug)]
pub struct Conn {
    /// What the socket has yet to take.
    pub out: Outbound,
    /// Wakes the connection's writer when its queue goes from empty to non-empty.
    pub notify: Rc<Notify>,
    /// Aborts a write blocked on a stalled socket (slow-consumer close, shutdown).
    pub kill: Rc<Notify>,
    /// Session id sent in `welcome`.
    pub session: String,
    /// The validated identity.
    pub principal: Principal,
    /// Subscribed (feed, instrument) → this connection's position in that instrument's
    /// index list, so unsubscribing is O(1) however many subscribers share the instrument
    /// (a mass disconnect of N subscribers of one instrument is O(N), not O(N²)).
    subs: HashMap<(u16, u32), u32>,
    /// Conflation and resume-ahead state; `None` for a connection that keeps up.
    rare: Option<Box<Rare>>,
    /// Unique per shard for the connection's life (slab keys are reused).
    serial: u64,
    expire_timer: Option<TimerId>,
    expiring_timer: Option<TimerId>,
    last_refresh: Option<Instant>,
}

impl Conn {
    /// Number of subscribed instruments.
    pub fn subscription_count(&self) -> usize {
        self.subs.len()
    }
}

/// The shard's state.
#[derive(Debug)]
pub struct ShardCore {
    catalog: Arc<Catalog>,
    limits: CoreLimits,
    conns: Slab<Conn>,
    /// `index[feed][instrument]` → subscribed connections.
    index: Vec<Vec<Vec<ConnKey>>>,
    instr: Vec<Vec<InstrState>>,
    /// The epoch this shard is in, per feed (changes when a `Reset` is dispatched).
    epochs: Vec<u64>,
    /// Whether a feed's slow-consumer policy is `conflate`.
    conflate: Vec<bool>,
    to_kill: Vec<ConnKey>,
    subscriptions: usize,
    draining: bool,
    /// Expiry and `token_expiring` timers: after the handshake, the only reader of `exp`.
    wheel: TimerWheel<TimerEvent>,
    /// Monotonic origin of the wheel's clock.
    origin: Instant,
    next_serial: u64,
    fired: Vec<TimerEvent>,
    /// Local counters.
    pub stats: CoreStats,
}

/// What the connection task needs after registering.
#[derive(Debug, Clone)]
pub struct ConnHandles {
    /// The key.
    pub key: ConnKey,
    /// Writer wake-up.
    pub notify: Rc<Notify>,
    /// Write abort.
    pub kill: Rc<Notify>,
}

impl ShardCore {
    /// A shard over the catalog. In-band refresh is offered when `limits.refresh_offered`
    /// (the connection task validates the token; see [`ShardCore::refresh_begin`]).
    pub fn new(catalog: Arc<Catalog>, limits: CoreLimits) -> ShardCore {
        let tick_ms = limits.timer_tick_ms.clamp(1, 1000);
        let index = catalog.feeds().iter().map(|f| vec![Vec::new(); f.instrument_count()]).collect();
        let instr = catalog.feeds().iter().map(|f| vec![InstrState::default(); f.instrument_count()]).collect();
        let stats = CoreStats { delivered: vec![0; catalog.feeds().len()], ..CoreStats::default() };
        let epochs = catalog.feeds().iter().map(|f| f.epoch()).collect();
        let conflate = catalog.feeds().iter().map(|f| f.policy() == SlowConsumerPolicy::Conflate).collect();
        ShardCore {
            catalog,
            limits,
            conns: Slab::new(),
            index,
            instr,
            epochs,
            conflate,
            to_kill: Vec::new(),
            subscriptions: 0,
            draining: false,
            wheel: TimerWheel::new(tick_ms),
            origin: Instant::now(),
            next_serial: 0,
            fired: Vec::new(),
            stats,
        }
    }

    /// The catalog.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Number of connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Subscribed (connection, instrument) pairs on this shard.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions
    }

    /// True once shutdown began: new connections are refused.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// A connection by key.
    pub fn conn(&self, key: ConnKey) -> Option<&Conn> {
        self.conns.get(key)
    }

    /// A connection by key, mutably.
    pub fn conn_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns.get_mut(key)
    }

    fn feeds_for(&self, ent: &Entitlements) -> Vec<FeedInfo> {
        self.catalog
            .feeds()
            .iter()
            .filter(|f| ent.can_read(f.name()))
            .map(|f| FeedInfo { name: f.name().to_owned(), id: f.id(), epoch: f.epoch() })
            .collect()
    }

    /// Registers a connection and queues its `welcome`.
    pub fn add_conn(&mut self, principal: Principal, session: String) -> ConnHandles {
        let notify = Rc::new(Notify::new());
        let kill = Rc::new(Notify::new());
        let welcome = ServerMsg::Welcome {
            protocol: 1,
            session: session.clone(),
            sub: principal.sub.clone(),
            exp: principal.exp,
            heartbeat_ms: self.limits.heartbeat_ms,
            feeds: self.feeds_for(&principal.entitlements),
        };
        let mut out = Outbound::default();
        out.push_text(welcome.to_json());
        self.next_serial += 1;
        let key = self.conns.insert(Conn {
            out,
            notify: notify.clone(),
            kill: kill.clone(),
            session,
            principal,
            subs: HashMap::new(),
            rare: None,
            serial: self.next_serial,
            expire_timer: None,
            expiring_timer: None,
            last_refresh: None,
        });
        notify.notify_one();
        self.schedule_token_timers(key);
        ConnHandles { key, notify, kill }
    }

    /// Milliseconds on the wheel's clock.
    fn wheel_now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Schedules the connection's expiry (exp + grace: close 4001) and its
    /// `token_expiring` notice (a jittered 80-90 % of the token's lifetime). Wall-clock
    /// times from the token are turned into offsets from now once, here.
    fn schedule_token_timers(&mut self, key: ConnKey) {
        let now_wall_ms = now_ns() / 1_000_000;
        let now_ms = self.wheel_now_ms();
        let grace = self.limits.expiry_grace_ms;
        let Some(c) = self.conns.get(key) else { return };
        let p = &c.principal;
        if p.exp == u64::MAX {
            return; // a principal that never expires (the benchmark-only no-auth mode)
        }
        let serial = c.serial;
        let exp_ms = p.exp.saturating_mul(1000);
        let deadline_wall = exp_ms.saturating_add(grace);
        // The close is decided up to two wheel ticks *before* the deadline (the wheel
        // rounds up by at most one tick and the loop may run up to one tick late): a
        // batch sealed by then is stamped before the deadline, and after the decision the
        // connection's queue is discarded, so no data frame is written after exp + grace.
        let early = 2 * self.wheel.tick_ms();
        let expire_at = now_ms + deadline_wall.saturating_sub(now_wall_ms).saturating_sub(early);
        let issued_ms = p.iat.map(|i| i.saturating_mul(1000)).unwrap_or(now_wall_ms).min(exp_ms);
        let fraction = rand::random_range(0.80..0.90);
        let notice_wall = issued_ms + ((exp_ms - issued_ms) as f64 * fraction) as u64;
        let notice_at = now_ms + notice_wall.saturating_sub(now_wall_ms);
        let expire = self.wheel.schedule(expire_at, TimerEvent { key, serial, kind: TimerKind::Expire });
        let expiring = (notice_wall < exp_ms)
            .then(|| self.wheel.schedule(notice_at, TimerEvent { key, serial, kind: TimerKind::Expiring }));
        if let Some(c) = self.conns.get_mut(key) {
            c.expire_timer = Some(expire);
            c.expiring_timer = expiring;
        }
    }

    fn cancel_token_timers(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let (a, b) = (c.expire_timer.take(), c.expiring_timer.take());
        for t in [a, b].into_iter().flatten() {
            self.wheel.cancel(t);
        }
    }

    /// Outbound bytes queued on this shard's connections (sampled every 100 ms; O(conns)).
    pub fn queued_bytes(&self) -> usize {
        self.conns.iter().map(|(_, c)| c.out.bytes()).sum()
    }

    /// Timers scheduled on this shard.
    pub fn timer_count(&self) -> usize {
        self.wheel.len()
    }

    /// The wheel's resolution while it holds anything (how often the loop must advance it).
    pub fn timer_tick(&self) -> Option<Duration> {
        (!self.wheel.is_empty()).then(|| Duration::from_millis(self.wheel.tick_ms()))
    }

    /// The writer's last check before it stamps and writes a batch: a connection whose
    /// deadline (`exp` + grace) has passed is closed with 4001 now. The wheel decides the
    /// close two ticks early, but a shard thread that runs later than that (a busy machine)
    /// would otherwise write batches after the deadline; this keeps "no data frame after
    /// the deadline" true whatever the thread's lateness. True when it closed the connection
    /// (its queue now holds only the close).
    pub fn expire_if_due(&mut self, key: ConnKey, now_ns: u64) -> bool {
        let grace_ms = self.limits.expiry_grace_ms;
        let Some(c) = self.conns.get(key) else { return false };
        if c.principal.exp == u64::MAX || c.out.is_closed() {
            return false;
        }
        let deadline_ms = c.principal.exp.saturating_mul(1000).saturating_add(grace_ms);
        if now_ns / 1_000_000 < deadline_ms {
            return false;
        }
        self.stats.expiries += 1;
        self.terminate(key, close::TOKEN_EXPIRED, "token expired");
        true
    }

    /// Fires every timer due by now: `token_expiring` notices, and closes with 4001 at
    /// the deadline. Runs on the shard loop, between dispatches.
    pub fn advance_timers(&mut self) {
        if self.wheel.is_empty() {
            return;
        }
        let now_ms = self.wheel_now_ms();
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(now_ms, &mut fired);
        for ev in fired.drain(..) {
            let Some(c) = self.conns.get_mut(ev.key) else {
                continue;
            };
            if c.serial != ev.serial || c.out.is_closed() {
                continue;
            }
            match ev.kind {
                TimerKind::Expiring => {
                    c.expiring_timer = None;
                    let exp = c.principal.exp;
                    self.send(ev.key, &ServerMsg::TokenExpiring { exp });
                }
                TimerKind::Expire => {
                    c.expire_timer = None;
                    self.stats.expiries += 1;
                    self.terminate(ev.key, close::TOKEN_EXPIRED, "token expired");
                }
            }
        }
        self.fired = fired;
    }

    /// Ends a connection now: whatever is queued and not yet handed to the socket is
    /// dropped (no data after the decision), the close is queued, a writer blocked on a
    /// stalled socket is aborted, and the connection leaves the index.
    fn terminate(&mut self, key: ConnKey, code: u16, reason: &'static str) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if c.out.is_closed() {
            return;
        }
        c.out.discard_and_close(code, reason);
        c.rare = None;
        c.notify.notify_one();
        c.kill.notify_one();
        let subs: Vec<((u16, u32), u32)> = c.subs.drain().collect();
        for ((f, i), pos) in subs {
            self.unindex(key, f, i, pos);
        }
        self.cancel_token_timers(key);
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

    /// Closes every connection of `sub` (when given) or carrying `jti` (when given) with
    /// 4003. Returns how many were closed.
    pub fn revoke(&mut self, sub: Option<&str>, jti: Option<&str>) -> usize {
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.out.is_closed())
            .filter(|(_, c)| {
                sub.is_some_and(|s| c.principal.sub == s) || jti.is_some_and(|j| c.principal.jti.as_deref() == Some(j))
            })
            .map(|(k, _)| k)
            .collect();
        for &k in &keys {
            self.terminate(k, close::TOKEN_REVOKED, "token revoked");
        }
        self.stats.revocations += keys.len() as u64;
        keys.len()
    }

    /// Forgets a connection and its subscriptions.
    pub fn remove_conn(&mut self, key: ConnKey) {
        self.cancel_token_timers(key);
        if let Some(conn) = self.conns.try_remove(key) {
            for ((f, i), pos) in conn.subs {
                self.unindex(key, f, i, pos);
            }
        }
    }

    /// Removes `key` from the index list of (f, i), where it sits at `pos`; the entry moved
    /// into its place has its recorded position updated.
    fn unindex(&mut self, key: ConnKey, f: u16, i: u32, pos: u32) {
        let Some(list) = self.index.get_mut(f as usize).and_then(|v| v.get_mut(i as usize)) else { return };
        let pos = pos as usize;
        debug_assert_eq!(list.get(pos), Some(&key), "index position out of date");
        if list.get(pos) != Some(&key) {
            return;
        }
        list.swap_remove(pos);
        self.subscriptions -= 1;
        if let Some(&moved) = list.get(pos) {
            if let Some(p) = self.conns.get_mut(moved).and_then(|c| c.subs.get_mut(&(f, i))) {
                *p = pos as u32;
            }
        }
    }

    /// Queues a message for a connection and wakes its writer.
    pub fn send(&mut self, key: ConnKey, msg: &ServerMsg) {
        if let Some(c) = self.conns.get_mut(key) {
            let was_empty = c.out.is_empty();
            c.out.push_text(msg.to_json());
            if was_empty {
                c.notify.notify_one();
            }
        }
    }

    /// Queues an `error` reply and counts it.
    pub fn send_error(&mut self, key: ConnKey, id: Option<i64>, code: ErrorCode, message: String) {
        self.stats.error(code);
        self.send(key, &ServerMsg::Error { id, code, message });
    }

    /// Queues a close (after what is queued) and stops data to the connection.
    pub fn close(&mut self, key: ConnKey, code: u16, reason: &'static str) {
        let subs: Vec<((u16, u32), u32)> = match self.conns.get_mut(key) {
            Some(c) => {
                c.out.push_close(code, reason);
                c.notify.notify_one();
                c.subs.drain().collect()
            }
            None => return,
        };
        for ((f, i), pos) in subs {
            self.unindex(key, f, i, pos);
        }
    }

    /// Dispatches one tick to every subscriber on this shard; returns how many subscribers
    /// the instrument has here (the work it took, for the shard's cycle budget).
    #[inline]
    pub fn dispatch(&mut self, tick: &Tick) -> usize {
        let f = tick.feed_idx as usize;
        let i = tick.instr as usize;
        let Some(st) = self.instr.get_mut(f).and_then(|v| v.get_mut(i)) else {
            return 0;
        };
        let seq = tick.record.seq();
        // Ingest refuses seqs that do not go up, so this never wraps in practice.
        let expected = st.last_seq.wrapping_add(1);
        st.last_seq = seq;
        if tick.record.rtype() == RTYPE_TRADE {
            st.last_trade = Some(tick.record);
        } else {
            st.last_quote = Some(tick.record);
        }
        if seq != expected {
            // The source skipped seqs (an upstream publisher lost them, or started its
            // numbering above 1): subscribers are told before the record.
            self.source_gap(tick, expected, seq);
        }
        let max_batch = self.limits.max_batch_bytes;
        let budget = self.limits.max_outbound_bytes;
        let flush_at = WritePacer::flush_at(max_batch, budget);
        let conflate = self.conflate.get(f).copied().unwrap_or(false);
        let len = tick.record.len();
        let (conns, index, to_kill, stats) = (&mut self.conns, &self.index, &mut self.to_kill, &mut self.stats);
        for &key in &index[f][i] {
            // Every key in the index is a live connection: removal unindexes first.
            let Some(c) = conns.get_mut(key) else {
                continue;
            };
            // Rare states first: one branch for a client that keeps up.
            if let Some(r) = c.rare.as_deref_mut() {
                if Self::skipped(&mut r.skip_upto, tick.feed_idx, tick.instr, seq) {
                    if r.is_empty() {
                        c.rare = None;
                    }
                    continue;
                }
                if let (true, Some(cf)) = (conflate, r.conflation.as_mut()) {
                    cf.absorb(tick.feed_idx, tick.instr, &tick.record);
                    stats.conflated_records += 1;
                    continue;
                }
            }
            if conflate && c.out.bytes() + len > budget {
                // Policy `conflate`: stop queueing this feed's records for the connection
                // until the writer has drained its queue (see `pop`).
                let mut cf = Conflation::default();
                cf.absorb(tick.feed_idx, tick.instr, &tick.record);
                c.rare.get_or_insert_with(Default::default).conflation = Some(cf);
                stats.conflate_episodes += 1;
                stats.conflated_records += 1;
                continue;
            }
            let before = c.out.bytes();
            let was_empty = c.out.is_empty();
            c.out.push_record(tick.feed_idx, &tick.record, max_batch);
            let after = c.out.bytes();
            if after > budget {
                to_kill.push(key);
            } else if WritePacer::must_wake(was_empty, before, after, flush_at) {
                // A writer holding its write (`engine.write_delay_us`) must not sit on a
                // backlog until the slow-consumer budget closes a client that keeps up.
                c.notify.notify_one();
            }
        }
        index[f][i].len()
    }

    /// True when the record must not be sent (the client already has it); forgets the
    /// instrument once its live seqs pass the resume point.
    #[cold]
    fn skipped(skip: &mut HashMap<(u16, u32), u64>, f: u16, i: u32, seq: u64) -> bool {
        match skip.get(&(f, i)) {
            Some(&upto) if seq <= upto => {
                if seq == upto {
                    skip.remove(&(f, i));
                }
                true
            }
            Some(_) => {
                skip.remove(&(f, i));
                false
            }
            None => false,
        }
    }

    /// Sends `gap` (reason `source_gap`) for the seqs `from..seq` the source never
    /// delivered, to every subscriber of the tick's instrument, before the record.
    /// A conflating connection with something pending for the instrument is skipped (its
    /// pending range already spans them), and a resuming connection is told only about
    /// the part after its resume point.
    #[cold]
    fn source_gap(&mut self, tick: &Tick, from: u64, seq: u64) {
        self.stats.source_gaps += 1;
        if seq < from {
            return; // a source going backwards is refused at ingest; nothing to name
        }
        let Some(feed) = self.catalog.get(tick.feed_idx as usize) else { return };
        let (f, i) = (tick.feed_idx, tick.instr);
        let keys = self.index[f as usize][i as usize].clone();
        for key in keys {
            let Some(c) = self.conns.get_mut(key) else { continue };
            let rare = c.rare.as_deref();
            if c.out.is_closed() || rare.and_then(|r| r.conflation.as_ref()).is_some_and(|cf| cf.has(f, i)) {
                continue;
            }
            let start = match rare.and_then(|r| r.skip_upto.get(&(f, i))) {
                Some(&upto) if upto >= seq - 1 => continue,
                Some(&upto) => from.max(upto + 1),
                None => from,
            };
            let msg = ServerMsg::Gap {
                feed: feed.name().to_owned(),
                symbol: feed.symbol(i).to_owned(),
                from: start,
                to: seq - 1,
                reason: GapReason::SourceGap.as_str().into(),
            };
            let was_empty = c.out.is_empty();
            c.out.push_text(msg.to_json());
            self.stats.gap(GapReason::SourceGap);
            if was_empty {
                c.notify.notify_one();
            }
        }
    }

    /// Applies an epoch reset of a feed: numbering restarts, the last values are
    /// forgotten, and every connection subscribed to the feed gets `reset` before any
    /// record of the new epoch.
    pub fn reset(&mut self, feed_idx: u16, epoch: u64) {
        let f = feed_idx as usize;
        let (Some(states), Some(e)) = (self.instr.get_mut(f), self.epochs.get_mut(f)) else { return };
        *e = epoch;
        states.iter_mut().for_each(|st| *st = InstrState::default());
        self.stats.resets += 1;
        let Some(feed) = self.catalog.get(f) else { return };
        let msg = ServerMsg::Reset { feed: feed.name().to_owned(), epoch }.to_json();
        for (_, c) in self.conns.iter_mut() {
            if c.out.is_closed() || !c.subs.keys().any(|(cf, _)| *cf == feed_idx) {
                continue;
            }
            if let Some(r) = c.rare.as_deref_mut() {
                if let Some(cf) = r.conflation.as_mut() {
                    cf.forget_feed(feed_idx);
                }
                r.skip_upto.retain(|(sf, _), _| *sf != feed_idx);
            }
            let was_empty = c.out.is_empty();
            c.out.push_text(msg.clone());
            if was_empty {
                c.notify.notify_one();
            }
        }
    }

    /// Applies decisions deferred during dispatch (slow-consumer closes). Call after a
    /// run of [`ShardCore::dispatch`].
    pub fn end_cycle(&mut self) {
        if self.to_kill.is_empty() {
            return;
        }
        let kills = std::mem::take(&mut self.to_kill);
        for key in kills {
            // Policy `disconnect`: the backlog is dropped, the close goes out as soon as
            // the socket takes it, and a writer stuck on the stalled socket is aborted.
            if self.conns.get(key).is_some_and(|c| !c.out.is_closed()) {
                self.stats.slow_disconnects += 1;
                self.terminate(key, close::SLOW_CONSUMER, "slow consumer");
            }
        }
    }

    /// Starts shutdown: every connection gets `shutdown` with a jittered reconnect delay,
    /// then close 1001.
    pub fn shutdown_all(&mut self, reconnect_after_max_ms: u64) {
        self.draining = true;
        let keys: Vec<ConnKey> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let jitter = if reconnect_after_max_ms > 1000 {
                rand::random_range(1000..=reconnect_after_max_ms)
            } else {
                reconnect_after_max_ms
            };
            self.send(key, &ServerMsg::Shutdown { reconnect_after_ms: jitter });
            // No kill here: the `shutdown` message must reach the client. A client stuck
            // on a full socket is dropped when the drain time runs out instead.
            self.close(key, close::GOING_AWAY, "server shutting down");
        }
    }

    /// Handles a parsed control message from a connection.
    pub fn handle(&mut self, key: ConnKey, msg: ClientMsg) {
        match msg {
            ClientMsg::Ping { id } => self.send(key, &ServerMsg::Pong { id, ts: now_ns() }),
            ClientMsg::Subscribe { id, feed, symbols, snapshot, resume, epoch } => {
                self.subscribe(key, id, &feed, &symbols, snapshot, (resume, epoch))
            }
            ClientMsg::Unsubscribe { id, feed, symbols } => self.unsubscribe(key, id, &feed, &symbols),
            // The token of a refresh is validated by the connection task, which may wait
            // for a JWKS refetch (`refresh_begin`, then `refresh_apply`); the core never
            // sees it.
            ClientMsg::Refresh { id, .. } => {
                self.send_error(key, id, ErrorCode::InvalidToken, "token refresh is not available".into())
            }
            ClientMsg::Auth { .. } => self.send_error(
                key,
                None,
                ErrorCode::BadRequest,
                "already authenticated; use `refresh` to replace the token".into(),
            ),
        }
    }

    /// Resolves a symbol list against a feed: `["*"]` is every instrument.
    fn resolve(feed: &Feed, symbols: &[String]) -> Result<Vec<u32>, String> {
        if symbols.len() == 1 && symbols[0] == "*" {
            return Ok((0..feed.instrument_count() as u32).collect());
        }
        let mut out = Vec::with_capacity(symbols.len());
        let mut seen = HashSet::with_capacity(symbols.len());
        for s in symbols {
            if s == "*" {
                return Err("*` must be the only entry of `symbols".into());
            }
            match feed.instrument_index(s) {
                // A repeated symbol is subscribed and reported once.
                Some(i) => {
                    if seen.insert(i) {
                        out.push(i);
                    }
                }
                None => {
                    let shown: String = s.chars().take(32).collect();
                    return Err(shown);
                }
            }
        }
        Ok(out)
    }

    fn resolve_error(&mut self, key: ConnKey, id: Option<i64>, feed: &Feed, e: String) {
        if e.starts_with('*') {
            self.send_error(key, id, ErrorCode::BadRequest, "`*` must be the only entry of `symbols`".into())
        } else {
            self.send_error(key, id, ErrorCode::UnknownSymbol, format!("no symbol `{e}` in feed {}", feed.name()))
        }
    }

    fn subscribe(
        &mut self,
        key: ConnKey,
        id: Option<i64>,
        feed_name: &str,
        symbols: &[String],
        snapshot: bool,
        resume: (Option<BTreeMap<String, u64>>, Option<u64>),
    ) {
        let (resume, client_epoch) = resume;
        let catalog = self.catalog.clone();
        let Some(feed) = catalog.by_name(feed_name) else {
            let shown: String = feed_name.chars().take(32).collect();
            return self.send_error(key, id, ErrorCode::UnknownFeed, format!("no feed `{shown}`"));
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
        if symbols.is_empty() {
            return self.send_error(key, id, ErrorCode::BadRequest, "`symbols` must not be empty".into());
        }
        let instruments = match Self::resolve(feed, symbols) {
            Ok(v) => v,
            Err(e) => return self.resolve_error(key, id, feed, e),
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
        let mut skips: Vec<(u32, u64)> = Vec::new();
        for (&i, plan) in &plans {
            let st = &self.instr[fi][i as usize];
            match *plan {
                Plan::Live => {}
                Plan::Replay(_) => self.stats.resume(ResumeResult::Replayed),
                Plan::Skip(n) => skips.push((i, n)),
                Plan::Unavailable(n) => {
                    // The client is told exactly which range it will not get, then gets
                    // the snapshot instead.
                    self.stats.resume(ResumeResult::Unavailable);
                    self.stats.gap(GapReason::ReplayUnavailable);
                    prelude.push(
                        ServerMsg::Gap {
                            feed: feed.name().to_owned(),
                            symbol: feed.symbol(i).to_owned(),
                            from: n + 1,
                            to: st.last_seq,
                            reason: GapReason::ReplayUnavailable.as_str().into(),
                        }
                        .to_json(),
                    );
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
        let reply = ServerMsg::Subscribed { id, feed: feed.name().to_owned(), epoch: shard_epoch, instruments: infos };
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
                    let gap = ServerMsg::Gap {
                        feed: feed.name().to_owned(),
                        symbol: feed.symbol(*i).to_owned(),
                        from: *exp,
                        to: r.seq() - 1,
                        reason: GapReason::SourceGap.as_str().into(),
                    };
                    conn.out.push_text(gap.to_json());
                    self.stats.gap(GapReason::SourceGap);
                }
                *exp = r.seq() + 1;
            }
            conn.out.push_record(f, &r.with_flags(FLAG_REPLAY), max_batch);
        }
        if !skips.is_empty() {
            let r = conn.rare.get_or_insert_with(Default::default);
            for (i, n) in skips {
                r.skip_upto.insert((f, i), n);
            }
        }
        for &i in &new {
            let list = &mut self.index[fi][i as usize];
            conn.subs.insert((f, i), list.len() as u32);
            list.push(key);
        }
        if was_empty {
            conn.notify.notify_one();
        }
        self.subscriptions += new.len();
    }

    fn unsubscribe(&mut self, key: ConnKey, id: Option<i64>, feed_name: &str, symbols: &[String]) {
        let catalog = self.catalog.clone();
        let Some(feed) = catalog.by_name(feed_name) else {
            let shown: String = feed_name.chars().take(32).collect();
            return self.send_error(key, id, ErrorCode::UnknownFeed, format!("no feed `{shown}`"));
        };
        if symbols.is_empty() {
            return self.send_error(key, id, ErrorCode::BadRequest, "`symbols` must not be empty".into());
        }
        let instruments = match Self::resolve(feed, symbols) {
            Ok(v) => v,
            Err(e) => return self.resolve_error(key, id, feed, e),
        };
        let f = feed.idx as u16;
        let removed = self.drop_subs(key, f, &instruments);
        let symbols = removed.iter().map(|&i| feed.symbol(i).to_owned()).collect();
        self.send(
            key,
            &ServerMsg::Unsubscribed { id, feed: feed.name().to_owned(), symbols, reason: "request".into() },
        );
    }

    /// Removes the given subscriptions of a connection; returns those that existed.
    fn drop_subs(&mut self, key: ConnKey, f: u16, instruments: &[u32]) -> Vec<u32> {
        let Some(conn) = self.conns.get_mut(key) else {
            return Vec::new();
        };
        let removed: Vec<(u32, u32)> =
            instruments.iter().filter_map(|&i| conn.subs.remove(&(f, i)).map(|pos| (i, pos))).collect();
        for &(i, _) in &removed {
            if let Some(r) = conn.rare.as_deref_mut() {
                if let Some(cf) = r.conflation.as_mut() {
                    cf.forget(f, i);
                }
                r.skip_upto.remove(&(f, i));
            }
        }
        for &(i, pos) in &removed {
            self.unindex(key, f, i, pos);
        }
        removed.into_iter().map(|(i, _)| i).collect()
    }

    /// The first half of an in-band `refresh`: the rate limit. `true`: the caller now
    /// validates the token (outside the core, possibly waiting for a JWKS refetch) and
    /// hands the outcome to [`ShardCore::refresh_apply`]; `false`: the refresh was answered
    /// (`rate_limited`, or refresh unavailable) and nothing else is to be done.
    pub fn refresh_begin(&mut self, key: ConnKey, id: Option<i64>) -> bool {
        if !self.limits.refresh_offered {
            self.send_error(key, id, ErrorCode::InvalidToken, "token refresh is not available".into());
            return false;
        }
        let min_gap = Duration::from_millis(self.limits.min_refresh_interval_ms);
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        if conn.last_refresh.is_some_and(|t| t.elapsed() < min_gap) {
            self.stats.refresh_rate_limited += 1;
            let msg = format!(
                "at most one refresh per {} ms; the current token stays in force",
                self.limits.min_refresh_interval_ms
            );
            self.send_error(key, id, ErrorCode::RateLimited, msg);
            return false;
        }
        conn.last_refresh = Some(Instant::now());
        true
    }

    /// The second half of an in-band `refresh`: applies the validated token (or its
    /// refusal, which leaves the current token and deadline in force). The new principal
    /// must have the same `iss` and `sub`; feeds it no longer covers are unsubscribed
    /// (`scope_revoked`) and its `exp` replaces the deadline.
    pub fn refresh_apply(&mut self, key: ConnKey, id: Option<i64>, validated: Result<Principal, AuthError>) {
        // The validation may have waited (a JWKS refetch); a connection whose close was
        // decided meanwhile (expiry, revocation) stays closed.
        let Some(conn) = self.conns.get(key).filter(|c| !c.out.is_closed()) else {
            return;
        };
        let (iss, sub) = (conn.principal.iss.clone(), conn.principal.sub.clone());
        let p = match validated {
            Ok(p) => p,
            Err(e) => {
                self.stats.refresh_refused += 1;
                return self.send_error(key, id, ErrorCode::InvalidToken, e.to_string());
            }
        };
        if p.iss != iss || p.sub != sub {
            self.stats.refresh_refused += 1;
            return self.send_error(
                key,
                id,
                ErrorCode::InvalidToken,
                "refresh token must have the same iss and sub".into(),
            );
        }
        // Feeds the new token no longer covers are unsubscribed, the rest stream on.
        let catalog = self.catalog.clone();
        for feed in catalog.feeds().iter().filter(|f| !p.entitlements.can_read(f.name())) {
            let fi = feed.idx as u16;
            let Some(conn) = self.conns.get(key) else {
                return;
            };
            let mut is: Vec<u32> = conn.subs.keys().filter(|(cf, _)| *cf == fi).map(|(_, i)| *i).collect();
            if is.is_empty() {
                continue;
            }
            is.sort_unstable();
            let removed = self.drop_subs(key, fi, &is);
            let symbols = removed.iter().map(|&i| feed.symbol(i).to_owned()).collect();
            self.send(
                key,
                &ServerMsg::Unsubscribed {
                    id: None,
                    feed: feed.name().to_owned(),
                    symbols,
                    reason: "scope_revoked".into(),
                },
            );
        }
        let feeds = self.feeds_for(&p.entitlements);
        let exp = p.exp;
        if let Some(conn) = self.conns.get_mut(key) {
            conn.principal = p;
        }
        // The new token's exp replaces the deadline (and re-arms token_expiring).
        self.cancel_token_timers(key);
        self.schedule_token_timers(key);
        self.stats.refresh_ok += 1;
        self.send(key, &ServerMsg::Refreshed { id, exp, feeds });
    }

    /// Takes the next outbound item of a connection.
    ///
    /// This is also where a conflating connection goes back to full rate: once its
    /// writer has drained the queue to a quarter of the budget, what conflation kept
    /// (gaps for dropped trades, the latest quotes flagged CONFLATED) is queued, and the
    /// next dispatch queues live records again.
    pub fn pop(&mut self, key: ConnKey) -> Option<OutItem> {
        let c = self.conns.get_mut(key)?;
        let item = c.out.pop();
        let conflating = c.rare.as_ref().is_some_and(|r| r.conflation.is_some());
        if conflating && c.out.bytes() <= self.limits.max_outbound_bytes / 4 && !c.out.is_closed() {
            self.end_conflation(key);
            if item.is_none() {
                return self.conns.get_mut(key).and_then(|c| c.out.pop());
            }
        }
        item
    }

    /// Queues what a conflating connection's state stands for and returns it to live
    /// delivery.
    #[cold]
    fn end_conflation(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(key) else { return };
        let Some(r) = c.rare.as_deref_mut() else { return };
        let Some(cf) = r.conflation.take() else { return };
        if r.is_empty() {
            c.rare = None;
        }
        let max_batch = self.limits.max_batch_bytes;
        for (f, i, emit) in cf.drain() {
            match emit {
                Emit::Gap { from, to } => {
                    let Some(feed) = self.catalog.get(f as usize) else { continue };
                    let msg = ServerMsg::Gap {
                        feed: feed.name().to_owned(),
                        symbol: feed.symbol(i).to_owned(),
                        from,
                        to,
                        reason: GapReason::SlowConsumer.as_str().into(),
                    };
                    c.out.push_text(msg.to_json());
                    self.stats.gap(GapReason::SlowConsumer);
                }
                Emit::Quote { record, conflated } => {
                    let r = if conflated { record.with_flags(FLAG_CONFLATED) } else { record };
                    c.out.push_record(f, &r, max_batch);
                }
            }
        }
        c.notify.notify_one();
    }

    /// True while the connection is conflating (a test and admin aid).
    pub fn is_conflating(&self, key: ConnKey) -> bool {
        self.conns.get(key).is_some_and(|c| c.rare.as_ref().is_some_and(|r| r.conflation.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feeds::FeedDef;
    use tickgate_proto::codec::{Body, Quote};

    fn core() -> ShardCore {
        let text = "name = \"T\"\nid = 1\nsource = \"synthetic\"\nsymbols = [\"A\", \"B\"]\n[synthetic]\nseed = 1\nrate_per_s = 1.0\n";
        let catalog = Arc::new(Catalog::new(vec![FeedDef::parse("t", text).expect("feed")], 1).expect("catalog"));
        ShardCore::new(catalog, CoreLimits::from(&Config::default()))
    }

    fn principal(iat: u64, exp: u64) -> Principal {
        Principal {
            sub: "s".into(),
            iss: "i".into(),
            jti: Some("j".into()),
            client_id: None,
            exp,
            iat: Some(iat),
            entitlements: Entitlements::from_scopes(["md:read:*"]),
        }
    }

    fn tick(seq: u64) -> Tick {
        Tick { feed_idx: 0, instr: 0, record: Record::encode(1, 1, seq, 0, 0, &Body::Quote(Quote::default()), 0) }
    }

    fn drain(core: &mut ShardCore, key: ConnKey) -> Vec<OutItem> {
        std::iter::from_fn(|| core.pop(key)).collect()
    }

    fn texts(items: &[OutItem]) -> Vec<String> {
        items
            .iter()
            .filter_map(|i| match i {
                OutItem::Text(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    /// Expiry on the wheel with paused time: `token_expiring` once at 80-90 % of the
    /// lifetime, close 4001 at exp, and nothing queued for the connection after that.
    #[tokio::test(start_paused = true)]
    async fn expiry_notice_then_close_then_nothing() {
        let mut core = core();
        let now = now_ns() / 1_000_000_000;
        // A 10 s token issued now (the wall clock does not move; the wheel clock does).
        let h = core.add_conn(principal(now, now + 10), "s1".into());
        core.handle(
            h.key,
            ClientMsg::Subscribe {
                id: None,
                feed: "T".into(),
                symbols: vec!["A".into()],
                snapshot: false,
                resume: None,
                epoch: None,
            },
        );
        drain(&mut core, h.key);
        assert_eq!(core.timer_count(), 2);
        let mut notice_at = None;
        let mut seq = 0;
        // Step 10 ms at a time; the true deadline is somewhere in the current second, so
        // the close comes between 9 and 10 s from now (exp is whole seconds).
        for step in 1..=1100u64 {
            tokio::time::advance(Duration::from_millis(10)).await;
            seq += 1;
            core.dispatch(&tick(seq));
            core.end_cycle();
            core.advance_timers();
            let items = drain(&mut core, h.key);
            for t in texts(&items) {
                if t.contains("token_expiring") {
                    assert!(notice_at.is_none(), "token_expiring sent twice");
                    notice_at = Some(step * 10);
                }
            }
            if let Some(OutItem::Close { code, .. }) = items.last() {
                assert_eq!(*code, close::TOKEN_EXPIRED);
                let at = step * 10;
                assert!((8_980..=10_000).contains(&at), "closed at {at} ms");
                let n = notice_at.expect("notice before the close");
                assert!((7_000..=9_010).contains(&n), "notice at {n} ms");
                // After the close nothing more is queued, whatever is dispatched.
                for s in 1..=10 {
                    core.dispatch(&tick(seq + s));
                }
                core.advance_timers();
                assert!(core.pop(h.key).is_none(), "data queued after the deadline");
                assert_eq!(core.timer_count(), 0);
                assert_eq!(core.stats.expiries, 1);
                return;
            }
            assert!(items.iter().all(|i| !matches!(i, OutItem::Close { .. })), "close before the deadline");
        }
        panic!("never closed");
    }

    /// Removing a connection cancels its timers; a reused slab key is never hit by a
    /// stale timer.
    #[tokio::test(start_paused = true)]
    async fn removed_connections_leave_no_timers() {
        let mut core = core();
        let now = now_ns() / 1_000_000_000;
        let a = core.add_conn(principal(now, now + 2), "a".into());
        core.remove_conn(a.key);
        assert_eq!(core.timer_count(), 0);
        let b = core.add_conn(principal(now, now + 100), "b".into());
        assert_eq!(b.key, a.key, "slab key reused");
        tokio::time::advance(Duration::from_secs(5)).await;
        core.advance_timers();
        let items = drain(&mut core, b.key);
        assert!(items.iter().all(|i| !matches!(i, OutItem::Close { .. })));
    }

    /// Index positions stay exact through removals in any order: after connections
    /// leave, exactly the remaining ones get the next tick.
    #[test]
    fn index_positions_survive_removals_in_any_order() {
        let mut core = core();
        let now = now_ns() / 1_000_000_000;
        let keys: Vec<ConnKey> =
            (0..200).map(|k| core.add_conn(principal(now, now + 100), format!("c{k}")).key).collect();
        for &k in &keys {
            let msg = ClientMsg::Subscribe {
                id: None,
                feed: "T".into(),
                symbols: vec!["A".into(), "B".into()],
                snapshot: false,
                resume: None,
                epoch: None,
            };
            core.handle(k, msg);
            drain(&mut core, k);
        }
        let mut gone = HashSet::new();
        for (n, &k) in keys.iter().enumerate() {
            match n % 3 {
                0 => {
                    core.remove_conn(k);
                    gone.insert(k);
                }
                1 if n % 2 == 0 => {
                    core.handle(k, ClientMsg::Unsubscribe { id: None, feed: "T".into(), symbols: vec!["A".into()] });
                    drain(&mut core, k);
                    gone.insert(k);
                }
                _ => {}
            }
        }
        core.dispatch(&tick(1));
        for &k in keys.iter().filter(|k| !gone.contains(k)) {
            assert!(matches!(core.pop(k), Some(OutItem::Batch(_))), "connection {k} lost its subscription");
        }
        for &k in keys.iter().filter(|k| gone.contains(k)) {
            assert!(core.pop(k).is_none(), "connection {k} still indexed");
        }
    }

    /// Revocation closes matching connections with 4003 and discards their backlog.
    #[tokio::test]
    async fn revoke_by_sub_and_jti() {
        let mut core = core();
        let now = now_ns() / 1_000_000_000;
        let mut p2 = principal(now, now + 100);
        p2.jti = Some("other".into());
        let mut p3 = principal(now, now + 100);
        p3.sub = "someone-else".into();
        p3.jti = Some("third".into());
        let a = core.add_conn(principal(now, now + 100), "a".into());
        let b = core.add_conn(p2, "b".into());
        let c = core.add_conn(p3, "c".into());
        for k in [a.key, b.key, c.key] {
            drain(&mut core, k);
        }
        assert_eq!(core.revoke(None, Some("j")), 1);
        assert!(matches!(drain(&mut core, a.key).as_slice(), [OutItem::Close { code: 4003, .. }]));
        assert_eq!(core.revoke(Some("s"), None), 1, "a is already closing; b matches by sub");
        assert!(matches!(drain(&mut core, b.key).as_slice(), [OutItem::Close { code: 4003, .. }]));
        assert!(drain(&mut core, c.key).is_empty());
        assert_eq!(core.stats.revocations, 2);
    }

    /// The writer's check: a connection past its deadline (exp + grace) is closed 4001 at
    /// the write, whatever the wheel did; one before it, or one that never expires, is not.
    #[tokio::test]
    async fn the_writer_never_writes_past_the_deadline() {
        let mut core = core();
        let now_s = now_ns() / 1_000_000_000;
        let late = core.add_conn(principal(now_s - 10, now_s - 1), "late".into());
        let fine = core.add_conn(principal(now_s, now_s + 100), "fine".into());
        let never = core.add_conn(Principal::unauthenticated("n", "i"), "never".into());
        for k in [late.key, fine.key, never.key] {
            drain(&mut core, k);
        }
        let now = now_ns();
        assert!(core.expire_if_due(late.key, now));
        assert!(matches!(drain(&mut core, late.key).as_slice(), [OutItem::Close { code: 4001, .. }]));
        assert!(!core.expire_if_due(late.key, now), "already closing");
        assert!(!core.expire_if_due(fine.key, now));
        assert!(core.expire_if_due(fine.key, (now_s + 100) * 1_000_000_000), "at the deadline itself");
        assert!(!core.expire_if_due(never.key, u64::MAX));
        assert_eq!(core.stats.expiries, 2);
    }
}
