//! Criterion bench of the per-shard timer wheel: schedule, cancel and advance, the three
//! operations the token lifecycle performs (connect, refresh/disconnect, shard loop tick).
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tickgate::engine::timer::TimerWheel;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench_wheel(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer_wheel");
    // A wheel already holding 100,000 tokens' deadlines spread over 15 minutes, as a busy
    // shard would.
    let mut base: TimerWheel<u64> = TimerWheel::new(10);
    for i in 0..100_000u64 {
        base.schedule((i * 9_000) % 900_000, i);
    }
    const OPS: u64 = 10_000;
    g.throughput(Throughput::Elements(OPS * 2));
    g.bench_function("schedule_then_cancel", |b| {
        let mut ids = Vec::with_capacity(OPS as usize);
        let mut at = 0u64;
        b.iter(|| {
            for i in 0..OPS {
                at = (at + 7_919) % 900_000;
                ids.push(base.schedule(at + 1_000, i));
            }
            for id in ids.drain(..) {
                black_box(base.cancel(id));
            }
        })
    });
    g.throughput(Throughput::Elements(OPS * 3));
    g.bench_function("schedule_cancel_half_advance", |b| {
        // Schedule, cancel half (refreshes), and advance 1 s of 10 ms ticks, firing the rest.
        let mut w: TimerWheel<u64> = TimerWheel::new(10);
        let mut now = 0u64;
        let mut fired = Vec::with_capacity(OPS as usize);
        let mut ids = Vec::with_capacity(OPS as usize);
        b.iter(|| {
            for i in 0..OPS {
                ids.push(w.schedule(now + 10 + (i * 97) % 990, i));
            }
            for id in ids.drain(..).step_by(2) {
                black_box(w.cancel(id));
            }
            ids.clear();
            now += 1_000;
            w.advance(now, &mut fired);
            black_box(fired.len());
            fired.clear();
        })
    });
    g.finish();
}

/// The peer: a binary heap of deadlines with lazy cancellation (a cancelled id is
/// remembered and skipped when popped), the usual hand-rolled timer queue.
fn bench_heap_peer(c: &mut Criterion) {
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashSet};
    let mut g = c.benchmark_group("binary_heap_peer");
    const OPS: u64 = 10_000;
    g.throughput(Throughput::Elements(OPS * 2));
    g.bench_function("schedule_then_cancel", |b| {
        let mut heap: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
        let mut cancelled: HashSet<u64> = HashSet::new();
        for i in 0..100_000u64 {
            heap.push(Reverse(((i * 9_000) % 900_000, i)));
        }
        let mut next_id = 1_000_000u64;
        let mut at = 0u64;
        let mut ids = Vec::with_capacity(OPS as usize);
        b.iter(|| {
            for _ in 0..OPS {
                at = (at + 7_919) % 900_000;
                next_id += 1;
                heap.push(Reverse((at + 1_000, next_id)));
                ids.push(next_id);
            }
            for id in ids.drain(..) {
                black_box(cancelled.insert(id));
            }
            // Keep the comparison honest: the heap must eventually shed what was cancelled.
            if cancelled.len() > 200_000 {
                heap.retain(|Reverse((_, id))| !cancelled.contains(id));
                cancelled.clear();
            }
        })
    });
    g.throughput(Throughput::Elements(OPS * 3));
    g.bench_function("schedule_cancel_half_advance", |b| {
        let mut heap: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
        let mut cancelled: HashSet<u64> = HashSet::new();
        let mut now = 0u64;
        let mut next_id = 0u64;
        let mut ids = Vec::with_capacity(OPS as usize);
        let mut fired = Vec::with_capacity(OPS as usize);
        b.iter(|| {
            for i in 0..OPS {
                next_id += 1;
                heap.push(Reverse((now + 10 + (i * 97) % 990, next_id)));
                ids.push(next_id);
            }
            for id in ids.drain(..).step_by(2) {
                cancelled.insert(id);
            }
            ids.clear();
            now += 1_000;
            while let Some(Reverse((at, id))) = heap.peek().copied() {
                if at > now {
                    break;
                }
                heap.pop();
                if !cancelled.remove(&id) {
                    fired.push(id);
                }
            }
            black_box(fired.len());
            fired.clear();
        })
    });
    g.finish();
}

criterion_group!(benches, bench_wheel, bench_heap_peer);
criterion_main!(benches);
