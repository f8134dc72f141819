//! The lame-duck phase of a shutdown (`server.lame_duck_ms`): `/readyz` turns 503 at once,
//! the clients keep streaming, and each gets `shutdown` and close 1001 at its own moment of
//! the window, so a rolling restart does not move every client in the same second. In
//! process (`Server::shutdown`) and on the real binary (SIGTERM, and a second SIGTERM that
//! cuts the phase short). Without a lame duck (`lame_duck_ms = 0`, the default) shutdown is
//! what `stream::shutdown_reaches_every_client` and `drain::` test.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tickgate_client::{ConnectOptions, Event, Subscriber};
use tickgate_proto::control::ServerMsg;

/// Shards of every server here: the spreading bound below allows one early connection
/// per shard.
const SHARDS: usize = 2;

/// What one client saw of the shutdown.
#[derive(Debug)]
struct Seen {
    /// When its `shutdown` arrived, and the reconnect hint in it.
    shutdown: Option<(Instant, u64)>,
    /// When its last record before `shutdown` arrived.
    last_record: Option<Instant>,
    /// Records after `shutdown` (there must be none).
    after_shutdown: u64,
    /// The close code.
    close: u16,
}

/// Reads a client's stream to its close.
async fn watch(mut sub: Subscriber) -> Seen {
    let mut seen = Seen { shutdown: None, last_record: None, after_shutdown: 0, close: 0 };
    loop {
        match tokio::time::timeout(EVENTUALLY, sub.next_event()).await {
            Ok(Ok(Event::Control(ServerMsg::Shutdown { reconnect_after_ms }))) => {
                assert!(seen.shutdown.is_none(), "`shutdown` twice");
                seen.shutdown = Some((Instant::now(), reconnect_after_ms));
            }
            Ok(Ok(Event::Control(_))) => {}
            Ok(Ok(Event::Batch { records, anomalies, .. })) => {
                assert!(anomalies.is_empty(), "{anomalies:?}");
                if seen.shutdown.is_some() {
                    seen.after_shutdown += records.len() as u64;
                } else if !records.is_empty() {
                    seen.last_record = Some(Instant::now());
                }
            }
            Ok(Ok(Event::Closed { code, .. })) => {
                seen.close = code;
                return seen;
            }
            Ok(Err(e)) => panic!("client error: {e}"),
            Err(_) => panic!("no event within {EVENTUALLY:?}: {seen:?}"),
        }
    }
}

/// A live subscriber of every symbol of `feed` (its first record has arrived).
async fn live_subscriber(url: &str, token: &str, feed: &str) -> Subscriber {
    let mut sub = Subscriber::connect(url, token, &ConnectOptions::default()).await.expect("connects");
    let w = next_control(&mut sub).await;
    assert!(matches!(w, ServerMsg::Welcome { .. }), "{w:?}");
    sub.send_json(&json!({"op": "subscribe", "id": 1, "feed": feed, "symbols": ["*"]})).await.unwrap();
    let r = next_control(&mut sub).await;
    assert!(matches!(r, ServerMsg::Subscribed { .. }), "{r:?}");
    read_records(&mut sub, 1).await;
    sub
}

/// Every client got `shutdown` (hint in 1000..=`max_hint`), nothing after it, then 1001.
fn all_told(seen: &[Seen], max_hint: u64) {
    for s in seen {
        let (_, hint) = s.shutdown.unwrap_or_else(|| panic!("closed without `shutdown`: {s:?}"));
        assert!((1000..=max_hint).contains(&hint), "reconnect_after_ms {hint}");
        assert_eq!(s.after_shutdown, 0, "records after `shutdown`: {s:?}");
        assert_eq!(s.close, 1001, "{s:?}");
    }
}

