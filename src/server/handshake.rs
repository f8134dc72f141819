//! `GET /v1/stream`: the stream handshake (spec §3).
//!
//! Every check happens before the upgrade and every refusal is an HTTP answer with a JSON
//! body `{"error","error_description"}`; a 401 also carries `WWW-Authenticate` (RFC 6750).
//! The token is validated exactly once, here; the connection keeps only the decoded
//! [`Principal`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::connection;
use super::AppState;

use super::limits::Refused;
use crate::auth::tickets::{TicketError, TICKET_TTL};
use crate::auth::validate::{AuthError, Principal};
use crate::engine::stream;
use tickgate_proto::{BEARER_PROTOCOL_PREFIX, SUBPROTOCOL};

/// The peer address of an accepted socket, put into request extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// A handshake refusal: status, OAuth-style error code, description, and metric labels.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// HTTP status.
    pub status: StatusCode,
    /// `error` field.
    pub error: &'static str,
    /// `error_description` field.
    pub description: String,
    /// `result` label of `tickgate_handshakes_total`.
    pub result: &'static str,
    /// `reason` label of `tickgate_auth_failures_total`, for token failures.
    pub auth_reason: Option<&'static str>,
}

impl Refusal {
    pub(crate) fn bad_request(description: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_request",
            description: description.into(),
            result: "bad_request",
            auth_reason: None,
        }
    }

    /// A 401 for a token failure.
    pub fn invalid_token(e: &AuthError) -> Refusal {
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_token",
            description: e.to_string(),
            result: "invalid_token",
            auth_reason: Some(e.reason()),
        }
    }

    pub(crate) fn unavailable(description: &str) -> Refusal {
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "unavailable",
            description: description.to_owned(),
            result: "unavailable",
            auth_reason: None,
        }
    }

    /// Renders the JSON response.
    pub fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            [(header::CACHE_CONTROL, "no-store")],
            axum::Json(json!({"error": self.error, "error_description": self.description})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // The description is our own text (never token material); quotes are removed
            // so it is a valid quoted-string.
            let desc: String = self.description.chars().filter(|c| *c != '"' && *c != '\\').collect();
            let v = format!("Bearer realm=\"tickgate\", error=\"invalid_token\", error_description=\"{desc}\"");
            if let Ok(v) = HeaderValue::from_str(&v) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        resp
    }
}

/// How the token was presented at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A bearer token, from `Authorization: Bearer` or the `bearer.<JWT>` subprotocol.
    Bearer(String),
    /// A one-time ticket from `?ticket=` (spec §3), redeemed instead of a token.
    Ticket(String),
    /// Nothing: in-band `auth` may follow where the server allows it.
    None,
}

/// What [`parse_upgrade`] reads from a well-formed upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The `Sec-WebSocket-Key`, checked to be base64 of 16 bytes; the 101 answer derives
    /// `Sec-WebSocket-Accept` from it.
    pub key: String,
    /// The one credential the request presents.
    pub credential: Credential,
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.to_str().map(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token))).unwrap_or(false))
}

/// RFC 6455 §4.1: the key is a random 16-byte nonce, base64-encoded (so 24 characters
/// with `==` padding). Decoding is canonical: stray trailing bits are refused too.
fn key_is_nonce(key: &str) -> bool {
    use base64::Engine as _;
    key.len() == 24 && base64::engine::general_purpose::STANDARD.decode(key).is_ok_and(|b| b.len() == 16)
}

