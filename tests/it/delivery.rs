//! Feeds and delivery guarantees over real sockets: publish ingest (and its refusals),
//! resume after a killed client, conflation for a slow reader, epochs, the shipped
//! recording replayed record for record, heartbeats, `subscribe --resume-file`, and the
//! write delay (`engine.write_delay_us`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tickgate_client::publisher::{publish_url, Publisher};
use tickgate_client::{ClientError, ConnectOptions, Event, Subscriber};
use tickgate_proto::codec::{encode_batch, Body, Quote, Record, Trade, BATCH_HEADER_LEN, FLAG_CONFLATED, FLAG_REPLAY};
use tickgate_proto::control::ServerMsg;
use tickgate_proto::recording::Reader;
use tokio_tungstenite::tungstenite::Message;

fn trade(feed_id: u16, instr: u32, seq: u64, price: i64) -> Record {
    Record::encode(feed_id, instr, seq, price, 0, &Body::Trade(Trade { price, size: 100, side: 1 }), 0)
}

fn quote(feed_id: u16, instr: u32, seq: u64, px: i64) -> Record {
    Record::encode(
        feed_id,
        instr,
        seq,
        px,
        0,
        &Body::Quote(Quote { bid_px: px, bid_sz: 1, ask_px: px + 1, ask_sz: 1 }),
        0,
    )
}

async fn publisher(ts: &TestServer, feed: &str, token: &str, epoch: Option<u64>) -> Result<Publisher, ClientError> {
    Publisher::connect(&publish_url(&ts.url, feed, epoch), token, &ConnectOptions::default()).await
}

/// The HTTP status and JSON body of a refused publish handshake.
async fn refused(ts: &TestServer, feed_query: &str, token: &str) -> (u16, Value) {
    let (s, b) = publish_handshake(ts, feed_query, token).await;
    assert_ne!(s, 101, "publish handshake for {feed_query} was accepted");
    (s, b)
}

/// Reads a subscriber until `done` says every instrument reached its target, returning
/// every record (anomalies fail the test).
async fn read_until(sub: &mut Subscriber, mut done: impl FnMut(&Subscriber) -> bool) -> (Vec<Record>, Vec<ServerMsg>) {
    let (mut recs, mut msgs) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while !done(sub) {
        match tokio::time::timeout_at(deadline, sub.next_event()).await.expect("in time").unwrap() {
            Event::Batch { records, anomalies, .. } => {
                assert!(anomalies.is_empty(), "{anomalies:?}");
                recs.extend(records);
            }
            Event::Control(m) => msgs.push(m),
            Event::Closed { code, reason } => panic!("closed {code} {reason}"),
        }
    }
    (recs, msgs)
}

fn reached(sub: &Subscriber, feed: &str, last: &HashMap<String, u64>) -> bool {
    let seen: HashMap<String, u64> =
        sub.tracker.last_seen().into_iter().filter(|(f, _, _)| f == feed).map(|(_, s, n)| (s, n)).collect();
    last.iter().all(|(s, n)| seen.get(s).is_some_and(|v| v >= n))
}

