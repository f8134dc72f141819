//! `GET /v1/publish?feed=NAME[&epoch=N]`: upstream publishers (feed handlers) push
//! records into a `source = "publish"` feed.
//!
//! The handshake is the stream's (subprotocol `tickgate.v1`, a bearer token in the
//! `Authorization` header or the bearer subprotocol, or a ticket) but the token needs
//! `md:publish:<FEED>`. One publisher per feed at a time: seqs have one writer, so "seq
//! going backwards" means what it says.
//!
//! Each binary message is one batch in the spec §5 layout. A batch is checked whole
//! before any of it is taken in: a bad record refuses the batch (an `error` with code
//! `bad_record` naming the record and the rule, counted in
//! `tickgate_publish_rejects_total{reason}`), and nothing of it reaches subscribers, so a
//! publisher can fix and resend it. A record's `seq` is kept as the publisher set it
//! (nodes fed by the same upstream then agree), or assigned as last + 1 when it is 0.
//! A jump forward is a source gap, named to subscribers by a `gap` (reason
//! `source_gap`). `ts_recv_ns` is stamped by the server.
//!
//! `{"op":"ping","id":N}` is answered `{"type":"pong","id":N,...}` once every earlier
//! batch is in the feed's log and queued for the shards: a publisher's acknowledgement.
//!
//! Publishers live outside the engine, so revocation reaches them through
//! [`Publishers`]: `/admin/revoke` closes a matching publisher with 4003 like a stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::handshake::{authorize, check_connect_rate, check_request, switching_protocols, PeerAddr, Refusal};
use super::heartbeat::{Beat, Heartbeat};
use super::AppState;
use crate::engine::Tick;
use crate::feeds::{Feed, SourceKind};
use tickgate_proto::close;
use tickgate_proto::codec::{
    Record, BATCH_HEADER_LEN, QUOTE_LEN, RECORD_HEADER_LEN, RTYPE_QUOTE, RTYPE_TRADE, TRADE_LEN, VERSION,
};
use tickgate_proto::control::{ErrorCode, ServerMsg};
use tickgate_proto::now_ns;

/// Reasons a batch is refused (the `reason` label of `tickgate_publish_rejects_total`).
pub const REJECT_REASONS: [&str; 9] = [
    "malformed_batch",
    "bad_version",
    "bad_length",
    "unknown_rtype",
    "wrong_feed",
    "unknown_instrument",
    "bad_flags",
    "seq_backwards",
    "bad_text",
];

/// A refused batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// One of [`REJECT_REASONS`].
    pub reason: &'static str,
    /// What exactly is wrong, for the publisher.
    pub message: String,
}

fn reject(reason: &'static str, message: String) -> Reject {
    Reject { reason, message }
}

/// Checks one batch against the feed and decodes its records (dense instrument index,
/// record). Seqs are not looked at here; see [`sequence`].
pub fn decode(msg: &[u8], feed_id: u16, instruments: usize, out: &mut Vec<(u32, Record)>) -> Result<(), Reject> {
    out.clear();
    if msg.len() < BATCH_HEADER_LEN {
        return Err(reject("malformed_batch", format!("batch of {} bytes is shorter than its header", msg.len())));
    }
    if msg[0] != VERSION {
        return Err(reject("bad_version", format!("batch version {} (expected {VERSION})", msg[0])));
    }
    if msg[1] != 0 || msg[4..8] != [0; 4] {
        return Err(reject("malformed_batch", "batch flags and reserved bytes must be 0".into()));
    }
    let count = u16::from_le_bytes([msg[2], msg[3]]) as usize;
    if count == 0 {
        return Err(reject("malformed_batch", "batch has no record".into()));
    }
    let mut at = BATCH_HEADER_LEN;
    for k in 0..count {
        let rest = &msg[at..];
        if rest.len() < RECORD_HEADER_LEN {
            return Err(reject(
                "malformed_batch",
                format!("record {k} at byte {at}: {} bytes left, a record header is {RECORD_HEADER_LEN}", rest.len()),
            ));
        }
        let (len, rtype) = (rest[0] as usize, rest[1]);
        let want = match rtype {
            RTYPE_TRADE => TRADE_LEN,
            RTYPE_QUOTE => QUOTE_LEN,
            other => {
                return Err(reject(
                    "unknown_rtype",
                    format!("record {k} at byte {at}: rtype {other} (publishers send 1 trade or 2 quote)"),
                ))
            }
        };
        if len != want {
            return Err(reject(
                "bad_length",
                format!("record {k} at byte {at}: len {len} does not match rtype {rtype} (which is {want} bytes)"),
            ));
        }
        if rest.len() < len {
            return Err(reject(
                "malformed_batch",
                format!("record {k} at byte {at}: {len} bytes announced, {} left", rest.len()),
            ));
        }
        let rec = Record::from_wire(&rest[..len])
            .map_err(|e| reject("malformed_batch", format!("record {k} at byte {at}: {e}")))?;
        if rec.feed_id() != feed_id {
            return Err(reject(
                "wrong_feed",
                format!(
                    "record {k} at byte {at}: feed_id {} but this connection publishes feed {feed_id}",
                    rec.feed_id()
                ),
            ));
        }
        let id = rec.instrument_id() as usize;
        if id == 0 || id > instruments {
            return Err(reject(
                "unknown_instrument",
                format!("record {k} at byte {at}: instrument_id {id} (the feed has ids 1..={instruments})"),
            ));
        }
        // Flags are the server's (SNAPSHOT/REPLAY/CONFLATED) and the tail is padding.
        let tail_from = if rtype == RTYPE_TRADE { 49 } else { 64 };
        if rest[tail_from..len].iter().any(|&b| b != 0) {
            return Err(reject(
                "bad_flags",
                format!("record {k} at byte {at}: record flags and padding must be 0 (flags are set by the server)"),
            ));
        }
        out.push(((id - 1) as u32, rec));
        at += len;
    }
    if at != msg.len() {
        return Err(reject(
            "malformed_batch",
            format!("{} bytes after the {count} records the header announces", msg.len() - at),
        ));
    }
    Ok(())
}

