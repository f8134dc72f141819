//! One issuer for many nodes: embedded issuers that load their signing keys from the same
//! PEM files (`issuer.signing_key_files`) issue and accept each other's tokens, publish the
//! same kids, sign with the last file, and verify with every listed one. Real servers on
//! loopback, real keys written by the keygen code (and by the `tickgate keygen` binary).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{json, Value};
use tickgate::auth::keyfile;
use tickgate::config::Config;
use tickgate_proto::control::ServerMsg;

/// The `iss` every node of the test cluster issues and expects.
const CLUSTER_ISS: &str = "https://md.cluster.test";

/// Writes a new key file `name` in `dir`.
fn key(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    keyfile::write_new_key_file(&p).expect("key written");
    p
}

/// A node whose issuer loads `files`.
async fn node(files: &[PathBuf]) -> TestServer {
    let files = files.to_vec();
    TestServer::start(20.0, move |c: &mut Config| {
        c.issuer.signing_key_files = files;
        c.issuer.key_rotation_s = 0;
        c.issuer.issuer = Some(CLUSTER_ISS.into());
    })
    .await
}

/// A token from this node's own `/oauth2/token`, over HTTP. Posted to the node's address,
/// not through discovery: discovery names the cluster's `iss` (the balancer's URL), which
/// does not resolve here.
async fn fetched_token(ts: &TestServer) -> String {
    let form = [("grant_type", "client_credentials"), ("client_id", "demo"), ("client_secret", SECRET)];
    let resp = reqwest::Client::new().post(format!("{}/oauth2/token", ts.base)).form(&form).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["access_token"].as_str().expect("access_token").to_owned()
}

/// The kids of the node's JWKS document, in its order.
async fn jwks_kids(ts: &TestServer) -> Vec<String> {
    let doc: Value = reqwest::get(format!("{}/oauth2/jwks", ts.base)).await.unwrap().json().await.unwrap();
    doc["keys"].as_array().expect("keys").iter().map(|k| k["kid"].as_str().expect("kid").to_owned()).collect()
}

fn header_kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).expect("header").kid.expect("kid")
}

/// A token streams on `ts`: the handshake passes and `subscribe` is answered `subscribed`.
async fn streams_on(ts: &TestServer, token: &str) {
    let (mut sub, r) = subscribed(ts, token, "T", json!(["S0"]), false).await;
    assert!(matches!(r, ServerMsg::Subscribed { .. }), "{r:?}");
    let (records, _) = read_records(&mut sub, 1).await;
    assert!(records >= 1);
}

#[tokio::test]
async fn two_nodes_with_the_same_files_accept_each_others_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let files = [key(dir.path(), "2026-11.pem"), key(dir.path(), "2026-12.pem")];
    let a = node(&files).await;
    let b = node(&files).await;

    let kids = jwks_kids(&a).await;
    assert_eq!(kids.len(), 2);
    assert_eq!(kids, jwks_kids(&b).await, "both nodes publish the same kids, in the same order");
    assert_eq!(kids[0], keyfile::kid_of_file(&files[0]).unwrap());
    assert_eq!(kids[1], keyfile::kid_of_file(&files[1]).unwrap());

    let from_a = fetched_token(&a).await;
    let from_b = fetched_token(&b).await;
    assert_eq!(header_kid(&from_a), kids[1], "the last file signs");
    assert_eq!(header_kid(&from_b), kids[1]);
    streams_on(&b, &from_a).await;
    streams_on(&a, &from_b).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn the_last_file_signs_and_every_listed_key_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (key(dir.path(), "k1.pem"), key(dir.path(), "k2.pem"));
    let (kid1, kid2) = (keyfile::kid_of_file(&k1).unwrap(), keyfile::kid_of_file(&k2).unwrap());
    let old = node(std::slice::from_ref(&k1)).await;
    let both = node(&[k1.clone(), k2.clone()]).await;
    let new = node(std::slice::from_ref(&k2)).await;

    let t1 = fetched_token(&old).await;
    assert_eq!(header_kid(&t1), kid1);
    let t2 = fetched_token(&both).await;
    assert_eq!(header_kid(&t2), kid2, "with [k1, k2], k2 signs");
    assert_eq!(jwks_kids(&both).await, [kid1.clone(), kid2.clone()]);

    // Mid-change: a node that already has [k1, k2] accepts what a k1-only node issued...
    streams_on(&both, &t1).await;
    let (s, _) = bearer_handshake(&both, &t1).await;
    assert_eq!(s, 101);
    // ... and the k1-only node accepts nothing signed by k2 (why k2 goes *before* the last
    // entry everywhere first, and becomes the last only once every node has it).
    let (s, b) = bearer_handshake(&old, &t2).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("invalid_token")), "{b}");
    // Once k1 is gone from the list, its tokens are refused.
    let (s, b) = bearer_handshake(&new, &t1).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("invalid_token")), "{b}");
    streams_on(&new, &t2).await;
    assert_eq!(jwks_kids(&new).await, [kid2]);
    for ts in [old, both, new] {
        ts.shutdown().await;
    }
}

