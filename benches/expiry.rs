//! Expiry lateness: how long after its token's `exp` each connection's close 4001 reaches
//! the client, side by side in the same run with a peer doing the least the same job needs.
//!
//! - **tickgate**: a real server (`tickgate::Server`, 127.0.0.1, a synthetic feed at
//!   20 ticks/s like `tests/it/expiry_at_scale.rs`). N connections each open with a
//!   long-lived token and subscribe to one instrument; once all are open, each sends a
//!   `refresh` with a token whose `exp` is one of S consecutive whole seconds (N/S
//!   connections per second, as real tokens expire in whole seconds), and the per-shard
//!   timer wheel closes it.
//! - **peer**: a bare tokio-tungstenite server accepting the same connections from the same
//!   client code. On `refresh` it reads `exp` from the token (no signature check) and arms
//!   one `tokio::time::sleep_until` per connection for that instant, then sends close 4001:
//!   a timer per connection from tokio's own wheel, no shard, no engine, no data. What
//!   separates the two columns is the cost of doing expiry through tickgate's shards (the
//!   wheel, its 10 ms tick and two-tick early decision, the queue discard, the close
//!   write), not the machine: both run here, now, under the same client.
//!
//! Lateness = the client's clock when the close frame arrives − `exp`, per connection;
//! negative means before `exp` (tickgate decides up to two wheel ticks early on purpose, so
//! that no batch is stamped after the deadline). Printed per run as JSON, then a table of
//! median / p99 / max / min over all connections of the median run, the share within the
//! spec's 250 ms, and (tickgate only) how many data batches carried a send time after
//! their connection's `exp`.
//!
//! `cargo bench --bench expiry` (N = 5,000, S = 3, 3 runs each, alternating; needs
//! `ulimit -n 20000`: server and clients share this process). `cargo test --all-targets`
//! runs it without `--bench`: a smoke run of 50 connections over one second.

// tungstenite dictates the handshake callback's large error type.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tickgate::config::{ClientConfig, Config};
use tickgate::Server;
use tickgate_client::ConnectOptions;
use tickgate_proto::now_ns;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const SUB: &str = "bench";

/// One connection's outcome: (exp in seconds, close code, client clock at the close in
/// ns, batches stamped after exp).
type Outcome = (u64, u16, u64, u64);

async fn tickgate_server(dir: &std::path::Path) -> Server {
    std::fs::write(
        dir.join("t.toml"),
        "name = \"T\"\nid = 1\nsource = \"synthetic\"\nsymbols = [\"A\", \"B\", \"C\", \"D\", \"E\"]\n\
         [synthetic]\nseed = 1\nrate_per_s = 20.0\n",
    )
    .expect("feed file");
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        feeds_dir: dir.to_owned(),
        ..Config::default()
    };
    cfg.limits.max_connections = 20_000;
    cfg.server.state_dir = Some(dir.join("state"));
    cfg.issuer.clients = vec![ClientConfig {
        id: "bench".into(),
        secret: Some("bench-secret".into()),
        secret_sha256: None,
        scopes: vec!["md:read:*".into()],
    }];
    Server::start(cfg).await.expect("server starts")
}

/// A token for `SUB` with this `exp`, signed by the server's embedded issuer (the peer
/// gets the same tokens and only reads `exp`).
fn token(srv: &Server, iat: u64, exp: u64) -> String {
    let iss = srv.issuer().expect("embedded issuer");
    let claims = json!({"iss": iss.issuer(), "sub": SUB, "aud": "tickgate", "iat": iat, "exp": exp,
        "jti": format!("bench-{exp}"), "scope": "md:read:*", "client_id": SUB});
    iss.sign_raw("at+jwt", &claims).expect("sign")
}

fn exp_of(token: &str) -> Option<u64> {
    use base64::Engine as _;
    let claims = token.split('.').nth(1)?;
    let v: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).ok()?).ok()?;
    v["exp"].as_u64()
}

