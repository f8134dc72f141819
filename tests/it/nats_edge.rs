//! `source = "nats"` feeds against a real nats-server with JetStream (nats-feeds-v1): the
//! test is the feed handler, publishing by the contract with async-nats (subjects,
//! `Tickgate-Epoch`, `Nats-Msg-Id`, acks awaited). Two edges must deliver the same
//! records for every (instrument, seq); an edge started late warms up from the stream
//! (snapshot and resume like its peer); messages that break the contract are dropped and
//! counted while the feed keeps streaming; a stream made from another feed file is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use common::nats::{free_port, readyz, require_nats_server, start_nats, wait_ready, Handler, Nats};
use common::{eventually, eventually_blocking, Kill, TestServer, EVENTUALLY};
use serde_json::json;
use tickgate_client::{ConnectOptions, Event, Subscriber};
use tickgate_proto::codec::{encode_batch, Record, FLAG_REPLAY, FLAG_SNAPSHOT};

const NEEDS: &str = "needs nats-server on PATH (./scripts/test.sh installs it)";
const FEED: &str = "NX";
const FEED_ID: u16 = 7;
const EPOCH: u64 = 5;

fn feed_file(symbols: &str) -> String {
    format!("name = \"{FEED}\"\nid = {FEED_ID}\nsource = \"nats\"\nsymbols = [{symbols}]\n[resume]\nrecords = 1000\n")
}

async fn edge(nats: &Nats, symbols: &str) -> TestServer {
    let url = nats.url.clone();
    TestServer::start_with_feeds(50.0, &[("nx.toml", feed_file(symbols))], |c| {
        c.nats.servers = vec![url];
        c.nats.stream_storage = tickgate::config::NatsStorage::Memory;
        c.issuer.clients[0].scopes.push(format!("md:read:{FEED}"));
    })
    .await
}

/// The test's feed handler for feed `NX`, epoch 5, on its own connection to `nats`.
async fn handler(nats: &Nats) -> Handler {
    Handler::new(&nats.url, FEED, FEED_ID, EPOCH).await
}

/// What must be equal between edges: everything but `ts_recv_ns` and the flags.
fn key(r: &Record) -> (u32, u64, i64, String) {
    (r.instrument_id(), r.seq(), r.ts_event_ns(), format!("{:?}", r.body()))
}

/// Collects the records of `sub` until `done` says it has what it needs.
async fn collect(sub: &mut Subscriber, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
    collect_within(sub, EVENTUALLY, done).await
}

