//! How a server stops: [`Shutdown::run`] takes it through its phases in order,
//!
//! 1. [`Shutdown::stop_accepting`]: new streams and publishers are refused (503), `/readyz` says 503;
//!    then, with `server.lame_duck_ms` > 0, [`Shutdown::lame_duck`]: the feeds keep streaming
//!    while each connection gets `shutdown` and close 1001 at its own moment of that window;
//! 2. [`Shutdown::stop_sources`]: feed tasks and publisher connections stop taking in ticks;
//! 3. [`Shutdown::deliver`]: the shards dispatch what the sources took in;
//! 4. [`Shutdown::notify_clients`]: every stream not told yet gets `shutdown` (jittered reconnect hint) and close 1001;
//! 5. [`Shutdown::drain`]: connections are given `server.drain_ms` to close;
//! 6. [`Shutdown::stop_shards`]: the accept loop takes over the 503 answers, HTTP connections close, the shard threads stop;
//! 7. [`Shutdown::stop_listeners`]: the listeners and background tasks stop, last,
//!
//! and [`Stops`] are its cancellation tokens: one per group of tasks a phase stops, all
//! children of one root that a dropped `Server` cancels, so that dropping a `Server`
//! without `shutdown` stops everything too (the shards stop when their
//! [`EngineHandle`] is dropped).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::engine::EngineHandle;
use crate::server::AppState;

/// How long the sources have to stop and the shards to dispatch what they took in
/// ([`Shutdown::stop_sources`] and [`Shutdown::deliver`] together).
const DELIVER_WITHIN: Duration = Duration::from_secs(1);
/// How long sockets already handed to a shard have to get their answer there once the
/// accept loop answers new ones itself ([`Shutdown::stop_shards`]).
const HTTP_ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// How long the listeners and background tasks have to end ([`Shutdown::stop_listeners`]).
const LISTENERS_WITHIN: Duration = Duration::from_secs(2);

/// The cancellation tokens the phases fire, one per group of tasks. Each is a child of
/// one root, cancelled when the [`Shutdown`] holding it is dropped.
#[derive(Debug)]
pub(crate) struct Stops {
    root: CancellationToken,
    /// The sources: feed tasks and publisher connections ([`Shutdown::stop_sources`]).
    pub(crate) sources: CancellationToken,
    /// HTTP connections (not yet upgraded, or keep-alive) finish ([`Shutdown::stop_shards`]).
    pub(crate) http: CancellationToken,
    /// The public accept loop, the admin listener and the background tasks (key rotation,
    /// JWKS refresh) ([`Shutdown::stop_listeners`]).
    pub(crate) listeners: CancellationToken,
}

impl Stops {
    /// Fresh tokens, none cancelled.
    pub(crate) fn new() -> Stops {
        let root = CancellationToken::new();
        Stops { sources: root.child_token(), http: root.child_token(), listeners: root.child_token(), root }
    }
}

/// What a graceful shutdown acts on, and the phases it goes through. Dropped without
/// [`Shutdown::run`] (a `Server` dropped without `shutdown`), it stops everything at once:
/// every token of its [`Stops`] is cancelled and the shard threads are told to stop.
#[derive(Debug)]
pub(crate) struct Shutdown {
    app: Arc<AppState>,
    engine: EngineHandle,
    /// The listeners' tasks and the background tasks, stopped by `Stops::listeners`.
    background: TaskTracker,
    listeners: CancellationToken,
    /// Cancels the root of the [`Stops`] when dropped.
    _stop_all: DropGuard,
}

impl Shutdown {
    /// The shutdown of the server whose shared state is `app`, shards `engine`, listener
    /// and background tasks `background`, cancelled through `stops`.
    pub(crate) fn new(app: Arc<AppState>, engine: EngineHandle, background: TaskTracker, stops: Stops) -> Shutdown {
        Shutdown { app, engine, background, listeners: stops.listeners, _stop_all: stops.root.drop_guard() }
    }

    /// The shard threads (tests check that dropping a server stops them).
    #[cfg(test)]
    pub(crate) fn engine_mut(&mut self) -> &mut EngineHandle {
        &mut self.engine
    }

