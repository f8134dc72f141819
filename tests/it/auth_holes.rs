//! Attacks on the token lifecycle found black-box (issue #12, items 1, 2, 7, 8 and the
//! `/admin/revoke` and `/v1/ticket` answers), each reproduced against a real server and
//! answered exactly: tickets do not outlive a revocation, publishers are revoked like
//! streams, one subject cannot drain the ticket pool, client secrets cannot be guessed at
//! full speed, and the revoke endpoint bounds and audits what it is given.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::net::IpAddr;
use std::process::{Command, Stdio};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tickgate::config::ClientConfig;
use tickgate_client::publisher::{publish_url, Publisher};
use tickgate_client::ClientWs;
use tickgate_client::{ConnectOptions, Subscriber};
use tickgate_proto::codec::encode_batch;
use tickgate_proto::codec::{Body, Record, Trade};
use tickgate_proto::control::ServerMsg;
use tokio_tungstenite::tungstenite::Message;

const TICKGATE: [(&str, &str); 1] = [("sec-websocket-protocol", "tickgate.v1")];

async fn ticket(ts: &TestServer, token: &str) -> String {
    let (s, v, _) = get_ticket(ts, Some(token)).await;
    assert_eq!(s, 200, "{v}");
    v["ticket"].as_str().unwrap().to_owned()
}

/// Revokes as an admin; the revocation must be accepted.
async fn revoke_ok(ts: &TestServer, body: Value) -> Value {
    let (s, v) = revoke(ts, &ts.token(&["tickgate:admin"]), body).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// Item 1: a ticket minted before `POST /admin/revoke` (by `jti`, and by `sub`) no longer
/// opens a stream: 401 `invalid_token` "token revoked", counted as `revoked`. Before the
/// fix the ticket opened a stream that streamed until a second revoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_does_not_outlive_a_revocation() {
    let ts = TestServer::start(200.0, |_| {}).await;
    let now = unix_now();
    let by_jti = ts.token_with("alice", "md:read:*", now, now + 300, "jti-alice-1");
    let t1 = ticket(&ts, &by_jti).await;
    let v = revoke_ok(&ts, json!({"jti": "jti-alice-1"})).await;
    assert_eq!(v["tickets_voided"], 1, "{v}");
    let (s, body, www) = handshake_status(&ts, &format!("?ticket={t1}"), &TICKGATE).await;
    assert_eq!((s, body["error"].as_str()), (401, Some("invalid_token")), "{body}");
    assert_eq!(body["error_description"], "token revoked");
    assert!(www.unwrap().contains("invalid_token"));

    // By subject: every outstanding ticket of the subject is void.
    let bob = ts.token_with("bob", "md:read:*", now, now + 300, "jti-bob-1");
    let (t2, t3) = (ticket(&ts, &bob).await, ticket(&ts, &bob).await);
    let carol = ts.token_with("carol", "md:read:*", now, now + 300, "jti-carol-1");
    let t4 = ticket(&ts, &carol).await;
    let v = revoke_ok(&ts, json!({"sub": "bob"})).await;
    assert_eq!(v["tickets_voided"], 2, "{v}");
    for t in [t2, t3] {
        let (s, body, _) = handshake_status(&ts, &format!("?ticket={t}"), &TICKGATE).await;
        assert_eq!((s, body["error_description"].as_str()), (401, Some("token revoked")), "{body}");
    }
    assert_eq!(ts.metric("tickgate_auth_failures_total{reason=\"revoked\"}").await, 3.0);
    // Another subject's ticket is untouched.
    let mut sub =
        Subscriber::connect(&format!("{}?ticket={t4}", ts.url), "", &ConnectOptions::default()).await.unwrap();
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Welcome { .. }));
    ts.shutdown().await;
}

fn trade(feed: u16, instr: u32) -> Record {
    Record::encode(feed, instr, 0, 1, 0, &Body::Trade(Trade { price: 1, size: 1, side: 1 }), 0)
}

/// A publisher on a raw socket, so the test can read its close frame: connects, publishes
/// one batch and waits for the acknowledgement.
async fn live_publisher(ts: &TestServer, feed: &str, id: u16, token: &str) -> ClientWs {
    let ws =
        tickgate_client::connect(&publish_url(&ts.url, feed, None), token, &ConnectOptions::default()).await.unwrap();
    proven(ws, id).await
}

