//! Protection of the listeners themselves: the per-address cap on connections that have
//! not completed a request, the descriptor reserve that keeps the admin listener
//! answerable while the public one is flooded, and the accept-error back-off.
//!
//! A socket that has sent nothing (or half a request) costs a descriptor until its
//! deadline; without these bounds a few hundred such sockets from one address exhaust the
//! process's descriptors, and then every listener (admin included) fails with EMFILE.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::Metrics;

/// Counts, per source address, the connections of one listener that have not yet
/// completed a request (`limits.max_pending_per_ip`).
#[derive(Debug)]
pub struct PendingTable {
    cap: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PendingTable {
    /// A table refusing the `cap + 1`-th pending connection of an address.
    pub fn new(cap: usize) -> PendingTable {
        PendingTable { cap, counts: Mutex::new(HashMap::new()) }
    }

    /// Takes a pending slot for `ip`; `None` when the address is at the cap.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PendingGuard> {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(PendingGuard { table: self.clone(), ip, armed: true })
    }

    /// Takes over a slot taken with [`try_acquire`](Self::try_acquire) and then
    /// [disarmed](PendingGuard::disarm) on another thread (the accept loop hands sockets to
    /// the shards over a channel that carries only the socket).
    pub(crate) fn adopt(self: &Arc<Self>, ip: IpAddr) -> PendingGuard {
        PendingGuard { table: self.clone(), ip, armed: true }
    }

    /// Pending connections of `ip` now.
    pub fn pending(&self, ip: IpAddr) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).get(&ip).copied().unwrap_or(0)
    }

    fn release(&self, ip: IpAddr) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// One pending connection; released when dropped (the first request was answered, or
/// the connection ended).
#[derive(Debug)]
pub struct PendingGuard {
    table: Arc<PendingTable>,
    ip: IpAddr,
    armed: bool,
}

impl PendingGuard {
    /// Keeps the slot taken without releasing it: its new owner [adopts](PendingTable::adopt) it.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if self.armed {
            self.table.release(self.ip);
        }
    }
}

/// Listener-level state shared by the accept loops and the HTTP connections.
#[derive(Debug)]
pub struct Edge {
    /// Pending connections of the public listener, per address.
    pub public_pending: Arc<PendingTable>,
    /// Pending connections of the admin listener, per address (apart, so a flood of the
    /// public listener never uses up the admin's share).
    pub admin_pending: Arc<PendingTable>,
    /// Public sockets being served as HTTP (not yet upgraded or closed).
    pub public_http: AtomicUsize,
    /// Signalled when [`Edge::public_http`] drops to zero (for shutdown's wait).
    http_idle: tokio::sync::Notify,
    /// Set when the shards stop at the end of shutdown: the accept loop then answers new
    /// sockets 503 itself, so the listener keeps answering until the process exits.
    pub shards_stopped: AtomicBool,
    /// The public socket count at which new public sockets are refused (descriptor soft
    /// limit minus `limits.fd_reserve` minus the descriptors open at start); `None`: no cap.
    fd_cap: Option<usize>,
}

impl Edge {
    /// Builds the edge state; reads the descriptor limit and the descriptors open now.
    pub fn new(max_pending_per_ip: usize, fd_reserve: usize) -> Edge {
        let fd_cap = match (fd_reserve, soft_fd_limit()) {
            (0, _) | (_, None) => None,
            (r, Some(soft)) => Some(soft.saturating_sub(r).saturating_sub(open_fds().unwrap_or(0))),
        };
        if let Some(cap) = fd_cap {
            tracing::debug!(cap, "public sockets are refused past this count (descriptor reserve)");
        }
        Edge {
            public_pending: Arc::new(PendingTable::new(max_pending_per_ip)),
            admin_pending: Arc::new(PendingTable::new(max_pending_per_ip)),
            public_http: AtomicUsize::new(0),
            http_idle: tokio::sync::Notify::new(),
            shards_stopped: AtomicBool::new(false),
            fd_cap,
        }
    }

    /// Whether a new public socket would eat into the descriptors kept for the admin
    /// listener. `others` are the public sockets counted elsewhere (streams, publishers).
    pub fn over_fd_reserve(&self, others: usize) -> bool {
        self.fd_cap.is_some_and(|cap| self.public_http.load(Ordering::Relaxed) + others >= cap)
    }

