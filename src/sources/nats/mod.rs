//! The `nats` source: feeds whose records come from NATS JetStream (nats-feeds-v1), so
//! several edges number every record alike and a client can resume on any of them.
//!
//! This module holds:
//! - [`NatsHealth`]: what `/readyz` asks of the source (every NATS feed warmed up, none
//!   refused, not cut off from NATS for longer than `nats.unready_after_ms`);
//! - `spawn`: one connection (async-nats, reconnecting on its own), then one task per
//!   NATS feed: its streams found or created (`streams`), the warm start, then live
//!   consumption;
//! - `contract`: the per-message rules and names, without I/O;
//! - `revocations`: cluster-wide revocation through the `tickgate_revocations` bucket,
//!   whenever `nats.servers` is set (with or without NATS feeds).
//!
//! **Warm start** (spec §3). The feed's epoch is the largest in the stream. The edge reads
//! `MDLV_<FEED>` (the last trade and quote of every instrument, however old) and
//! `MD_<FEED>` from `now - [resume] max_age_s` up to the stream's last sequence as of
//! start-up, then takes them in this order: each instrument's last values that are older
//! than its first record in the window (with everything up to that record declared not
//! replayable, so a resume from before the window gets `replay_unavailable` rather than
//! a replay with a hole), then the window in stream order. Only then is the feed ready.
//!
//! **Live.** One ordered consumer per feed, continuing where the warm start stopped.
//! async-nats recreates it from the last stream sequence it delivered when the
//! connection or a cluster member comes back, so nothing is skipped while JetStream still
//! holds it; what JetStream no longer holds shows up as a jump in seq, which the engine
//! names to clients as a `gap` (`source_gap`). Existing client connections are never
//! touched by NATS trouble.
//!
//! Every message goes through the same path as a publisher's batch: checked whole
//! (`contract::decode`), then its seqs checked against the log and appended under one
//! hold of the log's write lock ([`Ingest::append_with`]), then queued for the shards. A
//! message that breaks the contract is dropped alone, counted in
//! `tickgate_nats_rejects_total{feed,reason}` and logged (at most once a second per feed,
//! with the count of those not logged); the feed keeps streaming.

pub(crate) mod contract;
pub(crate) mod forward;
pub mod handler;
pub mod revocations;
pub(crate) mod streams;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, Message};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::contract::{NatsReject, EPOCH_HEADER};
use self::streams::EnsureError;
use crate::config::NatsConfig;
use crate::engine::{Ingest, Tick};
use crate::feeds::{Catalog, SourceKind};
use crate::metrics::Metrics;
use tickgate_proto::codec::Record;

/// Messages taken in, at most, between two wake-ups of the shards: a burst already
/// received from NATS is queued whole, then the shards are woken once.
const WAKE_EVERY_MESSAGES: usize = 64;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What `/readyz` needs to know of the NATS feeds.
#[derive(Debug)]
pub struct NatsHealth {
    unready_after_ms: u64,
    /// The connection is up.
    up: AtomicBool,
    /// Wall-clock ms since which it has been down (the start counts as down).
    down_since_ms: AtomicU64,
    feeds: Vec<FeedHealth>,
    /// The JetStream context, once the connection is set up: `/v1/publish` into a `nats`
    /// feed forwards through it.
    js: std::sync::OnceLock<jetstream::Context>,
    /// Revocations go through the NATS bucket (`nats.servers` is set).
    revocations: bool,
    /// Every entry of the revocation bucket has been applied once (set once, never reset:
    /// an edge cut off later keeps what it loaded and is judged by its feeds alone).
    revocations_loaded: AtomicBool,
    /// Why the existing revocation bucket cannot be used (it contradicts what revocation
    /// needs), for `/readyz`; cleared when a later look finds it mended.
    revocations_refused: Mutex<Option<String>>,
    /// Counts the connection's (re)connects, so watchers start over after each, and the
    /// feed tasks recreate their consumers at once from their own last stream sequence
    /// (the ordered consumer alone waits for two missed heartbeats: tens of seconds).
    connected_gen: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug)]
