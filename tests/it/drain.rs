//! Draining after SIGTERM, on the real binary: both listeners keep accepting and answering
//! until the process exits (new streams 503 `unavailable`, `/readyz` 503, `/metrics` 200),
//! so a load balancer sees "not ready" rather than a refused connection.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const DEMO_SECRET: &str = "drain-test-secret";

/// What one attempt got: an HTTP status (and `error` code), or no HTTP answer at all.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Http(u16, Option<String>),
    NoAnswer(String),
}

async fn stream_attempt(url: &str, addr: &str, token: &str) -> Outcome {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", "tickgate.v1".parse().unwrap());
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let tcp = match tokio::net::TcpStream::connect(addr).await {
        Ok(t) => t,
        Err(e) => return Outcome::NoAnswer(e.to_string()),
    };
    match tokio::time::timeout(EVENTUALLY, tokio_tungstenite::client_async(req, tcp)).await {
        Err(_) => Outcome::NoAnswer("no answer in time".into()),
        Ok(Ok((_, resp))) => Outcome::Http(resp.status().as_u16(), None),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let body: Value = resp.body().as_ref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
            Outcome::Http(resp.status().as_u16(), body["error"].as_str().map(str::to_owned))
        }
        Ok(Err(e)) => Outcome::NoAnswer(e.to_string()),
    }
}

async fn get_attempt(url: &str) -> Outcome {
    // A fresh connection each time: a pooled one would hide a listener that stopped accepting.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    match http.get(url).send().await {
        Ok(r) => Outcome::Http(r.status().as_u16(), None),
        Err(e) => Outcome::NoAnswer(e.to_string()),
    }
}

/// Every HTTP answer comes before every non-answer: once a listener stops answering (the
/// process is exiting) it never answers again.
fn answers_then_silence(what: &str, seq: &[Outcome]) {
    let first_silent = seq.iter().position(|o| matches!(o, Outcome::NoAnswer(_))).unwrap_or(seq.len());
    assert!(
        seq[first_silent..].iter().all(|o| matches!(o, Outcome::NoAnswer(_))),
        "{what}: an attempt got no HTTP answer while the process still answered later ones: {seq:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_keeps_answering_503_until_exit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = bin::write_config(dir.path(), "[engine]\nshards = 2\n[server]\ndrain_ms = 20000\n");
    let (mut child, serving) = bin::spawn_serving(
        Command::new(bin::BIN)
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .current_dir(dir.path())
            .env("TICKGATE_DEMO_SECRET", DEMO_SECRET)
            .stderr(Stdio::null()),
    );
    let url = serving.stream.clone();
    let addr = serving.base.trim_start_matches("http://").to_owned();
    let admin = serving.admin;
    let pid = child.0.id();

    let token = tickgate_client::fetch_token(&serving.base, "demo", DEMO_SECRET, None).await.unwrap();
    // An open stream whose client never reads, so never answers the server's close: the
    // drain lasts while the server waits for it.
    assert_eq!(stream_attempt(&url, &addr, &token).await, Outcome::Http(101, None));
    let mut held = Vec::new();
    {
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut().insert("sec-websocket-protocol", "tickgate.v1".parse().unwrap());
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        held.push(tokio_tungstenite::client_async(req, tcp).await.unwrap().0);
    }

    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    eventually("/readyz turns 503", EVENTUALLY, || async {
        (get_attempt(&format!("{admin}/readyz")).await == Outcome::Http(503, None)).then_some(())
    })
    .await;

    let (mut streams, mut readyz, mut metrics) = (Vec::new(), Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        if child.0.try_wait().unwrap().is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the process did not exit after SIGTERM");
        streams.push(stream_attempt(&url, &addr, &token).await);
        readyz.push(get_attempt(&format!("{admin}/readyz")).await);
        metrics.push(get_attempt(&format!("{admin}/metrics")).await);
    }
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");

    for (what, seq, want) in [
        ("stream", &streams, Outcome::Http(503, Some("unavailable".into()))),
        ("readyz", &readyz, Outcome::Http(503, None)),
        ("metrics", &metrics, Outcome::Http(200, None)),
    ] {
        assert!(seq.contains(&want), "{what}: never answered {want:?} while draining: {seq:?}");
        assert!(
            seq.iter().all(|o| *o == want || matches!(o, Outcome::NoAnswer(_))),
            "{what}: an answer other than {want:?}: {seq:?}"
        );
        answers_then_silence(what, seq);
    }
    drop(held);
}
