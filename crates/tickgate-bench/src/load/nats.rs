//! The NATS side of the load benchmark: a subscriber that speaks the NATS protocol over
//! WebSocket (`async-nats`), on subjects `md.<FEED>.<SYMBOL>` whose messages each carry
//! exactly one binary record in the spec §5 layout. It measures what the tickgate
//! subscriber measures: latency against `ts_event_ns`, and every seq per subject.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::StreamExt;

use super::{latency_us, new_histogram, symbols_for, LoadError, LoadOptions, Shared, SubscriberResult};
use tickgate_proto::codec::Record;
use tickgate_proto::now_ns;

/// The subject of one instrument.
pub fn subject(feed: &str, symbol: &str) -> String {
    format!("md.{feed}.{symbol}")
}

/// Per-subject sequence checking. The first record of a subject sets its baseline (a
/// subscriber joins a running stream); after that every seq must be the previous one + 1.
#[derive(Debug, Default)]
pub struct SubjectSeqs {
    next: HashMap<String, u64>,
}

/// What one record did to the sequence of its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// In order (or the first one seen).
    InOrder,
    /// Records were skipped: this many.
    Jump(u64),
    /// A seq at or below one already seen.
    Repeat,
}

impl SubjectSeqs {
    /// Checks `seq` on `subject`.
    pub fn check(&mut self, subject: &str, seq: u64) -> SeqCheck {
        match self.next.get_mut(subject) {
            None => {
                self.next.insert(subject.to_owned(), seq + 1);
                SeqCheck::InOrder
            }
            Some(next) if seq == *next => {
                *next += 1;
                SeqCheck::InOrder
            }
            Some(next) if seq > *next => {
                let skipped = seq - *next;
                *next = seq + 1;
                SeqCheck::Jump(skipped)
            }
            Some(_) => SeqCheck::Repeat,
        }
    }
}

/// One NATS subscriber: connects over WebSocket, subscribes to its subjects, flushes (so
/// the server has the interest before it says ready), then measures every message.
pub(super) async fn subscriber(
    i: usize,
    url: String,
    o: LoadOptions,
    sh: Arc<Shared>,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
    gate: Arc<tokio::sync::Semaphore>,
) -> SubscriberResult {
    let mut hist = new_histogram()?;
    let permit = gate.acquire_owned().await.ok();
    let disconnects = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = disconnects.clone();
    let shared = sh.clone();
    // Note: async-nats binds no source address on ws:// connections, so every NATS
    // subscriber connects from 127.0.0.1 (28k ephemeral ports are enough for this grid).
    let connected = async_nats::ConnectOptions::new()
        // About a second of messages at the grid's rates; when the load generator falls
        // further behind, async-nats drops messages and says so (counted as client drops).
        .subscription_capacity(1024)
        .connection_timeout(std::time::Duration::from_secs(20))
        .event_callback(move |e| {
            let (seen, shared) = (seen.clone(), shared.clone());
            async move {
                match e {
                    async_nats::Event::Disconnected => {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                    // After the stop the subscriptions are no longer read: drops then are
                    // the teardown's, not the run's.
                    async_nats::Event::SlowConsumer(_) if !shared.stop.is_cancelled() => {
                        shared.client_drops.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        })
        .connect(url.as_str())
        .await;
    let client = match connected {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(format!("#{i}: {e}"))).await;
            return Err(LoadError::Nats(e.to_string()));
        }
    };
    let mut subs = Vec::new();
    for s in symbols_for(i, &o.symbols, o.symbols_per_conn) {
        let subj = subject(&o.feed, &s);
        match client.subscribe(subj).await {
            Ok(sub) => subs.push(sub),
            Err(e) => {
                let _ = ready.send(Err(format!("#{i}: subscribe: {e}"))).await;
                return Err(LoadError::Nats(e.to_string()));
            }
        }
    }
    if let Err(e) = client.flush().await {
        let _ = ready.send(Err(format!("#{i}: flush: {e}"))).await;
        return Err(LoadError::Nats(e.to_string()));
    }
    drop(permit);
    let _ = ready.send(Ok(())).await;

    let mut messages = futures_util::stream::select_all(subs);
    let mut seqs = SubjectSeqs::default();
    let stop = sh.stop.clone();
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let msg = tokio::select! {
            biased;
            m = messages.next() => m,
            _ = &mut stopped => break,
        };
        // A stream that is always ready would starve the stop branch of a biased select.
        if stop.is_cancelled() {
            break;
        }
        let Some(msg) = msg else {
            // Every subscription ended: the client is gone.
            return Ok((hist, Some(1006)));
        };
        let record = match Record::from_wire(&msg.payload) {
            Ok(r) => r,
            Err(_) => {
                sh.anomalies.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        match seqs.check(msg.subject.as_str(), record.seq()) {
            SeqCheck::InOrder => {}
            SeqCheck::Jump(n) => {
                sh.anomalies.fetch_add(1, Ordering::Relaxed);
                sh.missing.fetch_add(n, Ordering::Relaxed);
            }
            SeqCheck::Repeat => {
                sh.anomalies.fetch_add(1, Ordering::Relaxed);
            }
        }
        if sh.measuring.load(Ordering::Relaxed) {
            let _ = hist.record(latency_us(now_ns() as i64, record.ts_event_ns()));
            sh.records.fetch_add(1, Ordering::Relaxed);
        }
    }
    drop(messages);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.drain()).await;
    let closed = match disconnects.load(Ordering::Relaxed) {
        0 => None,
        _ => Some(1006),
    };
    Ok((hist, closed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_check_counts_jumps_and_repeats() {
        let mut s = SubjectSeqs::default();
        let (a, b) = ("md.F.A", "md.F.B");
        assert_eq!(s.check(a, 7), SeqCheck::InOrder);
        assert_eq!(s.check(a, 8), SeqCheck::InOrder);
        assert_eq!(s.check(b, 1), SeqCheck::InOrder);
        assert_eq!(s.check(a, 11), SeqCheck::Jump(2));
        assert_eq!(s.check(a, 11), SeqCheck::Repeat);
        assert_eq!(s.check(a, 12), SeqCheck::InOrder);
        assert_eq!(s.check(b, 2), SeqCheck::InOrder);
    }

    #[test]
    fn subjects_follow_the_naming() {
        assert_eq!(subject("BENCH", "B0"), "md.BENCH.B0");
    }
}
