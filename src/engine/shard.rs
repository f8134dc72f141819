//! A shard thread: a single-threaded tokio runtime that owns a [`ShardCore`], the
//! connections placed on it, and the loop that drains its inbound tick queue. Holds
//! [`ShardCtl`] (requests from other threads), the shard-local context behind
//! `super::stream::ShardHandle`, the thread's start (`spawn`, a dead shard ends the
//! process), the dispatch cycle and the stats flusher.
//!
//! Why a thread of its own with a current-thread runtime: the core, the connections'
//! outbound queues and the sockets all live on one thread, so the dispatch loop appends
//! to a connection's queue and the connection's writer task takes from it without any
//! synchronisation (`Rc<RefCell<_>>`, never held across an `.await`). The only
//! cross-thread traffic is the tick queue, the control channel and new sockets.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prometheus::local::LocalHistogram;
use tokio::sync::mpsc;
use tokio::task::LocalSet;

use super::core::{CoreLimits, ShardCore};
use super::stats::{CoreStats, GapReason, RefreshResult, ResumeResult};
use super::{Inbound, ShardInbox};
use crate::feeds::Catalog;
use crate::metrics::Metrics;

/// Most ticks dispatched before the loop yields to the writers: bounds the time writers
/// wait and is what turns bursts into one batch per connection.
const MAX_TICKS_PER_CYCLE: usize = 8192;

/// Most deliveries (ticks × their subscribers on this shard) in one cycle. The tick bound
/// alone let one cycle run for seconds on a shard with 10,000 subscribers of one
/// instrument (8,192 ticks × 10,000 copies): the writers, the stats flusher and the timers,
/// which share the thread, starved, and the subscribers got almost nothing while the core
/// was busy. 2^20 copies take roughly 10-30 ms; below that load nothing changes.
const MAX_DELIVERIES_PER_CYCLE: usize = 1 << 20;

/// Tasks a `LocalSet` runs between two polls of its `block_on` future (tokio's
/// `MAX_TASKS_PER_TICK`): one `yield_now` of the dispatch loop lets this many writers run.
const TASKS_PER_YIELD: usize = 61;

/// A dispatch cycle of at least this many deliveries is followed by a whole writers' round
/// (see the loop). Below it, the loop dispatches again after one yield, as soon as ticks are
/// there, which keeps latency low: a cycle this small takes well under a millisecond.
const FAIR_ROUND_DELIVERIES: usize = 1 << 16;

/// How often local counters are added to the shared Prometheus metrics.
const STATS_FLUSH: Duration = Duration::from_millis(100);

/// Requests to a shard from other threads.
#[derive(Debug)]
pub enum ShardCtl {
    /// Begin shutdown: `shutdown` + close 1001 to every connection.
    Shutdown {
        /// Upper bound of the jittered reconnect delay.
        reconnect_after_max_ms: u64,
    },
    /// Begin a lame-duck phase: `shutdown` + close 1001 to each connection at its own
    /// moment within `window_ms` (`ShardCore::lame_duck`); a `Shutdown` follows it.
    LameDuck {
        /// The length of the phase.
        window_ms: u64,
        /// Upper bound of the jittered reconnect delay.
        reconnect_after_max_ms: u64,
        /// Counts the connections told, across the shards.
        notified: Arc<std::sync::atomic::AtomicUsize>,
    },
    /// Close the connections of a subject or token id with 4003; replies with the count.
    Revoke {
        /// Subject to revoke.
        sub: Option<String>,
        /// Token id to revoke.
        jti: Option<String>,
        /// How many connections this shard closed.
        reply: tokio::sync::oneshot::Sender<usize>,
    },
    /// Lists the shard's connections for the admin view.
    ListConnections {
        /// The shard's connections.
        reply: tokio::sync::oneshot::Sender<Vec<super::stats::ConnInfo>>,
    },
    /// Stop the shard's runtime.
    Stop,
}

/// Applies a control request; returns false on `Stop`.
fn control(shard: &ShardLocal, msg: ShardCtl) -> bool {
    match msg {
        ShardCtl::Stop => return false,
        ShardCtl::Shutdown { reconnect_after_max_ms } => shard.core.borrow_mut().shutdown_all(reconnect_after_max_ms),
        ShardCtl::LameDuck { window_ms, reconnect_after_max_ms, notified } => {
            shard.core.borrow_mut().lame_duck(window_ms, reconnect_after_max_ms, notified)
        }
        ShardCtl::Revoke { sub, jti, reply } => {
            let n = shard.core.borrow_mut().revoke(sub.as_deref(), jti.as_deref());
            let _ = reply.send(n);
        }
        ShardCtl::ListConnections { reply } => {
            let _ = reply.send(shard.core.borrow().connection_infos(shard.id));
        }
    }
    true
}

