//! One stream connection after the upgrade, running on its shard thread.
//!
//! The task reads control messages and moves the connection's outbound queue (filled by
//! the shard's dispatch loop) to the socket. It never waits on the socket without also
//! watching `kill`, so a stalled client cannot hold back a slow-consumer close or
//! shutdown, and it never holds the shard's `RefCell` across an `.await`.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::handshake::ConnSlot;
use super::heartbeat::{Beat, Heartbeat};
use super::limits::Bucket;
use super::AppState;
use crate::auth::validate::Principal;
use crate::engine::core::ConnHandles;
use crate::engine::outbound::OutItem;
use crate::engine::shard::ShardLocal;
use tickgate_proto::close;
use tickgate_proto::control::{parse_client_msg, ClientMsg, ErrorCode};
use tickgate_proto::now_ns;

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// How long a close frame may take to reach a peer (it may sit behind a full socket).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the peer's close reply after ours.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The end of a connection whose close frame could not be written (counted as 1006).
const UNDELIVERED: &str = "close frame not delivered";
/// The same for a slow consumer's 4008 (also `tickgate_slow_consumer_events_total{action="dropped"}`).
const SLOW_DROPPED: &str = "slow consumer, close frame not delivered";

/// Why the connection ended, for the log and `tickgate_closes_total`.
struct Ended {
    code: u16,
    reason: &'static str,
}

fn ws_config(app: &AppState) -> WebSocketConfig {
    let max = app.config.limits.max_control_bytes;
    let mut c = WebSocketConfig::default();
    // Clients send only small control messages. tungstenite zero-fills its read buffer
    // up to this size on every read attempt, so the 128 KiB default cost more CPU than
    // the whole fan-out (measured with perf) and 128 KiB of memory per connection.
    c.read_buffer_size = 1024;
    c.max_message_size = Some(max);
    c.max_frame_size = Some(max);
    // Frames are flushed explicitly once per writer wake-up; this only bounds how much
    // tungstenite buffers before it writes on its own.
    c.write_buffer_size = 64 * 1024;
    c.max_write_buffer_size = app.config.limits.max_outbound_bytes + app.config.engine.max_batch_bytes + (1 << 20);
    c
}

/// Runs a connection to its end.
pub(crate) async fn run(
    shard: Rc<ShardLocal>,
    app: Arc<AppState>,
    on_upgrade: OnUpgrade,
    principal: Option<Principal>,
    peer: Option<SocketAddr>,
    mut slot: ConnSlot,
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(ws_config(&app))).await;
    let principal = match principal {
        Some(p) => p,
        None => match inband_auth(&app, &mut ws, &mut slot).await {
            Ok(p) => p,
            Err(Some((code, reason))) => {
                let sent = if close_ws(&mut ws, code, &reason).await { code } else { 1006 };
                app.metrics.closes.with_label_values(&[&sent.to_string()]).inc();
                tracing::info!(peer = ?peer, code, reason = %reason, "in-band auth failed");
                return;
            }
            Err(None) => return,
        },
    };
    let session = format!("s-{:016x}", rand::random::<u64>());
    let sub = principal.sub.clone();
    let handles = shard.core.borrow_mut().add_conn(principal, session.clone());
    shard.inbox.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let opened = Instant::now();
    tracing::info!(session = %session, sub = %sub, peer = ?peer, shard = shard.id, "stream opened");

    let ended = drive(&shard, &app, ws, &handles).await;

    shard.core.borrow_mut().remove_conn(handles.key);
    shard.inbox.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    app.metrics.closes.with_label_values(&[&ended.code.to_string()]).inc();
    if ended.reason == SLOW_DROPPED {
        app.metrics.slow_consumer_events.with_label_values(&["dropped"]).inc();
    }
    tracing::info!(session = %session, sub = %sub, code = ended.code, reason = ended.reason,
        duration_s = opened.elapsed().as_secs_f64(), "stream closed");
    drop(slot);
}

/// What [`write_pending`] did.
enum Flow {
    /// Nothing was queued.
    Idle,
    /// Wrote and flushed what was queued.
    Wrote,
    /// The connection ended.
    Closed(Ended),
}

