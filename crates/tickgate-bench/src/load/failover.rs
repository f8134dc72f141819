//! `tickgate load --role failover`: the reconnect curve of a killed edge's clients
//! (issue #14, `benches/failover.sh`).
//!
//! N subscribers hold one connection each through a balancer (HAProxy in front of several
//! edges). After they are all streaming and a steady window (`--warmup`) has passed, the
//! process kills an edge (`--kill-pid`, SIGKILL: no lame duck, no close frames) and from
//! then on watches for `--seconds`. The connections that close are that edge's clients;
//! each reconnects the way a client should: after a jittered delay (or the server's
//! `reconnect_after_ms`, when a `shutdown` came first), with exponential backoff and full
//! jitter on failures, and subscribes with `resume` (its epoch and last seqs from the
//! client library's tracker). A moved client is *streaming again* at its first live
//! (not REPLAY) record; it resumed *clean* when its tracker saw no gap, duplicate or
//! stray and no `gap` message came after the kill, i.e. the replays were exactly what it
//! missed. The summary has the curve (seconds since the kill → clients streaming again),
//! percentiles of the time to streaming again, and the live latency of every client
//! before and after the kill (the survivors absorbing the storm).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{latency_us, new_histogram, own_cpu_seconds, source_ip, LoadError};
use tickgate_client::{ConnectOptions, Event, Subscriber};
use tickgate_proto::codec::{FLAG_REPLAY, FLAG_SNAPSHOT};
use tickgate_proto::control::ServerMsg;
use tickgate_proto::now_ns;

/// Settings of a failover run.
#[derive(Debug, Clone)]
pub struct FailoverOptions {
    /// Stream URL, normally the balancer's.
    pub url: String,
    /// Access token (every edge accepts it).
    pub token: String,
    /// Connections to hold.
    pub connections: usize,
    /// Feed to subscribe to.
    pub feed: String,
    /// Symbols (or `*`); every connection takes all of them.
    pub symbols: Vec<String>,
    /// Steady streaming before the kill (its latency is the `before` figure).
    pub steady: Duration,
    /// How long to watch after the kill.
    pub after: Duration,
    /// The edge to SIGKILL; without it the first connection close is taken as the kill.
    pub kill_pid: Option<u32>,
    /// Source addresses 127.0.0.1 ..= 127.0.0.N.
    pub source_ips: u8,
    /// Handshakes in flight at once while first connecting (reconnects are not gated: a
    /// storm is what is measured).
    pub connect_concurrency: usize,
    /// First reconnect after a uniformly random delay below this (ms).
    pub reconnect_jitter_ms: u64,
    /// Backoff cap (ms): a failed attempt doubles the jitter window up to this.
    pub reconnect_max_ms: u64,
    /// Print a progress line every second on stderr.
    pub progress: bool,
}

/// One point of the reconnect curve: how many of the killed edge's clients were back by
/// `t_s` seconds after the kill.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CurvePoint {
    /// Seconds since the kill.
    pub t_s: u64,
    /// Clients whose `subscribe` with resume had been sent on a new connection by then.
    pub resubscribed: usize,
    /// Clients that had received their first live record after reconnecting by then.
    pub streaming_again: usize,
    /// `streaming_again` over the clients that were on the killed edge.
    pub fraction: f64,
}

/// Live deliveries over a window.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Window {
    /// Seconds.
    pub seconds: f64,
    /// Live records received by all clients together, per second.
    pub records_per_s: f64,
    /// Latency against each record's event time, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Maximum, µs.
    pub max_us: f64,
}

