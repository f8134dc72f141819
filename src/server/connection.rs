//! One stream connection after the upgrade, running on its shard thread.
//!
//! The task authenticates in-band when the upgrade carried no credential, opens the
//! `Session` on its shard ([`ShardHandle::open`] takes the principal, whose deadline the
//! shard's timer wheel keeps; a [`ConnGuard`] unregisters it on drop), and runs the
//! shared connection loop (`ws::drive`) with the stream's `Role`: engine wake-ups
//! paced by the engine's [`WritePacer`] move queued frames ([`ConnGuard::next_frame`])
//! through the `Outbox` (one `writev`, no copy) to the socket (on plain TCP the shard
//! writes them itself when it may, `engine::direct`), kills abandon stalled writes,
//! control messages are rate-limited and struck, and a refresh token is validated at the edge (`begin_refresh`) while the
//! stream keeps streaming. It never waits on the socket without also watching `kill`, so
//! a stalled client cannot hold back a slow-consumer close or shutdown. The engine's
//! state is reached only through the guard's methods.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use super::authorize::{authorize_token, ConnSlot};
use super::heartbeat::Heartbeat;
use super::limits::Bucket;
use super::outbox::{Outbox, TcpPort};
use super::session::ws::{self, CloseStyle, Ended, Role, Step, Ws, UNDELIVERED};
use super::session::{begin_refresh, PendingRefresh, RefreshOutcome, Session};
use super::{AppState, LogPeer};
use crate::auth::failure::AuthFailure;
use crate::auth::validate::Principal;
use crate::engine::{ConnGuard, Frame, ShardHandle, WritePacer};
use tickgate_proto::close::{self, Reason};
use tickgate_proto::control::{parse_client_msg, ClientMsg, ErrorCode};

/// How long a close frame may take to reach a peer (it may sit behind a full socket).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the peer's close reply after ours.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// A stream's close handshake.
const STREAM_CLOSE: CloseStyle = CloseStyle { timeout: CLOSE_TIMEOUT, linger: CLOSE_LINGER };

/// The same as [`UNDELIVERED`] for a slow consumer's 4008 (also
/// `tickgate_slow_consumer_events_total{action="dropped"}`).
const SLOW_DROPPED: &str = "slow consumer, close frame not delivered";

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
    let Some(mut ws) = ws::accept(on_upgrade, ws_config(&app)).await else { return };
    let principal = match principal {
        Some(p) => p,
        None => match inband_auth(&app, &mut ws, &mut slot).await {
            Ok(p) => p,
            Err(Some((code, reason))) => {
                let sent = if ws::close(&mut ws, code, &reason, STREAM_CLOSE).await { code } else { 1006 };
                app.metrics.closes.with_label_values(&[&sent.to_string()]).inc();
                tracing::info!(peer = %LogPeer(peer), code, reason = %reason, "in-band auth failed");
                return;
            }
            Err(None) => return,
        },
    };
    let Session { id: session, principal, .. } = Session::new(&app.validator, principal);
    let sub = principal.sub.clone();
    // The shard keeps the session from here: its deadline on the timer wheel, refresh
    // applied there, revocation through `EngineCtl`.
    let conn = shard.open(principal, session.clone());
    conn.track_writes(ws.get_ref().progress().clone());
    let opened = Instant::now();
    tracing::info!(session = %session, sub = %sub, peer = %LogPeer(peer), shard = shard.id(), "stream opened");

    let ended = drive(&app, ws, &conn).await;

    // Unregistered before the slot is given back.
    drop(conn);
    app.metrics.closes.with_label_values(&[&ended.code.to_string()]).inc();
    if ended.reason == SLOW_DROPPED {
        app.metrics.slow_consumer_events.with_label_values(&["dropped"]).inc();
    }
    tracing::info!(session = %session, sub = %sub, code = ended.code, reason = ended.reason,
        duration_s = log_secs(opened.elapsed()), "stream closed");
    drop(slot);
}