/// Reads a WebSocket upgrade request head (RFC 6455 §4.2.1 plus spec §3): method, HTTP
/// version, `Host`, the upgrade headers, the key, the query and the one credential.
///
/// A pure function of the request head (no configuration, no I/O) so that every refusal
/// path can be unit-tested and fuzzed. The `Origin` allowlist needs configuration and is
/// checked by the caller. Every refusal is a 400 `invalid_request`.
pub fn parse_upgrade(
    method: &Method,
    version: http::Version,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Upgrade, Refusal> {
    let key = upgrade_key(method, version, headers)?;
    let credential = credential(query, headers)?;
    Ok(Upgrade { key: key.to_owned(), credential })
}

/// The request-shape half of [`parse_upgrade`]: method, version, `Host`, upgrade headers, key.
fn upgrade_key<'h>(method: &Method, version: http::Version, headers: &'h HeaderMap) -> Result<&'h str, Refusal> {
    if method != Method::GET {
        return Err(Refusal::bad_request("the stream endpoint takes GET"));
    }
    // `Version` orders HTTP/0.9 < 1.0 < 1.1 < 2 < 3.
    if version < http::Version::HTTP_11 {
        return Err(Refusal::bad_request("a WebSocket upgrade must use HTTP/1.1 or higher"));
    }
    match headers.get_all(header::HOST).iter().count() {
        0 => return Err(Refusal::bad_request("the Host header is required")),
        1 => {}
        // RFC 9112 §3.2: more than one Host is a 400 too.
        _ => return Err(Refusal::bad_request("more than one Host header")),
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return Err(Refusal::bad_request("not a WebSocket upgrade request"));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(Refusal::bad_request("Sec-WebSocket-Version must be 13"));
    }
    if headers.get_all(header::SEC_WEBSOCKET_KEY).iter().count() > 1 {
        return Err(Refusal::bad_request("more than one Sec-WebSocket-Key header"));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| k.len() == 24)
        .ok_or_else(|| Refusal::bad_request("missing or malformed Sec-WebSocket-Key"))?;
    if !key_is_nonce(key) {
        return Err(Refusal::bad_request("Sec-WebSocket-Key must be the base64 encoding of 16 bytes"));
    }
    Ok(key)
}

/// The credential half of [`parse_upgrade`]: query, subprotocols, `Authorization`.
fn credential(query: Option<&str>, headers: &HeaderMap) -> Result<Credential, Refusal> {
    let mut ticket = None;
    if let Some(q) = query {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(q).map_err(|_| Refusal::bad_request("malformed query string"))?;
        if pairs.iter().any(|(k, _)| k == "access_token") {
            return Err(Refusal::bad_request(
                "tokens in the URL are refused; use the Authorization header, the bearer subprotocol or a ticket",
            ));
        }
        let mut tickets = pairs.into_iter().filter(|(k, _)| k == "ticket").map(|(_, v)| v);
        ticket = tickets.next();
        if tickets.next().is_some() {
            return Err(Refusal::bad_request("more than one ticket"));
        }
    }

    // Subprotocols: `tickgate.v1` is required; at most one `bearer.<JWT>` entry.
    let mut has_proto = false;
    let mut proto_token: Option<String> = None;
    let mut proto_tokens = 0;
    for v in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let v = v.to_str().map_err(|_| Refusal::bad_request("malformed Sec-WebSocket-Protocol header"))?;
        for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if p == SUBPROTOCOL {
                has_proto = true;
            } else if let Some(t) = p.strip_prefix(BEARER_PROTOCOL_PREFIX) {
                proto_tokens += 1;
                proto_token = Some(t.to_owned());
            }
        }
    }
    if !has_proto {
        return Err(Refusal::bad_request(format!("the `{SUBPROTOCOL}` subprotocol is required")));
    }
    if proto_tokens > 1 {
        return Err(Refusal::bad_request("more than one bearer subprotocol"));
    }

    let header_token = bearer_token(headers)?.map(str::to_owned);
    let presented =
        usize::from(header_token.is_some()) + usize::from(proto_token.is_some()) + usize::from(ticket.is_some());
    if presented > 1 {
        return Err(Refusal::bad_request(
            "two credentials at once (Authorization header, bearer subprotocol, ticket: use exactly one)",
        ));
    }
    Ok(match (header_token.or(proto_token), ticket) {
        (Some(t), _) => Credential::Bearer(t),
        (None, Some(t)) => Credential::Ticket(t),
        (None, None) => Credential::None,
    })
}