/// Gives every record its final seq (0 → last + 1) and its ingest time, checking seqs
/// only go up, then appends the batch to the feed's log: all of it or, on the first
/// refused record, none of it.
pub fn sequence(feed: &Feed, recs: &mut [(u32, Record)], recv_ns: i64) -> Result<(), Reject> {
    let mut log = feed.log_mut();
    let mut last: HashMap<u32, u64> = HashMap::new();
    for (k, (instr, rec)) in recs.iter_mut().enumerate() {
        let prev = *last.entry(*instr).or_insert_with(|| log.last_seq(*instr));
        let seq = match rec.seq() {
            0 if prev == u64::MAX => {
                return Err(reject(
                    "seq_backwards",
                    format!("record {k}: the seq space of {} is used up", feed.symbol(*instr)),
                ))
            }
            0 => prev + 1,
            s if s > prev => s,
            s => {
                return Err(reject(
                    "seq_backwards",
                    format!(
                        "record {k}: seq {s} of {} is not above the last accepted {prev} (epoch {})",
                        feed.symbol(*instr),
                        log.epoch()
                    ),
                ))
            }
        };
        last.insert(*instr, seq);
        *rec = rec.with_seq(seq).with_recv_ts(recv_ns);
    }
    for (instr, rec) in recs.iter() {
        log.append(*instr, *rec);
    }
    Ok(())
}

fn refusal(status: StatusCode, error: &'static str, description: String, result: &'static str) -> Refusal {
    Refusal { status, error, description, result, auth_reason: None }
}

/// A live publisher as revocation sees it.
#[derive(Debug)]
struct LivePublisher {
    sub: String,
    jti: Option<String>,
    /// Cancelled by a revocation: the connection closes with 4003.
    revoked: CancellationToken,
}

/// The live publisher connections, by registration id. Touched once per publisher
/// connect and close, and by `/admin/revoke`; never per batch.
#[derive(Debug, Default)]
pub struct Publishers {
    live: Mutex<HashMap<u64, LivePublisher>>,
    next_id: AtomicU64,
}