    /// Runs every phase, in order. `hurry` (a second SIGTERM) cuts the lame-duck phase
    /// short; the phases after it run as always.
    pub(crate) async fn run(self, hurry: impl Future<Output = ()>) {
        self.stop_accepting();
        self.lame_duck(hurry).await;
        let deliver_by = tokio::time::Instant::now() + DELIVER_WITHIN;
        let sources_stopped = self.stop_sources(deliver_by).await;
        self.deliver(sources_stopped, deliver_by).await;
        self.notify_clients().await;
        self.drain().await;
        let Shutdown { app, engine, background, listeners, _stop_all } = self;
        stop_shards(&app, engine).await;
        stop_listeners(&background, &listeners).await;
        tracing::info!("tickgate stopped");
    }

    /// Phase 1, first so that nothing new starts while the rest winds down: new streams and
    /// publishers get 503 `unavailable` and `/readyz` 503 (a load balancer takes the host
    /// out). The listeners themselves keep accepting and answering (see
    /// [`Shutdown::stop_listeners`]).
    fn stop_accepting(&self) {
        self.app.draining.store(true, Ordering::Release);
    }

    /// Phase 1b, between "not ready" and the stop of the sources, when
    /// `server.lame_duck_ms` > 0: a load balancer takes the node out (its health checks
    /// see `/readyz` 503) while the node keeps streaming, and each shard sends `shutdown` +
    /// close 1001 to each of its connections at its own moment of the window
    /// (`ShardCore::lame_duck`, stratified over the window on the shard's timer wheel), so
    /// the clients arrive at the other nodes at an even rate instead of all in the same
    /// second. A client told here gets every record up to its `shutdown`, nothing after;
    /// it resumes by seq elsewhere. The clients whose moment has not come when the window
    /// ends (a timer rounds up to the wheel's tick, or `hurry` resolved) are told by
    /// [`Shutdown::notify_clients`], after every tick taken in, as without a lame duck.
    ///
    /// Bounded by the window: the phase waits for nothing else (a client that does not
    /// take its close is dropped by [`Shutdown::drain`]'s bound as always), so a shutdown
    /// takes at most `lame_duck_ms` longer than without one. `tickgate_lame_duck` is 1
    /// during the phase.
    async fn lame_duck(&self, hurry: impl Future<Output = ()>) {
        let server = &self.app.config.server;
        if server.lame_duck_ms == 0 {
            return;
        }
        let window = Duration::from_millis(server.lame_duck_ms);
        let started = tokio::time::Instant::now();
        let notified = Arc::new(AtomicUsize::new(0));
        self.app.metrics.lame_duck.set(1);
        tracing::info!(
            lame_duck_ms = server.lame_duck_ms,
            connections = self.app.open_connections.load(Ordering::Acquire),
            "lame duck: not ready; spreading `shutdown` over the open connections while the feeds keep streaming"
        );
        self.engine.lame_duck(server.lame_duck_ms, server.reconnect_after_max_ms, &notified).await;
        let cut_short = tokio::select! {
            _ = tokio::time::sleep_until(started + window) => false,
            _ = hurry => true,
        };
        self.app.metrics.lame_duck.set(0);
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            cut_short,
            notified = notified.load(Ordering::Relaxed),
            remaining = self.app.open_connections.load(Ordering::Acquire),
            "lame duck over{}; the connections not told yet get `shutdown` once the sources have stopped",
            if cut_short { " (cut short by a second shutdown signal)" } else { "" }
        );
    }

    /// Phase 2, before [`Shutdown::deliver`]: once the sources (feed tasks and publisher
    /// connections) have stopped, no tick is taken in any more, so "everything taken in"
    /// is a fixed amount the shards can finish. Returns whether they stopped by `deadline`.
    async fn stop_sources(&self, deadline: tokio::time::Instant) -> bool {
        self.app.sources_cancel.cancel();
        self.app.sources.close();
        tokio::time::timeout_at(deadline, self.app.sources.wait()).await.is_ok()
    }

    /// Phase 3, before [`Shutdown::notify_clients`]: the shards dispatch every tick still
    /// queued, so every tick taken in reaches its subscribers before their `shutdown`
    /// message. Bounded by `deadline`, shared with [`Shutdown::stop_sources`].
    async fn deliver(&self, sources_stopped: bool, deadline: tokio::time::Instant) {
        // `dispatched` polls the queues (a per-cycle notification would cost the shards on
        // the hot path for this one wait); the deadline bounds it.
        if !(sources_stopped && self.engine.dispatched(deadline).await) {
            tracing::warn!("shard queues not drained within 1 s; shutting down anyway");
        }
    }

    /// Phase 4, once the last tick is out: every stream not told during the lame-duck phase
    /// (all of them without one) is sent `shutdown` with a reconnect hint jittered up to
    /// `server.reconnect_after_max_ms` (so clients do not all come back at once) and close
    /// 1001.
    async fn notify_clients(&self) {
        self.engine.notify_shutdown(self.app.config.server.reconnect_after_max_ms).await;
    }

    /// Phase 5, after the clients were told: their connections get up to `server.drain_ms`
    /// to flush and close before the shards stop under them.
    async fn drain(&self) {
        let app = &self.app;
        app.tracker.close();
        let drain = Duration::from_millis(app.config.server.drain_ms);
        if tokio::time::timeout(drain, app.tracker.wait()).await.is_err() {
            tracing::warn!(
                remaining = app.open_connections.load(Ordering::Acquire),
                "drain time over; dropping remaining connections"
            );
        }
    }
}

