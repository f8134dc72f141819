//! The HTTP edge under attack: unfinished request bodies cut at `server.request_timeout_ms`
//! on both listeners, oversized bodies refused 413, the per-address cap on connections
//! without a completed request, and descriptor exhaustion (EMFILE) on the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `head_and_body` and reads everything the server sends until it closes; returns
/// the status and the JSON body (Null if none).
async fn raw_exchange(addr: SocketAddr, head_and_body: &[u8]) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head_and_body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(EVENTUALLY, s.read_to_end(&mut out)).await.expect("the server closes in time").unwrap();
    parse_response(&out)
}

fn parse_response(out: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(out);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).and_then(|b| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
    (status, body)
}

fn partial_post(path: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ngrant_type=cli"
    )
    .into_bytes()
}

/// A complete head with a body that never finishes: 408 `request_timeout` on the public
/// listener (`/oauth2/token`) and the admin one (`/admin/revoke`), the connection closed,
/// counted in `tickgate_http_timeouts_total{listener,stage="body"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_bodies_are_cut_at_the_request_deadline() {
    let ts = TestServer::start(50.0, |c| c.server.request_timeout_ms = 500).await;
    let (status, body) = raw_exchange(ts.server().addr(), &partial_post("/oauth2/token")).await;
    assert_eq!((status, body["error"].as_str()), (408, Some("request_timeout")), "{body}");
    let (status, body) = raw_exchange(ts.server().admin_addr(), &partial_post("/admin/revoke")).await;
    assert_eq!((status, body["error"].as_str()), (408, Some("request_timeout")), "{body}");
    // A head that never finishes is closed (nothing can be answered to half a head).
    let (status, _) = raw_exchange(ts.server().addr(), b"POST /oauth2/token HTTP/1.1\r\nHost: t\r\n").await;
    assert_eq!(status, 0);
    let m = ts.metrics().await;
    assert_eq!(metric_value(&m, "tickgate_http_timeouts_total{listener=\"public\",stage=\"body\"}"), 1.0);
    assert_eq!(metric_value(&m, "tickgate_http_timeouts_total{listener=\"admin\",stage=\"body\"}"), 1.0);
    assert_eq!(metric_value(&m, "tickgate_http_timeouts_total{listener=\"public\",stage=\"head\"}"), 1.0);
    ts.shutdown().await;
}

