//! The `subscribe` and `record` commands, as library functions the binary calls.
//!
//! `subscribe` prints one JSON line per record or control message (gaps, resets and
//! conflated/replayed records included, so what the delivery guarantees promise is
//! visible) and can keep a resume file: after every message it records the last seq
//! seen per symbol and the feed's epoch, and at start it resumes from them, so a client
//! that reconnects gets exactly what it missed.
//!
//! `record` captures a live stream into a [`tickgate_proto::recording`] file.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ClientError, ConnectOptions, Event, Subscriber};
use tickgate_proto::codec::{Body, Record, FLAG_CONFLATED, FLAG_REPLAY, FLAG_SNAPSHOT};
use tickgate_proto::control::ServerMsg;
use tickgate_proto::now_ns;
use tickgate_proto::recording::{Meta, Writer};

/// What `subscribe` and `record` read: the stream, its credential and the subscription.
#[derive(Debug, Clone, Default)]
pub struct StreamTarget {
    /// Stream URL.
    pub url: String,
    /// Access token.
    pub token: String,
    /// Feed name.
    pub feed: String,
    /// Symbols, or `["*"]`.
    pub symbols: Vec<String>,
    /// CA certificate for wss://.
    pub ca_file: Option<PathBuf>,
}

impl StreamTarget {
    /// Connects to the stream.
    async fn connect(&self) -> Result<Subscriber, ClientError> {
        let copts = ConnectOptions { ca_file: self.ca_file.clone(), ..ConnectOptions::default() };
        Subscriber::connect(&self.url, &self.token, &copts).await
    }

    /// Sends the one `subscribe` (id 1) for the target's feed and symbols.
    async fn subscribe(
        &self,
        sub: &mut Subscriber,
        snapshot: bool,
        resume: Option<(Option<u64>, BTreeMap<String, u64>)>,
    ) -> Result<(), ClientError> {
        let symbols: Vec<&str> = self.symbols.iter().map(String::as_str).collect();
        sub.subscribe(1, &self.feed, &symbols, snapshot, resume).await
    }
}

/// `tickgate subscribe` settings.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// What to read.
    pub stream: StreamTarget,
    /// Ask for a snapshot first.
    pub snapshot: bool,
    /// Stop after this many records.
    pub limit: Option<u64>,
    /// Resume from / keep the last seqs in this file.
    pub resume_file: Option<PathBuf>,
    /// Fresh tokens for in-band refresh (and the first token when `stream.token` is empty).
    pub token_source: Option<TokenSource>,
    /// Connect again (with resume) after the server goes away, the connection drops, this
    /// client falls behind (4008) or, with a token source, the token expires.
    pub reconnect: bool,
}

/// What a resume file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResumeState {
    /// Feed name.
    pub feed: String,
    /// Epoch the seqs belong to.
    pub epoch: Option<u64>,
    /// Last seq seen per symbol.
    pub seqs: BTreeMap<String, u64>,
}

impl ResumeState {
    /// Reads a resume file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Option<ResumeState>, ClientError> {
        match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClientError::Io(e)),
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ClientError::Control(format!("resume file {}: {e}", path.display()))),
        }
    }

    /// Writes the file atomically (temporary file + rename), so a client killed at any
    /// moment leaves either the old or the new state, never half of one.
    pub fn save(&self, path: &Path) -> Result<(), ClientError> {
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(self).map_err(|e| ClientError::Control(e.to_string()))?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// How a `subscribe` run ended.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SubscribeSummary {
    /// Records printed.
    pub records: u64,
    /// Delivery violations (silent gaps, duplicates, strays).
    pub violations: u64,
    /// Close code, if the server closed.
    pub close_code: Option<u16>,
    /// Connections made again after a close (`reconnect`).
    pub reconnects: u64,
    /// In-band refreshes the server accepted.
    pub refreshes: u64,
    /// Why it stopped.
    pub end: SubscribeEnd,
}

