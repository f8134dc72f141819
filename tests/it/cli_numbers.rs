//! Every numeric flag of every subcommand is range-checked by clap: a bad value is a usage
//! error (status 2) naming the flag and the allowed range, never a panic
//! (`record --seconds -1` used to panic in `Duration::from_secs_f64`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

/// Arguments every `record` / `subscribe` run needs besides the flag under test. The URL is a
/// closed port: a value that passes the checks fails later, with status 1.
const STREAM: [&str; 8] = ["--url", "ws://127.0.0.1:1/v1/stream", "--token", "t", "--feed", "T", "--out", "x.tgrec"];

fn run(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(crate::common::bin::BIN)
        .args(args)
        .current_dir(dir.path())
        .env_remove("TICKGATE_TOKEN")
        .env_remove("TICKGATE_CLIENT_SECRET")
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs `cmd` with `flag value` and asserts status 2 and clap's message naming the flag,
/// the value and the reason.
fn refused(cmd: &[&str], flag: &str, value: &str, reason: &str) {
    let mut args: Vec<&str> = cmd.to_vec();
    args.extend([flag, value]);
    let (code, err) = run(&args);
    let what = format!("{args:?}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert_eq!(code, Some(2), "{what}: {err}");
    let upper = flag.trim_start_matches("--").replace('-', "_").to_uppercase();
    let value_name = match flag {
        "--server-pid" => "PID".to_owned(),
        "--symbols-per-conn" => "K".to_owned(),
        "--refresh-every" => "SECS".to_owned(),
        "--child" => "INDEX/PROCESSES".to_owned(),
        _ => upper,
    };
    let want = format!("error: invalid value '{value}' for '{flag} <{value_name}>': {reason}");
    assert!(err.starts_with(&want), "{what}: want {want:?}, got {err}");
}

#[test]
fn record_seconds_must_be_finite_positive_and_bounded() {
    let record: Vec<&str> = ["record"].into_iter().chain(STREAM).collect();
    let reason = "seconds must be a finite number in (0, 31536000]";
    for v in ["-1", "NaN", "nan", "inf", "-inf", "0", "-0", "1e300", "31536000.001", "1e", "ten"] {
        refused(&record, "--seconds", v, reason);
    }
    refused(&record, "--limit", "0", "0 is not in 1..=9223372036854775807");
    refused(&record, "--limit", "-1", "-1 is not in 1..=9223372036854775807");
    // In range: accepted, and the run fails later on the closed port (status 1), not on usage.
    for v in ["0.001", "31536000"] {
        let mut args = record.clone();
        args.extend(["--seconds", v]);
        let (code, err) = run(&args);
        assert_eq!(code, Some(1), "--seconds {v}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn subscribe_limit_is_at_least_one() {
    let subscribe: Vec<&str> =
        ["subscribe"].into_iter().chain(STREAM[..6].iter().copied()).chain(["--symbols", "A"]).collect();
    refused(&subscribe, "--limit", "0", "0 is not in 1..=9223372036854775807");
    refused(&subscribe, "--limit", "-5", "-5 is not in 1..=9223372036854775807");
}

#[test]
fn every_load_number_is_range_checked() {
    let load = ["load"];
    let int = |v: &str, lo: i64, hi: i64| format!("{v} is not in {lo}..={hi}");
    let cases: Vec<(&str, &str, String)> = vec![
        ("--connections", "0", int("0", 1, 1_000_000)),
        ("--connections", "1000001", int("1000001", 1, 1_000_000)),
        ("--connections", "-1", int("-1", 1, 1_000_000)),
        ("--seconds", "-1", int("-1", 0, 604_800)),
        ("--seconds", "604801", int("604801", 0, 604_800)),
        ("--warmup", "3601", int("3601", 0, 3_600)),
        ("--warmup", "-2", int("-2", 0, 3_600)),
        ("--source-ips", "0", int("0", 1, 254)),
        ("--source-ips", "255", int("255", 1, 254)),
        ("--server-pid", "0", int("0", 1, 4_194_304)),
        ("--server-pid", "4194305", int("4194305", 1, 4_194_304)),
        ("--symbols-per-conn", "0", int("0", 1, 100_000)),
        ("--symbols-per-conn", "100001", int("100001", 1, 100_000)),
        ("--refresh-every", "0", int("0", 1, 86_400)),
        ("--refresh-every", "86401", int("86401", 1, 86_400)),
        ("--connect-concurrency", "0", int("0", 1, 65_536)),
        ("--connect-concurrency", "65537", int("65537", 1, 65_536)),
        ("--processes", "0", int("0", 1, 256)),
        ("--processes", "257", int("257", 1, 256)),
        ("--count", "0", int("0", 1, i64::MAX)),
        ("--feed-id", "0", int("0", 1, 65_535)),
        ("--feed-id", "65536", int("65536", 1, 65_535)),
        ("--child", "2/2", "wants INDEX/PROCESSES with INDEX < PROCESSES <= 256, got \"2/2\"".into()),
        ("--child", "0/0", "wants INDEX/PROCESSES with INDEX < PROCESSES <= 256, got \"0/0\"".into()),
    ];
    for (flag, value, reason) in &cases {
        refused(&load, flag, value, reason);
    }
    for v in ["0", "-1", "NaN", "inf", "-inf", "0.0001", "10000000.5", "1e300"] {
        refused(&load, "--rate", v, "ticks per second must be a finite number in [0.001, 10000000]");
    }
}
