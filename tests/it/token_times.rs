//! The time claims of a token (`exp`, `iat`, lifetime) at every place a token is
//! validated: what `auth.leeway_s` and `auth.expiry_grace_ms` cover, and what they do not.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tickgate_client::Event;
use tickgate_proto::control::{ErrorCode, ServerMsg};
use tokio_tungstenite::tungstenite::Message;

/// Every scope the tests need: read T, publish P, admin.
const ALL: &str = "md:read:T md:publish:P tickgate:admin";

/// A token signed by the server's issuer with these `iat`/`exp` (and the other claims
/// a valid access token has).
fn token(ts: &TestServer, iat: u64, exp: u64) -> String {
    ts.token_with("timer", ALL, iat, exp, &format!("t-{iat}-{exp}"))
}

async fn expired_count(ts: &TestServer, reason: &str) -> f64 {
    ts.metric(&format!("tickgate_auth_failures_total{{reason=\"{reason}\"}}")).await
}

/// Leeway 30 s, a token 5 s past `exp`: refused with 401 `expired` at the stream handshake,
/// `/v1/ticket`, `/v1/publish`, the admin API and in-band `auth`, each counted. (Before the
/// fix: 101 and `welcome`, then 4001 a few ms later.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leeway_does_not_extend_exp_anywhere() {
    let ts = TestServer::start_with_feeds(50.0, &[("p.toml", publish_toml("P", 9, 2, "disconnect", 100))], |c| {
        c.auth.leeway_s = 30;
        c.auth.inband_timeout_ms = 5_000;
    })
    .await;
    let now = unix_now();
    let dead = token(&ts, now - 60, now - 5);
    let before = expired_count(&ts, "expired").await;

    let (s, body) = bearer_handshake(&ts, &dead).await;
    assert_eq!(
        (s, body["error"].as_str(), body["error_description"].as_str()),
        (401, Some("invalid_token"), Some("token expired"))
    );

    let r = reqwest::Client::new().post(format!("{}/v1/ticket", ts.base)).bearer_auth(&dead).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["error"].as_str(), body["error_description"].as_str()),
        (Some("invalid_token"), Some("token expired"))
    );

    let (s, body) = publish_handshake(&ts, "?feed=P", &dead).await;
    assert_eq!(
        (s, body["error"].as_str(), body["error_description"].as_str()),
        (401, Some("invalid_token"), Some("token expired"))
    );

    let r =
        reqwest::Client::new().get(format!("{}/admin/connections", ts.admin)).bearer_auth(&dead).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["error"].as_str(), body["error_description"].as_str()),
        (Some("invalid_token"), Some("token expired"))
    );

    let mut ws = raw_stream(&ts, None).await;
    ws.send(Message::text(json!({"op": "auth", "token": dead}).to_string())).await.unwrap();
    assert_eq!(close_frame(&mut ws).await, (4004, "invalid_token: token expired".to_owned()));

    assert_eq!(expired_count(&ts, "expired").await, before + 5.0, "each refusal counted as `expired`");
    // The same token 5 s before exp is fine everywhere (the refusals are about exp).
    let live = token(&ts, now - 60, now + 60);
    assert_eq!(bearer_handshake(&ts, &live).await.0, 101);
    ts.shutdown().await;
}

/// Leeway 0: a token whose `exp` second has just passed is refused, although the current
/// whole second still equals `exp` (jsonwebtoken's check accepted it for up to a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exp_is_checked_in_milliseconds() {
    let ts = TestServer::start(50.0, |c| c.auth.leeway_s = 0).await;
    // Wait for a moment at least 100 ms into a second, so `exp = now_s` lies >= 100 ms in
    // the past however long the handshake then takes.
    let now_s = eventually("100 ms into a second", EVENTUALLY, || async {
        let ns = unix_now_ns();
        (ns % 1_000_000_000 >= 100_000_000).then_some(ns / 1_000_000_000)
    })
    .await;
    let before = expired_count(&ts, "expired").await;
    let (s, body) = bearer_handshake(&ts, &token(&ts, now_s - 10, now_s)).await;
    assert_eq!((s, body["error_description"].as_str()), (401, Some("token expired")));
    assert_eq!(expired_count(&ts, "expired").await, before + 1.0);
    ts.shutdown().await;
}

