//! The publisher of the side-by-side benchmark: a fixed open-loop schedule of `rate`
//! ticks/s, round robin over K instruments. Tick n is due at `t0 + n / rate` and carries
//! that scheduled time as `ts_event_ns`, so a stall anywhere (publisher, server,
//! subscriber) shows up as latency instead of being hidden by coordinated omission. Ticks
//! that are due at the same moment go out together: one batch message to tickgate, a run of
//! PUBs written in one go to NATS.
//!
//! Records are the spec §5 binary records ([`Record::encode`]): three quotes (72 bytes)
//! then a trade (56 bytes), repeating; instrument ids are the 1-based positions in the
//! symbol list (tickgate's convention for a feed's symbols); seq is 1, 2, 3, ... per
//! instrument, or 0 everywhere with `server_seq` (the tickgate publish endpoint assigns it).
//! The closing acknowledgement is a typed `ClientMsg::Ping`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

use super::LoadError;
use tickgate_client::ConnectOptions;
use tickgate_proto::codec::{encode_batch, Body, Quote, Record, Trade, FIXED_SCALE, MAX_BATCH_RECORDS};
use tickgate_proto::now_ns;

/// Where the ticks go.
#[derive(Debug, Clone)]
pub enum PublishSink {
    /// A NATS server (`nats://host:port`, or `ws://` for its WebSocket listener): PUB on
    /// `md.<FEED>.<SYMBOL>`, one record per message.
    Nats {
        /// Server URL.
        url: String,
    },
    /// tickgate's publish endpoint: `GET /v1/publish?feed=NAME` WebSocket, subprotocol
    /// `tickgate.v1`, `Authorization: Bearer` with scope `md:publish:NAME`; binary batch messages.
    Tickgate {
        /// Full endpoint URL, `ws://host:port/v1/publish?feed=NAME`.
        url: String,
        /// Access token (empty: none, for `serve --insecure-no-auth`).
        token: String,
    },
}

/// Publisher settings.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Destination.
    pub sink: PublishSink,
    /// Feed name (subjects `md.<FEED>.<SYMBOL>`).
    pub feed: String,
    /// Feed id written into every record.
    pub feed_id: u16,
    /// The instruments, in order (instrument id = position + 1).
    pub symbols: Vec<String>,
    /// Ticks per second, all instruments together.
    pub rate: f64,
    /// Stop after this long (`None`: until `count`, or until SIGINT/SIGTERM).
    pub duration: Option<Duration>,
    /// Stop after this many ticks.
    pub count: Option<u64>,
    /// Send seq 0 and let the server number the ticks.
    pub server_seq: bool,
    /// Print a progress line every second on stderr.
    pub progress: bool,
}

/// The publisher's JSON summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishSummary {
    /// `nats` or `tickgate-publish`.
    pub sink: String,
    /// Ticks sent.
    pub ticks: u64,
    /// Messages (NATS) or batch messages (tickgate) written.
    pub messages: u64,
    /// Seconds from the first scheduled tick to the last send.
    pub seconds: f64,
    /// Ticks per second achieved.
    pub ticks_per_s: f64,
    /// Ticks per second asked for.
    pub target_rate: f64,
    /// Largest delay of a send behind its schedule, microseconds.
    pub max_behind_us: f64,
    /// Error messages the server sent back (tickgate publish endpoint).
    pub errors: u64,
    /// Whether the server confirmed that every tick was taken (NATS: flush answered;
    /// tickgate: the final `pong`).
    pub confirmed: bool,
}

/// Generates the ticks of the schedule.
#[derive(Debug)]
pub struct TickSchedule {
    t0_ns: u64,
    period_ns: f64,
    feed_id: u16,
    instruments: usize,
    seqs: Vec<u64>,
    server_seq: bool,
    next: u64,
}

impl TickSchedule {
    /// A schedule starting at `t0_ns`.
    pub fn new(t0_ns: u64, rate: f64, feed_id: u16, instruments: usize, server_seq: bool) -> TickSchedule {
        TickSchedule {
            t0_ns,
            period_ns: 1e9 / rate.max(1e-3),
            feed_id,
            instruments: instruments.max(1),
            seqs: vec![0; instruments.max(1)],
            server_seq,
            next: 0,
        }
    }

    /// Scheduled time of tick `n`.
    pub fn due_ns(&self, n: u64) -> u64 {
        self.t0_ns + (n as f64 * self.period_ns) as u64
    }

    /// The last seq given to instrument `k` (0 before its first tick).
    pub fn last_seq(&self, k: usize) -> u64 {
        self.seqs.get(k).copied().unwrap_or(0)
    }

    /// Ticks generated so far.
    pub fn generated(&self) -> u64 {
        self.next
    }