/// Builds the future that serves one accepted socket on the shard (HTTP, then maybe a
/// stream). Provided by the server so the engine stays free of HTTP concerns.
pub type ServeFn = Arc<dyn Fn(tokio::net::TcpStream, SocketAddr) -> Pin<Box<dyn Future<Output = ()>>> + Send + Sync>;

/// The shard-local context; connection tasks reach it through
/// [`super::stream::current`], as a [`super::stream::ShardHandle`].
#[derive(Debug)]
pub(crate) struct ShardLocal {
    /// Shard number.
    pub(super) id: usize,
    /// The state: borrowed only by the shard loop and [`super::stream`], never across an
    /// `.await`.
    pub(super) core: RefCell<ShardCore>,
    /// The cross-thread side.
    pub(super) inbox: Arc<ShardInbox>,
    /// Fan-out latency observations, flushed with the counters.
    pub(super) latency: LocalHistogram,
    /// Records per batch written, flushed with the counters.
    pub(super) batch_records: LocalHistogram,
    /// Dispatch cycle durations, flushed with the counters.
    pub(super) cycle: LocalHistogram,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<ShardLocal>>> = const { RefCell::new(None) };
}

/// The shard that owns the calling thread, if it is a shard thread.
pub(super) fn current_local() -> Option<Rc<ShardLocal>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Everything a shard thread needs at start.
pub(super) struct ShardSpec {
    /// Shard number.
    pub id: usize,
    /// Inbound queue.
    pub inbox: Arc<ShardInbox>,
    /// Every shard's inbox (this one's too): their queued bytes make the server-wide
    /// outbound total (`super::budget`).
    pub all: Arc<[Arc<ShardInbox>]>,
    /// Control requests.
    pub ctl: mpsc::Receiver<ShardCtl>,
    /// Sockets placed on this shard.
    pub sockets: mpsc::Receiver<(std::net::TcpStream, SocketAddr)>,
    /// The feeds.
    pub catalog: Arc<Catalog>,
    /// Limits.
    pub limits: CoreLimits,
    /// Metrics.
    pub metrics: Metrics,
    /// Serves an accepted socket.
    pub serve: ServeFn,
}

/// Exit status of the process when a shard thread dies (EX_SOFTWARE): the supervisor
/// (systemd `Restart=`, a Kubernetes pod) restarts the node, and clients reconnect and
/// resume on the new epoch.
pub const SHARD_DEATH_EXIT_CODE: i32 = 70;

/// Starts a shard thread.
///
/// **A shard that dies ends the process** (logged at error level naming the shard, exit
/// status [`SHARD_DEATH_EXIT_CODE`]). A shard owns its connections' sockets, outbound
/// queues, subscriptions and timers, and nothing else holds them: a new shard could not
/// take them over, and a process with one shard missing stalls every feed (the sources
/// wait for its queue) or silently serves part of its clients. Under a supervisor the
/// cheapest correct recovery is a restart of the node.
///
/// Why `catch_unwind` around the shard's loop and not `panic = "abort"`: a panic in one
/// connection's task is contained by tokio (that task ends, the shard lives on), which
/// `abort` would turn into the loss of every connection of the node; and catching the
/// panic here lets the log say which shard died and the process end with a status of its
/// own. The cost: the unwinding itself must not panic again (it only drops the shard's
/// state), and an abort of the process in between is the same outcome anyway.
pub(super) fn spawn(spec: ShardSpec) -> std::io::Result<std::thread::JoinHandle<()>> {
    let id = spec.id;
    std::thread::Builder::new().name(format!("tickgate-shard-{id}")).spawn(move || {
        // Marks the inbox dead however the thread ends, so no source waits for it.
        struct Alive(Arc<ShardInbox>);
        impl Drop for Alive {
            fn drop(&mut self) {
                self.0.mark_dead();
            }
        }
        let alive = Alive(spec.inbox.clone());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let local = LocalSet::new();
            local.block_on(&rt, run(spec));
            // Dropping the runtime cancels whatever connection tasks outlived the drain.
            Ok::<(), std::io::Error>(())
        }));
        drop(alive);
        let why = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => format!("cannot build its runtime: {e}"),
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned());
                format!("panicked: {msg}")
            }
        };
        tracing::error!(
            shard = id,
            exit_code = SHARD_DEATH_EXIT_CODE,
            "shard {id} died ({why}); stopping the process so its supervisor restarts it"
        );
        std::process::exit(SHARD_DEATH_EXIT_CODE);
    })
}

