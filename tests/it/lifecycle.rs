//! Token lifecycle on live connections: expiry, refresh, scope changes, revocation.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tickgate_client::Event;
use tickgate_proto::control::{ErrorCode, ServerMsg};

/// A 3-second token: `token_expiring` once, not before 80 % of its life and before the
/// close; close 4001 not before the deadline (less the wheel's early decision), and no
/// batch stamped after it. How late the close comes is a figure of the machine, measured
/// by `cargo bench --bench expiry`, not asserted here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_closes_4001_and_no_data_after() {
    let ts = TestServer::start(2000.0, |_| {}).await;
    // exp is whole seconds: `now + 3` is 2 to 3 s away.
    let now = unix_now();
    let (iat, exp) = (now, now + 3);
    let token = ts.token_with("expiring", "md:read:T", iat, exp, "e1");
    let (mut sub, _) = subscribed(&ts, &token, "T", json!(["*"]), false).await;
    let deadline_ns = exp * 1_000_000_000;
    let mut notices = Vec::new();
    let mut last_send_ts = 0;
    let (code, closed_at) = loop {
        match tokio::time::timeout(EVENTUALLY, sub.next_event()).await.unwrap().unwrap() {
            Event::Control(ServerMsg::TokenExpiring { exp: e }) => {
                assert_eq!(e, exp);
                notices.push(unix_now_ns());
            }
            Event::Control(m) => panic!("unexpected {m:?}"),
            Event::Batch { send_ts_ns, anomalies, .. } => {
                assert!(anomalies.is_empty());
                last_send_ts = send_ts_ns;
            }
            Event::Closed { code, .. } => break (code, unix_now_ns()),
        }
    };
    assert_eq!(code, 4001);
    // The wheel decides the close up to two ticks (20 ms) before the deadline so that no
    // batch can be written after it.
    assert!(closed_at + 30_000_000 >= deadline_ns, "closed {} ms early", (deadline_ns - closed_at) / 1_000_000);
    assert!(last_send_ts > 0 && last_send_ts <= deadline_ns, "a batch was written after the deadline");
    assert_eq!(notices.len(), 1, "token_expiring exactly once");
    // Scheduled at 80-90 % of the lifetime: never received before 80 %. (It arrives before
    // the close by construction of the loop above; how soon after 90 % it can arrive
    // depends on the machine.)
    let life_ns = (exp - iat) * 1_000_000_000;
    let at = notices[0] - iat * 1_000_000_000;
    assert!(at >= life_ns * 8 / 10, "notice at {} ms of {} ms", at / 1_000_000, life_ns / 1_000_000);
    assert!(ts.wait_metric("tickgate_token_expiries_total", 1.0).await >= 1.0);
    assert_eq!(ts.wait_metric("tickgate_closes_total{code=\"4001\"}", 1.0).await, 1.0);
    ts.shutdown().await;
}

/// Refreshing before exp keeps the connection across several token lifetimes with a
/// gap-free stream; when refreshes stop, the last token's exp closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_keeps_the_stream_alive_across_lifetimes() {
    let ts = TestServer::start(2000.0, |_| {}).await;
    let now = unix_now();
    // exp is whole seconds: `now + 3` is 2 to 3 s away, more than a 1.2 s round.
    let token = ts.token_with("refresher", "md:read:T", now, now + 3, "r0");
    let (mut sub, _) = subscribed(&ts, &token, "T", json!(["*"]), false).await;
    let started = std::time::Instant::now();
    let mut last_exp = now + 3;
    for round in 1..=4u64 {
        // Read for ~1.2 s, then refresh with a token that lives 2-3 s from now. The wait is
        // the behaviour under test (the stream lives on across token lifetimes on the wall
        // clock), not synchronisation.
        let (records, anomalies) = drain_for(&mut sub, Duration::from_millis(1200)).await;
        assert!(records > 0 && anomalies == 0, "round {round}: {records} records, {anomalies} anomalies");
        let n = unix_now();
        last_exp = n + 3;
        let t = ts.token_with("refresher", "md:read:T", n, last_exp, &format!("r{round}"));
        sub.send_json(&json!({"op": "refresh", "id": round, "token": t})).await.unwrap();
        match next_control(&mut sub).await {
            ServerMsg::Refreshed { id, exp, feeds } => {
                assert_eq!((id, exp), (Some(round as i64), last_exp));
                assert_eq!(feeds.len(), 1);
            }
            m => panic!("expected refreshed, got {m:?}"),
        }
    }
    assert!(started.elapsed() > Duration::from_secs(4), "outlived the first token");
    // Stop refreshing: closed at the last token's exp.
    let code = wait_close(&mut sub, EVENTUALLY).await;
    assert_eq!(code, 4001);
    assert!(unix_now_ns() + 30_000_000 >= last_exp * 1_000_000_000);
    assert!(ts.wait_metric("tickgate_token_refreshes_total{result=\"ok\"}", 4.0).await >= 4.0);
    ts.shutdown().await;
}