/// The `shutdown` messages are spread over the window, checked with a bound that a slow
/// machine cannot break. Each shard gives its `n` connections one stratum of `window / n`
/// each (connection `i` fires at `(i + u) / n × window`), and a timer never fires early, so
/// by `begun + f × window` at most ⌈f × n⌉ per shard can have been told, at most
/// `f × clients + SHARDS` in all, however the clients were placed. `begun` is taken before
/// the shutdown starts, and delays (a busy shard thread, a slow client) only make a message
/// arrive later, never earlier: a slow machine spreads the arrivals more or shifts them
/// later, which this bound allows. (A bound on the *latest* arrivals, "not all in the
/// last 10 %", is what a stalled machine could break, so it is not asserted; the lower
/// bound on the whole shutdown's duration covers that end.) Without the spreading, every
/// message would arrive within milliseconds of `begun` and fail the first fraction.
fn spread_over(seen: &[Seen], begun: Instant, window: Duration) {
    let clients = seen.len();
    for f in [0.1, 0.25, 0.5, 0.75] {
        let by = begun + window.mul_f64(f);
        let early = seen.iter().filter(|s| s.shutdown.is_some_and(|(at, _)| at < by)).count();
        let bound = (f * clients as f64).floor() as usize + SHARDS;
        assert!(
            early <= bound,
            "{early} of {clients} clients got `shutdown` within {:.0} % of the window (at most {bound} may)",
            f * 100.0
        );
    }
}

/// In process: 30 clients, a 3 s lame duck. `/readyz` is 503 at once while the clients
/// stream on; each gets `shutdown` then 1001, spread over the window; shutdown ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_spread_over_the_lame_duck_window() {
    const CLIENTS: usize = 30;
    let window = Duration::from_millis(3000);
    let mut ts = TestServer::start(1000.0, |c| {
        c.engine.shards = SHARDS;
        c.server.lame_duck_ms = window.as_millis() as u64;
        c.server.reconnect_after_max_ms = 3000;
    })
    .await;
    let token = ts.token(&["md:read:*"]);
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let sub = live_subscriber(&ts.url, &token, "T").await;
        tasks.push(tokio::spawn(watch(sub)));
    }
    eventually("all clients open", EVENTUALLY, || async { (ts.server().connections() == CLIENTS).then_some(()) }).await;
    let readyz = format!("{}/readyz", ts.admin);
    assert_eq!(reqwest::get(&readyz).await.unwrap().status().as_u16(), 200);

    let server = ts.server.take().unwrap();
    let begun = Instant::now();
    let shutdown = tokio::spawn(server.shutdown());
    eventually("/readyz turns 503", EVENTUALLY, || async {
        (reqwest::get(&readyz).await.ok()?.status().as_u16() == 503).then_some(())
    })
    .await;
    let not_ready = Instant::now();
    tokio::time::timeout(EVENTUALLY, shutdown).await.expect("shutdown ends").unwrap();
    // The phase lasts the whole window (from after `begun`): a lower bound, which a slow
    // machine only exceeds.
    assert!(begun.elapsed() >= window, "shutdown took {:?}, less than the lame-duck window", begun.elapsed());
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    all_told(&seen, 3000);
    spread_over(&seen, begun, window);

    // Streaming while not ready: a client told more than a second after `/readyz` was seen
    // at 503 got records after that (its feed runs at 1000 ticks/s), so the node kept
    // serving it while reporting not ready. By the bound above at most 2/3 × 30 + 2 clients
    // are told within 2 s of `begun`, so such clients exist unless the `/readyz` poll itself
    // took over a second.
    let late: Vec<&Seen> =
        seen.iter().filter(|s| s.shutdown.is_some_and(|(at, _)| at > not_ready + Duration::from_secs(1))).collect();
    assert!(!late.is_empty(), "every client was told within a second of /readyz turning 503");
    for s in late {
        assert!(s.last_record.is_some_and(|at| at > not_ready), "no record while not ready: {s:?}");
    }
}

