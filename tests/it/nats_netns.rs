//! An edge cut off from NATS for real (issue #14), not by stopping a process: the edge
//! (`tickgate serve`, its own process) runs in its own network namespace and its link to
//! nats-server is taken down, then up; and, where the kernel has `sch_netem`, latency is
//! added to that link with `tc netem`.
//!
//! **Why two veth pairs.** The namespace is joined to the root namespace (the test, and
//! nats-server) by two links: the *NATS link* carries only edge ↔ nats-server (nats-server
//! listens on its host-side address), the *client link* only the test's clients ↔ the
//! edge's listeners (public and admin, on its namespace-side address). Taking the NATS link
//! down cuts the edge off from NATS the way a pulled cable or a dead switch port does: no
//! FIN, no RST, the edge's TCP connection just stops carrying anything and the edge has to
//! notice by itself (its NATS pings); meanwhile the client's WebSocket and the test's
//! `/readyz` and `/metrics` polls go over the client link, which stays up, so "clients stay
//! connected" is checked on a socket that really stays open. With one link, cutting it would
//! cut the client too; with the client inside the namespace the test could not be it. The
//! link is taken down at its namespace end (admin down: the edge's route to NATS is gone;
//! the host end loses its carrier), so nats-server's address stays local to the root
//! namespace, and the test, the feed handler, keeps publishing to it through the cut.
//!
//! What is asserted is the spec's promise (nats-feeds-v1 §3, "No silent gaps across NATS
//! trouble"): the client's connection stays open, `/readyz` turns 503 once the edge has been
//! cut off longer than `nats.unready_after_ms` and `tickgate_nats_connected` reads 0; once the
//! link is back, 200 and 1 again, and the client's stream holds every published seq of every
//! instrument exactly once, in order, with no `gap` (JetStream still holds what was published
//! during the cut, so the edge resumes from its last stream sequence and misses nothing).
//!
//! Namespaces need root (`CAP_NET_ADMIN` and `CAP_SYS_ADMIN`); where `ip netns add` is not
//! permitted the tests print `skipped: ...` and pass. A [`Lab`] guard kills the edge by its
//! PID and deletes the veth devices and the namespace when dropped, on panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use common::bin::{self, BIN};
use common::nats::{metric_at, readyz, start_nats_with, wait_ready, write_nats_feed, Handler, Nats, NatsOptions};
use common::{eventually, Kill, Serving, EVENTUALLY};
use serde_json::json;
use tickgate_client::{ConnectOptions, Event, Subscriber};
use tickgate_proto::codec::FLAG_SNAPSHOT;
use tickgate_proto::control::ServerMsg;

const FEED: &str = "NN";
const FEED_ID: u16 = 13;
const EPOCH: u64 = 4;
const SYMBOLS: [&str; 3] = ["A", "B", "C"];
const SECRET: &str = "netns-secret";
/// Small, so that the test waits little for `/readyz` to turn 503.
const UNREADY_AFTER_MS: u64 = 1_500;

/// Runs `ip`/`tc` with `args`: its stderr when it fails (or cannot be run at all).
fn try_cmd(prog: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(prog).args(args).stdout(Stdio::null()).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Err(e) => Err(format!("cannot run {prog}: {e}")),
    }
}

/// `ip args`, which must succeed (the namespace exists, so root is there).
fn ip(args: &[&str]) {
    if let Err(e) = try_cmd("ip", args) {
        panic!("ip {}: {e}", args.join(" "));
    }
}

/// One veth pair: its two device names and the /30 addresses of its two ends.
struct Link {
    host_dev: String,
    ns_dev: String,
    host_addr: Ipv4Addr,
    ns_addr: Ipv4Addr,
}

/// A network namespace with the NATS link and the client link, and the edge running in
/// it; everything is undone when dropped (the edge killed first, by its PID).
struct Lab {
    ns: String,
    nats: Link,
    client: Link,
    edge: Option<Kill>,
    edge_log: PathBuf,
    dir: tempfile::TempDir,
}

