//! Cluster-wide revocation (nats-feeds-v1 §3) against a real nats-server: edges sharing
//! one issuer's key files and one NATS; `POST /admin/revoke` on edge A closes the subject's
//! stream on edge B with 4003 and B refuses the token from then on; an edge started after
//! the revocation refuses it as soon as it is ready; with NATS down the call answers 202
//! `"cluster": "pending"`, applies at once on A, and reaches the bucket and B once NATS is
//! back. The edges have no `nats` feed: `nats.servers` alone makes revocation cluster-wide.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use base64::Engine as _;
use common::nats::{start_nats, wait_ready, Nats};
use common::*;
use serde_json::{json, Value};
use tickgate::auth::keyfile;
use tickgate_client::Subscriber;
use tickgate_proto::control::ServerMsg;

const BUCKET: &str = "tickgate_revocations";
const CLUSTER_ISS: &str = "https://md.cluster.test";

/// An edge on `nats` whose issuer signs with `key` (so every edge accepts every edge's tokens).
async fn edge(nats: &Nats, key: &Path) -> TestServer {
    let (url, key) = (nats.url.clone(), key.to_path_buf());
    TestServer::start(50.0, move |c| {
        c.nats.servers = vec![url];
        c.issuer.signing_key_files = vec![key];
        c.issuer.key_rotation_s = 0;
        c.issuer.issuer = Some(CLUSTER_ISS.into());
    })
    .await
}

/// A stream of `sub` on `ts`, subscribed and delivering.
async fn streaming(ts: &TestServer, token: &str) -> Subscriber {
    let (mut sub, r) = subscribed(ts, token, "T", json!(["S0"]), false).await;
    assert!(matches!(r, ServerMsg::Subscribed { .. }), "{r:?}");
    let (records, _) = read_records(&mut sub, 1).await;
    assert!(records >= 1);
    sub
}

/// A token of `sub` (jti `sub`-jti), issued now, valid 300 s.
fn token_of(ts: &TestServer, sub: &str) -> String {
    let now = unix_now();
    ts.token_with(sub, "md:read:*", now, now + 300, &format!("{sub}-jti"))
}

/// The handshake of a revoked token: 401 "token revoked".
async fn assert_refused(ts: &TestServer, token: &str, who: &str) {
    let (s, body) = bearer_handshake(ts, token).await;
    assert_eq!(s, 401, "{who}: {body}");
    assert_eq!(body["error_description"], "token revoked", "{who}: {body}");
}

