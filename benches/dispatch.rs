//! Criterion benches of the hot path: record encoding, batch decoding, and dispatch
//! through one shard core to N in-memory connections (each cycle: dispatch the ticks,
//! then drain every connection's queue the way its writer would, sealing each batch).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

// mimalloc instead of glibc malloc: the dispatch path allocates one batch per connection per
// cycle and frees them all once written; glibc trims and re-faults those pages every cycle
// (page faults were the top of the dispatch profile), mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tickgate::auth::validate::Principal;
use tickgate::config::Config;
use tickgate::engine::core::{CoreLimits, ShardCore};
use tickgate::engine::outbound::{OutItem, Outbound};
use tickgate::engine::Tick;
use tickgate::feeds::log::{FeedLog, RingBounds};
use tickgate::feeds::{Catalog, FeedDef};
use tickgate_proto::codec::{decode_batch, Body, Quote, Record};
use tickgate_proto::control::ClientMsg;

fn catalog(symbols: usize) -> Arc<Catalog> {
    let syms: Vec<String> = (0..symbols).map(|i| format!("\"S{i}\"")).collect();
    let text = format!(
        "name = \"B\"\nid = 1\nsource = \"synthetic\"\nsymbols = [{}]\n[synthetic]\nseed = 1\nrate_per_s = 1.0\n",
        syms.join(",")
    );
    Arc::new(Catalog::new(vec![FeedDef::parse("bench", &text).unwrap()], 1).unwrap())
}

fn quote(instr: u32, seq: u64) -> Tick {
    Tick {
        feed_idx: 0,
        instr,
        record: Record::encode(
            1,
            instr + 1,
            seq,
            1,
            1,
            &Body::Quote(Quote { bid_px: 100, bid_sz: 1, ask_px: 101, ask_sz: 2 }),
            0,
        ),
    }
}

fn core_with(n: usize) -> (ShardCore, Vec<usize>) {
    let mut core = ShardCore::new(
        catalog(10),
        CoreLimits {
            max_outbound_bytes: 1 << 30,
            max_batch_bytes: 65536,
            max_subscriptions: 100,
            ..CoreLimits::from(&Config::default())
        },
    );
    let mut keys = Vec::new();
    for i in 0..n {
        let h = core.add_conn(Principal::unauthenticated(&format!("c{i}"), "bench"), format!("s{i}"));
        core.handle(
            h.key,
            ClientMsg::Subscribe {
                id: None,
                feed: "B".into(),
                symbols: vec!["*".into()],
                snapshot: false,
                resume: None,
                epoch: None,
                max_rate: None,
            },
        );
        while core.pop(h.key).is_some() {}
        keys.push(h.key);
    }
    (core, keys)
}

fn drain(core: &mut ShardCore, keys: &[usize]) -> usize {
    let mut frames = 0;
    for &k in keys {
        while let Some(item) = core.pop(k) {
            if let OutItem::Batch(b) = item {
                black_box(b.finish(1));
                frames += 1;
            }
        }
    }
    frames
}

fn bench_dispatch(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch");
    for &conns in &[100usize, 1000] {
        for &per_cycle in &[1usize, 16] {
            let (mut core, keys) = core_with(conns);
            // Seqs per instrument, as a source numbers them (a jump would be a source gap).
            let mut seqs = [0u64; 10];
            g.throughput(Throughput::Elements((conns * per_cycle) as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("{conns}_conns"), format!("{per_cycle}_ticks_per_cycle")),
                &per_cycle,
                |b, &per_cycle| {
                    b.iter(|| {
                        for k in 0..per_cycle {
                            let i = k % 10;
                            seqs[i] += 1;
                            core.dispatch(&quote(i as u32, seqs[i]));
                        }
                        core.end_cycle();
                        black_box(drain(&mut core, &keys))
                    })
                },
            );
        }
    }
    g.finish();
}

