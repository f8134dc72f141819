//! `tickgate load`: the load generator.
//!
//! Subscriber side (the default role): opens N subscribers (spread over 127.0.0.x source
//! addresses), measures publish-to-receive latency against each record's *scheduled* time
//! (`ts_event_ns`, open loop: a stall shows up as latency instead of hiding) in HDR
//! histograms, checks every seq, and reads the server's own counters (admin endpoint) or
//! its process (`/proc/<pid>`) to report CPU-seconds per million deliveries and memory per
//! connection. The subscribers speak either tickgate's protocol or, with `--target nats`,
//! NATS over WebSocket ([`nats`]), so the same process measures both servers the same way.
//! With `--processes P` the subscribers are spread over P child processes ([`multi`]).
//!
//! Publisher side (`--role publisher`, [`publish`]): a fixed open-loop schedule of ticks
//! into NATS or into tickgate's publish endpoint.
//!
//! Failover side (`--role failover`, [`failover`]): connections held through a balancer
//! while an edge is killed; the reconnect curve of its clients, resume checked.
//!
//! Floor side (`--role floor`, [`floor`]): a bare epoll WebSocket writer serving the
//! subscriber role, one write per connection per tick: the per-write floor tickgate is
//! measured against (`benches/floor.sh`).
//!
//! Control messages are typed `ClientMsg` values; a subscriber tells the answers to its
//! in-band refreshes by the ids it sent them with (`Refreshes`).

mod args;
pub mod failover;
pub mod floor;
pub mod multi;
pub mod nats;
pub mod publish;

pub use args::{execute, LoadArgs, LoadReport, Role, Target};

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use tickgate_client::{ClientError, ConnectOptions, Event, Subscriber};
use tickgate_proto::codec::FLAG_SNAPSHOT;
use tickgate_proto::control::{ClientMsg, MaxRate, SecretString};
use tickgate_proto::now_ns;

/// Why a load run failed.
#[derive(Debug, Error)]
pub enum LoadError {
    /// A tickgate client failure (token, connect, protocol).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A NATS client failure.
    #[error("nats: {0}")]
    Nats(String),
    /// Local I/O (stdin/stdout of child processes, spawning).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Inconsistent command-line arguments.
    #[error("{0}")]
    Args(String),
    /// A child process of a multi-process run failed or printed no summary.
    #[error("child process {index}: {message}")]
    Child {
        /// Which child.
        index: usize,
        /// What went wrong.
        message: String,
    },
    /// A latency histogram could not be created, serialized or merged.
    #[error("histogram: {0}")]
    Histogram(String),
    /// The publish endpoint answered with an error message.
    #[error("publish refused: {0}")]
    Publish(String),
    /// The floor server (`--role floor`) could not run.
    #[error("floor: {0}")]
    Floor(#[from] floor::FloorError),
}

/// What the subscribers connect to.
#[derive(Debug, Clone)]
pub enum SubscribeTarget {
    /// tickgate's `/v1/stream`, at [`LoadOptions::url`] with [`LoadOptions::token`].
    Tickgate,
    /// A NATS server's WebSocket listener (`ws://host:port`): subjects `md.<FEED>.<SYMBOL>`,
    /// one binary record per message.
    Nats {
        /// The NATS URL.
        url: String,
    },
}

/// Load-run settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Which server and protocol.
    pub target: SubscribeTarget,
    /// Stream URL.
    pub url: String,
    /// Access token.
    pub token: String,
    /// Subscribers to open.
    pub connections: usize,
    /// Global index of this process's first subscriber (multi-process runs: each child
    /// takes its own slice of the subscribers, so symbol assignment stays global).
    pub index_base: usize,
    /// Feed to subscribe to.
    pub feed: String,
    /// Symbols (or `*`).
    pub symbols: Vec<String>,
    /// Measured duration after warm-up.
    pub duration: Duration,
    /// Warm-up after all subscribers are live (not measured).
    pub warmup: Duration,
    /// Spread sources over `127.0.0.<source_ip_base>` and the next `source_ips - 1` addresses.
    pub source_ips: u8,
    /// First last-octet of the source addresses (1 unless a child process got a slice).
    pub source_ip_base: u8,
    /// Admin base URL of the server (for its counters), if known.
    pub admin: Option<String>,
    /// Server process id (same machine): CPU and memory from `/proc/<pid>`.
    pub server_pid: Option<u32>,
    /// Print a progress line every second.
    pub progress: bool,
    /// Give connection i only this many symbols (`symbols[(i*k + j) % len]`, j < k) instead of all.
    pub symbols_per_conn: Option<usize>,
    /// Throttled subscriptions: `max_rate` in every `subscribe` (protocol v1.1).
    pub max_rate: Option<f64>,
    /// Refresh each connection's token in-band this often (tokens come from `refresh_tokens`).
    pub refresh_every: Option<Duration>,
    /// Where fresh tokens for refreshes come from (updated by the caller's token task).
    pub refresh_tokens: Option<tokio::sync::watch::Receiver<String>>,
    /// Handshakes in flight at once while connecting.
    pub connect_concurrency: usize,
    /// Child process of a multi-process run: this child's index. Progress goes to stderr
    /// as machine-readable `@` lines, the run waits for `go` on stdin after connecting,
    /// and the summary carries the serialized histogram.
    pub child: Option<usize>,
}

