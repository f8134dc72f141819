//! A shard thread that dies ends the process with a clear log line and a status of its
//! own, instead of stalling every feed (the sources waited forever for its full queue).
//! The fault is armed through the test-only `TICKGATE_TEST_FAULT` start-up variable.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use common::*;
use tickgate::engine::shard::SHARD_DEATH_EXIT_CODE;

/// `tickgate serve` with the fault `spec` armed, stdout and stderr piped; the caller adds
/// the rest of the command line.
fn serve_with_fault(spec: &str) -> Command {
    let mut cmd = Command::new(bin::BIN);
    cmd.arg("serve")
        .env("TICKGATE_TEST_FAULT", spec)
        .env("TICKGATE_DEMO_SECRET", "shard-fault-secret")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Shard 1 of 2 panics 500 ms after start while a fast feed fills its small queue: the
/// process exits with status 70 within the generous bound, and stderr names the shard and
/// says why. Without the handling the process kept running with every feed stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_shard_ends_the_process_with_status_70_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let feeds = dir.path().join("feeds");
    std::fs::create_dir(&feeds).unwrap();
    std::fs::write(feeds.join("t.toml"), feed_toml("T", 1, 5, 5000.0)).unwrap();
    let config = dir.path().join("tickgate.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nfeeds_dir = {:?}\n[engine]\nshards = 2\nqueue_capacity = 16\n[server]\nstate_dir = {:?}\n",
            feeds.display().to_string(),
            dir.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let child = serve_with_fault("shard_panic_after_ms:500:1").arg("--config").arg(&config).spawn().unwrap();
    let mut node = Kill(child);
    // Stdout is read to its end (the process exiting), never closed early: the fault may
    // fire before or after the serving line on a slow machine.
    let stdout = node.0.stdout.take().unwrap();
    let out = std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>());

    let status = eventually("the process ends", EVENTUALLY, || {
        let s = node.0.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert_eq!(status.code(), Some(SHARD_DEATH_EXIT_CODE), "{status:?}");
    assert_eq!(SHARD_DEATH_EXIT_CODE, 70);
    let mut stderr = String::new();
    node.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(
        stderr.contains(
            "shard 1 died (panicked: TICKGATE_TEST_FAULT: shard 1 panics on purpose); stopping the process so its supervisor restarts it"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("TICKGATE_TEST_FAULT is set"), "the armed fault is announced: {stderr}");
    let out = out.join().unwrap();
    assert!(out.iter().all(|l| !l.contains("panicked")), "{out:?}");
    assert!(!stderr.contains("shard 0 died"), "{stderr}");
}

/// A malformed fault specification is logged and ignored: the node serves normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_fault_variable_is_ignored_with_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let feeds = dir.path().join("feeds");
    std::fs::create_dir(&feeds).unwrap();
    std::fs::write(feeds.join("t.toml"), feed_toml("T", 1, 5, 100.0)).unwrap();
    let child = serve_with_fault("shard_panic_after_ms:soon")
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--feeds-dir")
        .arg(&feeds)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .spawn()
        .unwrap();
    let mut node = Kill(child);
    let stdout = BufReader::new(node.0.stdout.take().unwrap());
    let url = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("tickgate: stream ").map(|r| r.split_whitespace().next().unwrap().to_owned()))
        .expect("serves");
    let addr = url.trim_start_matches("ws://").trim_end_matches("/v1/stream").to_owned();
    // Still serving: the public listener answers (the shards are alive).
    let status = reqwest::get(format!("http://{addr}/nope")).await.unwrap().status().as_u16();
    assert_eq!(status, 404, "HTTP on the public listener is answered by a live shard");
    assert!(node.0.try_wait().unwrap().is_none(), "the node must still run");
    node.0.kill().unwrap();
    node.0.wait().unwrap();
    let mut stderr = String::new();
    node.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(stderr.contains("TICKGATE_TEST_FAULT=\"shard_panic_after_ms:soon\" is not"), "{stderr}");
}