/// Phase 6, once the connections are gone (or out of time): from here the public accept
/// loop answers new sockets 503 itself, since no shard will serve them; sockets already
/// handed to a shard get their answer there first; then HTTP connections (idle
/// keep-alives) are closed and the shard threads are stopped and joined.
async fn stop_shards(app: &AppState, engine: EngineHandle) {
    app.edge.shards_stopped.store(true, Ordering::Release);
    // Bounded: an idle keep-alive connection counts until `app.cancel` below closes it.
    let _ = tokio::time::timeout(HTTP_ANSWER_WITHIN, app.edge.http_idle()).await;
    app.cancel.cancel();
    engine.stop().await;
}

/// Phase 7, last: both listeners have kept accepting throughout, so during shutdown a
/// client or load balancer gets 503 (streams) or `/metrics` (admin) rather than
/// "connection refused" from a host that looks dead. The background tasks (key
/// rotation, JWKS refresh) stop here too: tokens may still be refreshed while draining.
async fn stop_listeners(background: &TaskTracker, listeners: &CancellationToken) {
    listeners.cancel();
    background.close();
    let _ = tokio::time::timeout(LISTENERS_WITHIN, background.wait()).await;
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::Server;
    use std::time::Duration;

    fn config(dir: &tempfile::TempDir) -> Config {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            ..Config::default()
        };
        config.engine.shards = 2;
        config.server.state_dir = Some(dir.path().join("state"));
        config
    }

    /// A `Server` dropped without `shutdown` stops its shard threads: the shards serve
    /// sockets with the server's state, which must not own their control channels.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_server_stops_its_shards() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Server::start(config(&dir)).await.expect("server starts");
        let threads = server.shutdown.engine_mut().take_threads();
        assert_eq!(threads.len(), 2);
        drop(server);
        // Joined on a thread of its own, so a failing test fails instead of hanging.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for t in threads {
                let _ = t.join();
            }
            let _ = done_tx.send(());
        });
        let stopped = tokio::task::spawn_blocking(move || done_rx.recv_timeout(Duration::from_secs(30)).is_ok());
        assert!(stopped.await.expect("join"), "shard threads still running after the Server was dropped");
    }

    /// A `Server` dropped without `shutdown` stops its feed tasks and releases both its
    /// listening ports (the accept loops end and drop their listeners).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_server_stops_its_sources_and_releases_its_ports() {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Server::start(config(&dir)).await.expect("server starts");
        let (addr, admin_addr) = (server.addr(), server.admin_addr());
        let sources = server.app.sources.clone();
        assert!(!sources.is_empty(), "the demo feeds run source tasks");
        assert!(tokio::net::TcpListener::bind(addr).await.is_err(), "the port is held while the server runs");
        drop(server);
        sources.close();
        let stopped = tokio::time::timeout(Duration::from_secs(30), sources.wait()).await;
        assert!(stopped.is_ok(), "feed tasks still running after the Server was dropped");
        // Polled: nothing signals that a task on another worker has dropped its listener.
        for a in [addr, admin_addr] {
            let rebound = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    if tokio::net::TcpListener::bind(a).await.is_ok() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            assert!(rebound.is_ok(), "{a} still bound after the Server was dropped");
        }
    }
}
