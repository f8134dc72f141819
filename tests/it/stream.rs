//! Streaming behaviour against a real server: wire layout, fan-out, snapshot fence, slow
//! consumers, shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::collections::HashMap;

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tickgate_client::{ConnectOptions, Event, Subscriber};
use tickgate_proto::codec::{FLAG_SNAPSHOT, QUOTE_LEN, RTYPE_QUOTE, RTYPE_TRADE, TRADE_LEN};
use tickgate_proto::control::ServerMsg;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_match_the_spec_byte_for_byte() {
    let ts = TestServer::start(2000.0, |_| {}).await;
    let token = ts.token(&["md:read:T"]);
    // Every batch of this subscription is stamped after this instant.
    let before = tickgate_proto::now_ns();
    let (mut sub, reply) = subscribed(&ts, &token, "T", json!(["*"]), false).await;
    let ServerMsg::Subscribed { instruments, feed, .. } = reply else { panic!("{reply:?}") };
    assert_eq!(feed, "T");
    assert_eq!(instruments.len(), 5);
    let ids: Vec<u32> = instruments.iter().map(|i| i.id).collect();
    let mut checked = 0;
    while checked < 200 {
        let msg = tokio::time::timeout(EVENTUALLY, sub.ws_mut().next())
            .await
            .expect("data in time")
            .expect("open")
            .expect("ok");
        let Message::Binary(b) = msg else { continue };
        assert_eq!(b[0], 1, "version");
        assert_eq!(b[1], 0, "batch flags reserved");
        let count = u16::from_le_bytes([b[2], b[3]]) as usize;
        assert!(count >= 1);
        assert_eq!(&b[4..8], &[0, 0, 0, 0], "reserved u32");
        let send_ts = u64::from_le_bytes(b[8..16].try_into().unwrap());
        assert!(send_ts >= before && send_ts <= tickgate_proto::now_ns());
        let mut at = 16;
        for _ in 0..count {
            let len = b[at] as usize;
            assert_eq!(len % 8, 0);
            let rtype = b[at + 1];
            match rtype {
                RTYPE_TRADE => {
                    assert_eq!(len, TRADE_LEN);
                    assert!(matches!(b[at + 48], 1 | 2), "side");
                    assert_eq!(b[at + 49], 0, "flags");
                    assert_eq!(&b[at + 50..at + 56], &[0; 6]);
                }
                RTYPE_QUOTE => {
                    assert_eq!(len, QUOTE_LEN);
                    let bid = i64::from_le_bytes(b[at + 32..at + 40].try_into().unwrap());
                    let ask = i64::from_le_bytes(b[at + 48..at + 56].try_into().unwrap());
                    assert!(bid < ask && bid > 0, "bid {bid} ask {ask}");
                    assert_eq!(b[at + 64], 0, "flags");
                    assert_eq!(&b[at + 65..at + 72], &[0; 7]);
                }
                other => panic!("unknown rtype {other}"),
            }
            assert_eq!(u16::from_le_bytes([b[at + 2], b[at + 3]]), 1, "feed id");
            let iid = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap());
            assert!(ids.contains(&iid), "instrument id {iid}");
            let seq = u64::from_le_bytes(b[at + 8..at + 16].try_into().unwrap());
            assert!(seq >= 1);
            let ev = i64::from_le_bytes(b[at + 16..at + 24].try_into().unwrap());
            let rv = i64::from_le_bytes(b[at + 24..at + 32].try_into().unwrap());
            assert!(ev > 0 && rv > 0 && rv as u64 <= send_ts);
            at += len;
            checked += 1;
        }
        assert_eq!(at, b.len(), "records fill the message exactly");
    }
    ts.shutdown().await;
}