impl Publishers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LivePublisher>> {
        // Each update is one insert or remove: the map is consistent after a panic.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, sub: String, jti: Option<String>) -> (u64, CancellationToken) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let revoked = CancellationToken::new();
        self.lock().insert(id, LivePublisher { sub, jti, revoked: revoked.clone() });
        (id, revoked)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Closes (4003) every publisher of `sub` (when given) or whose token has `jti` (when
    /// given). Returns how many were told to close.
    pub fn revoke(&self, sub: Option<&str>, jti: Option<&str>) -> usize {
        let live = self.lock();
        let mut n = 0;
        for p in live.values().filter(|p| !p.revoked.is_cancelled()) {
            if sub.is_some_and(|s| p.sub == s) || jti.is_some_and(|j| p.jti.as_deref() == Some(j)) {
                p.revoked.cancel();
                n += 1;
            }
        }
        n
    }
}

/// Releases the feed's publisher slot, the registration and the gauge however the
/// connection ends.
struct PublisherSlot {
    app: Arc<AppState>,
    feed_idx: usize,
    registration: u64,
}

impl Drop for PublisherSlot {
    fn drop(&mut self) {
        if let Some(f) = self.app.ingest.catalog().get(self.feed_idx) {
            f.release_publisher();
        }
        self.app.publishers.remove(self.registration);
        self.app.metrics.publishers.dec();
    }
}

/// The token part of a publisher handshake, after the request head was read: validation
/// (which may wait for a JWKS refetch), the publish scope, and the feed's publisher slot.
async fn admit(
    app: &Arc<AppState>,
    key: String,
    cred: super::handshake::Credential,
    feed_idx: usize,
    epoch: Option<u64>,
) -> Result<(String, usize, Option<u64>, u64, PublisherSlot, CancellationToken), Refusal> {
    let principal = authorize(app, cred, false)
        .await?
        .ok_or_else(|| Refusal::invalid_token(&crate::auth::validate::AuthError::Missing))?;
    let catalog = app.ingest.catalog().clone();
    let Some(feed) = catalog.get(feed_idx) else {
        return Err(Refusal::unavailable("feed disappeared"));
    };
    if !app.config.auth.insecure_no_auth && !principal.entitlements.can_publish(feed.name()) {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!("token lacks md:publish:{}", feed.name()),
            "insufficient_scope",
        ));
    }
    if !feed.claim_publisher() {
        return Err(refusal(
            StatusCode::CONFLICT,
            "publisher_active",
            format!("feed {} already has a publisher", feed.name()),
            "conflict",
        ));
    }
    app.metrics.publishers.inc();
    let (registration, revoked) = app.publishers.register(principal.sub.clone(), principal.jti.clone());
    let slot = PublisherSlot { app: app.clone(), feed_idx: feed.idx, registration };
    Ok((key, feed.idx, epoch, principal.exp, slot, revoked))
}

/// The `GET /v1/publish` handler.
pub async fn handshake(State(app): State<Arc<AppState>>, mut req: Request) -> Response {
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
    // The request head is read before the token is validated: validation may wait for a
    // JWKS refetch (unknown `kid`), and the request (not `Sync`) must not be borrowed
    // across that wait.
    let head = (|| {
        if app.draining.load(Ordering::Acquire) {
            return Err(Refusal::unavailable("server is draining"));
        }
        if app.validator.keys().is_empty() && !app.config.auth.insecure_no_auth {
            return Err(Refusal::unavailable("signing keys not loaded yet"));
        }
        check_connect_rate(&app, peer.map(|p| p.ip()))?;
        let query = req.uri().query();
        let (key, cred) = check_request(&app, req.method(), req.version(), query, req.headers())?;
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|_| Refusal::bad_request("malformed query string"))?;
        let mut feeds = pairs.iter().filter(|(k, _)| k == "feed").map(|(_, v)| v.as_str());
        let (Some(name), None) = (feeds.next(), feeds.next()) else {
            return Err(Refusal::bad_request("exactly one `feed` query parameter is required"));
        };
        let epoch = match pairs.iter().find(|(k, _)| k == "epoch") {
            None => None,
            Some((_, v)) => match v.parse::<u64>() {
                Ok(e) if e > 0 => Some(e),
                _ => return Err(Refusal::bad_request("`epoch` must be a positive integer")),
            },
        };
        let catalog = app.ingest.catalog().clone();
        let Some(feed) = catalog.by_name(name) else {
            let shown: String = name.chars().take(32).collect();
            return Err(refusal(StatusCode::NOT_FOUND, "unknown_feed", format!("no feed `{shown}`"), "unknown_feed"));
        };
        if feed.def.source != SourceKind::Publish {
            return Err(refusal(
                StatusCode::CONFLICT,
                "not_publishable",
                format!("feed {} has its own source; only source = \"publish\" feeds take publishers", feed.name()),
                "conflict",
            ));
        }
        Ok((key, cred, feed.idx, epoch))
    })();
    let outcome = match head {
        Err(r) => Err(r),
        Ok((key, cred, feed_idx, epoch)) => admit(&app, key, cred, feed_idx, epoch).await,
    };

    match outcome {
        Err(r) => {
            app.metrics.publish_handshakes.with_label_values(&[r.result]).inc();
            if let Some(reason) = r.auth_reason {
                app.metrics.auth_failures.with_label_values(&[reason]).inc();
            }
            tracing::debug!(peer = ?peer, status = r.status.as_u16(), result = r.result, "publish handshake refused");
            r.into_response()
        }
        Ok((key, feed_idx, epoch, exp, slot, revoked)) => {
            app.metrics.publish_handshakes.with_label_values(&["ok"]).inc();
            let on_upgrade = hyper::upgrade::on(&mut req);
            let task = run(app.clone(), on_upgrade, feed_idx, epoch, exp, slot, revoked);
            // Tracked with the sources: shutdown stops publishers before it drains the
            // shards, so every record taken in reaches subscribers before `shutdown`.
            tokio::task::spawn_local(app.sources.track_future(task));
            switching_protocols(&key)
        }
    }
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

