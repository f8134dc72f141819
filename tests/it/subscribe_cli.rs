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
