//! The `publish` source: batches that upstream publishers (feed handlers) send on
//! `GET /v1/publish` (the endpoint and the connection are `server::publish`), taken
//! into their feed.
//!
//! This module holds:
//! - [`PublishReject`], the reasons a batch is refused (the `reason` label of
//!   `tickgate_publish_rejects_total`, primed by `prime_metrics`), and [`Reject`];
//! - [`decode`]: the codec's strict decoder ([`StrictBatch`]) plus the feed's own rules
//!   (feed id, instrument range), its errors mapped to reasons and messages;
//! - [`sequence`]: final seqs (0 → last + 1) and the ingest time;
//! - [`PublishSource`]: one publisher connection's ingest (decode, then sequence and
//!   append under one hold of the feed log's write lock ([`Ingest::append_with`]), then
//!   [`Ingest::enqueue`] for the shards: log first, as for every source), with its
//!   reused buffers.
//!
//! A batch is checked whole before any of it is taken in: a bad record refuses the
//! batch and nothing of it reaches the log or subscribers, so a publisher can fix and
//! resend it. A record's `seq` is kept as the publisher set it (nodes fed by the same
//! upstream then agree), or assigned as last + 1 when it is 0.

use std::collections::HashMap;

use tokio_util::sync::CancellationToken;

use crate::engine::{Ingest, Tick};
use crate::feeds::log::FeedLog;
use crate::feeds::Feed;
use crate::metrics::Metrics;
use tickgate_proto::codec::{DecodeError, Record, StrictBatch, BATCH_HEADER_LEN, RECORD_HEADER_LEN, VERSION};

/// Why a batch (or a text frame) from a publisher is refused: the `reason` label of
/// `tickgate_publish_rejects_total`, and the first word of the `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PublishReject {
    /// Truncated, empty, non-zero header bytes, or bytes after the last record.
    MalformedBatch,
    /// Batch version is not 1.
    BadVersion,
    /// A record's length does not match its type.
    BadLength,
    /// A record type other than trade or quote.
    UnknownRtype,
    /// A record of another feed than the connection's.
    WrongFeed,
    /// An instrument id outside the feed.
    UnknownInstrument,
    /// A record's flags or padding are not 0.
    BadFlags,
    /// A seq not above the instrument's last one.
    SeqBackwards,
    /// A text frame that is not `{"op":"ping"}`.
    BadText,
}

impl PublishReject {
    /// Every reason, in the order the label values are primed.
    pub const ALL: [PublishReject; 9] = [
        PublishReject::MalformedBatch,
        PublishReject::BadVersion,
        PublishReject::BadLength,
        PublishReject::UnknownRtype,
        PublishReject::WrongFeed,
        PublishReject::UnknownInstrument,
        PublishReject::BadFlags,
        PublishReject::SeqBackwards,
        PublishReject::BadText,
    ];

    /// The metric label and message prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishReject::MalformedBatch => "malformed_batch",
            PublishReject::BadVersion => "bad_version",
            PublishReject::BadLength => "bad_length",
            PublishReject::UnknownRtype => "unknown_rtype",
            PublishReject::WrongFeed => "wrong_feed",
            PublishReject::UnknownInstrument => "unknown_instrument",
            PublishReject::BadFlags => "bad_flags",
            PublishReject::SeqBackwards => "seq_backwards",
            PublishReject::BadText => "bad_text",
        }
    }
}

impl std::fmt::Display for PublishReject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Creates every `tickgate_publish_rejects_total{reason}` series at 0, so a scrape
/// shows each reason before its first refusal.
pub(crate) fn prime_metrics(metrics: &Metrics) {
    for r in PublishReject::ALL {
        metrics.publish_rejects.with_label_values(&[r.as_str()]);
    }
}

/// A refused batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// The rule it broke.
    pub reason: PublishReject,
    /// What exactly is wrong, for the publisher.
    pub message: String,
}

fn reject(reason: PublishReject, message: String) -> Reject {
    Reject { reason, message }
}