/// [`parse_upgrade`] plus the `Origin` allowlist, which needs the configuration.
pub(crate) fn check_request(
    app: &AppState,
    method: &Method,
    version: http::Version,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<(String, Credential), Refusal> {
    // Same checks as `parse_upgrade`, with the origin between the request shape and the
    // credential: that is the documented order of answers (docs/protocol.md).
    let key = upgrade_key(method, version, headers)?;
    // Origin allowlist (browsers always send Origin; non-browser clients usually do not).
    let allowed = &app.config.security.allowed_origins;
    if !allowed.is_empty() {
        if let Some(origin) = headers.get(header::ORIGIN) {
            let ok = origin.to_str().map(|o| allowed.iter().any(|a| a == o)).unwrap_or(false);
            if !ok {
                return Err(Refusal {
                    status: StatusCode::FORBIDDEN,
                    error: "forbidden_origin",
                    description: "Origin is not allowed".into(),
                    result: "forbidden_origin",
                    auth_reason: None,
                });
            }
        }
    }
    Ok((key.to_owned(), credential(query, headers)?))
}

/// The principal a benchmark-only no-auth server gives every stream.
fn anonymous() -> Principal {
    Principal::unauthenticated("anonymous", "insecure-no-auth")
}

fn insufficient_scope() -> Refusal {
    Refusal {
        status: StatusCode::FORBIDDEN,
        error: "insufficient_scope",
        description: "token carries no md:read scope".into(),
        result: "insufficient_scope",
        auth_reason: None,
    }
}

/// Validates a bearer token (waiting for a JWKS refetch on an unknown `kid`) and checks it
/// may read something.
pub(crate) async fn authorize_token(app: &AppState, token: &str) -> Result<Principal, Refusal> {
    let p = app.validator.validate_async(token).await.map_err(|e| Refusal::invalid_token(&e))?;
    if !p.entitlements.has_any_read() {
        return Err(insufficient_scope());
    }
    Ok(p)
}

/// The token of an `Authorization: Bearer <token>` header, if there is one. Malformed,
/// repeated or non-Bearer headers are 400 `invalid_request`.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, Refusal> {
    let Some(v) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    if headers.get_all(header::AUTHORIZATION).iter().count() > 1 {
        return Err(Refusal::bad_request("more than one Authorization header"));
    }
    let v = v.to_str().map_err(|_| Refusal::bad_request("malformed Authorization header"))?;
    let (scheme, rest) = v.split_once(' ').ok_or_else(|| Refusal::bad_request("malformed Authorization header"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || rest.trim().is_empty() {
        return Err(Refusal::bad_request("Authorization must use the Bearer scheme"));
    }
    Ok(Some(rest.trim()))
}

/// Resolves the credential to a principal; `None` means in-band `auth` will follow.
/// `need_read`: the token must carry an `md:read` scope (the stream endpoint).
pub(crate) async fn authorize(app: &AppState, cred: Credential, need_read: bool) -> Result<Option<Principal>, Refusal> {
    if app.config.auth.insecure_no_auth {
        // Benchmark-only mode (loopback enforced by config validation): no token is
        // needed or checked; the principal reads everything and never expires.
        return Ok(Some(anonymous()));
    }
    match cred {
        Credential::Bearer(t) if need_read => authorize_token(app, &t).await.map(Some),
        Credential::Bearer(t) => {
            app.validator.validate_async(&t).await.map(Some).map_err(|e| Refusal::invalid_token(&e))
        }
        Credential::Ticket(t) => {
            let ticket_refusal = |description: String, reason: &'static str| Refusal {
                status: StatusCode::UNAUTHORIZED,
                error: "invalid_token",
                description,
                result: "invalid_token",
                auth_reason: Some(reason),
            };
            let now = jsonwebtoken::get_current_timestamp();
            let p = app.tickets.redeem(&t, now).map_err(|e| match e {
                TicketError::Expired => ticket_refusal(e.to_string(), "ticket_expired"),
                TicketError::Revoked => Refusal::invalid_token(&AuthError::Revoked),
                _ => ticket_refusal(e.to_string(), "bad_ticket"),
            })?;
            // The token behind the ticket may have expired since the ticket was issued:
            // its deadline is `exp` + grace, to the millisecond, as for a presented token.
            if app.validator.times().is_past_deadline(p.exp, tickgate_proto::now_ns() / 1_000_000) {
                return Err(Refusal::invalid_token(&AuthError::Expired));
            }
            // A ticket may stand for a publish-only token (publishers redeem tickets too);
            // the stream still needs a read scope.
            if need_read && !p.entitlements.has_any_read() {
                return Err(insufficient_scope());
            }
            Ok(Some(p))
        }
        Credential::None if need_read && app.config.auth.inband_timeout_ms > 0 => Ok(None),
        Credential::None => Err(Refusal::invalid_token(&AuthError::Missing)),
    }
}

/// `POST /v1/ticket`: exchanges a bearer token for a one-time ticket (single use, 30 s).
/// Any token that may read or publish something gets one: the stream and the publish
/// endpoints both redeem tickets and check their own scope then.
pub async fn ticket(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let outcome = match bearer_token(&headers) {
        Err(r) => Err(r),
        Ok(None) => Err(Refusal::invalid_token(&AuthError::Missing)),
        Ok(Some(t)) => app.validator.validate_async(t).await.map_err(|e| Refusal::invalid_token(&e)).and_then(|p| {
            if p.entitlements.has_any_read() || p.entitlements.has_any_publish() {
                Ok(p)
            } else {
                Err(Refusal {
                    description: "token carries no md:read or md:publish scope".into(),
                    ..insufficient_scope()
                })
            }
        }),
    };
    let principal = match outcome {
        Ok(p) => p,
        Err(r) => {
            if let Some(reason) = r.auth_reason {
                app.metrics.auth_failures.with_label_values(&[reason]).inc();
            }
            app.metrics.tickets.with_label_values(&[r.result]).inc();
            return r.into_response();
        }
    };
    match app.tickets.issue(principal) {
        Ok(ticket) => {
            app.metrics.tickets.with_label_values(&["issued"]).inc();
            (
                [(header::CACHE_CONTROL, "no-store")],
                axum::Json(json!({"ticket": ticket, "expires_in": TICKET_TTL.as_secs()})),
            )
                .into_response()
        }
        Err(e @ TicketError::SubjectLimit(_)) => {
            app.metrics.tickets.with_label_values(&["subject_limit"]).inc();
            let mut resp = Refusal {
                status: StatusCode::TOO_MANY_REQUESTS,
                error: "too_many_tickets",
                description: format!("{e}; each expires {} s after it was issued", TICKET_TTL.as_secs()),
                result: "subject_limit",
                auth_reason: None,
            }
            .into_response();
            // The oldest outstanding ticket is gone within one ticket lifetime.
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(TICKET_TTL.as_secs()));
            resp
        }
        Err(e) => {
            app.metrics.tickets.with_label_values(&["unavailable"]).inc();
            Refusal::unavailable(&e.to_string()).into_response()
        }
    }
}

