//! `tickgate check-config` (issue #15): a configuration and its feed files checked without
//! starting anything: the effective settings printed with secrets redacted, and each kind
//! of mistake refused with exit 1 and the same message `serve` would give.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common::{bin::BIN, feed_toml};
use std::process::Command;

fn check(dir: &std::path::Path, config: &str) -> (i32, String, String) {
    let cfg = dir.join("tickgate.toml");
    std::fs::write(&cfg, format!("feeds_dir = {:?}\n{config}", dir.join("feeds"))).unwrap();
    let out = Command::new(BIN).args(["check-config", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[test]
fn a_good_configuration_is_printed_and_a_bad_one_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let feeds = dir.path().join("feeds");
    std::fs::create_dir(&feeds).unwrap();
    std::fs::write(feeds.join("a.toml"), feed_toml("A", 1, 3, 10.0)).unwrap();
    let clients = "[issuer]\nclients = [{ id = \"ops\", secret = \"do-not-print-me\", scopes = [\"md:read:*\"] }]\n";
    let (code, out, err) = check(dir.path(), clients);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("configuration OK"), "{out}");
    assert!(out.contains("A id 1 source Synthetic policy Disconnect: 3 symbols"), "{out}");
    assert!(!out.contains("do-not-print-me"), "a secret was printed: {out}");

    // A setting out of range.
    let (code, _, err) = check(dir.path(), "[nats]\nduplicate_window_s = 0\n");
    assert_eq!(code, 1);
    assert!(err.contains("nats.duplicate_window_s must be between 1 and 86400"), "{err}");
    // Two feeds with one id.
    std::fs::write(feeds.join("b.toml"), feed_toml("B", 1, 3, 10.0)).unwrap();
    let (code, _, err) = check(dir.path(), "");
    assert_eq!(code, 1);
    assert!(err.contains("feed id 1 used twice"), "{err}");
    std::fs::remove_file(feeds.join("b.toml")).unwrap();
    // A NATS feed with no NATS.
    std::fs::write(feeds.join("n.toml"), "name = \"N\"\nid = 9\nsource = \"nats\"\nsymbols = [\"X\"]\n").unwrap();
    let (code, _, err) = check(dir.path(), "");
    assert_eq!(code, 1);
    assert!(err.contains("nats.servers is empty"), "{err}");
}