/// Test-only fault injection, read once from `TICKGATE_TEST_FAULT` at the first shard
/// start: `shard_panic_after_ms:MS[:SHARD]` makes shard `SHARD` (default 0) panic in its
/// dispatch loop `MS` after it started. An operator's environment, never a client, can
/// arm it; it exists so tests can check what a dead shard does to the process. Anything
/// else in the variable is logged and ignored.
pub const TEST_FAULT_ENV: &str = "TICKGATE_TEST_FAULT";

fn test_fault_for(id: usize) -> Option<Duration> {
    static FAULT: std::sync::OnceLock<Option<(usize, Duration)>> = std::sync::OnceLock::new();
    let fault = FAULT.get_or_init(|| {
        let v = std::env::var(TEST_FAULT_ENV).ok()?;
        let parsed = v.strip_prefix("shard_panic_after_ms:").and_then(|rest| {
            let mut parts = rest.split(':');
            let ms = parts.next()?.parse::<u64>().ok()?;
            let shard = match parts.next() {
                Some(s) => s.parse::<usize>().ok()?,
                None => 0,
            };
            parts.next().is_none().then_some((shard, Duration::from_millis(ms)))
        });
        match parsed {
            Some(f) => tracing::warn!(
                shard = f.0,
                after_ms = f.1.as_millis() as u64,
                "{TEST_FAULT_ENV} is set: this shard will panic (test-only fault injection)"
            ),
            None => tracing::error!("{TEST_FAULT_ENV}={v:?} is not `shard_panic_after_ms:MS[:SHARD]`; ignored"),
        }
        parsed
    });
    fault.and_then(|(shard, after)| (shard == id).then_some(after))
}