/// The in-band `auth` step for a connection upgraded without a credential: the first
/// message must be `{"op":"auth","token":...}` within `auth.inband_timeout_ms`.
/// `Err(Some((code, reason)))`: close with that code; `Err(None)`: the peer went away.
async fn inband_auth(app: &AppState, ws: &mut Ws, slot: &mut ConnSlot) -> Result<Principal, Option<(u16, String)>> {
    let window = Duration::from_millis(app.config.auth.inband_timeout_ms);
    let refuse = |reason: String| Err(Some((close::AUTH_REFUSED, reason)));
    let deadline = tokio::time::Instant::now() + window;
    let first = loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => {
                app.metrics.auth_failures.with_label_values(&["inband_timeout"]).inc();
                return Err(Some((close::AUTH_TIMEOUT, "no in-band auth in time".into())));
            }
            Ok(None) => return Err(None),
            // A frame the protocol refuses (invalid UTF-8, too big, bad framing) gets the
            // close code it gets after authentication.
            Ok(Some(Err(e))) => {
                return match read_error_close(&e) {
                    Some((code, reason)) => Err(Some((code, reason.into()))),
                    None => Err(None),
                }
            }
            // Control frames are not the first message: tungstenite queued the Pong for a
            // Ping; send it and keep waiting (within the same window).
            Ok(Some(Ok(Message::Ping(_)))) => {
                if tokio::time::timeout_at(deadline, ws.flush()).await.is_err() {
                    continue;
                }
            }
            Ok(Some(Ok(Message::Pong(_) | Message::Frame(_)))) => {}
            Ok(Some(Ok(m))) => break m,
        }
    };
    let token = match &first {
        Message::Text(t) => match parse_client_msg(t.as_str()) {
            Ok(ClientMsg::Auth { token }) => token.0,
            _ => {
                app.metrics.auth_failures.with_label_values(&["inband_not_auth"]).inc();
                return refuse("the first message must be {\"op\":\"auth\",\"token\":...}".into());
            }
        },
        _ => {
            app.metrics.auth_failures.with_label_values(&["inband_not_auth"]).inc();
            return refuse("the first message must be a text auth message".into());
        }
    };
    let p = match super::handshake::authorize_token(app, &token).await {
        Ok(p) => p,
        Err(r) => {
            if let Some(reason) = r.auth_reason {
                app.metrics.auth_failures.with_label_values(&[reason]).inc();
            }
            return refuse(format!("{}: {}", r.error, r.description));
        }
    };
    if slot.bind_subject(&p.sub).is_err() {
        return Err(Some((close::POLICY, "too many connections for this subject".into())));
    }
    Ok(p)
}

/// The validation of a refresh token: the request id and the outcome.
type PendingRefresh = std::pin::Pin<Box<dyn std::future::Future<Output = (Option<i64>, RefreshOutcome)>>>;
type RefreshOutcome = Result<Principal, crate::auth::validate::AuthError>;