/// Why `tickgate subscribe` stopped. Each reason has its own process exit code
/// ([`SubscribeEnd::exit_code`], [`exit_code_of_error`]), so a script can tell a finished
/// run from a refused one and from one the server ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "end", rename_all = "snake_case")]
pub enum SubscribeEnd {
    /// `--limit` records were printed (exit 0).
    #[default]
    Limit,
    /// The server answered the `subscribe` with an `error` (`unknown_feed`,
    /// `unknown_symbol`, `insufficient_scope`, `limit_exceeded`, `bad_request`).
    Refused {
        /// The error's code, as on the wire.
        code: String,
        /// Its message.
        message: String,
    },
    /// The server closed the connection (or it dropped: 1006).
    Closed {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
}

/// Exit codes of `tickgate subscribe` (documented in docs/protocol.md §16, *Scripting*).
pub mod exit {
    /// `--limit` reached.
    pub const OK: u8 = 0;
    /// Anything not named below (a file that cannot be written, an undecodable message).
    pub const OTHER: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// No connection: bad URL, DNS, TCP or TLS failure.
    pub const CONNECT: u8 = 3;
    /// Handshake refused with 401: the token is missing, invalid, expired or revoked.
    pub const UNAUTHORIZED: u8 = 4;
    /// Handshake refused otherwise (403 scope or origin, 429 limits, 503 draining, 400).
    pub const HANDSHAKE_REFUSED: u8 = 5;
    /// The `subscribe` was answered with an `error`.
    pub const SUBSCRIBE_REFUSED: u8 = 6;
    /// Closed 4001: the token expired on the live connection.
    pub const TOKEN_EXPIRED: u8 = 7;
    /// Closed 4003: the token was revoked.
    pub const TOKEN_REVOKED: u8 = 8;
    /// Closed 4008: this client did not keep up.
    pub const SLOW_CONSUMER: u8 = 9;
    /// Closed 1001: the server shut down (it sent `shutdown` first).
    pub const SHUTDOWN: u8 = 10;
    /// Closed with any other code, or the connection dropped (1006).
    pub const CLOSED: u8 = 11;
    /// The stream broke the delivery guarantees (a silent gap, a duplicate).
    pub const DELIVERY_VIOLATION: u8 = 12;
}

impl SubscribeEnd {
    /// The process exit code for this end.
    pub fn exit_code(&self) -> u8 {
        match self {
            SubscribeEnd::Limit => exit::OK,
            SubscribeEnd::Refused { .. } => exit::SUBSCRIBE_REFUSED,
            SubscribeEnd::Closed { code: 4001, .. } => exit::TOKEN_EXPIRED,
            SubscribeEnd::Closed { code: 4003, .. } => exit::TOKEN_REVOKED,
            SubscribeEnd::Closed { code: 4008, .. } => exit::SLOW_CONSUMER,
            SubscribeEnd::Closed { code: 1001, .. } => exit::SHUTDOWN,
            SubscribeEnd::Closed { .. } => exit::CLOSED,
        }
    }

    /// One line for a human, on standard error.
    pub fn describe(&self) -> String {
        match self {
            SubscribeEnd::Limit => "limit reached".into(),
            SubscribeEnd::Refused { code, message } => format!("subscription refused ({code}): {message}"),
            SubscribeEnd::Closed { code, reason } => format!("closed by the server ({code}): {reason}"),
        }
    }
}

impl SubscribeSummary {
    /// The process exit code: a delivery violation outranks how the run ended.
    pub fn exit_code(&self) -> u8 {
        if self.violations > 0 {
            exit::DELIVERY_VIOLATION
        } else {
            self.end.exit_code()
        }
    }
}

/// The process exit code for a run that failed before or outside the stream.
pub fn exit_code_of_error(e: &ClientError) -> u8 {
    match e {
        ClientError::HandshakeRefused { status: 401, .. } => exit::UNAUTHORIZED,
        ClientError::HandshakeRefused { .. } => exit::HANDSHAKE_REFUSED,
        ClientError::Url(_) | ClientError::Io(_) | ClientError::Ws(_) => exit::CONNECT,
        _ => exit::OTHER,
    }
}

/// A record as one JSON object.
pub fn record_json(r: &Record, feed: Option<&str>, symbol: Option<&str>, send_ts_ns: u64) -> serde_json::Value {
    let flags = r.flags();
    let mut v = json!({
        "type": if r.rtype() == 1 { "trade" } else { "quote" },
        "feed": feed,
        "symbol": symbol,
        "instrument_id": r.instrument_id(),
        "seq": r.seq(),
        "ts_event_ns": r.ts_event_ns(),
        "ts_recv_ns": r.ts_recv_ns(),
        "send_ts_ns": send_ts_ns,
        "flags": flags,
    });
    for (bit, name) in [(FLAG_SNAPSHOT, "snapshot"), (FLAG_REPLAY, "replay"), (FLAG_CONFLATED, "conflated")] {
        if flags & bit != 0 {
            v[name] = json!(true);
        }
    }
    match r.body() {
        Body::Trade(t) => {
            v["price"] = json!(t.price as f64 / 1e9);
            v["size"] = json!(t.size as f64 / 1e9);
            v["side"] = json!(t.side);
        }
        Body::Quote(q) => {
            v["bid_px"] = json!(q.bid_px as f64 / 1e9);
            v["bid_sz"] = json!(q.bid_sz as f64 / 1e9);
            v["ask_px"] = json!(q.ask_px as f64 / 1e9);
            v["ask_sz"] = json!(q.ask_sz as f64 / 1e9);
        }
    }
    v
}

/// Where `subscribe` gets fresh tokens: for the in-band `refresh` when the server says
/// `token_expiring`, and for a reconnect after the token expired.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// The client credentials grant against an issuer.
    ClientCredentials {
        /// Issuer base URL.
        issuer: String,
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: String,
        /// Space-separated scopes (the client's own when `None`).
        scope: Option<String>,
        /// CA certificate for an https:// issuer.
        ca_file: Option<PathBuf>,
    },
    /// A shell command (`sh -c`) whose standard output is the token.
    Command(String),
}