/// The peer: the fan-out most tokio services start with, a `tokio::sync::broadcast`
/// channel with one receiver per connection, each receiver building its own batch.
fn bench_broadcast_peer(c: &mut Criterion) {
    let mut g = c.benchmark_group("broadcast_peer");
    for &conns in &[100usize, 1000] {
        for &per_cycle in &[1usize, 16] {
            let (tx, _keep) = tokio::sync::broadcast::channel::<Arc<Record>>(1024);
            let mut rxs: Vec<_> = (0..conns).map(|_| tx.subscribe()).collect();
            let mut seq = 0u64;
            g.throughput(Throughput::Elements((conns * per_cycle) as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("{conns}_conns"), format!("{per_cycle}_ticks_per_cycle")),
                &per_cycle,
                |b, &per_cycle| {
                    b.iter(|| {
                        for k in 0..per_cycle {
                            seq += 1;
                            let _ = tx.send(Arc::new(quote((k % 10) as u32, seq).record));
                        }
                        let mut frames = 0;
                        for rx in rxs.iter_mut() {
                            let mut batch = Vec::with_capacity(512);
                            batch.extend_from_slice(&[0u8; 16]);
                            while let Ok(r) = rx.try_recv() {
                                batch.extend_from_slice(r.as_bytes());
                            }
                            black_box(bytes::Bytes::from(batch));
                            frames += 1;
                        }
                        black_box(frames)
                    })
                },
            );
        }
    }
    g.finish();
}

fn bench_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_quote", |b| {
        let mut seq = 0;
        b.iter(|| {
            seq += 1;
            black_box(quote(3, black_box(seq)))
        })
    });
    let (mut core, keys) = core_with(1);
    for s in 1..=500 {
        core.dispatch(&quote(0, s));
    }
    let Some(OutItem::Batch(b)) = core.pop(keys[0]) else { panic!("batch") };
    let msg = b.finish(1);
    g.throughput(Throughput::Elements(500));
    g.bench_function("decode_batch_500", |b| b.iter(|| black_box(decode_batch(black_box(&msg)).unwrap())));
    g.finish();
}

/// What the resume buffer adds to every tick on the live path: one append (and one
/// eviction, the ring being full) per tick, under the feed's lock taken once per burst.
/// Compare with `dispatch/*` per delivered record.
fn bench_resume_log(c: &mut Criterion) {
    let mut g = c.benchmark_group("resume_log");
    g.throughput(Throughput::Elements(1));
    let mut log = FeedLog::new(10, 1, RingBounds::default());
    let mut seq = 0u64;
    for _ in 0..RingBounds::default().records {
        seq += 1;
        log.append((seq % 10) as u32, quote((seq % 10) as u32, seq).record);
    }
    g.bench_function("append_at_capacity", |b| {
        b.iter(|| {
            seq += 1;
            let t = quote((seq % 10) as u32, seq);
            log.append(t.instr, black_box(t.record));
        })
    });
    g.finish();
}

/// Batch encoding: 64 records appended to a connection's outbound queue and sealed into one
/// binary message (header with count and send time), as a writer takes it.
fn bench_batch_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_encode");
    g.throughput(Throughput::Elements(64));
    let recs: Vec<Record> = (1..=64).map(|s| quote((s % 10) as u32, s).record).collect();
    g.bench_function("64_records_into_one_message", |b| {
        b.iter(|| {
            let mut out = Outbound::default();
            for r in &recs {
                out.push_record(0, r, 65536);
            }
            match out.pop() {
                Some(OutItem::Batch(batch)) => black_box(batch.finish(1)),
                _ => unreachable!("one batch"),
            }
        })
    });
    g.finish();
}

/// Subscription index lookup and last-value update for a tick nobody on this shard
/// subscribes to (every shard sees every tick): the floor of the per-tick cost.
fn bench_index_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("index_lookup");
    g.throughput(Throughput::Elements(1));
    let mut core = ShardCore::new(catalog(1000), CoreLimits::from(&Config::default()));
    let mut seqs = vec![0u64; 1000];
    let mut k = 0usize;
    g.bench_function("tick_without_subscribers", |b| {
        b.iter(|| {
            k = (k + 7) % 1000;
            seqs[k] += 1;
            core.dispatch(black_box(&quote(k as u32, seqs[k])));
        })
    });
    g.finish();
}

/// A mass disconnect: 10,000 connections subscribed to the same instrument all leave
/// (load generator exits, a network partition). Removal is O(1) per subscription.
fn bench_mass_disconnect(c: &mut Criterion) {
    let mut g = c.benchmark_group("mass_disconnect");
    g.sample_size(10);
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("10000_subscribers_of_one_instrument", |b| {
        b.iter_batched(
            || core_with(10_000),
            |(mut core, keys)| {
                for k in keys {
                    core.remove_conn(k);
                }
                black_box(core.subscription_count())
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_mass_disconnect,
    bench_dispatch,
    bench_broadcast_peer,
    bench_codec,
    bench_resume_log,
    bench_batch_encode,
    bench_index_lookup
);
criterion_main!(benches);
