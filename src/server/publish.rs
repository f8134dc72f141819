//! `GET /v1/publish?feed=NAME[&epoch=N]`: upstream publishers (feed handlers) push
//! records into a `source = "publish"` feed.
//!
//! The handshake is the stream's (subprotocol `tickgate.v1`, a bearer token in the
//! `Authorization` header or the bearer subprotocol, or a ticket) but the token needs
//! `md:publish:<FEED>`. One publisher per feed at a time: seqs have one writer, so "seq
//! going backwards" means what it says.
//!
//! This module holds the endpoint and the connection: the handshake (feed, epoch,
//! scope, the feed's one publisher slot), the connection task (heartbeat, token expiry,
//! revocation, strikes, the `error` replies) and [`Publishers`], the live publishers
//! as `/admin/revoke` sees them. What a batch becomes is the publish source's
//! (`sources::publish`): one batch in the spec §5 layout per binary message, checked
//! whole by the codec's strict decoder and the feed's rules before any of it is taken
//! in; a refusal is an `error` with code `bad_record` naming the record and the rule,
//! counted in `tickgate_publish_rejects_total{reason}`. A jump forward in seq is a
//! source gap, named to subscribers by a `gap` (reason `source_gap`). `ts_recv_ns` is
//! stamped by the server.
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
use crate::feeds::SourceKind;
use crate::sources::publish::{PublishReject, PublishSource, Taken};
use tickgate_proto::close;
use tickgate_proto::control::{ErrorCode, ServerMsg};
use tickgate_proto::now_ns;

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
    let mut source = PublishSource::new(feed_idx as u16);
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
            Some(Ok(Message::Binary(b))) => match source.take(feed, &b, &app.ingest, &cancel).await {
                Ok(Taken::Queued) => None,
                Ok(Taken::Cancelled) => break (close::GOING_AWAY, "server shutting down"),
                Err(r) => {
                    app.metrics.publish_rejects.with_label_values(&[r.reason.as_str()]).inc();
                    strikes += 1;
                    Some(ServerMsg::Error {
                        id: None,
                        code: ErrorCode::BadRecord,
                        message: format!("{}: batch refused, nothing of it was taken in: {}", r.reason, r.message),
                    })
                }
            },
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<serde_json::Value>(t.as_str()) {
                Ok(v) if v.get("op").and_then(|o| o.as_str()) == Some("ping") => {
                    Some(ServerMsg::Pong { id: v.get("id").and_then(|i| i.as_i64()), ts: now_ns() })
                }
                _ => {
                    app.metrics.publish_rejects.with_label_values(&[PublishReject::BadText.as_str()]).inc();
                    strikes += 1;
                    // One answer for one rule: code `bad_request` (it is not a batch), the
                    // message led by the metric's reason, as batch refusals are.
                    Some(ServerMsg::Error {
                        id: None,
                        code: ErrorCode::BadRequest,
                        message: format!(
                            "{}: publishers send binary batches and {{\"op\":\"ping\"}} only",
                            PublishReject::BadText
                        ),
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