/// Publishes one batch and waits for its acknowledgement.
async fn proven(mut ws: ClientWs, id: u16) -> ClientWs {
    let mut batch = Vec::new();
    encode_batch(&[trade(id, 1)], 0, &mut batch);
    ws.send(Message::binary(batch)).await.unwrap();
    ws.send(Message::text("{\"op\":\"ping\",\"id\":1}")).await.unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                assert!(t.as_str().contains("\"pong\""), "{t}");
                return ws;
            }
            Some(Ok(_)) => {}
            other => panic!("publisher ended: {other:?}"),
        }
    }
}

/// A publisher's session ends at its token's deadline like a stream's: close 4001
/// "token expired", never before `exp` (grace 0). Publishers expire through the edge
/// session's deadline (`server::session`), not a timer of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_is_closed_with_4001_at_its_deadline() {
    let ts =
        TestServer::start_with_feeds(50.0, &[("p.toml", publish_toml("P", 9, 2, "disconnect", 100))], |_| {}).await;
    let now = unix_now();
    // Seconds of margin so a slow handshake still happens before exp.
    let exp = now + 4;
    let tok = ts.token_with("feed-handler", "md:publish:P", now, exp, "jti-pub-exp");
    let mut p = live_publisher(&ts, "P", 9, &tok).await;
    assert_eq!(close_frame(&mut p).await, (4001, "token expired".to_owned()));
    let closed_ms = tickgate_proto::now_ns() / 1_000_000;
    assert!(closed_ms >= exp * 1000, "closed {} ms before exp", exp * 1000 - closed_ms);
    ts.shutdown().await;
}

/// Item 2: `/admin/revoke` closes a matching publisher with 4003 (by `jti` and by `sub`),
/// and a publisher of another subject keeps publishing. Before the fix publishers were
/// never revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_publishers() {
    let feeds = [
        ("p.toml", publish_toml("P", 9, 2, "disconnect", 100)),
        ("q.toml", publish_toml("Q", 10, 2, "disconnect", 100)),
    ];
    let ts = TestServer::start_with_feeds(50.0, &feeds, |_| {}).await;
    let now = unix_now();
    let tok = ts.token_with("feed-handler", "md:publish:P", now, now + 300, "jti-pub-1");
    let mut p = live_publisher(&ts, "P", 9, &tok).await;
    let other = ts.token_with("other-handler", "md:publish:Q", now, now + 300, "jti-pub-2");
    let mut q = Publisher::connect(&publish_url(&ts.url, "Q", None), &other, &ConnectOptions::default()).await.unwrap();

    let v = revoke_ok(&ts, json!({"jti": "jti-pub-1"})).await;
    assert_eq!((v["publishers_closed"].as_u64(), v["streams_closed"].as_u64()), (Some(1), Some(0)), "{v}");
    assert_eq!(close_frame(&mut p).await, (4003, "token revoked".to_owned()));
    // The feed is free again, and another token of the subject may publish.
    let fresh = ts.token_with("feed-handler", "md:publish:P", now, now + 300, "jti-pub-3");
    let url = publish_url(&ts.url, "P", None);
    let ws = eventually("the feed's publisher slot is released", EVENTUALLY, || async {
        tickgate_client::connect(&url, &fresh, &ConnectOptions::default()).await.ok()
    })
    .await;
    let mut p2 = proven(ws, 9).await;

    // By subject: the subject's publisher closes; the other subject's publisher is untouched.
    let v = revoke_ok(&ts, json!({"sub": "feed-handler"})).await;
    assert_eq!(v["publishers_closed"], 1, "{v}");
    assert_eq!(close_frame(&mut p2).await.0, 4003);
    q.send(&[trade(10, 1)]).await.unwrap();
    assert!(q.sync().await.unwrap().is_empty(), "the other publisher still publishes");
    assert_eq!(ts.metric("tickgate_revocations_total").await, 2.0);
    ts.shutdown().await;
}

/// Item 7: one subject cannot drain the global ticket pool: past
/// `limits.max_tickets_per_subject` it gets 429 `too_many_tickets` with `Retry-After`,
/// while another subject still gets tickets. Before the fix one subject took all 200 and
/// every other subject got 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subject_cannot_drain_the_ticket_pool() {
    let ts = TestServer::start(50.0, |c| {
        c.limits.max_tickets = 10;
        c.limits.max_tickets_per_subject = 3;
    })
    .await;
    let now = unix_now();
    let greedy = ts.token_with("greedy", "md:read:*", now, now + 300, "jti-g");
    for _ in 0..3 {
        ticket(&ts, &greedy).await;
    }
    let (s, v, retry) = get_ticket(&ts, Some(&greedy)).await;
    assert_eq!((s, v["error"].as_str()), (429, Some("too_many_tickets")), "{v}");
    assert!(v["error_description"].as_str().unwrap().contains("at most 3 outstanding tickets per subject"), "{v}");
    assert_eq!(retry.as_deref(), Some("30"));
    let modest = ts.token_with("modest", "md:read:*", now, now + 300, "jti-m");
    ticket(&ts, &modest).await;
    assert_eq!(ts.metric("tickgate_tickets_total{result=\"subject_limit\"}").await, 1.0);
    assert_eq!(ts.metric("tickgate_tickets_total{result=\"issued\"}").await, 4.0);
    ts.shutdown().await;
}