#[tokio::test]
async fn publisher_handshake_and_batch_errors_are_precise_and_counted() {
    let ts =
        TestServer::start_with_feeds(50.0, &[("p.toml", publish_toml("P", 9, 3, "disconnect", 1000))], |_| {}).await;
    let read_only = ts.token(&["md:read:*"]);
    let publish = ts.token(&["md:publish:P", "md:publish:T"]);

    // Handshake refusals, each with its status and error.
    let (s, b) = refused(&ts, "?feed=P", &read_only).await;
    assert_eq!((s, b["error"].as_str()), (403, Some("insufficient_scope")), "{b}");
    let (s, b) = refused(&ts, "?feed=T", &publish).await;
    assert_eq!((s, b["error"].as_str()), (409, Some("not_publishable")), "{b}");
    let (s, b) = refused(&ts, "?feed=NOPE", &publish).await;
    assert_eq!((s, b["error"].as_str()), (404, Some("unknown_feed")), "{b}");
    let (s, b) = refused(&ts, "", &publish).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_request")), "{b}");
    let (s, b) = refused(&ts, "?feed=P&epoch=x", &publish).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_request")), "{b}");
    let (s, b) = refused(&ts, "?feed=P", &forge_signature(&publish)).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("invalid_token")), "{b}");

    let (mut sub, _) = subscribed(&ts, &read_only, "P", json!(["*"]), false).await;
    let mut p = publisher(&ts, "P", &publish, None).await.expect("publisher connects");
    let (s, b) = refused(&ts, "?feed=P", &publish).await;
    assert_eq!((s, b["error"].as_str()), (409, Some("publisher_active")), "one publisher per feed: {b}");

    p.send(&[trade(9, 1, 0, 1), trade(9, 2, 0, 2), trade(9, 1, 5, 3)]).await.unwrap();
    assert!(p.sync().await.unwrap().is_empty(), "a good batch is acknowledged without error");

    // Each malformation: refused whole, named, counted; nothing of the batch reaches anyone.
    let good = trade(9, 3, 0, 99);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let batch = |recs: &[Record]| {
        let mut b = Vec::new();
        encode_batch(recs, 0, &mut b);
        b
    };
    let mut bad_len = batch(&[good, good]);
    bad_len[BATCH_HEADER_LEN + 56] = 48;
    cases.push(("bad_length", bad_len));
    let mut bad_type = batch(&[good]);
    bad_type[BATCH_HEADER_LEN + 1] = 9;
    cases.push(("unknown_rtype", bad_type));
    cases.push(("wrong_feed", batch(&[good, trade(1, 1, 0, 4)])));
    cases.push(("seq_backwards", batch(&[good, trade(9, 1, 4, 5)])));
    cases.push(("unknown_instrument", batch(&[trade(9, 4, 0, 6)])));
    cases.push(("malformed_batch", batch(&[good])[..40].to_vec()));
    for (reason, bytes) in cases {
        p.send_raw(bytes).await.unwrap();
        let msgs = p.sync().await.unwrap();
        match msgs.as_slice() {
            [ServerMsg::Error { code, message, .. }] => {
                assert_eq!(code.as_str(), "bad_record");
                assert!(message.starts_with(reason), "{reason}: {message}");
            }
            other => panic!("{reason}: expected one error, got {other:?}"),
        }
        assert_eq!(ts.wait_metric(&format!("tickgate_publish_rejects_total{{reason=\"{reason}\"}}"), 1.0).await, 1.0);
    }
    // The publisher is still in business, and the subscriber saw exactly the good records
    // (seq 1, then 5 after a source gap named 2..=4, and instrument 2's seq 1), in order.
    p.send(&[trade(9, 1, 0, 7)]).await.unwrap();
    p.sync().await.unwrap();
    let (recs, msgs) =
        read_until(&mut sub, |s| reached(s, "P", &HashMap::from([("S0".into(), 6), ("S1".into(), 1)]))).await;
    let got: Vec<(u32, u64, i64)> = recs.iter().map(|r| (r.instrument_id(), r.seq(), r.ts_event_ns())).collect();
    assert_eq!(got, vec![(1, 1, 1), (2, 1, 2), (1, 5, 3), (1, 6, 7)]);
    assert!(
        msgs.iter().any(|m| matches!(m, ServerMsg::Gap { from: 2, to: 4, reason, .. } if reason == "source_gap")),
        "{msgs:?}"
    );
    p.close().await;
    ts.shutdown().await;
}