    /// One public socket stopped being served as HTTP (upgraded, closed, or not handed
    /// over): the count of [`Edge::public_http`] goes down, and a wait in
    /// [`Edge::http_idle`] is woken when it reaches zero.
    pub(crate) fn http_ended(&self) {
        if self.public_http.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.http_idle.notify_waiters();
        }
    }

    /// Waits until no public socket is being served as HTTP.
    pub(crate) async fn http_idle(&self) {
        loop {
            // Registered before the count is read, so a drop to zero in between is not missed.
            let idle = self.http_idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.public_http.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Decrements [`Edge::public_http`] when the HTTP part of a public connection ends.
#[derive(Debug)]
pub(crate) struct HttpSocketGuard(pub(crate) Arc<super::AppState>);

impl Drop for HttpSocketGuard {
    fn drop(&mut self) {
        self.0.edge.http_ended();
    }
}

/// The soft `RLIMIT_NOFILE` (Linux: from `/proc/self/limits`; elsewhere unknown).
fn soft_fd_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Descriptors open now (Linux).
fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// The `kind` label of `tickgate_accept_errors_total` for an accept error, and whether it
/// is a resource shortage that calls for backing off.
pub(crate) fn accept_error_kind(e: &std::io::Error) -> (&'static str, bool) {
    // The numbers are the same on Linux and the BSDs/macOS for these three.
    match e.raw_os_error() {
        Some(24) => ("emfile", true),
        Some(23) => ("enfile", true),
        Some(12) => ("enomem", true),
        _ => match e.kind() {
            std::io::ErrorKind::OutOfMemory => ("enomem", true),
            std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset => ("aborted", false),
            // ENOBUFS and the rest: unknown, so back off too rather than spin.
            _ => ("other", true),
        },
    }
}

/// The accept loops' reaction to errors: counted, logged at most once per second with the
/// number of errors since the last line, and a sleep that doubles from 10 ms up to 1 s while
/// errors continue (reset by the next good accept).
#[derive(Debug)]
pub(crate) struct AcceptBackoff {
    listener: &'static str,
    metrics: Metrics,
    delay: Duration,
    last_log: Option<tokio::time::Instant>,
    unlogged: u64,
}

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    /// A back-off for the listener named `listener` (`public`, `admin`).
    pub(crate) fn new(listener: &'static str, metrics: Metrics) -> AcceptBackoff {
        AcceptBackoff { listener, metrics, delay: BACKOFF_MIN, last_log: None, unlogged: 0 }
    }

    /// A successful accept: the next error starts from the shortest delay.
    pub(crate) fn ok(&mut self) {
        self.delay = BACKOFF_MIN;
    }

    /// Counts and (rate-limited) logs an accept error, then sleeps when it is a resource
    /// shortage (the listener's backlog waits meanwhile; nothing is lost).
    pub(crate) async fn error(&mut self, e: &std::io::Error) {
        let (kind, back_off) = accept_error_kind(e);
        self.metrics.accept_errors.with_label_values(&[self.listener, kind]).inc();
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self.last_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            tracing::warn!(listener = self.listener, kind, errors = self.unlogged, error = %e,
                "accept failed (logged at most once per second)");
            self.last_log = Some(now);
            self.unlogged = 0;
        }
        if back_off {
            tokio::time::sleep(self.delay).await;
            self.delay = (self.delay * 2).min(BACKOFF_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_slots_are_capped_per_address_and_released() {
        let t = Arc::new(PendingTable::new(2));
        let a = IpAddr::from([127, 0, 0, 1]);
        let b = IpAddr::from([127, 0, 0, 2]);
        let g1 = t.try_acquire(a);
        let g2 = t.try_acquire(a);
        assert!(g1.is_some() && g2.is_some());
        assert!(t.try_acquire(a).is_none());
        assert!(t.try_acquire(b).is_some());
        drop(g1);
        assert_eq!(t.pending(a), 1);
        assert!(t.try_acquire(a).is_some());
    }

    #[test]
    fn emfile_is_a_resource_error() {
        assert_eq!(accept_error_kind(&std::io::Error::from_raw_os_error(24)), ("emfile", true));
        assert_eq!(accept_error_kind(&std::io::Error::from_raw_os_error(23)), ("enfile", true));
        let aborted = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        assert_eq!(accept_error_kind(&aborted), ("aborted", false));
    }
}
