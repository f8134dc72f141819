//! Throttled subscriptions (protocol v1.1) against a real server: `max_rate` on
//! `subscribe`, `throttle` on a live socket, and the connection's `max_bytes_per_s`.
//!
//! Rates are checked as upper bounds over a window measured by the client (a slower
//! machine only sends fewer updates, never more), and every trade an unthrottled reader of
//! the same instruments received must reach the throttled one, or be named by a `gap`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tickgate_client::{Event, Subscriber};
use tickgate_proto::codec::{FLAG_CONFLATED, RTYPE_TRADE};
use tickgate_proto::control::ServerMsg;

/// What a reader saw of instrument-level updates within a window.
#[derive(Debug, Default)]
struct Seen {
    /// Batches that carried the instrument (an update is one batch, or shares one).
    updates: HashMap<u32, u64>,
    trades: HashMap<u32, BTreeSet<u64>>,
    /// Seqs named by `gap`s, per symbol.
    gaps: HashMap<String, Vec<(u64, u64)>>,
    /// Highest seq seen per instrument.
    last: HashMap<u32, u64>,
    conflated: u64,
    quotes: u64,
    bytes: u64,
    records: u64,
}

/// Reads `sub` for `window` (a measurement window, not a synchronisation), checking the
/// delivery contract on every batch.
async fn read_for(sub: &mut Subscriber, window: Duration) -> Seen {
    let mut seen = Seen::default();
    let end = tokio::time::Instant::now() + window;
    loop {
        let ev = match tokio::time::timeout_at(end, sub.next_event()).await {
            Err(_) => return seen,
            Ok(ev) => ev.expect("client"),
        };
        match ev {
            Event::Batch { records, anomalies, .. } => {
                assert!(anomalies.is_empty(), "{anomalies:?}");
                let mut instrs = BTreeSet::new();
                for r in &records {
                    seen.bytes += r.len() as u64;
                    seen.records += 1;
                    instrs.insert(r.instrument_id());
                    seen.last.insert(r.instrument_id(), r.seq());
                    if r.flags() & FLAG_CONFLATED != 0 {
                        seen.conflated += 1;
                    }
                    if r.rtype() == RTYPE_TRADE {
                        seen.trades.entry(r.instrument_id()).or_default().insert(r.seq());
                    } else {
                        seen.quotes += 1;
                    }
                }
                for i in instrs {
                    *seen.updates.entry(i).or_default() += 1;
                }
            }
            Event::Control(ServerMsg::Gap { symbol, from, to, .. }) => {
                seen.gaps.entry(symbol).or_default().push((from, to))
            }
            Event::Control(_) => {}
            Event::Closed { code, reason } => panic!("closed {code} {reason}"),
        }
    }
}

/// The server's T feed: 5 instruments S0..S4, ids 1..5, `rate` ticks/s in all.
async fn server(rate: f64) -> (TestServer, String) {
    let ts = TestServer::start(rate, |_| {}).await;
    let token = ts.token(&["md:read:T"]);
    (ts, token)
}

/// Subscribes to every instrument of T with this JSON added to the `subscribe`.
async fn subscribe(ts: &TestServer, token: &str, extra: serde_json::Value) -> (Subscriber, ServerMsg) {
    let mut sub = ts.subscriber(token).await;
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Welcome { .. }));
    let mut msg = json!({"op": "subscribe", "id": 1, "feed": "T", "symbols": ["*"]});
    msg.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    sub.send_json(&msg).await.unwrap();
    let reply = next_control(&mut sub).await;
    (sub, reply)
}

