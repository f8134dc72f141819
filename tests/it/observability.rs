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

/// Every dashboard JSON in `grafana/dashboards/`, with its file name.
fn dashboards() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(repo("grafana/dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "no dashboard in grafana/dashboards");
    out
}

/// Every PromQL expression of the dashboards (their `$job`/`$instance` variables set to this
/// scrape's), and of the alert rules without their threshold.
fn expressions(job: &str, instance: &str) -> Vec<String> {
    let mut out: Vec<String> = dashboards()
        .iter()
        .flat_map(|(_, d)| d["panels"].as_array().unwrap().clone())
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().replace("$job", job).replace("$instance", &instance.replace('.', "\\\\.")))
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

/// What an expression measures, from its metric names (the Prometheus naming rules:
/// `_seconds`, `_bytes`, `_total`), so a panel's units can be checked against it.
fn unit_kind(expr: &str) -> &'static str {
    let rated = expr.contains("rate(");
    if expr.contains("histogram_quantile") {
        return if expr.contains("_seconds_bucket") { "time" } else { "count" };
    }
    if expr.contains(" / ") {
        return "count"; // a ratio of two rates: records per frame
    }
    // The rate of a seconds counter (CPU time, time paused) is a share of time.
    match (rated, expr.contains("_seconds_total"), expr.contains("_bytes")) {
        (true, true, _) => "cpu",
        (true, false, true) => "bytes/s",
        (true, false, false) => "rate",
        (false, _, true) => "bytes",
        (false, _, false) if expr.contains("_seconds") => "time",
        _ => "count",
    }
}

/// The kind a Grafana unit id shows; `None` for a unit this dashboard should not use.
fn grafana_unit_kind(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "short" | "none" => "count",
        "ops" | "reqps" | "cps" => "rate",
        "s" | "ms" | "µs" | "ns" => "time",
        "bytes" | "decbytes" => "bytes",
        "Bps" | "binBps" => "bytes/s",
        "percentunit" => "cpu",
        _ => return None,
    })
}

/// Every metric selector of `expr` (a `tickgate_*` or `process_*` name and its `{...}`).
fn selectors(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = ["tickgate_", "process_"].iter().filter_map(|p| rest.find(p)).min() {
        let tail = &rest[at..];
        let name_len = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let (name, after) = tail.split_at(name_len);
        let labels = after.strip_prefix('{').and_then(|a| a.find('}').map(|e| a[..e].to_owned())).unwrap_or_default();
        out.push((name.to_owned(), labels));
        rest = after;
    }
    out
}