/// 1,000 subscribers of the same instruments receive identical, gap-free sequences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_subscribers_get_identical_gap_free_streams() {
    let _alone = exclusive().await;
    const N: usize = 1000;
    let ts = TestServer::start(400.0, |_| {}).await;
    let token = ts.token(&["md:read:T"]);
    let url = ts.url.clone();
    // Each subscriber starts reading as soon as it is subscribed (a client that does not
    // read cannot answer heartbeats) and collects (instrument, seq) -> bytes until it holds,
    // for every instrument, the seq `target` names: set once all are subscribed, 100 past
    // the seqs then current, so every subscriber holds those 300 records, however slow
    // the machine.
    let stop = tokio::time::Instant::now() + 2 * EVENTUALLY;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(N);
    let (target_tx, target_rx) = tokio::sync::watch::channel::<Option<HashMap<u32, u64>>>(None);
    let mut tasks = Vec::new();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    for _ in 0..N {
        let (url, token, ready, target, gate) =
            (url.clone(), token.clone(), ready_tx.clone(), target_rx.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let mut sub = Subscriber::connect(&url, &token, &ConnectOptions::default()).await.unwrap();
            sub.send_json(&json!({"op":"subscribe","feed":"T","symbols":["S0","S1","S2"]})).await.unwrap();
            let mut seen: HashMap<(u32, u64), Vec<u8>> = HashMap::new();
            let mut last: HashMap<u32, u64> = HashMap::new();
            let mut anomalies = 0;
            let mut announced = false;
            let mut permit = Some(permit);
            loop {
                let reached = target
                    .borrow()
                    .as_ref()
                    .is_some_and(|t| t.iter().all(|(id, want)| last.get(id).is_some_and(|got| got >= want)));
                if reached {
                    break;
                }
                let ev = tokio::select! {
                    _ = tokio::time::sleep_until(stop) => panic!("never reached the target seqs"),
                    ev = sub.next_event() => ev.unwrap(),
                };
                match ev {
                    Event::Batch { records, anomalies: a, .. } => {
                        anomalies += a.len();
                        for r in records {
                            last.insert(r.instrument_id(), r.seq());
                            seen.insert((r.instrument_id(), r.seq()), r.as_bytes().to_vec());
                        }
                    }
                    Event::Control(ServerMsg::Subscribed { .. }) if !announced => {
                        announced = true;
                        permit.take();
                        ready.send(()).await.unwrap();
                    }
                    Event::Control(ServerMsg::Welcome { .. }) => {}
                    Event::Control(m) => panic!("unexpected {m:?}"),
                    Event::Closed { code, .. } => panic!("closed {code}"),
                }
            }
            sub.close().await;
            (seen, anomalies)
        }));
    }
    drop(ready_tx);
    for _ in 0..N {
        ready_rx.recv().await.expect("every subscriber subscribes");
    }
    // The current seqs, from a `subscribed` reply made after every subscriber's.
    let (probe, reply) = subscribed(&ts, &token, "T", json!(["S0", "S1", "S2"]), false).await;
    probe.close().await;
    let ServerMsg::Subscribed { instruments, .. } = reply else { panic!("{reply:?}") };
    target_tx.send_replace(Some(instruments.iter().map(|i| (i.id, i.seq + 100)).collect()));
    let mut all = Vec::new();
    for t in tasks {
        let (seen, anomalies) = t.await.unwrap();
        assert_eq!(anomalies, 0, "a subscriber saw a gap or duplicate");
        all.push(seen);
    }
    // Every record two subscribers both hold is byte-identical, and the windows overlap.
    let reference = &all[N - 1];
    assert!(reference.len() > 100, "too few records: {}", reference.len());
    let mut compared = 0;
    for other in &all[..N - 1] {
        for (k, v) in other {
            if let Some(r) = reference.get(k) {
                assert_eq!(r, v, "record {k:?} differs between subscribers");
                compared += 1;
            }
        }
    }
    assert!(compared >= (N - 1) * 300, "windows barely overlap: {compared}");
    ts.shutdown().await;
}