async fn run(spec: ShardSpec) {
    let ShardSpec { id, inbox, all, mut ctl, mut sockets, catalog, limits, metrics, serve } = spec;
    let total_budget = limits.max_outbound_total_bytes;
    metrics.outbound_budget.set(total_budget as i64);
    let shard = Rc::new(ShardLocal {
        id,
        core: RefCell::new(ShardCore::new(catalog.clone(), limits)),
        inbox: inbox.clone(),
        latency: metrics.fanout_latency.local(),
        batch_records: metrics.batch_records.local(),
        cycle: metrics.dispatch_cycle.with_label_values(&[&id.to_string()]).local(),
    });
    CURRENT.with(|c| *c.borrow_mut() = Some(shard.clone()));

    // Accept loop: sockets handed over by the listener are re-registered with this
    // thread's reactor, so their readiness events are handled here.
    let accept_serve = serve.clone();
    tokio::task::spawn_local(async move {
        while let Some((std_stream, peer)) = sockets.recv().await {
            match tokio::net::TcpStream::from_std(std_stream) {
                Ok(stream) => {
                    tokio::task::spawn_local((accept_serve)(stream, peer));
                }
                Err(e) => tracing::warn!(error = %e, "cannot register accepted socket"),
            }
        }
    });

    // Stats flusher.
    let flush_shard = shard.clone();
    let flush_metrics = metrics.clone();
    // What was already added to the shared metrics: one record for the periodic flusher and
    // the final flush at stop, so nothing is ever counted twice.
    let flushed = Rc::new(RefCell::new(CoreStats::default()));
    let flushed_periodic = flushed.clone();
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(STATS_FLUSH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let label = flush_shard.id.to_string();
        let (cpu_total, busy) = (
            flush_metrics.shard_cpu.with_label_values(&[&label]),
            flush_metrics.shard_busy.with_label_values(&[&label]),
        );
        let mut cpu = ThreadCpu::default();
        loop {
            tick.tick().await;
            flush_stats(&flush_shard, &flush_metrics, &mut flushed_periodic.borrow_mut());
            enforce_budget(&flush_shard, &all, total_budget);
            // The flusher runs on the shard's thread, so this is the shard's CPU time.
            if let Some((cpu_s, ratio)) = cpu.sample() {
                cpu_total.inc_by(cpu_s);
                busy.set(ratio);
            }
        }
    });

    // Dispatch loop. Timers (token expiry) are advanced here too, between dispatch cycles,
    // so an expiry and a batch can never interleave: a close decided at a tick discards
    // what was queued before it, and nothing is queued for the connection after it.
    let mut timer_tick = tokio::time::interval(Duration::from_millis(10));
    timer_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let fault_at = test_fault_for(id).map(|after| tokio::time::Instant::now() + after);
    // Since when the current pass of the loop has held back intake (the shard owed writes).
    let mut paused_since: Option<std::time::Instant> = None;
    loop {
        if fault_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
            panic!("{TEST_FAULT_ENV}: shard {id} panics on purpose");
        }
        let cycle_started = std::time::Instant::now();
        let (n, owes, over, yields) = {
            let mut core = shard.core.borrow_mut();
            // A shard that owes writes (`ShardCore::end_cycle`) takes no ticks: they wait
            // in the inbound queue and, once it is full, in the sources, so the server's
            // own overload slows its publishers instead of closing clients that keep up.
            let (n, deliveries) = if core.owes() { (0, 0) } else { dispatch_cycle(&mut core, &inbox.queue) };
            // Throttled subscriptions' updates that came due (after the cycle: an update
            // carries what it dispatched). Not while the shard owes writes: what they hold
            // is bounded and waits, like the ticks.
            if !core.owes() && core.next_throttle_due().is_some() {
                core.flush_throttled(tokio::time::Instant::now());
            }
            // The frames this cycle queued for connections the shard writes itself go out
            // now, before the cycle is judged: what the sockets took is no backlog.
            if !core.woken.direct.is_empty() {
                super::direct::write_queued(&mut core, &shard.latency, &shard.batch_records);
            }
            let woken = core.take_woken();
            core.end_cycle();
            core.advance_timers();
            if let Some(t) = paused_since.take() {
                core.stats.intake_paused_ns += t.elapsed().as_nanos() as u64;
            }
            let owes = core.owes();
            if owes {
                paused_since = Some(std::time::Instant::now());
            }
            // After a long cycle, every writer it woke gets its turn before the next one:
            // the loop is the LocalSet's `block_on` future, polled again after every 61
            // tasks, so with 1,000 connections and cycles of 2^20 deliveries a writer waited
            // 16 cycles (seconds) while its socket sat empty, and looked like a slow consumer.
            let yields = if deliveries >= FAIR_ROUND_DELIVERIES { woken.div_ceil(TASKS_PER_YIELD).max(1) } else { 1 };
            (n, owes, core.has_over(), yields)
        };
        match ctl.try_recv() {
            Ok(msg) => {
                if !control(&shard, msg) {
                    break;
                }
            }
            // Every owner of the control channel is gone (the `EngineHandle` was dropped):
            // nobody can stop this shard any more, so it stops now.
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        if n > 0 || owes {
            if n > 0 {
                shard.cycle.observe(cycle_started.elapsed().as_secs_f64());
            }
            // Let the writers woken by this cycle take their batches; ticks arriving
            // meanwhile form the next cycle, which is what batches under load. While the
            // shard owes writes, this is all the loop does: the writers it owes are ready
            // to run (a writer blocked on its socket does not make the shard owe).
            for _ in 0..yields {
                tokio::task::yield_now().await;
            }
            continue;
        }
        // A connection over its budget with a full socket is judged again every timer tick
        // until it drains or turns out to be a slow consumer, even when no tick arrives.
        let timers = over || shard.core.borrow().timer_tick().is_some();
        // The next update of a throttled subscription, if something is held for one.
        let throttle_due = shard.core.borrow().next_throttle_due();
        tokio::select! {
            _ = inbox.notify.notified() => {}
            _ = timer_tick.tick(), if timers => {}
            _ = tokio::time::sleep_until(throttle_due.unwrap_or_else(tokio::time::Instant::now)), if throttle_due.is_some() => {}
            _ = tokio::time::sleep_until(fault_at.unwrap_or_else(tokio::time::Instant::now)), if fault_at.is_some() => {}
            msg = ctl.recv() => match msg {
                None => break,
                Some(msg) => {
                    if !control(&shard, msg) {
                        break;
                    }
                }
            },
        }
    }
    flush_stats(&shard, &metrics, &mut flushed.borrow_mut());
    CURRENT.with(|c| *c.borrow_mut() = None);
}