/// The publisher's answer for a layout fault the codec found (the texts are the
/// publish endpoint's, unchanged since before the codec owned the rules).
fn layout_reject(e: DecodeError) -> Reject {
    use PublishReject as R;
    match e {
        DecodeError::Truncated { record: None, have, .. } => {
            reject(R::MalformedBatch, format!("batch of {have} bytes is shorter than its header"))
        }
        DecodeError::Truncated { record: Some(k), at, need, have } if need == RECORD_HEADER_LEN => reject(
            R::MalformedBatch,
            format!("record {k} at byte {at}: {have} bytes left, a record header is {RECORD_HEADER_LEN}"),
        ),
        DecodeError::Truncated { record: Some(k), at, need, have } => {
            reject(R::MalformedBatch, format!("record {k} at byte {at}: {need} bytes announced, {have} left"))
        }
        DecodeError::Version(v) => reject(R::BadVersion, format!("batch version {v} (expected {VERSION})")),
        DecodeError::HeaderNotZero => reject(R::MalformedBatch, "batch flags and reserved bytes must be 0".into()),
        DecodeError::Empty => reject(R::MalformedBatch, "batch has no record".into()),
        DecodeError::UnknownRtype { record: k, at, rtype } => reject(
            R::UnknownRtype,
            format!("record {k} at byte {at}: rtype {rtype} (publishers send 1 trade or 2 quote)"),
        ),
        DecodeError::WrongLengthForType { record: k, at, rtype, expected, len } => reject(
            R::BadLength,
            format!("record {k} at byte {at}: len {len} does not match rtype {rtype} (which is {expected} bytes)"),
        ),
        DecodeError::FlagsNotZero { record: k, at } => reject(
            R::BadFlags,
            format!("record {k} at byte {at}: record flags and padding must be 0 (flags are set by the server)"),
        ),
        DecodeError::Trailing { count, extra } => {
            reject(R::MalformedBatch, format!("{extra} bytes after the {count} records the header announces"))
        }
        // The strict decoder checks exact lengths per type, never this client rule.
        e @ DecodeError::BadLength { .. } => reject(R::MalformedBatch, e.to_string()),
    }
}

/// Checks one batch against the layout (the codec's strict decoder) and the feed, and
/// decodes its records (dense instrument index, record) into `out`. Seqs are not
/// looked at here; see [`sequence`]. Faults are named in layout order: the first record
/// that breaks any rule (layout or feed) names the refusal.
pub fn decode(msg: &[u8], feed_id: u16, instruments: usize, out: &mut Vec<(u32, Record)>) -> Result<(), Reject> {
    out.clear();
    let batch = StrictBatch::parse(msg).map_err(layout_reject)?;
    let mut at = BATCH_HEADER_LEN;
    for (k, rec) in batch.records().enumerate() {
        let rec = rec.map_err(layout_reject)?;
        if rec.feed_id() != feed_id {
            return Err(reject(
                PublishReject::WrongFeed,
                format!(
                    "record {k} at byte {at}: feed_id {} but this connection publishes feed {feed_id}",
                    rec.feed_id()
                ),
            ));
        }
        let id = rec.instrument_id() as usize;
        if id == 0 || id > instruments {
            return Err(reject(
                PublishReject::UnknownInstrument,
                format!("record {k} at byte {at}: instrument_id {id} (the feed has ids 1..={instruments})"),
            ));
        }
        out.push(((id - 1) as u32, rec));
        at += rec.len();
    }
    Ok(())
}

/// Gives every record its final seq (0 → last + 1) and its ingest time, checking seqs
/// only go up: the whole batch is checked before any of it is appended (nothing is
/// appended here), so a refusal leaves the log as it was.
///
/// `log` is the feed's log, held by the caller: [`PublishSource::take`] runs this inside
/// [`Ingest::append_with`], under the write lock that then appends the batch, so no other
/// writer can slip a seq in between the check and the append. `last` is scratch space
/// (the batch's running last seq per instrument), cleared here and reused batch after
/// batch.
pub fn sequence(
    feed: &Feed,
    log: &FeedLog,
    recs: &mut [(u32, Record)],
    recv_ns: i64,
    last: &mut HashMap<u32, u64>,
) -> Result<(), Reject> {
    last.clear();
    for (k, (instr, rec)) in recs.iter_mut().enumerate() {
        let prev = *last.entry(*instr).or_insert_with(|| log.last_seq(*instr));
        let seq = match rec.seq() {
            0 if prev == u64::MAX => {
                return Err(reject(
                    PublishReject::SeqBackwards,
                    format!("record {k}: the seq space of {} is used up", feed.symbol(*instr)),
                ))
            }
            0 => prev + 1,
            s if s > prev => s,
            s => {
                return Err(reject(
                    PublishReject::SeqBackwards,
                    format!(
                        "record {k}: seq {s} of {} is not above the last accepted {prev} (epoch {})",
                        feed.symbol(*instr),
                        log.epoch()
                    ),
                ))
            }
        };
        last.insert(*instr, seq);
        *rec = rec.with_seq(seq).with_recv_ts(recv_ns);
    }
    Ok(())
}

/// What became of a batch [`PublishSource::take`] accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// In the feed's log and queued for every shard.
    Queued,
    /// Shutdown came while waiting for queue space (the batch is in the log).
    Cancelled,
}

