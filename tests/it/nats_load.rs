//! The load generator of the comparison benchmark (`benches/compare.sh`) end to end. NATS
//! side, against a real nats-server: the publisher (`tickgate load --role publisher
//! --target nats`) and the WebSocket subscribers (`tickgate load --target nats`), in one
//! process and spread over two, must see every tick exactly once, in seq order, with
//! latency measured. tickgate side: the same publisher into `/v1/publish` of a real
//! `tickgate serve`, and the same subscribers.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::nats::{free_port, start_nats_with, Nats, NatsOptions};
use common::{bin::BIN, eventually_blocking, Kill, EVENTUALLY};
use serde_json::Value;

/// A nats-server with a client port and a plain WebSocket listener on loopback.
fn start_nats() -> Nats {
    start_nats_with(NatsOptions { jetstream: false, websocket: true, ..NatsOptions::default() })
}

/// Starts the subscribers, waits until they measure, publishes `count` ticks over
/// `symbols`, and returns (subscriber summary, publisher summary).
fn subscribe_and_publish(nats: &Nats, symbols: &str, count: u64, extra: &[&str]) -> (Value, Value) {
    let sub = ["--target", "nats", "--nats-url", &nats.ws_url()].map(String::from);
    let publisher = ["--target", "nats", "--nats-url", &nats.url].map(String::from);
    run_pair(&sub, &publisher, symbols, count, extra)
}

/// The same against any server: `sub` and `publisher` name the target.
fn run_pair(sub: &[String], publisher: &[String], symbols: &str, count: u64, extra: &[&str]) -> (Value, Value) {
    let mut sub = Kill(
        Command::new(BIN)
            .arg("load")
            .args(sub)
            // The window is fixed (the load generator has no "stop after N records"): long
            // enough that a slow machine starts the publisher and publishes everything in it.
            .args(["--feed", "TEST", "--symbols", symbols, "--warmup", "0", "--seconds", "10"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = sub.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("subscribers: {line}");
            if line.starts_with("measuring") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(EVENTUALLY).expect("the subscribers never started measuring");

    let publisher = Command::new(BIN)
        .args(["load", "--role", "publisher"])
        .args(publisher)
        .args([
            "--feed",
            "TEST",
            "--feed-id",
            "7",
            "--symbols",
            symbols,
            "--rate",
            "1000",
            "--count",
            &count.to_string(),
        ])
        .args(["--seconds", "0"])
        .output()
        .unwrap();
    assert!(publisher.status.success(), "publisher failed: {}", String::from_utf8_lossy(&publisher.stderr));
    let published: Value = serde_json::from_slice(&publisher.stdout).unwrap();

    let mut out = String::new();
    std::io::Read::read_to_string(sub.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    let status = sub.0.wait().unwrap();
    assert!(status.success(), "subscribers failed: {status}");
    (serde_json::from_str(&out).unwrap(), published)
}

fn assert_clean(s: &Value, target: &str, connections: u64, records: u64) {
    assert_eq!(s["target"], target);
    assert_eq!(s["gap_messages"], 0, "{s}");
    assert_eq!(s["connections"], connections, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    assert_eq!(s["anomalies"], 0, "seq gaps or repeats: {s}");
    assert_eq!(s["missing_records"], 0, "{s}");
    assert_eq!(s["early_closes"].as_array().unwrap().len(), 0, "{s}");
    assert_eq!(s["records"], records, "every tick to every subscriber exactly once: {s}");
    assert_eq!(s["samples"], records, "one latency sample per record: {s}");
    let p = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {s}"));
    assert!(p("p50_us") >= 1.0 && p("p50_us") <= p("p99_us"), "{s}");
    assert!(p("p99_us") <= p("p999_us") && p("p999_us") <= p("max_us"), "{s}");
    // How large the latencies are is the machine's business (benches/compare.sh measures
    // them): here they must only be real measurements, none beyond the window itself.
    assert!(p("max_us") <= p("seconds") * 1e6, "{s}");
}

#[test]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
fn nats_publisher_and_websocket_subscribers_see_every_tick() {
    let nats = start_nats();
    // 4 subscribers, 2 of the 4 instruments each: 300 ticks = 75 per instrument, 150 per subscriber.
    let (s, p) = subscribe_and_publish(&nats, "A,B,C,D", 300, &["--connections", "4", "--symbols-per-conn", "2"]);
    assert_eq!(p["ticks"], 300, "{p}");
    assert_eq!(p["confirmed"], true, "{p}");
    assert_eq!(p["sink"], "nats");
    assert_eq!(s["processes"], 1);
    assert_clean(&s, "nats", 4, 4 * 150);
}

#[test]
#[ignore = "needs nats-server on PATH (./scripts/test.sh installs it)"]
fn subscribers_over_two_processes_merge_their_histograms() {
    let nats = start_nats();
    let (s, p) = subscribe_and_publish(&nats, "X,Y,Z", 240, &["--connections", "5", "--processes", "2"]);
    assert_eq!(p["ticks"], 240, "{p}");
    assert_eq!(s["processes"], 2, "{s}");
    assert!(s.get("histogram_v2").is_none(), "the merged summary carries no raw histogram");
    assert_clean(&s, "nats", 5, 5 * 240);
}

#[test]
fn tickgate_publish_endpoint_feeds_the_same_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    std::fs::create_dir(dir.path().join("feeds")).unwrap();
    // Instrument ids are positions in the feed's symbol list, as the publisher numbers them.
    std::fs::write(
        dir.path().join("feeds/test.toml"),
        "name = \"TEST\"\nid = 7\nsource = \"publish\"\npolicy = \"disconnect\"\nsymbols = [\"A\", \"B\", \"C\"]\n",
    )
    .unwrap();
    let conf = dir.path().join("tickgate.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nfeeds_dir = \"{}\"\n",
            dir.path().join("feeds").display()
        ),
    )
    .unwrap();
    let _server = Kill(
        Command::new(BIN)
            .args(["serve", "--insecure-no-auth", "--config"])
            .arg(&conf)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually_blocking("tickgate listening", EVENTUALLY, || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    let url = format!("ws://127.0.0.1:{port}/v1/stream");
    let sub = ["--url", &url, "--no-token"].map(String::from);
    // The publisher's own seqs (1, 2, 3, ... per instrument) are kept by the server.
    let publisher = ["--target", "tickgate", "--url", &url, "--no-token"].map(String::from);
    let (s, p) = run_pair(&sub, &publisher, "A,B,C", 270, &["--connections", "3", "--spread"]);
    assert_eq!(p["sink"], "tickgate-publish");
    assert_eq!(p["ticks"], 270, "{p}");
    assert_eq!(p["errors"], 0, "{p}");
    assert_eq!(p["confirmed"], true, "the final ping was not answered: {p}");
    // One instrument per subscriber: 90 ticks each.
    assert_clean(&s, "tickgate", 3, 3 * 90);
}