async fn run(
    app: Arc<AppState>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    feed_idx: usize,
    epoch: Option<u64>,
    exp: u64,
    _slot: PublisherSlot,
    revoked: CancellationToken,
) {
    let Ok(upgraded) = on_upgrade.await else { return };
    let mut cfg = WebSocketConfig::default();
    cfg.max_message_size = Some(app.config.limits.max_publish_bytes);
    cfg.max_frame_size = Some(app.config.limits.max_publish_bytes);
    let mut ws: Ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(cfg)).await;
    let cancel = app.sources_cancel.clone();
    let catalog = app.ingest.catalog().clone();
    let Some(feed) = catalog.get(feed_idx) else { return };
    tracing::info!(feed = feed.name(), "publisher connected");
    if let Some(e) = epoch.filter(|&e| e != feed.epoch()) {
        // The upstream restarted its numbering: subscribers get `reset`.
        if !app.ingest.reset(feed_idx as u16, e, &cancel).await {
            return;
        }
        tracing::info!(feed = feed.name(), epoch = e, "publisher started a new epoch");
    }
    let mut heartbeat = Heartbeat::new(Duration::from_millis(app.config.server.heartbeat_ms));
    // The token's lifetime bounds the connection, as for subscribers.
    // To the millisecond, like a presented token: the deadline is exp + grace.
    let deadline_ms = app.validator.times().deadline_ms(exp);
    let expires_in =
        Duration::from_millis(deadline_ms.saturating_sub(now_ns() / 1_000_000).min(10 * 365 * 86_400 * 1000));
    let expiry = tokio::time::sleep(expires_in);
    tokio::pin!(expiry);
    let mut strikes = 0u32;
    let mut recs: Vec<(u32, Record)> = Vec::new();
    let mut ticks: Vec<Tick> = Vec::new();
    let (code, reason) = loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break (close::GOING_AWAY, "server shutting down"),
            _ = revoked.cancelled() => break (close::TOKEN_REVOKED, "token revoked"),
            _ = &mut expiry => break (close::TOKEN_EXPIRED, "token expired"),
            beat = heartbeat.tick() => {
                if beat == Beat::TimedOut {
                    app.metrics.heartbeat_timeouts.inc();
                    break (close::POLICY, "heartbeat timeout");
                }
                if ws.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break (1006, "socket error");
                }
                continue;
            }
            m = ws.next() => m,
        };
        let reply = match msg {
            None | Some(Err(_)) => break (1006, "socket error"),
            Some(Ok(Message::Binary(b))) => {
                let taken = decode(&b, feed.id(), feed.instrument_count(), &mut recs)
                    .and_then(|()| sequence(feed, &mut recs, now_ns() as i64));
                match taken {
                    Ok(()) => {
                        ticks.clear();
                        ticks.extend(recs.iter().map(|&(instr, record)| Tick {
                            feed_idx: feed_idx as u16,
                            instr,
                            record,
                        }));
                        if !app.ingest.enqueue(&ticks, &cancel).await {
                            break (close::GOING_AWAY, "server shutting down");
                        }
                        app.ingest.flush();
                        None
                    }
                    Err(r) => {
                        app.metrics.publish_rejects.with_label_values(&[r.reason]).inc();
                        strikes += 1;
                        Some(ServerMsg::Error {
                            id: None,
                            code: ErrorCode::BadRecord,
                            message: format!("{}: batch refused, nothing of it was taken in: {}", r.reason, r.message),
                        })
                    }
                }
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<serde_json::Value>(t.as_str()) {
                Ok(v) if v.get("op").and_then(|o| o.as_str()) == Some("ping") => {
                    Some(ServerMsg::Pong { id: v.get("id").and_then(|i| i.as_i64()), ts: now_ns() })
                }
                _ => {
                    app.metrics.publish_rejects.with_label_values(&["bad_text"]).inc();
                    strikes += 1;
                    // One answer for one rule: code `bad_request` (it is not a batch), the
                    // message led by the metric's reason, as batch refusals are.
                    Some(ServerMsg::Error {
                        id: None,
                        code: ErrorCode::BadRequest,
                        message: "bad_text: publishers send binary batches and {\"op\":\"ping\"} only".into(),
                    })
                }
            },
            Some(Ok(Message::Pong(_))) => {
                heartbeat.pong();
                None
            }
            Some(Ok(Message::Close(_))) => break (1000, "closed by publisher"),
            Some(Ok(_)) => None,
        };
        if let Some(m) = reply {
            if ws.send(Message::text(m.to_json())).await.is_err() {
                break (1006, "socket error");
            }
        }
        if strikes > app.config.limits.max_strikes {
            break (close::POLICY, "too many refused batches");
        }
    };
    if code != 1006 {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
    }
    tracing::info!(feed = feed.name(), code, reason, "publisher disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feeds::{Catalog, FeedDef};
    use tickgate_proto::codec::{encode_batch, Body, Quote, Trade};

    fn batch(recs: &[Record]) -> Vec<u8> {
        let mut b = Vec::new();
        encode_batch(recs, 0, &mut b);
        b
    }

    fn trade(feed: u16, instr: u32, seq: u64) -> Record {
        Record::encode(feed, instr, seq, 1, 0, &Body::Trade(Trade { price: 1, size: 1, side: 1 }), 0)
    }

    fn catalog() -> Catalog {
        let def = FeedDef::parse("p", "name = \"P\"\nid = 9\nsource = \"publish\"\nsymbols = [\"A\", \"B\"]\n")
            .expect("feed");
        Catalog::new(vec![def], 1).expect("catalog")
    }

    fn reason(msg: &[u8]) -> &'static str {
        decode(msg, 9, 2, &mut Vec::new()).expect_err("refused").reason
    }

    #[test]
    fn every_malformation_has_its_reason() {
        let good = batch(&[trade(9, 1, 0), trade(9, 2, 0)]);
        let mut out = Vec::new();
        decode(&good, 9, 2, &mut out).expect("good batch");
        assert_eq!(out.len(), 2);
        assert_eq!(reason(&good[..10]), "malformed_batch");
        assert_eq!(reason(&good[..good.len() - 1]), "malformed_batch");
        let mut extra = good.clone();
        extra.extend_from_slice(&[0; 8]);
        assert_eq!(reason(&extra), "malformed_batch");
        let mut v = good.clone();
        v[0] = 2;
        assert_eq!(reason(&v), "bad_version");
        let mut l = good.clone();
        l[16] = 40;
        assert_eq!(reason(&l), "bad_length");
        let mut t = good.clone();
        t[17] = 7;
        assert_eq!(reason(&t), "unknown_rtype");
        assert_eq!(reason(&batch(&[trade(8, 1, 0)])), "wrong_feed");
        assert_eq!(reason(&batch(&[trade(9, 3, 0)])), "unknown_instrument");
        assert_eq!(reason(&batch(&[trade(9, 0, 0)])), "unknown_instrument");
        assert_eq!(reason(&batch(&[trade(9, 1, 0).with_flags(1)])), "bad_flags");
        let q = Record::encode(9, 1, 0, 0, 0, &Body::Quote(Quote::default()), 0);
        decode(&batch(&[q]), 9, 2, &mut out).expect("quote");
    }

    #[test]
    fn seqs_are_assigned_or_kept_and_never_go_back() {
        let c = catalog();
        let feed = c.get(0).expect("feed");
        let mut recs = vec![(0, trade(9, 1, 0)), (0, trade(9, 1, 0)), (1, trade(9, 2, 10))];
        sequence(feed, &mut recs, 5).expect("first batch");
        assert_eq!(recs.iter().map(|(_, r)| r.seq()).collect::<Vec<_>>(), vec![1, 2, 10]);
        assert!(recs.iter().all(|(_, r)| r.ts_recv_ns() == 5));
        // A batch with one backwards seq is refused whole: nothing of it is appended.
        let mut bad = vec![(0, trade(9, 1, 0)), (1, trade(9, 2, 10))];
        let e = sequence(feed, &mut bad, 6).expect_err("backwards");
        assert_eq!(e.reason, "seq_backwards");
        assert!(e.message.contains("record 1"), "{}", e.message);
        assert_eq!(feed.log().last_seq(0), 2, "the good record of the refused batch was not taken");
        let mut ok = vec![(0, trade(9, 1, 0)), (1, trade(9, 2, 0))];
        sequence(feed, &mut ok, 7).expect("continues");
        assert_eq!(ok.iter().map(|(_, r)| r.seq()).collect::<Vec<_>>(), vec![3, 11]);
    }
}