/// The peer: per connection, a `sleep_until` armed by `refresh` for the token's `exp`,
/// then close 4001.
async fn peer_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let cb =
                    |_req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                     mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                        resp.headers_mut().insert("sec-websocket-protocol", "tickgate.v1".parse().expect("header"));
                        Ok(resp)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else { return };
                let timer = tokio::time::sleep(Duration::ZERO);
                tokio::pin!(timer);
                let mut armed = false;
                loop {
                    tokio::select! {
                        m = ws.next() => match m {
                            Some(Ok(Message::Text(t))) => {
                                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else { continue };
                                if v["op"] != "refresh" {
                                    continue;
                                }
                                let Some(exp) = v["token"].as_str().and_then(exp_of) else { continue };
                                let wait = (exp * 1_000_000_000).saturating_sub(now_ns());
                                timer.as_mut().reset(tokio::time::Instant::now() + Duration::from_nanos(wait));
                                armed = true;
                                let reply = json!({"type": "refreshed", "id": v["id"], "exp": exp, "feeds": []});
                                if ws.send(Message::text(reply.to_string())).await.is_err() {
                                    return;
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => return,
                        },
                        _ = &mut timer, if armed => {
                            armed = false;
                            let frame = CloseFrame { code: CloseCode::from(4001), reason: "token expired".into() };
                            let _ = ws.close(Some(frame)).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Opens `n` connections to `url` with `long` (subscribing each to one instrument), then
/// refreshes connection i to `tokens[i % S]` and waits for every close.
async fn population(url: &str, long: &str, tokens: &[(u64, String)], n: usize) -> Vec<Outcome> {
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (url, long, gate, ready, mut go) =
            (url.to_owned(), long.to_owned(), gate.clone(), ready_tx.clone(), go_rx.clone());
        let (exp, short) = tokens[i % tokens.len()].clone();
        let sym = ["A", "B", "C", "D", "E"][i % 5];
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("gate");
            let mut ws = tickgate_client::connect(&url, &long, &ConnectOptions::default())
                .await
                .expect("connects (raise the open-file limit: ulimit -n 20000)");
            let sub = json!({"op": "subscribe", "id": 1, "feed": "T", "symbols": [sym]});
            ws.send(Message::text(sub.to_string())).await.expect("subscribe");
            drop(permit);
            let _ = ready.send(()).await;
            drop(ready);
            let deadline_ns = exp * 1_000_000_000;
            let mut late_batches = 0u64;
            let mut refreshed = false;
            loop {
                let m = tokio::select! {
                    m = ws.next() => m,
                    // A refused refresh leaves the long token in force: give up, counted
                    // under "not 4001", rather than wait for it.
                    _ = tokio::time::sleep(Duration::from_secs(30)) => return (exp, 0, now_ns(), late_batches),
                    r = go.changed(), if !refreshed => {
                        if r.is_ok() && *go.borrow() {
                            refreshed = true;
                            let msg = json!({"op": "refresh", "id": 2, "token": short});
                            ws.send(Message::text(msg.to_string())).await.expect("refresh");
                        }
                        continue;
                    }
                };
                match m {
                    Some(Ok(Message::Binary(b))) if b.len() >= 16 => {
                        let send_ts = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
                        late_batches += u64::from(send_ts > deadline_ns);
                    }
                    Some(Ok(Message::Close(f))) => {
                        let at = now_ns();
                        return (exp, f.map(|f| u16::from(f.code)).unwrap_or(1005), at, late_batches);
                    }
                    Some(Ok(Message::Text(t))) if t.as_str().contains("\"type\":\"error\"") => {
                        return (exp, 0, now_ns(), late_batches);
                    }
                    Some(Ok(_)) => {}
                    _ => return (exp, 1006, now_ns(), late_batches),
                }
            }
        }));
    }
    drop(ready_tx);
    while ready_rx.recv().await.is_some() {}
    go_tx.send(true).expect("go");
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("connection task"));
    }
    out
}