/// A duration as a log field: seconds to the millisecond, `5.996` rather than
/// `5.9956246570000005` (a float of whole milliseconds prints with at most 3 decimals).
fn log_secs(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

/// What [`write_pending`] did.
enum Flow {
    /// Nothing was queued.
    Idle,
    /// Wrote and flushed what was queued.
    Wrote,
    /// Stopped at the connection's `max_bytes_per_s`: write again after this long.
    Paced(Duration),
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
                AuthFailure::InbandTimeout.count(&app.metrics);
                return Err(Some((Reason::AuthTimeout.code(), Reason::AuthTimeout.reason().into())));
            }
            Ok(None) => return Err(None),
            // A frame the protocol refuses (invalid UTF-8, too big, bad framing) gets the
            // close code it gets after authentication.
            Ok(Some(Err(e))) => {
                return match ws::read_error_close(&e) {
                    Some(why) => Err(Some((why.code(), why.reason().into()))),
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
                AuthFailure::InbandNotAuth.count(&app.metrics);
                return refuse("the first message must be {\"op\":\"auth\",\"token\":...}".into());
            }
        },
        _ => {
            AuthFailure::InbandNotAuth.count(&app.metrics);
            return refuse("the first message must be a text auth message".into());
        }
    };
    let p = match authorize_token(app, &token).await {
        Ok(p) => p,
        Err(r) => {
            if let Some(reason) = r.auth_reason {
                reason.count(&app.metrics);
            }
            return refuse(format!("{}: {}", r.error, r.description));
        }
    };
    if slot.bind_subject(&p.sub).is_err() {
        return Err(Some((Reason::SubjectLimit.code(), Reason::SubjectLimit.reason().into())));
    }
    Ok(p)
}

/// The stream's half of the connection loop: engine wake-ups (held by the pacer), kills,
/// refresh validations, and the client's control messages.
struct Stream<'a> {
    app: &'a AppState,
    conn: &'a ConnGuard,
    /// Control messages: `control_rate_per_s` per second, bursts of `control_burst`.
    bucket: Bucket,
    strikes: u32,
    /// `engine.write_delay_us`: the pacer decides; the timer is created once and only
    /// armed while a write is held, so a connection that keeps up costs no timer.
    pacer: WritePacer,
    hold: Pin<&'a mut tokio::time::Sleep>,
    /// Armed while the writer waits for its `max_bytes_per_s` budget (`Flow::Paced`).
    pace: Pin<&'a mut tokio::time::Sleep>,
    pacing: bool,
    /// An in-band refresh whose token is being validated (it may wait for a JWKS
    /// refetch): polled as one more event, so the connection keeps streaming meanwhile.
    refreshing: Option<PendingRefresh>,
    /// The connection's `max_bytes_per_s` budget (protocol v1.1 `throttle`), when it set one.
    bytes: ByteBudget,
    /// Data frames taken from the engine on their way to the socket (shared with the
    /// shard's direct writes on plain TCP).
    out: Rc<RefCell<Outbox>>,
}

/// Paces a connection's writes to its `max_bytes_per_s` (protocol v1.1): a token bucket of
/// bytes holding a tenth of a second's worth, which a frame may overdraw (frames are never
/// split); the next write waits until the debt is paid.
struct ByteBudget {
    bucket: Bucket,
    rate: Option<u64>,
}

impl ByteBudget {
    fn burst(rate: u64) -> f64 {
        rate as f64 / 10.0
    }

    /// How long to wait before the next write under `rate` (none: no cap).
    fn wait(&mut self, rate: Option<u64>) -> Duration {
        // The common case, no cap, reads no clock.
        if rate.is_none() && self.rate.is_none() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        if rate != self.rate {
            // A new cap starts with a full bucket.
            self.rate = rate;
            if let Some(r) = rate {
                self.bucket = Bucket::full(Self::burst(r), now);
            }
        }
        match rate {
            Some(r) => self.bucket.debt(now, r as f64, Self::burst(r)),
            None => Duration::ZERO,
        }
    }

    /// A frame of `n` bytes was written.
    fn spend(&mut self, n: usize) {
        if let Some(r) = self.rate {
            self.bucket.spend(Instant::now(), r as f64, Self::burst(r), n as f64);
        }
    }
}

/// What the stream's half waits for.
enum StreamEvent {
    /// The engine queued something.
    Wake,
    /// A termination while a write is held (a termination is never held).
    Kill,
    /// The held write is due.
    HoldDone,
    /// The `max_bytes_per_s` budget allows the next write.
    PaceDone,
    /// A refresh token was validated.
    Refreshed(Option<i64>, RefreshOutcome),
}

