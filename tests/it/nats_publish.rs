//! `tickgate publish --nats` (the feed handler of nats-feeds-v1 §4) against a real
//! nats-server with JetStream: it creates the streams when missing, publishes a new epoch
//! whose every record an edge delivers once; a NATS restart in the middle of a run is
//! ridden out by retries with the same `Nats-Msg-Id` (no record twice in the stream, none
//! missing); a stream made from another feed file is refused with a clear message.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::collections::HashMap;
use std::process::{Command, Stdio};

use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use common::bin::BIN;
use common::nats::{start_nats, wait_ready, Nats};
use common::{eventually, Kill, TestServer, EVENTUALLY};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tickgate_client::Event;
use tickgate_proto::codec::decode_batch;

const FEED: &str = "PX";
const SYMBOLS: &str = "\"A\", \"B\", \"C\", \"D\"";

/// The publisher's feed folder: the same feed (name, id, symbols) with a synthetic source.
fn handler_feeds(rate: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("px.toml"),
        format!(
            "name = \"{FEED}\"\nid = 9\nsource = \"synthetic\"\nsymbols = [{SYMBOLS}]\n[synthetic]\nseed = 3\nrate_per_s = {rate}.0\n"
        ),
    )
    .unwrap();
    dir
}

fn publish_cmd(nats: &Nats, feeds: &tempfile::TempDir, count: u64) -> Command {
    let mut c = Command::new(BIN);
    c.args(["publish", "--nats", &nats.url, "--feed", FEED, "--count", &count.to_string()])
        .arg("--feeds-dir")
        .arg(feeds.path())
        .env("RUST_LOG", "warn");
    c
}

/// (instrument, seq) → how many times, over every message of `MD_PX` (and the epochs seen).
async fn stream_contents(nats: &Nats) -> (HashMap<(u32, u64), u32>, Vec<u64>) {
    let js = jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let mut stream = js.get_stream(format!("MD_{FEED}")).await.unwrap();
    let total = stream.info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let mut seen = HashMap::new();
    let mut epochs = Vec::new();
    for _ in 0..total {
        let m = tokio::time::timeout(EVENTUALLY, msgs.next()).await.unwrap().unwrap().unwrap();
        let e: u64 = m.headers.as_ref().unwrap().get("Tickgate-Epoch").unwrap().as_str().parse().unwrap();
        if !epochs.contains(&e) {
            epochs.push(e);
        }
        for r in decode_batch(&m.payload).unwrap().records {
            *seen.entry((r.instrument_id(), r.seq())).or_insert(0) += 1;
        }
    }
    (seen, epochs)
}

/// Every instrument's seqs are 1..=n exactly once.
fn exactly_once(seen: &HashMap<(u32, u64), u32>) -> u64 {
    let mut per: HashMap<u32, Vec<u64>> = HashMap::new();
    for (&(i, s), &n) in seen {
        assert_eq!(n, 1, "instrument {i} seq {s} is {n} times in the stream");
        per.entry(i).or_default().push(s);
    }
    for (i, mut v) in per {
        v.sort_unstable();
        assert_eq!(v, (1..=v.len() as u64).collect::<Vec<_>>(), "instrument {i}: a seq is missing");
    }
    seen.len() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
async fn the_handler_creates_the_streams_and_an_edge_delivers_every_record() {
    let nats = start_nats();
    let feeds = handler_feeds(2_000);
    // The handler comes first: the streams do not exist yet.
    let out = publish_cmd(&nats, &feeds, 3_000).output().unwrap();
    assert!(out.status.success(), "publish failed: {}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["records"], 3_000, "{summary}");
    let (seen, epochs) = stream_contents(&nats).await;
    assert_eq!(exactly_once(&seen), 3_000);
    assert_eq!(epochs.len(), 1);

    // An edge warms up from what the handler published, then takes a second run live (a
    // new epoch: its clients get `reset`, then seqs from 1 again).
    let url = nats.url.clone();
    let edge_feed = format!("name = \"{FEED}\"\nid = 9\nsource = \"nats\"\nsymbols = [{SYMBOLS}]\n");
    let edge = TestServer::start_with_feeds(50.0, &[("px.toml", edge_feed)], |c| {
        c.nats.servers = vec![url];
        c.issuer.clients[0].scopes.push(format!("md:read:{FEED}"));
    })
    .await;
    wait_ready(&edge.admin).await;
    let token = edge.token(&[&format!("md:read:{FEED}")]);
    let mut sub = edge.subscriber(&token).await;
    sub.send_json(&json!({"op":"subscribe","feed":FEED,"symbols":["*"]})).await.unwrap();
    let publisher = Kill(publish_cmd(&nats, &feeds, 2_000).stdout(Stdio::null()).spawn().unwrap());
    let mut got = 0;
    let mut reset = false;
    tokio::time::timeout(EVENTUALLY, async {
        while got < 2_000 {
            match sub.next_event().await.unwrap() {
                Event::Batch { records, anomalies, .. } => {
                    assert!(anomalies.is_empty(), "{anomalies:?}");
                    got += records.iter().filter(|r| r.feed_id() == 9).count();
                }
                Event::Control(tickgate_proto::control::ServerMsg::Reset { .. }) => reset = true,
                Event::Closed { code, reason } => panic!("closed {code} {reason}"),
                _ => {}
            }
        }
    })
    .await
    .expect("every record of the second run delivered");
    assert!(reset, "a handler's new epoch reaches clients as reset");
    drop(publisher);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
async fn a_nats_restart_mid_run_loses_and_duplicates_nothing() {
    let mut nats = start_nats();
    let feeds = handler_feeds(4_000);
    let mut publisher =
        publish_cmd(&nats, &feeds, 12_000).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Once some of the run is stored, NATS goes away and comes back on the same port and
    // store; the handler retries whatever was not acknowledged.
    let js = jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    eventually("part of the run is stored", EVENTUALLY, || async {
        let mut s = js.get_stream(format!("MD_{FEED}")).await.ok()?;
        (s.info().await.ok()?.state.messages > 200).then_some(())
    })
    .await;
    nats.stop();
    nats.start();
    let out = tokio::task::spawn_blocking(move || {
        let status = publisher.wait().unwrap();
        let mut stdout = String::new();
        let mut stderr = String::new();
        use std::io::Read;
        publisher.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
        publisher.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        (status, stdout, stderr)
    })
    .await
    .unwrap();
    assert!(out.0.success(), "publish failed across the restart: {}", out.2);
    let summary: Value = serde_json::from_str(&out.1).unwrap();
    eprintln!("handler across the restart: {summary}");
    let (seen, _) = stream_contents(&nats).await;
    assert_eq!(exactly_once(&seen), 12_000, "every record once in the stream across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
async fn a_stream_of_another_feed_file_is_refused() {
    let nats = start_nats();
    let js = jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: format!("MD_{FEED}"),
        subjects: vec![format!("md.{FEED}.>")],
        description: Some(format!("tickgate feed {FEED} id 9 symbols-sha256 {}", "0".repeat(64))),
        ..Default::default()
    })
    .await
    .unwrap();
    let out = publish_cmd(&nats, &handler_feeds(100), 10).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("feed files of the edges differ"), "{err}");
    // A stream whose subjects are not the contract's is refused too.
    js.delete_stream(format!("MD_{FEED}")).await.unwrap();
    js.create_stream(jetstream::stream::Config {
        name: format!("MD_{FEED}"),
        subjects: vec!["other.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let out = publish_cmd(&nats, &handler_feeds(100), 10).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("captures"), "{err}");
}