/// One dispatch cycle: takes ticks and resets from the queue until it is empty or the
/// cycle's bounds (ticks, deliveries) are reached; returns how many entries it took and
/// how many deliveries they made.
///
/// Also records how long the last tick had waited since ingest (`dispatch_lag_ns`), 0 when
/// the cycle emptied the queue: the shard is keeping up.
fn dispatch_cycle(core: &mut ShardCore, queue: &crossbeam_queue::ArrayQueue<Inbound>) -> (usize, usize) {
    let (mut n, mut deliveries, mut last_recv_ns) = (0, 0, None);
    while n < MAX_TICKS_PER_CYCLE && deliveries < MAX_DELIVERIES_PER_CYCLE {
        match queue.pop() {
            Some(Inbound::Tick(t)) => {
                deliveries += core.dispatch(&t);
                last_recv_ns = Some(t.record.ts_recv_ns());
            }
            Some(Inbound::Reset { feed_idx, epoch }) => core.reset(feed_idx, epoch),
            None => {
                core.stats.dispatch_lag_ns = 0;
                return (n, deliveries);
            }
        }
        n += 1;
    }
    if let Some(recv) = last_recv_ns {
        core.stats.dispatch_lag_ns = (tickgate_proto::now_ns() as i64).saturating_sub(recv).max(0) as u64;
    }
    (n, deliveries)
}

/// Samples the CPU time of the calling thread from `/proc/thread-self/schedstat` (Linux;
/// elsewhere nothing is sampled): the shard's busy ratio without any unsafe code.
#[derive(Debug, Default)]
struct ThreadCpu {
    last: Option<(std::time::Instant, u64)>,
}

impl ThreadCpu {
    /// CPU seconds since the previous sample and their share of the wall time between
    /// the two; `None` on the first call or when the file cannot be read.
    fn sample(&mut self) -> Option<(f64, f64)> {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
        let now = std::time::Instant::now();
        let prev = self.last.replace((now, ns))?;
        let cpu_s = ns.saturating_sub(prev.1) as f64 / 1e9;
        let wall_s = now.duration_since(prev.0).as_secs_f64();
        Some((cpu_s, if wall_s > 0.0 { (cpu_s / wall_s).min(1.0) } else { 0.0 }))
    }
}

/// When the server's total is over `budget`, sheds this shard's share of the excess from
/// its largest backlogs (`super::budget`). Runs right after [`flush_stats`], which
/// published every shard's queued bytes (one pass over the connections per flush).
fn enforce_budget(shard: &ShardLocal, all: &[Arc<ShardInbox>], budget: usize) {
    let mine = shard.inbox.queued_bytes.load(Ordering::Relaxed);
    let total: usize = all.iter().map(|i| i.queued_bytes.load(Ordering::Relaxed)).sum();
    let want = super::budget::share(mine, total, budget);
    if want > 0 {
        let shed = shard.core.borrow_mut().shed(want);
        // What was dropped no longer counts, so the other shards see the new total.
        shard.inbox.queued_bytes.store(mine.saturating_sub(shed), Ordering::Relaxed);
    }
}