/// At most `rate` updates per second per instrument, every trade of a live reader's
/// stream delivered (or named by a gap), replaced quotes flagged CONFLATED, and the
/// updates counted in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_sends_at_most_that_many_updates_with_every_trade() {
    let (ts, token) = server(2500.0).await;
    let (mut live, _) = subscribe(&ts, &token, json!({})).await;
    let (mut slow, reply) = subscribe(&ts, &token, json!({"max_rate": 4})).await;
    let ServerMsg::Subscribed { max_rate, instruments, .. } = reply else { panic!("{reply:?}") };
    assert_eq!(max_rate.map(|r| r.0), Some(4.0));
    assert_eq!(instruments.len(), 5);
    let started = Instant::now();
    let (seen_live, seen) =
        tokio::join!(read_for(&mut live, Duration::from_secs(3)), read_for(&mut slow, Duration::from_secs(3)));
    let elapsed = started.elapsed().as_secs_f64();
    // One at once (the first tick after a quiet interval), then one per 250 ms.
    let bound = 1 + (4.0 * (elapsed + 0.5)) as u64;
    for id in 1..=5u32 {
        let n = seen.updates.get(&id).copied().unwrap_or(0);
        assert!(n >= 1 && n <= bound, "instrument {id}: {n} updates in {elapsed:.2} s (at most {bound})");
    }
    // At most one quote per update: the latest.
    assert!(seen.quotes <= 5 * bound, "{} quotes, live {}", seen.quotes, seen_live.quotes);
    assert!(seen.conflated > 0, "quotes were replaced: {seen:?}");
    // Every trade the live reader got, up to where the throttled reader got to, reached
    // the throttled one too (no gap is expected: intervals hold far fewer than 256).
    let mut trades = 0;
    for (id, live_trades) in &seen_live.trades {
        let upto = seen.last.get(id).copied().unwrap_or(0);
        let first = seen.trades.get(id).and_then(|t| t.first().copied()).unwrap_or(u64::MAX);
        for t in live_trades.iter().filter(|&&t| t >= first && t <= upto) {
            assert!(seen.trades[id].contains(t), "instrument {id}: trade {t} missing");
            trades += 1;
        }
    }
    assert!(trades > 10, "compared {trades} trades");
    assert!(seen.gaps.is_empty(), "{:?}", seen.gaps);
    eventually("tickgate_throttle_updates_total", EVENTUALLY, || async {
        (ts.metric("tickgate_throttle_updates_total").await > 0.0
            && ts.metric("tickgate_throttle_replaced_quotes_total").await > 0.0)
            .then_some(())
    })
    .await;
}

/// `throttle` changes a live subscription's rate on the same socket (answered with
/// `throttled`), and 0 lifts it; `max_rate` out of range is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_changes_the_rate_on_a_live_socket() {
    let (ts, token) = server(2500.0).await;
    let (mut sub, _) = subscribe(&ts, &token, json!({})).await;
    sub.send_json(&json!({"op": "throttle", "id": 7, "feed": "T", "symbols": ["S0", "S1"], "max_rate": 2}))
        .await
        .unwrap();
    let r = next_control(&mut sub).await;
    let ServerMsg::Throttled { id, symbols, max_rate, .. } = r else { panic!("{r:?}") };
    assert_eq!((id, symbols, max_rate.map(|r| r.0)), (Some(7), Some(vec!["S0".into(), "S1".into()]), Some(2.0)));
    let started = Instant::now();
    let seen = read_for(&mut sub, Duration::from_secs(2)).await;
    let bound = 2 + (2.0 * (started.elapsed().as_secs_f64() + 0.5)) as u64;
    for id in [1, 2] {
        let n = seen.updates.get(&id).copied().unwrap_or(0);
        assert!(n <= bound, "S{}: {n} updates (at most {bound})", id - 1);
    }
    assert!(seen.updates.get(&3).copied().unwrap_or(0) > bound, "S2 stays live: {seen:?}");
    sub.send_json(&json!({"op": "throttle", "id": 8, "feed": "T", "symbols": ["*"], "max_rate": 0})).await.unwrap();
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Throttled { id: Some(8), .. }));
    let seen = read_for(&mut sub, Duration::from_secs(2)).await;
    assert!(seen.updates.get(&1).copied().unwrap_or(0) > bound, "S0 is live again: {seen:?}");
    sub.send_json(&json!({"op": "throttle", "id": 9, "feed": "T", "symbols": ["S0"], "max_rate": 5000})).await.unwrap();
    let r = next_control(&mut sub).await;
    let ServerMsg::Error { id, code, message } = r else { panic!("{r:?}") };
    assert_eq!((id, code.as_str()), (Some(9), "bad_request"));
    assert!(message.contains("between 0.01 and 1000"), "{message}");
}

/// `max_bytes_per_s` caps what the connection is written, on the same socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_per_s_caps_the_connection() {
    let (ts, token) = server(2500.0).await;
    let (mut sub, _) = subscribe(&ts, &token, json!({})).await;
    const CAP: u64 = 16_384;
    sub.send_json(&json!({"op": "throttle", "id": 3, "max_bytes_per_s": CAP})).await.unwrap();
    let r = next_control(&mut sub).await;
    assert!(matches!(r, ServerMsg::Throttled { id: Some(3), max_bytes_per_s: Some(CAP), .. }), "{r:?}");
    let started = Instant::now();
    let seen = read_for(&mut sub, Duration::from_secs(3)).await;
    let elapsed = started.elapsed().as_secs_f64();
    // The cap over the window, the bucket's burst (a tenth of a second), one batch that
    // overdraws it, and what was in flight when the cap was set.
    let bound = (CAP as f64 * (elapsed + 0.1)) as u64 + 2 * 65_536;
    assert!(seen.bytes > 0 && seen.bytes <= bound, "{} bytes in {elapsed:.2} s (at most {bound})", seen.bytes);
}