#[tokio::test]
async fn a_killed_client_resumes_with_no_duplicate_and_no_hole() {
    let ts =
        TestServer::start_with_feeds(50.0, &[("p.toml", publish_toml("P", 9, 3, "disconnect", 100_000))], |_| {}).await;
    let publish = ts.token(&["md:publish:P"]);
    let read = ts.token(&["md:read:P"]);
    let mut p = publisher(&ts, "P", &publish, None).await.unwrap();
    // Session 1 is there from the start.
    let (mut s1, _) = subscribed(&ts, &read, "P", json!(["*"]), false).await;

    // The publisher: 3000 records over ~1.5 s; the server assigns seqs, so the expected
    // sequence per instrument is known here: seq k of instrument i has price 1000*i + k.
    let total = 3000u64;
    let pubtask = tokio::spawn(async move {
        let mut seq = [0u64; 3];
        for b in 0..(total / 30) {
            let recs: Vec<Record> = (0..30)
                .map(|k| {
                    let i = ((b * 30 + k) * 7 % 3) as usize;
                    seq[i] += 1;
                    let price = 1_000_000 * (i as i64 + 1) + seq[i] as i64;
                    if k % 4 == 0 {
                        trade(9, i as u32 + 1, 0, price)
                    } else {
                        quote(9, i as u32 + 1, 0, price)
                    }
                })
                .collect();
            p.send(&recs).await.unwrap();
            // Pacing, not synchronisation: the publication spans session 1's life, its
            // death and session 2's resume.
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        assert!(p.sync().await.unwrap().is_empty());
        seq
    });

    // Session 1: read a part, then die without a close.
    let mut first = Vec::new();
    while first.len() < 600 {
        if let Event::Batch { records, anomalies, .. } = s1.next_event().await.unwrap() {
            assert!(anomalies.is_empty());
            first.extend(records);
        }
    }
    let last_seen: BTreeMap<String, u64> = s1.tracker.last_seen().into_iter().map(|(_, s, n)| (s, n)).collect();
    let epoch = s1.tracker.epoch("P");
    drop(s1);
    // Session 2 comes after more has been published than session 1 saw (a gap for the
    // resume to fill), however fast or slow the publisher runs.
    let want = (first.len() as f64 + 300.0).min(total as f64);
    ts.wait_metric("tickgate_ticks_ingested_total{feed=\"P\"}", want).await;

    // Session 2 resumes from what session 1 saw.
    let mut s2 = ts.subscriber(&read).await;
    s2.subscribe(1, "P", &["*"], false, Some((epoch, last_seen))).await.unwrap();
    let finals = pubtask.await.unwrap();
    let want: HashMap<String, u64> = (0..3).map(|i| (format!("S{i}"), finals[i])).collect();
    let (second, _) = read_until(&mut s2, |s| reached(s, "P", &want)).await;
    assert!(second.iter().any(|r| r.flags() & FLAG_REPLAY != 0), "the missed part came from the resume buffer");

    // The union is exactly the published sequence: every seq once, with its own body.
    let mut per: HashMap<u32, Vec<(u64, i64)>> = HashMap::new();
    for r in first.iter().chain(second.iter()) {
        let price = match r.body() {
            Body::Trade(t) => t.price,
            Body::Quote(q) => q.bid_px,
        };
        per.entry(r.instrument_id()).or_default().push((r.seq(), price));
    }
    for i in 0..3u32 {
        let got = &per[&(i + 1)];
        let expect: Vec<(u64, i64)> =
            (1..=finals[i as usize]).map(|k| (k, 1_000_000 * (i as i64 + 1) + k as i64)).collect();
        let first_diff = got.iter().zip(&expect).position(|(a, b)| a != b);
        assert!(
            got.len() == expect.len() && first_diff.is_none(),
            "instrument {i}: {} records for {} published; first difference at {first_diff:?}: {:?}",
            got.len(),
            expect.len(),
            first_diff
                .map(|k| (&got[k.saturating_sub(2)..(k + 3).min(got.len())], &expect[k.saturating_sub(2)..k + 3]))
        );
    }
    assert!(ts.wait_metric("tickgate_resumes_total{result=\"replayed\"}", 1.0).await >= 1.0);
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_under_conflate_gets_latest_quotes_and_explicit_gaps() {
    let ts = TestServer::start_with_feeds(50.0, &[("p.toml", publish_toml("P", 9, 2, "conflate", 1000))], |c| {
        c.limits.max_outbound_bytes = 65_536;
        c.server.send_buffer_bytes = 4096;
    })
    .await;
    let publish = ts.token(&["md:publish:P"]);
    let read = ts.token(&["md:read:P"]);
    let (mut fast, _) = subscribed(&ts, &read, "P", json!(["*"]), false).await;
    let slow_opts = ConnectOptions { recv_buffer: Some(4096), ..ConnectOptions::default() };
    let mut slow = Subscriber::connect(&ts.url, &read, &slow_opts).await.unwrap();
    slow.subscribe(1, "P", &["*"], false, None).await.unwrap();
    // Let the subscription land, then stop reading the slow one.
    let _ = next_control(&mut slow).await;
    let _ = next_control(&mut slow).await;

    let total = 20_000u64;
    let mut published: HashMap<(u32, u64), Record> = HashMap::new();
    let mut seq = [0u64; 2];
    let fast_task = tokio::spawn(async move {
        let want: HashMap<String, u64> = HashMap::from([("S0".into(), total / 2), ("S1".into(), total / 2)]);
        let (recs, msgs) = read_until(&mut fast, |s| reached(s, "P", &want)).await;
        (recs.len() as u64, msgs.iter().filter(|m| matches!(m, ServerMsg::Gap { .. })).count(), fast.tracker.conflated)
    });
    let mut p = publisher(&ts, "P", &publish, None).await.unwrap();
    // Paced (50 records every 2 ms) so the client that keeps up does; the slow one
    // stops reading entirely.
    for b in 0..(total / 50) {
        let recs: Vec<Record> = (0..50)
            .map(|k| {
                let i = (k % 2) as usize;
                seq[i] += 1;
                let r = if (b * 50 + k) % 5 == 0 {
                    trade(9, i as u32 + 1, seq[i], seq[i] as i64)
                } else {
                    quote(9, i as u32 + 1, seq[i], seq[i] as i64)
                };
                published.insert((i as u32 + 1, seq[i]), r);
                r
            })
            .collect();
        p.send(&recs).await.unwrap();
        // Pacing, not synchronisation: a rate the client that reads keeps up with.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(p.sync().await.unwrap().is_empty());

    // The client that keeps up got everything, at full rate, without a gap.
    let (n, gaps, conflated) = fast_task.await.unwrap();
    assert_eq!((n, gaps, conflated), (total, 0, 0));
    assert!(ts.wait_metric("tickgate_slow_consumer_events_total{action=\"conflate\"}", 1.0).await >= 1.0);

    // The slow one catches up: no silent hole (the tracker checks), gaps for trades,
    // CONFLATED quotes that are the real latest quotes, and it ends at the last seq.
    let want: HashMap<String, u64> = HashMap::from([("S0".into(), seq[0]), ("S1".into(), seq[1])]);
    let (recs, msgs) = read_until(&mut slow, |s| reached(s, "P", &want)).await;
    let slow_gaps =
        msgs.iter().filter(|m| matches!(m, ServerMsg::Gap { reason, .. } if reason == "slow_consumer")).count();
    assert!(slow_gaps > 0, "dropped trades are named by gaps");
    assert!(slow.tracker.conflated > 0, "quotes were conflated");
    assert!((recs.len() as u64) < total, "the slow reader did not get everything one by one");
    for r in recs.iter().filter(|r| r.flags() & FLAG_CONFLATED != 0) {
        let orig = published[&(r.instrument_id(), r.seq())];
        assert_eq!(r.body(), orig.body(), "a conflated quote is the published one");
    }
    // Back to full rate: after catching up, new records arrive one by one.
    p.send(&[quote(9, 1, seq[0] + 1, 1), quote(9, 1, seq[0] + 2, 2)]).await.unwrap();
    p.sync().await.unwrap();
    let (after, _) = read_until(&mut slow, |s| reached(s, "P", &HashMap::from([("S0".to_string(), seq[0] + 2)]))).await;
    assert_eq!(after.iter().map(|r| (r.seq(), r.flags())).collect::<Vec<_>>(), vec![(seq[0] + 1, 0), (seq[0] + 2, 0)]);
    ts.shutdown().await;
}

#[tokio::test]
async fn publisher_epochs_reset_subscribers_and_numbering_continues_otherwise() {
    let ts =
        TestServer::start_with_feeds(50.0, &[("p.toml", publish_toml("P", 9, 1, "disconnect", 1000))], |_| {}).await;
    let publish = ts.token(&["md:publish:P"]);
    let (mut sub, _) = subscribed(&ts, &ts.token(&["md:read:P"]), "P", json!(["S0"]), false).await;

    let mut a = publisher(&ts, "P", &publish, Some(100)).await.unwrap();
    a.send(&(0..3).map(|k| trade(9, 1, 0, k)).collect::<Vec<_>>()).await.unwrap();
    a.sync().await.unwrap();
    a.close().await;
    // A reconnecting publisher without an epoch continues the numbering.
    let mut b = publisher(&ts, "P", &publish, None).await.unwrap();
    b.send(&[trade(9, 1, 0, 3)]).await.unwrap();
    b.sync().await.unwrap();
    b.close().await;
    // A new epoch: subscribers hear `reset` before any record of it, and seqs start over.
    let mut c = publisher(&ts, "P", &publish, Some(200)).await.unwrap();
    c.send(&[trade(9, 1, 0, 4), trade(9, 1, 0, 5)]).await.unwrap();
    c.sync().await.unwrap();

    let mut events: Vec<String> = Vec::new();
    while events.len() < 8 {
        match tokio::time::timeout(Duration::from_secs(10), sub.next_event()).await.unwrap().unwrap() {
            Event::Batch { records, anomalies, .. } => {
                assert!(anomalies.is_empty(), "{anomalies:?}");
                events.extend(records.iter().map(|r| format!("seq {}", r.seq())));
            }
            Event::Control(ServerMsg::Reset { epoch, .. }) => events.push(format!("reset {epoch}")),
            Event::Control(_) => {}
            Event::Closed { code, .. } => panic!("closed {code}"),
        }
    }
    assert_eq!(events, ["reset 100", "seq 1", "seq 2", "seq 3", "seq 4", "reset 200", "seq 1", "seq 2"]);
    ts.shutdown().await;
}

/// `engine.write_delay_us`: a busy connection gets its records in few, larger writes, every
/// one of them, in order; a revocation while a write may be held still closes it (4003).
#[tokio::test]
async fn write_delay_coalesces_writes_without_losing_or_reordering() {
    // 100 ms (the maximum): longer than the 40 publish round trips below take on most
    // machines; the bound on frames is taken from the time they really took.
    let ts = TestServer::start_with_feeds(50.0, &[("p.toml", publish_toml("P", 9, 1, "disconnect", 1000))], |c| {
        c.engine.write_delay_us = 100_000
    })
    .await;
    let now = unix_now();
    let (mut sub, _) =
        subscribed(&ts, &ts.token_with("erin", "md:read:P", now, now + 60, "e1"), "P", json!(["S0"]), false).await;
    let mut p = publisher(&ts, "P", &ts.token(&["md:publish:P"]), None).await.unwrap();
    // One record per round trip: each is taken in, and so dispatched, on its own.
    let started = std::time::Instant::now();
    for k in 0..40 {
        p.send(&[trade(9, 1, 0, k)]).await.unwrap();
        p.sync().await.unwrap();
    }
    let (mut seqs, mut frames) = (Vec::new(), 0);
    while seqs.len() < 40 {
        match tokio::time::timeout(Duration::from_secs(10), sub.next_event()).await.unwrap().unwrap() {
            Event::Batch { records, anomalies, .. } => {
                assert!(anomalies.is_empty(), "{anomalies:?}");
                frames += 1;
                seqs.extend(records.iter().map(Record::seq));
            }
            Event::Control(m) => panic!("unexpected {m:?}"),
            Event::Closed { code, .. } => panic!("closed {code}"),
        }
    }
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());
    // Without the delay each record is a frame of its own; with it, the first leaves at
    // once and the rest wait for the delay, together: at most one write per 100 ms of
    // the time this took (2 frames where the round trips fit in one delay).
    let spent_ms = started.elapsed().as_millis() as usize;
    assert!(frames <= 2 + spent_ms / 100, "{frames} frames for 40 records in {spent_ms} ms");

    // A revocation while a record may be held closes the connection at once (a termination
    // is never held behind the delay).
    p.send(&[trade(9, 1, 0, 40)]).await.unwrap();
    p.sync().await.unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/admin/revoke", ts.admin))
        .bearer_auth(ts.token(&["tickgate:admin"]))
        .json(&json!({"jti": "e1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(wait_close(&mut sub, Duration::from_secs(10)).await, 4003);
    ts.shutdown().await;
}

/// A held write never turns a client that keeps up into a slow consumer: once a full batch
/// waits, the writer is woken whatever the delay.
#[tokio::test]
async fn a_held_write_never_makes_a_slow_consumer() {
    let ts = TestServer::start_with_feeds(50.0, &[("p.toml", publish_toml("P", 9, 1, "disconnect", 1000))], |c| {
        c.engine.write_delay_us = 100_000;
        c.engine.max_batch_bytes = 4096;
        // Large enough that the shard thread may fall ~30 ms behind the publisher (on a
        // busy machine) before a client that keeps up looks slow; small enough that what
        // is published within one 100 ms delay is several budgets.
        c.limits.max_outbound_bytes = 512 << 10;
    })
    .await;
    let (mut sub, _) = subscribed(&ts, &ts.token(&["md:read:P"]), "P", json!(["S0"]), false).await;
    let mut p = publisher(&ts, "P", &ts.token(&["md:publish:P"]), None).await.unwrap();
    // The client keeps up: it reads all along (a client that only starts reading at the
    // end depends on the socket buffers holding everything, which a slow machine's
    // scheduling can defeat).
    const ROUNDS: u64 = 360;
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < (ROUNDS * 100) as usize {
            match tokio::time::timeout(EVENTUALLY, sub.next_event()).await.unwrap().unwrap() {
                Event::Batch { records, anomalies, .. } => {
                    assert!(anomalies.is_empty(), "{anomalies:?}");
                    seqs.extend(records.iter().map(Record::seq));
                }
                Event::Control(m) => panic!("unexpected {m:?}"),
                Event::Closed { code, reason } => panic!("closed {code} {reason} after {} records", seqs.len()),
            }
        }
        seqs
    });
    // 2,016,000 bytes of records, within one delay here (~0.3 ms a round): almost four
    // budgets. Without the wake-up on a full batch, the held write lets them pile up.
    for round in 0..ROUNDS {
        p.send(&(0..100).map(|k| trade(9, 1, 0, (round * 100 + k) as i64)).collect::<Vec<_>>()).await.unwrap();
        p.sync().await.unwrap();
    }
    let seqs = reader.await.unwrap();
    assert_eq!(seqs, (1..=ROUNDS * 100).collect::<Vec<u64>>());
    assert_eq!(ts.metric("tickgate_slow_consumer_events_total{action=\"disconnect\"}").await, 0.0);
    ts.shutdown().await;
}

fn sample_path() -> String {
    format!("{}/feeds/sample.tgrec", env!("CARGO_MANIFEST_DIR"))
}

fn replay_toml(speed: f64, looping: bool) -> String {
    format!(
        "name = \"R\"\nid = 5\nsource = \"replay\"\n[replay]\nfile = \"{}\"\nspeed = {speed}\nloop = {looping}\n",
        sample_path()
    )
}

#[tokio::test]
async fn the_shipped_recording_replays_record_for_record() {
    let mut reader = Reader::open(std::path::Path::new(&sample_path())).unwrap();
    let symbols = reader.meta().symbols.clone();
    let mut file = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        file.push(r);
    }
    assert!(file.len() > 1000, "the sample holds a real session");
    let ts = TestServer::start_with_feeds(50.0, &[("r.toml", replay_toml(0.0, false))], |c| {
        c.limits.max_outbound_bytes = 4 << 20;
    })
    .await;
    // As fast as possible, once; then every record is in the resume buffer.
    let n = file.len() as f64;
    assert_eq!(ts.wait_metric("tickgate_ticks_ingested_total{feed=\"R\"}", n).await, n);
    let read = ts.token(&["md:read:R"]);
    let mut sub = ts.subscriber(&read).await;
    let _ = next_control(&mut sub).await;
    let from_zero: BTreeMap<String, u64> = symbols.iter().map(|s| (s.clone(), 0)).collect();
    sub.subscribe(1, "R", &["*"], false, Some((None, from_zero))).await.unwrap();
    let mut got: Vec<Record> = Vec::new();
    while got.len() < file.len() {
        match tokio::time::timeout(Duration::from_secs(10), sub.next_event()).await.unwrap().unwrap() {
            Event::Batch { records, anomalies, .. } => {
                assert!(anomalies.is_empty(), "{anomalies:?}");
                got.extend(records);
            }
            Event::Control(m) => assert!(matches!(m, ServerMsg::Subscribed { .. }), "{m:?}"),
            Event::Closed { code, .. } => panic!("closed {code}"),
        }
    }
    for (k, (g, f)) in got.iter().zip(&file).enumerate() {
        assert_eq!(g.flags(), FLAG_REPLAY, "record {k}");
        assert_eq!(
            (g.instrument_id(), g.seq(), g.rtype(), g.ts_event_ns(), g.body()),
            (f.instrument_id(), f.seq(), f.rtype(), f.ts_event_ns(), f.body()),
            "record {k}"
        );
    }
    ts.shutdown().await;
}

#[tokio::test]
async fn a_looping_replay_starts_each_pass_with_a_reset() {
    let ts = TestServer::start_with_feeds(50.0, &[("r.toml", replay_toml(20.0, true))], |_| {}).await;
    let (mut sub, _) = subscribed(&ts, &ts.token(&["md:read:R"]), "R", json!(["*"]), false).await;
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    let mut records = 0u64;
    while sub.tracker.resets < 2 {
        match tokio::time::timeout_at(deadline, sub.next_event()).await.expect("two passes in time").unwrap() {
            Event::Batch { records: r, anomalies, .. } => {
                assert!(anomalies.is_empty(), "{anomalies:?}");
                records += r.len() as u64;
            }
            Event::Control(_) => {}
            Event::Closed { code, .. } => panic!("closed {code}"),
        }
    }
    assert!(records > 1000, "{records}");
    ts.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_and_counted() {
    let ts = TestServer::start(50.0, |c| c.server.heartbeat_ms = 150).await;
    let (mut sub, _) = subscribed(&ts, &ts.token(&["md:read:*"]), "T", json!(["S0"]), false).await;
    // Not reading means not answering pings.
    assert!(ts.wait_metric("tickgate_heartbeat_timeouts_total", 1.0).await >= 1.0);
    assert_eq!(wait_close(&mut sub, Duration::from_secs(10)).await, 1008);
    ts.shutdown().await;
}

#[tokio::test]
async fn a_publisher_that_never_answers_pings_is_closed_and_counted() {
    let ts = TestServer::start_with_feeds(50.0, &[("p.toml", publish_toml("P", 9, 1, "disconnect", 1000))], |c| {
        c.server.heartbeat_ms = 150
    })
    .await;
    let publish = ts.token(&["md:publish:P"]);
    let url = publish_url(&ts.url, "P", None);
    let mut ws = tickgate_client::connect(&url, &publish, &ConnectOptions::default()).await.unwrap();
    // Not reading means not answering pings.
    assert!(ts.wait_metric("tickgate_heartbeat_timeouts_total", 1.0).await >= 1.0);
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap() {
            Some(Ok(Message::Close(f))) => break f.map(|f| (u16::from(f.code), f.reason.to_string())),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close, Some((1008, "heartbeat timeout".to_string())));
    // The feed's publisher slot is free again.
    let mut again = publisher(&ts, "P", &publish, None).await.unwrap();
    again.send(&[trade(9, 1, 0, 1)]).await.unwrap();
    assert!(again.sync().await.unwrap().is_empty());
    ts.shutdown().await;
}

/// `tickgate record`: a capture of the subscribed instruments, renumbered 1..k with seqs
/// 1, 2, 3, ... per instrument; a capture with no end is refused before connecting.
#[tokio::test]
async fn record_cli_captures_a_renumbered_recording() {
    let ts = TestServer::start(300.0, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cap.tgrec");
    let run = |extra: &[&str]| {
        let mut cmd = tokio::process::Command::new(common::bin::BIN);
        cmd.args(["record", "--url", &ts.url, "--feed", "T", "--symbols", "S1,S0", "--out"])
            .arg(&file)
            .args(extra)
            .env("TICKGATE_TOKEN", ts.token(&["md:read:T"]));
        async move { tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.unwrap().unwrap() }
    };
    let endless = run(&[]).await;
    assert!(!endless.status.success());
    assert!(String::from_utf8_lossy(&endless.stderr).contains("give --seconds or --limit"));
    assert!(!file.exists());

    let out = run(&["--limit", "100"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut r = Reader::open(&file).unwrap();
    assert_eq!((r.meta().feed.as_str(), r.meta().symbols.clone()), ("T", vec!["S1".to_owned(), "S0".to_owned()]));
    let mut per: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    while let Some(rec) = r.next_record().unwrap() {
        per.entry(rec.instrument_id()).or_default().push(rec.seq());
    }
    assert_eq!(per.values().map(Vec::len).sum::<usize>(), 100);
    assert!(per.keys().all(|k| (1..=2).contains(k)), "{:?}", per.keys());
    for seqs in per.values() {
        assert_eq!(*seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    }
    ts.shutdown().await;
}

#[tokio::test]
async fn subscribe_cli_resumes_from_its_resume_file() {
    let ts = TestServer::start(300.0, |_| {}).await;
    let token = ts.token(&["md:read:T"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("resume.json");
    // The server's acceptor runs on this test's runtime: the child is awaited, not
    // waited for with a blocking call.
    let run = |limit: &'static str| {
        let mut cmd = tokio::process::Command::new(common::bin::BIN);
        cmd.args(["subscribe", "--url", &ts.url, "--feed", "T", "--symbols", "*", "--json", "--limit", limit])
            .arg("--resume-file")
            .arg(&file)
            .env("TICKGATE_TOKEN", &token);
        async move {
            let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.unwrap().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let first = run("60").await;
    // The second run starts once the feed has moved on (at 300/s, 50 records after the
    // first run ended), so it has something to take from the resume buffer.
    let ingested = ts.metric("tickgate_ticks_ingested_total{feed=\"T\"}").await;
    ts.wait_metric("tickgate_ticks_ingested_total{feed=\"T\"}", ingested + 50.0).await;
    let second = run("200").await;
    let mut per: HashMap<String, Vec<u64>> = HashMap::new();
    let mut replayed = 0;
    for line in first.lines().chain(second.lines()) {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_ne!(v["type"], "delivery_violation", "{line}");
        if v["type"] == "trade" || v["type"] == "quote" {
            per.entry(v["symbol"].as_str().unwrap().to_owned()).or_default().push(v["seq"].as_u64().unwrap());
            replayed += usize::from(v["replay"] == true);
        }
    }
    assert!(replayed > 0, "the second run started from the resume buffer");
    for (sym, seqs) in per {
        let start = seqs[0];
        assert_eq!(seqs, (start..start + seqs.len() as u64).collect::<Vec<_>>(), "{sym}: no duplicate, no hole");
    }
    ts.shutdown().await;
}
