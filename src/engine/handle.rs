//! The engine as the rest of the server sees it: [`Engine`] (the shard inboxes and control
//! channels, before the threads run), [`EngineHandle`] (the running shard threads, owned by
//! whoever started them) and [`EngineCtl`] (a cheap, non-owning way to ask the shards for a
//! revocation or the admin connection list).
//!
//! Why the control side is split from the owning side: the shard threads run the server's
//! socket-serving function, which holds the server's shared state. If that state held the
//! shards' control senders, each shard would keep its own control channel open, and a
//! dropped `Server` would leave every shard thread running forever (the old reference
//! cycle: thread → serve fn → `AppState` → `Sender<ShardCtl>` → thread). So only the
//! [`EngineHandle`] holds the senders; [`EngineCtl`] holds weak ones, and dropping the
//! handle closes every control channel, which ends each shard's loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::core::{ConnInfo, CoreLimits};
use super::shard::{self, ServeFn, ShardCtl, ShardSpec};
use super::stats::{GapReason, RefreshResult, ResumeResult};
use super::ShardInbox;
use crate::feeds::Catalog;
use crate::metrics::Metrics;

/// Capacity of a shard's control channel (revocations, listings, shutdown).
const CTL_CAPACITY: usize = 64;
/// Capacity of a shard's queue of accepted sockets waiting to be registered.
const SOCKET_QUEUE: usize = 4096;
/// How long a shard may take to answer a revocation or a listing.
const CTL_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// An accepted socket on its way to a shard, with its peer address.
pub(crate) type AcceptedSocket = (std::net::TcpStream, SocketAddr);

/// The shards before their threads start: their inboxes (which [`super::Ingest`] and the
/// accept loop's placement need) and their control channels.
#[derive(Debug)]
pub(crate) struct Engine {
    inboxes: Arc<[Arc<ShardInbox>]>,
    ctl: Vec<mpsc::Sender<ShardCtl>>,
    ctl_rx: Vec<mpsc::Receiver<ShardCtl>>,
}

impl Engine {
    /// `shards` inboxes of `queue_capacity` ticks each, and their control channels.
    pub(crate) fn new(shards: usize, queue_capacity: usize) -> Engine {
        let inboxes: Arc<[Arc<ShardInbox>]> = (0..shards).map(|_| Arc::new(ShardInbox::new(queue_capacity))).collect();
        let (ctl, ctl_rx) = (0..shards).map(|_| mpsc::channel(CTL_CAPACITY)).unzip();
        Engine { inboxes, ctl, ctl_rx }
    }

    /// The shards' cross-thread sides.
    pub(crate) fn inboxes(&self) -> &Arc<[Arc<ShardInbox>]> {
        &self.inboxes
    }

    /// A non-owning control handle (see the module docs for why it must not own).
    pub(crate) fn control(&self) -> EngineCtl {
        EngineCtl { ctl: self.ctl.iter().map(mpsc::Sender::downgrade).collect() }
    }

    /// Starts one thread per shard, each serving the sockets it is given with `serve`.
    /// Also primes the engine's labelled series (`tickgate_gaps_sent_total{reason}`,
    /// `tickgate_resumes_total{result}`, `tickgate_token_refreshes_total{result}`), so they
    /// are exported at zero before the first event.
    pub(crate) fn start(
        self,
        catalog: &Arc<Catalog>,
        limits: &CoreLimits,
        metrics: &Metrics,
        serve: &ServeFn,
    ) -> std::io::Result<EngineHandle> {
        for r in GapReason::ALL {
            metrics.gaps_sent.with_label_values(&[r.as_str()]);
        }
        for r in ResumeResult::ALL {
            metrics.resumes.with_label_values(&[r.as_str()]);
        }
        for r in RefreshResult::ALL {
            metrics.token_refreshes.with_label_values(&[r.as_str()]);
        }
        let Engine { inboxes, ctl, ctl_rx } = self;
        let mut handle = EngineHandle { inboxes: inboxes.clone(), ctl, sockets: Vec::new(), threads: Vec::new() };
        for ((id, inbox), ctl_rx) in inboxes.iter().enumerate().zip(ctl_rx) {
            let (s_tx, s_rx) = mpsc::channel(SOCKET_QUEUE);
            handle.sockets.push(s_tx);
            // On an error the handle is dropped, which stops the threads already started.
            let thread = shard::spawn(ShardSpec {
                id,
                inbox: inbox.clone(),
                all: inboxes.clone(),
                ctl: ctl_rx,
                sockets: s_rx,
                catalog: catalog.clone(),
                limits: limits.clone(),
                metrics: metrics.clone(),
                serve: serve.clone(),
            })?;
            handle.threads.push(thread);
        }
        Ok(handle)
    }
}