/// Adds the counters' growth since `last` to the shared metrics.
fn flush_stats(shard: &ShardLocal, metrics: &Metrics, last: &mut CoreStats) {
    // Adds a labelled counter's growth; a label whose count did not move is not touched
    // (looking a label up costs a hash and a lock in the prometheus crate).
    fn bump(vec: &prometheus::IntCounterVec, label: &str, now: u64, before: u64) {
        if now > before {
            vec.with_label_values(&[label]).inc_by(now - before);
        }
    }
    let core = shard.core.borrow();
    let now = core.stats.clone();
    for (fi, feed) in core.catalog().feeds().iter().enumerate() {
        bump(&metrics.records_delivered, feed.name(), now.delivered[fi], last.delivered.get(fi).copied().unwrap_or(0));
    }
    metrics.frames_sent.inc_by(now.frames - last.frames);
    metrics.bytes_sent.inc_by(now.bytes - last.bytes);
    metrics.socket_flushes.inc_by(now.flushes - last.flushes);
    bump(&metrics.slow_consumer_events, "disconnect", now.slow_disconnects, last.slow_disconnects);
    bump(&metrics.slow_consumer_events, "conflate", now.conflate_episodes, last.conflate_episodes);
    bump(&metrics.outbound_budget_sheds, "disconnect", now.budget_disconnects, last.budget_disconnects);
    bump(&metrics.outbound_budget_sheds, "conflate", now.budget_conflations, last.budget_conflations);
    metrics.conflated_records.inc_by(now.conflated_records - last.conflated_records);
    metrics.throttle_updates.inc_by(now.throttle_updates - last.throttle_updates);
    metrics.throttle_replaced.inc_by(now.throttle_replaced - last.throttle_replaced);
    for (k, reason) in GapReason::ALL.iter().enumerate() {
        bump(&metrics.gaps_sent, reason.as_str(), now.gaps[k], last.gaps[k]);
    }
    metrics.replayed_records.inc_by(now.replayed_records - last.replayed_records);
    for (k, result) in ResumeResult::ALL.iter().enumerate() {
        bump(&metrics.resumes, result.as_str(), now.resumes[k], last.resumes[k]);
    }
    metrics.epoch_resets.inc_by(now.resets - last.resets);
    for (code, n) in &now.control_errors {
        let before = last.control_errors.iter().find(|(c, _)| c == code).map(|(_, n)| *n).unwrap_or(0);
        bump(&metrics.control_errors, code.as_str(), *n, before);
    }
    for r in RefreshResult::ALL {
        bump(&metrics.token_refreshes, r.as_str(), now.refreshes(r), last.refreshes(r));
    }
    metrics.source_gaps.inc_by(now.source_gaps - last.source_gaps);
    metrics.token_expiries.inc_by(now.expiries - last.expiries);
    metrics.revocations.inc_by(now.revocations - last.revocations);
    let label = shard.id.to_string();
    metrics
        .intake_paused
        .with_label_values(&[&label])
        .inc_by(now.intake_paused_ns.saturating_sub(last.intake_paused_ns) as f64 / 1e9);
    metrics.dispatch_lag.with_label_values(&[&label]).set(now.dispatch_lag_ns as f64 / 1e9);
    shard.inbox.timers.store(core.timer_count(), Ordering::Relaxed);
    let queued = core.queued_bytes();
    shard.inbox.queued_bytes.store(queued, Ordering::Relaxed);
    metrics.outbound_queued_bytes.with_label_values(&[&label]).set(queued as i64);
    shard.inbox.subscriptions.store(core.subscription_count(), Ordering::Relaxed);
    drop(core);
    shard.latency.flush();
    shard.batch_records.flush();
    shard.cycle.flush();
    *last = now;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::validate::Principal;
    use crate::engine::{testkit, Tick};
    use tickgate_proto::codec::{Body, Quote, Record};

    /// A shard core with `conns` subscribers of instrument A (and none of B).
    fn core_with(conns: usize) -> ShardCore {
        let mut core = testkit::core_with(CoreLimits { max_outbound_bytes: 1 << 30, ..testkit::limits() });
        for i in 0..conns {
            let h = core.add_conn(Principal::unauthenticated(&format!("c{i}"), "i"), format!("s{i}"));
            core.handle(h.key, testkit::subscribe(&["A"]));
        }
        core
    }

    fn fill(queue: &crossbeam_queue::ArrayQueue<Inbound>, instr: u32, ticks: u64) {
        for seq in 1..=ticks {
            let record = Record::encode(1, instr + 1, seq, 0, 0, &Body::Quote(Quote::default()), 0);
            assert!(queue.push(Inbound::Tick(Tick { feed_idx: 0, instr, record })).is_ok());
        }
    }

    /// A cycle ends at the delivery bound, however few ticks that is, so the writers, the
    /// stats flusher and the timers on the shard's thread are never starved for long; ticks
    /// nobody on the shard subscribes to cost no delivery and only the tick bound applies.
    #[test]
    fn a_cycle_is_bounded_by_deliveries_and_by_ticks() {
        let mut core = core_with(1000);
        let queue = crossbeam_queue::ArrayQueue::new(3 * MAX_TICKS_PER_CYCLE);
        fill(&queue, 0, 3000);
        // 1,049 ticks × 1,000 subscribers: the first cycle to reach 2^20 deliveries.
        let per_cycle = MAX_DELIVERIES_PER_CYCLE.div_ceil(1000);
        assert_eq!(dispatch_cycle(&mut core, &queue).0, per_cycle);
        assert_eq!(queue.len(), 3000 - per_cycle);
        while queue.pop().is_some() {}

        fill(&queue, 1, 2 * MAX_TICKS_PER_CYCLE as u64);
        assert_eq!(dispatch_cycle(&mut core, &queue).0, MAX_TICKS_PER_CYCLE);
        assert_eq!(dispatch_cycle(&mut core, &queue).0, MAX_TICKS_PER_CYCLE);
        assert_eq!(dispatch_cycle(&mut core, &queue).0, 0);
    }
}
