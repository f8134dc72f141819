//! `tickgate load --role floor`: the per-write floor of a fan-out server on this machine.
//!
//! A bare WebSocket writer that serves exactly what `tickgate load --role subscriber
//! --no-token` needs from tickgate, and nothing else: the upgrade of `GET /v1/stream`
//! (101 with `Sec-WebSocket-Accept`, subprotocol `tickgate.v1` echoed), the `welcome`
//! message, the `subscribed` reply (instruments with their last seq), then one spec §5
//! batch per tick. Everything is hand-written on non-blocking sockets: one `epoll`, one
//! thread, one absolute `timerfd` for the open-loop schedule ([`TickSchedule`]: ticks
//! round robin over `--symbols`, seq 1, 2, 3, ... per instrument, `ts_event_ns` = the
//! tick's scheduled time, as the publisher role and tickgate's synthetic feed do).
//!
//! Per tick the server encodes ONE server frame (unmasked header + a one-record batch)
//! and writes it to every subscribed connection of the instrument: one `write` per
//! connection per tick and no copy when the write completes. On EAGAIN or a partial
//! write the remainder goes to that connection's pending buffer and EPOLLOUT is armed;
//! later frames queue behind it without a write until it drains; a connection whose
//! pending bytes exceed `max_pending` (1 MiB, like tickgate's `max_outbound_bytes` in
//! the benches) is closed and counted.
//!
//! Client frames are read and mostly discarded: a text `subscribe` is answered, a text
//! `ping` gets a `pong`, a WebSocket ping a pong, a close a close (then the socket is
//! closed). `GET /counters` on the same port answers the counters as JSON (what
//! `benches/floor.sh` reads before and after its window); the summary on stdout at exit
//! (SIGTERM, SIGINT or `--seconds`) has the same counters.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::publish::TickSchedule;
use tickgate_proto::codec::{write_batch_header, BATCH_HEADER_LEN};
use tickgate_proto::control::{parse_client_msg, ClientMsg, ErrorCode, FeedInfo, InstrumentInfo, ServerMsg};
use tickgate_proto::now_ns;

/// Epoll data of the listening socket.
const LISTENER: u64 = 0;
/// Epoll data of the tick timer.
const TIMER: u64 = 1;
/// Connection `i` is registered with data `i + FIRST_CONN`.
const FIRST_CONN: u64 = 2;
/// Longest HTTP request head taken.
const MAX_REQUEST: usize = 16 * 1024;
/// Longest client frame payload taken (control messages are small).
const MAX_CLIENT_FRAME: u64 = 64 * 1024;
/// Most frames handed to connections in one wake-up: a server far behind the schedule
/// still gets back to its sockets (accepts, `/counters`) every ~10 ms.
const MAX_FRAMES_PER_WAKE: u64 = 1024;
/// The feed epoch announced: the floor's numbering never restarts.
const EPOCH: u64 = 1;
/// A connection with more unsent bytes than this is closed (tickgate's
/// `limits.max_outbound_bytes` in the benches).
pub const MAX_PENDING: usize = 1024 * 1024;
/// The WebSocket subprotocol tickgate's clients ask for.
const SUBPROTOCOL: &str = "tickgate.v1";

/// Why the floor server could not run.
#[derive(Debug, Error)]
pub enum FloorError {
    /// The listening socket could not be opened.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// An epoll or timerfd call failed.
    #[error("{call}: {source}")]
    Sys {
        /// Which call.
        call: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Inconsistent options.
    #[error("{0}")]
    Args(String),
}

fn sys(call: &'static str) -> impl FnOnce(rustix::io::Errno) -> FloorError {
    move |e| FloorError::Sys { call, source: e.into() }
}

/// What a peer sent that the floor does not take; the connection is refused or closed.
#[derive(Debug, Error, PartialEq, Eq)]
enum PeerError {
    #[error("request head over {MAX_REQUEST} bytes")]
    RequestTooLarge,
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("not found")]
    NotFound,
    #[error("client frame not masked")]
    Unmasked,
    #[error("reserved bits set")]
    Reserved,
    #[error("unknown opcode {0}")]
    Opcode(u8),
    #[error("control frame fragmented or over 125 bytes")]
    BadControl,
    #[error("client frame of {0} bytes")]
    TooLarge(u64),
    #[error("text frame is not UTF-8")]
    Utf8,
}