impl Lab {
    /// Creates the namespace and both links; `Err` (with `ip`'s stderr) when namespaces
    /// are not permitted here.
    fn new() -> Result<Lab, String> {
        // Unique per process (the PID) and per lab in it (a counter): names and addresses.
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let tag = NEXT.fetch_add(1, Ordering::Relaxed) % 10;
        let pid = std::process::id();
        let ns = format!("tickgate-it-{pid}-{tag}");
        try_cmd("ip", &["netns", "add", &ns])?;
        // Two /30s (one /29) of 10.203.0.0/16 from the PID and the tag: 8192 to choose from.
        let base = ((pid * 10 + u32::from(tag)) % 8192) * 8;
        let addr = |k: u32| Ipv4Addr::new(10, 203, ((base + k) >> 8) as u8, ((base + k) & 0xff) as u8);
        let link = |side: char, first: u32| Link {
            host_dev: format!("tg{pid}{tag}{side}h"),
            ns_dev: format!("tg{pid}{tag}{side}n"),
            host_addr: addr(first),
            ns_addr: addr(first + 1),
        };
        let lab = Lab {
            ns,
            nats: link('a', 1),
            client: link('b', 5),
            edge: None,
            edge_log: PathBuf::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        // From here on the guard exists: whatever fails below is undone.
        for l in [&lab.nats, &lab.client] {
            ip(&["link", "add", &l.host_dev, "type", "veth", "peer", "name", &l.ns_dev, "netns", &lab.ns]);
            ip(&["addr", "add", &format!("{}/30", l.host_addr), "dev", &l.host_dev]);
            ip(&["link", "set", &l.host_dev, "up"]);
            ip(&["-n", &lab.ns, "addr", "add", &format!("{}/30", l.ns_addr), "dev", &l.ns_dev]);
            ip(&["-n", &lab.ns, "link", "set", &l.ns_dev, "up"]);
        }
        ip(&["-n", &lab.ns, "link", "set", "lo", "up"]);
        Ok(lab)
    }

    /// nats-server with JetStream in the root namespace, on the NATS link's host address.
    fn start_nats(&self) -> Nats {
        start_nats_with(NatsOptions { host: self.nats.host_addr.to_string(), ..NatsOptions::default() })
    }

    /// `tickgate serve` inside the namespace (`ip netns exec` execs it: the PID is the
    /// edge's), listening on the client link's namespace address, fed by `nats`.
    fn spawn_edge(&mut self, nats: &Nats) -> Serving {
        let dir = self.dir.path();
        let feeds = write_nats_feed(dir, "nn.toml", FEED, FEED_ID, &SYMBOLS);
        let at = self.client.ns_addr;
        let cfg = dir.join("tickgate.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"{at}:0\"\nadmin_listen = \"{at}:0\"\nfeeds_dir = {feeds:?}\n\
                 [issuer]\nclients = [{{ id = \"demo\", secret = \"{SECRET}\", scopes = [\"md:read:*\"] }}]\n\
                 [server]\nstate_dir = {state:?}\ndrain_ms = 1000\n\
                 [nats]\nservers = [\"{url}\"]\nstream_storage = \"memory\"\nunready_after_ms = {UNREADY_AFTER_MS}\n",
                state = dir.join("state"),
                url = nats.url,
            ),
        )
        .unwrap();
        self.edge_log = dir.join("edge.log");
        let (kill, serving) = bin::spawn_serving(
            Command::new("ip")
                .args(["netns", "exec", &self.ns, BIN, "serve", "--config"])
                .arg(&cfg)
                .current_dir(dir)
                .env("RUST_LOG", "info")
                .stderr(std::fs::File::create(&self.edge_log).unwrap()),
        );
        self.edge = Some(kill);
        serving
    }

