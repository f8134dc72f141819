//! tickgate: a market-data streaming server. Trading clients hold WebSocket connections
//! and receive binary batches of trades and quotes for the instruments they subscribe
//! to, gated by OAuth2 JWT access tokens validated once at the handshake.
//!
//! # Layout
//!
//! The wire (codec, control messages, close codes, recording format) is the crate
//! `tickgate-proto`; the Rust client is `tickgate-client`; the load generator is
//! `tickgate-bench`. This crate is the server:
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | TOML configuration, defaults, validation |
//! | [`auth`] | key cache, token validation, scopes, the embedded OAuth2 issuer |
//! | [`engine`] | shard threads, subscription index, outbound queues, resume buffer, conflation, timer wheel |
//! | [`feeds`] | feed definitions, the catalog, each feed's log (last seqs, resume buffer) and epoch kept across restarts |
//! | [`sources`] | what produces ticks: synthetic random walk, replay of a recording (publishers: `server::publish`) |
//! | [`server`] | listeners and their bounds (request deadlines, pending caps, descriptor reserve), HTTP on the shards, handshake, connection task, heartbeat, publish endpoint and live publishers, admin |
//! | [`metrics`] | Prometheus metrics |
//! | `ratelimit` | token buckets, alone and keyed by address or client (private) |
//!
//! [`run`] starts everything and serves until the shutdown future resolves; [`Server`]
//! gives tests and embedders the bound addresses and an explicit graceful shutdown.

pub mod auth;
pub mod config;
pub mod engine;
pub mod feeds;
pub mod metrics;
mod ratelimit;
pub mod server;
pub mod sources;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::issuer::{EmbeddedIssuer, DEMO_SECRET_ENV};
use crate::auth::keys::KeyStore;
use crate::auth::validate::Validator;
use crate::config::{Config, IssuerMode};
use crate::engine::core::CoreLimits;
use crate::engine::{Engine, EngineHandle, Ingest};
use crate::feeds::{Catalog, DefsOrigin};
use crate::metrics::Metrics;
use crate::server::AppState;

/// Errors that stop the server from starting.
#[derive(Debug, Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Bad feed definitions.
    #[error(transparent)]
    Feeds(#[from] feeds::FeedError),
    /// The epoch state (`server.state_dir`) could not be read or written.
    #[error(transparent)]
    Epoch(#[from] feeds::epoch::EpochError),
    /// The embedded issuer could not be built.
    #[error(transparent)]
    Issuer(#[from] auth::issuer::IssuerError),
    /// A listener could not be bound, or a thread not started.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A mode that this build does not serve yet, or a client that could not be built.
    #[error("unsupported configuration: {0}")]
    Unsupported(String),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] server::tls::TlsError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    app: Arc<AppState>,
    issuer: Option<Arc<EmbeddedIssuer>>,
    generated_demo_secret: Option<String>,
    accept_cancel: CancellationToken,
    feeds_cancel: CancellationToken,
    admin_cancel: CancellationToken,
    /// The shard threads: dropped with the `Server`, which stops them.
    engine: EngineHandle,
    background: TaskTracker,
    feed_tasks: TaskTracker,
    tls: Option<Arc<server::tls::TlsState>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).field("admin_addr", &self.admin_addr).finish_non_exhaustive()
    }
}