/// The JSON summary of a failover run.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverSummary {
    /// Always `failover`.
    pub role: String,
    /// Connections streaming before the kill.
    pub connections: usize,
    /// Connections that failed to subscribe at the start.
    pub failed: usize,
    /// The killed process, if this process killed it.
    pub kill_pid: Option<u32>,
    /// Connections that closed after the kill: the killed edge's clients.
    pub moved: usize,
    /// Connections that closed before the kill (should be 0).
    pub closed_before_kill: usize,
    /// Moved clients streaming again (a live record after reconnecting) by the end.
    pub streaming_again: usize,
    /// Moved clients streaming again whose resume was gap-free: no `gap` message, no
    /// silent gap, duplicate or stray record after the kill.
    pub resumed_clean: usize,
    /// Records flagged REPLAY the moved clients received (what they missed).
    pub replayed_records: u64,
    /// `gap` messages after the kill (all clients).
    pub gaps_after_kill: u64,
    /// Delivery violations seen by the trackers after the kill (all clients).
    pub anomalies_after_kill: u64,
    /// Reconnect attempts, and of them the failed ones (refused, 503, closed early).
    pub reconnect_attempts: u64,
    /// Failed reconnect attempts.
    pub failed_attempts: u64,
    /// Seconds from the kill to the first close seen (how fast the balancer passed it on).
    pub first_close_s: Option<f64>,
    /// Seconds from the kill until the last moved client was streaming again (None when
    /// not all were).
    pub all_streaming_s: Option<f64>,
    /// Percentiles of the time from the kill to streaming again, seconds.
    pub streaming_p50_s: Option<f64>,
    /// 90th percentile.
    pub streaming_p90_s: Option<f64>,
    /// 99th percentile.
    pub streaming_p99_s: Option<f64>,
    /// Whether every moved client was streaming again, resumed clean, within 10 s.
    pub within_10s: bool,
    /// Per second since the kill.
    pub curve: Vec<CurvePoint>,
    /// Live deliveries in the steady window before the kill.
    pub before: Window,
    /// Live deliveries from the kill to the end.
    pub after: Window,
    /// Seconds from the first connect to the last first `subscribed`.
    pub connect_s: f64,
    /// CPU seconds this process used, from the first connect to the end (the clients'
    /// side of the machine's budget).
    pub client_cpu_s: Option<f64>,
}

/// What one connection's task hands back.
#[derive(Debug, Default, Clone)]
struct ConnReport {
    failed: bool,
    closed_before_kill: bool,
    /// Since the kill: when this connection closed (first time after the kill).
    moved_at: Option<Duration>,
    /// Since the kill: the latest resubscription after a close.
    resubscribed_at: Option<Duration>,
    /// Since the kill: the first live record after the latest reconnect.
    live_again_at: Option<Duration>,
    replayed: u64,
    gaps_after_kill: u64,
    anomalies_after_kill: u64,
    attempts: u64,
    failed_attempts: u64,
}

/// Phases of the run, for what the records count towards.
const CONNECTING: u8 = 0;
const STEADY: u8 = 1;
const AFTER_KILL: u8 = 2;

struct Shared {
    phase: AtomicU8,
    /// The kill (or, without `kill_pid`, the first close).
    t0: OnceLock<Instant>,
    records: [AtomicU64; 3],
    hist: [Mutex<Histogram<u64>>; 3],
    moved: AtomicUsize,
    live_again: AtomicUsize,
    stop: CancellationToken,
}

impl Shared {
    fn since_t0(&self) -> Option<Duration> {
        self.t0.get().map(Instant::elapsed)
    }
}