/// Automatic rotation is off with key files: the ring is the files'.
#[tokio::test]
async fn keys_from_files_are_not_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = key(dir.path(), "k1.pem");
    let ts = node(std::slice::from_ref(&k1)).await;
    let iss = ts.server().issuer().unwrap();
    let e = iss.rotate().unwrap_err();
    assert!(e.to_string().contains("signing_key_files"), "{e}");
    assert_eq!(iss.kid(), keyfile::kid_of_file(&k1).unwrap());
    ts.shutdown().await;
}

/// A bad key file stops the start with a message naming the file (and no key material).
#[tokio::test]
async fn a_bad_key_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let good = key(dir.path(), "good.pem");
    let cert = dir.path().join("cert.pem");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    let missing = dir.path().join("missing.pem");
    let cases = [
        (vec![good.clone(), cert.clone()], "cert.pem", "holds no private key"),
        (vec![missing.clone()], "missing.pem", "cannot read"),
        (vec![good.clone(), good.clone()], "good.pem", "hold the same key"),
    ];
    for (files, name, words) in cases {
        let feeds = tempfile::tempdir().unwrap();
        std::fs::write(feeds.path().join("t.toml"), feed_toml("T", 1, 2, 10.0)).unwrap();
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            feeds_dir: feeds.path().to_owned(),
            ..Config::default()
        };
        cfg.server.state_dir = Some(feeds.path().join("state"));
        cfg.issuer.signing_key_files = files;
        cfg.issuer.key_rotation_s = 0;
        cfg.issuer.issuer = Some(CLUSTER_ISS.into());
        let e = tickgate::Server::start(cfg).await.expect_err("refused").to_string();
        assert!(e.contains(name) && e.contains(words), "{e}");
    }
}

/// `tickgate keygen --out FILE` writes a 0600 PKCS#8 key a node then signs with, and never
/// overwrites an existing file.
#[tokio::test]
async fn keygen_writes_a_private_key_a_node_signs_with() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.pem");
    let out = Command::new(bin::BIN).args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let kid = keyfile::kid_of_file(&path).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&kid), "the kid is printed");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "PKCS#8 PEM");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let again = Command::new(bin::BIN).args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("node.pem"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "the existing key is kept");

    let ts = node(std::slice::from_ref(&path)).await;
    assert_eq!(header_kid(&fetched_token(&ts).await), kid);
    ts.shutdown().await;
}

/// A key file others may read is used, with a warning naming it; the log shows kids only,
/// never the key.
#[cfg(unix)]
#[tokio::test]
async fn a_key_file_readable_by_others_is_used_with_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let path = key(dir.path(), "shared-mode.pem");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ts = node(std::slice::from_ref(&path)).await;
    assert_eq!(header_kid(&fetched_token(&ts).await), keyfile::kid_of_file(&path).unwrap());
    ts.shutdown().await;
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let warning = text
        .lines()
        .find(|l| l.contains("shared-mode.pem") && l.contains("accessible by group or others"))
        .unwrap_or_else(|| panic!("no warning for the file in:\n{text}"));
    assert!(warning.contains("WARN") && warning.contains("644"), "{warning}");
    let pem = std::fs::read_to_string(&path).unwrap();
    let body = pem.lines().nth(1).unwrap();
    assert!(!text.contains(body), "key material in the log");
}
