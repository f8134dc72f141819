//! The network edge: listeners, the HTTP service that runs on each shard, the stream
//! handshake ([`handshake`]), who may hold a connection ([`authorize`]), the session
//! lifecycle streams and publishers share (`session`), the connection task
//! (`connection`, its data frames written by `outbox`), the publish endpoint (`publish`), the admin listener (`admin`), binding and serving both listeners
//! (`listen`), and what protects the listeners
//! (`edge`: pending caps, descriptor reserve, accept back-off; request deadlines and body
//! limits are in [`serve_http`]).
//!
//! Sockets are accepted on the main runtime and handed to the shard with the fewest
//! connections; HTTP is then served on that shard's thread, so a WebSocket upgraded there
//! stays there for its whole life.

pub(crate) mod admin;
pub mod authorize;
pub(crate) mod connection;
pub(crate) mod edge;
pub mod handshake;
mod heartbeat;
pub(crate) mod limits;
pub(crate) mod listen;
mod outbox;
pub(crate) mod publish;
pub(crate) mod session;
pub(crate) mod tls;

/// A peer address as a log field (`peer = %LogPeer(peer)`): the address itself, or `-`
/// where none was recorded, rather than the `Some(127.0.0.1:5000)` of `?peer`. Here, not in
/// `handshake`, because the connection task logs it too (and `handshake` starts that task).
pub(crate) struct LogPeer(pub(crate) Option<std::net::SocketAddr>);

impl std::fmt::Display for LogPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

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
    /// The shards' control side (revocation, admin listing). Non-owning: the shard threads
    /// hold this state, so an owning handle here would keep them alive forever.
    pub engine: crate::engine::EngineCtl,
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
    /// The sessions the edge keeps itself: live publisher connections (for revocation).
    pub publishers: session::EdgeSessions,
    /// Listener protection: pending caps, descriptor reserve, end-of-shutdown answers.
    pub edge: edge::Edge,
    /// The NATS feeds' readiness (`/readyz`); always ready without NATS feeds.
    pub nats: Arc<crate::sources::nats::NatsHealth>,
    /// Cluster-wide revocation through the NATS bucket (off without `nats.servers`).
    pub cluster_revocations: Arc<crate::sources::nats::revocations::ClusterRevocations>,
}

impl AppState {
    /// The shared state of a server from its parts: `sources_cancel` stops the sources
    /// (publisher connections included), `http_cancel` ends HTTP connections (both fired by
    /// the shutdown's phases).
    pub(crate) fn new(
        config: Arc<Config>,
        auth: &crate::auth::setup::Auth,
        ingest: crate::engine::Ingest,
        engine: &crate::engine::Engine,
        metrics: Metrics,
        sources_cancel: CancellationToken,
        http_cancel: CancellationToken,
    ) -> AppState {
        authorize::prime_metrics(&metrics);
        AppState {
            nats: crate::sources::nats::NatsHealth::new(ingest.catalog(), &config.nats),
            cluster_revocations: crate::sources::nats::revocations::ClusterRevocations::new(&config, &metrics),
            ingest,
            // The sources (generators, replays and publisher connections), tracked so
            // shutdown can wait for them to have stopped.
            sources: TaskTracker::new(),
            sources_cancel,
            publishers: session::EdgeSessions::default(),
            admission: limits::Admission::new(&config.limits),
            tickets: crate::auth::tickets::TicketStore::new(
                config.limits.max_tickets,
                config.limits.max_tickets_per_subject,
                auth.validator.revocations().clone(),
            ),
            engine: engine.control(),
            jwks: auth.jwks.clone(),
            validator: auth.validator.clone(),
            metrics,
            draining: AtomicBool::new(false),
            open_connections: AtomicUsize::new(0),
            tracker: TaskTracker::new(),
            cancel: http_cancel,
            shards: engine.inboxes().clone(),
            edge: edge::Edge::new(config.limits.max_pending_per_ip, config.limits.fd_reserve),
            config,
        }
    }
}

