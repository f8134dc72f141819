//! `GET /v1/stream`: the stream handshake (spec §3).
//!
//! Every check happens before the upgrade and every refusal is an HTTP answer with a JSON
//! body `{"error","error_description"}`; a 401 also carries `WWW-Authenticate` (RFC 6750).
//! The token is validated exactly once, here; the connection keeps only the decoded
//! principal. Who may connect (refusals, credentials, token checks, admission slots) is
//! in [`super::authorize`], shared with the connection task's in-band `auth`; this module
//! parses the upgrade, answers `POST /v1/ticket`, and hands an accepted upgrade to
//! `super::connection`. The publish endpoint shares the request checks
//! (`check_request`, `switching_protocols`) and [`PeerAddr`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::authorize::{
    authorize, bearer_token, check_connect_rate, insufficient_scope, take_slot, Credential, HandshakeResult, Refusal,
};
use super::connection;
use super::{AppState, LogPeer};

use crate::auth::tickets::{TicketError, TICKET_TTL};
use crate::auth::validate::AuthError;
use crate::engine::stream;
use tickgate_proto::{BEARER_PROTOCOL_PREFIX, SUBPROTOCOL};

/// The peer address of an accepted socket, put into request extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

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
                    result: HandshakeResult::ForbiddenOrigin,
                    auth_reason: None,
                });
            }
        }
    }
    Ok((key.to_owned(), credential(query, headers)?))
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
                reason.count(&app.metrics);
            }
            app.metrics.tickets.with_label_values(&[r.result.as_str()]).inc();
            return r.into_response();
        }
    };
    match app.tickets.issue(principal) {
        Ok(ticket) => {
            app.metrics.tickets.with_label_values(&[HandshakeResult::Issued.as_str()]).inc();
            (
                [(header::CACHE_CONTROL, "no-store")],
                axum::Json(json!({"ticket": ticket, "expires_in": TICKET_TTL.as_secs()})),
            )
                .into_response()
        }
        Err(e @ TicketError::SubjectLimit(_)) => {
            app.metrics.tickets.with_label_values(&[HandshakeResult::SubjectLimit.as_str()]).inc();
            let mut resp = Refusal {
                status: StatusCode::TOO_MANY_REQUESTS,
                error: "too_many_tickets",
                description: format!("{e}; each expires {} s after it was issued", TICKET_TTL.as_secs()),
                result: HandshakeResult::SubjectLimit,
                auth_reason: None,
            }
            .into_response();
            // The oldest outstanding ticket is gone within one ticket lifetime.
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(TICKET_TTL.as_secs()));
            resp
        }
        Err(e) => {
            app.metrics.tickets.with_label_values(&[HandshakeResult::Unavailable.as_str()]).inc();
            Refusal::unavailable(&e.to_string()).into_response()
        }
    }
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
            app.metrics.handshakes.with_label_values(&[refusal.result.as_str()]).inc();
            if let Some(reason) = refusal.auth_reason {
                reason.count(&app.metrics);
            }
            app.metrics.handshake_latency.with_label_values(&["refused"]).observe(started.elapsed().as_secs_f64());
            tracing::debug!(peer = %LogPeer(peer), status = refusal.status.as_u16(), result = refusal.result.as_str(),
                reason = refusal.auth_reason.map_or("", |r| r.as_str()), "stream handshake refused");
            refusal.into_response()
        }
        Ok((key, principal, shard, slot)) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            app.metrics.handshakes.with_label_values(&[HandshakeResult::Ok.as_str()]).inc();
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