impl Role for Stream<'_> {
    type Event = StreamEvent;
    const CLOSE: CloseStyle = STREAM_CLOSE;

    async fn event(&mut self) -> StreamEvent {
        let holding = self.pacer.holding();
        let pacing = self.pacing;
        tokio::select! {
            biased;
            _ = self.conn.wake().notified() => StreamEvent::Wake,
            _ = self.conn.kill().notified(), if holding || pacing => StreamEvent::Kill,
            _ = self.hold.as_mut(), if holding => StreamEvent::HoldDone,
            _ = self.pace.as_mut(), if pacing => StreamEvent::PaceDone,
            Some((id, validated)) = futures_util::future::OptionFuture::from(self.refreshing.as_mut()),
                if self.refreshing.is_some() => StreamEvent::Refreshed(id, validated),
        }
    }

    async fn on_event(&mut self, ws: &mut Ws, ev: StreamEvent) -> Step {
        let pacer_counts = match ev {
            // Without a write delay (the default) the pacer never holds: no clock read.
            StreamEvent::Wake if !self.pacer.delays() => false,
            StreamEvent::Wake => {
                if let Some(until) = self.pacer.on_wake(tokio::time::Instant::now()) {
                    self.hold.as_mut().reset(until);
                    return Step::Continue;
                }
                true
            }
            StreamEvent::Kill => {
                self.pacer.release();
                false
            }
            StreamEvent::HoldDone => {
                self.pacer.release();
                true
            }
            StreamEvent::PaceDone => false,
            StreamEvent::Refreshed(id, validated) => {
                self.refreshing = None;
                self.conn.refresh_apply(id, validated);
                return Step::Continue;
            }
        };
        let flow = write_pending(ws, &self.out, self.conn, &mut self.bytes).await;
        // While the writer waits for its byte budget, the engine sees a socket that takes
        // no data (the client asked for it): a backlog that passes the budget meanwhile is
        // handled as a slow consumer's, and the shard never owes this connection a write.
        let pacing = matches!(flow, Flow::Paced(_));
        if pacing != self.pacing {
            self.pacing = pacing;
            self.conn.write_blocked(pacing);
        }
        match flow {
            Flow::Paced(wait) => {
                self.pace.as_mut().reset(tokio::time::Instant::now() + wait);
                Step::Continue
            }
            Flow::Closed(e) => Step::End(e),
            Flow::Wrote if pacer_counts => {
                self.pacer.wrote(tokio::time::Instant::now());
                Step::Continue
            }
            Flow::Wrote | Flow::Idle => Step::Continue,
        }
    }

    async fn on_message(&mut self, _ws: &mut Ws, msg: Message) -> Step {
        let (conn, limits) = (self.conn, &self.app.config.limits);
        let text = match msg {
            Message::Text(text) => text,
            _ => {
                conn.close(Reason::BinaryFrame);
                return Step::Continue;
            }
        };
        let (rate, burst) = (limits.control_rate_per_s as f64, limits.control_burst as f64);
        if !self.bucket.take(Instant::now(), rate, burst) {
            self.strikes += 1;
            conn.send_error(
                None,
                ErrorCode::RateLimited,
                format!("more than {} control messages per second", limits.control_rate_per_s),
            );
        } else {
            match parse_client_msg(text.as_str()) {
                Ok(ClientMsg::Refresh { id, .. }) if self.refreshing.is_some() => {
                    conn.send_error(
                        id,
                        ErrorCode::RateLimited,
                        "a refresh is still being validated; the current token stays in force".into(),
                    );
                }
                Ok(ClientMsg::Refresh { id, token }) => {
                    if conn.refresh_begin(id) {
                        self.refreshing = Some(begin_refresh(&self.app.validator, id, token.0));
                    }
                }
                Ok(m) => conn.handle(m),
                Err(e) => {
                    self.strikes += 1;
                    conn.send_error(e.id, ErrorCode::BadRequest, e.message);
                }
            }
        }
        if self.strikes > limits.max_strikes {
            conn.close(Reason::TooManyStrikes);
        }
        Step::Continue
    }

    fn on_heartbeat_timeout(&mut self) -> Step {
        // Queued behind what the engine already queued, like every engine-decided close.
        self.conn.close(Reason::HeartbeatTimeout);
        Step::Continue
    }

    fn closed_by_peer(&self, code: u16) -> Ended {
        Ended { code, reason: "closed by client" }
    }

    fn gone(&self) -> Ended {
        Ended { code: 1006, reason: "peer went away" }
    }

    async fn guard<F>(&self, op: F) -> Result<(), Option<WsError>>
    where
        F: std::future::Future<Output = Result<(), WsError>>,
    {
        with_kill(self.conn, op).await
    }
}

