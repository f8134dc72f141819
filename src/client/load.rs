//! `tickgate load`: opens N subscribers (spread over 127.0.0.x source addresses),
//! measures publish-to-receive latency against each record's *scheduled* time
//! (`ts_event_ns`, open loop: a stall shows up as latency instead of hiding) in HDR
//! histograms, checks every seq, and reads the server's own counters from its admin
//! endpoint to report CPU-seconds per million deliveries and records per frame.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;

use super::{ClientError, ConnectOptions, Event, Subscriber};
use crate::protocol::codec::FLAG_SNAPSHOT;
use crate::protocol::now_ns;

/// Load-run settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Stream URL.
    pub url: String,
    /// Access token.
    pub token: String,
    /// Subscribers to open.
    pub connections: usize,
    /// Feed to subscribe to.
    pub feed: String,
    /// Symbols (or `*`).
    pub symbols: Vec<String>,
    /// Measured duration after warm-up.
    pub duration: Duration,
    /// Warm-up after all subscribers are live (not measured).
    pub warmup: Duration,
    /// Spread sources over 127.0.0.1 ..= 127.0.0.N.
    pub source_ips: u8,
    /// Admin base URL of the server (for its counters), if known.
    pub admin: Option<String>,
    /// Print a progress line every second.
    pub progress: bool,
    /// Give connection i only `symbols[i % len]` instead of all of them.
    pub spread: bool,
    /// Refresh each connection's token in-band this often (tokens come from `refresh_tokens`).
    pub refresh_every: Option<Duration>,
    /// Where fresh tokens for refreshes come from (updated by the caller's token task).
    pub refresh_tokens: Option<tokio::sync::watch::Receiver<String>>,
    /// Handshakes in flight at once while connecting.
    pub connect_concurrency: usize,
}

/// The JSON summary.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSummary {
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
    /// `gap` messages received.
    pub gap_messages: u64,
    /// Silent gaps, duplicates or strays (delivery violations).
    pub anomalies: u64,
    /// Close codes seen before the end, if any.
    pub early_closes: Vec<u16>,
    /// Server CPU seconds per million records delivered (from its metrics).
    pub server_cpu_s_per_million: Option<f64>,
    /// Records per WebSocket message, server side.
    pub records_per_frame: Option<f64>,
    /// WebSocket messages per socket flush (write), server side.
    pub frames_per_write: Option<f64>,
    /// Server resident memory at the end (bytes).
    pub server_rss_bytes: Option<f64>,
    /// CPU seconds this load generator used during the measured window.
    pub client_cpu_s: Option<f64>,
    /// Seconds from the first connect to the last `subscribed` (a reconnect storm's length).
    pub connect_s: f64,
    /// In-band refreshes answered `refreshed`.
    pub refreshes_ok: u64,
    /// In-band refreshes answered with an error.
    pub refreshes_refused: u64,
}

/// This process's user + system CPU seconds, from /proc (Linux; clock ticks of 1/100 s).
fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[derive(Default)]
struct Shared {
    records: AtomicU64,
    gaps: AtomicU64,
    anomalies: AtomicU64,
    measuring: AtomicBool,
    stop: tokio_util::sync::CancellationToken,
    refreshes_ok: AtomicU64,
    refreshes_refused: AtomicU64,
}

/// Reads `name` (with an optional exact label set) from Prometheus text, summing series.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let base = series.split('{').next().unwrap_or(series);
        if base == name {
            if let Ok(v) = value.parse::<f64>() {
                *sum.get_or_insert(0.0) += v;
            }
        }
    }
    sum
}

async fn scrape(admin: &str) -> Option<String> {
    let c = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().ok()?;
    c.get(format!("{}/metrics", admin.trim_end_matches('/'))).send().await.ok()?.text().await.ok()
}