/// Bodies over `limits.max_body_bytes` get a JSON 413, declared or chunked, on both listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_413() {
    let ts = TestServer::start(50.0, |_| {}).await;
    let http = reqwest::Client::new();
    let big = "x".repeat(20_000);
    let r = http
        .post(format!("{}/oauth2/token", ts.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("grant_type=client_credentials&pad={big}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "payload_too_large");
    let r = http.post(format!("{}/admin/revoke", ts.admin)).body(big.clone()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "payload_too_large");
    // Chunked (no Content-Length): refused when the body grows past the limit.
    let chunked = format!(
        "POST /oauth2/token HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let (status, body) = raw_exchange(ts.server().addr(), chunked.as_bytes()).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("payload_too_large")), "{body}");
    let m = ts.metrics().await;
    assert_eq!(metric_value(&m, "tickgate_http_refused_total{listener=\"public\",reason=\"body_too_large\"}"), 2.0);
    assert_eq!(metric_value(&m, "tickgate_http_refused_total{listener=\"admin\",reason=\"body_too_large\"}"), 1.0);
    ts.shutdown().await;
}

async fn token_status(http: &reqwest::Client, base: &str) -> Result<u16, reqwest::Error> {
    let r = http
        .post(format!("{base}/oauth2/token"))
        .basic_auth("demo", Some(SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await?;
    Ok(r.status().as_u16())
}

/// Past `limits.max_pending_per_ip` sockets without a completed request, further sockets
/// from that address are closed at once and counted; the admin listener and other addresses
/// are served meanwhile, and the address is served again once its sockets are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_sockets_are_capped_per_address() {
    const CAP: usize = 8;
    let ts = TestServer::start(50.0, |c| {
        c.limits.max_pending_per_ip = CAP;
        c.server.handshake_timeout_ms = 120_000;
        c.server.request_timeout_ms = 120_000;
    })
    .await;
    let addr = ts.server().addr();
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Sockets are accepted in order, so every one past the cap is closed by the server.
    let mut extra = Vec::new();
    for _ in 0..4 {
        extra.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    for mut s in extra {
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(EVENTUALLY, s.read(&mut b)).await.expect("closed in time");
        assert!(matches!(n, Ok(0) | Err(_)), "an extra socket got data: {n:?}");
    }
    assert_eq!(ts.metric("tickgate_http_refused_total{listener=\"public\",reason=\"pending_per_ip\"}").await, 4.0);
    // The held ones are still open.
    for s in &held {
        let mut b = [0u8; 1];
        assert!(matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    }
    // The admin listener answers, and so does the public one for another address.
    let r = reqwest::get(format!("{}/readyz", ts.admin)).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let other = reqwest::Client::builder().local_address(Some("127.0.0.2".parse().unwrap())).build().unwrap();
    assert_eq!(token_status(&other, &ts.base).await.unwrap(), 200);
    // This address is refused until its pending sockets go away.
    let fresh = || reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    assert!(token_status(&fresh(), &ts.base).await.is_err());
    drop(held);
    eventually("the address is served again", EVENTUALLY, || async {
        matches!(token_status(&fresh(), &ts.base).await, Ok(200)).then_some(())
    })
    .await;
    ts.shutdown().await;
}

/// The real binary under `ulimit -n 256`, its stdout's addresses and its log lines.
struct Bin {
    child: Kill,
    base: String,
    admin: String,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

const DEMO_SECRET: &str = "emfile-test-secret";

fn start_bin(limits_toml: &str) -> Bin {
    let dir = tempfile::tempdir().unwrap();
    let cfg = bin::write_config(
        dir.path(),
        &format!(
            "[engine]\nshards = 2\n\
             [server]\nhandshake_timeout_ms = 120000\nrequest_timeout_ms = 120000\n[limits]\n{limits_toml}\n"
        ),
    );
    let (mut child, serving) = bin::spawn_serving(
        Command::new("sh")
            .args(["-c", "ulimit -n 256 && exec \"$0\" serve --config \"$1\"", bin::BIN])
            .arg(&cfg)
            .current_dir(dir.path())
            .env("TICKGATE_DEMO_SECRET", DEMO_SECRET)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped()),
    );
    let stderr = BufReader::new(child.0.stderr.take().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Bin { child, base: serving.base, admin: serving.admin, log, _dir: dir }
}

impl Bin {
    fn accept_error_lines(&self) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains("accept failed")).count()
    }
    async fn metric(&self, series: &str) -> Option<f64> {
        let r = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let text = r.get(format!("{}/metrics", self.admin)).send().await.ok()?.text().await.ok()?;
        // During the flood an answer that is not an exposition is no reading, as no answer is.
        let series: tickgate_bench::prom::Series = series.parse().unwrap();
        Some(tickgate_bench::prom::Exposition::parse(&text).ok()?.value(&series).unwrap_or(0.0))
    }
}

/// Opens up to `n` sockets to the public listener, holding them. The kernel completes
/// connects into the listen backlog (128) whether or not the server accepts, so a server out
/// of descriptors still takes a backlog's worth more; the flood stops at the first connect
/// that fails (the backlog is full) and must exceed the descriptor limit.
fn flood(base: &str, n: usize) -> Vec<std::net::TcpStream> {
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let sockets: Vec<_> =
        (0..n).map_while(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()).collect();
    assert!(sockets.len() > 256, "only {} sockets connected", sockets.len());
    sockets
}

async fn fresh_token_status(base: &str) -> Option<u16> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let r = http
        .post(format!("{base}/oauth2/token"))
        .basic_auth("demo", Some(DEMO_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
}

/// With no descriptor reserve, a flood past `ulimit -n` makes `accept` fail with EMFILE:
/// the accept loop backs off (a few log lines, not twenty a second), counts it in
/// `tickgate_accept_errors_total{listener="public",kind="emfile"}`, and serves again once
/// the flood is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emfile_backs_off_counts_and_recovers() {
    let bin = start_bin("fd_reserve = 0\nmax_pending_per_ip = 100000");
    assert_eq!(fresh_token_status(&bin.base).await, Some(200));
    let started = std::time::Instant::now();
    let sockets = flood(&bin.base, 400);
    eventually("an accept error is logged", EVENTUALLY, || async { (bin.accept_error_lines() > 0).then_some(()) })
        .await;
    assert!(bin.log.lock().unwrap().iter().any(|l| l.contains("accept failed") && l.contains("emfile")));
    // Keep the process out of descriptors a while (an observation window, not a
    // synchronisation): the log stays at about one line per second, not one per error.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lines = bin.accept_error_lines();
    let secs = started.elapsed().as_secs_f64();
    assert!(lines as f64 <= secs + 2.0, "{lines} accept-error lines in {secs:.1} s");
    drop(sockets);
    eventually("served again after the flood", EVENTUALLY, || async {
        (fresh_token_status(&bin.base).await == Some(200)).then_some(())
    })
    .await;
    let emfile = bin.metric("tickgate_accept_errors_total{kind=\"emfile\",listener=\"public\"}").await.unwrap();
    assert!(emfile >= 1.0, "{emfile}");
    let r = reqwest::get(format!("{}/readyz", bin.admin)).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    drop(bin.child);
}

/// With the default descriptor reserve, the same flood never exhausts the process: public
/// sockets past the reserve are closed at once (`reason="fd_reserve"`), `/readyz` and
/// `/metrics` on the admin listener answer during the flood, and the public listener serves
/// again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_reserve_keeps_admin_answering_during_a_flood() {
    let bin = start_bin("max_pending_per_ip = 100000");
    let sockets = flood(&bin.base, 400);
    let refused = eventually("public sockets refused for the reserve", EVENTUALLY, || async {
        let v = bin.metric("tickgate_http_refused_total{listener=\"public\",reason=\"fd_reserve\"}").await?;
        (v >= 1.0).then_some(v)
    })
    .await;
    assert!(refused >= 1.0);
    let r = reqwest::get(format!("{}/readyz", bin.admin)).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(bin.metric("tickgate_accept_errors_total{kind=\"emfile\",listener=\"admin\"}").await, Some(0.0));
    drop(sockets);
    eventually("served again after the flood", EVENTUALLY, || async {
        (fresh_token_status(&bin.base).await == Some(200)).then_some(())
    })
    .await;
    drop(bin.child);
}

/// A keep-alive connection that sends nothing after its answer is closed after
/// `server.handshake_timeout_ms` and counted as `stage="idle"` (not as a request timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let ts = TestServer::start(50.0, |c| c.server.handshake_timeout_ms = 300).await;
    let mut s = tokio::net::TcpStream::connect(ts.server().admin_addr()).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    // The answer, then the close once the connection has been idle past the bound.
    tokio::time::timeout(EVENTUALLY, s.read_to_end(&mut out)).await.expect("closed in time").unwrap();
    assert_eq!(parse_response(&out), (200, serde_json::json!({"status": "ok"})));
    let m = ts.metrics().await;
    assert_eq!(metric_value(&m, "tickgate_http_timeouts_total{listener=\"admin\",stage=\"idle\"}"), 1.0);
    assert_eq!(metric_value(&m, "tickgate_http_timeouts_total{listener=\"admin\",stage=\"head\"}"), 0.0);
    ts.shutdown().await;
}