/// The trading screen served at `/` (docs/protocol.md §1): its page, its script, and the JS
/// client it is built on, compiled in so the binary serves them from anywhere.
const DEMO_PAGE: &str = include_str!("demo/index.html");
const DEMO_SCRIPT: &str = include_str!("demo/screen.js");
const JS_CLIENT: &str = include_str!("../../clients/js/src/tickgate-client.js");

/// A compiled-in script. `no-cache`: a browser revalidates, so a new build's page never runs
/// with the previous build's client.
fn script(body: &'static str) -> axum::response::Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The public routes that are not the embedded issuer's.
pub fn public_router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/stream", get(handshake::stream))
        .route("/v1/ticket", axum::routing::post(handshake::ticket))
        .route("/v1/publish", get(publish::handshake))
        .route("/", get(|| async { Html(DEMO_PAGE) }))
        .route("/demo.js", get(|| async { script(DEMO_SCRIPT) }))
        .route("/tickgate-client.js", get(|| async { script(JS_CLIENT) }))
        .with_state(app)
}

/// The JSON 404 for unknown paths.
pub async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, Json(json!({"error": "not_found", "error_description": "no such endpoint"})))
}

/// The bounds of HTTP serving on one listener.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// `public` or `admin`: the `listener` label of the HTTP metrics.
    pub listener: &'static str,
    /// Time allowed for a request head, and for an idle keep-alive connection to send the
    /// next one (`min(server.handshake_timeout_ms, server.request_timeout_ms)`).
    pub head_timeout: Duration,
    /// Time allowed for a whole request, head and body, counted from when the connection
    /// starts waiting for it (accept, or the previous answer): `server.request_timeout_ms`.
    pub request_timeout: Duration,
    /// Largest request body accepted (`limits.max_body_bytes`).
    pub max_body_bytes: usize,
    /// Where timeouts and refusals are counted.
    pub metrics: Metrics,
}

impl HttpLimits {
    /// The limits of listener `listener` from the configuration.
    pub fn new(listener: &'static str, config: &Config, metrics: Metrics) -> HttpLimits {
        let request_timeout = Duration::from_millis(config.server.request_timeout_ms);
        let head_timeout = Duration::from_millis(config.server.handshake_timeout_ms).min(request_timeout);
        HttpLimits { listener, head_timeout, request_timeout, max_body_bytes: config.limits.max_body_bytes, metrics }
    }
}

fn json_answer(status: StatusCode, error: &str, description: &str) -> axum::response::Response {
    let mut resp = (status, Json(json!({"error": error, "error_description": description}))).into_response();
    // The rest of the request (if any) is not read: the connection cannot be reused.
    resp.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    resp
}

/// Whether `headers` say the body is JSON (`application/json`, parameters allowed): a
/// request's (the revoke endpoint's content-type rule) or a response's (a handler's own
/// JSON 413 is kept).
pub(crate) fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// Answers one request: bodies over `max_body_bytes` get 413 (from `Content-Length` at
/// once, or when the body grows past it), and a request not answered by `deadline` (its
/// body still arriving, typically) gets 408.
async fn answer(
    req: hyper::Request<Incoming>,
    router: Router,
    limits: &HttpLimits,
    deadline: tokio::time::Instant,
) -> axum::response::Response {
    let too_large = || {
        limits.metrics.http_refused.with_label_values(&[limits.listener, "body_too_large"]).inc();
        json_answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!("request bodies are limited to {} bytes", limits.max_body_bytes),
        )
    };
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return too_large();
    }
    let max = limits.max_body_bytes;
    let req = req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, max)));
    match tokio::time::timeout_at(deadline, router.oneshot(req)).await {
        // axum's extractors answer a body over the limit with a plain-text 413; a handler's
        // own JSON 413 (a tighter per-endpoint limit) is kept as it is.
        Ok(Ok(resp)) if resp.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json(resp.headers()) => too_large(),
        Ok(Ok(resp)) => resp,
        Ok(Err(never)) => match never {},
        Err(_) => {
            limits.metrics.http_timeouts.with_label_values(&[limits.listener, "body"]).inc();
            json_answer(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                &format!("the request was not complete within {} ms", limits.request_timeout.as_millis()),
            )
        }
    }
}

