//! The synchronous heart of a shard: [`ShardCore`] (its state), [`CoreLimits`], a
//! connection's state ([`Conn`]), the last values per instrument, and the dispatch loop
//! body (dispatch, source gaps, epoch resets, slow-consumer decisions, conflation's end,
//! queueing replies). Its other concerns live beside it, each an `impl ShardCore` of its
//! own: the registry and index (`index.rs`), subscribe and unsubscribe
//! (`super::subscribe`), the session: deadline, refresh, revocation (`session.rs`), and
//! the counters and admin view (`super::stats`).
//!
//! It does no I/O and takes no lock; the async shard wrapper ([`super::shard`]) feeds it
//! ticks and control messages and moves its outbound queues to the sockets. Keeping it
//! synchronous makes the ordering guarantees (snapshot fence, close-after-data) easy to
//! reason about and lets benches drive it without sockets.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

// tokio's Instant follows the runtime's clock, so tests can drive expiry with paused time.
use tokio::time::Instant;

use slab::Slab;
use tokio::sync::Notify;

use super::conflate::{Conflation, Emit};
use super::outbound::{OutItem, Outbound};
use super::pacer::WritePacer;
use super::stats::GapReason;
pub use super::stats::{ConnInfo, CoreStats};
use super::timer::{TimerId, TimerWheel};
use super::Tick;
use crate::auth::validate::Principal;
use crate::config::Config;
use crate::feeds::{Catalog, Feed, SlowConsumerPolicy};
use tickgate_proto::close::Reason;
use tickgate_proto::codec::{Record, FLAG_CONFLATED, RTYPE_TRADE};
use tickgate_proto::control::{ClientMsg, ErrorCode, ServerMsg};
use tickgate_proto::now_ns;

/// Key of a connection inside its shard.
pub type ConnKey = usize;

/// The `gap` message naming seqs `from..=to` of instrument `instr` of `feed`, as JSON: the
/// one place every kind of gap (source, slow consumer, replay, throttle) is spelled.
pub(super) fn gap_json(feed: &Feed, instr: u32, (from, to): (u64, u64), reason: GapReason) -> String {
    ServerMsg::Gap {
        feed: feed.name().to_owned(),
        symbol: feed.symbol(instr).to_owned(),
        from,
        to,
        reason: reason.as_str().into(),
    }
    .to_json()
}

/// Where a connection's subscription to an instrument sits: in the instrument's live index
/// list, or in one of its throttled groups (`super::throttle`), at a position, so leaving
/// is O(1) however many subscribers share the instrument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sub {
    /// Position in `ShardCore::index[feed][instrument]`.
    Live(u32),
    /// Group, and position among its members.
    Throttled(super::groups::GroupId, u32),
}

/// What queueing a record to a connection needs besides the connection, read once per
/// dispatch (see [`ShardCore::queue`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct QueueCtx {
    /// The feed's policy is `conflate`.
    pub(super) conflate: bool,
    /// `limits.max_outbound_bytes`.
    pub(super) budget: usize,
    /// Where the writer is woken a second time (`WritePacer::flush_at`).
    pub(super) flush_at: usize,
    /// `engine.max_batch_bytes`.
    pub(super) max_batch: usize,
}

/// Limits the core enforces.
#[derive(Debug, Clone)]
pub struct CoreLimits {
    /// Outbound budget per connection (bytes).
    pub max_outbound_bytes: usize,
    /// How long a socket must stay full, with the backlog over the budget, before its
    /// connection is a slow consumer (`limits.slow_consumer_stall_ms`).
    pub slow_consumer_stall_ms: u64,
    /// All outbound backlogs of the server together (`Config::outbound_total_bytes`).
    pub max_outbound_total_bytes: usize,
    /// Largest batch before a new one is opened.
    pub max_batch_bytes: usize,
    /// Subscribed instruments per connection.
    pub max_subscriptions: usize,
    /// Trades one update of a throttled subscription carries at most.
    pub max_trades_per_update: usize,
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
            slow_consumer_stall_ms: c.limits.slow_consumer_stall_ms,
            max_outbound_total_bytes: c.outbound_total_bytes(),
            max_batch_bytes: c.engine.max_batch_bytes,
            max_subscriptions: c.limits.max_subscriptions,
            max_trades_per_update: c.limits.max_trades_per_update,
            heartbeat_ms: c.server.heartbeat_ms,
            expiry_grace_ms: c.auth.expiry_grace_ms,
            min_refresh_interval_ms: c.auth.min_refresh_interval_ms,
            timer_tick_ms: c.engine.timer_tick_ms,
            refresh_offered: true,
        }
    }
}