/// One publisher connection's ingest into its feed. Holds the buffers reused batch
/// after batch, so a batch costs no allocation once they have grown.
#[derive(Debug)]
pub struct PublishSource {
    feed_idx: u16,
    recs: Vec<(u32, Record)>,
    ticks: Vec<Tick>,
    last: HashMap<u32, u64>,
}

impl PublishSource {
    /// The source of the feed at `feed_idx` in the catalog.
    pub fn new(feed_idx: u16) -> PublishSource {
        PublishSource { feed_idx, recs: Vec::new(), ticks: Vec::new(), last: HashMap::new() }
    }

    /// Checks, sequences and takes in one batch: appended to the feed log, then queued
    /// for the shards (the engine's order), the shards woken once. A refused batch
    /// changes nothing.
    pub async fn take(
        &mut self,
        feed: &Feed,
        msg: &[u8],
        ingest: &Ingest,
        cancel: &CancellationToken,
    ) -> Result<Taken, Reject> {
        decode(msg, feed.id(), feed.instrument_count(), &mut self.recs)?;
        let feed_idx = self.feed_idx;
        let (recs, last) = (&mut self.recs, &mut self.last);
        // Sequenced and appended under one hold of the log's write lock; then queued.
        ingest.append_with(feed_idx, &mut self.ticks, |log, ticks| {
            sequence(feed, log, recs, tickgate_proto::now_ns() as i64, last)?;
            ticks.clear();
            ticks.extend(recs.iter().map(|&(instr, record)| Tick { feed_idx, instr, record }));
            Ok(())
        })?;
        if !ingest.enqueue(&self.ticks, cancel).await {
            return Ok(Taken::Cancelled);
        }
        ingest.flush();
        Ok(Taken::Queued)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::feeds::{Catalog, FeedDef};
    use tickgate_proto::codec::{encode_batch, Body, Quote, Trade};

    fn batch(recs: &[Record]) -> Vec<u8> {
        let mut b = Vec::new();
        encode_batch(recs, 0, &mut b);
        b
    }

    fn trade(feed: u16, instr: u32, seq: u64) -> Record {
        Record::encode(feed, instr, seq, 1, 0, &Body::Trade(Trade { price: 1, size: 1, side: 1 }), 0)
    }

    fn catalog() -> Catalog {
        let def = FeedDef::parse("p", "name = \"P\"\nid = 9\nsource = \"publish\"\nsymbols = [\"A\", \"B\"]\n")
            .expect("feed");
        Catalog::new(vec![def], 1).expect("catalog")
    }

    fn refusal(msg: &[u8]) -> Reject {
        decode(msg, 9, 2, &mut Vec::new()).expect_err("refused")
    }

    fn reason(msg: &[u8]) -> &'static str {
        refusal(msg).reason.as_str()
    }

    #[test]
    fn every_malformation_has_its_reason() {
        let good = batch(&[trade(9, 1, 0), trade(9, 2, 0)]);
        let mut out = Vec::new();
        decode(&good, 9, 2, &mut out).expect("good batch");
        assert_eq!(out.len(), 2);
        assert_eq!(reason(&good[..10]), "malformed_batch");
        assert_eq!(reason(&good[..good.len() - 1]), "malformed_batch");
        let mut extra = good.clone();
        extra.extend_from_slice(&[0; 8]);
        assert_eq!(reason(&extra), "malformed_batch");
        let mut v = good.clone();
        v[0] = 2;
        assert_eq!(reason(&v), "bad_version");
        let mut l = good.clone();
        l[16] = 40;
        assert_eq!(reason(&l), "bad_length");
        let mut t = good.clone();
        t[17] = 7;
        assert_eq!(reason(&t), "unknown_rtype");
        assert_eq!(reason(&batch(&[trade(8, 1, 0)])), "wrong_feed");
        assert_eq!(reason(&batch(&[trade(9, 3, 0)])), "unknown_instrument");
        assert_eq!(reason(&batch(&[trade(9, 0, 0)])), "unknown_instrument");
        assert_eq!(reason(&batch(&[trade(9, 1, 0).with_flags(1)])), "bad_flags");
        let q = Record::encode(9, 1, 0, 0, 0, &Body::Quote(Quote::default()), 0);
        decode(&batch(&[q]), 9, 2, &mut out).expect("quote");
    }