impl PeerError {
    /// HTTP status (before the upgrade) or WebSocket close code (after).
    fn code(&self) -> u16 {
        match self {
            PeerError::RequestTooLarge => 431,
            PeerError::BadRequest(_) => 400,
            PeerError::NotFound => 404,
            PeerError::TooLarge(_) => 1009,
            PeerError::Utf8 => 1007,
            PeerError::Unmasked | PeerError::Reserved | PeerError::Opcode(_) | PeerError::BadControl => 1002,
        }
    }
}

/// Floor server settings.
#[derive(Debug, Clone)]
pub struct FloorOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Feed name (what subscribers subscribe to).
    pub feed: String,
    /// Feed id written into the records.
    pub feed_id: u16,
    /// The instruments, in order (instrument id = position + 1).
    pub symbols: Vec<String>,
    /// Ticks per second, all instruments together.
    pub rate: f64,
    /// Stop after this long (`None`: until stopped).
    pub duration: Option<Duration>,
    /// A connection with more unsent bytes than this is closed.
    pub max_pending: usize,
    /// Print a progress line every second on stderr.
    pub progress: bool,
}

/// The floor server's counters (the `/counters` answer and part of the summary).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FloorCounters {
    /// Ticks generated.
    pub ticks: u64,
    /// Tick frames handed to connections (written at once, or queued behind a remainder).
    pub frames: u64,
    /// `write` calls that put data on a socket (tick frames, pending flushes, control
    /// replies), EAGAIN included.
    pub writes: u64,
    /// Bytes the kernel took.
    pub bytes: u64,
    /// Writes answered EAGAIN.
    pub eagain: u64,
    /// Writes that took only part of what was offered.
    pub partial_writes: u64,
    /// Tick frames appended behind a pending remainder (no write of their own).
    pub queued_frames: u64,
    /// Connections closed for more than `max_pending` unsent bytes.
    pub slow_closed: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections upgraded to WebSocket.
    pub upgraded: u64,
    /// Requests or connections refused for what the peer sent.
    pub refused: u64,
    /// Open WebSocket connections now.
    pub live: u64,
    /// `epoll_wait` returns.
    pub wakeups: u64,
    /// Largest delay of a tick behind its schedule, microseconds.
    pub max_behind_us: u64,
    /// This process's CPU seconds (user + system, `/proc/self/stat`) when the counters
    /// were read, so CPU and writes come from the same moment.
    pub cpu_s: f64,
}

impl FloorCounters {
    /// A copy with this process's CPU time now.
    fn snapshot(&self) -> FloorCounters {
        FloorCounters { cpu_s: super::own_cpu_seconds().unwrap_or(0.0), ..self.clone() }
    }
}

/// The JSON summary of `tickgate load --role floor`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloorSummary {
    /// Always `floor`.
    pub role: String,
    /// The address listened on.
    pub listen: String,
    /// Seconds from start to stop.
    pub seconds: f64,
    /// Ticks per second asked for.
    pub target_rate: f64,
    /// The counters at exit.
    #[serde(flatten)]
    pub counters: FloorCounters,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the HTTP request head.
    Http,
    /// Upgraded.
    Open,
}

struct Conn {
    sock: TcpStream,
    data: u64,
    phase: Phase,
    inbuf: Vec<u8>,
    /// Unsent bytes from `sent` on.
    pending: Vec<u8>,
    sent: usize,
    out_armed: bool,
    /// Instrument indices subscribed.
    subs: Vec<usize>,
}

impl Conn {
    fn pending_len(&self) -> usize {
        self.pending.len() - self.sent
    }
}

/// What a write left behind.
enum Sent {
    /// Everything written, or queued within the budget.
    Ok,
    /// The connection must go: a socket error, or the pending budget exceeded (`true`).
    Close { slow: bool },
}