/// Refused refreshes leave the old deadline in force. Each refusal is tried on its own
/// connection, so no test waits out the one-refresh-per-second limit (which the first
/// connection checks: its second attempt comes at once and is rate limited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_refreshes_keep_the_old_deadline() {
    let ts = TestServer::start(500.0, |_| {}).await;
    let now = unix_now();
    let exp = now + 3;
    let token = ts.token_with("alice", "md:read:T", now, exp, "a0");
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(subscribed(&ts, &token, "T", json!(["S0"]), false).await.0);
    }

    let refresh = |id: i64, t: String| json!({"op": "refresh", "id": id, "token": t});
    let expect_refused = |m: ServerMsg, id: i64, code: ErrorCode| match m {
        ServerMsg::Error { id: got, code: c, message } => {
            assert_eq!((got, c), (Some(id), code), "{message}");
        }
        m => panic!("expected refusal, got {m:?}"),
    };
    // Another subject.
    subs[0].send_json(&refresh(1, ts.token_with("mallory", "md:read:T", now, now + 60, "m"))).await.unwrap();
    expect_refused(next_control(&mut subs[0]).await, 1, ErrorCode::InvalidToken);
    // Too soon after the previous attempt (a valid token, but the limit comes first).
    subs[0].send_json(&refresh(2, ts.token_with("alice", "md:read:T", now, now + 60, "a1"))).await.unwrap();
    expect_refused(next_control(&mut subs[0]).await, 2, ErrorCode::RateLimited);
    // Expired.
    subs[1].send_json(&refresh(3, ts.token_with("alice", "md:read:T", now - 100, now - 50, "a2"))).await.unwrap();
    expect_refused(next_control(&mut subs[1]).await, 3, ErrorCode::InvalidToken);
    // Bad signature.
    let forged = forge_signature(&ts.token_with("alice", "md:read:T", now, now + 60, "a3"));
    subs[2].send_json(&refresh(4, forged)).await.unwrap();
    expect_refused(next_control(&mut subs[2]).await, 4, ErrorCode::InvalidToken);

    // The original deadline still applies to all three: closed 4001, not before it.
    for sub in &mut subs {
        assert_eq!(wait_close(sub, EVENTUALLY).await, 4001);
        assert!(unix_now_ns() + 30_000_000 >= exp * 1_000_000_000, "closed before the original deadline");
    }
    assert_eq!(ts.wait_metric("tickgate_token_refreshes_total{result=\"refused\"}", 3.0).await, 3.0);
    assert_eq!(ts.wait_metric("tickgate_token_refreshes_total{result=\"rate_limited\"}", 1.0).await, 1.0);
    assert_eq!(ts.wait_metric("tickgate_closes_total{code=\"4001\"}", 3.0).await, 3.0);
    ts.shutdown().await;
}

/// A refresh that loses a feed's scope unsubscribes exactly that feed; one that gains a
/// scope allows new subscriptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_downgrade_and_upgrade_on_refresh() {
    // No refresh rate limit: this test is about scopes, and the limit has its own test
    // (refused_refreshes_keep_the_old_deadline), so nothing here waits a second out.
    let ts = TestServer::start(2000.0, |c| c.auth.min_refresh_interval_ms = 0).await;
    let now = unix_now();
    let token = ts.token_with("bob", "md:read:T md:read:OTHER", now, now + 60, "b0");
    let (mut sub, r) = subscribed(&ts, &token, "T", json!(["S0", "S1"]), false).await;
    assert!(matches!(r, ServerMsg::Subscribed { .. }));
    sub.send_json(&json!({"op": "subscribe", "id": 2, "feed": "OTHER", "symbols": ["*"]})).await.unwrap();
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Subscribed { id: Some(2), .. }));

    let down = ts.token_with("bob", "md:read:OTHER", now, now + 60, "b1");
    sub.send_json(&json!({"op": "refresh", "id": 3, "token": down})).await.unwrap();
    match next_control(&mut sub).await {
        ServerMsg::Unsubscribed { feed, mut symbols, reason, .. } => {
            symbols.sort();
            assert_eq!((feed.as_str(), reason.as_str()), ("T", "scope_revoked"));
            assert_eq!(symbols, vec!["S0", "S1"]);
        }
        m => panic!("expected unsubscribed, got {m:?}"),
    }
    match next_control(&mut sub).await {
        ServerMsg::Refreshed { id, feeds, .. } => {
            assert_eq!(id, Some(3));
            assert_eq!(feeds.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), vec!["OTHER"]);
        }
        m => panic!("expected refreshed, got {m:?}"),
    }
    // After the `unsubscribed`, only OTHER's records arrive, gap-free: read until 20 have.
    let mut other = 0;
    while other < 20 {
        match tokio::time::timeout(EVENTUALLY, sub.next_event()).await.expect("OTHER stopped streaming").unwrap() {
            Event::Batch { records, anomalies, .. } => {
                assert!(anomalies.is_empty(), "{anomalies:?}");
                assert!(records.iter().all(|r| r.feed_id() == 2), "a T record after scope_revoked");
                other += records.len();
            }
            Event::Control(m) => panic!("unexpected {m:?}"),
            Event::Closed { code, reason } => panic!("closed {code} {reason}"),
        }
    }
    sub.send_json(&json!({"op": "subscribe", "id": 4, "feed": "T", "symbols": ["S0"]})).await.unwrap();
    match next_control(&mut sub).await {
        ServerMsg::Error { id, code, .. } => {
            assert_eq!((id, code), (Some(4), ErrorCode::InsufficientScope))
        }
        m => panic!("expected insufficient_scope, got {m:?}"),
    }
    let up = ts.token_with("bob", "md:read:*", now, now + 60, "b2");
    sub.send_json(&json!({"op": "refresh", "id": 5, "token": up})).await.unwrap();
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Refreshed { id: Some(5), .. }));
    sub.send_json(&json!({"op": "subscribe", "id": 6, "feed": "T", "symbols": ["S0"]})).await.unwrap();
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Subscribed { id: Some(6), .. }));
    ts.shutdown().await;
}

