//! Ingest throughput, side by side with a peer doing the least the same input needs.
//!
//! - **publish**: one publisher connection sends N records (batches of B) into a
//!   `publish` feed of a real server (127.0.0.1, `--insecure-no-auth` mode so no token
//!   work is measured), optionally with subscribers; the clock stops when the server
//!   acknowledges the last batch (`ping` → `pong` after everything before it is in the
//!   feed's log and queued for the shards). Peer: a bare tokio-tungstenite server that
//!   receives the same batches on one connection and decodes them (no sequencing, no
//!   log, no fan-out).
//! - **replay**: a `replay` feed plays `feeds/sample.tgrec` as fast as possible in a
//!   loop for a few seconds; records/s from `tickgate_ticks_ingested_total`. Peer:
//!   reading and decoding the same file in a loop.
//!
//! `cargo bench --bench ingest` prints one JSON line per measurement and a summary
//! table; medians of 3 runs. Server, publisher and peer share the machine.

// tungstenite dictates the handshake callback's large error type.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tickgate::config::Config;
use tickgate::Server;
use tickgate_client::publisher::{publish_url, Publisher};
use tickgate_client::ConnectOptions;
use tickgate_proto::codec::{decode_batch, Body, Quote, Record, Trade};
use tickgate_proto::recording::Reader;

const INSTRUMENTS: u32 = 100;

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|k| {
            let instr = (k as u32 % INSTRUMENTS) + 1;
            let body = if k % 4 == 0 {
                Body::Trade(Trade { price: k as i64, size: 100, side: 1 })
            } else {
                Body::Quote(Quote { bid_px: k as i64, bid_sz: 1, ask_px: k as i64 + 1, ask_sz: 1 })
            };
            Record::encode(9, instr, 0, k as i64, 0, &body, 0)
        })
        .collect()
}

fn sample() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("feeds/sample.tgrec")
}

/// A server with only the publish feed (`replay = false`) or only the replay feed, so
/// one measurement never competes with the other's source.
async fn server(dir: &std::path::Path, replay: bool) -> Server {
    if replay {
        std::fs::write(
            dir.join("r.toml"),
            format!(
                "name = \"R\"\nid = 5\nsource = \"replay\"\n[replay]\nfile = \"{}\"\nspeed = 0\nloop = true\n",
                sample().display()
            ),
        )
        .expect("feed file");
    } else {
        let syms: Vec<String> = (0..INSTRUMENTS).map(|i| format!("\"S{i}\"")).collect();
        std::fs::write(
            dir.join("p.toml"),
            format!("name = \"P\"\nid = 9\nsource = \"publish\"\nsymbols = [{}]\n", syms.join(", ")),
        )
        .expect("feed file");
    }
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        feeds_dir: dir.to_owned(),
        ..Config::default()
    };
    cfg.auth.insecure_no_auth = true;
    cfg.server.state_dir = Some(dir.join("state"));
    Server::start(cfg).await.expect("server starts")
}

async fn publish_run(url: &str, recs: &[Record], batch: usize) -> f64 {
    let mut p = Publisher::connect(url, "", &ConnectOptions::default()).await.expect("publisher");
    let started = Instant::now();
    for chunk in recs.chunks(batch) {
        p.send(chunk).await.expect("send");
    }
    let errors = p.sync().await.expect("ack");
    assert!(errors.is_empty(), "{errors:?}");
    let secs = started.elapsed().as_secs_f64();
    p.close().await;
    recs.len() as f64 / secs
}

/// The peer: accept one WebSocket and decode every batch it sends.
async fn peer_sink() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let cb =
                    |_req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                     mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                        resp.headers_mut().insert("sec-websocket-protocol", "tickgate.v1".parse().expect("header"));
                        Ok(resp)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else { return };
                let mut n = 0u64;
                while let Some(Ok(m)) = ws.next().await {
                    match m {
                        tokio_tungstenite::tungstenite::Message::Binary(b) => {
                            n += decode_batch(&b).map(|d| d.records.len() as u64).unwrap_or(0);
                        }
                        tokio_tungstenite::tungstenite::Message::Text(_) => {
                            use futures_util::SinkExt;
                            let pong = "{\"type\":\"pong\",\"id\":1,\"ts\":0}";
                            let _ = ws.send(tokio_tungstenite::tungstenite::Message::text(pong)).await;
                        }
                        _ => {}
                    }
                }
                std::hint::black_box(n);
            });
        }
    });
    addr
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this without it, and
    // then gets a smoke run (small and quick, same code paths).
    let full = std::env::args().any(|a| a == "--bench");
    let (n_records, runs, window) =
        if full { (1_000_000, 3, Duration::from_secs(2)) } else { (20_000, 1, Duration::from_millis(300)) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let srv = server(dir.path(), false).await;
        let stream_url = format!("ws://{}/v1/stream", srv.addr());
        let url = publish_url(&stream_url, "P", None);
        let peer = peer_sink().await;
        let peer_url = format!("ws://{peer}/v1/publish?feed=P");
        let recs = records(n_records);
        let mut rows = Vec::new();
        for batch in [64usize, 512] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                ours.push(publish_run(&url, &recs, batch).await);
                theirs.push(publish_run(&peer_url, &recs, batch).await);
            }
            let (o, t) = (median(ours), median(theirs));
            println!("{{\"bench\":\"publish\",\"batch\":{batch},\"tickgate_rps\":{o:.0},\"peer_rps\":{t:.0}}}");
            rows.push((format!("publish, batches of {batch}"), o, t));
        }

        srv.shutdown().await;

        // Replay: the feed loops as fast as it can from start-up; sample its counter.
        let dir = tempfile::tempdir().expect("tempdir");
        let srv = server(dir.path(), true).await;
        let counter = srv.metrics().ticks_ingested.with_label_values(&["R"]);
        let mut ours = Vec::new();
        for _ in 0..runs {
            let (c0, t0) = (counter.get(), Instant::now());
            tokio::time::sleep(window).await;
            ours.push((counter.get() - c0) as f64 / t0.elapsed().as_secs_f64());
        }
        let mut theirs = Vec::new();
        for _ in 0..runs {
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed() < window {
                let mut r = Reader::open(&sample()).expect("sample");
                while let Some(rec) = r.next_record().expect("record") {
                    std::hint::black_box(rec);
                    n += 1;
                }
            }
            theirs.push(n as f64 / t0.elapsed().as_secs_f64());
        }
        let (o, t) = (median(ours), median(theirs));
        println!("{{\"bench\":\"replay\",\"tickgate_rps\":{o:.0},\"peer_rps\":{t:.0}}}");
        rows.push(("replay, speed 0 (as fast as possible)".into(), o, t));
        srv.shutdown().await;

        println!("\n| measurement | tickgate records/s | peer records/s | ratio |");
        println!("|---|---:|---:|---:|");
        for (name, o, t) in rows {
            println!("| {name} | {o:.0} | {t:.0} | {:.2} |", o / t);
        }
    });
}