/// Writes `bytes` to `conn`: one `write` when nothing is pending, else queued behind the
/// pending remainder. A short write leaves the rest pending and arms EPOLLOUT.
fn send(ep: &OwnedFd, conn: &mut Conn, bytes: &[u8], c: &mut FloorCounters, max_pending: usize) -> Sent {
    if conn.pending_len() > 0 {
        conn.pending.extend_from_slice(bytes);
        return if conn.pending_len() > max_pending { Sent::Close { slow: true } } else { Sent::Ok };
    }
    c.writes += 1;
    let n = match conn.sock.write(bytes) {
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            c.eagain += 1;
            0
        }
        Err(e) if e.kind() == ErrorKind::Interrupted => 0,
        Err(_) => return Sent::Close { slow: false },
    };
    c.bytes += n as u64;
    if n == bytes.len() {
        return Sent::Ok;
    }
    if n > 0 {
        c.partial_writes += 1;
    }
    conn.pending.clear();
    conn.sent = 0;
    conn.pending.extend_from_slice(&bytes[n..]);
    if conn.pending_len() > max_pending {
        return Sent::Close { slow: true };
    }
    arm_out(ep, conn, true)
}

/// Arms or disarms EPOLLOUT for a connection.
fn arm_out(ep: &OwnedFd, conn: &mut Conn, on: bool) -> Sent {
    if conn.out_armed == on {
        return Sent::Ok;
    }
    let flags = if on { epoll::EventFlags::IN | epoll::EventFlags::OUT } else { epoll::EventFlags::IN };
    match epoll::modify(ep, &conn.sock, epoll::EventData::new_u64(conn.data), flags) {
        Ok(()) => {
            conn.out_armed = on;
            Sent::Ok
        }
        Err(_) => Sent::Close { slow: false },
    }
}

/// Appends a server frame header (FIN, unmasked) for a payload of `len` bytes.
fn frame_header(opcode: u8, len: usize, out: &mut Vec<u8>) {
    let (h, n) = tickgate_proto::ws::server_header(opcode, len);
    out.extend_from_slice(&h[..n]);
}

/// A whole server frame.
fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    frame_header(opcode, payload.len(), &mut out);
    out.extend_from_slice(payload);
    out
}

