//! Handshake paths beyond the bearer header: one-time tickets, in-band `auth`, and the
//! per-subject, per-IP and connection-rate limits.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tickgate_client::{ConnectOptions, Subscriber};
use tickgate_proto::control::ServerMsg;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_single_use_and_bound_to_the_token() {
    let ts = TestServer::start(500.0, |_| {}).await;
    let token = ts.token(&["md:read:T"]);
    let (s, t, _) = get_ticket(&ts, Some(&token)).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["expires_in"], 30);
    let ticket = t["ticket"].as_str().unwrap().to_owned();

    // The ticket opens a stream with the token's identity and scopes, without any header.
    let mut sub =
        Subscriber::connect(&format!("{}?ticket={ticket}", ts.url), "", &ConnectOptions::default()).await.unwrap();
    match next_control(&mut sub).await {
        ServerMsg::Welcome { sub: who, feeds, .. } => {
            assert_eq!(who, "tester");
            assert_eq!(feeds.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), vec!["T"]);
        }
        m => panic!("{m:?}"),
    }
    // Reuse is refused.
    let (s, b, www) =
        handshake_status(&ts, &format!("?ticket={ticket}"), &[("sec-websocket-protocol", "tickgate.v1")]).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("invalid_token")));
    assert!(www.is_some());
    assert!(b["error_description"].as_str().unwrap().contains("used"));
    // A made-up ticket too.
    let fake = "A".repeat(43);
    let (s, _, _) =
        handshake_status(&ts, &format!("?ticket={fake}"), &[("sec-websocket-protocol", "tickgate.v1")]).await;
    assert_eq!(s, 401);
    // A ticket plus another credential is two credentials.
    let (_, t2, _) = get_ticket(&ts, Some(&token)).await;
    let t2 = t2["ticket"].as_str().unwrap().to_owned();
    let (s, b, _) = handshake_status(
        &ts,
        &format!("?ticket={t2}"),
        &[("authorization", &format!("Bearer {token}")), ("sec-websocket-protocol", "tickgate.v1")],
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_request")));

    // The ticket endpoint itself needs a valid token that can read something.
    let (s, b, _) = get_ticket(&ts, None).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("invalid_token")));
    let (s, b, _) = get_ticket(&ts, Some("garbage")).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("invalid_token")));
    let (s, b, _) = get_ticket(&ts, Some(&ts.token(&["openid"]))).await;
    assert_eq!((s, b["error"].as_str()), (403, Some("insufficient_scope")));
    assert_eq!(ts.metric("tickgate_auth_failures_total{reason=\"bad_ticket\"}").await, 2.0);
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inband_auth_success_timeout_and_refusal() {
    use futures_util::SinkExt;
    let ts = TestServer::start(500.0, |c| c.auth.inband_timeout_ms = 500).await;
    let token = ts.token(&["md:read:T"]);

    // Success: auth first, then the usual welcome.
    let mut ws = raw_stream(&ts, None).await;
    ws.send(Message::text(json!({"op": "auth", "token": token}).to_string())).await.unwrap();
    let mut sub_ok = false;
    {
        use futures_util::StreamExt;
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            let m: ServerMsg = serde_json::from_str(t.as_str()).unwrap();
            sub_ok = matches!(m, ServerMsg::Welcome { ref sub, .. } if sub == "tester");
        }
    }
    assert!(sub_ok, "welcome after in-band auth");

    // Nothing within the window: 4002, not before the window has passed (the clock starts
    // before the connection, so the server's window cannot have started earlier).
    let t0 = std::time::Instant::now();
    let mut ws = raw_stream(&ts, None).await;
    assert_eq!(close_frame(&mut ws).await.0, 4002);
    assert!(t0.elapsed() >= Duration::from_millis(450), "closed after {:?}", t0.elapsed());

    // A bad token: 4004, with the reason in the close frame.
    let mut ws = raw_stream(&ts, None).await;
    ws.send(Message::text(json!({"op": "auth", "token": "a.b.c"}).to_string())).await.unwrap();
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, 4004);
    assert!(reason.starts_with("invalid_token"), "{reason}");
    // Something other than auth first: 4004.
    let mut ws = raw_stream(&ts, None).await;
    ws.send(Message::text(r#"{"op":"ping","id":1}"#)).await.unwrap();
    assert_eq!(close_frame(&mut ws).await.0, 4004);
    // No md:read scope: 4004.
    let mut ws = raw_stream(&ts, None).await;
    ws.send(Message::text(json!({"op": "auth", "token": ts.token(&["openid"])}).to_string())).await.unwrap();
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!((code, reason.starts_with("insufficient_scope")), (4004, true));

    assert!(ts.wait_metric("tickgate_closes_total{code=\"4002\"}", 1.0).await >= 1.0);
    assert!(ts.wait_metric("tickgate_closes_total{code=\"4004\"}", 3.0).await >= 3.0);
    assert_eq!(ts.wait_metric("tickgate_auth_failures_total{reason=\"inband_timeout\"}", 1.0).await, 1.0);
    assert_eq!(ts.wait_metric("tickgate_auth_failures_total{reason=\"inband_not_auth\"}", 1.0).await, 1.0);
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_inband_auth_a_bare_upgrade_is_401() {
    let ts = TestServer::start(100.0, |_| {}).await;
    let (s, b, _) = handshake_status(&ts, "", &[("sec-websocket-protocol", "tickgate.v1")]).await;
    assert_eq!((s, b["error_description"].as_str()), (401, Some("no access token presented")));
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_subject_per_ip_and_rate_limits_answer_429() {
    let ts = TestServer::start(100.0, |c| {
        c.limits.max_connections_per_subject = 2;
        c.limits.max_connections_per_ip = 3;
    })
    .await;
    let now = unix_now();
    let a = ts.token_with("sub-a", "md:read:T", now, now + 60, "a");
    let b = ts.token_with("sub-b", "md:read:T", now, now + 60, "b");
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = ts.subscriber(&a).await;
        let _ = next_control(&mut s).await;
        open.push(s);
    }
    let hs = |t: &str| format!("Bearer {t}");
    let (s, body, _) =
        handshake_status(&ts, "", &[("authorization", &hs(&a)), ("sec-websocket-protocol", "tickgate.v1")]).await;
    assert_eq!((s, body["error"].as_str()), (429, Some("too_many_connections")));
    assert!(body["error_description"].as_str().unwrap().contains("per subject"));
    // Another subject from the same address: allowed once (3 per IP).
    let mut s3 = ts.subscriber(&b).await;
    let _ = next_control(&mut s3).await;
    let (s, body, _) =
        handshake_status(&ts, "", &[("authorization", &hs(&b)), ("sec-websocket-protocol", "tickgate.v1")]).await;
    assert_eq!(s, 429);
    assert!(body["error_description"].as_str().unwrap().contains("per source address"));
    // From another loopback address the IP limit is separate.
    let opts = ConnectOptions { local_ip: Some("127.0.0.2".parse().unwrap()), ..ConnectOptions::default() };
    let mut other = Subscriber::connect(&ts.url, &b, &opts).await.unwrap();
    assert!(matches!(next_control(&mut other).await, ServerMsg::Welcome { .. }));
    // Closing frees the places (when the connection task ends: poll for it).
    open.pop().unwrap().close().await;
    eventually("the subject's place released", EVENTUALLY, || async {
        let (s, _, _) =
            handshake_status(&ts, "", &[("authorization", &hs(&a)), ("sec-websocket-protocol", "tickgate.v1")]).await;
        (s == 101).then_some(())
    })
    .await;
    ts.shutdown().await;

    // Connection rate per IP: a burst of 5, then refusals, before any token work.
    let ts = TestServer::start(100.0, |c| {
        c.limits.connect_rate_per_ip = 1;
        c.limits.connect_burst_per_ip = 5;
    })
    .await;
    let token = ts.token(&["md:read:T"]);
    let mut statuses = Vec::new();
    let started = std::time::Instant::now();
    for _ in 0..8 {
        let (s, _, _) =
            handshake_status(&ts, "", &[("authorization", &hs(&token)), ("sec-websocket-protocol", "tickgate.v1")])
                .await;
        statuses.push(s);
    }
    // The bucket refills at 1/s: the three after the burst are refused, less one for each
    // whole second these handshakes took (none where they took less than a second).
    let refills = started.elapsed().as_secs() as usize;
    assert_eq!(statuses[..5], [101; 5]);
    assert!(statuses[5..].iter().all(|&s| s == 429 || s == 101), "{statuses:?}");
    let refused = statuses[5..].iter().filter(|&&s| s == 429).count();
    assert!(refused >= 3usize.saturating_sub(refills), "{statuses:?} in {:?}", started.elapsed());
    assert_eq!(ts.metric("tickgate_handshakes_total{result=\"too_many_connections\"}").await, refused as f64);
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_view_is_paginated_and_guarded() {
    let ts = TestServer::start(200.0, |_| {}).await;
    let now = unix_now();
    let mut subs = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..5 {
        let t = ts.token_with(&format!("client-{i}"), "md:read:T", now, now + 120, &format!("j{i}"));
        let (s, _) = subscribed(&ts, &t, "T", json!(["S0", "S1"]), false).await;
        subs.push(s);
        tokens.push(t);
    }
    let admin = ts.token(&["tickgate:admin"]);
    let get = |q: String, bearer: Option<String>| {
        let url = format!("{}/admin/connections{q}", ts.admin);
        async move {
            let mut rb = reqwest::Client::new().get(url);
            if let Some(b) = bearer {
                rb = rb.bearer_auth(b);
            }
            let r = rb.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let q = if after.is_empty() { "?limit=2".to_owned() } else { format!("?limit=2&after={after}") };
        let (s, body) = get(q, Some(admin.clone())).await;
        assert_eq!(s, 200, "{body}");
        for t in &tokens {
            assert!(!body.contains(t.as_str()), "a token in the admin view");
        }
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["total"], 5);
        let items = v["connections"].as_array().unwrap();
        assert!(items.len() <= 2);
        for c in items {
            assert_eq!(c["subscriptions"], 2);
            assert!(c["sub"].as_str().unwrap().starts_with("client-"));
            assert_eq!(c["token_exp"], now + 120);
            assert!(c["shard"].as_u64().unwrap() < 2);
            assert!(c["queued_bytes"].is_u64());
            seen.push(c["session"].as_str().unwrap().to_owned());
        }
        match v["next"].as_str() {
            Some(n) => after = n.to_owned(),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (5, 5), "every connection exactly once");
    assert_eq!(get("".into(), None).await.0, 401);
    assert_eq!(get("".into(), Some(tokens[0].clone())).await.0, 403);
    assert_eq!(get("?limit=0".into(), Some(admin.clone())).await.0, 400);
    ts.shutdown().await;
}