#[derive(Clone, Copy)]
struct Stats {
    median: f64,
    p99: f64,
    max: f64,
    min: f64,
    within_250: f64,
    late_batches: u64,
    not_4001: usize,
}

fn stats(outcomes: &[Outcome]) -> Stats {
    let mut late: Vec<f64> =
        outcomes.iter().map(|&(exp, _, at, _)| (at as f64 - (exp * 1_000_000_000) as f64) / 1e6).collect();
    late.sort_by(|a, b| a.total_cmp(b));
    let n = late.len();
    Stats {
        median: late[n / 2],
        p99: late[(n * 99 / 100).min(n - 1)],
        max: late[n - 1],
        min: late[0],
        within_250: late.iter().filter(|&&l| l <= 250.0).count() as f64 / n as f64,
        late_batches: outcomes.iter().map(|o| o.3).sum(),
        not_4001: outcomes.iter().filter(|o| o.1 != 4001).count(),
    }
}

/// One measured run against `url`: tokens for S whole seconds starting `lead` seconds
/// from now, minted once the caller's population is about to open.
async fn run(name: &str, url: &str, srv: &Server, n: usize, seconds: u64, lead: u64) -> Stats {
    let now = now_ns() / 1_000_000_000;
    let long = token(srv, now, now + 300);
    // The short tokens are minted now but only presented once every connection is open;
    // `lead` leaves time for the set-up (the refresh must arrive before its `exp`).
    let first = now + lead;
    let tokens: Vec<(u64, String)> = (0..seconds).map(|k| (first + k, token(srv, now, first + k))).collect();
    let outcomes = population(url, &long, &tokens, n).await;
    let s = stats(&outcomes);
    println!(
        "{{\"bench\":\"expiry\",\"server\":\"{name}\",\"connections\":{n},\"seconds\":{seconds},\
         \"median_ms\":{:.1},\"p99_ms\":{:.1},\"max_ms\":{:.1},\"min_ms\":{:.1},\"within_250ms\":{:.4},\
         \"late_batches\":{},\"not_4001\":{}}}",
        s.median, s.p99, s.max, s.min, s.within_250, s.late_batches, s.not_4001
    );
    s
}

fn median_run(mut runs: Vec<Stats>) -> Stats {
    runs.sort_by(|a, b| a.p99.total_cmp(&b.p99));
    runs[runs.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this without it, and
    // then gets a smoke run (small and quick, same code paths).
    let full = std::env::args().any(|a| a == "--bench");
    let (n, seconds, runs) = if full { (5_000, 3, 3) } else { (50, 1, 1) };
    // Set-up time before the first expiry: 5,000 connections take a few seconds here.
    let lead = if full { 8 } else { 2 };
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("server")
        .enable_all()
        .build()
        .expect("runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("client")
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = server_rt.block_on(tickgate_server(dir.path()));
    let peer = server_rt.block_on(peer_server());
    let url = format!("ws://{}/v1/stream", srv.addr());
    let peer_url = format!("ws://{peer}/v1/stream");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        ours.push(client_rt.block_on(run("tickgate", &url, &srv, n, seconds, lead)));
        theirs.push(client_rt.block_on(run("peer", &peer_url, &srv, n, seconds, lead)));
    }
    let (o, t) = (median_run(ours), median_run(theirs));
    println!("\n{n} connections, exp over {seconds} whole second(s); run with the median p99 of {runs}:\n");
    println!(
        "| close after exp | median ms | p99 ms | max ms | min ms | within 250 ms | batches after exp | not 4001 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, s) in [("tickgate (shard timer wheel)", o), ("peer (sleep_until per connection)", t)] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} % | {} | {} |",
            s.median,
            s.p99,
            s.max,
            s.min,
            s.within_250 * 100.0,
            s.late_batches,
            s.not_4001
        );
    }
    server_rt.block_on(srv.shutdown());
}
