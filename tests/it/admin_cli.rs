//! `tickgate admin` (issue #15): the admin API from the command line, against a real server:
//! `connections` lists the streams, `revoke` closes a subject's streams with 4003 and prints
//! the server's answer, and a token without `tickgate:admin` is refused with the status.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common::{self, bin::BIN, unix_now, wait_close, TestServer};
use serde_json::{json, Value};
use std::time::Duration;

async fn admin(ts: &TestServer, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(BIN)
        .args(["admin", "--admin", &ts.admin])
        .args(args)
        .env("TICKGATE_ADMIN_TOKEN", token)
        .output()
        .await
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[tokio::test]
async fn admin_lists_connections_and_revokes_a_subject() {
    let ts = TestServer::start(50.0, |_| {}).await;
    let now = unix_now();
    let mut subs = Vec::new();
    for who in ["alice", "bob"] {
        let t = ts.token_with(who, "md:read:T", now, now + 300, &format!("{who}-jti"));
        let (sub, r) = common::subscribed(&ts, &t, "T", json!(["S0"]), false).await;
        assert!(matches!(r, tickgate_proto::control::ServerMsg::Subscribed { .. }), "{r:?}");
        subs.push(sub);
    }
    let root = ts.token(&["tickgate:admin"]);
    let (code, out, err) = admin(&ts, &root, &["connections"]).await;
    assert_eq!(code, 0, "{err}");
    let listed: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut who: Vec<&str> = listed.iter().filter_map(|c| c["sub"].as_str()).collect();
    who.sort();
    assert_eq!(who, ["alice", "bob"], "{out}");

    let (code, out, err) = admin(&ts, &root, &["revoke", "--sub", "alice"]).await;
    assert_eq!(code, 0, "{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["streams_closed"], 1, "{answer}");
    let mut subs = subs.into_iter();
    let mut alice = subs.next().unwrap();
    assert_eq!(wait_close(&mut alice, Duration::from_secs(10)).await, 4003);

    // Not an admin: refused, with the status, exit 1.
    let (code, _, err) = admin(&ts, &ts.token(&["md:read:T"]), &["connections"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("admin API refused (403)"), "{err}");
    ts.shutdown().await;
}