/// The JSON summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSummary {
    /// `tickgate` or `nats`.
    #[serde(default)]
    pub target: String,
    /// Subscriber processes that contributed (1 unless `--processes`).
    #[serde(default)]
    pub processes: usize,
    /// Subscribers that completed the run.
    pub connections: usize,
    /// Subscribers that failed to connect or were closed early.
    pub failed: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Records received in the window.
    pub records: u64,
    /// Delivered records per second.
    pub records_per_s: f64,
    /// Latency percentiles, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// Latency samples in the histogram (equals `records`).
    #[serde(default)]
    pub samples: u64,
    /// `gap` messages received (tickgate; NATS has none).
    pub gap_messages: u64,
    /// Silent gaps, duplicates or strays (delivery violations). With NATS every seq jump,
    /// repeat or undecodable payload counts here.
    pub anomalies: u64,
    /// Records known missing: announced by `gap` messages or skipped by seq jumps.
    #[serde(default)]
    pub missing_records: u64,
    /// Messages the load generator itself dropped because it fell behind (NATS: the
    /// client's slow-consumer events; their seq jumps are also in `anomalies`).
    #[serde(default)]
    pub client_drops: u64,
    /// Close codes seen before the end, if any (NATS: 1006 per disconnect).
    pub early_closes: Vec<u16>,
    /// Server CPU seconds per million records delivered (admin metrics for tickgate, else
    /// `/proc/<pid>/stat` of `--server-pid` divided by the records the subscribers received).
    pub server_cpu_s_per_million: Option<f64>,
    /// Server CPU seconds used during the measured window (`--server-pid`).
    #[serde(default)]
    pub server_cpu_s: Option<f64>,
    /// Records per WebSocket message, server side.
    pub records_per_frame: Option<f64>,
    /// WebSocket messages per socket flush (write), server side.
    pub frames_per_write: Option<f64>,
    /// Server resident memory at the end (bytes).
    pub server_rss_bytes: Option<f64>,
    /// Growth of the server's resident memory from before connecting to after every
    /// subscriber is live, per live subscriber (bytes; `--server-pid`).
    #[serde(default)]
    pub server_rss_per_conn_bytes: Option<f64>,
    /// CPU seconds this load generator used during the measured window.
    pub client_cpu_s: Option<f64>,
    /// Seconds from the first connect to the last `subscribed` (a reconnect storm's length).
    pub connect_s: f64,
    /// In-band refreshes answered `refreshed`.
    pub refreshes_ok: u64,
    /// In-band refreshes answered with an error.
    pub refreshes_refused: u64,
    /// The latency histogram, HdrHistogram V2 serialized, base64 (child processes only:
    /// the parent merges them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram_v2: Option<String>,
}

