//! The replay source: plays a [recording](tickgate_proto::recording) into a feed at its original pace
//! (`speed = 1`), faster (`speed = 10`), or as fast as the engine takes it (`speed = 0`),
//! once or in a loop.
//!
//! Pacing follows the records' `ts_event_ns`: record k is due `(ts_event_k -
//! ts_event_0) / speed` after the pass started. Records due together go to the engine as
//! one burst. Each pass after the first is a new epoch (from [`crate::feeds::epoch`]), so subscribers get `reset` and
//! the seqs (1, 2, 3, ... per instrument in the recording) start over cleanly. Records
//! keep their `ts_event_ns`; `ts_recv_ns` is the time they were played.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::{Ingest, Tick};
use crate::feeds::{Feed, ReplayDef};
use tickgate_proto::now_ns;
use tickgate_proto::recording::{Reader, RecordingError};

/// Largest burst handed to the engine at once (as fast as possible mode).
const MAX_BURST: usize = 4096;

/// Runs a replay feed until it ends (no loop) or `cancel` fires. `lag` receives, once per
/// burst, how late the burst is against its schedule.
pub(crate) async fn run(
    def: ReplayDef,
    feed_idx: u16,
    ingest: Ingest,
    lag: prometheus::Histogram,
    cancel: CancellationToken,
) {
    let catalog = ingest.catalog().clone();
    let Some(feed) = catalog.get(feed_idx as usize) else { return };
    let mut pass: u64 = 0;
    loop {
        if pass > 0 {
            // Above every epoch this node used, across restarts too (see feeds::epoch).
            let epoch = catalog.next_epoch(feed).await;
            if !ingest.reset(feed_idx, epoch, &cancel).await {
                return;
            }
        }
        match play(&def, feed, &ingest, &lag, &cancel).await {
            Ok(Some(n)) => tracing::debug!(feed = feed.name(), records = n, pass, "replay pass done"),
            Ok(None) => return,
            Err(e) => {
                tracing::error!(feed = feed.name(), file = %def.file.display(), error = %e, "replay stopped");
                return;
            }
        }
        if !def.looping {
            tracing::info!(feed = feed.name(), "replay finished (loop = false)");
            return;
        }
        pass += 1;
    }
}

/// One pass over the file. `Ok(None)`: cancelled; `Ok(Some(n))`: n records played.
async fn play(
    def: &ReplayDef,
    feed: &Feed,
    ingest: &Ingest,
    lag: &prometheus::Histogram,
    cancel: &CancellationToken,
) -> Result<Option<u64>, RecordingError> {
    let mut reader = Reader::open(&def.file)?;
    let mut last_seq = vec![0u64; feed.instrument_count()];
    let start = tokio::time::Instant::now();
    let start_wall = now_ns() as i64;
    let mut t0: Option<i64> = None;
    let mut burst: Vec<Tick> = Vec::with_capacity(MAX_BURST);
    let mut played: u64 = 0;
    let mut pending = reader.next_record()?;
    while let Some(rec) = pending {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let first = *t0.get_or_insert(rec.ts_event_ns());
        let due = if def.speed > 0.0 {
            Duration::from_nanos(((rec.ts_event_ns() - first).max(0) as f64 / def.speed) as u64)
        } else {
            Duration::ZERO
        };
        if !burst.is_empty()
            && (start + due > tokio::time::Instant::now() || burst.len() >= MAX_BURST)
            && !send(ingest, &mut burst, cancel).await
        {
            return Ok(None);
        }
        if burst.is_empty() {
            let at = start + due;
            if at > tokio::time::Instant::now() {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(None),
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            let now = now_ns() as i64;
            lag.observe((now - (start_wall + due.as_nanos() as i64)).max(0) as f64 / 1e9);
        }
        // The reader checked the instrument id is within the symbol table, which is the
        // feed's (enforced when the definition was loaded).
        let instr = rec.instrument_id() - 1;
        let Some(last) = last_seq.get_mut(instr as usize) else {
            return Err(RecordingError::Format(format!("instrument id {} outside the feed", instr + 1)));
        };
        if rec.seq() <= *last {
            return Err(RecordingError::Format(format!(
                "seq {} of instrument {} does not follow {}",
                rec.seq(),
                instr + 1,
                *last
            )));
        }
        *last = rec.seq();
        let record = rec.without_flags().with_feed_id(feed.id()).with_recv_ts(now_ns() as i64);
        burst.push(Tick { feed_idx: feed.idx as u16, instr, record });
        played += 1;
        pending = reader.next_record()?;
    }
    if !burst.is_empty() && !send(ingest, &mut burst, cancel).await {
        return Ok(None);
    }
    Ok(Some(played))
}

async fn send(ingest: &Ingest, burst: &mut Vec<Tick>, cancel: &CancellationToken) -> bool {
    let ok = ingest.publish_burst(burst, cancel).await;
    ingest.flush();
    burst.clear();
    ok
}