/// `auth.expiry_grace_ms` is the slack after `exp`, at the handshake as on a live
/// connection: within it a token is accepted, past it refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_is_the_only_slack_after_exp() {
    let ts = TestServer::start(50.0, |c| {
        c.auth.leeway_s = 0;
        c.auth.expiry_grace_ms = 10_000;
    })
    .await;
    let now = unix_now();
    // 1-2 s past exp: inside the 10 s grace.
    let mut sub = ts.subscriber(&token(&ts, now - 60, now - 1)).await;
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Welcome { .. }));
    // 12-13 s past exp: past exp + grace.
    let (s, body) = bearer_handshake(&ts, &token(&ts, now - 60, now - 12)).await;
    assert_eq!((s, body["error_description"].as_str()), (401, Some("token expired")));
    ts.shutdown().await;
}

/// A refresh with a token past its deadline (but within the leeway) is refused with
/// `error invalid_token` and the old deadline stays in force: the connection keeps
/// streaming. (Before the fix: `refreshed` with an `exp` in the past, then 4001.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_refresh_token_is_refused_and_the_stream_goes_on() {
    let ts = TestServer::start(500.0, |c| c.auth.leeway_s = 30).await;
    let now = unix_now();
    let (mut sub, r) = subscribed(&ts, &token(&ts, now, now + 120), "T", json!(["*"]), false).await;
    assert!(matches!(r, ServerMsg::Subscribed { .. }), "{r:?}");
    sub.send_json(&json!({"op": "refresh", "id": 7, "token": token(&ts, now - 60, now - 5)})).await.unwrap();
    match next_control(&mut sub).await {
        ServerMsg::Error { id, code, message } => {
            assert_eq!((id, code, message.as_str()), (Some(7), ErrorCode::InvalidToken, "token expired"))
        }
        m => panic!("expected a refusal, got {m:?}"),
    }
    // Still streaming: data keeps coming and a ping is answered (a close would end this).
    let mut batches = 0;
    while batches < 5 {
        match tokio::time::timeout(EVENTUALLY, sub.next_event()).await.expect("data in time").unwrap() {
            Event::Batch { .. } => batches += 1,
            Event::Control(m) => panic!("unexpected {m:?}"),
            Event::Closed { code, reason } => panic!("closed {code} {reason} after a refused refresh"),
        }
    }
    sub.send_json(&json!({"op": "ping", "id": 8})).await.unwrap();
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Pong { id: Some(8), .. }));
    assert!(ts.wait_metric("tickgate_token_refreshes_total{result=\"refused\"}", 1.0).await >= 1.0);
    ts.shutdown().await;
}

/// An `iat` further in the future than the leeway is refused (`iat_in_future`); within the
/// leeway it is clock skew and accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_iat_beyond_the_leeway_is_refused() {
    let ts = TestServer::start(50.0, |c| c.auth.leeway_s = 30).await;
    let now = unix_now();
    let before = expired_count(&ts, "iat_in_future").await;
    let (s, body) = bearer_handshake(&ts, &token(&ts, now + 120, now + 300)).await;
    assert_eq!(
        (s, body["error"].as_str(), body["error_description"].as_str()),
        (401, Some("invalid_token"), Some("token issued in the future"))
    );
    assert_eq!(expired_count(&ts, "iat_in_future").await, before + 1.0);
    assert_eq!(bearer_handshake(&ts, &token(&ts, now + 20, now + 300)).await.0, 101, "skew within the leeway");
    ts.shutdown().await;
}

/// The lifetime is `exp - min(iat, now)`: a future `iat` (within the leeway) cannot stretch
/// a token past `auth.max_lifetime_s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_counts_from_the_earlier_of_iat_and_now() {
    let ts = TestServer::start(50.0, |c| {
        c.auth.leeway_s = 30;
        c.auth.max_lifetime_s = 600;
        c.issuer.token_ttl_s = 300;
    })
    .await;
    let now = unix_now();
    let before = expired_count(&ts, "lifetime_too_long").await;
    // exp - iat = 590 s, but exp - now = 610 s.
    let (s, body) = bearer_handshake(&ts, &token(&ts, now + 20, now + 610)).await;
    assert_eq!((s, body["error_description"].as_str()), (401, Some("token lifetime exceeds 600 s")));
    assert_eq!(expired_count(&ts, "lifetime_too_long").await, before + 1.0);
    // exp - now = 590 s: fine.
    assert_eq!(bearer_handshake(&ts, &token(&ts, now + 20, now + 590)).await.0, 101);
    // A past iat still counts from iat.
    let (s, _) = bearer_handshake(&ts, &token(&ts, now - 100, now + 550)).await;
    assert_eq!(s, 401, "650 s from iat");
    ts.shutdown().await;
}