/// The dashboards import into any Grafana and show one instance at a time: no datasource
/// uid is hard-coded (an `__inputs` datasource and a `datasource` variable instead), every
/// series is filtered by the `job` and `instance` variables (several edges are never summed
/// unasked), each axis has one unit (a second unit gets an override onto the right axis, at
/// most two per panel), the build is a stat panel, and the provisioned datasource does not
/// make itself the default.
#[test]
fn every_dashboard_imports_anywhere() {
    let ds = std::fs::read_to_string(repo("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    let provisioned_uid = ds.lines().find_map(|l| l.trim().strip_prefix("uid: ")).unwrap().trim().to_owned();
    assert!(!ds.lines().any(|l| l.trim() == "isDefault: true"), "provisioning takes over the default datasource");
    let var_ds = json!({"type": "prometheus", "uid": "${datasource}"});
    for (file, dash) in dashboards() {
        let text = std::fs::read_to_string(repo(&format!("grafana/dashboards/{file}"))).unwrap();
        assert!(!text.contains(&provisioned_uid), "{file}: names the provisioned datasource uid");
        assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()), "{file}: no uid");
        let inputs = dash["__inputs"].as_array().unwrap_or_else(|| panic!("{file}: no __inputs"));
        assert!(
            inputs.iter().any(|i| i["type"] == "datasource" && i["pluginId"] == "prometheus"),
            "{file}: __inputs ask for no Prometheus datasource"
        );
        let vars = dash["templating"]["list"].as_array().unwrap();
        let var = |name: &str| {
            vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("{file}: no `{name}` variable")).clone()
        };
        let dsv = var("datasource");
        assert_eq!((dsv["type"].as_str(), dsv["query"].as_str()), (Some("datasource"), Some("prometheus")), "{file}");
        let current = dsv["current"]["value"].as_str().unwrap_or("");
        assert!(current.is_empty() || current.starts_with("${"), "{file}: the datasource variable defaults to a uid");
        for name in ["job", "instance"] {
            let v = var(name);
            assert_eq!(v["type"], "query", "{file}: `{name}`");
            assert_eq!(v["datasource"], var_ds, "{file}: `{name}` queries another datasource");
            assert!(v["definition"].as_str().is_some_and(|q| q.starts_with("label_values(")), "{file}: `{name}`");
        }
        assert_eq!(
            (var("instance")["multi"].as_bool(), var("instance")["includeAll"].as_bool()),
            (Some(true), Some(true))
        );

        let panels = dash["panels"].as_array().unwrap();
        let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), panels.len(), "{file}: panel ids are unique");
        for p in panels {
            let title = p["title"].as_str().unwrap();
            assert_eq!(p["datasource"], var_ds, "{file}: panel `{title}` uses another datasource");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}: panel `{title}` has no target");
            let mut refs: Vec<&str> = targets.iter().map(|t| t["refId"].as_str().unwrap()).collect();
            refs.sort_unstable();
            refs.dedup();
            assert_eq!(refs.len(), targets.len(), "{file}: `{title}`: refIds are unique");
            let default_unit =
                p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or_else(|| panic!("`{title}`: no unit"));
            let overrides = p["fieldConfig"]["overrides"].as_array().cloned().unwrap_or_default();
            let mut kinds = Vec::new();
            for t in targets {
                assert_eq!(t["datasource"], var_ds, "{file}: `{title}`");
                let expr = t["expr"].as_str().unwrap();
                for (name, labels) in selectors(expr) {
                    assert!(
                        labels.contains("job=~\"$job\"") && labels.contains("instance=~\"$instance\""),
                        "{file}: `{title}`: `{name}` is not filtered by $job and $instance: {expr}"
                    );
                }
                let refid = t["refId"].as_str().unwrap();
                let over = overrides.iter().find(|o| o["matcher"] == json!({"id": "byFrameRefID", "options": refid}));
                let prop = |id: &str| {
                    over.and_then(|o| o["properties"].as_array().unwrap().iter().find(|q| q["id"] == id))
                        .and_then(|q| q["value"].as_str())
                };
                let unit = prop("unit").unwrap_or(default_unit);
                let shown = grafana_unit_kind(unit).unwrap_or_else(|| panic!("{file}: `{title}`: unit `{unit}`"));
                assert_eq!(shown, unit_kind(expr), "{file}: `{title}` {refid} shows `{unit}` for {expr}");
                let default_kind = grafana_unit_kind(default_unit).unwrap();
                if shown != default_kind {
                    assert_eq!(
                        prop("custom.axisPlacement"),
                        Some("right"),
                        "{file}: `{title}` {refid}: a second unit on the left axis"
                    );
                }
                kinds.push(shown);
            }
            kinds.sort_unstable();
            kinds.dedup();
            assert!(kinds.len() <= 2, "{file}: `{title}` mixes {kinds:?}: two axes at most");
            if targets.iter().all(|t| t["expr"].as_str().unwrap().contains("_build_info")) {
                assert_eq!(p["type"], "stat", "{file}: `{title}` shows build info as a {}", p["type"]);
            }
        }
    }
    let prov = std::fs::read_to_string(repo("grafana/provisioning/dashboards/tickgate.yml")).unwrap();
    assert!(prov.contains("type: file") && prov.contains("path:"));
}

#[test]
#[ignore = "needs promtool on PATH (./scripts/test.sh installs it)"]
fn alert_rules_pass_promtool() {
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
    let instance = ts.server().admin_addr().to_string();
    for expr in expressions("tickgate", &instance) {
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
