//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and (with `tickgate:admin`)
//! `POST /admin/revoke` and `GET /admin/connections`, which reach the shards through the
//! engine's non-owning [`crate::engine::EngineCtl`].
//!
//! It runs on the main runtime, away from the shard threads, so a scrape never competes
//! with dispatch for a shard's thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;
use crate::auth::validate::Principal;
use crate::sources::nats::revocations::{Applied, Apply, Outcome, Revocation, Target, MAX_PENDING};

/// The admin routes.
pub(crate) fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/admin/revoke", axum::routing::post(revoke))
        .route("/admin/connections", get(connections))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"error": "not_found"}))) })
        .with_state(app)
}

async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    // Shard gauges are sampled now rather than pushed, so they cost the shards nothing.
    let mut subs = 0;
    let mut waits = 0;
    for (i, s) in app.shards.iter().enumerate() {
        app.metrics.shard_queue_depth.with_label_values(&[&i.to_string()]).set(s.queue.len() as i64);
        app.metrics
            .timer_wheel_entries
            .with_label_values(&[&i.to_string()])
            .set(s.timers.load(Ordering::Relaxed) as i64);
        subs += s.subscriptions.load(Ordering::Relaxed);
        waits += s.backpressure_waits.load(Ordering::Relaxed);
    }
    app.metrics.subscriptions.set(subs as i64);
    app.metrics.ingest_backpressure.set(waits as i64);
    app.metrics.jwks_keys.set(app.validator.keys().len() as i64);
    if let Some(age) = app.jwks.as_ref().and_then(|j| j.age()) {
        app.metrics.jwks_age.set(age.as_secs_f64());
    }
    app.metrics.revocation_entries.set(app.validator.revocations().len() as i64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], app.metrics.render())
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    if app.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"})))
    } else if app.validator.keys().is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "keys not loaded"})))
    } else if let Err(why) = app.nats.status() {
        // NATS feeds warming up, refused, or cut off from NATS past `nats.unready_after_ms`.
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": why})))
    } else {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    }
}

/// Checks the admin bearer token (scope `tickgate:admin`) and returns who it is; refusals
/// are the same JSON and `WWW-Authenticate` answers as the stream handshake's.
async fn admin_auth(app: &AppState, headers: &HeaderMap) -> Result<Principal, Box<Response>> {
    use super::authorize::Refusal;
    use crate::auth::validate::AuthError;
    // Anything but one well-formed Bearer header counts as no token here (401).
    let token = super::authorize::bearer_token(headers).ok().flatten();
    let Some(token) = token else {
        crate::auth::failure::AuthFailure::Missing.count(&app.metrics);
        return Err(Box::new(Refusal::invalid_token(&AuthError::Missing).into_response()));
    };
    match app.validator.validate_async(token).await {
        Err(e) => {
            e.reason().count(&app.metrics);
            Err(Box::new(Refusal::invalid_token(&e).into_response()))
        }
        Ok(p) if !p.entitlements.is_admin() => Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "the tickgate:admin scope is required",
        ))),
        Ok(p) => Ok(p),
    }
}

/// The JSON error body every admin refusal carries.
fn json_error(status: StatusCode, error: &str, description: &str) -> Response {
    (status, Json(json!({"error": error, "error_description": description}))).into_response()
}