async fn token_request(from: IpAddr, ep: &str, id: &str, secret: &str) -> (u16, Value, Option<String>) {
    let http = reqwest::Client::builder().local_address(from).build().unwrap();
    let r = http
        .post(ep)
        .form(&[("grant_type", "client_credentials"), ("client_id", id), ("client_secret", secret)])
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (status, r.json().await.unwrap(), retry)
}

/// Item 8: failed client authentication at `/oauth2/token` is limited per source address
/// and per `client_id`: past the burst the answer is 429 with `Retry-After` (even to the
/// right secret), counted as `rate_limited`. Before the fix a guesser got 4,478 tries a
/// second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secrets_cannot_be_guessed_at_full_speed() {
    let ts = TestServer::start(50.0, |c| {
        c.issuer.client_auth_failure_burst = 3;
        c.issuer.client_auth_failures_per_min = 1;
        c.issuer.clients.push(ClientConfig {
            id: "algo".into(),
            secret: Some("algo-secret".into()),
            secret_sha256: None,
            scopes: vec!["md:read:T".into()],
        });
    })
    .await;
    let ep = format!("{}/oauth2/token", ts.base);
    let (a, b, c): (IpAddr, IpAddr, IpAddr) =
        ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
    for _ in 0..3 {
        let (s, v, _) = token_request(a, &ep, "demo", "guess").await;
        assert_eq!((s, v["error"].as_str()), (401, Some("invalid_client")), "{v}");
    }
    // The burst is spent: refused before the secret is even looked at, right or wrong.
    for secret in ["guess", SECRET] {
        let (s, v, retry) = token_request(a, &ep, "demo", secret).await;
        assert_eq!((s, v["error"].as_str()), (429, Some("too_many_requests")), "{v}");
        let secs: u64 = retry.expect("Retry-After").parse().unwrap();
        assert!((1..=60).contains(&secs), "Retry-After {secs}");
    }
    // Per client id: the same client from another address is limited too...
    let (s, _, _) = token_request(b, &ep, "demo", SECRET).await;
    assert_eq!(s, 429);
    // ...another client from another address is not.
    let (s, v, _) = token_request(c, &ep, "algo", "algo-secret").await;
    assert_eq!(s, 200, "{v}");
    // Per address: unknown client ids are limited by address alone.
    for _ in 0..3 {
        assert_eq!(token_request(b, &ep, &format!("made-up-{}", unix_now_ns()), "x").await.0, 401);
    }
    assert_eq!(token_request(b, &ep, "algo", "algo-secret").await.0, 429, "address b spent its burst");
    assert_eq!(ts.metric("tickgate_token_requests_total{result=\"rate_limited\"}").await, 4.0);
    assert_eq!(ts.metric("tickgate_token_requests_total{result=\"invalid_client\"}").await, 6.0);
    assert_eq!(ts.metric("tickgate_token_requests_total{result=\"ok\"}").await, 1.0);
    ts.shutdown().await;
}

/// `/v1/ticket` serves a token with only `md:publish:F` (publishers redeem tickets, §15);
/// such a ticket opens a publisher, and at the stream endpoint it gets 403
/// `insufficient_scope`. A token with neither scope family still gets 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_only_tokens_get_tickets() {
    let ts =
        TestServer::start_with_feeds(50.0, &[("p.toml", publish_toml("P", 9, 2, "disconnect", 100))], |_| {}).await;
    let now = unix_now();
    let tok = ts.token_with("feed-handler", "md:publish:P", now, now + 300, "jti-p");
    let t = ticket(&ts, &tok).await;
    let mut p =
        Publisher::connect(&format!("{}&ticket={t}", publish_url(&ts.url, "P", None)), "", &ConnectOptions::default())
            .await
            .unwrap();
    p.send(&[trade(9, 1)]).await.unwrap();
    assert!(p.sync().await.unwrap().is_empty());
    let t = ticket(&ts, &tok).await;
    let (s, body, _) = handshake_status(&ts, &format!("?ticket={t}"), &TICKGATE).await;
    assert_eq!((s, body["error"].as_str()), (403, Some("insufficient_scope")), "{body}");
    let (s, v, _) = get_ticket(&ts, Some(&ts.token(&["openid"]))).await;
    assert_eq!((s, v["error"].as_str()), (403, Some("insufficient_scope")), "{v}");
    ts.shutdown().await;
}