/// Revocation by jti and by sub: matching connections close with 4003, others stream on,
/// and the revoked tokens are refused at the next handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_by_jti_and_sub() {
    let ts = TestServer::start(500.0, |_| {}).await;
    let now = unix_now();
    let admin = ts.token(&["tickgate:admin"]);
    let carol1 = ts.token_with("carol", "md:read:T", now, now + 60, "c1");
    let carol2 = ts.token_with("carol", "md:read:T", now, now + 60, "c2");
    let dave = ts.token_with("dave", "md:read:T", now, now + 60, "d1");
    let (mut c1, _) = subscribed(&ts, &carol1, "T", json!(["S0"]), false).await;
    let (mut c2, _) = subscribed(&ts, &carol2, "T", json!(["S0"]), false).await;
    let (mut d, _) = subscribed(&ts, &dave, "T", json!(["S0"]), false).await;

    // Admin endpoint refusals.
    let (s, b) = revoke(&ts, "not-a-token", json!({"jti": "c1"})).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("invalid_token")));
    let (s, b) = revoke(&ts, &carol1, json!({"jti": "c1"})).await;
    assert_eq!((s, b["error"].as_str()), (403, Some("insufficient_scope")));
    let (s, b) = revoke(&ts, &admin, json!({"jti": "c1", "sub": "carol"})).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_request")));

    let (s, b) = revoke(&ts, &admin, json!({"jti": "c1"})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["connections_closed"], 1);
    assert_eq!(wait_close(&mut c1, EVENTUALLY).await, 4003);
    // c2 (same sub, other jti) and dave stream on.
    let (_, a) = read_records(&mut c2, 20).await;
    assert_eq!(a, 0);
    // The revoked jti is refused at the handshake.
    let (s, b) = bearer_handshake(&ts, &carol1).await;
    assert_eq!((s, b["error_description"].as_str()), (401, Some("token revoked")));

    let (s, b) = revoke(&ts, &admin, json!({"sub": "carol"})).await;
    assert_eq!((s, b["connections_closed"].as_u64()), (200, Some(1)));
    // The server revoked at its clock's second, which is at most this one.
    let revoked_in = unix_now();
    assert_eq!(wait_close(&mut c2, EVENTUALLY).await, 4003);
    let (_, a) = read_records(&mut d, 20).await;
    assert_eq!(a, 0, "dave disturbed");
    let (s, _) = bearer_handshake(&ts, &carol2).await;
    assert_eq!(s, 401);
    // A token issued after the subject's revocation second (`iat` is whole seconds) is
    // accepted again: wait for the clock to pass that second, not for a guessed time.
    let issued = eventually("the second after the revocation", EVENTUALLY, || async {
        let now = unix_now();
        (now > revoked_in).then_some(now)
    })
    .await;
    let fresh = ts.token_with("carol", "md:read:T", issued, issued + 60, "c3");
    let (s, _) = bearer_handshake(&ts, &fresh).await;
    assert_eq!(s, 101);
    assert!(ts.wait_metric("tickgate_revocations_total", 2.0).await >= 2.0);
    let m = ts.metrics().await;
    assert_eq!(metric_value(&m, "tickgate_auth_failures_total{reason=\"revoked\"}"), 2.0, "{m}");
    // Counted when each connection task ends (after the close handshake or its linger).
    assert_eq!(ts.wait_metric("tickgate_closes_total{code=\"4003\"}", 2.0).await, 2.0);
    ts.shutdown().await;
}