    /// The next tick: its instrument index and the encoded record.
    pub fn next_tick(&mut self) -> (usize, Record) {
        let n = self.next;
        self.next += 1;
        let k = (n % self.instruments as u64) as usize;
        self.seqs[k] += 1;
        let seq = if self.server_seq { 0 } else { self.seqs[k] };
        let ts = self.due_ns(n) as i64;
        let px = 100 * FIXED_SCALE + ((n % 200) as i64 - 100) * FIXED_SCALE / 100;
        let body = if n % 4 == 3 {
            Body::Trade(Trade { price: px, size: (1 + n % 7) * FIXED_SCALE as u64, side: 1 + (n % 2) as u8 })
        } else {
            Body::Quote(Quote {
                bid_px: px - FIXED_SCALE / 100,
                bid_sz: 5 * FIXED_SCALE as u64,
                ask_px: px + FIXED_SCALE / 100,
                ask_sz: 7 * FIXED_SCALE as u64,
            })
        };
        // instrument ids are 1-based positions, like a tickgate feed's.
        (k, Record::encode(self.feed_id, k as u32 + 1, seq, ts, ts, &body, 0))
    }
}

/// A connected destination.
enum Writer {
    Nats { client: async_nats::Client, subjects: Vec<async_nats::Subject> },
    Tickgate(TickgatePublisher),
}

impl Writer {
    /// Sends the ticks that were due together; returns the messages written.
    async fn send(&mut self, batch: &[(usize, Record)]) -> Result<u64, LoadError> {
        match self {
            Writer::Nats { client, subjects } => {
                for (k, r) in batch {
                    client
                        .publish(subjects[*k].clone(), Bytes::copy_from_slice(r.as_bytes()))
                        .await
                        .map_err(|e| LoadError::Nats(e.to_string()))?;
                }
                Ok(batch.len() as u64)
            }
            Writer::Tickgate(p) => p.send(batch).await,
        }
    }

    /// Waits until the server has taken everything sent.
    async fn finish(self) -> Result<(bool, u64), LoadError> {
        match self {
            Writer::Nats { client, .. } => {
                let ok = tokio::time::timeout(Duration::from_secs(10), client.flush()).await.is_ok_and(|r| r.is_ok());
                let _ = tokio::time::timeout(Duration::from_secs(2), client.drain()).await;
                Ok((ok, 0))
            }
            Writer::Tickgate(p) => p.finish().await,
        }
    }
}

/// The client side of tickgate's publish endpoint (`GET /v1/publish?feed=NAME`).
///
/// The whole protocol lives here: connect with subprotocol `tickgate.v1` and `Authorization:
/// Bearer` (scope `md:publish:NAME`); each binary message is one spec §5 batch (16-byte
/// header: version 1, flags 0, u16 count, u32 0, u64 send_ts_ns; then the records); a text
/// `{"op":"ping","id":N}` is answered `{"type":"pong","id":N,"ts":...}` once every earlier
/// batch was ingested; errors come back as `{"type":"error","code":...,"message":...}`.
pub struct TickgatePublisher {
    tx: futures_util::stream::SplitSink<tickgate_client::ClientWs, Message>,
    pongs: tokio::sync::mpsc::UnboundedReceiver<u64>,
    errors: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for TickgatePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TickgatePublisher").field("errors", &self.errors.load(Ordering::Relaxed)).finish()
    }
}