/// Per-instrument state every shard keeps: the last seq it dispatched and the last trade
/// and quote (the snapshot).
#[derive(Debug, Default, Clone)]
pub(super) struct InstrState {
    pub(super) last_seq: u64,
    pub(super) last_trade: Option<Record>,
    pub(super) last_quote: Option<Record>,
}

/// State only a connection that fell behind or resumed ahead of this node needs. Boxed,
/// so a connection that keeps up carries one pointer and the dispatch loop tests one.
#[derive(Debug, Default)]
pub(super) struct Rare {
    /// Set while the connection is behind on a `conflate` feed (see [`super::conflate`]).
    pub(super) conflation: Option<Conflation>,
    /// Live records to skip per instrument: a `resume` that named a seq this node had not
    /// dispatched yet (a client coming from a node further ahead).
    pub(super) skip_upto: HashMap<(u16, u32), u64>,
}

impl Rare {
    pub(super) fn is_empty(&self) -> bool {
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
    pub(super) subs: HashMap<(u16, u32), Sub>,
    /// Conflation and resume-ahead state; `None` for a connection that keeps up.
    pub(super) rare: Option<Box<Rare>>,
    /// Unique per shard for the connection's life (slab keys are reused).
    pub(super) serial: u64,
    pub(super) expire_timer: Option<TimerId>,
    pub(super) expiring_timer: Option<TimerId>,
    pub(super) last_refresh: Option<Instant>,
    /// Since when the writer has been blocked on a write the socket does not take (the
    /// kernel send buffer is full); `None` while writes complete or nothing is written.
    /// Set by the writer ([`ShardCore::set_write_blocked`]).
    pub(super) blocked_since: Option<Instant>,
    /// Listed in [`ShardCore::over`] (its backlog passed the budget).
    pub(super) over: bool,
    /// When the kernel last took this connection's bytes (set by its socket's wrapper).
    pub(super) progress: Option<super::stall::WriteProgress>,
    /// Protocol v1.1 `max_bytes_per_s`: the writer writes at most this many bytes per
    /// second (`None`: as fast as the socket takes them).
    pub(super) byte_rate: Option<u64>,
    /// The socket as the shard may write it itself (`super::direct`), when the
    /// connection's task offered it.
    pub(super) direct: Option<std::rc::Rc<dyn super::frame::DirectPort>>,
}

/// Writers a dispatch cycle woke, and connections it queued for that the shard writes
/// itself (`super::direct::write_queued`) instead.
#[derive(Debug, Default)]
pub(crate) struct Woken {
    pub(super) count: usize,
    pub(super) direct: Vec<ConnKey>,
}

impl Conn {
    /// Number of subscribed instruments.
    pub fn subscription_count(&self) -> usize {
        self.subs.len()
    }
}

/// What a timer entry does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimerKind {
    /// Send `token_expiring`.
    Expiring,
    /// Close with 4001.
    Expire,
    /// Send `shutdown` and close 1001: the connection's moment in the lame-duck phase
    /// (see [`ShardCore::lame_duck`]).
    LameDuck,
}

/// A timer entry: which connection (by key and serial, so a reused key is never hit) and
/// what to do.
#[derive(Debug, Clone, Copy)]
pub(super) struct TimerEvent {
    pub(super) key: ConnKey,
    pub(super) serial: u64,
    pub(super) kind: TimerKind,
}