async fn drive(shard: &Rc<ShardLocal>, app: &Arc<AppState>, mut ws: Ws, h: &ConnHandles) -> Ended {
    let limits = &app.config.limits;
    let mut heartbeat = Heartbeat::new(Duration::from_millis(app.config.server.heartbeat_ms));
    // Control messages: `control_rate_per_s` per second, bursts of `control_burst`.
    let (rate, burst) = (limits.control_rate_per_s as f64, limits.control_burst as f64);
    let mut bucket = Bucket::full(burst, Instant::now());
    let mut strikes: u32 = 0;
    // `engine.write_delay_us`: at most one write per delay. The timer is created once and
    // only armed while a write is held, so a connection that keeps up costs no timer.
    let write_delay = Duration::from_micros(app.config.engine.write_delay_us);
    let hold = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(hold);
    let mut holding = false;
    let mut last_write: Option<tokio::time::Instant> = None;
    // An in-band refresh whose token is being validated (it may wait for a JWKS refetch):
    // polled as one more branch, so the connection keeps streaming meanwhile.
    let mut refreshing: Option<PendingRefresh> = None;

    loop {
        tokio::select! {
            biased;
            // While a write is held the queue is not empty, so the core wakes the writer
            // only for what must not wait: a close, or a backlog of a full batch (or a
            // quarter of the slow-consumer budget). Either ends the hold.
            _ = h.notify.notified() => {
                let due = last_write.map(|t| t + write_delay);
                if let Some(due) = due.filter(|d| !holding && *d > tokio::time::Instant::now()) {
                    // Written to less than a delay ago: hold what came in so it leaves
                    // with what arrives meanwhile, in one write.
                    hold.as_mut().reset(due);
                    holding = true;
                    continue;
                }
                holding = false;
                match write_pending(shard, &mut ws, h).await {
                    Flow::Closed(e) => return e,
                    Flow::Wrote if !write_delay.is_zero() => last_write = Some(tokio::time::Instant::now()),
                    Flow::Wrote | Flow::Idle => {}
                }
            }
            // A termination (slow consumer, expiry, revocation) is never held.
            _ = h.kill.notified(), if holding => {
                holding = false;
                if let Flow::Closed(e) = write_pending(shard, &mut ws, h).await {
                    return e;
                }
            }
            _ = &mut hold, if holding => {
                holding = false;
                match write_pending(shard, &mut ws, h).await {
                    Flow::Closed(e) => return e,
                    Flow::Wrote => last_write = Some(tokio::time::Instant::now()),
                    Flow::Idle => {}
                }
            }
            Some((id, validated)) = futures_util::future::OptionFuture::from(refreshing.as_mut()),
                if refreshing.is_some() => {
                refreshing = None;
                shard.core.borrow_mut().refresh_apply(h.key, id, validated);
            }
            msg = ws.next() => {
                let msg = match msg {
                    None => return Ended { code: 1006, reason: "peer went away" },
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return fail(&mut ws, e).await,
                };
                match msg {
                    Message::Text(text) => {
                        if !bucket.take(Instant::now(), rate, burst) {
                            strikes += 1;
                            shard.core.borrow_mut().send_error(h.key, None, ErrorCode::RateLimited,
                                format!("more than {} control messages per second", limits.control_rate_per_s));
                        } else {
                            match parse_client_msg(text.as_str()) {
                                Ok(ClientMsg::Refresh { id, .. }) if refreshing.is_some() => {
                                    shard.core.borrow_mut().send_error(h.key, id, ErrorCode::RateLimited,
                                        "a refresh is still being validated; the current token stays in force".into());
                                }
                                Ok(ClientMsg::Refresh { id, token }) => {
                                    if shard.core.borrow_mut().refresh_begin(h.key, id) {
                                        let validator = app.validator.clone();
                                        refreshing = Some(Box::pin(async move {
                                            (id, validator.validate_async(&token.0).await)
                                        }));
                                    }
                                }
                                Ok(m) => shard.core.borrow_mut().handle(h.key, m),
                                Err(e) => {
                                    strikes += 1;
                                    shard.core.borrow_mut().send_error(h.key, e.id, ErrorCode::BadRequest, e.message);
                                }
                            }
                        }
                        if strikes > limits.max_strikes {
                            shard.core.borrow_mut().close(h.key, close::POLICY, "too many bad or rate-limited messages");
                        }
                    }
                    Message::Binary(_) => {
                        shard.core.borrow_mut().close(h.key, close::UNSUPPORTED_DATA, "binary frames are not accepted");
                    }
                    Message::Pong(_) => heartbeat.pong(),
                    Message::Close(frame) => {
                        // tungstenite queued the close reply; flush it and stop.
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.flush()).await;
                        let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                        return Ended { code, reason: "closed by client" };
                    }
                    Message::Ping(_) | Message::Frame(_) => {}
                }
            }
            beat = heartbeat.tick() => match beat {
                Beat::TimedOut => {
                    app.metrics.heartbeat_timeouts.inc();
                    shard.core.borrow_mut().close(h.key, close::POLICY, "heartbeat timeout");
                }
                Beat::Ping => {
                    if let Err(Some(e)) = with_kill(h, ws.send(Message::Ping(Vec::new().into()))).await {
                        return fail(&mut ws, e).await;
                    }
                }
            },
        }
    }
}

/// Runs a socket operation unless `kill` fires first. `Err(None)`: killed.
async fn with_kill<F>(h: &ConnHandles, op: F) -> Result<(), Option<WsError>>
where
    F: std::future::Future<Output = Result<(), WsError>>,
{
    tokio::select! {
        // An operation that can finish now always wins over a pending kill, so a kill
        // only ever abandons a write the socket is not taking.
        biased;
        r = op => r.map_err(Some),
        _ = h.kill.notified() => Err(None),
    }
}