    /// Takes the NATS link down or up at its namespace end.
    fn nats_link(&self, up: bool) {
        ip(&["-n", &self.ns, "link", "set", &self.nats.ns_dev, if up { "up" } else { "down" }]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The edge first (Kill: by its PID, then reaped), so nothing runs in the namespace.
        self.edge.take();
        // Deleting one end of a veth deletes its peer; the namespace's deletion alone would
        // leave that to the kernel, later.
        for l in [&self.nats, &self.client] {
            let _ = try_cmd("ip", &["link", "del", &l.host_dev]);
        }
        let _ = try_cmd("ip", &["netns", "del", &self.ns]);
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.edge_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("edge log (last lines):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    }
}

/// The lab, or `None` after printing why the test is skipped.
fn lab_or_skip() -> Option<Lab> {
    match Lab::new() {
        Ok(lab) => Some(lab),
        Err(e) => {
            eprintln!("skipped: network namespaces not permitted: {e}");
            None
        }
    }
}

/// What the client has seen so far (its reading task fills it).
#[derive(Default, Debug)]
struct Seen {
    subscribed: bool,
    /// (instrument, seq) of every record of the feed, in arrival order (snapshots left out).
    records: Vec<(u32, u64)>,
    /// `gap` and `reset` messages: none may come.
    breaks: Vec<String>,
    anomalies: usize,
    /// Why the stream ended, if it did.
    closed: Option<String>,
}

/// The client's record, even after a panic elsewhere poisoned it (the panic is the report).
fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|p| p.into_inner())
}

/// A client on the edge (over the client link), subscribed to every symbol, read by a task
/// for the whole test (so that its WebSocket pings are answered while the test waits).
async fn client(serving: &Serving) -> Arc<Mutex<Seen>> {
    let token = tickgate_client::fetch_token(&serving.base, "demo", SECRET, None).await.unwrap();
    let mut sub = Subscriber::connect(&serving.stream, &token, &ConnectOptions::default()).await.unwrap();
    sub.send_json(&json!({"op": "subscribe", "id": 1, "feed": FEED, "symbols": ["*"]})).await.unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let filled = seen.clone();
    tokio::spawn(async move {
        loop {
            let ev = sub.next_event().await;
            let mut s = lock(&filled);
            match ev {
                Ok(Event::Batch { records, anomalies, .. }) => {
                    s.anomalies += anomalies.len();
                    let ours = records.iter().filter(|r| r.feed_id() == FEED_ID && r.flags() & FLAG_SNAPSHOT == 0);
                    s.records.extend(ours.map(|r| (r.instrument_id(), r.seq())));
                }
                Ok(Event::Control(ServerMsg::Subscribed { .. })) => s.subscribed = true,
                Ok(Event::Control(m @ (ServerMsg::Gap { .. } | ServerMsg::Reset { .. }))) => {
                    s.breaks.push(format!("{m:?}"))
                }
                Ok(Event::Control(_)) => {}
                Ok(Event::Closed { code, reason }) => {
                    s.closed = Some(format!("closed {code} {reason}"));
                    return;
                }
                Err(e) => {
                    s.closed = Some(format!("client error: {e}"));
                    return;
                }
            }
        }
    });
    eventually("the client is subscribed", EVENTUALLY, || async { lock(&seen).subscribed.then_some(()) }).await;
    seen
}

/// nats-server, the edge (ready: it has created the feed's streams) and a first round taken
/// in by the edge (it sets the feed's epoch before the client comes, so the client gets no
/// `reset`). Returns the handler and its last seqs before the client comes.
async fn start(lab: &mut Lab) -> (Nats, Handler, Serving, HashMap<u32, u64>) {
    let nats = lab.start_nats();
    let serving = lab.spawn_edge(&nats);
    wait_ready(&serving.admin).await;
    let mut h = Handler::new(&nats.url, FEED, FEED_ID, EPOCH).await;
    publish_round(&mut h).await;
    let messages = 2.0 * SYMBOLS.len() as f64;
    let series = format!("tickgate_nats_messages_total{{feed=\"{FEED}\"}}");
    eventually("the edge took in the first round", EVENTUALLY, || async {
        (metric_at(&serving.admin, &series).await >= messages).then_some(())
    })
    .await;
    let from = h.seqs.clone();
    (nats, h, serving, from)
}

/// Publishes one round: a message of two trades and one of a quote for every instrument.
async fn publish_round(h: &mut Handler) {
    for id in 1..=SYMBOLS.len() as u32 {
        h.send(id, false, 2).await;
        h.send(id, true, 1).await;
    }
}

/// Waits until the client holds every seq the handler published after `from` (the last
/// seqs before the client subscribed), then checks that it holds each exactly once, in
/// order, with no `gap` or `reset`, its stream still open.
async fn assert_complete(seen: &Mutex<Seen>, from: &HashMap<u32, u64>, published: &HashMap<u32, u64>, what: &str) {
    eventually(&format!("{what}: the client has every published seq"), EVENTUALLY, || async {
        let s = lock(seen);
        if let Some(why) = &s.closed {
            panic!("{what}: the client's stream ended: {why}");
        }
        let has = |id: u32, n: u64| s.records.contains(&(id, n));
        published.iter().all(|(&id, &n)| has(id, n)).then_some(())
    })
    .await;
    let s = lock(seen);
    assert!(s.breaks.is_empty(), "{what}: no gap, no reset: {:?}", s.breaks);
    assert_eq!(s.anomalies, 0, "{what}: the client's tracker saw delivery violations");
    for (&id, &n) in published {
        let seqs: Vec<u64> = s.records.iter().filter(|r| r.0 == id).map(|r| r.1).collect();
        let first = from.get(&id).map_or(1, |s| s + 1);
        assert_eq!(seqs, (first..=n).collect::<Vec<_>>(), "{what}: instrument {id}: every seq once, in order");
    }
}

/// Polls the edge's `/readyz` (over the client link) until it answers `status`; its body.
async fn wait_readyz(admin: &str, status: u16, what: &str) -> String {
    eventually(what, EVENTUALLY, || async {
        let (s, body) = readyz(admin).await;
        (s == status).then_some(body)
    })
    .await
}

/// Polls a metric of the edge until it reads `want`.
async fn wait_metric_is(admin: &str, series: &str, want: f64) {
    eventually(&format!("{series} reads {want}"), EVENTUALLY, || async {
        (metric_at(admin, series).await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and root for ip netns (./scripts/test.sh installs nats-server)"]
async fn a_cut_nats_link_keeps_the_client_turns_unready_and_loses_nothing() {
    let Some(mut lab) = lab_or_skip() else { return };
    let (nats, mut h, serving, from) = start(&mut lab).await;
    let admin = serving.admin.clone();
    let seen = client(&serving).await;
    publish_round(&mut h).await;
    assert_complete(&seen, &from, &h.seqs, "before the cut").await;

    lab.nats_link(false);
    let cut = std::time::Instant::now();
    let why = wait_readyz(&admin, 503, "/readyz turns 503 with the NATS link down").await;
    eprintln!("/readyz 503 {:?} after the cut (unready_after_ms {UNREADY_AFTER_MS})", cut.elapsed());
    assert!(why.contains("cut off from NATS"), "{why}");
    wait_metric_is(&admin, "tickgate_nats_connected", 0.0).await;
    // The feed goes on meanwhile: JetStream (reached from the root namespace) takes it.
    publish_round(&mut h).await;
    publish_round(&mut h).await;
    assert!(lock(&seen).closed.is_none(), "the client's stream ended during the cut");
    assert_eq!(metric_at(&admin, "tickgate_connections").await, 1.0, "the client is still connected");

    lab.nats_link(true);
    let back = std::time::Instant::now();
    wait_readyz(&admin, 200, "/readyz is 200 again with the NATS link back").await;
    eprintln!("/readyz 200 {:?} after the link came back", back.elapsed());
    wait_metric_is(&admin, "tickgate_nats_connected", 1.0).await;
    assert!(metric_at(&admin, "tickgate_nats_reconnects_total").await >= 1.0, "the edge reconnected");
    publish_round(&mut h).await;
    assert_complete(&seen, &from, &h.seqs, "after the link came back").await;
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and root for ip netns (./scripts/test.sh installs nats-server)"]
async fn latency_on_the_nats_link_delays_but_loses_nothing() {
    let Some(mut lab) = lab_or_skip() else { return };
    // Both directions of the NATS link: the edge's requests and what NATS sends it.
    for (dev, ns) in [(&lab.nats.host_dev, None), (&lab.nats.ns_dev, Some(&lab.ns))] {
        let mut args: Vec<&str> = Vec::new();
        if let Some(ns) = ns {
            args.extend(["-n", ns.as_str()]);
        }
        args.extend(["qdisc", "add", "dev", dev.as_str(), "root", "netem", "delay", "50ms"]);
        if let Err(e) = try_cmd("tc", &args) {
            eprintln!("skipped: tc netem unavailable: {e}");
            return;
        }
    }
    let (nats, mut h, serving, from) = start(&mut lab).await;
    let admin = serving.admin.clone();
    let seen = client(&serving).await;
    for _ in 0..5 {
        publish_round(&mut h).await;
    }
    assert_complete(&seen, &from, &h.seqs, "with 50 ms each way on the NATS link").await;
    let (status, body) = readyz(&admin).await;
    assert_eq!(status, 200, "latency is not a cut: {body}");
    drop(nats);
}