fn key_of_sub(sub: &str) -> String {
    format!("sub.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sub))
}

/// The bucket entry of `key` as JSON, when the bucket and the entry exist.
async fn bucket_entry(nats: &Nats, key: &str) -> Option<Value> {
    let client = async_nats::connect(&nats.url).await.ok()?;
    let kv = jetstream::new(client).get_key_value(BUCKET).await.ok()?;
    let v = kv.get(key).await.ok()??;
    serde_json::from_slice(&v).ok()
}

fn cluster_metric(result: &str) -> String {
    format!("tickgate_revocations_cluster_total{{result=\"{result}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
async fn a_revocation_on_one_edge_closes_the_subject_on_another_and_a_later_edge_refuses_it() {
    let nats = start_nats();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    keyfile::write_new_key_file(&key).unwrap();
    let a = edge(&nats, &key).await;
    let b = edge(&nats, &key).await;
    wait_ready(&a.admin).await;
    wait_ready(&b.admin).await;

    let token = token_of(&a, "sam");
    let mut on_b = streaming(&b, &token).await;
    let started = Instant::now();
    let (s, v) = revoke(&a, &a.token(&["tickgate:admin"]), json!({"sub": "sam"})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["cluster"], "stored", "{v}");
    assert_eq!(v["revoked"], "sub", "{v}");
    assert_eq!(wait_close(&mut on_b, Duration::from_secs(10)).await, 4003);
    println!("revocation on A closed the stream on B after {:?}", started.elapsed());
    assert_refused(&b, &token, "B").await;
    assert_refused(&a, &token, "A").await;

    let entry = bucket_entry(&nats, &key_of_sub("sam")).await.expect("the bucket holds the revocation");
    assert_eq!(entry["by"], "tester", "{entry}");
    assert!(entry["at"].as_u64().is_some_and(|at| at + 5 >= unix_now()), "{entry}");
    assert_eq!(a.metric(&cluster_metric("stored")).await, 1.0);
    assert_eq!(b.metric(&cluster_metric("applied_from_cluster")).await, 1.0);
    assert_eq!(a.metric(&cluster_metric("applied_from_cluster")).await, 0.0, "its own write changes nothing on A");

    // An edge started later: ready only once the bucket is loaded, so it refuses at once.
    let c = edge(&nats, &key).await;
    wait_ready(&c.admin).await;
    assert_refused(&c, &token, "C").await;
    assert_eq!(c.metric(&cluster_metric("applied_from_cluster")).await, 1.0);
    // A token of the subject issued after the revocation (iat a second past its `at`) is
    // let in: a subject revocation refuses what was issued at or before it.
    let at = entry["at"].as_u64().unwrap();
    let fresh = c.token_with("sam", "md:read:*", at + 1, at + 300, "sam-fresh");
    drop(streaming(&c, &fresh).await);

    // Entries some other program wrote wrong: counted, skipped; the watch goes on.
    let client = async_nats::connect(&nats.url).await.unwrap();
    let kv = jetstream::new(client).get_key_value(BUCKET).await.unwrap();
    kv.put("nope.c2Ft", "{}".into()).await.unwrap();
    kv.put(key_of_sub("zed"), "not json".into()).await.unwrap();
    b.wait_metric(&cluster_metric("bad_entry"), 2.0).await;
    let token_ann = token_of(&a, "ann");
    let mut ann_on_c = streaming(&c, &token_ann).await;
    let (s, v) = revoke(&b, &b.token(&["tickgate:admin"]), json!({"jti": "ann-jti"})).await;
    assert_eq!((s, v["cluster"].as_str()), (200, Some("stored")), "{v}");
    assert_eq!(wait_close(&mut ann_on_c, Duration::from_secs(10)).await, 4003);
    eventually("A refuses the revoked jti", EVENTUALLY, || async {
        (bearer_handshake(&a, &token_ann).await.0 == 401).then_some(())
    })
    .await;

    c.shutdown().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
async fn with_nats_down_the_revocation_applies_here_at_once_and_reaches_the_cluster_later() {
    let mut nats = start_nats();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    keyfile::write_new_key_file(&key).unwrap();
    let a = edge(&nats, &key).await;
    let b = edge(&nats, &key).await;
    wait_ready(&a.admin).await;
    wait_ready(&b.admin).await;
    let token = token_of(&a, "pat");
    let mut on_a = streaming(&a, &token).await;
    let mut on_b = streaming(&b, &token).await;

    nats.stop();
    eventually("A sees NATS gone", EVENTUALLY, || async {
        (a.metric("tickgate_nats_connected").await == 0.0).then_some(())
    })
    .await;
    let (s, v) = revoke(&a, &a.token(&["tickgate:admin"]), json!({"sub": "pat"})).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["cluster"], "pending", "{v}");
    assert_eq!(v["streams_closed"], 1, "applied on A at once: {v}");
    assert_eq!(wait_close(&mut on_a, Duration::from_secs(10)).await, 4003);
    assert_refused(&a, &token, "A").await;
    assert_eq!(a.metric(&cluster_metric("pending")).await, 1.0);

    nats.start();
    let started = Instant::now();
    let entry = eventually("the queued revocation reaches the bucket", EVENTUALLY, || async {
        bucket_entry(&nats, &key_of_sub("pat")).await
    })
    .await;
    assert_eq!(entry["by"], "tester", "{entry}");
    assert_eq!(wait_close(&mut on_b, EVENTUALLY).await, 4003);
    println!("after NATS came back, B applied the queued revocation within {:?}", started.elapsed());
    assert_refused(&b, &token, "B").await;
    assert_eq!(a.metric(&cluster_metric("stored_later")).await, 1.0);

    b.shutdown().await;
    a.shutdown().await;
}

/// An existing bucket whose entries would expire before the tokens they revoke is refused,
/// never changed: the edge stays not ready and says why; once the operator mends the
/// bucket, the edge takes it without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
async fn a_bucket_that_forgets_revocations_too_soon_is_refused_until_mended() {
    let nats = start_nats();
    let js = jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let mut config = jetstream::stream::Config {
        name: format!("KV_{BUCKET}"),
        subjects: vec![format!("$KV.{BUCKET}.>")],
        max_messages_per_subject: 1,
        max_age: Duration::from_secs(60),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    js.create_stream(config.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    keyfile::write_new_key_file(&key).unwrap();
    let a = edge(&nats, &key).await;
    let body = eventually("the edge says why it is not ready", EVENTUALLY, || async {
        let (s, body) = common::nats::readyz(&a.admin).await;
        (s == 503 && body.contains("revocation bucket refused")).then_some(body)
    })
    .await;
    assert!(body.contains("expire after 60 s") && body.contains("86430 s"), "{body}");
    // Not changed behind the operator's back.
    let mut stream = js.get_stream(format!("KV_{BUCKET}")).await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.max_age, Duration::from_secs(60));
    // Mended (no age limit): taken on the next look.
    config.max_age = Duration::ZERO;
    js.update_stream(config).await.unwrap();
    wait_ready(&a.admin).await;
    a.shutdown().await;
}