/// Per-connection bookkeeping shared with the request service.
struct ConnState {
    /// When the connection started waiting for its next request.
    idle_since: tokio::time::Instant,
    /// Requests answered.
    served: u64,
    /// The connection's slot in the per-address pending table, until a request is answered.
    pending: Option<edge::PendingGuard>,
}

/// Serves HTTP/1.1 (with upgrades) on one connection until it ends or the server stops,
/// within [`HttpLimits`]: a bounded request head (16 KiB) and body, a deadline for the head
/// (and for an idle keep-alive connection) and one for the whole request. `pending` is
/// released when the first request has been answered.
pub async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    limits: Arc<HttpLimits>,
    pending: Option<edge::PendingGuard>,
    cancel: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let state =
        Arc::new(std::sync::Mutex::new(ConnState { idle_since: tokio::time::Instant::now(), served: 0, pending }));
    let (svc_state, svc_limits) = (state.clone(), limits.clone());
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(handshake::PeerAddr(peer));
        // The same address for handlers outside `server` (the embedded issuer's limits).
        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        let (router, state, limits) = (router.clone(), svc_state.clone(), svc_limits.clone());
        async move {
            let since = state.lock().unwrap_or_else(|e| e.into_inner()).idle_since;
            let resp = answer(req, router, &limits, since + limits.request_timeout).await;
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.served += 1;
            s.pending = None;
            s.idle_since = tokio::time::Instant::now();
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            match r {
                Err(e) if e.is_timeout() => {
                    // hyper's head timer also runs while a keep-alive connection waits for
                    // its next request: that is the idle bound, counted apart.
                    let served = state.lock().unwrap_or_else(|e| e.into_inner()).served;
                    let stage = if served > 0 { "idle" } else { "head" };
                    limits.metrics.http_timeouts.with_label_values(&[limits.listener, stage]).inc();
                    tracing::debug!(peer = %peer, stage, "http connection timed out");
                }
                Err(e) => tracing::debug!(peer = %peer, error = %e, "http connection ended with an error"),
                Ok(()) => {}
            }
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

/// Builds the function shards use to serve an accepted socket: TLS first when configured
/// (the TLS handshake shares the request-head deadline), then HTTP. The socket's pending
/// slot and HTTP count were taken by [`accept_loop`].
pub fn serve_fn(app: Arc<AppState>, router: Router, tls: Option<Arc<tls::TlsState>>) -> ServeFn {
    let limits = Arc::new(HttpLimits::new("public", &app.config, app.metrics.clone()));
    Arc::new(move |stream: tokio::net::TcpStream, peer: SocketAddr| {
        let app = app.clone();
        let router = router.clone();
        let tls = tls.clone();
        let limits = limits.clone();
        Box::pin(async move {
            let _counted = edge::HttpSocketGuard(app.clone());
            let pending = Some(app.edge.public_pending.adopt(peer.ip()));
            let _ = stream.set_nodelay(true);
            let sndbuf = app.config.server.send_buffer_bytes;
            if sndbuf > 0 {
                let _ = socket2::SockRef::from(&stream).set_send_buffer_size(sndbuf);
            }
            let deadline = limits.head_timeout;
            match tls {
                None => serve_http(stream, peer, router, limits, pending, app.cancel.clone()).await,
                Some(tls) => match tokio::time::timeout(deadline, tls.acceptor().accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        serve_http(tls_stream, peer, router, limits, pending, app.cancel.clone()).await
                    }
                    Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                    Err(_) => {
                        limits.metrics.http_timeouts.with_label_values(&["public", "head"]).inc();
                        tracing::debug!(peer = %peer, "TLS handshake timed out")
                    }
                },
            }
        })
    })
}

/// The function the shards serve public sockets with ([`serve_fn`]): the public routes,
/// the embedded issuer's when there is one, and the JSON 404 for every other path.
pub(crate) fn public_service(
    app: &Arc<AppState>,
    issuer: Option<&Arc<crate::auth::issuer::EmbeddedIssuer>>,
    tls: Option<Arc<tls::TlsState>>,
) -> ServeFn {
    let mut router = public_router(app.clone());
    if let Some(iss) = issuer {
        router = router.merge(iss.clone().router());
    }
    serve_fn(app.clone(), router.fallback(not_found), tls)
}