impl TickgatePublisher {
    /// Connects to the publish endpoint.
    /// A feed takes one publisher at a time: while the previous one is still being let
    /// go (409), this retries for up to 5 s.
    pub async fn connect(url: &str, token: &str) -> Result<TickgatePublisher, LoadError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let ws = loop {
            match tickgate_client::connect(url, token, &ConnectOptions::default()).await {
                Ok(ws) => break ws,
                Err(tickgate_client::ClientError::HandshakeRefused { status: 409, .. })
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let (tx, mut rx) = ws.split();
        let (pong_tx, pongs) = tokio::sync::mpsc::unbounded_channel();
        let errors = Arc::new(AtomicU64::new(0));
        let errs = errors.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(m)) = rx.next().await {
                let Message::Text(t) = m else { continue };
                let v: serde_json::Value = match serde_json::from_str(t.as_str()) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                match v.get("type").and_then(|t| t.as_str()) {
                    Some("pong") => {
                        let _ = pong_tx.send(v.get("id").and_then(|i| i.as_u64()).unwrap_or(0));
                    }
                    Some("error") if errs.fetch_add(1, Ordering::Relaxed) < 5 => {
                        eprintln!("publish endpoint error: {t}");
                    }
                    _ => {}
                }
            }
        });
        Ok(TickgatePublisher { tx, pongs, errors, reader, buf: Vec::new() })
    }

    /// Sends ticks as batch messages (at most 65,535 records each); returns the messages sent.
    pub async fn send(&mut self, batch: &[(usize, Record)]) -> Result<u64, LoadError> {
        let mut sent = 0;
        for chunk in batch.chunks(MAX_BATCH_RECORDS) {
            encode_batch(chunk.iter().map(|(_, r)| r), now_ns(), &mut self.buf);
            self.tx.send(Message::binary(self.buf.clone())).await.map_err(tickgate_client::ClientError::from)?;
            sent += 1;
        }
        Ok(sent)
    }

    /// Pings and waits for the pong that confirms every batch was ingested; returns
    /// (confirmed, error messages received).
    pub async fn finish(mut self) -> Result<(bool, u64), LoadError> {
        const FINAL_PING: u64 = 1;
        let ping = tickgate_proto::control::ClientMsg::Ping { id: Some(FINAL_PING as i64) }.to_json();
        self.tx.send(Message::text(ping)).await.map_err(tickgate_client::ClientError::from)?;
        let confirmed = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(id) = self.pongs.recv().await {
                if id == FINAL_PING {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        let _ = self.tx.send(Message::Close(None)).await;
        self.reader.abort();
        Ok((confirmed, self.errors.load(Ordering::Relaxed)))
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
pub(crate) async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {},
                    _ = i.recv() => {},
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the publisher until its duration or count is reached, or a signal stops it.
pub async fn run(opts: PublishOptions) -> Result<PublishSummary, LoadError> {
    if opts.symbols.is_empty() || opts.symbols.iter().any(|s| s == "*") {
        return Err(LoadError::Args("the publisher needs explicit --symbols (no '*')".into()));
    }
    if !opts.rate.is_finite() || opts.rate <= 0.0 {
        return Err(LoadError::Args("--rate must be positive".into()));
    }
    let (mut writer, sink) = match &opts.sink {
        PublishSink::Nats { url } => {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(10))
                .connect(url.as_str())
                .await
                .map_err(|e| LoadError::Nats(format!("{url}: {e}")))?;
            let subjects = opts.symbols.iter().map(|s| super::nats::subject(&opts.feed, s).into()).collect();
            (Writer::Nats { client, subjects }, "nats")
        }
        PublishSink::Tickgate { url, token } => {
            (Writer::Tickgate(TickgatePublisher::connect(url, token).await?), "tickgate-publish")
        }
    };
    let stop = stop_signal();
    tokio::pin!(stop);
    let t0 = now_ns() + 1_000_000;
    let started = Instant::now();
    let mut sched = TickSchedule::new(t0, opts.rate, opts.feed_id, opts.symbols.len(), opts.server_seq);
    let end_ns = opts.duration.map(|d| t0 + d.as_nanos() as u64);
    let limit = opts.count.unwrap_or(u64::MAX);
    let mut batch = Vec::new();
    let mut messages = 0u64;
    let mut max_behind_ns = 0u64;
    let mut last_progress = Instant::now();
    let mut last_ticks = 0u64;
    loop {
        let now = now_ns();
        batch.clear();
        // A publisher far behind still sends in bounded messages.
        while sched.generated() < limit && sched.due_ns(sched.generated()) <= now && batch.len() < 4096 {
            if end_ns.is_some_and(|e| sched.due_ns(sched.generated()) >= e) {
                break;
            }
            let first_due = sched.due_ns(sched.generated());
            max_behind_ns = max_behind_ns.max(now.saturating_sub(first_due));
            batch.push(sched.next_tick());
        }
        if !batch.is_empty() {
            messages += writer.send(&batch).await?;
        }
        let next_due = sched.due_ns(sched.generated());
        if sched.generated() >= limit || end_ns.is_some_and(|e| next_due >= e) {
            break;
        }
        if opts.progress && last_progress.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "publisher t={:>4.0}s  ticks/s={:>8}  behind_max={:.1} ms",
                started.elapsed().as_secs_f64(),
                sched.generated() - last_ticks,
                max_behind_ns as f64 / 1e6
            );
            last_ticks = sched.generated();
            last_progress = Instant::now();
        }
        let wait = next_due.saturating_sub(now_ns());
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_nanos(wait)) => {}
            _ = &mut stop => break,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let (confirmed, errors) = writer.finish().await?;
    let ticks = sched.generated();
    Ok(PublishSummary {
        sink: sink.into(),
        ticks,
        messages,
        seconds,
        ticks_per_s: ticks as f64 / seconds.max(1e-9),
        target_rate: opts.rate,
        max_behind_us: max_behind_ns as f64 / 1e3,
        errors,
        confirmed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_open_loop_round_robin_with_per_instrument_seqs() {
        let mut s = TickSchedule::new(1_000, 1000.0, 100, 3, false);
        let ticks: Vec<(usize, Record)> = (0..7).map(|_| s.next_tick()).collect();
        assert_eq!(ticks.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(ticks.iter().map(|t| t.1.seq()).collect::<Vec<_>>(), vec![1, 1, 1, 2, 2, 2, 3]);
        // ts_event_ns is the scheduled time: 1 ms apart at 1,000 ticks/s.
        assert_eq!(ticks[0].1.ts_event_ns(), 1_000);
        assert_eq!(ticks[5].1.ts_event_ns(), 1_000 + 5_000_000);
        assert_eq!(ticks[3].1.len(), 56, "every fourth tick is a trade");
        assert_eq!(ticks[0].1.len(), 72);
        assert_eq!(ticks[4].1.instrument_id(), 2);
        assert_eq!(ticks[4].1.feed_id(), 100);
        let mut z = TickSchedule::new(0, 10.0, 1, 2, true);
        assert_eq!(z.next_tick().1.seq(), 0);
    }
}
