//! Observability against a real Prometheus: it scrapes a running tickgate under load, and
//! every expression of the Grafana dashboard and of the alert rules must return data through
//! its HTTP API; `promtool` must find `/metrics` and the rules clean; the dashboard must be
//! structurally valid; and counters must equal what the test did.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};
use tickgate_client::Event;

fn tool(name: &str) -> String {
    let found =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()));
    found
        .unwrap_or_else(|| panic!("`{name}` not found: install the Debian package prometheus (./scripts/test.sh does)"))
        .display()
        .to_string()
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every PromQL expression of the dashboard, and of the alert rules without their threshold.
fn expressions() -> Vec<String> {
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("grafana/dashboards/tickgate.json")).unwrap()).unwrap();
    let mut out: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned()))
        .collect();
    let rules = std::fs::read_to_string(repo("grafana/alerts.yml")).unwrap();
    for line in rules.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr: ") {
            // "<expression> <op> <threshold>": evaluate the expression itself, which must
            // have data whether or not the alert fires.
            let mut parts = expr.rsplitn(3, ' ');
            let (_threshold, op, left) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
            assert!(["==", ">", "<", ">=", "<=", "!="].contains(&op), "rule expr without a comparison: {expr}");
            out.push(left.to_owned());
        }
    }
    out
}

#[test]
#[ignore = "needs promtool on PATH (./scripts/test.sh installs it)"]
fn dashboard_and_provisioning_are_consistent() {
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("grafana/dashboards/tickgate.json")).unwrap()).unwrap();
    let ds = std::fs::read_to_string(repo("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    let ds_uid = ds.lines().find_map(|l| l.trim().strip_prefix("uid: ")).unwrap().trim().to_owned();
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let panels = dash["panels"].as_array().unwrap();
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels {
        assert_eq!(p["datasource"]["uid"], ds_uid.as_str(), "panel {} uses another datasource", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no target", p["title"]);
        let mut refs: Vec<&str> = targets.iter().map(|t| t["refId"].as_str().unwrap()).collect();
        refs.dedup();
        assert_eq!(refs.len(), targets.len());
        for t in targets {
            assert_eq!(t["datasource"]["uid"], ds_uid.as_str());
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }
    let prov = std::fs::read_to_string(repo("grafana/provisioning/dashboards/tickgate.yml")).unwrap();
    assert!(prov.contains("type: file") && prov.contains("path:"));
    let out = Command::new(tool("promtool")).args(["check", "rules"]).arg(repo("grafana/alerts.yml")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs prometheus and promtool on PATH (./scripts/test.sh installs them)"]
async fn prometheus_scrapes_and_every_expression_has_data() {
    let prometheus = tool("prometheus");
    let ts = TestServer::start(1000.0, |_| {}).await;

    // Known workload: 3 subscribers, 2 refused handshakes, and one subscriber to every
    // instrument that stays until shutdown (it sees the last seq of each instrument).
    let token = ts.token(&["md:read:T"]);
    let (mut watcher, _) = subscribed(&ts, &token, "T", json!(["*"]), true).await;
    let watch = tokio::spawn(async move {
        let mut last: std::collections::HashMap<u32, u64> = Default::default();
        let mut count = 0u64;
        loop {
            match watcher.next_event().await.unwrap() {
                Event::Batch { records, anomalies, .. } => {
                    assert!(anomalies.is_empty());
                    count += records.len() as u64;
                    for r in records {
                        last.insert(r.instrument_id(), r.seq());
                    }
                }
                Event::Closed { code, .. } => return (last, code, count),
                Event::Control(_) => {}
            }
        }
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (mut sub, _) = subscribed(&ts, &token, "T", json!(["*"]), false).await;
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = sub.next_event() => match ev.unwrap() {
                        Event::Batch { records, .. } => n += records.len() as u64,
                        Event::Closed { .. } => break,
                        Event::Control(_) => {}
                    }
                }
            }
            // Unsubscribe, then read until the reply: every record sent before it is counted.
            sub.send_json(&json!({"op":"unsubscribe","feed":"T","symbols":["*"]})).await.unwrap();
            loop {
                match sub.next_event().await.unwrap() {
                    Event::Batch { records, .. } => n += records.len() as u64,
                    Event::Control(tickgate_proto::control::ServerMsg::Unsubscribed { .. }) => break,
                    _ => {}
                }
            }
            (sub, n)
        }));
    }
    for bad in ["not-a-token", "a.b.c"] {
        let (s, _) = bearer_handshake(&ts, bad).await;
        assert_eq!(s, 401);
    }

    // A real Prometheus scraping every second, with the alert rules loaded.
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: tickgate\n    static_configs:\n      - targets: [\"{}\"]\n",
            repo("grafana/alerts.yml").display(),
            ts.server().admin_addr()
        ),
    )
    .unwrap();
    let _prom = Kill(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    eventually("prometheus ready", EVENTUALLY, || async {
        http.get(format!("{api}/-/ready")).send().await.is_ok_and(|r| r.status().is_success()).then_some(())
    })
    .await;

    // Every expression returns data (rates need two scrapes: poll until they have).
    for expr in expressions() {
        let query = format!("{api}/api/v1/query?{}", serde_urlencoded::to_string([("query", &expr)]).unwrap());
        eventually(&format!("data for `{expr}`"), EVENTUALLY, || async {
            let r: Value = http.get(&query).send().await.unwrap().json().await.unwrap();
            assert_eq!(r["status"], "success", "{expr}: {r}");
            r["data"]["result"].as_array().is_some_and(|a| !a.is_empty()).then_some(())
        })
        .await;
    }

    // promtool finds the exposition clean.
    let body = ts.metrics().await;
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Counters equal the workload: records delivered = records the clients received.
    stop.cancel();
    let mut received = 0;
    let mut subs = Vec::new();
    for r in readers {
        let (sub, n) = r.await.unwrap();
        received += n;
        subs.push(sub);
    }
    let m = ts.metrics().await;
    let failures = parse_metrics(&m).sum("tickgate_auth_failures_total").unwrap_or(0.0);
    assert_eq!(failures, 2.0, "auth failures counted once each");
    assert_eq!(metric_value(&m, "tickgate_handshakes_total{result=\"ok\"}"), 4.0);
    drop(subs);
    // Ingested = every tick the source produced: at shutdown the sources stop first and the
    // shards deliver what was taken in, so the watcher's last seq per instrument (seqs are
    // 1, 2, 3, ... per instrument) adds up to the ingest counter.
    let metrics = ts.server().metrics().clone();
    ts.shutdown().await;
    let (last, code, watched) = watch.await.unwrap();
    assert_eq!(code, 1001);
    // Delivered = what the four clients received (the counters are final after shutdown).
    let delivered = metrics.records_delivered.with_label_values(&["T"]).get();
    assert_eq!(delivered, received + watched, "delivered counter vs records received");
    let produced: u64 = last.values().sum();
    let ingested = metrics.ticks_ingested.with_label_values(&["T"]).get();
    assert_eq!(ingested, produced, "ingest counter vs ticks the source produced");
}
