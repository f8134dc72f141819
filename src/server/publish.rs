//! `GET /v1/publish?feed=NAME[&epoch=N]`: upstream publishers (feed handlers) push
//! records into a `source = "publish"` feed.
//!
//! The handshake is the stream's (subprotocol `tickgate.v1`, a bearer token in the
//! `Authorization` header or the bearer subprotocol, or a ticket) but the token needs
//! `md:publish:<FEED>`. One publisher per feed at a time: seqs have one writer, so "seq
//! going backwards" means what it says.
//!
//! This module holds the endpoint and the publisher's half of the connection: the
//! handshake (feed, epoch, scope, the feed's one publisher slot, the session's
//! registration), and the publisher's `Role` in the shared connection loop
//! (`ws::drive`, which runs the heartbeat, the close handshake and the frame limits):
//! binary batches to the publish source, `ping` answered by `pong`, strikes, the `error`
//! replies. Its session (deadline, revocation, shutdown) is an edge session
//! (`super::session`): [`EdgeSessions`](super::session::EdgeSessions) is the registry
//! `/admin/revoke` reaches it through, and the session's `EdgeWatch` ends it with 4001 at `exp` + grace, 4003 on
//! revocation, 1001 at shutdown, as the engine ends streams. What a batch becomes is the publish source's
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
//! [`EdgeSessions`](super::session::EdgeSessions) (the edge's session registry): `/admin/revoke` closes a matching
//! publisher with 4003 like a stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use super::authorize::{authorize, check_connect_rate, Credential, HandshakeResult, Refusal};
use super::handshake::{check_request, switching_protocols, PeerAddr};
use super::heartbeat::Heartbeat;
use super::session::ws::{self, CloseStyle, Ended, Role, Step, Ws};
use super::session::{EdgeWatch, Registration, Session, SessionEnd};
use super::AppState;
use super::LogPeer;
use crate::feeds::Feed;
use crate::feeds::SourceKind;
use crate::sources::nats::forward::{Forward, ForwardError};
use crate::sources::publish::{PublishReject, PublishSource, Taken};
use tickgate_proto::close::Reason;
use tickgate_proto::control::{ErrorCode, ServerMsg};
use tickgate_proto::now_ns;

fn refusal(status: StatusCode, error: &'static str, description: String, result: HandshakeResult) -> Refusal {
    Refusal { status, error, description, result, auth_reason: None }
}

/// Releases the feed's publisher slot, the session's registration and the gauge however
/// the connection ends.
struct PublisherSlot {
    app: Arc<AppState>,
    feed_idx: usize,
    registration: Registration,
}

impl Drop for PublisherSlot {
    fn drop(&mut self) {
        if let Some(f) = self.app.ingest.catalog().get(self.feed_idx) {
            f.release_publisher();
        }
        // The registration leaves `EdgeSessions` when the slot's fields drop, right after.
        self.app.metrics.publishers.dec();
    }
}

/// The token part of a publisher handshake, after the request head was read: validation
/// (which may wait for a JWKS refetch), the publish scope, and the feed's publisher slot.
async fn admit(
    app: &Arc<AppState>,
    key: String,
    cred: Credential,
    feed_idx: usize,
    epoch: Option<u64>,
) -> Result<(String, usize, Option<u64>, Session, PublisherSlot), Refusal> {
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
            HandshakeResult::InsufficientScope,
        ));
    }
    if !feed.claim_publisher() {
        return Err(refusal(
            StatusCode::CONFLICT,
            "publisher_active",
            format!("feed {} already has a publisher", feed.name()),
            HandshakeResult::Conflict,
        ));
    }
    app.metrics.publishers.inc();
    let registration = app.publishers.register(&principal);
    let slot = PublisherSlot { app: app.clone(), feed_idx: feed.idx, registration };
    Ok((key, feed.idx, epoch, Session::new(&app.validator, principal), slot))
}