/// `/admin/revoke` bounds its input: a JSON content type, a body of at most 4 KiB, exactly
/// one of `sub`/`jti` as a non-empty string of at most 256 bytes, no other field; each
/// refusal is a JSON error counted by result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_revoke_bounds_its_input() {
    let ts = TestServer::start(50.0, |_| {}).await;
    let url = format!("{}/admin/revoke", ts.admin);
    let admin = ts.token(&["tickgate:admin"]);
    let http = reqwest::Client::new();
    let send = |ctype: &'static str, body: String| {
        let (http, url, admin) = (http.clone(), url.clone(), admin.clone());
        async move {
            let r = http.post(url).bearer_auth(admin).header("content-type", ctype).body(body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let cases = [
        ("text/plain", json!({"sub": "x"}).to_string(), 415, "Content-Type must be application/json"),
        ("application/json", format!("{{\"sub\": \"{}\"}}", "x".repeat(5000)), 413, "at most 4096 bytes"),
        ("application/json", json!({"sub": "x".repeat(257)}).to_string(), 400, "at most 256 bytes"),
        ("application/json", json!({"sub": ""}).to_string(), 400, "non-empty string"),
        ("application/json", json!({"sub": 7}).to_string(), 400, "non-empty string"),
        ("application/json", json!({"sub": "a", "jti": "b"}).to_string(), 400, "exactly one of"),
        ("application/json", json!({"user": "a"}).to_string(), 400, "unknown field `user`"),
        ("application/json", "[1]".to_owned(), 400, "JSON object"),
    ];
    for (ctype, body, status, says) in cases {
        let (s, v) = send(ctype, body).await;
        assert_eq!(s, status, "{v}");
        assert_eq!(v["error"], if status == 413 { "payload_too_large" } else { "invalid_request" }, "{v}");
        assert!(v["error_description"].as_str().unwrap().contains(says), "{v} should say {says}");
    }
    // A 256-byte subject is fine, with a charset parameter on the content type.
    let (s, v) = send("application/json; charset=utf-8", json!({"sub": "x".repeat(256)}).to_string()).await;
    assert_eq!(s, 200, "{v}");
    // Not an admin.
    let r = http.post(&url).bearer_auth(ts.token(&["md:read:*"])).json(&json!({"sub": "x"})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    for (result, n) in
        [("unsupported_media_type", 1.0), ("too_large", 1.0), ("bad_request", 6.0), ("ok", 1.0), ("forbidden", 1.0)]
    {
        assert_eq!(ts.metric(&format!("tickgate_revoke_requests_total{{result=\"{result}\"}}")).await, n, "{result}");
    }
    ts.shutdown().await;
}

/// The revoke endpoint logs which admin revoked what (the admin token's subject and the
/// target), never a token.
#[test]
fn revocations_are_audited_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = bin::write_config(
        dir.path(),
        "[issuer]\nclients = [{ id = \"ops-alice\", secret = \"ops-secret\", scopes = [\"md:read:*\", \"tickgate:admin\"] }]\n",
    );
    let (mut serve, serving) = bin::spawn_serving(
        Command::new(bin::BIN)
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped()),
    );
    let (base, admin) = (serving.base, serving.admin);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let token = rt.block_on(async {
        let token = tickgate_client::fetch_token(&base, "ops-alice", "ops-secret", None).await.unwrap();
        let r = reqwest::Client::new()
            .post(format!("{admin}/admin/revoke"))
            .bearer_auth(&token)
            .json(&json!({"sub": "mallory"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        token
    });
    let _ = Command::new("kill").args(["-TERM", &serve.0.id().to_string()]).status();
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut serve.0.stderr.take().unwrap(), &mut logs).unwrap();
    // Drop terminal colour sequences (ESC [ ... m) before reading the fields.
    let mut plain = String::new();
    let mut chars = logs.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(c);
        }
    }
    let line =
        plain.lines().find(|l| l.contains("revocation applied")).unwrap_or_else(|| panic!("no audit line: {plain}"));
    assert!(line.contains("admin=ops-alice") && line.contains("target_sub=mallory"), "{line}");
    assert!(!logs.contains(&token), "the admin token was logged");
    assert!(!logs.contains(token.split('.').nth(2).unwrap()), "a token signature was logged");
}
