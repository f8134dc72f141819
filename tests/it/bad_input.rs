//! Every malformed input gets its documented answer, is counted, and disturbs no one else.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tickgate_proto::control::{ErrorCode, ServerMsg};
use tokio_tungstenite::tungstenite::Message;

async fn expect_error(sub: &mut tickgate_client::Subscriber, code: ErrorCode, id: Option<i64>) -> String {
    match next_control(sub).await {
        ServerMsg::Error { id: got, code: c, message } => {
            assert_eq!(c, code, "{message}");
            assert_eq!(got, id);
            message
        }
        m => panic!("expected error {code:?}, got {m:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_control_messages_get_errors_and_others_are_undisturbed() {
    let ts = TestServer::start(3000.0, |_| {}).await;
    let all = ts.token(&["md:read:*"]);
    // A bystander streaming throughout: it reads until the bad input is over (and 1,000
    // records have arrived), however long that takes.
    let (mut bystander, _) = subscribed(&ts, &all, "T", json!(["*"]), true).await;
    let done = tokio_util::sync::CancellationToken::new();
    let watch = tokio::spawn({
        let done = done.clone();
        async move { read_until_cancelled(&mut bystander, &done, 1000).await }
    });

    let limited = ts.token(&["md:read:OTHER"]);
    let mut sub = ts.subscriber(&limited).await;
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Welcome { .. }));

    send_raw(&mut sub, Message::text("{not json")).await;
    let m = expect_error(&mut sub, ErrorCode::BadRequest, None).await;
    assert!(m.contains("malformed JSON"), "{m}");

    send_raw(&mut sub, Message::text(r#"{"op":"teleport","id":7}"#)).await;
    let m = expect_error(&mut sub, ErrorCode::BadRequest, Some(7)).await;
    assert!(m.contains("unknown op"), "{m}");

    send_raw(&mut sub, Message::text(r#"{"op":"subscribe","id":8,"feed":"T"}"#)).await;
    let m = expect_error(&mut sub, ErrorCode::BadRequest, Some(8)).await;
    assert!(m.contains("symbols"), "{m}");

    send_raw(&mut sub, Message::text(r#"{"op":"subscribe","id":9,"feed":"NOPE","symbols":["A"]}"#)).await;
    expect_error(&mut sub, ErrorCode::UnknownFeed, Some(9)).await;

    send_raw(&mut sub, Message::text(r#"{"op":"subscribe","id":10,"feed":"OTHER","symbols":["S0","ZZZ"]}"#)).await;
    let m = expect_error(&mut sub, ErrorCode::UnknownSymbol, Some(10)).await;
    assert!(m.contains("ZZZ"), "{m}");

    // Entitled to OTHER only: T is refused by scope.
    send_raw(&mut sub, Message::text(r#"{"op":"subscribe","id":11,"feed":"T","symbols":["S0"]}"#)).await;
    expect_error(&mut sub, ErrorCode::InsufficientScope, Some(11)).await;

    send_raw(&mut sub, Message::text(r#"{"op":"subscribe","id":12,"feed":"OTHER","symbols":["*","S0"]}"#)).await;
    expect_error(&mut sub, ErrorCode::BadRequest, Some(12)).await;

    send_raw(&mut sub, Message::text(r#"{"op":"auth","token":"x.y.z"}"#)).await;
    expect_error(&mut sub, ErrorCode::BadRequest, None).await;

    send_raw(&mut sub, Message::text(r#"{"op":"refresh","id":13,"token":"not-a-jwt"}"#)).await;
    expect_error(&mut sub, ErrorCode::InvalidToken, Some(13)).await;

    // Still usable after all that.
    send_raw(&mut sub, Message::text(r#"{"op":"ping","id":14}"#)).await;
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Pong { id: Some(14), .. }));

    done.cancel();
    let (records, anomalies) = watch.await.unwrap();
    assert!(records >= 1000 && anomalies == 0, "bystander disturbed: {records} records, {anomalies} anomalies");

    assert!(ts.wait_metric("tickgate_control_errors_total{code=\"bad_request\"}", 5.0).await >= 5.0);
    assert_eq!(ts.wait_metric("tickgate_control_errors_total{code=\"unknown_feed\"}", 1.0).await, 1.0);
    assert_eq!(ts.wait_metric("tickgate_control_errors_total{code=\"unknown_symbol\"}", 1.0).await, 1.0);
    assert_eq!(ts.wait_metric("tickgate_control_errors_total{code=\"insufficient_scope\"}", 1.0).await, 1.0);
    assert_eq!(ts.wait_metric("tickgate_control_errors_total{code=\"invalid_token\"}", 1.0).await, 1.0);
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frame_closes_1003() {
    let ts = TestServer::start(100.0, |_| {}).await;
    let mut sub = ts.subscriber(&ts.token(&["md:read:T"])).await;
    send_raw(&mut sub, Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(wait_close(&mut sub, EVENTUALLY).await, 1003);
    assert_eq!(ts.wait_metric("tickgate_closes_total{code=\"1003\"}", 1.0).await, 1.0);
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_closes_1009() {
    let ts = TestServer::start(100.0, |_| {}).await;
    let mut sub = ts.subscriber(&ts.token(&["md:read:T"])).await;
    let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(70 * 1024));
    send_raw(&mut sub, Message::text(big)).await;
    assert_eq!(wait_close(&mut sub, EVENTUALLY).await, 1009);
    // A message just under the limit is fine.
    let mut ok = ts.subscriber(&ts.token(&["md:read:T"])).await;
    let fits = format!(r#"{{"op":"ping","id":1,"pad":"{}"}}"#, "x".repeat(60 * 1024));
    send_raw(&mut ok, Message::text(fits)).await;
    let _welcome = next_control(&mut ok).await;
    assert!(matches!(next_control(&mut ok).await, ServerMsg::Pong { id: Some(1), .. }));
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_is_rate_limited_then_closed_1008() {
    let ts = TestServer::start(100.0, |_| {}).await;
    let mut sub = ts.subscriber(&ts.token(&["md:read:T"])).await;
    // The clock starts before the first ping: the server's bucket cannot refill for
    // longer than this test has been sending and reading.
    let started = std::time::Instant::now();
    for i in 0..200 {
        send_raw(&mut sub, Message::text(format!(r#"{{"op":"ping","id":{i}}}"#))).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    let code = loop {
        match tokio::time::timeout(EVENTUALLY, sub.next_event()).await.unwrap().unwrap() {
            tickgate_client::Event::Control(ServerMsg::Pong { .. }) => pongs += 1,
            tickgate_client::Event::Control(ServerMsg::Error { code, .. }) => {
                assert_eq!(code, ErrorCode::RateLimited);
                limited += 1;
            }
            tickgate_client::Event::Closed { code, .. } => break code,
            _ => {}
        }
    };
    assert_eq!(code, 1008);
    // The burst of 50, plus what the 20/s refill adds while the flood is being read: at
    // most 20 per second this took (on a fast machine a few; never all 200).
    let refill = (20.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(pongs >= 50 && pongs <= 50 + refill, "burst of 50 (+{refill} refilled) answered, got {pongs}");
    assert!(limited > 20, "rate_limited errors before the close: {limited}");
    assert!(ts.wait_metric("tickgate_control_errors_total{code=\"rate_limited\"}", 21.0).await >= 21.0);
    assert_eq!(ts.wait_metric("tickgate_closes_total{code=\"1008\"}", 1.0).await, 1.0);
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusals_have_exact_answers() {
    let ts = TestServer::start(100.0, |c| {
        c.security.allowed_origins = vec!["https://trader.example".into()];
    })
    .await;
    let good = ts.token(&["md:read:T"]);
    let bearer = format!("Bearer {good}");
    let proto = "tickgate.v1";

    // Baseline: accepted.
    let (s, _, _) = handshake_status(&ts, "", &[("authorization", &bearer), ("sec-websocket-protocol", proto)]).await;
    assert_eq!(s, 101);

    // No subprotocol.
    let (s, body, _) = handshake_status(&ts, "", &[("authorization", &bearer)]).await;
    assert_eq!((s, body["error"].as_str()), (400, Some("invalid_request")));

    // No credential at all.
    let (s, body, www) = handshake_status(&ts, "", &[("sec-websocket-protocol", proto)]).await;
    assert_eq!((s, body["error"].as_str()), (401, Some("invalid_token")));
    let www = www.expect("WWW-Authenticate on 401");
    assert!(www.starts_with("Bearer realm=\"tickgate\", error=\"invalid_token\""), "{www}");

    // A forged token.
    let forged = forge_signature(&good);
    let (s, body, _) =
        handshake_status(&ts, "", &[("authorization", &format!("Bearer {forged}")), ("sec-websocket-protocol", proto)])
            .await;
    assert_eq!((s, body["error"].as_str()), (401, Some("invalid_token")));

    // Garbage.
    let (s, body, _) =
        handshake_status(&ts, "", &[("authorization", "Bearer abc"), ("sec-websocket-protocol", proto)]).await;
    assert_eq!((s, body["error_description"].as_str().map(|d| d.contains("malformed"))), (401, Some(true)));

    // Not Bearer.
    let (s, body, _) =
        handshake_status(&ts, "", &[("authorization", "Basic Zm9vOmJhcg=="), ("sec-websocket-protocol", proto)]).await;
    assert_eq!((s, body["error"].as_str()), (400, Some("invalid_request")));

    // Two credentials.
    let both = format!("tickgate.v1, bearer.{good}");
    let (s, body, _) =
        handshake_status(&ts, "", &[("authorization", &bearer), ("sec-websocket-protocol", &both)]).await;
    assert_eq!((s, body["error"].as_str()), (400, Some("invalid_request")));
    assert!(body["error_description"].as_str().unwrap().contains("two credentials"));

    // Token in the URL.
    let (s, body, _) =
        handshake_status(&ts, &format!("?access_token={good}"), &[("sec-websocket-protocol", proto)]).await;
    assert_eq!((s, body["error"].as_str()), (400, Some("invalid_request")));

    // No md:read scope.
    let none = ts.token(&["openid"]);
    let (s, body, _) =
        handshake_status(&ts, "", &[("authorization", &format!("Bearer {none}")), ("sec-websocket-protocol", proto)])
            .await;
    assert_eq!((s, body["error"].as_str()), (403, Some("insufficient_scope")));

    // Origin.
    let (s, body, _) = handshake_status(
        &ts,
        "",
        &[("authorization", &bearer), ("sec-websocket-protocol", proto), ("origin", "https://evil.example")],
    )
    .await;
    assert_eq!((s, body["error"].as_str()), (403, Some("forbidden_origin")));
    let (s, _, _) = handshake_status(
        &ts,
        "",
        &[("authorization", &bearer), ("sec-websocket-protocol", proto), ("origin", "https://trader.example")],
    )
    .await;
    assert_eq!(s, 101);

    // Plain GET without upgrade headers.
    let r = reqwest::get(&format!("{}/v1/stream", ts.base)).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");

    assert_eq!(ts.metric("tickgate_handshakes_total{result=\"bad_request\"}").await, 5.0);
    assert_eq!(ts.metric("tickgate_handshakes_total{result=\"invalid_token\"}").await, 3.0);
    assert_eq!(ts.metric("tickgate_auth_failures_total{reason=\"missing\"}").await, 1.0);
    assert_eq!(ts.metric("tickgate_auth_failures_total{reason=\"bad_signature\"}").await, 1.0);
    let m = ts.metrics().await;
    assert_eq!(metric_value(&m, "tickgate_auth_failures_total{reason=\"malformed\"}"), 1.0, "{m}");
    assert_eq!(ts.metric("tickgate_handshakes_total{result=\"insufficient_scope\"}").await, 1.0);
    assert_eq!(ts.metric("tickgate_handshakes_total{result=\"forbidden_origin\"}").await, 1.0);
    assert_eq!(ts.metric("tickgate_handshakes_total{result=\"ok\"}").await, 2.0);
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_answers_429_and_frees_slots() {
    let ts = TestServer::start(100.0, |c| c.limits.max_connections = 3).await;
    let token = ts.token(&["md:read:T"]);
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut s = ts.subscriber(&token).await;
        let _ = next_control(&mut s).await;
        subs.push(s);
    }
    let bearer = format!("Bearer {token}");
    let (s, body, _) =
        handshake_status(&ts, "", &[("authorization", &bearer), ("sec-websocket-protocol", "tickgate.v1")]).await;
    assert_eq!((s, body["error"].as_str()), (429, Some("too_many_connections")));
    subs.pop().unwrap().close().await;
    // The slot is released when the connection task ends: poll for it.
    eventually("the connection slot released", EVENTUALLY, || async {
        let (s, _, _) =
            handshake_status(&ts, "", &[("authorization", &bearer), ("sec-websocket-protocol", "tickgate.v1")]).await;
        (s == 101).then_some(())
    })
    .await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ts = TestServer::start(100.0, |c| c.server.handshake_timeout_ms = 500).await;
    // The clock starts before the connection, so the server's deadline cannot start earlier.
    let started = std::time::Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(ts.server().addr()).await.unwrap();
    tcp.write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut buf = Vec::new();
    // The server answers (408) or closes once the header deadline passes, and not before:
    // a server without the deadline would hold the connection until the bound below.
    let _ = tokio::time::timeout(EVENTUALLY, tcp.read_to_end(&mut buf)).await.expect("cut off");
    assert!(started.elapsed() >= Duration::from_millis(450), "cut off after {:?}", started.elapsed());
    let text = String::from_utf8_lossy(&buf);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    ts.shutdown().await;
}
