//! Three edges behind HAProxy, run from `deploy/haproxy/haproxy.cfg` itself (issue #14):
//! one nats-server with JetStream, three `tickgate serve` processes with a `nats` feed and
//! shared issuer keys, the test publishing by the contract without a pause, and many
//! clients connected through HAProxy, each on every instrument. One edge is killed with
//! SIGKILL; its clients reconnect through HAProxy (which redispatches away from the dead
//! edge) and `resume` with their epoch and last seqs on the others. Every client's stream,
//! before and after, holds every published seq of every instrument exactly once (the
//! replays fill exactly what was missed), and the union over clients is the published stream.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;
use crate::deploy_kit::{haproxy_cfg, haproxy_env};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::bin::{self, BIN};
use common::nats::{free_port, start_nats, Nats};
use common::{eventually, eventually_blocking, Kill, Serving, EVENTUALLY};
use tickgate_client::{ConnectOptions, Event, Subscriber};
use tickgate_proto::codec::{encode_batch, Body, Record, Trade, FLAG_REPLAY, FLAG_SNAPSHOT};
use tickgate_proto::control::ServerMsg;
use tokio::sync::watch;

const FEED: &str = "HX";
const FEED_ID: u16 = 11;
const EPOCH: u64 = 3;
const SYMBOLS: [&str; 5] = ["A", "B", "C", "D", "E"];
const SECRET: &str = "haproxy-failover-secret";
/// Clients through HAProxy, as the issue asks. They share two cores with three edges,
/// HAProxy and nats-server, so the feed is kept slow (100 records/s) instead.
const CLIENTS: usize = 300;

fn port_of(url: &str) -> u16 {
    let rest = url.split("://").nth(1).unwrap();
    let hostport = rest.split('/').next().unwrap();
    hostport.rsplit(':').next().unwrap().parse().unwrap()
}

/// One edge: `tickgate serve` as its own process, so that it can be SIGKILLed.
fn spawn_edge(dir: &Path, nats: &Nats, key: &Path, lb: &str) -> (Kill, Serving) {
    let feeds = dir.join("feeds");
    std::fs::create_dir_all(&feeds).unwrap();
    let syms: Vec<String> = SYMBOLS.iter().map(|s| format!("\"{s}\"")).collect();
    std::fs::write(
        feeds.join("hx.toml"),
        format!("name = \"{FEED}\"\nid = {FEED_ID}\nsource = \"nats\"\nsymbols = [{}]\n", syms.join(", ")),
    )
    .unwrap();
    let cfg = bin::write_config(
        dir,
        &format!(
            "feeds_dir = {feeds:?}\n\
             [issuer]\nissuer = \"{lb}\"\nsigning_key_files = [{key:?}]\nkey_rotation_s = 0\n\
             clients = [{{ id = \"demo\", secret = \"{SECRET}\", scopes = [\"md:read:*\"] }}]\n\
             [engine]\nshards = 1\n\
             [server]\nstate_dir = {state:?}\ndrain_ms = 2000\n\
             [nats]\nservers = [\"{url}\"]\nstream_storage = \"memory\"\n",
            state = dir.join("state"),
            url = nats.url,
        ),
    );
    bin::spawn_serving(
        Command::new(BIN)
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null()),
    )
}

/// The feed handler: by the contract (subject, `Tickgate-Epoch`, `Nats-Msg-Id`, acks
/// awaited), one message of two trades per instrument per round, a round every 100 ms,
/// numbering on from `seqs` (empty: from 1).
async fn publish(
    nats_url: String,
    stop: watch::Receiver<bool>,
    sent: Arc<AtomicU64>,
    mut seqs: HashMap<u32, u64>,
) -> HashMap<u32, u64> {
    let js = jetstream::new(async_nats::connect(&nats_url).await.unwrap());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        for id in 1..=SYMBOLS.len() as u32 {
            let seq = seqs.entry(id).or_insert(0);
            let first = *seq + 1;
            let recs: Vec<Record> = (0..2)
                .map(|_| {
                    *seq += 1;
                    let body = Body::Trade(Trade { price: 100 + *seq as i64, size: *seq, side: 1 });
                    Record::encode(FEED_ID, id, *seq, common::unix_now_ns() as i64, 0, &body, 0)
                })
                .collect();
            let mut payload = Vec::new();
            encode_batch(&recs, 0, &mut payload);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Tickgate-Epoch", EPOCH.to_string().as_str());
            headers.insert("Nats-Msg-Id", format!("{FEED}.{id}.{EPOCH}.{first}").as_str());
            let ack = js.publish_with_headers(format!("md.{FEED}.{id}.t"), headers, payload.into()).await.unwrap();
            ack.await.expect("JetStream acknowledged");
            sent.fetch_add(2, Ordering::Relaxed);
        }
        // The first round is on the stream before the clients come: they resume from seq 2.
        if *stop.borrow() {
            return seqs;
        }
    }
}

