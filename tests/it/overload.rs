//! The server's own overload is not its clients' fault (docs/protocol.md §11): with the
//! server on one core, 1,000 readers that keep up and a publisher far beyond what the shard
//! can deliver, no reader is closed as a slow consumer and none misses a record; the
//! publisher is slowed down instead (backpressure through the inbound queue).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tickgate_client::publisher::{publish_url, Publisher};
use tickgate_client::ConnectOptions;
use tickgate_proto::codec::{Body, Quote, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::bin::{spawn_serving, write_config, BIN};
use crate::common::{self, client_frame, eventually, metric_value, publish_toml, server_frame};

const READERS: usize = 1000;

/// One reader: subscribes to `P` and reads as fast as it can, checking that the seqs of
/// `S0` go up by exactly one. Returns why it stopped, if the server stopped it.
///
/// It speaks WebSocket on a plain socket: one `read` into a large buffer takes many frames,
/// and per frame it looks only at the frame header, the batch's count and its first and last
/// seq (every record here is a 72-byte quote of S0, so that is the whole contiguity check).
/// So a reader costs far less than the fan-out it reads, also in a debug build: it keeps up.
async fn reader(addr: String, token: String, last: Arc<AtomicU64>, ready: Arc<AtomicUsize>) -> Result<(), String> {
    let mut sock = TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
    let head = format!(
        "GET /v1/stream HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: tickgate.v1\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let body_at = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if sock.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed during the handshake".into());
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        return Err(String::from_utf8_lossy(&buf[..body_at]).into_owned());
    }
    buf.drain(..body_at);
    sock.write_all(&client_frame(0x1, br#"{"op":"subscribe","id":1,"feed":"P","symbols":["S0"]}"#))
        .await
        .map_err(|e| e.to_string())?;
    let mut expected = None::<u64>;
    loop {
        // Every complete frame in the buffer.
        let mut at = 0;
        while let Some((opcode, payload)) = server_frame(&buf[at..]) {
            let (start, len) = payload;
            let body = &buf[at + start..at + start + len];
            match opcode {
                0x1 => {
                    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
                    match v["type"].as_str() {
                        Some("subscribed") => {
                            expected = Some(v["instruments"][0]["seq"].as_u64().ok_or("no seq")? + 1);
                            ready.fetch_add(1, Ordering::Relaxed);
                        }
                        Some("welcome") => {}
                        other => return Err(format!("unexpected {other:?}: {v}")),
                    }
                }
                0x2 => {
                    let count = u16::from_le_bytes([body[2], body[3]]) as u64;
                    if body.len() as u64 != 16 + 72 * count || count == 0 {
                        return Err(format!("a batch of {} bytes for {count} quotes", body.len()));
                    }
                    let seq_at = |k: u64| u64::from_le_bytes(body[16 + 72 * k as usize + 8..][..8].try_into().unwrap());
                    let want = expected.ok_or("a record before subscribed")?;
                    if seq_at(0) != want || seq_at(count - 1) != want + count - 1 {
                        return Err(format!("seqs {}..{}, expected {want}..", seq_at(0), seq_at(count - 1)));
                    }
                    expected = Some(want + count);
                    last.store(want + count - 1, Ordering::Relaxed);
                }
                0x8 => {
                    let code = if body.len() >= 2 { u16::from_be_bytes([body[0], body[1]]) } else { 1005 };
                    return Err(format!("closed {code} {}", String::from_utf8_lossy(body.get(2..).unwrap_or(&[]))));
                }
                // A heartbeat: answered, or the server closes a reader that is only busy reading.
                0x9 => {
                    let pong = client_frame(0xA, body);
                    sock.write_all(&pong).await.map_err(|e| e.to_string())?;
                }
                _ => {}
            }
            at += start + len;
        }
        buf.drain(..at);
        if sock.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the stream ended".into());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_shard_slows_the_publisher_and_closes_no_reader_that_keeps_up() {
    let _x = common::exclusive().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("feeds")).unwrap();
    std::fs::write(dir.path().join("feeds/p.toml"), publish_toml("P", 9, 1, "disconnect", 1000)).unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "feeds_dir = {:?}\n[engine]\nshards = 1\n[limits]\nmax_pending_per_ip = 2000\n[issuer]\nclients = [{{ id = \"r\", secret = \"r\", scopes = [\"md:read:P\"] }}, {{ id = \"p\", secret = \"p\", scopes = [\"md:publish:P\"] }}]\n",
            dir.path().join("feeds")
        ),
    );
    // The server on one core when there are two: it, not the readers, is what runs out.
    let pin = std::thread::available_parallelism().map(|n| n.get() >= 2).unwrap_or(false)
        && Command::new("taskset").arg("-V").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    let (_server, serving) =
        spawn_serving(cmd.args(["serve", "--config", cfg.to_str().unwrap()]).stderr(Stdio::null()));
    let read = tickgate_client::fetch_token(&serving.base, "r", "r", None).await.unwrap();
    let publish = tickgate_client::fetch_token(&serving.base, "p", "p", None).await.unwrap();

    let addr = serving.base.trim_start_matches("http://").to_owned();
    let last: Vec<Arc<AtomicU64>> = (0..READERS).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let ready = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> =
        last.iter().map(|l| tokio::spawn(reader(addr.clone(), read.clone(), l.clone(), ready.clone()))).collect();
    let failed = eventually("every reader subscribed", common::EVENTUALLY * 2, || {
        let n = ready.load(Ordering::Relaxed);
        let failed = readers.iter().filter(|r| r.is_finished()).count();
        async move { (n + failed == READERS).then_some(failed) }
    })
    .await;
    assert_eq!(failed, 0, "readers failed to subscribe");

    // The publisher sends as fast as the server takes it for a few seconds: far more than
    // one core can fan out to 1,000 readers, so the shard is the bottleneck.
    let mut p = Publisher::connect(&publish_url(&serving.stream, "P", None), &publish, &ConnectOptions::default())
        .await
        .unwrap();
    let batch: Vec<Record> =
        (0..256).map(|k| Record::encode(9, 1, 0, k, 0, &Body::Quote(Quote::default()), 0)).collect();
    let started = Instant::now();
    let mut published = 0u64;
    while started.elapsed() < Duration::from_secs(4) {
        p.send(&batch).await.unwrap();
        published += batch.len() as u64;
    }
    assert!(p.sync().await.unwrap().is_empty());
    let metrics = || async { reqwest::get(format!("{}/metrics", serving.admin)).await.unwrap().text().await.unwrap() };
    // Everything published reaches every reader, in order (each reader checks its seqs).
    let failed = eventually("every reader has every record", Duration::from_secs(180), || {
        let done = last.iter().filter(|l| l.load(Ordering::Relaxed) >= published).count();
        let failed = readers.iter().filter(|r| r.is_finished()).count();
        async move { (done + failed == READERS).then_some(failed) }
    })
    .await;
    let text = metrics().await;
    let mut errors = Vec::new();
    for r in readers {
        if r.is_finished() {
            errors.push(r.await.unwrap().unwrap_err());
        } else {
            r.abort();
        }
    }
    let show: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && [
                    "records_delivered",
                    "intake_paused",
                    "backpressure",
                    "busy",
                    "shard_cpu",
                    "slow_consumer",
                    "dispatch_cycle_seconds_sum",
                    "dispatch_cycle_seconds_count",
                    "frames_sent",
                    "bytes_sent",
                ]
                .iter()
                .any(|k| l.contains(k))
        })
        .collect();
    eprintln!("published {published} in {:?}\n{}", started.elapsed(), show.join("\n"));
    assert_eq!(failed, 0, "readers failed: {:?}", &errors[..errors.len().min(5)]);
    assert_eq!(metric_value(&text, "tickgate_slow_consumer_events_total{action=\"disconnect\"}"), 0.0);
    assert_eq!(metric_value(&text, "tickgate_closes_total{code=\"4008\"}"), 0.0);
    // Counted as written, every record to every reader (the counters flush every 100 ms).
    let want = (published * READERS as u64) as f64;
    eventually("the deliveries counted", common::EVENTUALLY, || async {
        let text = metrics().await;
        (metric_value(&text, "tickgate_records_delivered_total{feed=\"P\"}") == want).then_some(())
    })
    .await;
}