/// The running shard threads. Dropping it closes every shard's control channel, which
/// stops the shard threads (without waiting for them). The graceful way is in phases,
/// each its own call because the server does its own steps between them (`shutdown.rs`):
/// [`EngineHandle::dispatched`] (every tick taken in is out), then
/// [`EngineHandle::notify_shutdown`] (clients are told), then, once the connections are
/// gone, [`EngineHandle::stop`].
#[derive(Debug)]
pub(crate) struct EngineHandle {
    inboxes: Arc<[Arc<ShardInbox>]>,
    ctl: Vec<mpsc::Sender<ShardCtl>>,
    sockets: Vec<mpsc::Sender<AcceptedSocket>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EngineHandle {
    /// Where the accept loop hands each shard its sockets (index = shard number).
    pub(crate) fn socket_senders(&self) -> Vec<mpsc::Sender<AcceptedSocket>> {
        self.sockets.clone()
    }

    /// Waits until every tick already queued has been dispatched, up to `deadline`.
    /// Returns false when the deadline passed first.
    pub(crate) async fn dispatched(&self, deadline: tokio::time::Instant) -> bool {
        // Polled, not signalled: the shards would otherwise pay for a notification per
        // cycle, on the hot path, for the benefit of one wait at shutdown.
        tokio::time::timeout_at(deadline, async {
            while self.inboxes.iter().any(|s| s.is_alive() && !s.queue.is_empty()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .is_ok()
    }

    /// Every connection is sent `shutdown` (with a reconnect delay jittered up to
    /// `reconnect_after_max_ms`) and close 1001; from here a shard refuses new streams.
    pub(crate) async fn notify_shutdown(&self, reconnect_after_max_ms: u64) {
        for ctl in &self.ctl {
            let _ = ctl.send(ShardCtl::Shutdown { reconnect_after_max_ms }).await;
        }
    }

    /// Starts the lame-duck phase on every shard: each connection is sent `shutdown` and
    /// close 1001 at its own moment within `window_ms` (`ShardCore::lame_duck`), counted in
    /// `notified`; from here a shard refuses new streams. [`EngineHandle::notify_shutdown`]
    /// tells the rest when the phase ends.
    pub(crate) async fn lame_duck(
        &self,
        window_ms: u64,
        reconnect_after_max_ms: u64,
        notified: &Arc<std::sync::atomic::AtomicUsize>,
    ) {
        for ctl in &self.ctl {
            let notified = notified.clone();
            let _ = ctl.send(ShardCtl::LameDuck { window_ms, reconnect_after_max_ms, notified }).await;
        }
    }

    /// Tells each shard to stop and joins its thread.
    pub(crate) async fn stop(mut self) {
        for ctl in &self.ctl {
            let _ = ctl.send(ShardCtl::Stop).await;
        }
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }

    /// Takes the thread handles (tests join them to check that a drop stops the shards).
    #[cfg(test)]
    pub(crate) fn take_threads(&mut self) -> Vec<std::thread::JoinHandle<()>> {
        std::mem::take(&mut self.threads)
    }
}

/// A non-owning handle on the shards' control channels, for the admin endpoints. Once the
/// [`EngineHandle`] is gone its requests reach nobody and answer as an empty engine would.
#[derive(Debug, Clone)]
pub struct EngineCtl {
    ctl: Vec<mpsc::WeakSender<ShardCtl>>,
}

impl EngineCtl {
    /// Sends one request to every running shard and collects the replies (each within
    /// [`CTL_REPLY_TIMEOUT`]; a shard that does not answer in time counts as no answer).
    async fn ask_all<T>(&self, mut make: impl FnMut(tokio::sync::oneshot::Sender<T>) -> ShardCtl) -> Vec<T> {
        let mut replies = Vec::new();
        for weak in &self.ctl {
            // Upgraded for the send only: a strong sender kept here would keep the shard alive.
            let Some(ctl) = weak.upgrade() else { continue };
            let (tx, rx) = tokio::sync::oneshot::channel();
            if ctl.send(make(tx)).await.is_ok() {
                replies.push(rx);
            }
        }
        let mut out = Vec::with_capacity(replies.len());
        for rx in replies {
            if let Ok(Ok(v)) = tokio::time::timeout(CTL_REPLY_TIMEOUT, rx).await {
                out.push(v);
            }
        }
        out
    }

    /// Closes the stream connections of `sub` (when given) or carrying `jti` (when given)
    /// with 4003 on every shard; returns how many were closed.
    pub async fn revoke(&self, sub: Option<&str>, jti: Option<&str>) -> usize {
        let (sub, jti) = (sub.map(str::to_owned), jti.map(str::to_owned));
        self.ask_all(|reply| ShardCtl::Revoke { sub: sub.clone(), jti: jti.clone(), reply }).await.into_iter().sum()
    }

    /// Every stream connection of every shard, for the admin view (unordered).
    pub async fn connections(&self) -> Vec<ConnInfo> {
        self.ask_all(|reply| ShardCtl::ListConnections { reply }).await.into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testkit;

    /// Dropping the handle stops the shard threads even while the serving function (as the
    /// server's does) holds a control handle: the shards' control channels close with it.
    #[test]
    fn dropping_the_handle_stops_the_shards() {
        let catalog = testkit::catalog(&["A"]);
        let engine = Engine::new(2, 16);
        let ctl = engine.control();
        let serve: ServeFn = Arc::new(move |_s, _p| {
            let _held = ctl.clone();
            Box::pin(async move {
                drop(_held);
            })
        });
        let mut handle = engine.start(&catalog, &testkit::limits(), &Metrics::new(), &serve).expect("start");
        let threads = handle.take_threads();
        drop(handle);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for t in threads {
                let _ = t.join();
            }
            let _ = done_tx.send(());
        });
        assert!(done_rx.recv_timeout(Duration::from_secs(30)).is_ok(), "shard threads still running after the drop");
    }
}