/// Runs a load test and returns its summary.
pub async fn run(opts: LoadOptions) -> Result<LoadSummary, ClientError> {
    let shared = Arc::new(Shared::default());
    let mut tasks = Vec::with_capacity(opts.connections);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(opts.connections.max(1));
    let gate = Arc::new(tokio::sync::Semaphore::new(opts.connect_concurrency.max(1)));
    for i in 0..opts.connections {
        let o = opts.clone();
        let sh = shared.clone();
        let ready = ready_tx.clone();
        let gate = gate.clone();
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % o.source_ips.max(1) as usize) as u8));
        tasks.push(tokio::spawn(async move { subscriber(i, o, ip, sh, ready, gate).await }));
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
    if opts.progress {
        eprintln!("{ready} subscribers live ({failed} failed) in {connect_s:.2} s; warming up {:?}", opts.warmup);
    }
    tokio::time::sleep(opts.warmup).await;

    let before = match &opts.admin {
        Some(a) => scrape(a).await,
        None => None,
    };
    shared.records.store(0, Ordering::Relaxed);
    shared.measuring.store(true, Ordering::Release);
    let cpu_before = own_cpu_seconds();
    let started = Instant::now();
    let mut last = 0;
    while started.elapsed() < opts.duration {
        tokio::time::sleep(Duration::from_secs(1).min(opts.duration)).await;
        if opts.progress {
            let now = shared.records.load(Ordering::Relaxed);
            eprintln!(
                "t={:>4.0}s  records/s={:>10}  gaps={} anomalies={}",
                started.elapsed().as_secs_f64(),
                now - last,
                shared.gaps.load(Ordering::Relaxed),
                shared.anomalies.load(Ordering::Relaxed)
            );
            last = now;
        }
    }
    shared.measuring.store(false, Ordering::Release);
    let seconds = started.elapsed().as_secs_f64();
    let client_cpu_s = match (cpu_before, own_cpu_seconds()) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    };
    let records = shared.records.load(Ordering::Relaxed);
    let after = match &opts.admin {
        Some(a) => scrape(a).await,
        None => None,
    };
    shared.stop.cancel();

    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| ClientError::Control(e.to_string()))?;
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
    let (cpu, per_frame, per_write, rss) = match (&before, &after) {
        (Some(b), Some(a)) => {
            let d = |n: &str| Some(metric(a, n)? - metric(b, n)?);
            let delivered = d("tickgate_records_delivered_total");
            let cpu = d("process_cpu_seconds_total");
            let frames = d("tickgate_frames_sent_total");
            let flushes = d("tickgate_socket_flushes_total");
            (
                match (cpu, delivered) {
                    (Some(c), Some(n)) if n > 0.0 => Some(c / (n / 1e6)),
                    _ => None,
                },
                match (frames, delivered) {
                    (Some(f), Some(n)) if f > 0.0 => Some(n / f),
                    _ => None,
                },
                match (frames, flushes) {
                    (Some(f), Some(w)) if w > 0.0 => Some(f / w),
                    _ => None,
                },
                metric(a, "process_resident_memory_bytes"),
            )
        }
        _ => (None, None, None, None),
    };
    Ok(LoadSummary {
        connections: completed,
        failed,
        seconds,
        records,
        records_per_s: records as f64 / seconds,
        p50_us: hist.value_at_quantile(0.5) as f64,
        p99_us: hist.value_at_quantile(0.99) as f64,
        p999_us: hist.value_at_quantile(0.999) as f64,
        max_us: hist.max() as f64,
        gap_messages: shared.gaps.load(Ordering::Relaxed),
        anomalies: shared.anomalies.load(Ordering::Relaxed),
        early_closes,
        server_cpu_s_per_million: cpu,
        records_per_frame: per_frame,
        frames_per_write: per_write,
        server_rss_bytes: rss,
        client_cpu_s,
        connect_s,
        refreshes_ok: shared.refreshes_ok.load(Ordering::Relaxed),
        refreshes_refused: shared.refreshes_refused.load(Ordering::Relaxed),
    })
}

async fn subscriber(
    i: usize,
    o: LoadOptions,
    ip: IpAddr,
    sh: Arc<Shared>,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
    gate: Arc<tokio::sync::Semaphore>,
) -> Result<(Histogram<u64>, Option<u16>), ClientError> {
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| ClientError::Control(e.to_string()))?;
    let opts = ConnectOptions { local_ip: Some(ip), ..ConnectOptions::default() };
    let mut permit = gate.acquire_owned().await.ok();
    let mut sub = match Subscriber::connect(&o.url, &o.token, &opts).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!("#{i}: {e}"))).await;
            return Err(e);
        }
    };
    let symbols = if o.spread && !o.symbols.is_empty() {
        vec![o.symbols[i % o.symbols.len()].clone()]
    } else {
        o.symbols.clone()
    };
    if let Err(e) = sub.send_json(&json!({"op": "subscribe", "id": 1, "feed": o.feed, "symbols": symbols})).await {
        let _ = ready.send(Err(format!("#{i}: {e}"))).await;
        return Err(e);
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
    let mut refresh_id = 100;
    loop {
        let ev = tokio::select! {
            biased;
            ev = sub.next_event() => ev,
            _ = &mut refresh, if refresh_tokens.is_some() => {
                refresh.as_mut().reset(tokio::time::Instant::now() + every);
                if let Some(rx) = refresh_tokens.as_mut() {
                    let token = rx.borrow_and_update().clone();
                    refresh_id += 1;
                    sub.send_json(&json!({"op": "refresh", "id": refresh_id, "token": token})).await?;
                }
                continue;
            }
            _ = &mut stopped => {
                sub.close().await;
                return Ok((hist, None));
            }
        };
        match ev {
            Ok(Event::Control(m)) => {
                use crate::protocol::control::ServerMsg;
                match m {
                    ServerMsg::Subscribed { .. } if !announced => {
                        announced = true;
                        drop(permit.take());
                        let _ = ready.send(Ok(())).await;
                    }
                    ServerMsg::Refreshed { .. } => {
                        sh.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    ServerMsg::Error { id: Some(id), .. } if id > 100 => {
                        sh.refreshes_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    ServerMsg::Error { message, .. } if !announced => {
                        announced = true;
                        let _ = ready.send(Err(format!("#{i}: {message}"))).await;
                    }
                    ServerMsg::Gap { .. } => {
                        sh.gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            Ok(Event::Batch { records, anomalies, .. }) => {
                if !anomalies.is_empty() {
                    sh.anomalies.fetch_add(anomalies.len() as u64, Ordering::Relaxed);
                }
                if sh.measuring.load(Ordering::Relaxed) {
                    let now = now_ns() as i64;
                    let mut n = 0;
                    for r in &records {
                        if r.flags() & FLAG_SNAPSHOT == 0 {
                            let us = ((now - r.ts_event_ns()) / 1000).max(1) as u64;
                            let _ = hist.record(us.min(60_000_000));
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
                return Err(e);
            }
        }
    }
}