/// CPU seconds (user + system) of a process from `/proc/<pid>/stat`; `None` for "self".
fn proc_cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // Clock ticks of 1/100 s (USER_HZ on Linux).
    Some((utime + stime) / 100.0)
}

/// Resident memory of a process in bytes, from `VmRSS` in `/proc/<pid>/status`.
fn proc_rss_bytes(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// This process's CPU seconds.
fn own_cpu_seconds() -> Option<f64> {
    proc_cpu_seconds(None)
}

#[derive(Default)]
struct Shared {
    records: AtomicU64,
    gaps: AtomicU64,
    anomalies: AtomicU64,
    missing: AtomicU64,
    client_drops: AtomicU64,
    measuring: AtomicBool,
    stop: tokio_util::sync::CancellationToken,
    refreshes_ok: AtomicU64,
    refreshes_refused: AtomicU64,
}

async fn scrape(admin: &str) -> Option<String> {
    let c = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().ok()?;
    c.get(format!("{}/metrics", admin.trim_end_matches('/'))).send().await.ok()?.text().await.ok()
}

/// Where the server's own numbers come from: its admin endpoint and/or its process.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServerProbe {
    admin: Option<String>,
    pid: Option<u32>,
}

/// One reading of a [`ServerProbe`].
#[derive(Debug, Clone, Default)]
pub(crate) struct ProbeReading {
    /// The admin endpoint's exposition, when it answered with valid text.
    metrics: Option<crate::prom::Exposition>,
    cpu_s: Option<f64>,
}

/// The server-side fields of a summary.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServerNumbers {
    cpu_s_per_million: Option<f64>,
    cpu_s: Option<f64>,
    records_per_frame: Option<f64>,
    frames_per_write: Option<f64>,
    rss: Option<f64>,
}

impl ServerProbe {
    pub(crate) fn new(admin: Option<String>, pid: Option<u32>) -> ServerProbe {
        ServerProbe { admin, pid }
    }

    pub(crate) fn rss(&self) -> Option<f64> {
        self.pid.and_then(proc_rss_bytes)
    }

    pub(crate) async fn read(&self) -> ProbeReading {
        let metrics = match &self.admin {
            Some(a) => scrape(a).await.and_then(|text| crate::prom::Exposition::parse(&text).ok()),
            None => None,
        };
        ProbeReading { metrics, cpu_s: self.pid.and_then(|p| proc_cpu_seconds(Some(p))) }
    }

    /// Server numbers over a window in which the subscribers received `records`.
    pub(crate) fn numbers(&self, before: &ProbeReading, after: &ProbeReading, records: u64) -> ServerNumbers {
        let mut n = ServerNumbers::default();
        if let (Some(b), Some(a)) = (&before.metrics, &after.metrics) {
            // Each counter summed over its label sets (every feed, every listener).
            let d = |name: &str| Some(a.sum(name)? - b.sum(name)?);
            let delivered = d("tickgate_records_delivered_total");
            let cpu = d("process_cpu_seconds_total");
            let frames = d("tickgate_frames_sent_total");
            let flushes = d("tickgate_socket_flushes_total");
            n.cpu_s_per_million = match (cpu, delivered) {
                (Some(c), Some(d)) if d > 0.0 => Some(c / (d / 1e6)),
                _ => None,
            };
            n.records_per_frame = match (frames, delivered) {
                (Some(f), Some(d)) if f > 0.0 => Some(d / f),
                _ => None,
            };
            n.frames_per_write = match (frames, flushes) {
                (Some(f), Some(w)) if w > 0.0 => Some(f / w),
                _ => None,
            };
            n.rss = a.sum("process_resident_memory_bytes");
        }
        if let (Some(b), Some(a)) = (before.cpu_s, after.cpu_s) {
            n.cpu_s = Some(a - b);
            // The process reading wins: it is the same measure for every server.
            if records > 0 {
                n.cpu_s_per_million = Some((a - b) / (records as f64 / 1e6));
            }
        }
        if let Some(r) = self.rss() {
            n.rss = Some(r);
        }
        n
    }
}