/// Moves everything queued for the connection to the socket, in order.
async fn write_pending(shard: &Rc<ShardLocal>, ws: &mut Ws, h: &ConnHandles) -> Flow {
    let mut wrote = false;
    loop {
        let item = shard.core.borrow_mut().pop(h.key);
        let msg = match item {
            None => {
                if !wrote {
                    return Flow::Idle;
                }
                shard.core.borrow_mut().stats.flushes += 1;
                return match with_kill(h, ws.flush()).await {
                    Ok(()) => Flow::Wrote,
                    // Killed: the close item is now at the front of the queue.
                    Err(None) => continue,
                    Err(Some(e)) => Flow::Closed(io_end(e)),
                };
            }
            Some(OutItem::Close { code, reason }) => {
                if !close_ws(ws, code, reason).await {
                    // `tickgate_closes_total{code}` counts closes the client was sent; a
                    // stalled slow consumer that never got its 4008 is a dropped one.
                    let reason = if code == close::SLOW_CONSUMER { SLOW_DROPPED } else { UNDELIVERED };
                    return Flow::Closed(Ended { code: 1006, reason });
                }
                return Flow::Closed(Ended { code, reason });
            }
            Some(OutItem::Text(s)) => {
                let mut core = shard.core.borrow_mut();
                core.stats.frames += 1;
                core.stats.bytes += s.len() as u64;
                Message::text(s)
            }
            Some(OutItem::Batch(b)) => {
                let now = now_ns();
                let mut core = shard.core.borrow_mut();
                if core.expire_if_due(h.key, now) {
                    // Past the token's deadline: this batch is dropped and the close is
                    // now the only item queued.
                    continue;
                }
                let latency_ns = (now as i64).saturating_sub(b.oldest_recv_ns()).max(0);
                shard.latency.observe(latency_ns as f64 / 1e9);
                shard.batch_records.observe(b.count() as f64);
                for &(f, n) in b.feed_counts() {
                    if let Some(d) = core.stats.delivered.get_mut(f as usize) {
                        *d += n as u64;
                    }
                }
                let bytes = b.finish(now);
                core.stats.frames += 1;
                core.stats.bytes += bytes.len() as u64;
                Message::Binary(bytes)
            }
        };
        wrote = true;
        match with_kill(h, ws.feed(msg)).await {
            Ok(()) => {}
            Err(None) => continue,
            Err(Some(e)) => return Flow::Closed(io_end(e)),
        }
    }
}

fn io_end(e: WsError) -> Ended {
    tracing::debug!(error = %e, "socket write failed");
    Ended { code: 1006, reason: "socket error" }
}

/// Sends a close frame (behind whatever is already buffered) and waits briefly for the
/// peer's reply, so the TCP close does not reset data the peer has yet to read. Returns
/// whether the close frame was written and flushed to the socket (`false`: the peer was
/// not taking data, or the socket failed, and the connection is just dropped).
async fn close_ws(ws: &mut Ws, code: u16, reason: &str) -> bool {
    // A close reason is at most 123 bytes (RFC 6455 §5.5: control frames carry 125).
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame { code: CloseCode::from(code), reason: reason[..end].to_owned().into() };
    if !matches!(tokio::time::timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await, Ok(Ok(()))) {
        return false;
    }
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    true
}

/// The close a read error calls for (spec §11); `None` when the socket is gone.
fn read_error_close(e: &WsError) -> Option<(u16, &'static str)> {
    Some(match e {
        // RFC 6455 §5.2: the most significant bit of a 64-bit length must be 0. tungstenite
        // reads such a length as a (huge) size, so it is told apart here from a frame that
        // is merely too big.
        WsError::Capacity(CapacityError::MessageTooLong { size, .. }) if (*size as u64) >> 63 == 1 => {
            (close::PROTOCOL_ERROR, "frame length with the most significant bit set")
        }
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => (close::TOO_BIG, "message too big"),
        WsError::Capacity(_) => (close::TOO_BIG, "frame too big"),
        WsError::Utf8(_) => (1007, "invalid UTF-8 in a text frame"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => return None,
        WsError::Protocol(_) => (close::PROTOCOL_ERROR, "protocol error"),
        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => return None,
        _ => (close::PROTOCOL_ERROR, "protocol error"),
    })
}

/// Maps a read error to the close the spec asks for, and sends it when the socket allows.
async fn fail(ws: &mut Ws, e: WsError) -> Ended {
    let Some((code, reason)) = read_error_close(&e) else {
        let reason = match e {
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => "peer reset",
            _ => "socket error",
        };
        return Ended { code: 1006, reason };
    };
    if !close_ws(ws, code, reason).await {
        return Ended { code: 1006, reason: UNDELIVERED };
    }
    Ended { code, reason }
}
