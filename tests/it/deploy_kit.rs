//! The deployment kit under `deploy/` (issue #14, docs/deployment.md): the edge
//! configuration example parses and validates as it stands, the HAProxy configuration
//! passes `haproxy -c` with its environment filled in, and the three NATS server
//! configurations pass `nats-server -t`. The files are read where they are, not copied.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

use tickgate::config::{Config, NatsStorage};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(file)
}

fn on_path(tool: &str, arg: &str) -> bool {
    Command::new(tool).arg(arg).output().is_ok_and(|o| o.status.success())
}

#[test]
fn the_edge_example_parses_and_validates() {
    let cfg =
        Config::from_file(&deploy("tickgate-edge.toml")).expect("deploy/tickgate-edge.toml is a valid configuration");
    assert_eq!(cfg.nats.servers.len(), 3, "three NATS servers");
    assert_eq!(cfg.nats.stream_replicas, 3, "R3 streams in a three-server cluster");
    assert_eq!(cfg.nats.stream_storage, NatsStorage::File);
    assert!(cfg.issuer.issuer.is_some(), "one iss for the cluster");
    assert_eq!(cfg.issuer.signing_key_files.len(), 2);
    assert_eq!(cfg.issuer.key_rotation_s, 0);
    assert!(cfg.server.lame_duck_ms > 0);
    // The systemd unit's stop timeout must cover the lame duck and the drain.
    let unit = std::fs::read_to_string(deploy("systemd/tickgate.service")).unwrap();
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().trim_end_matches('s').parse().ok())
        .expect("TimeoutStopSec=<n>s in the unit");
    assert!(
        stop * 1000 > cfg.server.lame_duck_ms + cfg.server.drain_ms,
        "TimeoutStopSec={stop}s must exceed lame_duck_ms {} + drain_ms {}",
        cfg.server.lame_duck_ms,
        cfg.server.drain_ms
    );
    for key in
        ["StateDirectory=tickgate", "KillSignal=SIGTERM", "LimitNOFILE=", "NoNewPrivileges=yes", "ProtectSystem=strict"]
    {
        assert!(unit.contains(key), "the unit sets {key}");
    }
    assert!(unit.contains("ExecStart=/usr/local/bin/tickgate serve --config /etc/tickgate/tickgate.toml"));
}

/// The environment the HAProxy configuration expects (its header lists it).
pub(crate) fn haproxy_env(cmd: &mut Command, bind: &str, edges: &[(String, u16)]) {
    cmd.env("TICKGATE_LB_BIND", bind);
    for (i, (public, admin_port)) in edges.iter().enumerate() {
        cmd.env(format!("TICKGATE_EDGE{}", i + 1), public);
        cmd.env(format!("TICKGATE_EDGE{}_ADMIN_PORT", i + 1), admin_port.to_string());
    }
}

/// The path of the HAProxy configuration the tests run.
pub(crate) fn haproxy_cfg() -> PathBuf {
    deploy("haproxy/haproxy.cfg")
}

#[test]
fn the_haproxy_config_is_valid() {
    if !on_path("haproxy", "-v") {
        eprintln!("SKIPPED: haproxy is not on PATH (./scripts/test.sh installs it)");
        return;
    }
    let mut c = Command::new("haproxy");
    c.arg("-c").arg("-f").arg(haproxy_cfg());
    let edges: Vec<(String, u16)> = (1..=3).map(|i| (format!("10.0.0.{i}:8080"), 8081)).collect();
    haproxy_env(&mut c, "127.0.0.1:8443", &edges);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Without its environment the file is refused, not silently bound to nothing.
    let mut bare = Command::new("haproxy");
    bare.arg("-c").arg("-f").arg(haproxy_cfg());
    for v in ["TICKGATE_LB_BIND", "TICKGATE_EDGE1", "TICKGATE_EDGE2", "TICKGATE_EDGE3"] {
        bare.env_remove(v);
    }
    let out = bare.output().unwrap();
    assert!(!out.status.success(), "haproxy -c accepted the file without its addresses");
}

#[test]
fn the_nats_cluster_configs_are_valid() {
    if !on_path("nats-server", "--version") {
        eprintln!("SKIPPED: nats-server is not on PATH (./scripts/test.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for i in 1..=3 {
        let text = std::fs::read_to_string(deploy(&format!("nats/nats-{i}.conf"))).unwrap();
        assert!(text.contains("jetstream {") && text.contains("cluster {") && text.contains("routes"), "nats-{i}.conf");
        assert!(text.contains(&format!("server_name: nats-{i}")));
        // `-t` only parses; point the store somewhere writable all the same.
        let local = dir.path().join(format!("nats-{i}.conf"));
        std::fs::write(&local, text.replace("/var/lib/nats/jetstream", dir.path().to_str().unwrap())).unwrap();
        let out = Command::new("nats-server").arg("-c").arg(&local).arg("-t").output().unwrap();
        assert!(out.status.success(), "nats-{i}.conf: {}", String::from_utf8_lossy(&out.stderr));
    }
}