/// Serves a router on a listener of the main runtime (the admin listener), over TLS when
/// given, until `cancel` fires: accept errors back off, and an address with
/// `limits.max_pending_per_ip` connections that have not completed a request has further
/// sockets closed at once.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<tls::TlsState>>,
    limits: Arc<HttpLimits>,
    pending: Arc<edge::PendingTable>,
    cancel: CancellationToken,
) {
    let mut backoff = edge::AcceptBackoff::new(limits.listener, limits.metrics.clone());
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => {
                    backoff.ok();
                    x
                }
                Err(e) => {
                    backoff.error(&e).await;
                    continue;
                }
            },
        };
        let Some(slot) = pending.try_acquire(peer.ip()) else {
            limits.metrics.http_refused.with_label_values(&[limits.listener, "pending_per_ip"]).inc();
            continue;
        };
        let (router, tls, cancel, limits) = (router.clone(), tls.clone(), cancel.clone(), limits.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_http(stream, peer, router, limits, Some(slot), cancel).await,
                Some(tls) => {
                    if let Ok(Ok(s)) = tokio::time::timeout(limits.head_timeout, tls.acceptor().accept(stream)).await {
                        serve_http(s, peer, router, limits, Some(slot), cancel).await;
                    }
                }
            }
        });
    }
}

/// The answer to a public socket that no shard can take (the shards have stopped at the end
/// of shutdown, or a shard's socket queue is full): its request head is read (briefly) and
/// answered 503 `unavailable`, so a client sees an HTTP answer, never a silent close.
async fn answer_unavailable(mut stream: tokio::net::TcpStream, description: &'static str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut n = 0;
        while n < buf.len() {
            match stream.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => return,
                Ok(k) => n += k,
            }
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                return;
            }
        }
    })
    .await;
    let body = json!({"error": "unavailable", "error_description": description}).to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Accepts public sockets and places each on the shard with the fewest connections. Accept
/// errors back off; a socket is closed at once (and counted in
/// `tickgate_http_refused_total`) when its address already has `limits.max_pending_per_ip`
/// connections without a completed request, or when it would eat into the descriptors kept
/// for the admin listener (`limits.fd_reserve`).
pub async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Arc<AppState>,
    senders: Vec<mpsc::Sender<(std::net::TcpStream, SocketAddr)>>,
    cancel: CancellationToken,
) {
    let shards = app.shards.clone();
    let mut backoff = edge::AcceptBackoff::new("public", app.metrics.clone());
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff.ok();
                x
            }
            Err(e) => {
                backoff.error(&e).await;
                continue;
            }
        };
        if app.edge.shards_stopped.load(Ordering::Acquire) {
            tokio::spawn(answer_unavailable(stream, "server is shutting down"));
            continue;
        }
        let others = app.open_connections.load(Ordering::Relaxed) + app.metrics.publishers.get().max(0) as usize;
        if app.edge.over_fd_reserve(others) {
            app.metrics.http_refused.with_label_values(&["public", "fd_reserve"]).inc();
            continue;
        }
        let Some(slot) = app.edge.public_pending.try_acquire(peer.ip()) else {
            app.metrics.http_refused.with_label_values(&["public", "pending_per_ip"]).inc();
            continue;
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
        // Counted before the hand-over; the serving task's guard takes over both counts.
        app.edge.public_http.fetch_add(1, Ordering::Relaxed);
        match senders[best].try_send((std_stream, peer)) {
            Ok(()) => slot.disarm(),
            Err(mpsc::error::TrySendError::Full((s, _)) | mpsc::error::TrySendError::Closed((s, _))) => {
                app.edge.http_ended();
                drop(slot);
                tracing::debug!(shard = best, "shard socket queue full or closed; answered 503");
                if let Ok(s) = tokio::net::TcpStream::from_std(s) {
                    tokio::spawn(answer_unavailable(s, "server is busy or shutting down"));
                }
            }
        }
    }
}
