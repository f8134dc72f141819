//! The network edge: listeners, the HTTP service that runs on each shard, the stream
//! handshake ([`handshake`]), the connection task ([`connection`]) and the admin
//! listener ([`admin`]).
//!
//! Sockets are accepted on the main runtime and handed to the shard with the fewest
//! connections; HTTP is then served on that shard's thread, so a WebSocket upgraded there
//! stays there for its whole life.

pub mod admin;
pub mod connection;
pub mod handshake;
mod heartbeat;
pub mod limits;
pub mod publish;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::auth::validate::Validator;
use crate::config::Config;
use crate::engine::shard::ServeFn;
use crate::engine::ShardInbox;
use crate::metrics::Metrics;

/// State shared by every handler, on every thread.
#[derive(Debug)]
pub struct AppState {
    /// The configuration.
    pub config: Arc<Config>,
    /// Token validation.
    pub validator: Arc<Validator>,
    /// Metrics.
    pub metrics: Metrics,
    /// Set at the start of shutdown: new streams get 503 and `/readyz` turns 503.
    pub draining: AtomicBool,
    /// Open stream connections (the `max_connections` limit).
    pub open_connections: AtomicUsize,
    /// Tracks connection tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when HTTP connections should finish.
    pub cancel: CancellationToken,
    /// The shards' cross-thread sides.
    pub shards: Arc<[Arc<ShardInbox>]>,
    /// Control channels to the shards (revocation, shutdown).
    pub shard_ctl: Vec<mpsc::Sender<crate::engine::shard::ShardCtl>>,
    /// Per-subject and per-IP admission limits.
    pub admission: limits::Admission,
    /// One-time stream tickets.
    pub tickets: crate::auth::tickets::TicketStore,
    /// The JWKS cache, with an external issuer.
    pub jwks: Option<Arc<crate::auth::jwks::JwksCache>>,
    /// Where publishers' records go.
    pub ingest: crate::engine::Ingest,
    /// Tracks the sources (publisher connections included) so shutdown waits for them.
    pub sources: TaskTracker,
    /// Stops the sources.
    pub sources_cancel: CancellationToken,
    /// Live publisher connections (for revocation).
    pub publishers: publish::Publishers,
}

const DEMO_PAGE: &str = include_str!("demo.html");

/// The public routes that are not the embedded issuer's.
pub fn public_router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/stream", get(handshake::stream))
        .route("/v1/ticket", axum::routing::post(handshake::ticket))
        .route("/v1/publish", get(publish::handshake))
        .route("/", get(|| async { Html(DEMO_PAGE) }))
        .with_state(app)
}

/// The JSON 404 for unknown paths.
pub async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, Json(json!({"error": "not_found", "error_description": "no such endpoint"})))
}

/// Serves HTTP/1.1 (with upgrades) on one connection until it ends or the server stops:
/// a bounded request head (16 KiB) that must arrive within `server.handshake_timeout_ms`.
pub async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    handshake_timeout: Duration,
    cancel: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(handshake::PeerAddr(peer));
        // The same address for handlers outside `server` (the embedded issuer's limits).
        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        let router = router.clone();
        async move { router.oneshot(req.map(axum::body::Body::new)).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(peer = %peer, error = %e, "http connection ended with an error");
            }
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

/// Builds the function shards use to serve an accepted socket: TLS first when configured
/// (the TLS handshake shares the request-head deadline), then HTTP.
pub fn serve_fn(app: Arc<AppState>, router: Router, tls: Option<Arc<tls::TlsState>>) -> ServeFn {
    Arc::new(move |stream: tokio::net::TcpStream, peer: SocketAddr| {
        let app = app.clone();
        let router = router.clone();
        let tls = tls.clone();
        Box::pin(async move {
            let _ = stream.set_nodelay(true);
            let sndbuf = app.config.server.send_buffer_bytes;
            if sndbuf > 0 {
                let _ = socket2::SockRef::from(&stream).set_send_buffer_size(sndbuf);
            }
            let deadline = Duration::from_millis(app.config.server.handshake_timeout_ms);
            match tls {
                None => serve_http(stream, peer, router, deadline, app.cancel.clone()).await,
                Some(tls) => match tokio::time::timeout(deadline, tls.acceptor().accept(stream)).await {
                    Ok(Ok(tls_stream)) => serve_http(tls_stream, peer, router, deadline, app.cancel.clone()).await,
                    Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                },
            }
        })
    })
}

/// Serves a router on a listener of the main runtime (the admin listener), over TLS when
/// given, until `cancel` fires.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<tls::TlsState>>,
    handshake_timeout: Duration,
    cancel: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (router, tls, cancel) = (router.clone(), tls.clone(), cancel.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_http(stream, peer, router, handshake_timeout, cancel).await,
                Some(tls) => {
                    if let Ok(Ok(s)) = tokio::time::timeout(handshake_timeout, tls.acceptor().accept(stream)).await {
                        serve_http(s, peer, router, handshake_timeout, cancel).await;
                    }
                }
            }
        });
    }
}

/// Accepts sockets and places each on the shard with the fewest connections.
pub async fn accept_loop(
    listener: tokio::net::TcpListener,
    shards: Arc<[Arc<ShardInbox>]>,
    senders: Vec<mpsc::Sender<(std::net::TcpStream, SocketAddr)>>,
    cancel: CancellationToken,
) {
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Least-connections placement; ties rotate so a burst spreads evenly.
        let n = shards.len();
        let mut best = next % n;
        for k in 0..n {
            let i = (next + k) % n;
            if shards[i].connections.load(Ordering::Relaxed) < shards[best].connections.load(Ordering::Relaxed) {
                best = i;
            }
        }
        next = next.wrapping_add(1);
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot detach accepted socket");
                continue;
            }
        };
        if senders[best].try_send((std_stream, peer)).is_err() {
            tracing::warn!(shard = best, "shard socket queue full; connection dropped");
        }
    }
}