/// One client frame, unmasked.
#[derive(Debug, PartialEq, Eq)]
struct ClientFrame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// Reads one client frame from the front of `buf`: `Ok(None)` while it is incomplete,
/// else the frame and the bytes it took.
fn parse_client_frame(buf: &[u8]) -> Result<Option<(ClientFrame, usize)>, PeerError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(PeerError::Reserved);
    }
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
    if b1 & 0x80 == 0 {
        return Err(PeerError::Unmasked);
    }
    let (len, at) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u16::from_be_bytes([b[0], b[1]]) as u64, 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        n => (n as u64, 2),
    };
    match opcode {
        0..=2 => {}
        8..=10 if !fin || len > 125 => return Err(PeerError::BadControl),
        8..=10 => {}
        other => return Err(PeerError::Opcode(other)),
    }
    if len > MAX_CLIENT_FRAME {
        return Err(PeerError::TooLarge(len));
    }
    let end = at + 4 + len as usize;
    let Some(mask) = buf.get(at..at + 4) else { return Ok(None) };
    let Some(body) = buf.get(at + 4..end) else { return Ok(None) };
    let payload = body.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    Ok(Some((ClientFrame { fin, opcode, payload }, end)))
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET /counters`.
    Counters,
    /// The upgrade of `GET /v1/stream`: the accept key and whether `tickgate.v1` was offered.
    Upgrade { accept: String, subprotocol: bool },
}

/// Parses an HTTP request head (up to, not including, the blank line).
fn parse_request(head: &[u8]) -> Result<Request, PeerError> {
    let head = std::str::from_utf8(head).map_err(|_| PeerError::BadRequest("request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (first.next().unwrap_or_default(), first.next().unwrap_or_default());
    if method != "GET" {
        return Err(PeerError::BadRequest("only GET"));
    }
    let path = target.split('?').next().unwrap_or_default();
    if path == "/counters" {
        return Ok(Request::Counters);
    }
    if path != "/v1/stream" {
        return Err(PeerError::NotFound);
    }
    let (mut key, mut upgrade, mut version, mut subprotocol) = (None, false, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
            "sec-websocket-version" => version = value == "13",
            "sec-websocket-key" => key = Some(value),
            "sec-websocket-protocol" => subprotocol |= value.split(',').any(|p| p.trim() == SUBPROTOCOL),
            _ => {}
        }
    }
    if !upgrade || !version {
        return Err(PeerError::BadRequest("a WebSocket upgrade (version 13) is expected"));
    }
    let key = key.ok_or(PeerError::BadRequest("no Sec-WebSocket-Key"))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    Ok(Request::Upgrade { accept, subprotocol })
}

/// An HTTP response that closes the connection.
fn http_response(status: u16, reason: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

struct Floor {
    opts: FloorOptions,
    ep: OwnedFd,
    listener: TcpListener,
    timer: OwnedFd,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    by_instrument: Vec<Vec<usize>>,
    sched: TickSchedule,
    end_ns: Option<u64>,
    frame: Vec<u8>,
    c: FloorCounters,
}

impl Floor {
    fn open(opts: FloorOptions) -> Result<Floor, FloorError> {
        if opts.symbols.is_empty() || opts.symbols.iter().any(|s| s == "*") {
            return Err(FloorError::Args("the floor server needs explicit --symbols (no '*')".into()));
        }
        if !opts.rate.is_finite() || opts.rate <= 0.0 {
            return Err(FloorError::Args("--rate must be positive".into()));
        }
        let listener = listen(opts.listen).map_err(|source| FloorError::Listen { addr: opts.listen, source })?;
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(sys("epoll_create1"))?;
        let timer = rustix::time::timerfd_create(TimerfdClockId::Realtime, TimerfdFlags::CLOEXEC)
            .map_err(sys("timerfd_create"))?;
        epoll::add(&ep, &listener, epoll::EventData::new_u64(LISTENER), epoll::EventFlags::IN)
            .map_err(sys("epoll_ctl"))?;
        epoll::add(&ep, &timer, epoll::EventData::new_u64(TIMER), epoll::EventFlags::IN).map_err(sys("epoll_ctl"))?;
        let t0 = now_ns() + 1_000_000;
        let sched = TickSchedule::new(t0, opts.rate, opts.feed_id, opts.symbols.len(), false);
        let end_ns = opts.duration.map(|d| t0 + d.as_nanos() as u64);
        let by_instrument = vec![Vec::new(); opts.symbols.len()];
        let floor = Floor {
            opts,
            ep,
            listener,
            timer,
            conns: Vec::new(),
            free: Vec::new(),
            by_instrument,
            sched,
            end_ns,
            frame: Vec::with_capacity(128),
            c: FloorCounters::default(),
        };
        floor.arm_timer()?;
        Ok(floor)
    }

    /// Sets the timer to the next tick's scheduled time (absolute, wall clock: the
    /// schedule's own clock). Re-arming also resets the timer's readiness.
    fn arm_timer(&self) -> Result<(), FloorError> {
        let due = self.sched.due_ns(self.sched.generated());
        let at = Timespec { tv_sec: (due / 1_000_000_000) as i64, tv_nsec: (due % 1_000_000_000) as i64 };
        let spec = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value: at };
        rustix::time::timerfd_settime(&self.timer, TimerfdTimerFlags::ABSTIME, &spec)
            .map_err(sys("timerfd_settime"))?;
        Ok(())
    }

    /// Runs until `stop` is set or the duration is over.
    fn run(&mut self, stop: &AtomicBool) -> Result<(), FloorError> {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(1024);
        let wait = Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
        let (mut last_progress, mut last) = (Instant::now(), self.c.clone());
        while !stop.load(Ordering::Relaxed) {
            events.clear();
            match epoll::wait(&self.ep, rustix::buffer::spare_capacity(&mut events), Some(&wait)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(sys("epoll_wait")(e)),
            }
            self.c.wakeups += 1;
            for ev in events.iter() {
                let (data, flags) = (ev.data.u64(), ev.flags);
                match data {
                    LISTENER => self.accept(),
                    TIMER => {
                        if !self.ticks() {
                            return Ok(());
                        }
                    }
                    d => self.on_conn((d - FIRST_CONN) as usize, flags),
                }
            }
            if self.opts.progress && last_progress.elapsed() >= Duration::from_secs(1) {
                let secs = last_progress.elapsed().as_secs_f64();
                eprintln!(
                    "floor live={} ticks/s={:.0} writes/s={:.0} eagain={} slow_closed={} behind_max={} us",
                    self.c.live,
                    (self.c.ticks - last.ticks) as f64 / secs,
                    (self.c.writes - last.writes) as f64 / secs,
                    self.c.eagain,
                    self.c.slow_closed,
                    self.c.max_behind_us,
                );
                last = self.c.clone();
                last_progress = Instant::now();
            }
        }
        Ok(())
    }

    /// Generates and writes the ticks that are due (at most [`MAX_FRAMES_PER_WAKE`]
    /// frames' worth; the timer fires again at once for the rest); false once the
    /// duration is over.
    fn ticks(&mut self) -> bool {
        let now = now_ns();
        let first = self.c.frames;
        while self.c.frames - first < MAX_FRAMES_PER_WAKE {
            let due = self.sched.due_ns(self.sched.generated());
            if due > now {
                break;
            }
            if self.end_ns.is_some_and(|e| due >= e) {
                return false;
            }
            self.c.max_behind_us = self.c.max_behind_us.max(now.saturating_sub(due) / 1000);
            let (k, record) = self.sched.next_tick();
            self.c.ticks += 1;
            self.frame.clear();
            frame_header(2, BATCH_HEADER_LEN + record.len(), &mut self.frame);
            let at = self.frame.len();
            self.frame.resize(at + BATCH_HEADER_LEN, 0);
            write_batch_header(&mut self.frame[at..], 1, now);
            self.frame.extend_from_slice(record.as_bytes());
            self.fan_out(k);
        }
        match self.arm_timer() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("floor: {e}");
                false
            }
        }
    }

    /// Writes the current frame to every subscriber of instrument `k`.
    fn fan_out(&mut self, k: usize) {
        let subs = std::mem::take(&mut self.by_instrument[k]);
        let mut gone = Vec::new();
        for &i in &subs {
            let Some(Some(conn)) = self.conns.get_mut(i) else { continue };
            self.c.frames += 1;
            if conn.pending_len() > 0 {
                self.c.queued_frames += 1;
            }
            if let Sent::Close { slow } = send(&self.ep, conn, &self.frame, &mut self.c, self.opts.max_pending) {
                gone.push((i, slow));
            }
        }
        self.by_instrument[k] = subs;
        for (i, slow) in gone {
            if slow {
                self.c.slow_closed += 1;
            }
            self.close(i);
        }
    }

    fn accept(&mut self) {
        loop {
            let sock = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("floor: accept: {e}");
                    return;
                }
            };
            if sock.set_nonblocking(true).is_err() || sock.set_nodelay(true).is_err() {
                continue;
            }
            let i = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            let data = i as u64 + FIRST_CONN;
            if epoll::add(&self.ep, &sock, epoll::EventData::new_u64(data), epoll::EventFlags::IN).is_err() {
                self.free.push(i);
                continue;
            }
            self.c.accepted += 1;
            self.conns[i] = Some(Conn {
                sock,
                data,
                phase: Phase::Http,
                inbuf: Vec::new(),
                pending: Vec::new(),
                sent: 0,
                out_armed: false,
                subs: Vec::new(),
            });
        }
    }

    fn on_conn(&mut self, i: usize, flags: epoll::EventFlags) {
        if flags.contains(epoll::EventFlags::OUT) && !self.flush(i) {
            self.close(i);
            return;
        }
        if flags.intersects(epoll::EventFlags::IN | epoll::EventFlags::HUP | epoll::EventFlags::ERR) {
            self.read(i);
        }
    }

    /// Writes what is pending (one write); false when the connection must be closed.
    fn flush(&mut self, i: usize) -> bool {
        let Some(Some(conn)) = self.conns.get_mut(i) else { return true };
        if conn.pending_len() == 0 {
            return matches!(arm_out(&self.ep, conn, false), Sent::Ok);
        }
        self.c.writes += 1;
        match conn.sock.write(&conn.pending[conn.sent..]) {
            Ok(n) => {
                self.c.bytes += n as u64;
                conn.sent += n;
                if conn.pending_len() > 0 {
                    self.c.partial_writes += 1;
                    return true;
                }
                conn.pending.clear();
                conn.sent = 0;
                matches!(arm_out(&self.ep, conn, false), Sent::Ok)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.c.eagain += 1;
                true
            }
            Err(e) => e.kind() == ErrorKind::Interrupted,
        }
    }

    /// Reads what the peer sent and acts on it.
    fn read(&mut self, i: usize) {
        let mut buf = [0u8; 4096];
        loop {
            let Some(Some(conn)) = self.conns.get_mut(i) else { return };
            match conn.sock.read(&mut buf) {
                Ok(0) => return self.close(i),
                Ok(n) => conn.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.close(i),
            }
            if conn.inbuf.len() > MAX_REQUEST + MAX_CLIENT_FRAME as usize {
                break;
            }
        }
        let Some(Some(conn)) = self.conns.get_mut(i) else { return };
        let result = match conn.phase {
            Phase::Http => self.on_http(i),
            Phase::Open => self.on_frames(i),
        };
        if let Err(e) = result {
            self.refuse(i, &e);
        }
    }

    /// Answers a complete request head: the upgrade (then `welcome`) or the counters.
    fn on_http(&mut self, i: usize) -> Result<(), PeerError> {
        let Some(Some(conn)) = self.conns.get_mut(i) else { return Ok(()) };
        let Some(end) = conn.inbuf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return if conn.inbuf.len() > MAX_REQUEST { Err(PeerError::RequestTooLarge) } else { Ok(()) };
        };
        let request = parse_request(&conn.inbuf[..end])?;
        conn.inbuf.drain(..end + 4);
        match request {
            Request::Counters => {
                let body = serde_json::to_string(&self.c.snapshot()).unwrap_or_default();
                let reply = http_response(200, "OK", "application/json", &body);
                let _ = send(&self.ep, conn, &reply, &mut self.c, self.opts.max_pending);
                self.close(i);
                Ok(())
            }
            Request::Upgrade { accept, subprotocol } => {
                let protocol =
                    if subprotocol { format!("Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n") } else { String::new() };
                let mut reply = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
                )
                .into_bytes();
                let welcome = ServerMsg::Welcome {
                    protocol: 1,
                    session: format!("floor-{i}"),
                    sub: "floor".into(),
                    exp: now_ns() / 1_000_000_000 + 86_400,
                    heartbeat_ms: 0,
                    feeds: vec![FeedInfo { name: self.opts.feed.clone(), id: self.opts.feed_id, epoch: EPOCH }],
                };
                reply.extend_from_slice(&server_frame(1, welcome.to_json().as_bytes()));
                conn.phase = Phase::Open;
                self.c.upgraded += 1;
                self.c.live += 1;
                if let Sent::Close { .. } = send(&self.ep, conn, &reply, &mut self.c, self.opts.max_pending) {
                    self.close(i);
                    return Ok(());
                }
                self.on_frames(i)
            }
        }
    }

    /// Handles the complete client frames in the input buffer.
    fn on_frames(&mut self, i: usize) -> Result<(), PeerError> {
        loop {
            let Some(Some(conn)) = self.conns.get_mut(i) else { return Ok(()) };
            let Some((frame, used)) = parse_client_frame(&conn.inbuf)? else { return Ok(()) };
            conn.inbuf.drain(..used);
            let reply = match frame.opcode {
                1 if frame.fin => match std::str::from_utf8(&frame.payload) {
                    Ok(text) => self.on_control(i, text).map(|m| server_frame(1, m.to_json().as_bytes())),
                    Err(_) => return Err(PeerError::Utf8),
                },
                8 => {
                    let code = frame.payload.get(..2).map(<[u8]>::to_vec).unwrap_or_default();
                    let Some(Some(conn)) = self.conns.get_mut(i) else { return Ok(()) };
                    let _ = send(&self.ep, conn, &server_frame(8, &code), &mut self.c, self.opts.max_pending);
                    self.close(i);
                    return Ok(());
                }
                9 => Some(server_frame(10, &frame.payload)),
                // Binary, continuation, fragmented text and pongs are read and discarded.
                _ => None,
            };
            if let Some(reply) = reply {
                let Some(Some(conn)) = self.conns.get_mut(i) else { return Ok(()) };
                if let Sent::Close { .. } = send(&self.ep, conn, &reply, &mut self.c, self.opts.max_pending) {
                    self.close(i);
                    return Ok(());
                }
            }
        }
    }

    /// The answer to a control message, if it gets one.
    fn on_control(&mut self, i: usize, text: &str) -> Option<ServerMsg> {
        let error = |id, code, message: String| Some(ServerMsg::Error { id, code, message });
        match parse_client_msg(text) {
            Err(e) => error(e.id, ErrorCode::BadRequest, e.message),
            Ok(ClientMsg::Ping { id }) => Some(ServerMsg::Pong { id, ts: now_ns() }),
            Ok(ClientMsg::Subscribe { id, feed, symbols, .. }) => {
                if feed != self.opts.feed {
                    return error(id, ErrorCode::UnknownFeed, format!("no feed {feed:?}"));
                }
                if symbols.is_empty() {
                    return error(id, ErrorCode::BadRequest, "no symbols".into());
                }
                let mut ks = Vec::new();
                for s in &symbols {
                    if s == "*" {
                        ks.extend(0..self.opts.symbols.len());
                    } else if let Some(k) = self.opts.symbols.iter().position(|x| x == s) {
                        ks.push(k);
                    } else {
                        return error(id, ErrorCode::UnknownSymbol, format!("no symbol {s:?} in {feed}"));
                    }
                }
                ks.sort_unstable();
                ks.dedup();
                let Some(Some(conn)) = self.conns.get_mut(i) else { return None };
                let mut instruments = Vec::with_capacity(ks.len());
                for k in ks {
                    if !conn.subs.contains(&k) {
                        conn.subs.push(k);
                        self.by_instrument[k].push(i);
                    }
                    instruments.push(InstrumentInfo {
                        symbol: self.opts.symbols[k].clone(),
                        id: k as u32 + 1,
                        seq: self.sched.last_seq(k),
                    });
                }
                Some(ServerMsg::Subscribed { id, feed, epoch: EPOCH, instruments, max_rate: None })
            }
            Ok(_) => None,
        }
    }

    /// Refuses a request (HTTP status) or closes a WebSocket (close code), then the socket.
    fn refuse(&mut self, i: usize, e: &PeerError) {
        self.c.refused += 1;
        let Some(Some(conn)) = self.conns.get_mut(i) else { return };
        let reply = match conn.phase {
            Phase::Http => http_response(e.code(), "Refused", "text/plain", &e.to_string()),
            Phase::Open => {
                let mut payload = e.code().to_be_bytes().to_vec();
                payload.extend_from_slice(e.to_string().as_bytes());
                payload.truncate(125);
                server_frame(8, &payload)
            }
        };
        let _ = send(&self.ep, conn, &reply, &mut self.c, self.opts.max_pending);
        self.close(i);
    }

    fn close(&mut self, i: usize) {
        let Some(conn) = self.conns.get_mut(i).and_then(Option::take) else { return };
        for &k in &conn.subs {
            if let Some(pos) = self.by_instrument[k].iter().position(|&x| x == i) {
                self.by_instrument[k].swap_remove(pos);
            }
        }
        if conn.phase == Phase::Open {
            self.c.live = self.c.live.saturating_sub(1);
        }
        let _ = epoll::delete(&self.ep, &conn.sock);
        self.free.push(i);
    }
}

/// A non-blocking listener with a long accept queue (a thousand subscribers connect at once).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Runs the floor server on this thread until `stop` is set or the duration is over.
pub fn run(opts: FloorOptions, stop: Arc<AtomicBool>) -> Result<FloorSummary, FloorError> {
    let started = Instant::now();
    let mut floor = Floor::open(opts)?;
    let listen = floor.listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    if floor.opts.progress {
        eprintln!(
            "floor: listening on {listen}, {} ticks/s over {} symbols",
            floor.opts.rate,
            floor.opts.symbols.len()
        );
    }
    floor.run(&stop)?;
    Ok(FloorSummary {
        role: "floor".into(),
        listen,
        seconds: started.elapsed().as_secs_f64(),
        target_rate: floor.opts.rate,
        counters: floor.c.snapshot(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn client_frames_are_unmasked_and_incomplete_ones_wait() {
        let f = masked(1, true, br#"{"op":"ping"}"#);
        for cut in 0..f.len() {
            assert_eq!(parse_client_frame(&f[..cut]), Ok(None), "cut at {cut}");
        }
        let (frame, used) = parse_client_frame(&f).expect("valid").expect("complete");
        assert_eq!((frame.fin, frame.opcode, used), (true, 1, f.len()));
        assert_eq!(frame.payload, br#"{"op":"ping"}"#);
        let long = vec![7u8; 300];
        let (frame, _) = parse_client_frame(&masked(2, true, &long)).expect("valid").expect("complete");
        assert_eq!(frame.payload, long);
    }

    #[test]
    fn bad_client_frames_are_typed_errors() {
        assert_eq!(parse_client_frame(&[0x81, 0x01, b'x']), Err(PeerError::Unmasked));
        assert_eq!(parse_client_frame(&[0xc1, 0x80, 0, 0, 0, 0]), Err(PeerError::Reserved));
        assert_eq!(parse_client_frame(&[0x83, 0x80, 0, 0, 0, 0]), Err(PeerError::Opcode(3)));
        assert_eq!(parse_client_frame(&masked(9, false, b"")), Err(PeerError::BadControl));
        assert_eq!(parse_client_frame(&masked(9, true, &[0; 126])), Err(PeerError::BadControl));
        let mut huge = vec![0x82, 0xff];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(parse_client_frame(&huge), Err(PeerError::TooLarge(1 << 40)));
    }

    #[test]
    fn requests_upgrade_count_or_are_refused() {
        // The RFC 6455 example key.
        let up = "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Protocol: tickgate.v1";
        assert_eq!(
            parse_request(up.as_bytes()),
            Ok(Request::Upgrade { accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into(), subprotocol: true })
        );
        assert_eq!(parse_request(b"GET /counters HTTP/1.1\r\nHost: x"), Ok(Request::Counters));
        assert_eq!(parse_request(b"GET /nope HTTP/1.1"), Err(PeerError::NotFound));
        assert!(matches!(parse_request(b"POST /v1/stream HTTP/1.1"), Err(PeerError::BadRequest(_))));
        assert!(matches!(
            parse_request(b"GET /v1/stream HTTP/1.1\r\nUpgrade: websocket"),
            Err(PeerError::BadRequest(_))
        ));
        assert!(matches!(parse_request(&[0xff, 0xfe]), Err(PeerError::BadRequest(_))));
    }

    #[test]
    fn server_frames_carry_their_length() {
        assert_eq!(server_frame(2, &[9; 3]), vec![0x82, 3, 9, 9, 9]);
        let f = server_frame(1, &[0; 200]);
        assert_eq!(&f[..4], &[0x81, 126, 0, 200]);
        assert_eq!(f.len(), 204);
    }
}
