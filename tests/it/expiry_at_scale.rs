//! 10,000 connections with staggered token expiries are all closed with 4001, none before
//! its deadline (less the wheel's documented early decision). How late the closes come (median, p99, max) is a figure of the machine, not
//! a behaviour: it is measured by `cargo bench --bench expiry` (docs/benchmarks.md,
//! "Expiry lateness"), not asserted here. The server runs as its own process (the
//! `tickgate` binary) so that neither side needs more than 10,000 of the 20,000 file
//! descriptors a process may open.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tickgate_client::{self as client, ConnectOptions, Event, Subscriber};

/// Every connection is closed with 4001, none before its deadline less the wheel's early
/// decision, and, the spec's "no data frame is sent after that deadline", every batch a
/// connection gets is stamped at or before its `exp`, however late the shard thread runs
/// (the writer checks the deadline before it stamps a batch). Lateness figures are the
/// expiry bench's (`cargo bench --bench expiry`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_staggered_expiries_close_with_4001_and_no_data_after_exp() {
    let _alone = common::exclusive().await;
    staggered_expiries().await;
}

/// Opens the population and checks every close, and that no batch is stamped after its
/// connection's `exp`.
async fn staggered_expiries() {
    // A token per 50 connections, fetched as the connections are made: expiries spread
    // over as many seconds as the set-up takes, as when real clients arrive over time.
    const BATCHES: usize = 200;
    const PER_BATCH: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("feeds")).unwrap();
    std::fs::write(
        dir.path().join("feeds/t.toml"),
        "name = \"T\"\nid = 1\nsource = \"synthetic\"\nsymbols = [\"A\", \"B\", \"C\", \"D\", \"E\"]\n[synthetic]\nseed = 1\nrate_per_s = 20.0\n",
    )
    .unwrap();
    let cfg = common::bin::write_config(
        dir.path(),
        &format!(
            "feeds_dir = \"{}\"\n\
             [issuer]\ntoken_ttl_s = 6\nclients = [{{ id = \"load\", secret = \"x\", scopes = [\"md:read:*\"] }}]\n\
             [limits]\nmax_connections = 20000\n",
            dir.path().join("feeds").display()
        ),
    );
    let (_guard, serving) = common::bin::spawn_serving(
        Command::new(common::bin::BIN)
            .args(["serve", "--config", cfg.to_str().unwrap(), "--state-dir"])
            .arg(dir.path().join("state"))
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null()),
    );
    let (url, issuer) = (serving.stream, serving.base);

    let mut tasks = Vec::new();
    for b in 0..BATCHES {
        let token = client::fetch_token(&issuer, "load", "x", None).await.unwrap();
        let exp = {
            use base64::Engine as _;
            let claims = token.split('.').nth(1).unwrap();
            let v: serde_json::Value =
                serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).unwrap())
                    .unwrap();
            v["exp"].as_u64().unwrap()
        };
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(PER_BATCH);
        for i in 0..PER_BATCH {
            let (url, token, ready) = (url.clone(), token.clone(), ready_tx.clone());
            let sym = ["A", "B", "C", "D", "E"][(b * PER_BATCH + i) % 5];
            tasks.push(tokio::spawn(async move {
                let mut sub = Subscriber::connect(&url, &token, &ConnectOptions::default()).await.unwrap();
                sub.send_json(&json!({"op": "subscribe", "feed": "T", "symbols": [sym]})).await.unwrap();
                ready.send(()).await.unwrap();
                drop(ready);
                loop {
                    match sub.next_event().await.unwrap() {
                        Event::Closed { code, .. } => return (exp, code, tickgate_proto::now_ns()),
                        Event::Batch { anomalies, send_ts_ns, .. } => {
                            assert!(anomalies.is_empty(), "{anomalies:?}");
                            let deadline_ns = exp * 1_000_000_000;
                            assert!(
                                send_ts_ns <= deadline_ns,
                                "a batch stamped {} ms after exp",
                                send_ts_ns.saturating_sub(deadline_ns) / 1_000_000
                            );
                        }
                        Event::Control(_) => {}
                    }
                }
            }));
        }
        drop(ready_tx);
        // The next token is fetched once this batch is connected, so every token has
        // nearly its whole lifetime left when its connections open, however slow the
        // machine (a batch still connecting when its token expires would be refused).
        while ready_rx.recv().await.is_some() {}
        // Pacing, not synchronisation: arrivals spread over at least 5 s, so the
        // expiries fall in several distinct seconds.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut exps = std::collections::BTreeSet::new();
    for t in tasks {
        let (exp, code, at) = tokio::time::timeout(common::EVENTUALLY, t).await.expect("closed").unwrap();
        assert_eq!(code, 4001);
        exps.insert(exp);
        // The wheel decides the close up to two ticks (20 ms) before the deadline so that
        // no batch can be stamped after it; never earlier.
        let deadline = exp * 1_000_000_000;
        assert!(at + 30_000_000 >= deadline, "closed {} ms before exp", (deadline - at) / 1_000_000);
    }
    assert!(exps.len() >= 3, "expiries not staggered: {exps:?}");
}