/// [`collect`] with its own timeout.
async fn collect_within(sub: &mut Subscriber, within: Duration, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
    let mut got = Vec::new();
    tokio::time::timeout(within, async {
        while !done(&got) {
            match sub.next_event().await.unwrap() {
                Event::Batch { records, .. } => got.extend(records.into_iter().filter(|r| r.feed_id() == FEED_ID)),
                Event::Closed { code, reason } => panic!("closed {code} {reason}"),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("records not all received within {within:?}; have {}", got.len()));
    got
}

/// Subscribes to every symbol of the feed and waits until the subscription is live.
async fn subscribe_all(sub: &mut Subscriber) {
    sub.send_json(&json!({"op":"subscribe","feed":FEED,"symbols":["*"]})).await.unwrap();
    loop {
        if let Event::Control(tickgate_proto::control::ServerMsg::Subscribed { .. }) = sub.next_event().await.unwrap() {
            return;
        }
    }
}

fn has_seq(recs: &[Record], id: u32, seq: u64) -> bool {
    recs.iter().any(|r| r.instrument_id() == id && r.seq() == seq && r.flags() & FLAG_SNAPSHOT == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
async fn two_edges_number_alike_and_a_late_edge_warms_up() {
    let _ = NEEDS;
    let nats = start_nats();
    let a = edge(&nats, "\"A\", \"B\", \"C\"").await;
    // The edge creates both streams and, the stream being empty, is ready at once.
    wait_ready(&a.admin).await;
    let js = jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let mut md = js.get_stream(format!("MD_{FEED}")).await.expect("MD stream created by the edge");
    let info = md.info().await.unwrap().clone();
    assert_eq!(info.config.subjects, vec![format!("md.{FEED}.>")]);
    assert!(info.config.description.as_deref().unwrap().starts_with(&format!("tickgate feed {FEED} id {FEED_ID} ")));
    let mut lv = js.get_stream(format!("MDLV_{FEED}")).await.expect("MDLV stream created by the edge");
    assert_eq!(lv.info().await.unwrap().config.max_messages_per_subject, 1);

    let token = a.token(&[&format!("md:read:{FEED}")]);
    let mut on_a = a.subscriber(&token).await;
    subscribe_all(&mut on_a).await;

    let mut h = handler(&nats).await;
    let mut sent = Vec::new();
    for round in 0..5 {
        for id in 1..=3 {
            sent.extend(h.send(id, round % 2 == 1, 2).await);
        }
    }
    // Contract violations, each dropped alone: no epoch, seq 0, a seq not above the last,
    // a record of another instrument than the subject's, an older epoch, a bad batch.
    let next_a = h.record(1, false);
    h.send_raw(&format!("md.{FEED}.1.t"), None, &[next_a], "-bad1").await;
    h.send_raw(&format!("md.{FEED}.1.t"), Some(EPOCH), &[next_a.with_seq(0)], "-bad2").await;
    h.send_raw(&format!("md.{FEED}.1.t"), Some(EPOCH), &[next_a.with_seq(1)], "-bad3").await;
    h.send_raw(&format!("md.{FEED}.2.t"), Some(EPOCH), &[next_a], "-bad4").await;
    h.send_raw(&format!("md.{FEED}.1.t"), Some(EPOCH - 1), &[next_a], "-bad5").await;
    h.js.publish_with_headers(
        format!("md.{FEED}.1.t"),
        {
            let mut hm = async_nats::HeaderMap::new();
            hm.insert("Tickgate-Epoch", EPOCH.to_string().as_str());
            hm
        },
        vec![1u8, 2, 3].into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // ...and the feed goes on: the same record, now good.
    h.send_raw(&format!("md.{FEED}.1.t"), Some(EPOCH), &[next_a], "").await;
    sent.push(next_a);

    let first_half = collect(&mut on_a, |got| sent.iter().all(|s| has_seq(got, s.instrument_id(), s.seq()))).await;
    for (series, want) in [
        ("epoch_missing", 1.0),
        ("bad_seq", 2.0),
        ("wrong_subject", 1.0),
        ("epoch_backwards", 1.0),
        ("malformed_batch", 1.0),
    ] {
        a.wait_metric(&format!("tickgate_nats_rejects_total{{feed=\"{FEED}\",reason=\"{series}\"}}"), want).await;
    }
    assert_eq!(first_half.len(), sent.len(), "each record once, no violation delivered");

    // A second edge, started now, warms up from the stream before it is ready.
    let b = edge(&nats, "\"A\", \"B\", \"C\"").await;
    wait_ready(&b.admin).await;
    let token_b = b.token(&[&format!("md:read:{FEED}")]);
    // Snapshot on B: the last trade and quote of every instrument, as A delivered them.
    let mut snap = b.subscriber(&token_b).await;
    snap.send_json(&json!({"op":"subscribe","feed":FEED,"symbols":["*"],"snapshot":true})).await.unwrap();
    let snapshot = collect(&mut snap, |got| got.iter().filter(|r| r.flags() & FLAG_SNAPSHOT != 0).count() >= 6).await;
    for r in snapshot.iter().filter(|r| r.flags() & FLAG_SNAPSHOT != 0) {
        let last = sent
            .iter()
            .filter(|s| s.instrument_id() == r.instrument_id() && s.rtype() == r.rtype())
            .max_by_key(|s| s.seq())
            .unwrap();
        assert_eq!(key(r), key(last), "snapshot on the late edge is the stream's last value");
    }
    // Resume on B from seq 3 of instrument A (held on A): exactly 4, 5, ... as replays.
    let mut resumed = b.subscriber(&token_b).await;
    let mut seqs = BTreeMap::new();
    seqs.insert("A".to_string(), 3u64);
    resumed.subscribe(1, FEED, &["A"], false, Some((Some(EPOCH), seqs))).await.unwrap();
    let last_a = sent.iter().filter(|s| s.instrument_id() == 1).map(|s| s.seq()).max().unwrap();
    let replayed = collect(&mut resumed, |got| got.iter().any(|r| r.seq() == last_a)).await;
    let expect: Vec<_> = sent.iter().filter(|s| s.instrument_id() == 1 && s.seq() > 3).map(key).collect();
    assert_eq!(replayed.iter().map(key).collect::<Vec<_>>(), expect, "resume across edges: no gap, no duplicate");
    assert!(replayed.iter().all(|r| r.flags() & FLAG_REPLAY != 0));

    // Live on both edges: the same records for every (instrument, seq).
    let mut on_b = b.subscriber(&token_b).await;
    subscribe_all(&mut on_b).await;
    let mut live = Vec::new();
    for id in 1..=3 {
        live.extend(h.send(id, false, 3).await);
        live.extend(h.send(id, true, 1).await);
    }
    let all = |got: &[Record]| live.iter().all(|s| has_seq(got, s.instrument_id(), s.seq()));
    let got_a = collect(&mut on_a, all).await;
    let got_b = collect(&mut on_b, all).await;
    let keys = |v: &[Record]| v.iter().map(key).collect::<Vec<_>>();
    assert_eq!(keys(&got_a), keys(&live));
    assert_eq!(keys(&got_b), keys(&live), "the late edge delivers the same records as the first");
    assert!(b.metric(&format!("tickgate_nats_stream_seq{{feed=\"{FEED}\"}}")).await > 0.0);
    assert_eq!(b.metric("tickgate_nats_connected").await, 1.0);

    // An edge whose feed file lists other symbols is refused: /readyz says why.
    let c = edge(&nats, "\"A\", \"C\", \"B\"").await;
    let why = eventually("the mismatched edge refuses the feed", EVENTUALLY, || async {
        let (status, body) = readyz(&c.admin).await;
        (status == 503 && body.contains("refused")).then_some(body)
    })
    .await;
    assert!(why.contains("feed files of the edges differ"), "{why}");
    let _ = ConnectOptions::default();
    for s in [a, b, c] {
        s.shutdown().await;
    }
}

/// NATS restarts under a live edge: its clients stay connected, `/readyz` turns 503 once
/// the edge has been cut off longer than `nats.unready_after_ms` and 200 again after, and
/// what was published meanwhile (while NATS was back but before the edge reconnected, and
/// after) arrives with no silent gap: every seq, or a `gap` naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
async fn a_nats_restart_keeps_clients_and_loses_nothing() {
    let mut nats = start_nats();
    let url = nats.url.clone();
    let ts = TestServer::start_with_feeds(50.0, &[("nx.toml", feed_file("\"A\", \"B\""))], |c| {
        c.nats.servers = vec![url];
        // File storage: the stream must survive the restart.
        c.nats.unready_after_ms = 500;
        c.issuer.clients[0].scopes.push(format!("md:read:{FEED}"));
    })
    .await;
    wait_ready(&ts.admin).await;
    let token = ts.token(&[&format!("md:read:{FEED}")]);
    let mut sub = ts.subscriber(&token).await;
    subscribe_all(&mut sub).await;
    let mut h = handler(&nats).await;
    let mut sent = Vec::new();
    for id in 1..=2 {
        sent.extend(h.send(id, false, 5).await);
    }
    let before = collect(&mut sub, |got| sent.iter().all(|s| has_seq(got, s.instrument_id(), s.seq()))).await;
    assert_eq!(before.len(), sent.len());

    nats.stop();
    let why = eventually("/readyz turns 503 while cut off from NATS", EVENTUALLY, || async {
        let (status, body) = readyz(&ts.admin).await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(why.contains("cut off from NATS"), "{why}");
    assert_eq!(ts.metric("tickgate_nats_connected").await, 0.0);
    nats.start();
    // A new handler connection (the old one may still be reconnecting) publishes more.
    let mut h2 = handler(&nats).await;
    h2.seqs = h.seqs.clone();
    let mut after = Vec::new();
    for id in 1..=2 {
        after.extend(h2.send(id, true, 5).await);
    }
    wait_ready(&ts.admin).await;
    let got = collect(&mut sub, |got| after.iter().all(|s| has_seq(got, s.instrument_id(), s.seq()))).await;
    let keys = |v: &[Record]| v.iter().map(key).collect::<Vec<_>>();
    assert_eq!(keys(&got), keys(&after), "the same client, nothing lost across the NATS restart");
    ts.wait_metric("tickgate_nats_reconnects_total", 1.0).await;
    ts.shutdown().await;
}

/// `/v1/publish` into a `nats` feed: the batches go to JetStream (the `pong` after the
/// acks) and come back to every edge through the stream; seq 0 is refused (numbering
/// belongs to the feed handler) and nothing of that batch is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
async fn publishing_through_an_edge_reaches_every_edge() {
    use tickgate_client::publisher::{publish_url, Publisher};
    let nats = start_nats();
    let a = edge(&nats, "\"A\", \"B\"").await;
    let b = edge(&nats, "\"A\", \"B\"").await;
    wait_ready(&a.admin).await;
    wait_ready(&b.admin).await;
    let token_b = b.token(&[&format!("md:read:{FEED}")]);
    let mut sub = b.subscriber(&token_b).await;
    subscribe_all(&mut sub).await;
    let token = a.token(&[&format!("md:publish:{FEED}")]);
    let mut publisher =
        Publisher::connect(&publish_url(&a.url, FEED, Some(EPOCH)), &token, &ConnectOptions::default()).await.unwrap();
    let mut h = handler(&nats).await;
    let recs: Vec<Record> = (0..6).map(|k| h.record(1 + (k % 2), k >= 4)).collect();
    publisher.send(&recs).await.unwrap();
    // The pong comes once JetStream has acknowledged the batch.
    let replies = publisher.sync().await.unwrap();
    assert!(replies.iter().all(|m| !matches!(m, tickgate_proto::control::ServerMsg::Error { .. })), "{replies:?}");
    let js = jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let mut md = js.get_stream(format!("MD_{FEED}")).await.unwrap();
    assert!(md.info().await.unwrap().state.messages >= 2, "acknowledged before the pong");
    let got = collect(&mut sub, |got| recs.iter().all(|s| has_seq(got, s.instrument_id(), s.seq()))).await;
    let keys = |v: &[Record]| {
        let mut k = v.iter().map(key).collect::<Vec<_>>();
        k.sort();
        k
    };
    assert_eq!(keys(&got), keys(&recs), "published on A, delivered on B");
    // Seq 0: refused whole, the publisher told why.
    publisher.send(&[h.record(1, false).with_seq(0)]).await.unwrap();
    let replies = publisher.sync().await.unwrap();
    let refused = replies.iter().find_map(|m| match m {
        tickgate_proto::control::ServerMsg::Error { message, .. } => Some(message.clone()),
        _ => None,
    });
    assert!(refused.as_deref().is_some_and(|m| m.contains("feed handler")), "{replies:?}");
    publisher.close().await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A three-server NATS cluster with an R3 stream losing one member (`kill -9`): the edge
/// (connected to all three) keeps its client, and everything published before and after
/// arrives with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
async fn an_r3_stream_survives_a_cluster_member() {
    require_nats_server();
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let routes: Vec<String> = ports.iter().map(|(_, c)| format!("nats://127.0.0.1:{c}")).collect();
    let mut members: Vec<Option<Kill>> = ports
        .iter()
        .enumerate()
        .map(|(i, (p, c))| {
            let store = dir.path().join(format!("n{i}"));
            Some(Kill(
                Command::new("nats-server")
                    .args(["-a", "127.0.0.1", "-p", &p.to_string(), "-js", "--server_name", &format!("n{i}")])
                    .args(["--cluster_name", "tg", "--cluster", &format!("nats://127.0.0.1:{c}")])
                    .args(["--routes", &routes.join(",")])
                    .arg("-sd")
                    .arg(&store)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            ))
        })
        .collect();
    let urls: Vec<String> = ports.iter().map(|(p, _)| format!("nats://127.0.0.1:{p}")).collect();
    for (p, _) in &ports {
        let p = *p;
        eventually_blocking("cluster member listening", EVENTUALLY, || {
            std::net::TcpStream::connect(("127.0.0.1", p)).ok()
        });
    }
    let servers = urls.clone();
    // The edge creates the R3 streams once the cluster has elected its JetStream leader
    // (it retries until then), then reports ready.
    let ts = TestServer::start_with_feeds(50.0, &[("nx.toml", feed_file("\"A\", \"B\""))], |c| {
        c.nats.servers = servers;
        c.nats.stream_replicas = 3;
        c.nats.unready_after_ms = 60_000;
        c.issuer.clients[0].scopes.push(format!("md:read:{FEED}"));
    })
    .await;
    eventually("the edge is ready on the cluster", Duration::from_secs(60), || async {
        (readyz(&ts.admin).await.0 == 200).then_some(())
    })
    .await;
    let token = ts.token(&[&format!("md:read:{FEED}")]);
    let mut sub = ts.subscriber(&token).await;
    subscribe_all(&mut sub).await;
    // The handler talks to the two members that stay.
    let handler_client =
        async_nats::ConnectOptions::new().connect(vec![urls[1].clone(), urls[2].clone()]).await.unwrap();
    let mut h = Handler::with_client(handler_client, FEED, FEED_ID, EPOCH);
    let mut sent = Vec::new();
    for id in 1..=2 {
        sent.extend(h.send(id, false, 3).await);
    }
    let _ = collect(&mut sub, |got| sent.iter().all(|s| has_seq(got, s.instrument_id(), s.seq()))).await;
    members[0].take(); // kill -9 (Kill's drop), the edge may have been connected to it
    let mut after = Vec::new();
    for id in 1..=2 {
        // JetStream may need a moment to elect a new stream leader: the handler retries
        // until acked, as a feed handler does.
        let recs: Vec<Record> = (0..3).map(|_| h.record(id, true)).collect();
        let subject = format!("md.{FEED}.{id}.q");
        eventually("JetStream takes the message with one member down", Duration::from_secs(60), || async {
            let mut payload = Vec::new();
            encode_batch(&recs, 0, &mut payload);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Tickgate-Epoch", EPOCH.to_string().as_str());
            headers.insert("Nats-Msg-Id", format!("{FEED}.{id}.{EPOCH}.{}", recs[0].seq()).as_str());
            let ack = h.js.publish_with_headers(subject.clone(), headers, payload.into()).await.ok()?;
            ack.await.ok().map(|_| ())
        })
        .await;
        after.extend(recs);
    }
    // The edge's consumer may have lived on the killed member: its client reconnects and
    // the R3 consumer elects a new leader, which on a loaded 2-core CI machine took longer
    // than 30 s once. Generous, as every wait here.
    let got = collect_within(&mut sub, Duration::from_secs(120), |got| {
        after.iter().all(|s| has_seq(got, s.instrument_id(), s.seq()))
    })
    .await;
    let keys = |v: &[Record]| v.iter().map(key).collect::<Vec<_>>();
    assert_eq!(keys(&got), keys(&after), "the same client, every record once, across the lost member");
    ts.shutdown().await;
}