struct FeedHealth {
    name: String,
    warm: AtomicBool,
    refused: Mutex<Option<String>>,
}

impl NatsHealth {
    /// The health of the catalog's NATS feeds (none: always ready).
    pub(crate) fn new(catalog: &Catalog, cfg: &NatsConfig) -> Arc<NatsHealth> {
        let feeds = catalog
            .feeds()
            .iter()
            .filter(|f| f.def.source == SourceKind::Nats)
            .map(|f| FeedHealth { name: f.name().to_owned(), warm: AtomicBool::new(false), refused: Mutex::new(None) })
            .collect();
        Arc::new(NatsHealth {
            unready_after_ms: cfg.unready_after_ms,
            up: AtomicBool::new(false),
            down_since_ms: AtomicU64::new(now_ms()),
            feeds,
            js: std::sync::OnceLock::new(),
            revocations: !cfg.servers.is_empty(),
            revocations_loaded: AtomicBool::new(false),
            revocations_refused: Mutex::new(None),
            connected_gen: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Whether the revocation bucket has been loaded (always true without NATS).
    pub(crate) fn revocations_loaded(&self) -> bool {
        !self.revocations || self.revocations_loaded.load(Ordering::Acquire)
    }

    /// Records (or clears) why the revocation bucket is refused.
    fn set_revocations_refused(&self, why: Option<String>) {
        *self.revocations_refused.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    fn set_revocations_loaded(&self) {
        if !self.revocations_loaded.swap(true, Ordering::AcqRel) {
            tracing::info!("cluster revocations loaded from NATS");
        }
    }

    /// Changes on every (re)connect.
    fn connected_gen(&self) -> tokio::sync::watch::Receiver<u64> {
        self.connected_gen.subscribe()
    }

    /// `Ok` when the NATS feeds can serve (or there are none); else why not, for the
    /// `/readyz` body.
    pub(crate) fn status(&self) -> Result<(), String> {
        if !self.revocations_loaded() {
            if let Some(why) = self.revocations_refused.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                return Err(format!("revocation bucket refused: {why}"));
            }
            return Err("loading the cluster's revocations from NATS".into());
        }
        if self.feeds.is_empty() {
            return Ok(());
        }
        for f in &self.feeds {
            if let Some(why) = f.refused.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                return Err(format!("feed {} refused: {why}", f.name));
            }
        }
        if !self.up.load(Ordering::Acquire) {
            let down_ms = now_ms().saturating_sub(self.down_since_ms.load(Ordering::Acquire));
            if down_ms >= self.unready_after_ms {
                return Err(format!("cut off from NATS for {down_ms} ms"));
            }
        }
        match self.feeds.iter().find(|f| !f.warm.load(Ordering::Acquire)) {
            Some(f) => Err(format!("feed {} warming up from NATS", f.name)),
            None => Ok(()),
        }
    }

    /// The JetStream context, once connected (`None` before, or without NATS feeds).
    pub(crate) fn jetstream(&self) -> Option<jetstream::Context> {
        self.js.get().cloned()
    }

    fn feed(&self, name: &str) -> Option<&FeedHealth> {
        self.feeds.iter().find(|f| f.name == name)
    }

    fn set_up(&self, up: bool) {
        if !up && self.up.load(Ordering::Acquire) {
            self.down_since_ms.store(now_ms(), Ordering::Release);
        }
        self.up.store(up, Ordering::Release);
        if up {
            self.connected_gen.send_modify(|g| *g += 1);
        }
    }
}

/// Starts the NATS source when `nats.servers` is set: one connection, then the revocation
/// bucket's tasks ([`revocations`]) and a task per NATS feed on `tasks`, each stopping when
/// `cancel` fires.
#[allow(clippy::too_many_arguments)] // the server's parts, passed once at start-up
pub(crate) fn spawn(
    cfg: &NatsConfig,
    revocations: &Arc<revocations::ClusterRevocations>,
    apply: revocations::Apply,
    catalog: &Arc<Catalog>,
    ingest: &Ingest,
    metrics: &Metrics,
    health: &Arc<NatsHealth>,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) {
    let feeds: Vec<usize> =
        catalog.feeds().iter().filter(|f| f.def.source == SourceKind::Nats).map(|f| f.idx).collect();
    if cfg.servers.is_empty() {
        return;
    }
    for &idx in &feeds {
        if let Some(f) = catalog.get(idx) {
            NatsReject::prime(metrics, f.name());
            metrics.nats_messages.with_label_values(&[f.name()]);
            metrics.nats_stream_seq.with_label_values(&[f.name()]);
            metrics.nats_last_message_age.with_label_values(&[f.name()]);
        }
    }
    let (cfg, catalog, ingest, metrics, health, cancel) =
        (cfg.clone(), catalog.clone(), ingest.clone(), metrics.clone(), health.clone(), cancel.clone());
    let feed_tasks = tasks.clone();
    let revocations = revocations.clone();
    tasks.spawn(async move {
        let client = match connect(&cfg, &health, &metrics).await {
            Ok(c) => c,
            Err(why) => {
                tracing::error!(error = %why, "NATS: cannot set up the connection; the NATS feeds are not served, revocations not shared, /readyz stays 503");
                for f in &health.feeds {
                    *f.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                }
                return;
            }
        };
        revocations::spawn(&revocations, client.clone(), &health, apply, &feed_tasks, &cancel);
        let js = jetstream::new(client.clone());
        let _ = health.js.set(js.clone());
        for idx in feeds {
            let feed = FeedTask::new(idx, &cfg, &catalog, &ingest, &metrics, &health);
            feed_tasks.spawn(feed.run(js.clone(), cfg.clone(), cancel.clone()));
        }
        // Hold the connection until shutdown; the feed tasks hold clones of it too.
        cancel.cancelled().await;
        drop(client);
    });
}

/// The connection, reconnecting forever on its own; its state feeds [`NatsHealth`] and
/// `tickgate_nats_connected` / `tickgate_nats_reconnects_total`. Only a configuration that
/// cannot work (an unreadable credentials file) is an error here: an unreachable NATS is
/// retried, with the edge not ready meanwhile.
async fn connect(cfg: &NatsConfig, health: &Arc<NatsHealth>, metrics: &Metrics) -> Result<async_nats::Client, String> {
    let mut opts = credentials(cfg).await?;
    let (h, m) = (health.clone(), metrics.clone());
    let ever_up = Arc::new(AtomicBool::new(false));
    opts = opts
        .name("tickgate-edge")
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .ping_interval(ping_interval(cfg.unready_after_ms))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |ev| {
            let (h, m, ever_up) = (h.clone(), m.clone(), ever_up.clone());
            async move {
                match ev {
                    async_nats::Event::Connected => {
                        let again = ever_up.swap(true, Ordering::AcqRel);
                        h.set_up(true);
                        if again {
                            m.nats_reconnects.inc();
                        }
                        m.nats_connected.set(1);
                        tracing::info!("NATS connected");
                    }
                    async_nats::Event::Disconnected => {
                        h.set_up(false);
                        m.nats_connected.set(0);
                        tracing::warn!("NATS connection lost; reconnecting (clients stay connected)");
                    }
                    async_nats::Event::Closed => {
                        h.set_up(false);
                        m.nats_connected.set(0);
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
    let servers: Vec<async_nats::ServerAddr> = cfg
        .servers
        .iter()
        .map(|s| s.parse().map_err(|e| format!("nats.servers {s:?}: {e}")))
        .collect::<Result<_, _>>()?;
    if servers.is_empty() {
        return Err("nats.servers is empty but a feed has source = \"nats\"".into());
    }
    opts.connect(servers).await.map_err(|e| format!("NATS: {e}"))
}

/// How often the edge pings NATS. A link that dies without a FIN or RST (a cable, a switch
/// port, a partition) is noticed only by pings: async-nats counts the connection lost at
/// the third ping without an answer (nor anything else from the server). With async-nats'
/// default of a minute, an edge cut off that way stayed ready for up to three minutes; a
/// third of `nats.unready_after_ms` notices it within about that time, so `/readyz` turns
/// 503 about `2 × unready_after_ms` after the cut. At least a second, so that a busy
/// machine is not taken for a dead link; at most the default.
fn ping_interval(unready_after_ms: u64) -> Duration {
    Duration::from_millis((unready_after_ms / 3).clamp(1_000, 60_000))
}

/// The connection options `[nats]` asks for: credentials (a creds file, user/password or
/// a token) and the CA of `tls://` servers. Shared by the edge and the feed handler.
pub(crate) async fn credentials(cfg: &NatsConfig) -> Result<async_nats::ConnectOptions, String> {
    let mut opts = match &cfg.creds_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| format!("nats.creds_file {}: {e}", path.display()))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.clone());
    }
    if let Some(ca) = &cfg.tls_ca {
        if !ca.is_file() {
            return Err(format!("nats.tls_ca {}: not a readable file", ca.display()));
        }
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    Ok(opts)
}

/// Logs a feed's dropped messages at most once a second, with how many were not logged.
#[derive(Debug)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn log(&mut self, feed: &str, reason: NatsReject, subject: &str, stream_seq: u64) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            feed,
            reason = reason.as_str(),
            subject,
            stream_seq,
            not_logged_before = self.suppressed,
            "NATS message dropped: it breaks the feed contract (nats-feeds-v1 §2)"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// A message checked against the contract, not yet taken in.
#[derive(Debug)]
struct Checked {
    instr: u32,
    epoch: u64,
    records: Vec<Record>,
}

/// One NATS feed: its streams, warm start and live consumption.
struct FeedTask {
    idx: u16,
    name: String,
    feed_id: u16,
    instruments: usize,
    max_age_s: u64,
    window_cap: usize,
    prefix: String,
    catalog: Arc<Catalog>,
    ingest: Ingest,
    health: Arc<NatsHealth>,
    messages: prometheus::IntCounter,
    stream_seq: prometheus::IntGauge,
    age: prometheus::Gauge,
    rejects: HashMap<NatsReject, prometheus::IntCounter>,
    log: RateLimitedLog,
    last_taken: Option<Instant>,
    /// The last stream sequence taken in (where a new consumer starts after it).
    last_stream_seq: u64,
    ticks: Vec<Tick>,
}

impl FeedTask {
    fn new(
        idx: usize,
        cfg: &NatsConfig,
        catalog: &Arc<Catalog>,
        ingest: &Ingest,
        metrics: &Metrics,
        health: &Arc<NatsHealth>,
    ) -> FeedTask {
        let feed = &catalog.feeds()[idx];
        let name = feed.name().to_owned();
        FeedTask {
            idx: idx as u16,
            feed_id: feed.id(),
            instruments: feed.instrument_count(),
            max_age_s: feed.def.resume.max_age_s,
            // The window is held in memory until it is taken in: bounded by what the resume
            // buffer keeps anyway (older records would be evicted at once).
            window_cap: feed.def.resume.records.max(1),
            prefix: cfg.subject_prefix.clone(),
            catalog: catalog.clone(),
            ingest: ingest.clone(),
            health: health.clone(),
            messages: metrics.nats_messages.with_label_values(&[&name]),
            stream_seq: metrics.nats_stream_seq.with_label_values(&[&name]),
            age: metrics.nats_last_message_age.with_label_values(&[&name]),
            rejects: NatsReject::ALL
                .iter()
                .map(|r| (*r, metrics.nats_rejects.with_label_values(&[&name, r.as_str()])))
                .collect(),
            log: RateLimitedLog { last: None, suppressed: 0 },
            last_taken: None,
            last_stream_seq: 0,
            ticks: Vec::new(),
            name,
        }
    }

    fn refuse(&self, why: String) {
        tracing::error!(feed = %self.name, error = %why, "NATS feed refused; /readyz stays 503");
        if let Some(h) = self.health.feed(&self.name) {
            *h.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        }
    }

    fn set_warm(&self) {
        if let Some(h) = self.health.feed(&self.name) {
            h.warm.store(true, Ordering::Release);
        }
    }

    async fn run(mut self, js: jetstream::Context, cfg: NatsConfig, cancel: CancellationToken) {
        let Some(def) = self.catalog.get(self.idx as usize).map(|f| f.def.clone()) else { return };
        let mut backoff = Duration::from_millis(100);
        // Streams, then the warm start; NATS trouble on the way is retried from scratch
        // (nothing is taken in before the warm start has read everything it needs).
        let mut consumer = loop {
            let attempt = async {
                let stream = streams::ensure(&js, &cfg, &def).await?;
                self.warm_start(&js, stream).await.map_err(EnsureError::Nats)
            };
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = attempt => r,
            };
            match result {
                // What the consumer has received already comes as one chunk (up to
                // WAKE_EVERY_MESSAGES messages), taken in whole before the shards are woken once.
                // `ready_chunks` polls the consumer with this task's own waker: polling it
                // with another (`now_or_never`) lost the wake-up after a reconnect.
                Ok(live) => break live.ready_chunks(WAKE_EVERY_MESSAGES),
                Err(EnsureError::Contract(why)) => return self.refuse(why),
                Err(EnsureError::Nats(why)) => {
                    tracing::warn!(feed = %self.name, error = %why, retry_ms = backoff.as_millis() as u64,
                        "NATS feed not started yet");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        self.set_warm();
        tracing::info!(feed = %self.name, epoch = self.epoch(), "NATS feed warm; serving live");
        let mut age_tick = tokio::time::interval(Duration::from_secs(1));
        let mut reconnected = self.health.connected_gen();
        reconnected.mark_unchanged();
        // Set when a consumer could not be made after a reconnect: try again then.
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let retry = async move {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                r = async { tokio::select! { r = reconnected.changed() => r.is_ok(), () = retry => true } } => {
                    if !r {
                        return;
                    }
                    retry_at = None;
                    // Back from a lost connection: a consumer from the next stream sequence
                    // now (the old one may be gone with a restarted server).
                    let from = self.last_stream_seq + 1;
                    match self.live_consumer(&js, DeliverPolicy::ByStartSequence { start_sequence: from }).await {
                        Ok(c) => {
                            tracing::info!(feed = %self.name, from, "NATS back: consuming again");
                            consumer = c.ready_chunks(WAKE_EVERY_MESSAGES);
                        }
                        Err(e) => {
                            tracing::warn!(feed = %self.name, error = %e, "NATS back but no consumer yet; retrying");
                            retry_at = Some(tokio::time::Instant::now() + Duration::from_millis(500));
                        }
                    }
                    continue;
                }
                _ = age_tick.tick() => {
                    if let Some(t) = self.last_taken {
                        self.age.set(t.elapsed().as_secs_f64());
                    }
                    continue;
                }
                m = consumer.next() => m,
            };
            match next {
                Some(chunk) => {
                    // One wake-up per chunk of messages, not one per message (a wake is a
                    // syscall and a context switch, dearer than a message of records).
                    let mut errors = 0;
                    for item in chunk {
                        match item {
                            Ok(msg) => self.take(&msg, &cancel).await,
                            Err(e) => {
                                errors += 1;
                                tracing::debug!(feed = %self.name, error = %e, "NATS consumer error");
                            }
                        }
                    }
                    self.ingest.flush();
                    if errors > 0 {
                        // The ordered consumer recreates itself (from its last stream sequence)
                        // after most errors; pause briefly so an error repeated while NATS is
                        // away does not spin.
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                }
                None => {
                    // The consumer gave up: a new one from the next stream sequence.
                    let from = self.last_stream_seq + 1;
                    match self.live_consumer(&js, DeliverPolicy::ByStartSequence { start_sequence: from }).await {
                        Ok(c) => consumer = c.ready_chunks(WAKE_EVERY_MESSAGES),
                        Err(e) => {
                            tracing::warn!(feed = %self.name, error = %e, "NATS consumer lost; retrying");
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            }
                        }
                    }
                }
            }
        }
    }

    fn epoch(&self) -> u64 {
        self.catalog.get(self.idx as usize).map(|f| f.epoch()).unwrap_or(0)
    }

    async fn live_consumer(&self, js: &jetstream::Context, policy: DeliverPolicy) -> Result<pull::Ordered, String> {
        let stream = js.get_stream(contract::stream_name(&self.name)).await.map_err(|e| e.to_string())?;
        ordered(&stream, policy).await
    }

    /// Reads the last values and the window, takes them in (see the module docs), and
    /// returns the consumer to continue live with.
    async fn warm_start(
        &mut self,
        js: &jetstream::Context,
        mut stream: jetstream::stream::Stream,
    ) -> Result<pull::Ordered, String> {
        let info = stream.info().await.map_err(|e| format!("stream info: {e}"))?.clone();
        let last_at_start = info.state.last_sequence;
        // Last values: at most two messages per instrument.
        let lv = js.get_stream(contract::last_values_name(&self.name)).await.map_err(|e| e.to_string())?;
        let mut last_values: Vec<(u64, Checked)> = Vec::new();
        let mut lv_consumer = ordered(&lv, DeliverPolicy::All).await?;
        let lv_pending = lv_state_messages(&lv).await?;
        let mut read = 0u64;
        while read < lv_pending {
            let Some(msg) = next_within(&mut lv_consumer).await? else { break };
            read += 1;
            let pending = msg.info().map(|i| i.pending).unwrap_or(0);
            if let Ok(c) = self.check(&msg) {
                // A last value is the last record of the last message on its subject.
                let stream_seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                last_values.push((stream_seq, c));
            }
            if pending == 0 {
                break;
            }
        }
        drop(lv_consumer);
        // The window: from now - max_age_s, up to the last sequence as of start-up.
        let start = time::OffsetDateTime::now_utc() - time::Duration::seconds(self.max_age_s as i64);
        let mut consumer = ordered(&stream, DeliverPolicy::ByStartTime { start_time: start }).await?;
        // Held checked (records only, not whole NATS messages: a message of a few records
        // carries hundreds of bytes of subject, headers and reply around them).
        let mut window: VecDeque<(u64, Checked)> = VecDeque::new();
        let mut window_records = 0usize;
        // Sized once (no message holds fewer than one record, so never beyond the cap).
        window.reserve((info.state.messages as usize).min(self.window_cap));
        // Nothing newer than the window's start: nothing to read (the consumer would wait).
        let in_window = info.state.messages > 0 && info.state.last_timestamp >= start;
        if in_window {
            loop {
                let Some(msg) = next_within(&mut consumer).await? else { break };
                let (seq, pending) = msg.info().map(|i| (i.stream_sequence, i.pending)).unwrap_or((0, 0));
                match self.check(&msg) {
                    Ok(c) => {
                        window_records += c.records.len();
                        window.push_back((seq, c));
                    }
                    Err(r) => self.count_reject(r, &msg.subject, seq),
                }
                // Bounded by what the resume buffer keeps (`[resume] records`): older
                // messages would be evicted from it at once, so they are let go.
                while window_records > self.window_cap && window.len() > 1 {
                    if let Some((_, old)) = window.pop_front() {
                        window_records -= old.records.len();
                    }
                }
                if seq >= last_at_start || pending == 0 {
                    break;
                }
            }
        }
        // The feed's epoch: the largest seen.
        let checked_window = window;
        let epoch = checked_window
            .iter()
            .map(|(_, c)| c.epoch)
            .chain(last_values.iter().map(|(_, c)| c.epoch))
            .max()
            .unwrap_or(0);
        if epoch > 0 && epoch != self.epoch() {
            self.ingest.reset(self.idx, epoch, &CancellationToken::new()).await;
        }
        // Each instrument's first seq in the window (current epoch only).
        let mut first_in_window: HashMap<u32, u64> = HashMap::new();
        for (_, c) in checked_window.iter().filter(|(_, c)| c.epoch == epoch) {
            if let Some(r) = c.records.first() {
                first_in_window.entry(c.instr).or_insert(r.seq());
            }
        }
        // Last values older than the window, per instrument in seq order.
        let mut older: Vec<(u32, Record)> = last_values
            .iter()
            .filter(|(_, c)| c.epoch == epoch)
            .filter_map(|(_, c)| c.records.last().map(|r| (c.instr, *r)))
            .filter(|(instr, r)| first_in_window.get(instr).is_none_or(|first| r.seq() < *first))
            .collect();
        older.sort_by_key(|(instr, r)| (*instr, r.seq()));
        if let Some(feed) = self.catalog.get(self.idx as usize) {
            let mut log = feed.log_mut();
            log.reserve(older.len() + window_records);
            for (instr, r) in &older {
                // Nothing between this last value and the window is here to replay.
                let upto = first_in_window.get(instr).map(|f| f - 1).unwrap_or(r.seq());
                log.mark_evicted(*instr, upto);
            }
        }
        let now = tickgate_proto::now_ns() as i64;
        let ticks: Vec<Tick> = older
            .iter()
            .map(|(instr, r)| Tick { feed_idx: self.idx, instr: *instr, record: r.with_recv_ts(now) })
            .collect();
        let mut ticks_buf = ticks;
        let _ = self.ingest.append_with(self.idx, &mut ticks_buf, |log, ticks| -> Result<(), ()> {
            // Keep only what is above the log (a restart within one process cannot make
            // it otherwise, but the log is the judge).
            ticks.retain(|t| t.record.seq() > log.last_seq(t.instr));
            Ok(())
        });
        let never = CancellationToken::new();
        self.ingest.enqueue(&ticks_buf, &never).await;
        self.ingest.flush();
        for (seq, c) in checked_window {
            if c.epoch < epoch {
                continue; // history of an earlier epoch
            }
            self.take_checked(seq, "(warm start)", c, &never).await;
        }
        self.ingest.flush();
        if epoch == 0 {
            tracing::info!(feed = %self.name, "NATS stream empty: the feed starts with its first message");
        }
        Ok(consumer)
    }

    /// Checks a message against the contract (subject, epoch header, batch).
    fn check(&self, msg: &Message) -> Result<Checked, NatsReject> {
        let (instr, rtype) = contract::parse_subject(&msg.subject, &self.prefix, &self.name, self.instruments)?;
        let epoch = contract::parse_epoch(msg.headers.as_ref().and_then(|h| h.get(EPOCH_HEADER)).map(|v| v.as_str()))?;
        let mut records = Vec::new();
        contract::decode(&msg.payload, self.feed_id, instr, rtype, &mut records)?;
        Ok(Checked { instr, epoch, records })
    }

    fn count_reject(&mut self, r: NatsReject, subject: &str, stream_seq: u64) {
        if let Some(c) = self.rejects.get(&r) {
            c.inc();
        }
        self.log.log(&self.name, r, subject, stream_seq);
    }

    /// Takes one live message in (see [`FeedTask::take_checked`]).
    async fn take(&mut self, msg: &Message, cancel: &CancellationToken) {
        let stream_seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        match self.check(msg) {
            Ok(c) => self.take_checked(stream_seq, &msg.subject, c, cancel).await,
            Err(r) => {
                self.note_position(stream_seq);
                self.count_reject(r, &msg.subject, stream_seq);
            }
        }
    }

    fn note_position(&mut self, stream_seq: u64) {
        if stream_seq > 0 {
            self.last_stream_seq = self.last_stream_seq.max(stream_seq);
            self.stream_seq.set(self.last_stream_seq as i64);
        }
        self.last_taken = Some(Instant::now());
        self.age.set(0.0);
    }

    /// Takes one checked message in: its epoch applied, its seqs checked against the log
    /// and appended, then queued for the shards; the caller wakes them
    /// ([`Ingest::flush`]) after its burst.
    async fn take_checked(&mut self, stream_seq: u64, subject: &str, c: Checked, cancel: &CancellationToken) {
        self.note_position(stream_seq);
        let current = self.epoch();
        if c.epoch < current {
            return self.count_reject(NatsReject::EpochBackwards, subject, stream_seq);
        }
        if c.epoch > current {
            // A new epoch (a feed handler that restarted its numbering): clients get
            // `reset` before any record of it.
            if !self.ingest.reset(self.idx, c.epoch, cancel).await {
                return;
            }
        }
        let now = tickgate_proto::now_ns() as i64;
        let (idx, instr) = (self.idx, c.instr);
        let records = &c.records;
        let appended = self.ingest.append_with(idx, &mut self.ticks, |log, ticks| {
            if records.first().is_some_and(|r| r.seq() <= log.last_seq(instr)) {
                return Err(NatsReject::BadSeq);
            }
            ticks.clear();
            ticks.extend(records.iter().map(|r| Tick { feed_idx: idx, instr, record: r.with_recv_ts(now) }));
            Ok(())
        });
        if let Err(r) = appended {
            return self.count_reject(r, subject, stream_seq);
        }
        self.messages.inc();
        let ticks = std::mem::take(&mut self.ticks);
        // Not woken here: the caller flushes after its burst (a full shard queue wakes
        // its shard while this waits).
        self.ingest.enqueue(&ticks, cancel).await;
        self.ticks = ticks;
    }
}

/// An ordered pull consumer on `stream` from `policy`.
async fn ordered(stream: &jetstream::stream::Stream, policy: DeliverPolicy) -> Result<pull::Ordered, String> {
    let consumer = stream
        .create_consumer(pull::OrderedConfig { deliver_policy: policy, ..pull::OrderedConfig::default() })
        .await
        .map_err(|e| format!("creating a consumer: {e}"))?;
    consumer.messages().await.map_err(|e| format!("consuming: {e}"))
}

/// Messages in the last-values stream now.
async fn lv_state_messages(lv: &jetstream::stream::Stream) -> Result<u64, String> {
    let mut lv = lv.clone();
    lv.info().await.map(|i| i.state.messages).map_err(|e| format!("stream info: {e}"))
}

/// The consumer's next message within 10 s (a warm start that stalls is retried whole).
async fn next_within(consumer: &mut pull::Ordered) -> Result<Option<Message>, String> {
    match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
        Err(_) => Err("no message within 10 s while warming up".into()),
        Ok(None) => Ok(None),
        Ok(Some(Ok(m))) => Ok(Some(m)),
        Ok(Some(Err(e))) => Err(format!("while warming up: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_follow_unready_after_within_bounds() {
        assert_eq!(ping_interval(3_000), Duration::from_secs(1));
        assert_eq!(ping_interval(100), Duration::from_secs(1), "never below a second");
        assert_eq!(ping_interval(30_000), Duration::from_secs(10));
        assert_eq!(ping_interval(3_600_000), Duration::from_secs(60), "never above async-nats' default");
    }
}