/// Subscribing with a snapshot while the feed runs at full rate: snapshot records first,
/// then live at exactly subscribed.seq + 1, no duplicate and no hole, many times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_fence_holds_at_full_rate() {
    let ts = TestServer::start(20_000.0, |_| {}).await;
    let token = ts.token(&["md:read:T"]);
    let mut workers = Vec::new();
    for w in 0..4 {
        let url = ts.url.clone();
        let token = token.clone();
        workers.push(tokio::spawn(async move {
            let mut sub = Subscriber::connect(&url, &token, &ConnectOptions::default()).await.unwrap();
            let _welcome = next_control(&mut sub).await;
            for round in 0..25 {
                sub.send_json(&json!({"op":"subscribe","id": round,"feed":"T","symbols":["*"],"snapshot":true}))
                    .await
                    .unwrap();
                let ServerMsg::Subscribed { instruments, .. } = next_control(&mut sub).await else {
                    panic!("expected subscribed")
                };
                let sub_seq: HashMap<u32, u64> = instruments.iter().map(|i| (i.id, i.seq)).collect();
                let mut first_live: HashMap<u32, u64> = HashMap::new();
                let mut snap_done = false;
                let mut snapshots = 0;
                // Read until every instrument has shown its first live record.
                while first_live.len() < sub_seq.len() {
                    match tokio::time::timeout(EVENTUALLY, sub.next_event()).await.unwrap().unwrap() {
                        Event::Batch { records, anomalies, .. } => {
                            assert!(anomalies.is_empty(), "worker {w} round {round}: {anomalies:?}");
                            for r in records {
                                let id = r.instrument_id();
                                if r.flags() & FLAG_SNAPSHOT != 0 {
                                    assert!(!snap_done, "snapshot record after live data");
                                    assert!(r.seq() <= sub_seq[&id]);
                                    snapshots += 1;
                                } else {
                                    snap_done = true;
                                    first_live.entry(id).or_insert_with(|| {
                                        assert_eq!(r.seq(), sub_seq[&id] + 1, "live continues at the next seq");
                                        r.seq()
                                    });
                                }
                            }
                        }
                        Event::Control(m) => panic!("unexpected {m:?}"),
                        Event::Closed { code, .. } => panic!("closed {code}"),
                    }
                }
                // Every instrument that has published something has a snapshot (on a
                // machine slow enough, the first round may come before some have).
                let published = sub_seq.values().filter(|s| **s > 0).count();
                assert!(snapshots >= published, "one snapshot record per published instrument at least");
                sub.send_json(&json!({"op":"unsubscribe","id": 1000 + round,"feed":"T","symbols":["*"]}))
                    .await
                    .unwrap();
                match next_control(&mut sub).await {
                    ServerMsg::Unsubscribed { symbols, reason, .. } => {
                        assert_eq!(symbols.len(), 5);
                        assert_eq!(reason, "request");
                    }
                    m => panic!("expected unsubscribed, got {m:?}"),
                }
            }
            sub.close().await;
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    ts.shutdown().await;
}

/// Reads `sub` in the background until `stop` fires and 10,000 records came; gives back the
/// subscriber and what `read_until_cancelled` saw.
fn read_in_background(
    mut sub: Subscriber,
    stop: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<(Subscriber, (u64, usize))> {
    let stop = stop.clone();
    tokio::spawn(async move {
        let r = read_until_cancelled(&mut sub, &stop, 10_000).await;
        (sub, r)
    })
}

/// A client that stops reading is closed with 4008; the others keep a gap-free stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_is_closed_4008_and_others_are_untouched() {
    // The budget leaves the healthy client most of a second of slack, so a busy machine
    // does not make it the slow one; the stalled one overflows it within about a second.
    let ts = TestServer::start(20_000.0, |c| {
        c.limits.max_outbound_bytes = 1 << 20;
        c.server.send_buffer_bytes = 16_384;
    })
    .await;
    let token = ts.token(&["md:read:T"]);
    let (healthy, _) = subscribed(&ts, &token, "T", json!(["*"]), false).await;
    // The healthy one reads throughout: until the stalled one is gone, and 10,000 records.
    let slow_gone = tokio_util::sync::CancellationToken::new();
    let healthy_task = read_in_background(healthy, &slow_gone);
    let opts = ConnectOptions { recv_buffer: Some(4096), ..ConnectOptions::default() };
    let mut slow = Subscriber::connect(&ts.url, &token, &opts).await.unwrap();
    slow.send_json(&json!({"op":"subscribe","feed":"T","symbols":["*"]})).await.unwrap();
    // Not reading until the server has given up on it (reading would drain the socket).
    ts.wait_metric("tickgate_slow_consumer_events_total{action=\"disconnect\"}", 1.0).await;
    let code = wait_close(&mut slow, EVENTUALLY).await;
    assert_eq!(code, 4008);
    slow_gone.cancel();
    let (mut healthy, (_, anomalies)) = healthy_task.await.unwrap();
    assert_eq!(anomalies, 0, "the healthy client saw a gap");
    // And it still streams after the slow one is gone.
    let (_, anomalies) = read_records(&mut healthy, 100).await;
    assert_eq!(anomalies, 0);
    assert_eq!(ts.wait_metric("tickgate_slow_consumer_events_total{action=\"disconnect\"}", 1.0).await, 1.0);
    assert_eq!(ts.wait_metric("tickgate_closes_total{code=\"4008\"}", 1.0).await, 1.0);
    ts.shutdown().await;
}

/// The server-wide outbound budget: four stalled readers, none over its own budget, are
/// together over the server's; the largest backlogs are closed with 4008 (counted as budget
/// sheds), and a reader that keeps up is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_wide_budget_sheds_the_largest_backlogs() {
    let ts = TestServer::start(20_000.0, |c| {
        c.limits.max_outbound_bytes = 1 << 20;
        c.limits.max_outbound_total_bytes = 1 << 20;
        c.server.send_buffer_bytes = 16_384;
    })
    .await;
    assert_eq!(ts.metric("tickgate_outbound_budget_bytes").await, (1 << 20) as f64);
    let token = ts.token(&["md:read:T"]);
    let (healthy, _) = subscribed(&ts, &token, "T", json!(["*"]), false).await;
    let slow_gone = tokio_util::sync::CancellationToken::new();
    let healthy_task = read_in_background(healthy, &slow_gone);
    let opts = ConnectOptions { recv_buffer: Some(4096), ..ConnectOptions::default() };
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = Subscriber::connect(&ts.url, &token, &opts).await.unwrap();
        s.send_json(&json!({"op":"subscribe","feed":"T","symbols":["*"]})).await.unwrap();
        stalled.push(s);
    }
    // Not reading any of them until the server has given up on all four (reading one would
    // drain it, and a reader that keeps up is not shed): their backlogs keep growing, so
    // each time the total passes the budget the largest go.
    ts.wait_metric("tickgate_slow_consumer_events_total{action=\"disconnect\"}", 4.0).await;
    let mut codes = Vec::new();
    for s in &mut stalled {
        codes.push(wait_close(s, EVENTUALLY).await);
    }
    assert!(codes.iter().all(|&c| c == 4008), "{codes:?}");
    slow_gone.cancel();
    let (mut healthy, (_, anomalies)) = healthy_task.await.unwrap();
    assert_eq!(anomalies, 0, "the reader that keeps up saw a gap");
    let (_, anomalies) = read_records(&mut healthy, 100).await;
    assert_eq!(anomalies, 0);
    assert!(ts.metric("tickgate_outbound_budget_sheds_total{action=\"disconnect\"}").await >= 1.0);
    ts.shutdown().await;
}

/// Shutdown sends `shutdown` then close 1001 to every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reaches_every_client() {
    let ts = TestServer::start(1000.0, |c| {
        c.server.reconnect_after_max_ms = 3000;
        // Far beyond the bound below: shutdown must end because the clients answered.
        c.server.drain_ms = 120_000;
    })
    .await;
    let token = ts.token(&["md:read:*"]);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (mut sub, _) = subscribed(&ts, &token, "T", json!(["S1"]), true).await;
        tasks.push(tokio::spawn(async move {
            let mut got_shutdown = None;
            loop {
                match tokio::time::timeout(EVENTUALLY, sub.next_event()).await.unwrap().unwrap() {
                    Event::Control(ServerMsg::Shutdown { reconnect_after_ms }) => {
                        got_shutdown = Some(reconnect_after_ms)
                    }
                    Event::Control(_) => {}
                    Event::Batch { anomalies, .. } => {
                        assert!(anomalies.is_empty());
                        assert!(got_shutdown.is_none(), "data after the shutdown message");
                    }
                    Event::Closed { code, .. } => return (got_shutdown, code),
                }
            }
        }));
    }
    eventually("50 open connections", EVENTUALLY, || async { (ts.server().connections() == 50).then_some(()) }).await;
    let started = std::time::Instant::now();
    ts.shutdown().await;
    // The clients answer the close, so shutdown does not wait out the 120 s drain.
    assert!(started.elapsed() < 2 * EVENTUALLY, "shutdown waited for the drain timeout");
    for t in tasks {
        let (shutdown, code) = t.await.unwrap();
        let after = shutdown.expect("shutdown message before the close");
        assert!((1000..=3000).contains(&after), "reconnect_after_ms {after}");
        assert_eq!(code, 1001);
    }
}