/// A fresh latency histogram: 1 µs to 60 s, 3 significant digits.
pub(crate) fn new_histogram() -> Result<Histogram<u64>, LoadError> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| LoadError::Histogram(e.to_string()))
}

/// Serializes a histogram (HdrHistogram V2, base64).
pub(crate) fn encode_histogram(h: &Histogram<u64>) -> Result<String, LoadError> {
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).map_err(|e| LoadError::Histogram(format!("{e:?}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

/// Reverses [`encode_histogram`].
pub(crate) fn decode_histogram(s: &str) -> Result<Histogram<u64>, LoadError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).map_err(|e| LoadError::Histogram(e.to_string()))?;
    Deserializer::new().deserialize(&mut &bytes[..]).map_err(|e| LoadError::Histogram(format!("{e:?}")))
}

/// Latency of one record received now, in µs (clamped to the histogram's range).
#[inline]
pub(crate) fn latency_us(now_ns: i64, ts_event_ns: i64) -> u64 {
    (((now_ns - ts_event_ns) / 1000).max(1) as u64).min(60_000_000)
}

/// The symbols subscriber `i` (global index) takes.
pub(crate) fn symbols_for(i: usize, symbols: &[String], per_conn: Option<usize>) -> Vec<String> {
    match per_conn {
        Some(k) if k > 0 && !symbols.is_empty() && symbols != ["*"] => {
            (0..k.min(symbols.len())).map(|j| symbols[(i * k + j) % symbols.len()].clone()).collect()
        }
        _ => symbols.to_vec(),
    }
}

/// The source address of subscriber `i` of this process.
fn source_ip(i: usize, base: u8, count: u8) -> IpAddr {
    let octet = (base.max(1) as usize - 1 + i % count.max(1) as usize) % 254 + 1;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet as u8))
}

/// What a subscriber task hands back: its histogram and the close code if it ended early.
type SubscriberResult = Result<(Histogram<u64>, Option<u16>), LoadError>;