fn bad_request(description: &str) -> Response {
    json_error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

/// Largest `/admin/revoke` body accepted.
pub(crate) const MAX_REVOKE_BODY: usize = 4096;
/// Longest `sub` or `jti` a revocation may name (bytes).
pub(crate) const MAX_REVOKE_ID: usize = crate::sources::nats::revocations::MAX_ID_LEN;

/// `POST /admin/revoke` with `{"sub": "..."}` or `{"jti": "..."}`: remembers the
/// revocation (later handshakes, refreshes and ticket redemptions are refused), voids the
/// matching outstanding tickets, and closes the matching live streams and publishers with
/// 4003. Logs which admin revoked what (identifiers only, never a token). With NATS, it is
/// then stored in the cluster's bucket (`"cluster": "stored"`, 200) or queued while NATS is
/// unreachable (`"cluster": "pending"`, 202); see [`crate::sources::nats::revocations`].
async fn revoke(State(app): State<Arc<AppState>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let (result, resp) = revoke_answer(&app, &headers, &body).await;
    app.metrics.revoke_requests.with_label_values(&[result]).inc();
    resp
}

async fn revoke_answer(app: &AppState, headers: &HeaderMap, body: &[u8]) -> (&'static str, Response) {
    let admin = match admin_auth(app, headers).await {
        Ok(p) => p,
        Err(r) => {
            let label = if r.status() == StatusCode::FORBIDDEN { "forbidden" } else { "unauthorized" };
            return (label, *r);
        }
    };
    if body.len() > MAX_REVOKE_BODY {
        let d = format!("the body may be at most {MAX_REVOKE_BODY} bytes");
        return ("too_large", json_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", &d));
    }
    if !super::is_json(headers) {
        let d = "Content-Type must be application/json";
        return ("unsupported_media_type", json_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request", d));
    }
    let Ok(serde_json::Value::Object(v)) = serde_json::from_slice::<serde_json::Value>(body) else {
        return ("bad_request", bad_request("body must be a JSON object"));
    };
    if let Some(k) = v.keys().find(|k| *k != "sub" && *k != "jti") {
        let shown: String = k.chars().take(32).collect();
        return ("bad_request", bad_request(&format!("unknown field `{shown}`: give `sub` or `jti`")));
    }
    let field = |k: &str| match v.get(k) {
        None => Ok(None),
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_REVOKE_ID => Ok(Some(s.clone())),
        Some(_) => Err(format!("`{k}` must be a non-empty string of at most {MAX_REVOKE_ID} bytes")),
    };
    let (sub, jti) = match (field("sub"), field("jti")) {
        (Ok(s), Ok(j)) => (s, j),
        (Err(e), _) | (_, Err(e)) => return ("bad_request", bad_request(&e)),
    };
    if sub.is_some() == jti.is_some() {
        return ("bad_request", bad_request("give exactly one of `sub` and `jti`"));
    }
    let now = jsonwebtoken::get_current_timestamp();
    let target = match (sub, jti) {
        (Some(s), _) => Target::Sub(s),
        (_, Some(j)) => Target::Jti(j),
        _ => return ("bad_request", bad_request("give exactly one of `sub` and `jti`")),
    };
    let applied = match apply_revocation(app, &target, now, true).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(admin = %admin.sub, error = %e, "revocation refused: list full");
            return ("unavailable", json_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &e.to_string()));
        }
    };
    let (sub, jti) = target_parts(&target);
    let (streams_closed, publishers_closed, tickets_voided) =
        (applied.streams_closed, applied.publishers_closed, applied.tickets_voided);
    tracing::info!(admin = %admin.sub, target_sub = %sub.unwrap_or(""), target_jti = %jti.unwrap_or(""),
        streams_closed, publishers_closed, tickets_voided, "revocation applied");
    // Applied here first (above), then shared: a NATS outage never delays the local effect.
    let rev = Revocation { target: target.clone(), at: now, by: admin.sub.clone() };
    let cluster = app.cluster_revocations.store(&rev).await;
    let mut body = json!({
        "revoked": if sub.is_some() { "sub" } else { "jti" },
        "connections_closed": streams_closed + publishers_closed,
        "streams_closed": streams_closed,
        "publishers_closed": publishers_closed,
        "tickets_voided": tickets_voided,
    });
    if let (Some(c), Some(obj)) = (cluster.as_str(), body.as_object_mut()) {
        obj.insert("cluster".into(), json!(c));
    }
    match cluster {
        Outcome::Off | Outcome::Stored => ("ok", Json(body).into_response()),
        Outcome::Pending => {
            tracing::warn!(admin = %admin.sub, "revocation applied on this edge; NATS unreachable, the cluster write is queued");
            ("ok", (StatusCode::ACCEPTED, Json(body)).into_response())
        }
        Outcome::QueueFull => {
            if let Some(obj) = body.as_object_mut() {
                obj.insert("error".into(), json!("unavailable"));
                let d = format!(
                    "revoked on this edge only: {MAX_PENDING} revocations already wait for NATS; retry once NATS is back"
                );
                obj.insert("error_description".into(), json!(d));
            }
            ("unavailable", (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response())
        }
    }
}

fn target_parts(t: &Target) -> (Option<&str>, Option<&str>) {
    match t {
        Target::Sub(s) => (Some(s.as_str()), None),
        Target::Jti(j) => (None, Some(j.as_str())),
    }
}

/// What applying a revocation on this edge did.
#[derive(Debug, Clone, Copy)]
struct LocalApplied {
    /// The revocation list changed (false: it already held this one, or a later one).
    new: bool,
    streams_closed: usize,
    publishers_closed: usize,
    tickets_voided: usize,
}

/// Applies a revocation made at `at` on this edge: remembered in the revocation list, the
/// matching outstanding tickets voided, the matching live streams and publishers closed
/// with 4003. The admin call always does all of it (`always`); an entry from the cluster
/// only when it is new here, so seeing one again (our own write, or after a reconnect)
/// closes nothing (a client that came back with a fresh token stays).
async fn apply_revocation(
    app: &AppState,
    target: &Target,
    at: u64,
    always: bool,
) -> Result<LocalApplied, crate::auth::revocation::RevocationFull> {
    let now = jsonwebtoken::get_current_timestamp();
    let list = app.validator.revocations();
    let new = match target {
        Target::Sub(s) => list.revoke_sub_at(s, at, now)?,
        Target::Jti(j) => list.revoke_jti_at(j, at, now)?,
    };
    if !new && !always {
        return Ok(LocalApplied { new, streams_closed: 0, publishers_closed: 0, tickets_voided: 0 });
    }
    let (sub, jti) = target_parts(target);
    // Voided before the live connections are closed: a client cut off now cannot come
    // straight back with a ticket it fetched a moment ago.
    let tickets_voided = app.tickets.void(sub, jti);
    let closed = super::session::revoke_live(app, sub, jti).await;
    Ok(LocalApplied { new, streams_closed: closed.streams, publishers_closed: closed.publishers, tickets_voided })
}

/// The cluster watcher's way in: an entry from the `tickgate_revocations` bucket applied
/// through the admin call's own path ([`apply_revocation`]), only when new here.
pub(crate) fn cluster_apply(app: &Arc<AppState>) -> Apply {
    let app = app.clone();
    Arc::new(move |rev: Revocation| {
        let app = app.clone();
        Box::pin(async move {
            match apply_revocation(&app, &rev.target, rev.at, false).await {
                Ok(a) if a.new => {
                    tracing::info!(
                        streams_closed = a.streams_closed,
                        publishers_closed = a.publishers_closed,
                        tickets_voided = a.tickets_voided,
                        "cluster revocation closed this edge's matching sessions"
                    );
                    Applied::New
                }
                Ok(_) => Applied::Known,
                Err(_) => Applied::ListFull,
            }
        })
    })
}

#[derive(serde::Deserialize)]
struct Page {
    /// Entries per page (1-1000, default 100).
    limit: Option<usize>,
    /// Return sessions after this one (the previous page's `next`).
    after: Option<String>,
}

/// `GET /admin/connections?limit=N&after=SESSION`: every stream connection (subject,
/// shard, subscriptions, queued bytes, token expiry), ordered by session id, paginated with
/// a cursor. Requires `tickgate:admin`.
async fn connections(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    page: Result<axum::extract::Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = admin_auth(&app, &headers).await {
        return *r;
    }
    // axum's own rejection is a plain-text 400; every answer here is JSON.
    let Ok(axum::extract::Query(page)) = page else {
        return bad_request("limit must be an integer between 1 and 1000, after a session id");
    };
    let limit = page.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return bad_request("limit must be between 1 and 1000");
    }
    let mut all = app.engine.connections().await;
    all.sort_by(|a, b| a.session.cmp(&b.session));
    let total = all.len();
    let start = match &page.after {
        Some(after) => all.partition_point(|c| c.session.as_str() <= after.as_str()),
        None => 0,
    };
    let items: Vec<_> = all.into_iter().skip(start).take(limit).collect();
    let next = (start + items.len() < total).then(|| items.last().map(|c| c.session.clone())).flatten();
    Json(json!({"total": total, "connections": items, "next": next})).into_response()
}
