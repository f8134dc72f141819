//! Epochs across restarts of the real binary: `kill -9` and an immediate restart (what
//! systemd's 100 ms `RestartSec` does) must never give a feed an epoch it had before, and
//! a client resuming with the old epoch must get a snapshot, never a silent jump.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use tickgate_client::{ConnectOptions, Event, Subscriber};
use tickgate_proto::codec::{Record, FLAG_SNAPSHOT};
use tickgate_proto::control::ServerMsg;

const DEMO_SECRET: &str = "restart-epoch-secret";

/// A running `tickgate serve`; killed with SIGKILL when dropped.
struct Node {
    child: Kill,
    url: String,
    issuer: String,
}

/// Starts the binary on ephemeral ports with the feeds and state folders given, and
/// waits for the line that says it serves (printed once the epoch is durable).
fn start(feeds: &Path, state: &Path) -> Node {
    let (child, s) = bin::spawn_serving(
        Command::new(bin::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--feeds-dir")
            .arg(feeds)
            .arg("--state-dir")
            .arg(state)
            .env("TICKGATE_DEMO_SECRET", DEMO_SECRET)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null()),
    );
    Node { child, url: s.stream, issuer: s.base }
}

impl Node {
    async fn subscriber(&self) -> (Subscriber, u64) {
        let token = tickgate_client::fetch_token(&self.issuer, "demo", DEMO_SECRET, None).await.unwrap();
        let mut sub = Subscriber::connect(&self.url, &token, &ConnectOptions::default()).await.unwrap();
        let ServerMsg::Welcome { feeds, .. } = next_control(&mut sub).await else { panic!("no welcome") };
        let epoch = feeds.iter().find(|f| f.name == "T").expect("feed T").epoch;
        (sub, epoch)
    }

    /// SIGKILL: no shutdown, no flush, no chance to write anything.
    fn kill9(mut self) {
        self.child.0.kill().unwrap();
        self.child.0.wait().unwrap();
    }
}

async fn next_records(sub: &mut Subscriber) -> Vec<Record> {
    match tokio::time::timeout(EVENTUALLY, sub.next_event()).await.expect("an event in time").unwrap() {
        Event::Batch { records, anomalies, .. } => {
            assert!(anomalies.is_empty(), "{anomalies:?}");
            records
        }
        Event::Control(m) => panic!("unexpected control message {m:?}"),
        Event::Closed { code, reason } => panic!("closed {code} {reason}"),
    }
}

/// Restarts right after `kill -9`, several times: each epoch is larger than the one
/// before. Then a client that held seqs of the previous epoch resumes with them: it gets
/// the new epoch in `subscribed` and the snapshot, and live records continue right after
/// the `subscribed` seq, not after its old seq (the seqs in between are the new epoch's
/// and were never sent to it). With epochs in whole seconds the restarts within one
/// second repeated the epoch and the resume skipped seqs silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_grow_across_kill_9_restarts_and_an_old_epoch_resume_gets_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (feeds, state) = (dir.path().join("feeds"), dir.path().join("state"));
    std::fs::create_dir(&feeds).unwrap();
    // 5 symbols at 1000 ticks/s: each has seqs well above the next node's soon after start.
    std::fs::write(feeds.join("t.toml"), feed_toml("T", 1, 5, 1000.0)).unwrap();

    let mut node = start(&feeds, &state);
    let (mut sub, mut previous) = node.subscriber().await;
    for round in 0..5 {
        // Hold seqs of this epoch: some records of every symbol.
        let symbols = ["S0", "S1", "S2", "S3", "S4"];
        sub.subscribe(1, "T", &symbols, false, None).await.unwrap();
        assert!(matches!(next_control(&mut sub).await, ServerMsg::Subscribed { .. }));
        let want = if round == 0 { 30 } else { 3 };
        let held: BTreeMap<String, u64> = tokio::time::timeout(EVENTUALLY, async {
            loop {
                next_records(&mut sub).await;
                let seen: BTreeMap<String, u64> =
                    sub.tracker.last_seen().into_iter().map(|(_, symbol, seq)| (symbol, seq)).collect();
                if seen.len() == symbols.len() && seen.values().all(|&s| s >= want) {
                    return seen;
                }
            }
        })
        .await
        .expect("records of every symbol in time");
        drop(sub);

        // kill -9 and restart at once, on the same state folder.
        node.kill9();
        node = start(&feeds, &state);
        let (mut next, epoch) = node.subscriber().await;
        assert!(epoch > previous, "round {round}: epoch {epoch} after {previous}: an epoch must never repeat");

        // Resume with the old epoch's seqs.
        next.subscribe(1, "T", &symbols, false, Some((Some(previous), held.clone()))).await.unwrap();
        let ServerMsg::Subscribed { epoch: sub_epoch, instruments, .. } = next_control(&mut next).await else {
            panic!("no subscribed")
        };
        assert_eq!(sub_epoch, epoch, "the reply names the current epoch");
        let at_subscribe: BTreeMap<u32, u64> = instruments.iter().map(|i| (i.id, i.seq)).collect();
        // Per instrument: snapshot records (seq <= subscribed seq) first, then live from
        // exactly the subscribed seq + 1; a record after the old held seq + 1 without
        // those in between would be the reported silent loss.
        let mut first_live: BTreeMap<u32, u64> = BTreeMap::new();
        while first_live.len() < at_subscribe.len() {
            for r in next_records(&mut next).await {
                let s = at_subscribe[&r.instrument_id()];
                if r.flags() & FLAG_SNAPSHOT != 0 {
                    assert!(r.seq() <= s, "a snapshot record above the subscribed seq");
                    assert!(!first_live.contains_key(&r.instrument_id()), "a snapshot record after live ones");
                } else {
                    first_live.entry(r.instrument_id()).or_insert(r.seq());
                }
            }
        }
        for (id, seq) in &first_live {
            assert_eq!(
                *seq,
                at_subscribe[id] + 1,
                "round {round}: instrument {id} did not continue after its snapshot"
            );
        }
        assert_eq!(next.tracker.gaps, 0);
        next.send_json(&serde_json::json!({"op": "unsubscribe", "feed": "T", "symbols": symbols})).await.unwrap();
        loop {
            if let Event::Control(ServerMsg::Unsubscribed { .. }) = next.next_event().await.unwrap() {
                break;
            }
        }
        previous = epoch;
        sub = next;
    }
    node.kill9();
}

/// A corrupt state file is a clear start-up error naming the file, never a panic and never
/// a guessed epoch.
#[test]
fn a_corrupt_epoch_file_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (feeds, state) = (dir.path().join("feeds"), dir.path().join("state"));
    std::fs::create_dir_all(&feeds).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(feeds.join("t.toml"), feed_toml("T", 1, 5, 10.0)).unwrap();
    std::fs::write(state.join("epoch"), "not a number\n").unwrap();
    let out = Command::new(common::bin::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--feeds-dir")
        .arg(&feeds)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("epoch state file") && err.contains("is corrupt"), "{err}");
    assert!(err.contains(&state.join("epoch").display().to_string()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