/// Holds a connection's place in the server-wide, per-subject and per-IP counts and
/// releases it when dropped, so every exit path of the connection task (a panic, or the
/// runtime dropping the task at shutdown) gives the place back.
#[derive(Debug)]
pub struct ConnSlot {
    app: Arc<AppState>,
    sub: Option<String>,
    ip: Option<IpAddr>,
}

impl ConnSlot {
    /// Counts the slot against `sub` once in-band `auth` has named it.
    pub(crate) fn bind_subject(&mut self, sub: &str) -> Result<(), Refused> {
        self.app.admission.acquire(Some(sub), None)?;
        self.sub = Some(sub.to_owned());
        Ok(())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.app.admission.release(self.sub.as_deref(), self.ip);
        self.app.open_connections.fetch_sub(1, Ordering::AcqRel);
        self.app.metrics.connections.dec();
    }
}

fn too_many(description: String) -> Refusal {
    Refusal {
        status: StatusCode::TOO_MANY_REQUESTS,
        error: "too_many_connections",
        description,
        result: "too_many_connections",
        auth_reason: None,
    }
}

/// The per-address handshake rate limit (streams and publishers). It comes before any
/// token work, so a flood costs no signature checks.
pub(crate) fn check_connect_rate(app: &AppState, ip: Option<IpAddr>) -> Result<(), Refusal> {
    match ip {
        Some(ip) if app.admission.check_rate(ip).is_err() => Err(too_many(format!(
            "connection rate limit: at most {} handshakes per second from one address",
            app.config.limits.connect_rate_per_ip
        ))),
        _ => Ok(()),
    }
}