    /// The texts publishers read, as they were before the codec owned the layout rules.
    #[test]
    fn refusal_messages_are_unchanged() {
        let good = batch(&[trade(9, 1, 0), trade(9, 2, 0)]);
        let msg = |m: &[u8]| refusal(m).message;
        assert_eq!(msg(&good[..10]), "batch of 10 bytes is shorter than its header");
        let mut h = good.clone();
        h[4] = 1;
        assert_eq!(msg(&h), "batch flags and reserved bytes must be 0");
        let mut e = good[..16].to_vec();
        e[2] = 0;
        assert_eq!(msg(&e), "batch has no record");
        assert_eq!(msg(&good[..16 + 56 + 8]), "record 1 at byte 72: 8 bytes left, a record header is 32");
        assert_eq!(msg(&good[..good.len() - 1]), "record 1 at byte 72: 56 bytes announced, 55 left");
        let mut t = good.clone();
        t[72 + 1] = 7;
        assert_eq!(msg(&t), "record 1 at byte 72: rtype 7 (publishers send 1 trade or 2 quote)");
        let mut l = good.clone();
        l[16] = 40;
        assert_eq!(msg(&l), "record 0 at byte 16: len 40 does not match rtype 1 (which is 56 bytes)");
        assert_eq!(
            msg(&batch(&[trade(9, 1, 0), trade(8, 1, 0)])),
            "record 1 at byte 72: feed_id 8 but this connection publishes feed 9"
        );
        assert_eq!(msg(&batch(&[trade(9, 3, 0)])), "record 0 at byte 16: instrument_id 3 (the feed has ids 1..=2)");
        assert_eq!(
            msg(&batch(&[trade(9, 1, 0).with_flags(1)])),
            "record 0 at byte 16: record flags and padding must be 0 (flags are set by the server)"
        );
        let mut x = good.clone();
        x.extend_from_slice(&[0; 8]);
        assert_eq!(msg(&x), "8 bytes after the 2 records the header announces");
    }

    #[test]
    fn every_reason_has_one_label() {
        let labels: std::collections::HashSet<&str> = PublishReject::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), PublishReject::ALL.len());
    }

    #[test]
    fn seqs_are_assigned_or_kept_and_never_go_back() {
        let c = catalog();
        let feed = c.get(0).expect("feed");
        let append = |recs: &[(u32, Record)]| {
            let mut log = feed.log_mut();
            for (instr, rec) in recs {
                log.append(*instr, *rec);
            }
        };
        let mut last = HashMap::new();
        let mut seq = |recs: &mut [(u32, Record)], at| sequence(feed, &feed.log(), recs, at, &mut last);
        let mut recs = vec![(0, trade(9, 1, 0)), (0, trade(9, 1, 0)), (1, trade(9, 2, 10))];
        seq(&mut recs, 5).expect("first batch");
        assert_eq!(recs.iter().map(|(_, r)| r.seq()).collect::<Vec<_>>(), vec![1, 2, 10]);
        assert!(recs.iter().all(|(_, r)| r.ts_recv_ns() == 5));
        append(&recs);
        // A batch with one backwards seq is refused whole.
        let mut bad = vec![(0, trade(9, 1, 0)), (1, trade(9, 2, 10))];
        let e = seq(&mut bad, 6).expect_err("backwards");
        assert_eq!(e.reason, PublishReject::SeqBackwards);
        assert!(e.message.contains("record 1"), "{}", e.message);
        let mut ok = vec![(0, trade(9, 1, 0)), (1, trade(9, 2, 0))];
        seq(&mut ok, 7).expect("continues");
        assert_eq!(ok.iter().map(|(_, r)| r.seq()).collect::<Vec<_>>(), vec![3, 11]);
    }

    /// A taken batch goes through the engine's ingest: in the log, then queued; a
    /// refused one reaches neither.
    #[tokio::test]
    async fn take_appends_then_queues_and_a_refusal_changes_nothing() {
        let c = Arc::new(catalog());
        let shard = Arc::new(crate::engine::ShardInbox::new(16));
        let ingest = Ingest::new(
            Arc::from(vec![shard.clone()]),
            c.clone(),
            Arc::from(vec![prometheus::IntCounter::new("t", "t").expect("counter")]),
        );
        let feed = c.get(0).expect("feed");
        let never = CancellationToken::new();
        let mut src = PublishSource::new(0);
        let taken = src.take(feed, &batch(&[trade(9, 1, 0), trade(9, 2, 5)]), &ingest, &never).await;
        assert_eq!(taken, Ok(Taken::Queued));
        assert_eq!((feed.log().last_seq(0), feed.log().last_seq(1), shard.queue.len()), (1, 5, 2));
        let refused = src.take(feed, &batch(&[trade(9, 1, 0), trade(9, 2, 5)]), &ingest, &never).await;
        assert_eq!(refused.expect_err("seq 5 again").reason, PublishReject::SeqBackwards);
        assert_eq!((feed.log().last_seq(0), feed.log().len(), shard.queue.len()), (1, 2, 2));
    }
}
