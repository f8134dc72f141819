//! One stream connection after the upgrade, running on its shard thread.
//!
//! The task authenticates in-band when the upgrade carried no credential, registers the
//! connection with its shard ([`ShardHandle::open`], a [`ConnGuard`]), reads control
//! messages (rate limit, strikes, heartbeat, refresh validation) and moves the frames the
//! engine queued ([`ConnGuard::next_frame`]) to the socket, paced by the engine's
//! [`WritePacer`]. It never waits on the socket without also watching `kill`, so a
//! stalled client cannot hold back a slow-consumer close or shutdown. The engine's state
//! is reached only through the guard's methods.

use std::net::SocketAddr;
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

use super::authorize::{authorize_token, ConnSlot};
use super::heartbeat::{Beat, Heartbeat};
use super::limits::Bucket;
use super::AppState;
use crate::auth::validate::Principal;
use crate::engine::{ConnGuard, Frame, ShardHandle, WritePacer};
use tickgate_proto::close;
use tickgate_proto::control::{parse_client_msg, ClientMsg, ErrorCode};

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
    shard: ShardHandle,
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
    let conn = shard.open(principal, session.clone());
    let opened = Instant::now();
    tracing::info!(session = %session, sub = %sub, peer = ?peer, shard = shard.id(), "stream opened");

    let ended = drive(&app, ws, &conn).await;

    // Unregistered before the slot is given back.
    drop(conn);
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
    let p = match authorize_token(app, &token).await {
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

async fn drive(app: &Arc<AppState>, mut ws: Ws, conn: &ConnGuard) -> Ended {
    let limits = &app.config.limits;
    let mut heartbeat = Heartbeat::new(Duration::from_millis(app.config.server.heartbeat_ms));
    // Control messages: `control_rate_per_s` per second, bursts of `control_burst`.
    let (rate, burst) = (limits.control_rate_per_s as f64, limits.control_burst as f64);
    let mut bucket = Bucket::full(burst, Instant::now());
    let mut strikes: u32 = 0;
    // `engine.write_delay_us`: the pacer decides; the timer is created once and only armed
    // while a write is held, so a connection that keeps up costs no timer.
    let mut pacer = WritePacer::new(Duration::from_micros(app.config.engine.write_delay_us));
    let hold = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(hold);
    // An in-band refresh whose token is being validated (it may wait for a JWKS refetch):
    // polled as one more branch, so the connection keeps streaming meanwhile.
    let mut refreshing: Option<PendingRefresh> = None;

    loop {
        tokio::select! {
            biased;
            _ = conn.wake().notified() => {
                if let Some(until) = pacer.on_wake(tokio::time::Instant::now()) {
                    hold.as_mut().reset(until);
                    continue;
                }
                match write_pending(&mut ws, conn).await {
                    Flow::Closed(e) => return e,
                    Flow::Wrote => pacer.wrote(tokio::time::Instant::now()),
                    Flow::Idle => {}
                }
            }
            // A termination (slow consumer, expiry, revocation) is never held.
            _ = conn.kill().notified(), if pacer.holding() => {
                pacer.release();
                if let Flow::Closed(e) = write_pending(&mut ws, conn).await {
                    return e;
                }
            }
            _ = &mut hold, if pacer.holding() => {
                pacer.release();
                match write_pending(&mut ws, conn).await {
                    Flow::Closed(e) => return e,
                    Flow::Wrote => pacer.wrote(tokio::time::Instant::now()),
                    Flow::Idle => {}
                }
            }
            Some((id, validated)) = futures_util::future::OptionFuture::from(refreshing.as_mut()),
                if refreshing.is_some() => {
                refreshing = None;
                conn.refresh_apply(id, validated);
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
                            conn.send_error(None, ErrorCode::RateLimited,
                                format!("more than {} control messages per second", limits.control_rate_per_s));
                        } else {
                            match parse_client_msg(text.as_str()) {
                                Ok(ClientMsg::Refresh { id, .. }) if refreshing.is_some() => {
                                    conn.send_error(id, ErrorCode::RateLimited,
                                        "a refresh is still being validated; the current token stays in force".into());
                                }
                                Ok(ClientMsg::Refresh { id, token }) => {
                                    if conn.refresh_begin(id) {
                                        let validator = app.validator.clone();
                                        refreshing = Some(Box::pin(async move {
                                            (id, validator.validate_async(&token.0).await)
                                        }));
                                    }
                                }
                                Ok(m) => conn.handle(m),
                                Err(e) => {
                                    strikes += 1;
                                    conn.send_error(e.id, ErrorCode::BadRequest, e.message);
                                }
                            }
                        }
                        if strikes > limits.max_strikes {
                            conn.close(close::POLICY, "too many bad or rate-limited messages");
                        }
                    }
                    Message::Binary(_) => {
                        conn.close(close::UNSUPPORTED_DATA, "binary frames are not accepted");
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
                    conn.close(close::POLICY, "heartbeat timeout");
                }
                Beat::Ping => {
                    if let Err(Some(e)) = with_kill(conn, ws.send(Message::Ping(Vec::new().into()))).await {
                        return fail(&mut ws, e).await;
                    }
                }
            },
        }
    }
}

/// Runs a socket operation unless `kill` fires first. `Err(None)`: killed.
async fn with_kill<F>(conn: &ConnGuard, op: F) -> Result<(), Option<WsError>>
where
    F: std::future::Future<Output = Result<(), WsError>>,
{
    tokio::select! {
        // An operation that can finish now always wins over a pending kill, so a kill
        // only ever abandons a write the socket is not taking.
        biased;
        r = op => r.map_err(Some),
        _ = conn.kill().notified() => Err(None),
    }
}

/// Moves everything queued for the connection to the socket, in order.
async fn write_pending(ws: &mut Ws, conn: &ConnGuard) -> Flow {
    let mut wrote = false;
    loop {
        let msg = match conn.next_frame() {
            None => {
                if !wrote {
                    return Flow::Idle;
                }
                conn.flushed();
                return match with_kill(conn, ws.flush()).await {
                    Ok(()) => Flow::Wrote,
                    // Killed: the close item is now at the front of the queue.
                    Err(None) => continue,
                    Err(Some(e)) => Flow::Closed(io_end(e)),
                };
            }
            Some(Frame::Close { code, reason }) => {
                if !close_ws(ws, code, reason).await {
                    // `tickgate_closes_total{code}` counts closes the client was sent; a
                    // stalled slow consumer that never got its 4008 is a dropped one.
                    let reason = if code == close::SLOW_CONSUMER { SLOW_DROPPED } else { UNDELIVERED };
                    return Flow::Closed(Ended { code: 1006, reason });
                }
                return Flow::Closed(Ended { code, reason });
            }
            Some(Frame::Text(s)) => Message::text(s),
            Some(Frame::Binary(bytes)) => Message::Binary(bytes),
        };
        wrote = true;
        match with_kill(conn, ws.feed(msg)).await {
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