impl Server {
    /// Binds the listeners, starts the shards, the feeds and the admin listener. Must be
    /// called inside a tokio runtime (the main runtime: acceptors, feeds, admin).
    pub async fn start(config: Config) -> Result<Server, Error> {
        config.validate()?;
        let config = Arc::new(config);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(io_err(format!("cannot bind listen address {}", config.listen)))?;
        let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .map_err(io_err(format!("cannot bind admin_listen address {}", config.admin_listen)))?;
        let addr = listener.local_addr().map_err(io_err("listen address"))?;
        let admin_addr = admin_listener.local_addr().map_err(io_err("admin address"))?;

        // Feeds.
        let allow_embedded = config.feeds_dir == std::path::Path::new("feeds");
        let (defs, origin) = feeds::load_defs(&config.feeds_dir, allow_embedded)?;
        match &origin {
            DefsOrigin::Embedded => tracing::warn!(
                "no feeds/ folder here: streaming the compiled-in DEMO feed (set feeds_dir to use your own)"
            ),
            DefsOrigin::Folder(dir) => tracing::info!(dir = %dir, feeds = defs.len(), "feed definitions loaded"),
        }
        // Epochs never repeat across restarts: max(last + 1, now in ms), made durable in the
        // state folder before anything is served (feeds::epoch).
        let state_dir = feeds::epoch::resolve_state_dir(config.server.state_dir.as_deref());
        let epochs = Arc::new(feeds::epoch::EpochStore::open(&state_dir)?);
        let previous = epochs.last();
        let epoch = epochs.next(0)?;
        tracing::info!(epoch, previous, state = %epochs.path().display(), "feed epoch");
        let catalog = Arc::new(Catalog::new(defs, epoch)?.with_epoch_store(epochs));

        // Auth.
        let metrics = Metrics::new();
        let keys = Arc::new(KeyStore::new());
        let (issuer, generated_demo_secret, iss_name) = match config.issuer.mode {
            IssuerMode::Embedded => {
                let scheme = if config.tls.enabled() { "https" } else { "http" };
                let iss_name = config.issuer.issuer.clone().unwrap_or_else(|| format!("{scheme}://{addr}"));
                let demo_secret = std::env::var(DEMO_SECRET_ENV).ok();
                let (iss, generated) = EmbeddedIssuer::new(&config.issuer, iss_name.clone(), &keys, demo_secret)?;
                // A token is accepted until exp + expiry_grace_ms: keep its key that long.
                let margin =
                    Duration::from_secs(config.auth.leeway_s) + Duration::from_millis(config.auth.expiry_grace_ms);
                let iss = iss.with_retire_margin(margin).with_request_counter(metrics.token_requests.clone());
                (Some(Arc::new(iss)), generated, iss_name)
            }
            IssuerMode::External => {
                let iss_name = config.issuer.issuer.clone().unwrap_or_default();
                (None, None, iss_name)
            }
        };
        let jwks = match (config.issuer.mode, &config.issuer.jwks_url) {
            (IssuerMode::External, Some(url)) => {
                let settings = auth::jwks::JwksSettings {
                    url: url.clone(),
                    refresh: Duration::from_secs(config.issuer.jwks_refresh_s),
                    cooldown: Duration::from_secs(config.issuer.jwks_cooldown_s),
                    max_stale: Duration::from_secs(config.issuer.jwks_max_stale_s),
                    timeout: Duration::from_millis(config.issuer.jwks_timeout_ms),
                    max_bytes: config.issuer.jwks_max_bytes,
                };
                let cache = auth::jwks::JwksCache::new(settings, keys.clone(), metrics.clone())
                    .map_err(|e| Error::Unsupported(format!("JWKS client: {e}")))?;
                Some(Arc::new(cache))
            }
            _ => None,
        };
        let mut validator = Validator::new(keys, iss_name, config.issuer.audience.clone(), &config.auth);
        if let Some(cache) = &jwks {
            validator = validator.with_jwks(cache.clone());
        }
        let validator = Arc::new(validator);

        let n_shards = config.shard_count();
        let feed_names: Vec<&str> = catalog.feeds().iter().map(|f| f.name()).collect();
        metrics.init_known_series(&feed_names, n_shards);
        let engine = Engine::new(n_shards, config.engine.queue_capacity);
        let inboxes = engine.inboxes().clone();
        let feeds_cancel = CancellationToken::new();
        // The sources (generators, replays and publisher connections), tracked apart so
        // shutdown can wait for them to have stopped.
        let feed_tasks = TaskTracker::new();
        let ingested: Arc<[prometheus::IntCounter]> =
            catalog.feeds().iter().map(|f| metrics.ticks_ingested.with_label_values(&[f.name()])).collect();
        let ingest = Ingest::new(inboxes.clone(), catalog.clone(), ingested);
        let app = Arc::new(AppState {
            ingest: ingest.clone(),
            sources: feed_tasks.clone(),
            sources_cancel: feeds_cancel.clone(),
            publishers: server::publish::Publishers::default(),
            admission: server::limits::Admission::new(&config.limits),
            tickets: auth::tickets::TicketStore::new(
                config.limits.max_tickets,
                config.limits.max_tickets_per_subject,
                validator.revocations().clone(),
            ),
            engine: engine.control(),
            jwks: jwks.clone(),
            config: config.clone(),
            validator: validator.clone(),
            metrics: metrics.clone(),
            draining: AtomicBool::new(false),
            open_connections: AtomicUsize::new(0),
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            shards: inboxes.clone(),
            edge: server::edge::Edge::new(config.limits.max_pending_per_ip, config.limits.fd_reserve),
        });

        let mut router = server::public_router(app.clone());
        if let Some(iss) = &issuer {
            router = router.merge(iss.clone().router());
        }
        let router = router.fallback(server::not_found);
        let tls = match (&config.tls.cert, &config.tls.key) {
            (Some(c), Some(k)) => Some(Arc::new(server::tls::TlsState::load(c, k)?)),
            _ => None,
        };
        let serve = server::serve_fn(app.clone(), router, tls.clone());

        let engine = engine
            .start(&catalog, &CoreLimits::from(&*config), &metrics, &serve)
            .map_err(io_err("cannot start shard thread"))?;
        let sock_tx = engine.socket_senders();

        let background = TaskTracker::new();
        let accept_cancel = CancellationToken::new();
        background.spawn(server::accept_loop(listener, app.clone(), sock_tx, accept_cancel.clone()));

        if let Some(iss) = &issuer {
            // Key rotation and retirement of keys whose tokens have all expired.
            let (iss, cancel) = (iss.clone(), feeds_cancel.clone());
            let every = (config.issuer.key_rotation_s > 0).then(|| Duration::from_secs(config.issuer.key_rotation_s));
            background.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut next_rotation = every.map(|e| tokio::time::Instant::now() + e);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    iss.retire_expired();
                    if let (Some(at), Some(e)) = (next_rotation, every) {
                        if tokio::time::Instant::now() >= at {
                            if let Err(err) = iss.rotate() {
                                tracing::error!(error = %err, "issuer key rotation failed");
                            }
                            next_rotation = Some(at + e);
                        }
                    }
                }
            });
        }
        if let Some(cache) = &jwks {
            background.spawn(cache.clone().run(feeds_cancel.clone()));
        }
        sources::spawn(&catalog, &ingest, &metrics, &feed_tasks, &feeds_cancel);

        let admin_cancel = CancellationToken::new();
        let admin = server::admin::router(app.clone());
        background.spawn(server::serve_listener(
            admin_listener,
            admin,
            if config.tls.admin { tls.clone() } else { None },
            Arc::new(server::HttpLimits::new("admin", &config, metrics.clone())),
            app.edge.admin_pending.clone(),
            admin_cancel.clone(),
        ));

        if config.auth.insecure_no_auth {
            tracing::warn!(
                "auth.insecure_no_auth: streams are accepted WITHOUT tokens (benchmark mode, loopback only)"
            );
        }
        tracing::info!(listen = %addr, admin = %admin_addr, shards = n_shards,
            feeds = catalog.feeds().len(), "tickgate serving");
        Ok(Server {
            addr,
            admin_addr,
            app,
            issuer,
            generated_demo_secret,
            accept_cancel,
            feeds_cancel,
            feed_tasks,
            admin_cancel,
            engine,
            background,
            tls,
        })
    }

    /// Re-reads the TLS certificate and key (what SIGHUP does). New handshakes use them;
    /// established connections are kept. On error the previous certificate stays.
    pub fn reload_tls(&self) -> Result<bool, Error> {
        match &self.tls {
            Some(t) => {
                t.reload()?;
                tracing::info!("TLS certificate reloaded");
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Whether the public listener serves TLS.
    pub fn tls_enabled(&self) -> bool {
        self.tls.is_some()
    }

    /// The bound public address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The embedded issuer, when enabled.
    pub fn issuer(&self) -> Option<&Arc<EmbeddedIssuer>> {
        self.issuer.as_ref()
    }

    /// The demo client's secret when it was generated at start (not taken from the
    /// environment): the caller prints it once.
    pub fn generated_demo_secret(&self) -> Option<&str> {
        self.generated_demo_secret.as_deref()
    }

    /// Open stream connections.
    pub fn connections(&self) -> usize {
        self.app.open_connections.load(Ordering::Acquire)
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.app.metrics
    }

    /// Graceful shutdown: new streams and publishers get 503 `unavailable` and `/readyz`
    /// 503 at once; `shutdown` + close 1001 go to every stream, which are waited for up to
    /// `server.drain_ms`; then the shards stop. Both listeners keep accepting and answering
    /// (503 for streams, `/metrics` still served) until the very end, so a load balancer
    /// sees "not ready" rather than a dead host.
    pub async fn shutdown(self) {
        let drain = Duration::from_millis(self.app.config.server.drain_ms);
        self.app.draining.store(true, Ordering::Release);
        // Stop the sources first and let the shards dispatch what was already ingested, so
        // every tick taken in reaches its subscribers before their `shutdown` message.
        self.feeds_cancel.cancel();
        self.feed_tasks.close();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        // First the sources must have stopped (no tick is ingested after this), then the
        // shards must have taken every queued tick.
        let sources_stopped = tokio::time::timeout_at(deadline, self.feed_tasks.wait()).await.is_ok();
        if !(sources_stopped && self.engine.dispatched(deadline).await) {
            tracing::warn!("shard queues not drained within 1 s; shutting down anyway");
        }
        let app = &self.app;
        let connections_done = async {
            app.tracker.close();
            if tokio::time::timeout(drain, app.tracker.wait()).await.is_err() {
                tracing::warn!(
                    remaining = app.open_connections.load(Ordering::Acquire),
                    "drain time over; dropping remaining connections"
                );
            }
            // From here the public accept loop answers new sockets 503 itself; sockets
            // already handed to a shard get their answer there first (bounded: idle
            // keep-alive connections are closed below).
            app.edge.shards_stopped.store(true, Ordering::Release);
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while app.edge.public_http.load(Ordering::Relaxed) > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            app.cancel.cancel();
        };
        self.engine.drain_and_stop(app.config.server.reconnect_after_max_ms, connections_done).await;
        // The listeners stop last.
        self.accept_cancel.cancel();
        self.admin_cancel.cancel();
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.background.wait()).await;
        tracing::info!("tickgate stopped");
    }
}

/// Runs the server until `shutdown` resolves, then shuts down gracefully. A generated
/// demo secret is printed once on standard output (never logged).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let server = Server::start(config).await?;
    if let Some(secret) = server.generated_demo_secret() {
        println!("embedded issuer: client `demo`, secret {secret} (set {DEMO_SECRET_ENV} to choose it)");
    }
    let (ws, http) = if server.tls_enabled() { ("wss", "https") } else { ("ws", "http") };
    let admin = if server.app.config.tls.admin { "https" } else { "http" };
    println!(
        "tickgate: stream {ws}://{}/v1/stream  issuer {http}://{}/oauth2/token  admin {admin}://{}/metrics",
        server.addr(),
        server.addr(),
        server.admin_addr()
    );
    // SIGHUP re-reads the TLS certificate and key.
    #[cfg(unix)]
    let reload = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => loop {
                hup.recv().await;
                if let Err(e) = server.reload_tls() {
                    tracing::error!(error = %e, "TLS reload failed; the previous certificate stays in use");
                }
            },
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let reload = std::future::pending::<()>();
    tokio::select! {
        _ = shutdown => {}
        _ = reload => {}
    }
    server.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Server` dropped without `shutdown` stops its shard threads: the shards serve
    /// sockets with the server's state, which must not own their control channels.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_server_stops_its_shards() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            ..Config::default()
        };
        config.engine.shards = 2;
        config.server.state_dir = Some(dir.path().join("state"));
        let mut server = Server::start(config).await.expect("server starts");
        let threads = server.engine.take_threads();
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
}