/// Runs a load test and returns its summary.
pub async fn run(opts: LoadOptions) -> Result<LoadSummary, LoadError> {
    let shared = Arc::new(Shared::default());
    let probe = ServerProbe::new(opts.admin.clone(), opts.server_pid);
    let rss_before = probe.rss();
    let mut tasks: Vec<tokio::task::JoinHandle<SubscriberResult>> = Vec::with_capacity(opts.connections);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(opts.connections.max(1));
    let gate = Arc::new(tokio::sync::Semaphore::new(opts.connect_concurrency.max(1)));
    for i in 0..opts.connections {
        let o = opts.clone();
        let sh = shared.clone();
        let ready = ready_tx.clone();
        let gate = gate.clone();
        let ip = source_ip(i, opts.source_ip_base, opts.source_ips);
        let global = opts.index_base + i;
        tasks.push(match &opts.target {
            SubscribeTarget::Tickgate => tokio::spawn(async move { subscriber(global, o, ip, sh, ready, gate).await }),
            SubscribeTarget::Nats { url } => {
                let url = url.clone();
                tokio::spawn(async move { nats::subscriber(global, url, o, sh, ready, gate).await })
            }
        });
    }
    drop(ready_tx);
    let connect_started = Instant::now();
    let mut failed = 0;
    let mut ready = 0;
    while let Some(r) = ready_rx.recv().await {
        match r {
            Ok(()) => ready += 1,
            Err(e) => {
                if failed < 5 {
                    eprintln!("subscriber failed: {e}");
                }
                failed += 1;
            }
        }
        if ready + failed == opts.connections {
            break;
        }
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    let rss_after = probe.rss();
    match opts.child {
        Some(_) => {
            eprintln!("{} ready ok={ready} failed={failed} connect_s={connect_s:.3}", multi::TAG);
            // Wait for the parent's `go`, so every child measures the same window.
            let mut line = String::new();
            use tokio::io::AsyncBufReadExt;
            tokio::io::BufReader::new(tokio::io::stdin()).read_line(&mut line).await?;
        }
        None if opts.progress => {
            eprintln!("{ready} subscribers live ({failed} failed) in {connect_s:.2} s; warming up {:?}", opts.warmup);
        }
        None => {}
    }
    tokio::time::sleep(opts.warmup).await;

    let before = probe.read().await;
    shared.records.store(0, Ordering::Relaxed);
    shared.measuring.store(true, Ordering::Release);
    let cpu_before = own_cpu_seconds();
    let started = Instant::now();
    match opts.child {
        Some(_) => eprintln!("{} measuring", multi::TAG),
        None if opts.progress => eprintln!("measuring {:?}", opts.duration),
        None => {}
    }
    let mut last = 0;
    while started.elapsed() < opts.duration {
        let left = opts.duration.saturating_sub(started.elapsed());
        tokio::time::sleep(Duration::from_secs(1).min(left)).await;
        let now = shared.records.load(Ordering::Relaxed);
        let (gaps, anomalies) = (shared.gaps.load(Ordering::Relaxed), shared.anomalies.load(Ordering::Relaxed));
        match opts.child {
            Some(_) => eprintln!("{} progress records={now} gaps={gaps} anomalies={anomalies}", multi::TAG),
            None if opts.progress => eprintln!(
                "t={:>4.0}s  records/s={:>10}  gaps={gaps} anomalies={anomalies}",
                started.elapsed().as_secs_f64(),
                now - last,
            ),
            None => {}
        }
        last = now;
    }
    shared.measuring.store(false, Ordering::Release);
    let seconds = started.elapsed().as_secs_f64();
    let client_cpu_s = match (cpu_before, own_cpu_seconds()) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    };
    let records = shared.records.load(Ordering::Relaxed);
    let after = probe.read().await;
    if opts.child.is_some() {
        eprintln!("{} done", multi::TAG);
    }
    shared.stop.cancel();

    let mut hist = new_histogram()?;
    let mut early_closes = Vec::new();
    let mut completed = 0;
    for t in tasks {
        if let Ok(Ok((h, closed))) = t.await {
            let _ = hist.add(&h);
            match closed {
                Some(code) => early_closes.push(code),
                None => completed += 1,
            }
        }
    }
    let server = probe.numbers(&before, &after, records);
    let server_rss_per_conn_bytes = match (rss_before, rss_after) {
        (Some(b), Some(a)) if ready > 0 => Some((a - b) / ready as f64),
        _ => None,
    };
    Ok(LoadSummary {
        target: match opts.target {
            SubscribeTarget::Tickgate => "tickgate".into(),
            SubscribeTarget::Nats { .. } => "nats".into(),
        },
        processes: 1,
        connections: completed,
        failed,
        seconds,
        records,
        records_per_s: records as f64 / seconds,
        p50_us: hist.value_at_quantile(0.5) as f64,
        p99_us: hist.value_at_quantile(0.99) as f64,
        p999_us: hist.value_at_quantile(0.999) as f64,
        max_us: hist.max() as f64,
        samples: hist.len(),
        gap_messages: shared.gaps.load(Ordering::Relaxed),
        anomalies: shared.anomalies.load(Ordering::Relaxed),
        missing_records: shared.missing.load(Ordering::Relaxed),
        client_drops: shared.client_drops.load(Ordering::Relaxed),
        early_closes,
        server_cpu_s_per_million: server.cpu_s_per_million,
        server_cpu_s: server.cpu_s,
        records_per_frame: server.records_per_frame,
        frames_per_write: server.frames_per_write,
        server_rss_bytes: server.rss,
        server_rss_per_conn_bytes,
        client_cpu_s,
        connect_s,
        refreshes_ok: shared.refreshes_ok.load(Ordering::Relaxed),
        refreshes_refused: shared.refreshes_refused.load(Ordering::Relaxed),
        histogram_v2: match opts.child {
            Some(_) => Some(encode_histogram(&hist)?),
            None => None,
        },
    })
}

