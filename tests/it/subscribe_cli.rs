//! `tickgate subscribe` as a script sees it (issue #15, item 2): it always ends, with an
//! exit code per way of ending (docs/protocol.md §16, *Scripting*), the server's own words on
//! standard error, and `--limit` exact.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common::{self, bin::BIN, unix_now, TestServer};
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::Duration;
use tickgate_client::tools::exit;
use tokio::io::{AsyncBufReadExt, BufReader};

/// What a finished run left: exit code, stdout lines, stderr.
struct Run {
    code: i32,
    lines: Vec<Value>,
    stderr: String,
}

fn cmd(url: &str, token: &str, feed: &str, symbols: &str, extra: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(BIN);
    c.args(["subscribe", "--url", url, "--feed", feed, "--symbols", symbols])
        .args(extra)
        .env("TICKGATE_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Runs to the end; a run that does not end within a generous minute fails the test (the
/// bug this file guards against is a subscribe that never exits).
async fn run(mut c: tokio::process::Command) -> Run {
    let out = tokio::time::timeout(Duration::from_secs(60), c.output()).await.expect("subscribe ends").unwrap();
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    Run { code: out.status.code().unwrap_or(-1), lines, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

fn records(lines: &[Value]) -> usize {
    lines.iter().filter(|v| v["type"] == "trade" || v["type"] == "quote").count()
}

#[tokio::test]
async fn refusals_end_the_run_with_their_own_exit_code_and_the_servers_words() {
    let ts = TestServer::start(200.0, |_| {}).await;
    let token = ts.token(&["md:read:T"]);
    // Unknown feed, unknown symbol, a feed the token may not read: each is an `error` reply.
    for (feed, symbols, code) in
        [("NOPE", "*", "unknown_feed"), ("T", "S0,ZZZ", "unknown_symbol"), ("OTHER", "*", "insufficient_scope")]
    {
        let r = run(cmd(&ts.url, &token, feed, symbols, &[])).await;
        assert_eq!(r.code, i32::from(exit::SUBSCRIBE_REFUSED), "{feed} {symbols}: {}", r.stderr);
        assert!(r.stderr.contains(&format!("subscription refused ({code})")), "{}", r.stderr);
        assert!(r.lines.iter().any(|v| v["type"] == "error" && v["code"] == code), "{:?}", r.lines);
    }
    // A refused handshake says why, in the server's words, not only "401".
    let now = unix_now();
    let expired = ts.token_with("tester", "md:read:T", now - 600, now - 300, "old");
    let r = run(cmd(&ts.url, &expired, "T", "*", &[])).await;
    assert_eq!(r.code, i32::from(exit::UNAUTHORIZED), "{}", r.stderr);
    assert!(r.stderr.contains("401") && r.stderr.contains("expired"), "{}", r.stderr);
    // No md:read scope at all: 403 at the handshake.
    let r = run(cmd(&ts.url, &ts.token(&["openid"]), "T", "*", &[])).await;
    assert_eq!(r.code, i32::from(exit::HANDSHAKE_REFUSED), "{}", r.stderr);
    assert!(r.stderr.contains("403 insufficient_scope"), "{}", r.stderr);
    // Nobody listening: a connection failure.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("ws://{}/v1/stream", l.local_addr().unwrap())
    };
    let r = run(cmd(&dead, &token, "T", "*", &[])).await;
    assert_eq!(r.code, i32::from(exit::CONNECT), "{}", r.stderr);
    ts.shutdown().await;
}

#[tokio::test]
async fn limit_is_exact_even_inside_a_batch() {
    // 5,000 ticks/s: batches carry many records, so a per-batch check would overshoot.
    let ts = TestServer::start(5000.0, |_| {}).await;
    let token = ts.token(&["md:read:T"]);
    for limit in ["1", "8", "333"] {
        let r = run(cmd(&ts.url, &token, "T", "*", &["--limit", limit])).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(records(&r.lines), limit.parse::<usize>().unwrap());
    }
    // The resume file follows what was printed: a second run continues at the first record
    // the first run did not print, with no hole and no duplicate.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.json");
    let file_arg = file.to_str().unwrap();
    let first = run(cmd(&ts.url, &token, "T", "*", &["--limit", "50", "--resume-file", file_arg])).await;
    let second = run(cmd(&ts.url, &token, "T", "*", &["--limit", "400", "--resume-file", file_arg])).await;
    assert_eq!((first.code, second.code), (0, 0), "{} {}", first.stderr, second.stderr);
    let mut per: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for v in first.lines.iter().chain(&second.lines) {
        assert_ne!(v["type"], "delivery_violation", "{v}");
        if v["type"] == "trade" || v["type"] == "quote" {
            per.entry(v["symbol"].as_str().unwrap().to_owned()).or_default().push(v["seq"].as_u64().unwrap());
        }
    }
    for (sym, seqs) in per {
        let start = seqs[0];
        assert_eq!(seqs, (start..start + seqs.len() as u64).collect::<Vec<_>>(), "{sym}: no hole, no duplicate");
    }
    ts.shutdown().await;
}

#[tokio::test]
async fn a_close_by_the_server_is_not_success() {
    let ts = TestServer::start(200.0, |_| {}).await;
    // Expiry on the live connection: 4001.
    let now = unix_now();
    let short = ts.token_with("tester", "md:read:T", now, now + 2, "short");
    let r = run(cmd(&ts.url, &short, "T", "*", &[])).await;
    assert_eq!(r.code, i32::from(exit::TOKEN_EXPIRED), "{}", r.stderr);
    assert!(r.stderr.contains("4001") && r.stderr.contains("token expired"), "{}", r.stderr);

    // Revocation of the live connection: 4003; afterwards the same token is refused at the
    // handshake, and the message says so.
    let token = ts.token_with("tester", "md:read:T", now, now + 300, "to-revoke");
    let mut child = cmd(&ts.url, &token, "T", "*", &[]).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    // Streaming first (a record printed), then revoked.
    loop {
        let line = tokio::time::timeout(common::EVENTUALLY, out.next_line()).await.unwrap().unwrap().unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["type"] == "trade" || v["type"] == "quote" {
            break;
        }
    }
    let (s, _) = common::revoke(&ts, &ts.token(&["tickgate:admin"]), json!({"jti": "to-revoke"})).await;
    assert_eq!(s, 200);
    while tokio::time::timeout(common::EVENTUALLY, out.next_line()).await.unwrap().unwrap().is_some() {}
    let status = tokio::time::timeout(common::EVENTUALLY, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(i32::from(exit::TOKEN_REVOKED)));
    let r = run(cmd(&ts.url, &token, "T", "*", &[])).await;
    assert_eq!(r.code, i32::from(exit::UNAUTHORIZED), "{}", r.stderr);
    assert!(r.stderr.contains("revoked"), "{}", r.stderr);
    ts.shutdown().await;
}

/// With client credentials, `subscribe` answers `token_expiring` with an in-band refresh:
/// a run several token lifetimes long stays on one connection and ends at its limit.
#[tokio::test]
async fn client_credentials_keep_a_long_run_alive_through_refreshes() {
    let ts = TestServer::start(300.0, |c| {
        c.issuer.token_ttl_s = 3;
    })
    .await;
    let mut c = cmd(&ts.url, "", "T", "*", &["--client-id", "demo", "--limit", "2400"]);
    c.env_remove("TICKGATE_TOKEN").env("TICKGATE_CLIENT_SECRET", common::SECRET);
    let r = run(c).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(records(&r.lines), 2400);
    let refreshed = r.lines.iter().filter(|v| v["type"] == "refreshed").count();
    // 2,400 records at 300/s is 8 s: at least two 3-second tokens were replaced in-band.
    assert!(refreshed >= 2, "{refreshed} refreshes: {}", r.stderr);
    assert!(!r.lines.iter().any(|v| v["type"] == "closed" || v["type"] == "delivery_violation"), "{:?}", r.lines);
    ts.shutdown().await;
}

/// With `--reconnect`, a server restart (SIGTERM: `shutdown`, 1001) is survived: the run
/// waits for the server to come back on its address, fetches a token from the new issuer
/// (its key is new: the old token is refused), subscribes again with resume and goes on.
#[tokio::test]
async fn reconnect_survives_a_server_restart() {
    const SECRET: &str = "subscribe-cli-reconnect";
    let dir = tempfile::tempdir().unwrap();
    let port = common::nats::free_port();
    let cfg = dir.path().join("tickgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n[server]\nstate_dir = {:?}\ndrain_ms = 2000\n",
            dir.path().join("state")
        ),
    )
    .unwrap();
    let serve = || {
        common::bin::spawn_serving(
            std::process::Command::new(BIN)
                .args(["serve", "--config", cfg.to_str().unwrap()])
                .env("TICKGATE_DEMO_SECRET", SECRET)
                .stderr(Stdio::null()),
        )
    };
    let (first, serving) = serve();
    let mut c = cmd(&serving.stream, "", "DEMO", "*", &["--client-id", "demo", "--reconnect"]);
    c.env_remove("TICKGATE_TOKEN").env("TICKGATE_CLIENT_SECRET", SECRET);
    let mut child = c.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut lines: Vec<Value> = Vec::new();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(common::EVENTUALLY, out.next_line()).await.unwrap().unwrap().unwrap();
        serde_json::from_str(&line).unwrap()
    };
    while records(&lines) < 20 {
        lines.push(next().await);
    }
    // Restart: SIGTERM, wait for the exit, start again on the same address.
    let mut first = first;
    assert!(std::process::Command::new("kill").arg(first.0.id().to_string()).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || first.0.wait().unwrap()).await.unwrap();
    assert!(status.success());
    let (_second, _) = serve();
    // The run goes on: closed 1001, then subscribed again, then records.
    let closed_at = loop {
        lines.push(next().await);
        if let Some(i) = lines.iter().position(|l| l["type"] == "closed") {
            break i;
        }
    };
    while !(lines[closed_at..].iter().any(|l| l["type"] == "subscribed") && records(&lines[closed_at..]) >= 20) {
        lines.push(next().await);
    }
    let closed = lines.iter().find(|l| l["type"] == "closed").unwrap();
    assert_eq!(closed["code"], 1001, "{closed}");
    assert!(lines.iter().any(|l| l["type"] == "shutdown"), "the server said it was going");
    assert!(!lines.iter().any(|l| l["type"] == "delivery_violation"), "{lines:?}");
    child.kill().await.unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).await.unwrap();
    assert!(stderr.contains("reconnecting"), "{stderr}");
}

/// `tickgate token --scope A,B` asks for two scopes (the grant wants them space-separated;
/// the issuer refuses a comma-joined one), and the token carries both.
#[tokio::test]
async fn token_scope_takes_commas() {
    let ts = TestServer::start(10.0, |_| {}).await;
    let out = tokio::process::Command::new(BIN)
        .args(["token", "--issuer", &ts.base, "--client-id", "demo", "--scope", "md:read:T,md:read:OTHER"])
        .env("TICKGATE_CLIENT_SECRET", common::SECRET)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let payload = token.trim().split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).unwrap(),
    )
    .unwrap();
    assert_eq!(claims["scope"], "md:read:T md:read:OTHER", "{claims}");
    ts.shutdown().await;
}