impl TokenSource {
    /// A fresh token.
    pub async fn fetch(&self) -> Result<String, ClientError> {
        match self {
            TokenSource::ClientCredentials { issuer, client_id, client_secret, scope, ca_file } => {
                super::fetch_token_with_ca(issuer, client_id, client_secret, scope.as_deref(), ca_file.as_deref()).await
            }
            TokenSource::Command(cmd) => {
                let out = tokio::process::Command::new("sh").arg("-c").arg(cmd).output().await?;
                if !out.status.success() {
                    return Err(ClientError::Control(format!(
                        "--token-command exited with {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if token.is_empty() {
                    return Err(ClientError::Control("--token-command printed no token".into()));
                }
                Ok(token)
            }
        }
    }
}

/// Reconnect pacing of `subscribe` ([`super::backoff_ms`]): the first window 100 ms, doubling
/// per failed attempt up to 10 s.
const RECONNECT_JITTER_MS: u64 = 100;
/// See [`RECONNECT_JITTER_MS`].
const RECONNECT_MAX_MS: u64 = 10_000;

/// The delay before reconnect attempt `attempt`, and the attempt counted.
fn next_delay(attempt: &mut u32, hint_ms: Option<u64>) -> Duration {
    let ms = super::backoff_ms(*attempt, hint_ms, RECONNECT_JITTER_MS, RECONNECT_MAX_MS, rand::random_range(0.0..1.0));
    *attempt = attempt.saturating_add(1);
    Duration::from_millis(ms)
}

/// Whether a close is worth a reconnect (with `--reconnect`): the server going away, the
/// connection dropping, this client falling behind, or (with a token source) the token
/// expiring. Not a revocation, nor a close for something this client sent.
fn reconnectable(code: u16, have_source: bool) -> bool {
    matches!(code, 1001 | 1006 | 1011 | 4008) || (code == 4001 && have_source)
}

/// Runs `tickgate subscribe`, writing JSON lines to `out`.
///
/// With a token source it answers `token_expiring` with an in-band `refresh` (id 2), and
/// with `reconnect` it connects again after a reconnectable close and resumes from the last
/// seq printed per symbol, so the output has no gap and no duplicate across connections.
/// Reconnect notes go to standard error.
pub async fn subscribe<W: Write>(opts: &SubscribeOptions, mut out: W) -> Result<SubscribeSummary, ClientError> {
    let feed = &opts.stream.feed;
    let mut state = match &opts.resume_file {
        Some(p) => ResumeState::load(p)?.filter(|s| &s.feed == feed),
        None => None,
    }
    .unwrap_or(ResumeState { feed: feed.clone(), ..ResumeState::default() });
    // Last seq printed per symbol of the feed (what a resume asks from), starting from
    // where the file left off.
    let mut printed: BTreeMap<String, u64> = state.seqs.clone();
    let mut token = opts.stream.token.clone();
    if token.is_empty() {
        if let Some(src) = &opts.token_source {
            token = src.fetch().await?;
        }
    }
    let mut summary = SubscribeSummary::default();
    // Reconnect attempts since the last connection that streamed.
    let mut attempt = 0u32;
    let mut connected_once = false;
    loop {
        let mut target = opts.stream.clone();
        target.token = token.clone();
        let mut sub = match target.connect().await {
            Ok(s) => s,
            Err(e) => {
                let retry = opts.reconnect && connected_once;
                match &e {
                    // The token went stale while away: a fresh one, then again.
                    ClientError::HandshakeRefused { status: 401, .. } if retry && opts.token_source.is_some() => {
                        if let Some(src) = &opts.token_source {
                            token = src.fetch().await?;
                        }
                    }
                    ClientError::HandshakeRefused { status: 503 | 429, .. }
                    | ClientError::Io(_)
                    | ClientError::Ws(_)
                        if retry => {}
                    _ => return Err(e),
                }
                let d = next_delay(&mut attempt, None);
                eprintln!("reconnecting in {} ms: {e}", d.as_millis());
                tokio::time::sleep(d).await;
                continue;
            }
        };
        if connected_once {
            summary.reconnects += 1;
        }
        connected_once = true;
        let resume = (!printed.is_empty()).then(|| (state.epoch, printed.clone()));
        opts.stream.subscribe(&mut sub, opts.snapshot && summary.reconnects == 0, resume).await?;
        let mut hint_ms = None;
        let mut streaming = false;
        loop {
            let event = sub.next_event().await?;
            match &event {
                Event::Control(m) => {
                    writeln!(out, "{}", serde_json::to_string(m).map_err(|e| ClientError::Control(e.to_string()))?)?;
                    match m {
                        // The answer to our one `subscribe` (id 1) is an error: nothing will come.
                        ServerMsg::Error { id: Some(1), code, message } => {
                            summary.end =
                                SubscribeEnd::Refused { code: code.as_str().to_owned(), message: message.clone() };
                        }
                        ServerMsg::Error { id: Some(2), message, .. } => {
                            eprintln!("refresh refused: {message}; the current token stays in force");
                        }
                        ServerMsg::Subscribed { .. } => streaming = true,
                        ServerMsg::TokenExpiring { .. } => {
                            if let Some(src) = &opts.token_source {
                                match src.fetch().await {
                                    Ok(t) => {
                                        token = t;
                                        let msg = tickgate_proto::control::ClientMsg::Refresh {
                                            id: Some(2),
                                            token: tickgate_proto::control::SecretString(token.clone()),
                                        };
                                        sub.send(&msg).await?;
                                    }
                                    Err(e) => eprintln!("no fresh token for the refresh: {e}"),
                                }
                            }
                        }
                        ServerMsg::Refreshed { id: Some(2), .. } => summary.refreshes += 1,
                        ServerMsg::Shutdown { reconnect_after_ms } => hint_ms = Some(*reconnect_after_ms),
                        _ => {}
                    }
                }
                Event::Batch { send_ts_ns, records, anomalies } => {
                    // `--limit` is exact: a batch is cut where the limit falls.
                    let room = opts.limit.map_or(usize::MAX, |l| l.saturating_sub(summary.records) as usize);
                    for r in records.iter().take(room) {
                        let f = r.feed_id();
                        let (feed_name, symbol) = (sub.tracker.feed_name(f), sub.tracker.symbol(f, r.instrument_id()));
                        let v = record_json(r, feed_name, symbol, *send_ts_ns);
                        writeln!(out, "{v}")?;
                        summary.records += 1;
                        // The resume state follows what was printed, not what was received:
                        // a batch cut by `--limit` resumes at its first record not printed.
                        if let (Some(fname), Some(sym)) = (feed_name, symbol) {
                            if fname == feed {
                                let last = printed.entry(sym.to_owned()).or_insert(0);
                                *last = (*last).max(r.seq());
                            }
                        }
                    }
                    for a in anomalies {
                        summary.violations += 1;
                        writeln!(out, "{}", json!({"type": "delivery_violation", "detail": format!("{a:?}")}))?;
                    }
                }
                Event::Closed { code, reason } => {
                    writeln!(out, "{}", json!({"type": "closed", "code": code, "reason": reason}))?;
                    summary.close_code = Some(*code);
                    summary.end = SubscribeEnd::Closed { code: *code, reason: reason.clone() };
                }
            }
            out.flush()?;
            // A new epoch (`reset`, or a `welcome` after a restart): the old numbering is
            // void, and what was printed of it is no resume point.
            let epoch = sub.tracker.epoch(feed);
            if epoch.is_some() && epoch != state.epoch {
                if state.epoch.is_some() {
                    printed.clear();
                }
                state.epoch = epoch;
            }
            // Saved after the output: a client killed in between prints a record again
            // after it resumes, never loses one.
            if let Some(p) = &opts.resume_file {
                state.seqs = printed.clone();
                state.save(p)?;
            }
            if let SubscribeEnd::Closed { code, .. } = summary.end {
                if opts.reconnect && reconnectable(code, opts.token_source.is_some()) {
                    if code == 4001 {
                        if let Some(src) = &opts.token_source {
                            token = src.fetch().await?;
                        }
                    }
                    if streaming {
                        attempt = 0;
                    }
                    let d = next_delay(&mut attempt, hint_ms);
                    eprintln!("closed {code}; reconnecting in {} ms with resume", d.as_millis());
                    summary.end = SubscribeEnd::Limit;
                    summary.close_code = None;
                    tokio::time::sleep(d).await;
                    break;
                }
                return Ok(summary);
            }
            if matches!(summary.end, SubscribeEnd::Refused { .. }) {
                sub.close().await;
                return Ok(summary);
            }
            if opts.limit.is_some_and(|l| summary.records >= l) {
                sub.close().await;
                return Ok(summary);
            }
        }
    }
}

/// `tickgate record` settings.
#[derive(Debug, Clone, Default)]
pub struct RecordOptions {
    /// What to capture.
    pub stream: StreamTarget,
    /// Output file.
    pub out: PathBuf,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Stop after this many records.
    pub limit: Option<u64>,
}

/// What `record` wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecordSummary {
    /// The file.
    pub file: String,
    /// Records written.
    pub records: u64,
    /// Instruments in the symbol table.
    pub instruments: usize,
    /// `gap` messages seen while capturing (the capture is then not the whole stream).
    pub gaps_seen: u64,
    /// `reset` messages seen while capturing.
    pub resets_seen: u64,
    /// Seconds captured.
    pub seconds: f64,
}

/// Runs `tickgate record`: subscribes (live, no snapshot) and writes every record to a
/// recording whose symbol table is the subscribed instruments, renumbered 1..k, and whose
/// seqs run 1, 2, 3, ... per instrument from the first record captured.
pub async fn record(opts: &RecordOptions) -> Result<RecordSummary, ClientError> {
    let feed = &opts.stream.feed;
    let mut sub = opts.stream.connect().await?;
    opts.stream.subscribe(&mut sub, false, None).await?;
    // Wait for the reply: it gives the symbol table.
    let table = loop {
        match sub.next_event().await? {
            Event::Control(ServerMsg::Subscribed { instruments, .. }) => break instruments,
            Event::Control(ServerMsg::Error { message, .. }) => return Err(ClientError::Control(message)),
            Event::Closed { code, reason } => return Err(ClientError::Control(format!("closed {code}: {reason}"))),
            _ => {}
        }
    };
    let new_id: HashMap<u32, u32> = table.iter().enumerate().map(|(k, i)| (i.id, k as u32 + 1)).collect();
    let meta = Meta {
        feed: feed.clone(),
        feed_id: sub.tracker.feed_id_of(feed).unwrap_or(0),
        symbols: table.iter().map(|i| i.symbol.clone()).collect(),
        recorded_at_ns: now_ns(),
    };
    let file = std::io::BufWriter::new(std::fs::File::create(&opts.out)?);
    let mut writer = Writer::new(file, &meta).map_err(|e| ClientError::Control(e.to_string()))?;
    let mut seqs: HashMap<u32, u64> = HashMap::new();
    let mut summary =
        RecordSummary { file: opts.out.display().to_string(), instruments: table.len(), ..Default::default() };
    let started = Instant::now();
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    loop {
        let event = match deadline {
            Some(d) => match tokio::time::timeout_at(d, sub.next_event()).await {
                Ok(e) => e?,
                Err(_) => break,
            },
            None => sub.next_event().await?,
        };
        match event {
            Event::Control(ServerMsg::Gap { .. }) => summary.gaps_seen += 1,
            Event::Control(ServerMsg::Reset { .. }) => summary.resets_seen += 1,
            Event::Control(_) => {}
            Event::Closed { .. } => break,
            Event::Batch { records, .. } => {
                for r in records.iter().filter(|r| r.flags() & FLAG_SNAPSHOT == 0) {
                    let Some(&id) = new_id.get(&r.instrument_id()) else { continue };
                    let seq = seqs.entry(id).or_insert(0);
                    *seq += 1;
                    let out = Record::encode(r.feed_id(), id, *seq, r.ts_event_ns(), r.ts_recv_ns(), &r.body(), 0);
                    writer.write(&out).map_err(|e| ClientError::Control(e.to_string()))?;
                    summary.records += 1;
                    if opts.limit.is_some_and(|l| summary.records >= l) {
                        break;
                    }
                }
                if opts.limit.is_some_and(|l| summary.records >= l) {
                    break;
                }
            }
        }
    }
    sub.close().await;
    let mut file = writer.finish().map_err(|e| ClientError::Control(e.to_string()))?;
    file.flush()?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