/// The `GET /v1/publish` handler.
pub(crate) async fn handshake(State(app): State<Arc<AppState>>, mut req: Request) -> Response {
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
            return Err(refusal(
                StatusCode::NOT_FOUND,
                "unknown_feed",
                format!("no feed `{shown}`"),
                HandshakeResult::UnknownFeed,
            ));
        };
        if feed.def.source == SourceKind::Nats && app.nats.jetstream().is_none() {
            return Err(Refusal::unavailable("not connected to NATS yet"));
        }
        if !matches!(feed.def.source, SourceKind::Publish | SourceKind::Nats) {
            return Err(refusal(
                StatusCode::CONFLICT,
                "not_publishable",
                format!(
                    "feed {} has its own source; only source = \"publish\" or \"nats\" feeds take publishers",
                    feed.name()
                ),
                HandshakeResult::Conflict,
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
            app.metrics.publish_handshakes.with_label_values(&[r.result.as_str()]).inc();
            if let Some(reason) = r.auth_reason {
                reason.count(&app.metrics);
            }
            tracing::debug!(peer = %LogPeer(peer), status = r.status.as_u16(), result = r.result.as_str(), "publish handshake refused");
            r.into_response()
        }
        Ok((key, feed_idx, epoch, session, slot)) => {
            app.metrics.publish_handshakes.with_label_values(&[HandshakeResult::Ok.as_str()]).inc();
            let on_upgrade = hyper::upgrade::on(&mut req);
            let task = run(app.clone(), on_upgrade, feed_idx, epoch, session, slot);
            // Tracked with the sources: shutdown stops publishers before it drains the
            // shards, so every record taken in reaches subscribers before `shutdown`.
            tokio::task::spawn_local(app.sources.track_future(task));
            switching_protocols(&key)
        }
    }
}

/// A publisher's close handshake: the close frame may take 2 s; the peer's reply is not
/// waited for.
const PUBLISHER_CLOSE: CloseStyle = CloseStyle { timeout: Duration::from_secs(2), linger: Duration::ZERO };

async fn run(
    app: Arc<AppState>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    feed_idx: usize,
    epoch: Option<u64>,
    session: Session,
    slot: PublisherSlot,
) {
    let mut cfg = WebSocketConfig::default();
    cfg.max_message_size = Some(app.config.limits.max_publish_bytes);
    cfg.max_frame_size = Some(app.config.limits.max_publish_bytes);
    let Some(mut ws) = ws::accept(on_upgrade, cfg).await else { return };
    let cancel = app.sources_cancel.clone();
    let catalog = app.ingest.catalog().clone();
    let Some(feed) = catalog.get(feed_idx) else { return };
    tracing::info!(feed = feed.name(), session = %session.id, sub = %session.principal.sub, "publisher connected");
    // A `nats` feed: batches go to JetStream (its epoch is the stream's, set by what comes
    // back through the consumer), not into the log here.
    let forward = match (feed.def.source, app.nats.jetstream()) {
        (SourceKind::Nats, Some(js)) => Some(Forward::new(js, &app.config.nats.subject_prefix, feed, epoch)),
        (SourceKind::Nats, None) => return,
        _ => None,
    };
    if let Some(f) = &forward {
        tracing::info!(feed = feed.name(), epoch = f.epoch(), "publisher forwards to NATS JetStream");
    }
    if let Some(e) = epoch.filter(|&e| forward.is_none() && e != feed.epoch()) {
        // The upstream restarted its numbering: subscribers get `reset`.
        if !app.ingest.reset(feed_idx as u16, e, &cancel).await {
            return;
        }
        tracing::info!(feed = feed.name(), epoch = e, "publisher started a new epoch");
    }
    let mut heartbeat = Heartbeat::new(Duration::from_millis(app.config.server.heartbeat_ms));
    // The token's lifetime bounds the connection, as for subscribers: the session's
    // deadline (exp + grace, to the millisecond), revocation and shutdown, in one watch.
    let watch = EdgeWatch::new(&session, &slot.registration, cancel.clone());
    let mut publisher =
        Publisher { app: &app, feed, watch, cancel, strikes: 0, source: PublishSource::new(feed_idx as u16), forward };
    let Ended { code, reason } = ws::drive(&mut ws, &mut publisher, &mut heartbeat, &app.metrics).await;
    tracing::info!(feed = feed.name(), session = %session.id, code, reason, "publisher disconnected");
    drop(slot);
}