async fn drive(app: &Arc<AppState>, mut ws: Ws, conn: &ConnGuard) -> Ended {
    let out = Rc::new(RefCell::new(Outbox::default()));
    // A plain TCP stream without a write delay lets its shard write its frames itself
    // (engine::direct); a held write, TLS, or anything else stays the task's.
    if let (Some(tcp), 0) = (ws.get_ref().inner().tcp(), app.config.engine.write_delay_us) {
        conn.direct(Rc::new(TcpPort {
            tcp: tcp.clone(),
            out: out.clone(),
            tungstenite_holds: ws.get_ref().tungstenite_holds(),
            progress: ws.get_ref().progress().clone(),
        }));
    }
    let mut heartbeat = Heartbeat::new(Duration::from_millis(app.config.server.heartbeat_ms));
    let hold = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(hold);
    let pace = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(pace);
    let mut stream = Stream {
        app,
        conn,
        bucket: Bucket::full(app.config.limits.control_burst as f64, Instant::now()),
        strikes: 0,
        pacer: WritePacer::new(Duration::from_micros(app.config.engine.write_delay_us)),
        hold,
        pace,
        pacing: false,
        refreshing: None,
        bytes: ByteBudget { bucket: Bucket::full(0.0, Instant::now()), rate: None },
        out,
    };
    ws::drive(&mut ws, &mut stream, &mut heartbeat, &app.metrics).await
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

/// A socket write (as [`with_kill`]) that tells the engine while it waits for the socket:
/// a write that cannot complete at once means the kernel send buffer is full, and only a
/// socket that stays full is a slow consumer's.
async fn write_op<F>(conn: &ConnGuard, op: F) -> Result<(), Option<WsError>>
where
    F: std::future::Future<Output = Result<(), WsError>>,
{
    let mut op = std::pin::pin!(op);
    // Most writes complete at once: the kernel had room.
    if let std::task::Poll::Ready(r) = std::future::poll_fn(|cx| std::task::Poll::Ready(op.as_mut().poll(cx))).await {
        return r.map_err(Some);
    }
    conn.write_blocked(true);
    let r = with_kill(conn, op).await;
    conn.write_blocked(false);
    r
}

/// How many bytes of frames the writer takes from the engine before it writes them (it
/// takes more once they went out): tungstenite's `write_buffer_size` did the same before.
const OUTBOX_BYTES: usize = 64 * 1024;

/// Moves everything queued for the connection to the socket, in order, at most at the
/// connection's `max_bytes_per_s` when it set one.
async fn write_pending(ws: &mut Ws, out: &RefCell<Outbox>, conn: &ConnGuard, bytes: &mut ByteBudget) -> Flow {
    let mut wrote = false;
    loop {
        let wait = bytes.wait(conn.byte_rate());
        // Over its own bandwidth cap, what was fed goes out now and the rest waits (on a
        // timer of the connection loop, which keeps reading the client meanwhile).
        let paced = !wait.is_zero();
        let held = out.borrow().len();
        let next = if paced || held >= OUTBOX_BYTES { None } else { conn.next_frame() };
        match next {
            Some(Frame::Text(s)) => {
                bytes.spend(s.len());
                out.borrow_mut().text(s);
                wrote = true;
                continue;
            }
            Some(Frame::Binary(b)) => {
                bytes.spend(b.len());
                out.borrow_mut().binary(b);
                wrote = true;
                continue;
            }
            Some(Frame::Close { code, reason }) => {
                // The frames taken before the close go first, within the close's own bound.
                let sent = out.borrow().is_empty()
                    || matches!(tokio::time::timeout(CLOSE_TIMEOUT, write_outbox(ws, out)).await, Ok(Ok(())));
                if !sent || !ws::close(ws, code, reason, STREAM_CLOSE).await {
                    // `tickgate_closes_total{code}` counts closes the client was sent; a
                    // stalled slow consumer that never got its 4008 is a dropped one.
                    let reason = if code == close::SLOW_CONSUMER { SLOW_DROPPED } else { UNDELIVERED };
                    return Flow::Closed(Ended { code: 1006, reason });
                }
                return Flow::Closed(Ended { code, reason });
            }
            None => {}
        }
        if !out.borrow().is_empty() {
            match write_op(conn, write_outbox(ws, out)).await {
                Ok(()) => {}
                // Killed: the close item is now at the front of the queue (and a
                // connection closing is never paced).
                Err(None) => continue,
                Err(Some(e)) => return Flow::Closed(io_end(e)),
            }
            if !paced {
                // The outbox was full, or more was queued meanwhile: take the rest.
                continue;
            }
        }
        if !wrote {
            return if paced { Flow::Paced(wait) } else { Flow::Idle };
        }
        conn.flushed();
        return if paced { Flow::Paced(wait) } else { Flow::Wrote };
    }
}

/// Writes the outbox to the socket, after whatever tungstenite itself holds (a pong it
/// queued while reading): see [`super::outbox`] for why the two never interleave.
async fn write_outbox(ws: &mut Ws, out: &RefCell<Outbox>) -> Result<(), WsError> {
    if ws.get_ref().tungstenite_may_hold() {
        ws.flush().await?;
    }
    // Borrowed only inside each poll: while the task waits, the bytes left in the outbox
    // keep the shard's direct writes off the socket (`TcpPort::free`).
    std::future::poll_fn(|cx| out.borrow_mut().poll_write(Pin::new(ws.get_mut()), cx)).await.map_err(WsError::Io)
}

fn io_end(e: WsError) -> Ended {
    tracing::debug!(error = %e, "socket write failed");
    Ended { code: 1006, reason: "socket error" }
}
