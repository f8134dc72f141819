//! Who may hold a connection: what both the stream handshake and a connection task
//! (in-band `auth`) need, kept apart from both so neither imports the other. Holds
//! [`Refusal`] (an HTTP refusal and its metric labels), [`Credential`] (how a token was
//! presented), `authorize` / `authorize_token` / `bearer_token` (token to
//! principal; a ticket's token is held to its session `Deadline`), [`ConnSlot`] (a
//! connection's place in the admission counts, released on drop), `take_slot` and
//! `check_connect_rate`, and [`HandshakeResult`] (the `result` label of the handshake and
//! ticket counters, primed by `prime_metrics`).

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::limits::Refused;
use super::session::Deadline;
use super::AppState;
use crate::auth::failure::AuthFailure;
use crate::auth::tickets::TicketError;
use crate::auth::validate::{AuthError, Principal};

/// A handshake refusal: status, OAuth-style error code, description, and metric labels.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// HTTP status.
    pub status: StatusCode,
    /// `error` field.
    pub error: &'static str,
    /// `error_description` field.
    pub description: String,
    /// `result` label of `tickgate_handshakes_total` (and of the publish and ticket
    /// counters).
    pub result: HandshakeResult,
    /// `reason` label of `tickgate_auth_failures_total`, for token failures.
    pub auth_reason: Option<AuthFailure>,
}

impl Refusal {
    pub(crate) fn bad_request(description: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_request",
            description: description.into(),
            result: HandshakeResult::BadRequest,
            auth_reason: None,
        }
    }

    /// A 401 for a token failure.
    pub fn invalid_token(e: &AuthError) -> Refusal {
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_token",
            description: e.to_string(),
            result: HandshakeResult::InvalidToken,
            auth_reason: Some(e.reason()),
        }
    }

    pub(crate) fn unavailable(description: &str) -> Refusal {
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "unavailable",
            description: description.to_owned(),
            result: HandshakeResult::Unavailable,
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

/// How a request that presents a credential was answered: the `result` label of
/// `tickgate_handshakes_total` (streams), `tickgate_publish_handshakes_total` and
/// `tickgate_tickets_total`. Each counter has its own set of values
/// ([`HandshakeResult::STREAM`], [`HandshakeResult::PUBLISH`], [`HandshakeResult::TICKET`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeResult {
    /// Accepted (streams and publishers).
    Ok,
    /// A ticket was issued.
    Issued,
    /// A malformed request.
    BadRequest,
    /// No valid token or ticket.
    InvalidToken,
    /// The token lacks the scope the endpoint needs.
    InsufficientScope,
    /// `Origin` outside `security.allowed_origins`.
    ForbiddenOrigin,
    /// An admission limit (server, subject or address).
    TooManyConnections,
    /// A publish to a feed that does not exist.
    UnknownFeed,
    /// A publish to a feed that has a publisher or its own source.
    Conflict,
    /// The subject holds its most outstanding tickets.
    SubjectLimit,
    /// Draining, no keys yet, or no shard.
    Unavailable,
}

impl HandshakeResult {
    /// The values of `tickgate_handshakes_total{result}`, in the order they are primed.
    pub const STREAM: [HandshakeResult; 7] = [
        HandshakeResult::Ok,
        HandshakeResult::BadRequest,
        HandshakeResult::InvalidToken,
        HandshakeResult::InsufficientScope,
        HandshakeResult::ForbiddenOrigin,
        HandshakeResult::TooManyConnections,
        HandshakeResult::Unavailable,
    ];
    /// The values of `tickgate_publish_handshakes_total{result}`.
    pub const PUBLISH: [HandshakeResult; 8] = [
        HandshakeResult::Ok,
        HandshakeResult::BadRequest,
        HandshakeResult::InvalidToken,
        HandshakeResult::InsufficientScope,
        HandshakeResult::UnknownFeed,
        HandshakeResult::Conflict,
        HandshakeResult::TooManyConnections,
        HandshakeResult::Unavailable,
    ];
    /// The values of `tickgate_tickets_total{result}`.
    pub const TICKET: [HandshakeResult; 6] = [
        HandshakeResult::Issued,
        HandshakeResult::InvalidToken,
        HandshakeResult::InsufficientScope,
        HandshakeResult::BadRequest,
        HandshakeResult::SubjectLimit,
        HandshakeResult::Unavailable,
    ];

    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            HandshakeResult::Ok => "ok",
            HandshakeResult::Issued => "issued",
            HandshakeResult::BadRequest => "bad_request",
            HandshakeResult::InvalidToken => "invalid_token",
            HandshakeResult::InsufficientScope => "insufficient_scope",
            HandshakeResult::ForbiddenOrigin => "forbidden_origin",
            HandshakeResult::TooManyConnections => "too_many_connections",
            HandshakeResult::UnknownFeed => "unknown_feed",
            HandshakeResult::Conflict => "conflict",
            HandshakeResult::SubjectLimit => "subject_limit",
            HandshakeResult::Unavailable => "unavailable",
        }
    }
}

/// Exports the handshake and ticket counters at zero for every result they count.
pub(crate) fn prime_metrics(metrics: &crate::metrics::Metrics) {
    for r in HandshakeResult::STREAM {
        metrics.handshakes.with_label_values(&[r.as_str()]);
    }
    for r in HandshakeResult::PUBLISH {
        metrics.publish_handshakes.with_label_values(&[r.as_str()]);
    }
    for r in HandshakeResult::TICKET {
        metrics.tickets.with_label_values(&[r.as_str()]);
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

/// The principal a benchmark-only no-auth server gives every stream.
fn anonymous() -> Principal {
    Principal::unauthenticated("anonymous", "insecure-no-auth")
}

/// The 403 for a token that may read nothing.
pub(crate) fn insufficient_scope() -> Refusal {
    Refusal {
        status: StatusCode::FORBIDDEN,
        error: "insufficient_scope",
        description: "token carries no md:read scope".into(),
        result: HandshakeResult::InsufficientScope,
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
            let ticket_refusal = |description: String, reason: AuthFailure| Refusal {
                status: StatusCode::UNAUTHORIZED,
                error: "invalid_token",
                description,
                result: HandshakeResult::InvalidToken,
                auth_reason: Some(reason),
            };
            let now = jsonwebtoken::get_current_timestamp();
            let p = app.tickets.redeem(&t, now).map_err(|e| match e {
                TicketError::Expired => ticket_refusal(e.to_string(), AuthFailure::TicketExpired),
                TicketError::Revoked => Refusal::invalid_token(&AuthError::Revoked),
                _ => ticket_refusal(e.to_string(), AuthFailure::BadTicket),
            })?;
            // The token behind the ticket may have expired since the ticket was issued:
            // its deadline is `exp` + grace, to the millisecond, as for a presented token.
            if Deadline::of(app.validator.times(), p.exp).is_past(tickgate_proto::now_ns() / 1_000_000) {
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
        result: HandshakeResult::TooManyConnections,
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

pub(crate) fn take_slot(app: &Arc<AppState>, sub: Option<&str>, ip: Option<IpAddr>) -> Result<ConnSlot, Refusal> {
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