/// Runs the failover measurement.
pub async fn run(o: FailoverOptions) -> Result<FailoverSummary, LoadError> {
    let hist = || new_histogram().map(Mutex::new);
    let sh = Arc::new(Shared {
        phase: AtomicU8::new(CONNECTING),
        t0: OnceLock::new(),
        records: Default::default(),
        hist: [hist()?, hist()?, hist()?],
        moved: AtomicUsize::new(0),
        live_again: AtomicUsize::new(0),
        stop: CancellationToken::new(),
    });
    let o = Arc::new(o);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(o.connections.max(1));
    let gate = Arc::new(tokio::sync::Semaphore::new(o.connect_concurrency.max(1)));
    let started = Instant::now();
    let cpu_started = own_cpu_seconds();
    let tasks: Vec<_> = (0..o.connections)
        .map(|i| {
            let ip = source_ip(i, 1, o.source_ips);
            tokio::spawn(connection(o.clone(), ip, sh.clone(), ready_tx.clone(), gate.clone()))
        })
        .collect();
    drop(ready_tx);
    let (mut ready, mut failed) = (0, 0);
    while ready + failed < o.connections {
        match ready_rx.recv().await {
            Some(Ok(())) => ready += 1,
            Some(Err(e)) => {
                if failed < 5 {
                    eprintln!("subscriber failed: {e}");
                }
                failed += 1;
            }
            None => break,
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    if o.progress {
        eprintln!("{ready} connections streaming ({failed} failed) in {connect_s:.2} s; steady for {:?}", o.steady);
    }
    // A second for the first records of the last connections, then the steady window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sh.phase.store(STEADY, Ordering::Release);
    let steady_started = Instant::now();
    tokio::time::sleep(o.steady).await;
    let steady_s = steady_started.elapsed().as_secs_f64();
    sh.phase.store(AFTER_KILL, Ordering::Release);
    if let Some(pid) = o.kill_pid {
        let _ = sh.t0.set(Instant::now());
        let status = tokio::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().await?;
        if !status.success() {
            return Err(LoadError::Args(format!("kill -KILL {pid} failed ({status})")));
        }
        if o.progress {
            eprintln!("killed {pid}; watching {:?}", o.after);
        }
    }
    let after_started = Instant::now();
    while after_started.elapsed() < o.after {
        let left = o.after.saturating_sub(after_started.elapsed());
        tokio::time::sleep(Duration::from_secs(1).min(left)).await;
        if o.progress {
            eprintln!(
                "t={:>3.0}s  moved={}  streaming again={}",
                sh.since_t0().unwrap_or_default().as_secs_f64(),
                sh.moved.load(Ordering::Relaxed),
                sh.live_again.load(Ordering::Relaxed)
            );
        }
    }
    let after_s = after_started.elapsed().as_secs_f64();
    sh.stop.cancel();
    let mut reports = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(r) = t.await {
            reports.push(r);
        }
    }
    let window = |phase: usize, seconds: f64| -> Window {
        let h = sh.hist[phase].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = sh.records[phase].load(Ordering::Relaxed);
        Window {
            seconds,
            records_per_s: if seconds > 0.0 { n as f64 / seconds } else { 0.0 },
            p50_us: h.value_at_quantile(0.5) as f64,
            p99_us: h.value_at_quantile(0.99) as f64,
            max_us: h.max() as f64,
        }
    };
    let mut summary =
        summarize(&reports, &o, window(STEADY as usize, steady_s), window(AFTER_KILL as usize, after_s), connect_s);
    summary.client_cpu_s = cpu_started.zip(own_cpu_seconds()).map(|(b, a)| a - b);
    Ok(summary)
}

/// The summary from the connections' reports (their times are relative to the kill).
fn summarize(
    reports: &[ConnReport],
    o: &FailoverOptions,
    before: Window,
    after: Window,
    connect_s: f64,
) -> FailoverSummary {
    let moved: Vec<&ConnReport> = reports.iter().filter(|r| r.moved_at.is_some()).collect();
    let mut live: Vec<f64> = moved.iter().filter_map(|r| r.live_again_at).map(|d| d.as_secs_f64()).collect();
    live.sort_by(f64::total_cmp);
    let resub: Vec<f64> = moved.iter().filter_map(|r| r.resubscribed_at).map(|d| d.as_secs_f64()).collect();
    let clean = moved
        .iter()
        .filter(|r| r.live_again_at.is_some() && r.gaps_after_kill == 0 && r.anomalies_after_kill == 0)
        .count();
    let seconds = o.after.as_secs().max(1);
    let all_streaming_s = (!moved.is_empty() && live.len() == moved.len()).then(|| live.last().copied()).flatten();
    FailoverSummary {
        role: "failover".into(),
        connections: reports.iter().filter(|r| !r.failed).count(),
        failed: reports.iter().filter(|r| r.failed).count(),
        kill_pid: o.kill_pid,
        moved: moved.len(),
        closed_before_kill: reports.iter().filter(|r| r.closed_before_kill).count(),
        streaming_again: live.len(),
        resumed_clean: clean,
        replayed_records: moved.iter().map(|r| r.replayed).sum(),
        gaps_after_kill: reports.iter().map(|r| r.gaps_after_kill).sum(),
        anomalies_after_kill: reports.iter().map(|r| r.anomalies_after_kill).sum(),
        reconnect_attempts: reports.iter().map(|r| r.attempts).sum(),
        failed_attempts: reports.iter().map(|r| r.failed_attempts).sum(),
        first_close_s: moved.iter().filter_map(|r| r.moved_at).min().map(|d| d.as_secs_f64()),
        all_streaming_s,
        streaming_p50_s: quantile(&live, 0.5),
        streaming_p90_s: quantile(&live, 0.9),
        streaming_p99_s: quantile(&live, 0.99),
        within_10s: clean == moved.len() && all_streaming_s.is_some_and(|s| s <= 10.0),
        curve: curve(&resub, &live, moved.len(), seconds),
        before,
        after,
        connect_s,
        client_cpu_s: None,
    }
}

/// The value at quantile `q` of sorted `xs` (nearest rank), if any.
fn quantile(xs: &[f64], q: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    Some(xs[rank - 1])
}

/// Per whole second 1..=`seconds` since the kill: how many had resubscribed and how many
/// were streaming again by then, out of `moved`.
fn curve(resubscribed: &[f64], streaming: &[f64], moved: usize, seconds: u64) -> Vec<CurvePoint> {
    (1..=seconds)
        .map(|t| {
            let by = |xs: &[f64]| xs.iter().filter(|&&x| x <= t as f64).count();
            let streaming_again = by(streaming);
            CurvePoint {
                t_s: t,
                resubscribed: by(resubscribed),
                streaming_again,
                fraction: if moved > 0 { streaming_again as f64 / moved as f64 } else { 0.0 },
            }
        })
        .collect()
}

/// One connection: subscribe, stream, and on every close reconnect with resume.
async fn connection(
    o: Arc<FailoverOptions>,
    ip: IpAddr,
    sh: Arc<Shared>,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
    gate: Arc<tokio::sync::Semaphore>,
) -> ConnReport {
    let mut rep = ConnReport::default();
    let copts = ConnectOptions { local_ip: Some(ip), ..ConnectOptions::default() };
    let symbols: Vec<&str> = o.symbols.iter().map(String::as_str).collect();
    let mut permit = gate.acquire_owned().await.ok();
    let first = async {
        let mut sub = Subscriber::connect(&o.url, &o.token, &copts).await?;
        sub.subscribe(1, &o.feed, &symbols, false, None).await?;
        Ok::<_, tickgate_client::ClientError>(sub)
    };
    let mut sub = match first.await {
        Ok(s) => s,
        Err(e) => {
            rep.failed = true;
            let _ = ready.send(Err(e.to_string())).await;
            return rep;
        }
    };
    let mut announced = false;
    let mut awaiting_live = false;
    let mut hint: Option<u64> = None;
    let mut live_buf: Vec<u64> = Vec::new();
    loop {
        let ev = tokio::select! {
            biased;
            _ = sh.stop.cancelled() => return rep,
            ev = sub.next_event() => ev,
        };
        let after_kill = sh.phase.load(Ordering::Acquire) == AFTER_KILL;
        match ev {
            Ok(Event::Control(ServerMsg::Subscribed { .. })) if !announced => {
                announced = true;
                drop(permit.take());
                let _ = ready.send(Ok(())).await;
            }
            Ok(Event::Control(ServerMsg::Error { message, .. })) if !announced => {
                rep.failed = true;
                let _ = ready.send(Err(message)).await;
                return rep;
            }
            Ok(Event::Control(ServerMsg::Gap { .. })) if after_kill => rep.gaps_after_kill += 1,
            Ok(Event::Control(ServerMsg::Shutdown { reconnect_after_ms })) => hint = Some(reconnect_after_ms),
            Ok(Event::Control(_)) => {}
            Ok(Event::Batch { records, anomalies, .. }) => {
                if after_kill {
                    rep.anomalies_after_kill += anomalies.len() as u64;
                }
                let phase = sh.phase.load(Ordering::Relaxed) as usize;
                let now = now_ns() as i64;
                live_buf.clear();
                for r in &records {
                    if r.flags() & FLAG_SNAPSHOT != 0 {
                        continue;
                    }
                    if r.flags() & FLAG_REPLAY != 0 {
                        rep.replayed += 1;
                        continue;
                    }
                    live_buf.push(latency_us(now, r.ts_event_ns()));
                }
                if awaiting_live && !live_buf.is_empty() {
                    awaiting_live = false;
                    rep.live_again_at = sh.since_t0();
                    sh.live_again.fetch_add(1, Ordering::Relaxed);
                }
                if phase != CONNECTING as usize && !live_buf.is_empty() {
                    sh.records[phase].fetch_add(live_buf.len() as u64, Ordering::Relaxed);
                    let mut h = sh.hist[phase].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    for &l in &live_buf {
                        let _ = h.record(l);
                    }
                }
            }
            Ok(Event::Closed { .. }) | Err(_) => {
                if !announced {
                    rep.failed = true;
                    let _ = ready.send(Err("closed before subscribing".into())).await;
                    return rep;
                }
                if sh.stop.is_cancelled() {
                    return rep;
                }
                if o.kill_pid.is_none() {
                    sh.t0.get_or_init(Instant::now);
                }
                match sh.since_t0() {
                    Some(t) if rep.moved_at.is_none() => {
                        rep.moved_at = Some(t);
                        sh.moved.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(_) => {}
                    None => rep.closed_before_kill = true,
                }
                if rep.live_again_at.take().is_some() {
                    sh.live_again.fetch_sub(1, Ordering::Relaxed);
                }
                // Where to resume from: the tracker's last seq of every instrument, in
                // the epoch they were numbered in.
                let epoch = sub.tracker.epoch(&o.feed);
                let last: BTreeMap<String, u64> = sub
                    .tracker
                    .last_seen()
                    .into_iter()
                    .filter(|(f, _, _)| *f == o.feed)
                    .map(|(_, s, q)| (s, q))
                    .collect();
                match reconnect(&o, &copts, &symbols, (epoch, last), hint.take(), &sh, &mut rep).await {
                    Some(s) => sub = s,
                    None => return rep,
                }
                rep.resubscribed_at = sh.since_t0();
                awaiting_live = true;
            }
        }
    }
}

/// Reconnects with backoff until a new connection has taken the `subscribe` with resume;
/// `None` once the run is over.
async fn reconnect(
    o: &FailoverOptions,
    copts: &ConnectOptions,
    symbols: &[&str],
    resume: (Option<u64>, BTreeMap<String, u64>),
    hint: Option<u64>,
    sh: &Shared,
    rep: &mut ConnReport,
) -> Option<Subscriber> {
    let mut attempt = 0u32;
    loop {
        let wait = tickgate_client::backoff_ms(
            attempt,
            hint,
            o.reconnect_jitter_ms,
            o.reconnect_max_ms,
            rand::random_range(0.0..1.0),
        );
        tokio::select! {
            _ = sh.stop.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
        rep.attempts += 1;
        // A balancer that accepted the TCP connection answers the upgrade within its own
        // timeouts; the bound here only keeps a lost attempt from stalling the client.
        let open = async {
            let mut sub = Subscriber::connect(&o.url, &o.token, copts).await?;
            sub.subscribe(1, &o.feed, symbols, false, Some(resume.clone())).await?;
            Ok::<_, tickgate_client::ClientError>(sub)
        };
        if let Ok(Ok(sub)) = tokio::time::timeout(Duration::from_secs(10), open).await {
            return Some(sub);
        }
        rep.failed_attempts += 1;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_counts_by_whole_seconds() {
        let c = curve(&[0.1, 0.2, 0.3, 2.5], &[0.4, 1.0, 2.6], 4, 3);
        assert_eq!(c[0], CurvePoint { t_s: 1, resubscribed: 3, streaming_again: 2, fraction: 0.5 });
        assert_eq!(c[2], CurvePoint { t_s: 3, resubscribed: 4, streaming_again: 3, fraction: 0.75 });
        assert!(curve(&[], &[], 0, 2).iter().all(|p| p.fraction == 0.0));
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&xs, 0.5), Some(50.0));
        assert_eq!(quantile(&xs, 0.99), Some(99.0));
        assert_eq!(quantile(&xs, 1.0), Some(100.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
