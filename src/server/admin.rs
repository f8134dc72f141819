//! The admin listener: `/metrics`, `/healthz`, `/readyz`.
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

/// The admin routes.
pub fn router(app: Arc<AppState>) -> Router {
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
    } else {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    }
}

/// Checks the admin bearer token (scope `tickgate:admin`); refusals are the same JSON and
/// `WWW-Authenticate` answers as the stream handshake's.
fn admin_auth(app: &AppState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    use super::handshake::Refusal;
    use crate::auth::validate::AuthError;
    // Anything but one well-formed Bearer header counts as no token here (401).
    let token = super::handshake::bearer_token(headers).ok().flatten();
    let Some(token) = token else {
        app.metrics.auth_failures.with_label_values(&["missing"]).inc();
        return Err(Box::new(Refusal::invalid_token(&AuthError::Missing).into_response()));
    };
    match app.validator.validate(token) {
        Err(e) => {
            app.metrics.auth_failures.with_label_values(&[e.reason()]).inc();
            Err(Box::new(Refusal::invalid_token(&e).into_response()))
        }
        Ok(p) if !p.entitlements.is_admin() => Err(Box::new(
            (
                StatusCode::FORBIDDEN,
                Json(
                    json!({"error": "insufficient_scope", "error_description": "the tickgate:admin scope is required"}),
                ),
            )
                .into_response(),
        )),
        Ok(_) => Ok(()),
    }
}

fn bad_request(description: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_request", "error_description": description})))
        .into_response()
}

/// `POST /admin/revoke` with `{"sub": "..."}` or `{"jti": "..."}`: remembers the
/// revocation (later handshakes and refreshes are refused) and closes the matching live
/// connections with 4003.
async fn revoke(State(app): State<Arc<AppState>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(r) = admin_auth(&app, &headers) {
        return *r;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return bad_request("body must be a JSON object");
    };
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).filter(|s| !s.is_empty()).map(str::to_owned);
    let (sub, jti) = (field("sub"), field("jti"));
    if sub.is_some() == jti.is_some() {
        return bad_request("give exactly one of `sub` and `jti` (non-empty strings)");
    }
    let now = jsonwebtoken::get_current_timestamp();
    let stored = match (&sub, &jti) {
        (Some(s), _) => app.validator.revocations().revoke_sub(s, now),
        (_, Some(j)) => app.validator.revocations().revoke_jti(j, None, now),
        _ => Ok(()),
    };
    if let Err(e) = stored {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "unavailable", "error_description": e.to_string()})),
        )
            .into_response();
    }
    let mut replies = Vec::new();
    for ctl in &app.shard_ctl {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let msg = crate::engine::shard::ShardCtl::Revoke { sub: sub.clone(), jti: jti.clone(), reply: tx };
        if ctl.send(msg).await.is_ok() {
            replies.push(rx);
        }
    }
    let mut closed = 0;
    for rx in replies {
        if let Ok(Ok(n)) = tokio::time::timeout(std::time::Duration::from_secs(1), rx).await {
            closed += n;
        }
    }
    tracing::info!(by_sub = sub.is_some(), closed, "revocation applied");
    Json(json!({"revoked": if sub.is_some() { "sub" } else { "jti" }, "connections_closed": closed})).into_response()
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
    if let Err(r) = admin_auth(&app, &headers) {
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
    let mut replies = Vec::new();
    for ctl in &app.shard_ctl {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if ctl.send(crate::engine::shard::ShardCtl::ListConnections { reply: tx }).await.is_ok() {
            replies.push(rx);
        }
    }
    let mut all = Vec::new();
    for rx in replies {
        if let Ok(Ok(mut v)) = tokio::time::timeout(std::time::Duration::from_secs(1), rx).await {
            all.append(&mut v);
        }
    }
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
