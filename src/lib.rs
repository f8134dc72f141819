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
//! Lower rows never import higher ones (the test `tests/it/module_graph.rs` fails on any
//! module cycle):
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | TOML configuration over the built-in defaults (the `Default` impls: the one copy) |
//! | `metrics` | Prometheus metrics; imports nothing of the server (each layer primes its own labels) |
//! | `ratelimit` | token buckets, alone and keyed by address or client (private) |
//! | [`auth`] | keys, JWKS cache, token validation, scopes, tickets, revocation, the embedded OAuth2 issuer, its setup and key rotation |
//! | [`feeds`] | feed definitions, the catalog, each feed's log (last seqs, resume buffer) and epoch kept across restarts |
//! | [`engine`] | `Engine`/`EngineHandle`, shard threads, `Ingest`, the core (index, subscribe, session, stats), write pacing, outbound queues, conflation, throttled subscriptions, timer wheel, stall tracking, the server-wide outbound budget, direct writes to plain sockets |
//! | [`sources`] | what produces ticks: synthetic random walk, replay of a recording, publish ingest, NATS JetStream (and its feed handler) |
//! | [`server`] | listeners and their bounds, HTTP on the shards, handshake and authorization, the session and its WebSocket loop (stream and publisher roles) over the upgraded socket, the streams' frame outbox, heartbeat, admin, TLS |
//! | `error` | [`Error`]: why the server could not start |
//! | `shutdown` | the phases of a graceful shutdown, and what stops a dropped [`Server`] |
//! | this file | the composition root: [`Server::start`] builds the parts and wires them |
//!
//! [`run`] starts everything and serves until the shutdown future resolves; [`Server`]
//! gives tests and embedders the bound addresses and an explicit graceful shutdown.

pub use error::Error;

pub mod auth;
pub mod config;
pub mod engine;
mod error;
pub mod feeds;
pub(crate) mod metrics;

mod ratelimit;
pub mod server;
mod shutdown;
pub mod sources;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::auth::issuer::{EmbeddedIssuer, DEMO_SECRET_ENV};
use crate::auth::setup::Auth;
use crate::config::Config;
use crate::engine::core::CoreLimits;
use crate::engine::{Engine, Ingest};
use crate::metrics::Metrics;
use crate::server::listen::Listeners;
use crate::server::AppState;
use crate::shutdown::{Shutdown, Stops};

/// A running server. Dropping it without [`Server::shutdown`] stops everything at once
/// (shards, sources, listeners, background tasks).
pub struct Server {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    app: Arc<AppState>,
    issuer: Option<Arc<EmbeddedIssuer>>,
    generated_demo_secret: Option<String>,
    tls: Option<Arc<server::tls::TlsState>>,
    /// The shard threads, the listeners and the tokens that stop them.
    shutdown: Shutdown,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).field("admin_addr", &self.admin_addr).finish_non_exhaustive()
    }
}

/// A `nats` feed needs `nats.servers`.
fn nats_feeds_have_servers<'a>(
    config: &Config,
    mut defs: impl Iterator<Item = &'a feeds::FeedDef>,
) -> Result<(), Error> {
    if config.nats.servers.is_empty() && defs.any(|d| d.source == feeds::SourceKind::Nats) {
        return Err(Error::Config(config::ConfigError::Invalid(
            "a feed has source = \"nats\" but nats.servers is empty".into(),
        )));
    }
    Ok(())
}

/// Checks a configuration as `serve` would take it, without binding, writing or starting
/// anything (`tickgate check-config`): the settings, every feed definition and the set of
/// them (unique names and ids), and the rules between settings and feeds. Returns the
/// feeds it would serve (the compiled-in demo feed when the default `feeds` folder is
/// missing, as `serve` does).
pub fn check_config(config: &Config) -> Result<Vec<feeds::FeedDef>, Error> {
    config.validate()?;
    let allow_embedded = config.feeds_dir == std::path::Path::new("feeds");
    let (defs, _) = feeds::load_defs(&config.feeds_dir, allow_embedded).map_err(feeds::OpenError::from)?;
    feeds::Catalog::new(defs.clone(), 1).map_err(feeds::OpenError::from)?;
    nats_feeds_have_servers(config, defs.iter())?;
    Ok(defs)
}

