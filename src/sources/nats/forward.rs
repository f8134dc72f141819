//! `GET /v1/publish` into a `nats` feed (nats-feeds-v1 §3, "Publishing through an edge"):
//! a publisher's batches are not taken in here but forwarded to JetStream, by the contract
//! (one message per run of one instrument and type, `Tickgate-Epoch`, `Nats-Msg-Id`), and
//! come back to this edge, like to every other, through the feed's consumer. The
//! publisher's `pong` waits for every earlier batch's ack ([`Forward::settle`]).
//!
//! A batch is checked whole before any of it is sent: the publish decoder's rules, plus
//! seqs given by the publisher (numbering belongs to the feed handler, so seq 0 is
//! refused) and above both the feed's last seq on this edge and what this connection
//! already forwarded.

use std::collections::{HashMap, VecDeque};

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::HeaderMap;
use bytes::Bytes;

use super::contract::{messages, Outgoing};
use crate::feeds::Feed;
use crate::sources::publish::{decode, PublishReject, Reject};
use tickgate_proto::codec::Record;

/// Acks awaited at once before a new batch waits for the oldest.
const MAX_PENDING: usize = 256;

/// Why a batch was not forwarded.
#[derive(Debug)]
pub(crate) enum ForwardError {
    /// The batch breaks a rule; nothing of it was sent.
    Refused(Reject),
    /// JetStream did not acknowledge (after one resend with the same `Nats-Msg-Id`).
    Unavailable(String),
}

struct Sent {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    ack: Option<PublishAckFuture>,
}

/// One publisher connection's forwarding into its `nats` feed.
pub(crate) struct Forward {
    js: jetstream::Context,
    prefix: String,
    epoch: u64,
    /// Last seq forwarded per instrument by this connection.
    last: HashMap<u32, u64>,
    pending: VecDeque<Sent>,
    recs: Vec<(u32, Record)>,
    /// The same records without their instrument index, for [`messages`].
    records: Vec<Record>,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward").field("epoch", &self.epoch).field("pending", &self.pending.len()).finish()
    }
}

impl Forward {
    /// Forwarding for `feed` in `epoch` (the publisher's `epoch` query parameter, else
    /// the feed's current one, else a new one from the clock).
    pub(crate) fn new(js: jetstream::Context, prefix: &str, feed: &Feed, epoch: Option<u64>) -> Forward {
        let epoch = epoch.unwrap_or_else(|| match feed.epoch() {
            0 => crate::feeds::epoch::now_ms(),
            e => e,
        });
        Forward {
            js,
            prefix: prefix.to_owned(),
            epoch,
            last: HashMap::new(),
            pending: VecDeque::new(),
            records: Vec::new(),
            recs: Vec::new(),
        }
    }

    /// The epoch this connection publishes.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Checks one batch and sends it as messages (acks awaited later, or when too many
    /// are pending).
    pub(crate) async fn forward(&mut self, feed: &Feed, msg: &[u8]) -> Result<(), ForwardError> {
        decode(msg, feed.id(), feed.instrument_count(), &mut self.recs).map_err(ForwardError::Refused)?;
        {
            let log = feed.log();
            let same_epoch = log.epoch() == self.epoch;
            let mut last = self.last.clone();
            for (k, (instr, rec)) in self.recs.iter().enumerate() {
                let floor =
                    last.get(instr).copied().unwrap_or(0).max(if same_epoch { log.last_seq(*instr) } else { 0 });
                if rec.seq() == 0 {
                    return Err(ForwardError::Refused(Reject {
                        reason: PublishReject::SeqBackwards,
                        message: format!(
                            "record {k}: seq 0, but the seqs of a nats feed come from its feed handler (give 1, 2, 3, ...)"
                        ),
                    }));
                }
                if rec.seq() <= floor {
                    return Err(ForwardError::Refused(Reject {
                        reason: PublishReject::SeqBackwards,
                        message: format!(
                            "record {k}: seq {} of {} is not above the last {floor} (epoch {})",
                            rec.seq(),
                            feed.symbol(*instr),
                            self.epoch
                        ),
                    }));
                }
                last.insert(*instr, rec.seq());
            }
            self.last = last;
        }
        self.records.clear();
        self.records.extend(self.recs.iter().map(|(_, r)| *r));
        let messages: Vec<Outgoing> = messages(&self.prefix, feed.name(), self.epoch, &self.records).collect();
        for Outgoing { subject, headers, payload, .. } in messages {
            if self.pending.len() >= MAX_PENDING {
                self.settle_one().await?;
            }
            let ack = self.send(&subject, &headers, &payload).await?;
            self.pending.push_back(Sent { subject, headers, payload, ack: Some(ack) });
        }
        Ok(())
    }

    async fn send(
        &self,
        subject: &str,
        headers: &HeaderMap,
        payload: &Bytes,
    ) -> Result<PublishAckFuture, ForwardError> {
        self.js
            .publish_with_headers(subject.to_owned(), headers.clone(), payload.clone())
            .await
            .map_err(|e| ForwardError::Unavailable(e.to_string()))
    }

    async fn settle_one(&mut self) -> Result<(), ForwardError> {
        let Some(mut sent) = self.pending.pop_front() else { return Ok(()) };
        let Some(ack) = sent.ack.take() else { return Ok(()) };
        if ack.await.is_ok() {
            return Ok(());
        }
        // Once more with the same Nats-Msg-Id: JetStream drops it if the first was stored.
        let again = self.send(&sent.subject, &sent.headers, &sent.payload).await?;
        again.await.map(|_| ()).map_err(|e| ForwardError::Unavailable(e.to_string()))
    }

    /// Waits until JetStream acknowledged every batch forwarded so far (before a `pong`).
    pub(crate) async fn settle(&mut self) -> Result<(), ForwardError> {
        while !self.pending.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }
}