/// The browser path: the token in the `bearer.` subprotocol, only `tickgate.v1` echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_subprotocol_is_accepted_and_not_echoed() {
    let ts = TestServer::start(500.0, |_| {}).await;
    let token = ts.token(&["md:read:T"]);
    let mut sub = Subscriber::connect(&ts.url, &token, &placement_subprotocol()).await.unwrap();
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Welcome { .. }));
    // Check the response header on a raw handshake too.
    let proto = format!("tickgate.v1, bearer.{token}");
    let (status, _, _) = handshake_status(&ts, "", &[("sec-websocket-protocol", &proto)]).await;
    assert_eq!(status, 101);
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = ts.url.as_str().into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", proto.parse().unwrap());
    let (_ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "tickgate.v1");
    ts.shutdown().await;
}

/// The connection's log lines show the peer as an address (not `Some(..)`) and the duration
/// in seconds to the millisecond (not `5.9956246570000005`), as an operator reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_logs_show_the_peer_and_whole_milliseconds() {
    let logs = common::logs::capture();
    let ts = TestServer::start(100.0, |_| {}).await;
    let mut sub = ts.subscriber(&ts.token(&["md:read:T"])).await;
    let ServerMsg::Welcome { session, .. } = next_control(&mut sub).await else { panic!("no welcome first") };
    sub.close().await;
    let line = |what: &'static str| {
        let logs = &logs;
        let session = session.clone();
        move || {
            let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
            let found = text.lines().find(|l| l.contains(what) && l.contains(&format!("session={session}")));
            std::future::ready(found.map(str::to_owned))
        }
    };
    let opened = eventually("the stream opened line", EVENTUALLY, line("stream opened")).await;
    let closed = eventually("the stream closed line", EVENTUALLY, line("stream closed")).await;
    assert!(opened.contains("peer=127.0.0.1:") && !opened.contains("Some("), "{opened}");
    let duration = closed.split("duration_s=").nth(1).and_then(|r| r.split(' ').next()).expect("a duration_s field");
    let decimals = duration.split('.').nth(1).map_or(0, str::len);
    assert!(duration.parse::<f64>().is_ok() && decimals <= 3, "duration_s={duration} in {closed}");
    ts.shutdown().await;
}