/// A lame-duck phase under way on a shard (`ShardCore::lame_duck`): what its timers need
/// when they fire.
#[derive(Debug)]
pub(super) struct LameDuck {
    /// Upper bound of the jittered `reconnect_after_ms`.
    pub(super) reconnect_after_max_ms: u64,
    /// Connections told so far, on every shard: `Shutdown::lame_duck` reads it for its log
    /// line at the end of the phase (a counter, so nothing waits on the shards for it).
    pub(super) notified: Arc<std::sync::atomic::AtomicUsize>,
}

/// The shard's state.
#[derive(Debug)]
pub struct ShardCore {
    pub(super) catalog: Arc<Catalog>,
    pub(super) limits: CoreLimits,
    pub(super) conns: Slab<Conn>,
    /// `index[feed][instrument]` → subscribed connections.
    pub(super) index: Vec<Vec<Vec<ConnKey>>>,
    /// Throttled subscriptions (protocol v1.1 `max_rate`), grouped by instrument and rate.
    pub(super) throttles: super::groups::Throttles,
    pub(super) instr: Vec<Vec<InstrState>>,
    /// The epoch this shard is in, per feed (changes when a `Reset` is dispatched).
    pub(super) epochs: Vec<u64>,
    /// Whether a feed's slow-consumer policy is `conflate`.
    pub(super) conflate: Vec<bool>,
    pub(super) to_kill: Vec<ConnKey>,
    /// Connections whose backlog passed the budget, judged at the end of each cycle
    /// ([`ShardCore::end_cycle`]): slow consumers, or writes the shard owes.
    pub(super) over: Vec<ConnKey>,
    /// Set by `end_cycle` while a connection over the budget has a socket that takes data:
    /// the backlog is the shard's own doing (it dispatched faster than its writers could
    /// run), so it takes no ticks until the writers have caught up.
    pub(super) owing: bool,
    /// Writers woken by dispatch since the shard loop last asked (`take_woken`), and the
    /// connections whose frames the shard writes itself after the cycle.
    pub(super) woken: Woken,
    pub(super) subscriptions: usize,
    pub(super) draining: bool,
    /// Set while a lame-duck phase is under way: what its timers need when they fire.
    pub(super) lame_duck: Option<LameDuck>,
    /// Expiry and `token_expiring` timers: after the handshake, the only reader of `exp`.
    pub(super) wheel: TimerWheel<TimerEvent>,
    /// Monotonic origin of the wheel's clock.
    pub(super) origin: Instant,
    pub(super) next_serial: u64,
    pub(super) fired: Vec<TimerEvent>,
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
        let throttles = super::groups::Throttles::new(
            catalog.feeds().iter().map(|f| f.instrument_count()),
            limits.max_trades_per_update,
        );
        ShardCore {
            catalog,
            limits,
            conns: Slab::new(),
            index,
            throttles,
            instr,
            epochs,
            conflate,
            to_kill: Vec::new(),
            over: Vec::new(),
            owing: false,
            woken: Woken::default(),
            subscriptions: 0,
            draining: false,
            lame_duck: None,
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

    /// True once shutdown began: new connections are refused.
    pub fn is_draining(&self) -> bool {
        self.draining
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
    pub fn close(&mut self, key: ConnKey, why: Reason) {
        let subs: Vec<((u16, u32), Sub)> = match self.conns.get_mut(key) {
            Some(c) => {
                c.out.push_close(why.code(), why.reason());
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
        let ctx = self.queue_ctx(f);
        let (conns, index, over, stats, woken) =
            (&mut self.conns, &self.index, &mut self.over, &mut self.stats, &mut self.woken);
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
            }
            Self::queue(c, key, tick.feed_idx, tick.instr, seq, &tick.record, &ctx, over, stats, woken);
        }
        let live = index[f][i].len();
        if self.throttles.has(f, i) {
            self.dispatch_throttled(f, i, &tick.record);
            return live + self.throttles.groups_of(f, i);
        }
        live
    }

    /// What queueing a record to a connection of feed `f` needs besides the connection.
    #[inline]
    pub(super) fn queue_ctx(&self, f: usize) -> QueueCtx {
        let (max_batch, budget) = (self.limits.max_batch_bytes, self.limits.max_outbound_bytes);
        QueueCtx {
            conflate: self.conflate.get(f).copied().unwrap_or(false),
            budget,
            flush_at: WritePacer::flush_at(max_batch, budget),
            max_batch,
        }
    }

    /// Queues a record to one connection (live dispatch and throttled updates alike),
    /// under its feed's slow-consumer policy: a connection conflating on a `conflate` feed
    /// absorbs it, one it would take over the budget starts conflating, any other gets it
    /// and, over the budget, is judged at the end of the cycle. `expected` is the seq the
    /// connection expects next (below `rec`'s when a throttle skipped quotes).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn queue(
        c: &mut Conn,
        key: ConnKey,
        feed_idx: u16,
        instr: u32,
        expected: u64,
        rec: &Record,
        ctx: &QueueCtx,
        over: &mut Vec<ConnKey>,
        stats: &mut CoreStats,
        woken: &mut Woken,
    ) {
        let len = rec.len();
        if ctx.conflate {
            if let Some(cf) = c.rare.as_deref_mut().and_then(|r| r.conflation.as_mut()) {
                cf.absorb_after(feed_idx, instr, expected, rec);
                stats.conflated_records += 1;
                return;
            }
            if c.out.bytes() + len > ctx.budget {
                // Policy `conflate`: stop queueing this feed's records for the connection
                // until the writer has drained its queue (see `pop`).
                let mut cf = Conflation::default();
                cf.absorb_after(feed_idx, instr, expected, rec);
                c.rare.get_or_insert_with(Default::default).conflation = Some(cf);
                stats.conflate_episodes += 1;
                stats.conflated_records += 1;
                return;
            }
        }
        let before = c.out.bytes();
        let was_empty = c.out.is_empty();
        c.out.push_record(feed_idx, rec, ctx.max_batch);
        let after = c.out.bytes();
        if after > ctx.budget {
            // Judged at the end of the cycle: a slow consumer only if its socket stays
            // full; otherwise the shard owes the write and holds back intake.
            if !c.over {
                c.over = true;
                over.push(key);
                c.notify.notify_one();
                woken.count += 1;
            }
        } else if WritePacer::must_wake(was_empty, before, after, ctx.flush_at) {
            // A writer holding its write (`engine.write_delay_us`) must not sit on a
            // backlog until the slow-consumer budget closes a client that keeps up.
            // A connection with a direct port is written by the shard after the cycle.
            if c.direct.is_some() {
                if was_empty {
                    woken.direct.push(key);
                }
            } else {
                c.notify.notify_one();
                woken.count += 1;
            }
        }
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
        let (f, i) = (tick.feed_idx, tick.instr);
        self.source_gap_throttled(f as usize, i as usize, from, seq - 1);
        let Some(feed) = self.catalog.get(tick.feed_idx as usize) else { return };
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
            let was_empty = c.out.is_empty();
            c.out.push_text(gap_json(feed, i, (start, seq - 1), GapReason::SourceGap));
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
        // Held updates of throttled subscriptions belong to the old epoch: out first.
        self.reset_throttled(feed_idx);
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

    /// Applies decisions deferred during dispatch: which connections over the budget are
    /// slow consumers, and whether the shard owes writes (see [`ShardCore::owes`]). Call
    /// after a run of [`ShardCore::dispatch`], and again while [`ShardCore::owes`] or
    /// [`ShardCore::has_over`] holds, so a stall is judged even when no tick arrives.
    ///
    /// A connection over `max_outbound_bytes` is a **slow consumer** (policy
    /// `disconnect`: close 4008) when its writer has been blocked on a full socket for
    /// `slow_consumer_stall_ms`, or when its backlog reached twice the budget while the
    /// socket was full. While its socket is full for a shorter time, records keep being
    /// queued and nobody else waits for it. A connection over the budget whose socket
    /// takes data is behind only because its writer did not get the thread: the shard
    /// **owes** it and takes no ticks until every such backlog is down to half the budget
    /// (hysteresis, so intake does not flap at the limit). Ticks then wait in the inbound
    /// queue and, once it is full, in the sources: the server's own overload slows the
    /// publishers down instead of disconnecting clients that read as fast as they can.
    pub fn end_cycle(&mut self) {
        self.owing = false;
        if !self.over.is_empty() {
            let now = Instant::now();
            let stall = std::time::Duration::from_millis(self.limits.slow_consumer_stall_ms);
            let budget = self.limits.max_outbound_bytes;
            let mut over = std::mem::take(&mut self.over);
            let mut owing = false;
            over.retain(|&key| {
                let Some(c) = self.conns.get_mut(key) else { return false };
                let bytes = c.out.bytes();
                if c.out.is_closed() || bytes <= budget / 2 {
                    c.over = false;
                    return false;
                }
                // The socket stopped taking data when the writer has been waiting and the
                // kernel took nothing since it began to (or since its last accepted write).
                let stalled_since = c.blocked_since.map(|b| c.progress.as_ref().map_or(b, |p| p.last().max(b)));
                match stalled_since {
                    Some(since) if bytes > budget && (now - since >= stall || bytes > 2 * budget) => {
                        tracing::info!(
                            session = %c.session,
                            blocked_ms = (now - since).as_millis() as u64,
                            backlog_bytes = bytes,
                            "slow consumer: the socket stayed full with the backlog over the budget"
                        );
                        c.over = false;
                        self.to_kill.push(key);
                        false
                    }
                    // The socket is full, not for long yet: keep queueing, hold nobody.
                    Some(_) => true,
                    None => {
                        owing = true;
                        true
                    }
                }
            });
            self.over = over;
            self.owing = owing;
        }
        if self.to_kill.is_empty() {
            return;
        }
        let kills = std::mem::take(&mut self.to_kill);
        for key in kills {
            // Policy `disconnect`: the backlog is dropped, the close goes out as soon as
            // the socket takes it, and a writer stuck on the stalled socket is aborted.
            if self.conns.get(key).is_some_and(|c| !c.out.is_closed()) {
                self.stats.slow_disconnects += 1;
                self.terminate(key, Reason::SlowConsumer);
            }
        }
    }

    /// True while the shard owes writes (see [`ShardCore::end_cycle`]): the shard loop
    /// takes no ticks and lets the writers run.
    pub fn owes(&self) -> bool {
        self.owing
    }

    /// How many writers dispatch woke since the last call (the shard loop gives them their
    /// turn before a long cycle's successor).
    pub fn take_woken(&mut self) -> usize {
        std::mem::take(&mut self.woken.count)
    }

    /// True while some connection is over its budget (judged again at every
    /// [`ShardCore::end_cycle`]).
    pub fn has_over(&self) -> bool {
        !self.over.is_empty()
    }

    /// The writer of `key` is blocked on a write the socket does not take (`true`), or
    /// its writes complete again (`false`). Only the time the socket stays full makes a
    /// slow consumer.
    pub fn set_write_blocked(&mut self, key: ConnKey, blocked: bool) {
        if let Some(c) = self.conns.get_mut(key) {
            c.blocked_since = match (blocked, c.blocked_since) {
                (true, Some(since)) => Some(since),
                (true, None) => Some(Instant::now()),
                (false, _) => None,
            };
        }
    }

    /// The `max_bytes_per_s` a connection set (protocol v1.1 `throttle`), if any. None
    /// once a close is queued: the close (and what precedes it) is never held back.
    pub fn byte_rate(&self, key: ConnKey) -> Option<u64> {
        self.conns.get(key).filter(|c| !c.out.is_closed()).and_then(|c| c.byte_rate)
    }

    /// Tells the shard when the kernel takes `key`'s bytes (its socket's wrapper marks
    /// `progress`): a writer that waits while its socket keeps taking data is not stalled.
    pub fn track_writes(&mut self, key: ConnKey, progress: super::stall::WriteProgress) {
        if let Some(c) = self.conns.get_mut(key) {
            c.progress = Some(progress);
        }
    }

    /// Handles a parsed control message from a connection.
    pub fn handle(&mut self, key: ConnKey, msg: ClientMsg) {
        match msg {
            ClientMsg::Ping { id } => self.send(key, &ServerMsg::Pong { id, ts: now_ns() }),
            ClientMsg::Subscribe { id, feed, symbols, snapshot, resume, epoch, max_rate } => {
                self.subscribe(key, id, &feed, &symbols, snapshot, (resume, epoch), max_rate)
            }
            ClientMsg::Throttle { id, feed, symbols, max_rate, max_bytes_per_s } => {
                self.throttle(key, id, feed.as_deref(), symbols.as_deref(), max_rate, max_bytes_per_s)
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
                    c.out.push_text(gap_json(feed, i, (from, to), GapReason::SlowConsumer));
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
    use super::super::testkit::{self, tick};
    use super::*;
    use std::time::Duration;

    const BUDGET: usize = 4096;

    /// A core with a 4 KiB budget and one connection subscribed to `A`.
    fn one_subscriber() -> (ShardCore, ConnKey) {
        let mut core = testkit::core_with(CoreLimits {
            max_outbound_bytes: BUDGET,
            // Batches of 1 KiB: a backlog is several of them, so a writer can take part of it.
            max_batch_bytes: 1024,
            slow_consumer_stall_ms: 1000,
            ..testkit::limits()
        });
        let h = core.add_conn(Principal::unauthenticated("c", "i"), "s".into());
        core.handle(h.key, testkit::subscribe(&["A"]));
        testkit::drain(&mut core, h.key);
        (core, h.key)
    }

    /// Dispatches quotes of `A` from `*seq` on until the connection's backlog passes `bytes`.
    fn fill_past(core: &mut ShardCore, key: ConnKey, seq: &mut u64, bytes: usize) {
        while core.conns[key].out.bytes() <= bytes {
            *seq += 1;
            core.dispatch(&tick(*seq));
        }
    }

    fn closes(items: &[OutItem]) -> Vec<u16> {
        items
            .iter()
            .filter_map(|i| match i {
                OutItem::Close { code, .. } => Some(*code),
                _ => None,
            })
            .collect()
    }

    /// Over the budget while the socket takes data: the backlog is the shard's doing. Nobody
    /// is closed; the shard owes the write (takes no ticks) until the writer has brought
    /// the backlog down to half the budget.
    #[tokio::test(start_paused = true)]
    async fn over_budget_with_a_socket_that_takes_data_makes_the_shard_owe() {
        let (mut core, key) = one_subscriber();
        let mut seq = 0;
        fill_past(&mut core, key, &mut seq, BUDGET);
        core.end_cycle();
        assert!(core.owes() && core.has_over());
        // However long it takes the writer to get the thread.
        tokio::time::advance(Duration::from_secs(10)).await;
        core.end_cycle();
        assert!(core.owes(), "still owed, never a slow consumer");
        // The writer takes part of it: still above half the budget, still owed.
        while core.conns[key].out.bytes() > BUDGET * 3 / 4 {
            core.pop(key);
        }
        core.end_cycle();
        assert!(core.owes());
        let items = testkit::drain(&mut core, key);
        core.end_cycle();
        assert!(!core.owes() && !core.has_over());
        assert!(closes(&items).is_empty(), "{items:?}");
        assert_eq!(core.stats.slow_disconnects, 0);
        // Every record is there, in order, none dropped.
        let n: usize = items
            .iter()
            .map(|i| match i {
                OutItem::Batch(b) => b.count(),
                _ => 0,
            })
            .sum();
        assert!(n > 0);
    }

    /// A socket that stays full for `slow_consumer_stall_ms` with the backlog over the budget
    /// is a slow consumer: 4008, its backlog discarded. Before that it keeps getting records
    /// and the shard does not wait for it.
    #[tokio::test(start_paused = true)]
    async fn a_socket_full_for_the_stall_time_is_a_slow_consumer() {
        let (mut core, key) = one_subscriber();
        core.set_write_blocked(key, true);
        let mut seq = 0;
        fill_past(&mut core, key, &mut seq, BUDGET);
        core.end_cycle();
        assert!(!core.owes(), "a full socket holds nobody back");
        assert!(core.has_over());
        tokio::time::advance(Duration::from_millis(999)).await;
        seq += 1;
        core.dispatch(&tick(seq));
        core.end_cycle();
        assert_eq!(core.stats.slow_disconnects, 0, "not yet");
        tokio::time::advance(Duration::from_millis(1)).await;
        core.end_cycle();
        assert_eq!(core.stats.slow_disconnects, 1);
        assert!(!core.has_over());
        assert_eq!(closes(&testkit::drain(&mut core, key)), vec![4008]);
    }

    /// With a full socket, a backlog of twice the budget is a slow consumer at once: what
    /// one connection may hold stays bounded however fast the feed.
    #[tokio::test(start_paused = true)]
    async fn twice_the_budget_with_a_full_socket_is_a_slow_consumer_at_once() {
        let (mut core, key) = one_subscriber();
        core.set_write_blocked(key, true);
        let mut seq = 0;
        fill_past(&mut core, key, &mut seq, BUDGET);
        core.end_cycle();
        assert_eq!(core.stats.slow_disconnects, 0);
        fill_past(&mut core, key, &mut seq, 2 * BUDGET);
        core.end_cycle();
        assert_eq!(core.stats.slow_disconnects, 1);
        assert_eq!(closes(&testkit::drain(&mut core, key)), vec![4008]);
    }

    /// A writer that waits while the kernel keeps taking its bytes (a large flush drained
    /// piece by piece by a reader) is not stalled, however long the wait; once the kernel
    /// takes nothing for the stall time, it is.
    #[tokio::test(start_paused = true)]
    async fn a_socket_that_keeps_taking_data_is_not_stalled() {
        let (mut core, key) = one_subscriber();
        let progress = crate::engine::stall::WriteProgress::new();
        core.track_writes(key, progress.clone());
        core.set_write_blocked(key, true);
        let mut seq = 0;
        fill_past(&mut core, key, &mut seq, BUDGET);
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(600)).await;
            progress.mark();
            core.end_cycle();
        }
        assert_eq!(core.stats.slow_disconnects, 0, "6 s of waiting, the socket took data every 600 ms");
        tokio::time::advance(Duration::from_millis(1000)).await;
        core.end_cycle();
        assert_eq!(core.stats.slow_disconnects, 1);
    }

    /// A socket that took data again is judged afresh: an old stall does not count.
    #[tokio::test(start_paused = true)]
    async fn a_socket_that_takes_data_again_is_not_judged_on_an_old_stall() {
        let (mut core, key) = one_subscriber();
        core.set_write_blocked(key, true);
        tokio::time::advance(Duration::from_secs(5)).await;
        core.set_write_blocked(key, false);
        let mut seq = 0;
        fill_past(&mut core, key, &mut seq, BUDGET);
        core.end_cycle();
        assert_eq!(core.stats.slow_disconnects, 0);
        assert!(core.owes());
        // Blocked again: the stall counts from now.
        core.set_write_blocked(key, true);
        core.end_cycle();
        assert!(!core.owes());
        tokio::time::advance(Duration::from_millis(500)).await;
        core.end_cycle();
        assert_eq!(core.stats.slow_disconnects, 0);
        tokio::time::advance(Duration::from_millis(500)).await;
        core.end_cycle();
        assert_eq!(core.stats.slow_disconnects, 1);
    }
}