impl Server {
    /// Binds the listeners, starts the shards, the feeds and the admin listener. Must be
    /// called inside a tokio runtime (the main runtime: acceptors, feeds, admin).
    pub async fn start(config: Config) -> Result<Server, Error> {
        config.validate()?;
        let config = Arc::new(config);
        let listeners = Listeners::bind(&config).await?;
        let (addr, admin_addr) = (listeners.addr, listeners.admin_addr);
        // The default `feeds` folder may be missing (a fresh checkout): the demo feed.
        let allow_embedded = config.feeds_dir == std::path::Path::new("feeds");
        let catalog = Arc::new(feeds::open(&config.feeds_dir, allow_embedded, config.server.state_dir.as_deref())?);
        nats_feeds_have_servers(&config, catalog.feeds().iter().map(|f| &f.def))?;
        let metrics = Metrics::new();
        let auth = Auth::build(&config, addr, &metrics)?;

        let n_shards = config.shard_count();
        let feed_names: Vec<&str> = catalog.feeds().iter().map(|f| f.name()).collect();
        metrics.init_known_series(&feed_names, n_shards);
        let engine = Engine::new(n_shards, config.engine.queue_capacity);
        let ingested: Arc<[prometheus::IntCounter]> =
            catalog.feeds().iter().map(|f| metrics.ticks_ingested.with_label_values(&[f.name()])).collect();
        let ingest = Ingest::new(engine.inboxes().clone(), catalog.clone(), ingested);
        let stops = Stops::new();
        let app = Arc::new(AppState::new(
            config.clone(),
            &auth,
            ingest.clone(),
            &engine,
            metrics.clone(),
            stops.sources.clone(),
            stops.http.clone(),
        ));

        // The public routes (the embedded issuer's included), served on the shards.
        let tls = server::tls::TlsState::from_config(&config.tls)?;
        let serve = server::public_service(&app, auth.issuer.as_ref(), tls.clone());
        let engine = engine
            .start(&catalog, &CoreLimits::from(&*config), &metrics, &serve)
            .map_err(|source| Error::Io { context: "cannot start shard thread".into(), source })?;

        // Listeners and background tasks, on the main runtime; then the sources.
        let background = TaskTracker::new();
        listeners.spawn(&app, engine.socket_senders(), tls.clone(), &background, &stops.listeners);
        auth.spawn_tasks(&config, &background, &stops.listeners);
        sources::spawn(&catalog, &ingest, &metrics, &app.sources, &stops.sources);
        let apply = server::admin::cluster_apply(&app);
        sources::nats::spawn(
            &config.nats,
            &app.cluster_revocations,
            apply,
            &catalog,
            &ingest,
            &metrics,
            &app.nats,
            &app.sources,
            &stops.sources,
        );

        if config.auth.insecure_no_auth {
            tracing::warn!(
                "auth.insecure_no_auth: streams are accepted WITHOUT tokens (benchmark mode, loopback only)"
            );
        }
        if let Some(secret) = auth.exposed_demo_client(&config, addr) {
            tracing::warn!(listen = %addr, secret_from = secret,
                "the built-in `demo` client (scope md:read:*, for development) is served on a non-loopback address: \
                 whoever reaches it reads every feed (POST /demo/token hands out its read tokens with no secret); \
                 configure issuer.clients");
        }
        tracing::info!(listen = %addr, admin = %admin_addr, shards = n_shards,
            feeds = catalog.feeds().len(), "tickgate serving");
        Ok(Server {
            addr,
            admin_addr,
            app: app.clone(),
            issuer: auth.issuer,
            generated_demo_secret: auth.generated_demo_secret,
            tls,
            shutdown: Shutdown::new(app, engine, background, stops),
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
    /// sees "not ready" rather than a dead host. The phases are `shutdown::Shutdown`'s.
    ///
    /// With `server.lame_duck_ms` > 0 the node first streams on for that long, not ready,
    /// while each stream is sent `shutdown` at its own moment of the window.
    pub async fn shutdown(self) {
        self.shutdown.run(std::future::pending()).await;
    }

    /// [`Server::shutdown`], with its lame-duck phase cut short when `hurry` resolves (an
    /// operator's second SIGTERM): the streams not told yet are told at once, and the
    /// other phases run as always.
    pub async fn shutdown_hurried_by(self, hurry: impl Future<Output = ()>) {
        self.shutdown.run(hurry).await;
    }
}

/// Runs the server until `shutdown` resolves, then shuts down gracefully; `hurry`
/// resolving after that cuts the lame-duck phase short ([`Server::shutdown_hurried_by`];
/// `std::future::pending()` for never). A generated demo secret is printed once on
/// standard output (never logged).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> Result<(), Error> {
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
    let reload = server::tls::reload_on_hangup(server.tls.clone());
    tokio::select! {
        _ = shutdown => {}
        _ = reload => {}
    }
    server.shutdown_hurried_by(hurry).await;
    Ok(())
}
