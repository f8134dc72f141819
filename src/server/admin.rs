//! The admin listener: `/metrics`, `/healthz`, `/readyz`.
//!
//! It runs on the main runtime, away from the shard threads, so a scrape never competes
//! with dispatch for a shard's thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
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
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"error": "not_found"}))) })
        .with_state(app)
}

async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    // Shard gauges are sampled now rather than pushed, so they cost the shards nothing.
    let mut subs = 0;
    let mut waits = 0;
    for (i, s) in app.shards.iter().enumerate() {
        app.metrics
            .shard_queue_depth
            .with_label_values(&[&i.to_string()])
            .set(s.queue.len() as i64);
        subs += s.subscriptions.load(Ordering::Relaxed);
        waits += s.backpressure_waits.load(Ordering::Relaxed);
    }
    app.metrics.subscriptions.set(subs as i64);
    app.metrics.ingest_backpressure.set(waits as i64);
    app.metrics.jwks_keys.set(app.validator.keys().len() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    if app.draining.load(Ordering::Acquire) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
    } else if app.validator.keys().is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "keys not loaded"})),
        )
    } else {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    }
}
