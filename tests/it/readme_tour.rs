//! The README's five-minute tour, run as a new user runs it: every ```` ```sh ```` block of the
//! tour in order, with the defaults. The first block starts the server (its `export`s are the
//! tour's environment); the others run as one bash script against it, `cargo run ... --` being
//! the binary cargo built and the documented ports the ones the server got.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

use serde_json::Value;

use crate::common::bin::{spawn_serving, BIN};

fn tour_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("## Five-minute tour").expect("the README has a five-minute tour");
    let rest = &readme[start + 3..];
    let tour = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    tour.split("```sh\n").skip(1).map(|b| b[..b.find("```").expect("an unclosed block")].to_owned()).collect()
}

/// The JSON lines of one block's output that are records (trades and quotes).
fn records(out: &str) -> Vec<Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "trade" || v["type"] == "quote")
        .collect()
}

#[test]
#[ignore = "needs curl on PATH (./scripts/test.sh installs it)"]
fn the_readme_tour_runs_with_the_defaults() {
    let blocks = tour_blocks();
    assert!(blocks.len() >= 5, "the tour has its command blocks: {blocks:?}");
    let env: Vec<(String, String)> = blocks[0]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert!(env.iter().any(|(k, _)| k == "TICKGATE_DEMO_SECRET"), "the tour sets the demo secret");
    assert!(
        blocks[0].lines().any(|l| l.trim() == "cargo run --release -- serve"),
        "the tour starts the server with the defaults"
    );

    // The server as the first block starts it (no configuration), in a fresh directory with
    // the repository's feeds, on free ports instead of 8080/8081.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(concat!(env!("CARGO_MANIFEST_DIR"), "/feeds"), dir.path().join("feeds")).unwrap();
    let (_server, serving) = spawn_serving(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            .envs(env.iter().cloned()),
    );
    let public = serving.base.trim_start_matches("http://").to_owned();
    let admin = serving.admin.trim_start_matches("http://").to_owned();

    let mut script = String::from("set -euo pipefail\n");
    for (i, block) in blocks[1..].iter().enumerate() {
        script.push_str(&format!("echo '=== block {}'\n{block}", i + 1));
    }
    let script = script
        .replace("cargo run -q --release --", "\"$TICKGATE_BIN\"")
        .replace("cargo run --release --", "\"$TICKGATE_BIN\"")
        .replace("127.0.0.1:8080", &public)
        .replace("127.0.0.1:8081", &admin);
    let out = Command::new("timeout")
        .args(["120", "bash", "-c", &script])
        .current_dir(dir.path())
        .envs(env.iter().cloned())
        .env("TICKGATE_BIN", BIN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the tour failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let parts: Vec<&str> = stdout.split("=== block ").skip(1).collect();
    assert_eq!(parts.len(), blocks.len() - 1, "{stdout}");

    // Token and subscribe: welcome, subscribed, exactly --limit records.
    assert!(parts[0].contains("\"type\":\"welcome\"") && parts[0].contains("\"type\":\"subscribed\""), "{}", parts[0]);
    assert_eq!(records(parts[0]).len(), 10, "{}", parts[0]);

    // Two runs with one resume file: the second starts right after the first, no gap.
    let resumed = records(parts[1]);
    assert_eq!(resumed.len(), 10, "{}", parts[1]);
    let seqs: Vec<u64> = resumed.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "AAPL seqs continue across the two runs: {seqs:?}");

    // The long run stops at its limit; an unknown feed exits 6.
    assert_eq!(records(parts[2]).len(), 20, "{}", parts[2]);
    assert!(parts[2].contains("exit status 6"), "{}", parts[2]);

    // Operators: metrics with deliveries counted, ready, the configuration checked.
    let delivered = parts[3]
        .lines()
        .find_map(|l| l.strip_prefix("tickgate_records_delivered_total{feed=\"DEMO\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    // Shard counters are flushed every 100 ms: some of the 40 records, not necessarily all.
    assert!(delivered.is_some_and(|d| d > 0.0), "{}", parts[3]);
    assert!(parts[3].contains("{\"status\":\"ready\"}"), "{}", parts[3]);
    assert!(parts[3].contains("configuration OK"), "{}", parts[3]);
}