/// The id of each subscriber's one `subscribe`; refreshes count up from it.
const SUBSCRIBE_ID: i64 = 1;

/// The in-band refreshes one subscriber has sent and not seen answered. The server
/// echoes a request's `id` in its reply, so an `error` is a refused refresh exactly when
/// its id is one of these.
#[derive(Debug)]
struct Refreshes {
    last_id: i64,
    pending: HashSet<i64>,
}

impl Default for Refreshes {
    fn default() -> Refreshes {
        Refreshes { last_id: SUBSCRIBE_ID, pending: HashSet::new() }
    }
}

impl Refreshes {
    /// The next refresh message, its id remembered.
    fn next(&mut self, token: String) -> ClientMsg {
        self.last_id += 1;
        self.pending.insert(self.last_id);
        ClientMsg::Refresh { id: Some(self.last_id), token: SecretString(token) }
    }

    /// Whether a reply with this id answers a pending refresh (which is then no longer
    /// pending).
    fn answered(&mut self, id: Option<i64>) -> bool {
        id.is_some_and(|id| self.pending.remove(&id))
    }
}

async fn subscriber(
    i: usize,
    o: LoadOptions,
    ip: IpAddr,
    sh: Arc<Shared>,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
    gate: Arc<tokio::sync::Semaphore>,
) -> SubscriberResult {
    let mut hist = new_histogram()?;
    let opts = ConnectOptions { local_ip: Some(ip), ..ConnectOptions::default() };
    let mut permit = gate.acquire_owned().await.ok();
    let mut sub = match Subscriber::connect(&o.url, &o.token, &opts).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!("#{i}: {e}"))).await;
            return Err(e.into());
        }
    };
    let symbols = symbols_for(i, &o.symbols, o.symbols_per_conn);
    let subscribe = ClientMsg::Subscribe {
        id: Some(SUBSCRIBE_ID),
        feed: o.feed.clone(),
        symbols,
        snapshot: false,
        resume: None,
        epoch: None,
        max_rate: o.max_rate.map(MaxRate),
    };
    if let Err(e) = sub.send(&subscribe).await {
        let _ = ready.send(Err(format!("#{i}: {e}"))).await;
        return Err(e.into());
    }
    let mut announced = false;
    // Created once: a per-event timer or future would cost more than the decoding.
    let stop = sh.stop.clone();
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    // Refreshes start at a random offset so the fleet does not refresh in one burst.
    let every = o.refresh_every.unwrap_or(Duration::from_secs(3600 * 24 * 365));
    let refresh = tokio::time::sleep(every.mul_f64(rand::random_range(0.0..1.0)));
    tokio::pin!(refresh);
    let mut refresh_tokens = o.refresh_tokens.clone();
    let mut refreshes = Refreshes::default();
    loop {
        let ev = tokio::select! {
            biased;
            ev = sub.next_event() => ev,
            _ = &mut refresh, if refresh_tokens.is_some() => {
                refresh.as_mut().reset(tokio::time::Instant::now() + every);
                if let Some(rx) = refresh_tokens.as_mut() {
                    let token = rx.borrow_and_update().clone();
                    sub.send(&refreshes.next(token)).await?;
                }
                continue;
            }
            _ = &mut stopped => {
                sub.close().await;
                return Ok((hist, None));
            }
        };
        // A socket that is always readable would starve the stop branch of the biased select.
        if stop.is_cancelled() {
            sub.close().await;
            return Ok((hist, None));
        }
        match ev {
            Ok(Event::Control(m)) => {
                use tickgate_proto::control::ServerMsg;
                match m {
                    ServerMsg::Subscribed { .. } if !announced => {
                        announced = true;
                        drop(permit.take());
                        let _ = ready.send(Ok(())).await;
                    }
                    ServerMsg::Refreshed { id, .. } => {
                        refreshes.answered(id);
                        sh.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    ServerMsg::Error { id, .. } if refreshes.answered(id) => {
                        sh.refreshes_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    ServerMsg::Error { message, .. } if !announced => {
                        announced = true;
                        let _ = ready.send(Err(format!("#{i}: {message}"))).await;
                    }
                    ServerMsg::Gap { from, to, .. } => {
                        sh.gaps.fetch_add(1, Ordering::Relaxed);
                        sh.missing.fetch_add(to.saturating_sub(from) + 1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            Ok(Event::Batch { records, anomalies, .. }) => {
                if !anomalies.is_empty() {
                    sh.anomalies.fetch_add(anomalies.len() as u64, Ordering::Relaxed);
                    for a in &anomalies {
                        if let tickgate_client::Anomaly::SilentGap { from, to, .. } = a {
                            sh.missing.fetch_add(to - from + 1, Ordering::Relaxed);
                        }
                    }
                }
                if sh.measuring.load(Ordering::Relaxed) {
                    let now = now_ns() as i64;
                    let mut n = 0;
                    for r in &records {
                        if r.flags() & FLAG_SNAPSHOT == 0 {
                            let _ = hist.record(latency_us(now, r.ts_event_ns()));
                            n += 1;
                        }
                    }
                    sh.records.fetch_add(n, Ordering::Relaxed);
                }
            }
            Ok(Event::Closed { code, .. }) => {
                if !announced {
                    let _ = ready.send(Err(format!("#{i}: closed {code} before subscribing"))).await;
                }
                return Ok((hist, Some(code)));
            }
            Err(e) => {
                if !announced {
                    let _ = ready.send(Err(format!("#{i}: {e}"))).await;
                }
                return Err(e.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_per_connection_slices_round_robin() {
        let syms: Vec<String> = (0..100).map(|i| format!("S{i}")).collect();
        assert_eq!(symbols_for(0, &syms, Some(10))[0], "S0");
        assert_eq!(symbols_for(3, &syms, Some(10)), (30..40).map(|i| format!("S{i}")).collect::<Vec<_>>());
        assert_eq!(symbols_for(10, &syms, Some(10))[9], "S9");
        assert_eq!(symbols_for(5, &syms, None).len(), 100);
        assert_eq!(symbols_for(5, &["*".to_owned()], Some(1)), vec!["*".to_owned()]);
        assert_eq!(symbols_for(7, &syms[..10], Some(1)), vec!["S7".to_owned()]);
    }

    #[test]
    fn histograms_survive_serialization_and_merge_exactly() {
        let mut a = new_histogram().expect("histogram");
        let mut b = new_histogram().expect("histogram");
        for v in 1..=1000u64 {
            a.record(v).expect("in range");
            b.record(v * 1000).expect("in range");
        }
        let a2 = decode_histogram(&encode_histogram(&a).expect("encode")).expect("decode");
        let b2 = decode_histogram(&encode_histogram(&b).expect("encode")).expect("decode");
        let mut m = new_histogram().expect("histogram");
        m.add(&a2).expect("merge");
        m.add(&b2).expect("merge");
        assert_eq!(m.len(), 2000);
        // The merged median sits between the two populations, which no max-of-percentiles gives.
        let p50 = m.value_at_quantile(0.5);
        assert!((900..=1100).contains(&p50), "p50 {p50}");
        assert!(m.max() >= 999_000);
    }

    #[test]
    fn source_addresses_stay_in_their_slice() {
        assert_eq!(source_ip(0, 1, 8), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(source_ip(9, 1, 8), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(source_ip(3, 5, 2), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)));
    }

    #[test]
    fn refresh_replies_are_told_by_their_id() {
        let mut r = Refreshes::default();
        let ClientMsg::Refresh { id: Some(id), .. } = r.next("t".into()) else { panic!("a refresh") };
        assert_ne!(id, SUBSCRIBE_ID);
        assert!(!r.answered(Some(SUBSCRIBE_ID)), "the subscribe's error is not a refresh's");
        assert!(!r.answered(None));
        assert!(r.answered(Some(id)));
        assert!(!r.answered(Some(id)), "answered once");
    }
}