/// What one client saw: per instrument, (seq, flags, connection number), in order.
#[derive(Default, Debug)]
struct Seen {
    records: HashMap<u32, Vec<(u64, u8, u32)>>,
    connections: u32,
    gaps: Vec<String>,
    anomalies: usize,
}

struct Shared {
    lb_url: String,
    token: String,
    subscribed: AtomicUsize,
    reconnected: AtomicUsize,
}

/// Connects through HAProxy and subscribes, resuming from `last`; retries while HAProxy
/// has no edge for it (e.g. 503 during the moment every retry hit the dead edge).
async fn connect(shared: &Shared, last: &BTreeMap<String, u64>) -> Subscriber {
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        match Subscriber::connect(&shared.lb_url, &shared.token, &ConnectOptions::default()).await {
            Ok(mut sub) => {
                let syms: Vec<&str> = SYMBOLS.to_vec();
                if sub.subscribe(1, FEED, &syms, false, Some((Some(EPOCH), last.clone()))).await.is_ok() {
                    return sub;
                }
            }
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "no edge through HAProxy within {EVENTUALLY:?}: {e}")
            }
        }
        // A retry policy, not synchronisation: the next attempt needs no condition.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn client(shared: Arc<Shared>, mut done: watch::Receiver<Option<HashMap<u32, u64>>>) -> Seen {
    let mut seen = Seen::default();
    // Everyone resumes from seq 1, published before the clients connect.
    let mut last: BTreeMap<String, u64> = SYMBOLS.iter().map(|s| (s.to_string(), 1)).collect();
    let mut sub = connect(&shared, &last).await;
    seen.connections = 1;
    let complete = |seen: &Seen, want: &HashMap<u32, u64>| {
        want.iter().all(|(id, &n)| seen.records.get(id).and_then(|v| v.last()).is_some_and(|r| r.0 >= n))
    };
    let deadline = tokio::time::Instant::now() + EVENTUALLY * 4;
    loop {
        if let Some(want) = done.borrow().as_ref() {
            if complete(&seen, want) {
                return seen;
            }
        }
        let ev = tokio::select! {
            _ = done.changed() => continue,
            ev = tokio::time::timeout_at(deadline, sub.next_event()) => ev.expect("client stalled"),
        };
        match ev {
            Ok(Event::Batch { records, anomalies, .. }) => {
                seen.anomalies += anomalies.len();
                for r in records.iter().filter(|r| r.feed_id() == FEED_ID && r.flags() & FLAG_SNAPSHOT == 0) {
                    seen.records.entry(r.instrument_id()).or_default().push((r.seq(), r.flags(), seen.connections));
                    last.insert(SYMBOLS[r.instrument_id() as usize - 1].to_string(), r.seq());
                }
            }
            Ok(Event::Control(ServerMsg::Subscribed { epoch, .. })) => {
                assert_eq!(epoch, EPOCH, "the feed's epoch, the same on every edge");
                if seen.connections == 1 {
                    shared.subscribed.fetch_add(1, Ordering::Relaxed);
                } else {
                    shared.reconnected.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Event::Control(ServerMsg::Gap { symbol, from, to, reason, .. })) => {
                seen.gaps.push(format!("{symbol} {from}..={to} {reason}"))
            }
            Ok(Event::Control(ServerMsg::Reset { epoch, .. })) => panic!("reset to epoch {epoch}"),
            Ok(Event::Control(_)) => {}
            // The edge went away (SIGKILL: no close frame, or HAProxy closing its side).
            Ok(Event::Closed { .. }) | Err(_) => {
                sub = connect(&shared, &last).await;
                seen.connections += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and haproxy on PATH (./scripts/test.sh installs them)"]
async fn killing_an_edge_moves_its_clients_through_haproxy_with_resume() {
    let _heavy = common::exclusive().await;
    let found = Command::new("haproxy").arg("-v").output();
    assert!(found.is_ok_and(|o| o.status.success()), "haproxy is not on PATH: run ./scripts/test.sh");
    let nats = start_nats();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing.pem");
    let out = Command::new(BIN).args(["keygen", "--out"]).arg(&key).output().unwrap();
    assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
    let lb_port = free_port();
    let lb = format!("http://127.0.0.1:{lb_port}");

    let mut edges = Vec::new();
    for i in 0..3 {
        let d = dir.path().join(format!("edge{i}"));
        std::fs::create_dir_all(&d).unwrap();
        edges.push(spawn_edge(&d, &nats, &key, &lb));
    }
    for (_, s) in &edges {
        let readyz = format!("{}/readyz", s.admin);
        eventually("an edge is ready", EVENTUALLY, || async {
            (reqwest::get(&readyz).await.ok()?.status() == 200).then_some(())
        })
        .await;
    }

    // HAProxy from the deploy/ file, on free ports, in the foreground.
    let backends: Vec<(String, u16)> =
        edges.iter().map(|(_, s)| (format!("127.0.0.1:{}", port_of(&s.stream)), port_of(&s.admin))).collect();
    let mut cmd = Command::new("haproxy");
    let log = dir.path().join("haproxy.log");
    cmd.arg("-db").arg("-f").arg(haproxy_cfg()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
    haproxy_env(&mut cmd, &format!("127.0.0.1:{lb_port}"), &backends);
    let mut haproxy = Kill(cmd.spawn().unwrap());
    eventually_blocking("HAProxy listening", EVENTUALLY, || {
        if let Some(status) = haproxy.0.try_wait().unwrap() {
            panic!("haproxy exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::net::TcpStream::connect(("127.0.0.1", lb_port)).ok()
    });

    // The publisher runs from now to the end; its first round (seq 1 of each instrument)
    // sets the epoch before any client subscribes.
    let sent = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let publisher = tokio::spawn(publish(nats.url.clone(), stop_rx, sent.clone(), HashMap::new()));
    for (_, s) in &edges {
        let m = format!("{}/metrics", s.admin);
        eventually("every edge has the first round", EVENTUALLY, || async {
            let text = reqwest::get(&m).await.ok()?.text().await.ok()?;
            (common::metric_value(&text, &format!("tickgate_nats_messages_total{{feed=\"{FEED}\"}}")) >= 5.0)
                .then_some(())
        })
        .await;
    }

    // A token through HAProxy, from whichever edge: every edge accepts it (shared keys).
    let token = tickgate_client::fetch_token(&lb, "demo", SECRET, None).await.unwrap();
    let shared = Arc::new(Shared {
        lb_url: format!("ws://127.0.0.1:{lb_port}/v1/stream"),
        token,
        subscribed: AtomicUsize::new(0),
        reconnected: AtomicUsize::new(0),
    });
    let (done_tx, done_rx) = watch::channel(None);
    let clients: Vec<_> = (0..CLIENTS).map(|_| tokio::spawn(client(shared.clone(), done_rx.clone()))).collect();
    eventually("every client subscribed through HAProxy", EVENTUALLY * 2, || async {
        (shared.subscribed.load(Ordering::Relaxed) == CLIENTS).then_some(())
    })
    .await;

    // leastconn spread them; the victim is the edge with the most clients.
    let counts = eventually("every edge counts its clients", EVENTUALLY, || async {
        let mut counts = Vec::new();
        for (_, s) in &edges {
            let text = reqwest::get(format!("{}/metrics", s.admin)).await.ok()?.text().await.ok()?;
            counts.push(common::metric_value(&text, "tickgate_connections") as usize);
        }
        (counts.iter().sum::<usize>() == CLIENTS).then_some(counts)
    })
    .await;
    eprintln!("clients per edge through HAProxy: {counts:?}");
    let victim_idx = (0..3).max_by_key(|&i| counts[i]).unwrap();
    let moved = counts[victim_idx];
    assert!(moved > 0);
    let before_kill = sent.load(Ordering::Relaxed);
    let (mut victim, _) = edges.remove(victim_idx);
    victim.0.kill().unwrap(); // SIGKILL: no lame duck, no close frames.
    victim.0.wait().unwrap();

    eventually("the killed edge's clients resumed on the others", EVENTUALLY * 2, || async {
        (shared.reconnected.load(Ordering::Relaxed) >= moved).then_some(())
    })
    .await;
    // Some more of the feed, live on the new edges, then the end of the run.
    let resumed_at = sent.load(Ordering::Relaxed);
    eventually("the feed goes on after the failover", EVENTUALLY, || async {
        (sent.load(Ordering::Relaxed) >= resumed_at + 50).then_some(())
    })
    .await;
    stop_tx.send(true).unwrap();
    let last = publisher.await.unwrap();
    eprintln!(
        "published {} records; {before_kill} before the kill; {moved} clients moved",
        sent.load(Ordering::Relaxed)
    );
    done_tx.send(Some(last.clone())).unwrap();

    let mut union: HashMap<u32, BTreeMap<u64, usize>> = HashMap::new();
    let mut moved_seen = 0;
    let mut replayed = 0;
    for c in clients {
        let seen = c.await.unwrap();
        assert!(seen.gaps.is_empty(), "gaps: {:?}", seen.gaps);
        assert_eq!(seen.anomalies, 0, "the client's tracker saw delivery violations");
        if seen.connections > 1 {
            moved_seen += 1;
        }
        for (&id, recs) in &seen.records {
            let seqs: Vec<u64> = recs.iter().map(|r| r.0).collect();
            assert_eq!(seqs, (2..=last[&id]).collect::<Vec<_>>(), "instrument {id}: no gap, no duplicate");
            // After each reconnection, the replays come first and then only live records:
            // the replays are exactly what the client missed.
            for conn in 2..=seen.connections {
                let flags: Vec<bool> = recs.iter().filter(|r| r.2 == conn).map(|r| r.1 & FLAG_REPLAY != 0).collect();
                assert!(flags.windows(2).all(|w| w[0] || !w[1]), "instrument {id}: a replay after a live record");
                replayed += flags.iter().filter(|&&f| f).count();
            }
            for s in seqs {
                *union.entry(id).or_default().entry(s).or_default() += 1;
            }
        }
        assert_eq!(seen.records.len(), SYMBOLS.len(), "every instrument");
    }
    assert_eq!(moved_seen, moved, "exactly the killed edge's clients reconnected");
    eprintln!("{replayed} records replayed to the moved clients");
    for (id, n) in &last {
        let got: Vec<u64> = union[id].keys().copied().collect();
        assert_eq!(got, (2..=*n).collect::<Vec<_>>(), "the union over clients is the published stream");
    }
    late_edge_serves_the_same_snapshot_and_resume(dir.path(), &nats, &key, &lb, &edges[0].1, &shared.token, last).await;
    for (mut k, _) in edges {
        let _ = k.0.kill();
        let _ = k.0.wait();
    }
}

/// What a snapshot holds per instrument: (seq, event time, body), comparable across edges.
type SnapshotOf = BTreeMap<u32, (u64, i64, String)>;

/// A fresh client's snapshot on one edge, directly (not through HAProxy): only trades are
/// published, so it is one record per instrument.
async fn snapshot(edge: &Serving, token: &str) -> SnapshotOf {
    let mut sub = Subscriber::connect(&edge.stream, token, &ConnectOptions::default()).await.unwrap();
    sub.subscribe(1, FEED, &SYMBOLS, true, None).await.unwrap();
    let mut snap = SnapshotOf::new();
    tokio::time::timeout(EVENTUALLY, async {
        while snap.len() < SYMBOLS.len() {
            match sub.next_event().await.unwrap() {
                Event::Batch { records, .. } => {
                    for r in records.iter().filter(|r| r.feed_id() == FEED_ID && r.flags() & FLAG_SNAPSHOT != 0) {
                        let old = snap.insert(r.instrument_id(), (r.seq(), r.ts_event_ns(), format!("{:?}", r.body())));
                        assert!(old.is_none(), "one snapshot record per instrument");
                    }
                }
                Event::Closed { code, reason } => panic!("snapshot connection closed {code} {reason}"),
                Event::Control(_) => {}
            }
        }
    })
    .await
    .expect("a snapshot of every instrument");
    sub.close().await;
    snap
}

/// What the resuming client on the late edge saw: per instrument (seq, REPLAY flag) in order.
#[derive(Default)]
struct Resumed {
    got: HashMap<u32, Vec<(u64, bool)>>,
    gaps: Vec<String>,
    anomalies: usize,
}

impl Resumed {
    /// Reads until every instrument of `want` has reached its seq.
    async fn read_until(&mut self, sub: &mut Subscriber, want: &HashMap<u32, u64>) {
        let done = |got: &HashMap<u32, Vec<(u64, bool)>>| {
            want.iter().all(|(id, &n)| got.get(id).and_then(|v| v.last()).is_some_and(|r| r.0 >= n))
        };
        tokio::time::timeout(EVENTUALLY, async {
            while !done(&self.got) {
                match sub.next_event().await.unwrap() {
                    Event::Batch { records, anomalies, .. } => {
                        self.anomalies += anomalies.len();
                        for r in records.iter().filter(|r| r.feed_id() == FEED_ID) {
                            assert_eq!(r.flags() & FLAG_SNAPSHOT, 0, "no snapshot was asked for");
                            self.got
                                .entry(r.instrument_id())
                                .or_default()
                                .push((r.seq(), r.flags() & FLAG_REPLAY != 0));
                        }
                    }
                    Event::Control(ServerMsg::Subscribed { epoch, .. }) => assert_eq!(epoch, EPOCH),
                    Event::Control(ServerMsg::Gap { symbol, from, to, reason, .. }) => {
                        self.gaps.push(format!("{symbol} {from}..={to} {reason}"))
                    }
                    Event::Control(_) => {}
                    Event::Closed { code, reason } => panic!("resumed connection closed {code} {reason}"),
                }
            }
        })
        .await
        .expect("the records asked for, within the bound");
    }
}

/// Issue #14: "a fourth edge started late warms up and serves the same snapshot and
/// resume". After the failover, with the feed paused at `last`, a fourth edge starts and
/// warms up from JetStream alone (`MDLV_` for the last values, `MD_` for the resume
/// window). Once its /readyz is 200, checked directly against it: a fresh client's
/// snapshot is the surviving edge's, record for record; a client resuming from an older
/// seq gets exactly the records after it flagged REPLAY, then (the feed going on) live
/// records, with no gap and no duplicate.
async fn late_edge_serves_the_same_snapshot_and_resume(
    dir: &Path,
    nats: &Nats,
    key: &Path,
    lb: &str,
    survivor: &Serving,
    token: &str,
    last: HashMap<u32, u64>,
) {
    let d = dir.join("edge-late");
    std::fs::create_dir_all(&d).unwrap();
    let (_late_proc, late) = spawn_edge(&d, nats, key, lb);
    let readyz = format!("{}/readyz", late.admin);
    eventually("the late edge warmed up and is ready", EVENTUALLY, || async {
        (reqwest::get(&readyz).await.ok()?.status() == 200).then_some(())
    })
    .await;

    let on_late = snapshot(&late, token).await;
    assert_eq!(on_late, snapshot(survivor, token).await, "the late edge's snapshot is the surviving edge's");
    for (id, n) in &last {
        assert_eq!(on_late[id].0, *n, "instrument {id}: the snapshot is the last record published");
    }

    // Resume from half-way: well inside the window (`[resume]` defaults: 100,000 records,
    // 300 s), so everything after it is on the late edge from its warm-up.
    let from: HashMap<u32, u64> = last.iter().map(|(&id, &n)| (id, n / 2)).collect();
    let resume: BTreeMap<String, u64> =
        from.iter().map(|(&id, &s)| (SYMBOLS[id as usize - 1].to_string(), s)).collect();
    let mut sub = Subscriber::connect(&late.stream, token, &ConnectOptions::default()).await.unwrap();
    sub.subscribe(1, FEED, &SYMBOLS, false, Some((Some(EPOCH), resume))).await.unwrap();
    let mut seen = Resumed::default();
    // First the replays alone (the feed is paused), then, the feed going on again, some
    // live records after them.
    seen.read_until(&mut sub, &last).await;

    let sent = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let publisher = tokio::spawn(publish(nats.url.clone(), stop_rx, sent, last.clone()));
    let live: HashMap<u32, u64> = last.iter().map(|(&id, &n)| (id, n + 10)).collect();
    seen.read_until(&mut sub, &live).await;
    stop_tx.send(true).unwrap();
    publisher.await.unwrap();

    let Resumed { got, gaps, anomalies } = seen;
    assert!(gaps.is_empty(), "gaps: {gaps:?}");
    assert_eq!(anomalies, 0, "the client's tracker saw delivery violations");
    assert_eq!(got.len(), SYMBOLS.len(), "every instrument");
    for (id, recs) in &got {
        let seqs: Vec<u64> = recs.iter().map(|r| r.0).collect();
        let end = *seqs.last().unwrap();
        assert_eq!(seqs, (from[id] + 1..=end).collect::<Vec<_>>(), "instrument {id}: no gap, no duplicate");
        for &(seq, replay) in recs {
            assert_eq!(replay, seq <= last[id], "instrument {id} seq {seq}: REPLAY exactly on what was missed");
        }
    }
    let replayed: usize = got.values().map(|v| v.iter().filter(|r| r.1).count()).sum();
    let live: usize = got.values().map(|v| v.iter().filter(|r| !r.1).count()).sum();
    eprintln!("late edge: same snapshot as a survivor; resume got {replayed} replays, then {live} live records");
    sub.close().await;
}