fn take_slot(app: &Arc<AppState>, sub: Option<&str>, ip: Option<IpAddr>) -> Result<ConnSlot, Refusal> {
    let max = app.config.limits.max_connections;
    let before = app.open_connections.fetch_add(1, Ordering::AcqRel);
    if before >= max {
        app.open_connections.fetch_sub(1, Ordering::AcqRel);
        return Err(too_many(format!("the server accepts at most {max} stream connections")));
    }
    if let Err(r) = app.admission.acquire(sub, ip) {
        app.open_connections.fetch_sub(1, Ordering::AcqRel);
        return Err(too_many(match r {
            Refused::Subject(n) => format!("at most {n} stream connections per subject"),
            Refused::Ip(n) => format!("at most {n} stream connections per source address"),
            Refused::Rate => "connection rate limit".into(),
        }));
    }
    app.metrics.connections.inc();
    Ok(ConnSlot { app: app.clone(), sub: sub.map(str::to_owned), ip })
}

/// The `GET /v1/stream` handler.
pub async fn stream(State(app): State<Arc<AppState>>, mut req: Request) -> Response {
    let started = Instant::now();
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
    let ip = peer.map(|p| p.ip());
    // The request head is read before the token is validated: validation may wait for a
    // JWKS refetch (unknown `kid`), and the request (not `Sync`) must not be borrowed
    // across that wait.
    let head = (|| {
        if app.draining.load(Ordering::Acquire) {
            return Err(Refusal::unavailable("server is draining"));
        }
        if app.validator.keys().is_empty() {
            return Err(Refusal::unavailable("signing keys not loaded yet"));
        }
        check_connect_rate(&app, ip)?;
        check_request(&app, req.method(), req.version(), req.uri().query(), req.headers())
    })();
    let outcome = match head {
        Err(r) => Err(r),
        Ok((key, cred)) => {
            async {
                let principal = authorize(&app, cred, true).await?;
                let Some(shard) = stream::current() else {
                    return Err(Refusal::unavailable("no shard on this thread"));
                };
                if shard.is_draining() {
                    return Err(Refusal::unavailable("server is draining"));
                }
                let slot = take_slot(&app, principal.as_ref().map(|p| p.sub.as_str()), ip)?;
                Ok((key, principal, shard, slot))
            }
            .await
        }
    };
    match outcome {
        Err(refusal) => {
            app.metrics.handshakes.with_label_values(&[refusal.result]).inc();
            if let Some(reason) = refusal.auth_reason {
                app.metrics.auth_failures.with_label_values(&[reason]).inc();
            }
            app.metrics.handshake_latency.with_label_values(&["refused"]).observe(started.elapsed().as_secs_f64());
            tracing::debug!(peer = ?peer, status = refusal.status.as_u16(), result = refusal.result,
                reason = refusal.auth_reason.unwrap_or(""), "stream handshake refused");
            refusal.into_response()
        }
        Ok((key, principal, shard, slot)) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            app.metrics.handshakes.with_label_values(&["ok"]).inc();
            app.metrics.handshake_latency.with_label_values(&["ok"]).observe(started.elapsed().as_secs_f64());
            let task = connection::run(shard, app.clone(), on_upgrade, principal, peer, slot);
            // The connection lives on this shard thread; the tracker lets shutdown wait
            // for it (drop-counted: the token is released when the task ends or is dropped).
            tokio::task::spawn_local(app.tracker.track_future(task));
            switching_protocols(&key)
        }
    }
}

/// The 101 answer to an accepted WebSocket upgrade.
pub(crate) fn switching_protocols(key: &str) -> Response {
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    // Only `tickgate.v1` is echoed, never the bearer entry.
    h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
    resp
}