/// Spawns the binary with `server_toml` under `[server]` and `n` live subscribers of
/// `DEMO`; returns the process, its addresses and the subscribers' watchers.
async fn binary_with_clients(
    dir: &tempfile::TempDir,
    server_toml: &str,
    n: usize,
) -> (Kill, Serving, Vec<tokio::task::JoinHandle<Seen>>) {
    const SECRET: &str = "lame-duck-test-secret";
    let cfg = bin::write_config(dir.path(), &format!("[engine]\nshards = {SHARDS}\n[server]\n{server_toml}"));
    let (child, serving) = bin::spawn_serving(
        Command::new(bin::BIN)
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .current_dir(dir.path())
            .env("TICKGATE_DEMO_SECRET", SECRET)
            .stderr(Stdio::null()),
    );
    let token = tickgate_client::fetch_token(&serving.base, "demo", SECRET, None).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let sub = live_subscriber(&serving.stream, &token, "DEMO").await;
        tasks.push(tokio::spawn(watch(sub)));
    }
    (child, serving, tasks)
}

fn signal(child: &Kill, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.0.id().to_string()]).status().unwrap().success());
}

async fn status(url: &str) -> Option<u16> {
    Some(reqwest::get(url).await.ok()?.status().as_u16())
}

/// Waits (polling, within [`EVENTUALLY`]) for the process to exit; asserts it succeeded.
async fn exits(child: &mut Kill, what: &str) {
    let status = eventually(what, EVENTUALLY, || {
        let s = child.0.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success(), "{status:?}");
}

/// SIGTERM to the binary with a 2 s lame duck: not ready at once, every client told and
/// closed 1001, spread over the window, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_spreads_shutdown_over_the_lame_duck_window() {
    const CLIENTS: usize = 10;
    let window = Duration::from_millis(2000);
    let dir = tempfile::tempdir().unwrap();
    let (mut child, serving, tasks) =
        binary_with_clients(&dir, &format!("lame_duck_ms = {}\n", window.as_millis()), CLIENTS).await;
    let readyz = format!("{}/readyz", serving.admin);
    assert_eq!(status(&readyz).await, Some(200));

    let begun = Instant::now();
    signal(&child, "-TERM");
    eventually("/readyz turns 503", EVENTUALLY, || async { (status(&readyz).await == Some(503)).then_some(()) }).await;
    exits(&mut child, "the process exits after SIGTERM").await;
    assert!(begun.elapsed() >= window, "exited after {:?}, within the lame-duck window", begun.elapsed());
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    all_told(&seen, 5000);
    spread_over(&seen, begun, window);
}

/// A second SIGTERM during a long lame duck (120 s) cuts it short: the process exits
/// well within the window, and every client still gets `shutdown` then 1001.
/// `tickgate_lame_duck` is 1 during the phase, and the clients stream on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_cuts_the_lame_duck_short() {
    const CLIENTS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, serving, tasks) = binary_with_clients(&dir, "lame_duck_ms = 120000\n", CLIENTS).await;
    let (readyz, metrics) = (format!("{}/readyz", serving.admin), format!("{}/metrics", serving.admin));
    let lame_duck = || async {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        Some(metric_value(&text, "tickgate_lame_duck"))
    };
    assert_eq!(lame_duck().await, Some(0.0));

    signal(&child, "-TERM");
    eventually("/readyz turns 503", EVENTUALLY, || async { (status(&readyz).await == Some(503)).then_some(()) }).await;
    eventually("tickgate_lame_duck 1", EVENTUALLY, || async { (lame_duck().await == Some(1.0)).then_some(()) }).await;
    // Still streaming, not ready: a fresh client is refused, the connected ones are fed.
    let token = tickgate_client::fetch_token(&serving.base, "demo", "lame-duck-test-secret", None).await.unwrap();
    let refused = Subscriber::connect(&serving.stream, &token, &ConnectOptions::default()).await;
    assert!(refused.is_err(), "a new stream was accepted during the lame duck");
    let delivered = || async {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        parse_metrics(&text).sum("tickgate_records_delivered_total")
    };
    let before = eventually("a /metrics answer", EVENTUALLY, delivered).await;
    eventually("records delivered while not ready", EVENTUALLY, || async {
        (delivered().await? > before).then_some(())
    })
    .await;

    signal(&child, "-TERM");
    // Within `EVENTUALLY` (30 s), far below the 120 s window: the second signal ended it.
    exits(&mut child, "the process exits after the second SIGTERM").await;
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    all_told(&seen, 5000);
}