/// The publisher's half of the connection loop.
struct Publisher<'a> {
    app: &'a AppState,
    feed: &'a Feed,
    /// What ends the session: shutdown, revocation, the deadline.
    watch: EdgeWatch,
    /// Stops a batch that waits for queue space at shutdown.
    cancel: tokio_util::sync::CancellationToken,
    strikes: u32,
    source: PublishSource,
    /// For a `nats` feed: where its batches go instead of `source`.
    forward: Option<Forward>,
}

impl Publisher<'_> {
    /// A refused batch: counted, a strike, and the `error` that says why.
    fn refused(&mut self, r: &crate::sources::publish::Reject) -> ServerMsg {
        self.app.metrics.publish_rejects.with_label_values(&[r.reason.as_str()]).inc();
        self.strikes += 1;
        ServerMsg::Error {
            id: None,
            code: ErrorCode::BadRecord,
            message: format!("{}: batch refused, nothing of it was taken in: {}", r.reason, r.message),
        }
    }

    /// Sends a reply, then applies the strike limit.
    async fn reply(&mut self, ws: &mut Ws, reply: Option<ServerMsg>) -> Step {
        if let Some(m) = reply {
            if ws.send(Message::text(m.to_json())).await.is_err() {
                return Step::End(Ended { code: 1006, reason: "socket error" });
            }
        }
        if self.strikes > self.app.config.limits.max_strikes {
            return Step::Close(Reason::TooManyRefusedBatches);
        }
        Step::Continue
    }
}

impl Role for Publisher<'_> {
    type Event = SessionEnd;
    const CLOSE: CloseStyle = PUBLISHER_CLOSE;

    async fn event(&mut self) -> SessionEnd {
        self.watch.ended().await
    }

    async fn on_event(&mut self, _ws: &mut Ws, end: SessionEnd) -> Step {
        Step::Close(end.close())
    }

    async fn on_message(&mut self, ws: &mut Ws, msg: Message) -> Step {
        let app = self.app;
        let reply = match msg {
            Message::Binary(b) if self.forward.is_some() => {
                let Some(fwd) = self.forward.as_mut() else { return Step::Continue };
                match fwd.forward(self.feed, &b).await {
                    Ok(()) => None,
                    Err(ForwardError::Unavailable(e)) => {
                        tracing::warn!(feed = self.feed.name(), error = %e, "publisher closed: JetStream did not acknowledge");
                        return Step::Close(Reason::NatsUnavailable);
                    }
                    Err(ForwardError::Refused(r)) => Some(self.refused(&r)),
                }
            }
            Message::Binary(b) => match self.source.take(self.feed, &b, &app.ingest, &self.cancel).await {
                Ok(Taken::Queued) => None,
                Ok(Taken::Cancelled) => {
                    return Step::Close(SessionEnd::Shutdown.close());
                }
                Err(r) => Some(self.refused(&r)),
            },
            Message::Text(t) => match serde_json::from_str::<serde_json::Value>(t.as_str()) {
                Ok(v) if v.get("op").and_then(|o| o.as_str()) == Some("ping") => {
                    // A `nats` feed's pong means JetStream acknowledged every earlier batch.
                    if let Some(fwd) = self.forward.as_mut() {
                        if let Err(e) = fwd.settle().await {
                            tracing::warn!(feed = self.feed.name(), error = ?e, "publisher closed: JetStream did not acknowledge");
                            return Step::Close(Reason::NatsUnavailable);
                        }
                    }
                    Some(ServerMsg::Pong { id: v.get("id").and_then(|i| i.as_i64()), ts: now_ns() })
                }
                _ => {
                    app.metrics.publish_rejects.with_label_values(&[PublishReject::BadText.as_str()]).inc();
                    self.strikes += 1;
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
            _ => None,
        };
        self.reply(ws, reply).await
    }

    fn on_heartbeat_timeout(&mut self) -> Step {
        Step::Close(Reason::HeartbeatTimeout)
    }

    fn closed_by_peer(&self, _code: u16) -> Ended {
        Ended { code: 1000, reason: "closed by publisher" }
    }

    fn gone(&self) -> Ended {
        Ended { code: 1006, reason: "socket error" }
    }

    /// A publisher's read errors end it without a close frame (as before the shared loop;
    /// the spec's §11 answers are the stream's).
    fn socket_error(&self, e: WsError) -> Step {
        tracing::debug!(error = %e, "publisher socket error");
        Step::End(Ended { code: 1006, reason: "socket error" })
    }
}
