//! `tickgate publish --nats`: a feed handler that publishes a feed definition's synthetic
//! source, a recording (a replay file, or records on standard input) into NATS JetStream
//! by nats-feeds-v1: the feed's streams found-and-checked or created, one message per run
//! of records of one instrument and type on `<prefix>.<FEED>.<ID>.t|q`, headers
//! `Tickgate-Epoch` and `Nats-Msg-Id`, every message acknowledged by JetStream.
//!
//! **Epoch.** A handler that starts does not know what an earlier one sent, so it starts
//! a new epoch: above the epoch of the stream's last message, and at least the wall clock
//! in milliseconds (so two restarts in a row never reuse one). Clients get `reset`, then
//! seqs 1, 2, 3, ... per instrument.
//!
//! **Acks and retries.** Up to `max_in_flight` messages wait for their acks, oldest first.
//! A message whose ack failed or timed out is sent again with the same `Nats-Msg-Id`
//! (JetStream drops it as a duplicate if the first one was stored after all), and so is
//! every later message already in flight, in order, so a retry after a failover is not
//! duplicated and, in the usual case, not reordered. An ack marked `duplicate` for a
//! message sent for the first time is an error: another handler, or a restarted one that
//! reused the epoch, is publishing the same feed.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::HeaderMap;
use bytes::Bytes;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use super::contract::{self, EPOCH_HEADER};
use super::streams::{self, EnsureError};
use crate::config::NatsConfig;
use crate::feeds::FeedDef;
use tickgate_proto::codec::Record;

/// Why the handler stopped.
#[derive(Debug, Error)]
pub enum HandlerError {
    /// NATS could not be reached or refused the credentials.
    #[error("NATS: {0}")]
    Connect(String),
    /// The feed's streams contradict the contract or this feed file.
    #[error("{0}")]
    Stream(String),
    /// A message kept failing to be acknowledged.
    #[error("NATS did not acknowledge {subject} (Nats-Msg-Id {id}) after {attempts} attempts: {last}")]
    NotAcked {
        /// The message's subject.
        subject: String,
        /// Its `Nats-Msg-Id`.
        id: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// JetStream already had a message never sent before by this handler.
    #[error(
        "JetStream reports {id} as a duplicate of a message this handler never sent: another handler is \
         publishing feed {feed} with the same epoch"
    )]
    Duplicate {
        /// The feed.
        feed: String,
        /// The `Nats-Msg-Id`.
        id: String,
    },
    /// The records to publish could not be read.
    #[error("{0}")]
    Input(String),
}

/// What the handler publishes.
pub enum HandlerInput {
    /// The feed definition's synthetic source, at its rate, for `count` ticks (None: until
    /// cancelled).
    Synthetic {
        /// Ticks to publish.
        count: Option<u64>,
    },
    /// Records in the recording format (a replay file, or standard input), as fast as
    /// JetStream takes them; records of another feed or out of the feed's symbols are an
    /// error.
    Recording(Box<dyn std::io::Read + Send>),
}

impl std::fmt::Debug for HandlerInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerInput::Synthetic { count } => f.debug_struct("Synthetic").field("count", count).finish(),
            HandlerInput::Recording(_) => f.write_str("Recording"),
        }
    }
}

/// How the handler went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandlerStats {
    /// The epoch published.
    pub epoch: u64,
    /// Messages acknowledged.
    pub messages: u64,
    /// Records in them.
    pub records: u64,
    /// Messages sent again after a failed ack.
    pub retries: u64,
}

/// A message in flight: what is needed to send it again.
struct Pending {
    subject: String,
    id: String,
    headers: HeaderMap,
    payload: Bytes,
    records: u64,
    /// Taken when awaited.
    ack: Option<PublishAckFuture>,
    retried: bool,
}

/// Publishes `input` for the feed `def` until it ends or `cancel` fires, then waits for
/// every ack.
pub async fn run(
    cfg: &NatsConfig,
    def: &FeedDef,
    input: HandlerInput,
    max_in_flight: usize,
    cancel: &CancellationToken,
) -> Result<HandlerStats, HandlerError> {
    let servers: Vec<async_nats::ServerAddr> = cfg
        .servers
        .iter()
        .map(|s| s.parse().map_err(|e| HandlerError::Connect(format!("{s:?}: {e}"))))
        .collect::<Result<_, _>>()?;
    let opts = super::credentials(cfg).await.map_err(HandlerError::Connect)?;
    let client = opts
        .name("tickgate-publish")
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .connect(servers)
        .await
        .map_err(|e| HandlerError::Connect(e.to_string()))?;
    let js = jetstream::new(client);
    let mut stream = streams::ensure(&js, cfg, def).await.map_err(|e| match e {
        EnsureError::Contract(m) | EnsureError::Nats(m) => HandlerError::Stream(m),
    })?;
    let last_epoch = last_epoch(&mut stream).await?;
    let epoch = last_epoch.saturating_add(1).max(crate::feeds::epoch::now_ms());
    tracing::info!(feed = %def.name, epoch, previous = last_epoch, "publishing a new epoch");
    let mut p = Publisher {
        js,
        prefix: cfg.subject_prefix.clone(),
        feed: def.name.clone(),
        epoch,
        in_flight: VecDeque::new(),
        max_in_flight: max_in_flight.max(1),
        stats: HandlerStats { epoch, ..HandlerStats::default() },
    };
    match input {
        HandlerInput::Synthetic { count } => p.synthetic(def, count, cancel).await?,
        HandlerInput::Recording(r) => p.recording(def, r, cancel).await?,
    }
    while !p.in_flight.is_empty() {
        p.settle_oldest().await?;
    }
    Ok(p.stats)
}

/// The epoch of the stream's last message (0: empty stream, or no valid header).
async fn last_epoch(stream: &mut jetstream::stream::Stream) -> Result<u64, HandlerError> {
    let info = stream.info().await.map_err(|e| HandlerError::Stream(format!("stream info: {e}")))?;
    let last = info.state.last_sequence;
    if info.state.messages == 0 || last == 0 {
        return Ok(0);
    }
    match stream.get_raw_message(last).await {
        Ok(m) => {
            Ok(m.headers.get(EPOCH_HEADER).and_then(|v| contract::parse_epoch(Some(v.as_str())).ok()).unwrap_or(0))
        }
        Err(e) => Err(HandlerError::Stream(format!("reading the stream's last message: {e}"))),
    }
}

struct Publisher {
    js: jetstream::Context,
    prefix: String,
    feed: String,
    epoch: u64,
    in_flight: VecDeque<Pending>,
    max_in_flight: usize,
    stats: HandlerStats,
}

impl Publisher {
    /// Publishes `records` (one feed, in seq order per instrument) as one message per run of
    /// the same instrument and type.
    async fn publish(&mut self, records: &[Record]) -> Result<(), HandlerError> {
        let out: Vec<contract::Outgoing> = contract::messages(&self.prefix, &self.feed, self.epoch, records).collect();
        for m in out {
            if self.in_flight.len() >= self.max_in_flight {
                self.settle_oldest().await?;
            }
            let ack = self.send(&m.subject, &m.id, &m.headers, &m.payload).await?;
            self.in_flight.push_back(Pending {
                subject: m.subject,
                id: m.id,
                headers: m.headers,
                payload: m.payload,
                records: m.records as u64,
                ack: Some(ack),
                retried: false,
            });
        }
        Ok(())
    }

    async fn send(
        &self,
        subject: &str,
        id: &str,
        headers: &HeaderMap,
        payload: &Bytes,
    ) -> Result<PublishAckFuture, HandlerError> {
        let mut last = String::new();
        for attempt in 0..20u32 {
            match self.js.publish_with_headers(subject.to_owned(), headers.clone(), payload.clone()).await {
                Ok(f) => return Ok(f),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt + 1).min(20))).await;
        }
        Err(HandlerError::NotAcked { subject: subject.to_owned(), id: id.to_owned(), attempts: 20, last })
    }

    /// Waits for the oldest ack; on failure sends it and everything after it again, in
    /// order (same `Nats-Msg-Id`s).
    async fn settle_oldest(&mut self) -> Result<(), HandlerError> {
        let mut attempts = 0u32;
        loop {
            let Some(mut oldest) = self.in_flight.pop_front() else { return Ok(()) };
            let Some(ack) = oldest.ack.take() else { continue };
            let error = match ack.await {
                Ok(ack) if ack.duplicate && !oldest.retried => {
                    return Err(HandlerError::Duplicate { feed: self.feed.clone(), id: oldest.id });
                }
                Ok(_) => {
                    self.stats.messages += 1;
                    self.stats.records += oldest.records;
                    return Ok(());
                }
                Err(e) => e.to_string(),
            };
            attempts += 1;
            if attempts >= 20 {
                return Err(HandlerError::NotAcked { subject: oldest.subject, id: oldest.id, attempts, last: error });
            }
            tracing::warn!(subject = %oldest.subject, id = %oldest.id, error = %error, attempt = attempts,
                "no JetStream ack; sending it (and what followed) again");
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempts).min(10))).await;
            // Everything from the failed one on goes again, in order.
            let mut again = vec![oldest];
            again.extend(self.in_flight.drain(..));
            for mut m in again {
                m.ack = Some(self.send(&m.subject, &m.id, &m.headers, &m.payload).await?);
                m.retried = true;
                self.stats.retries += 1;
                self.in_flight.push_back(m);
            }
        }
    }

    async fn synthetic(
        &mut self,
        def: &FeedDef,
        count: Option<u64>,
        cancel: &CancellationToken,
    ) -> Result<(), HandlerError> {
        let Some(sdef) = &def.synthetic else {
            return Err(HandlerError::Input(format!("feed {} has no [synthetic] section", def.name)));
        };
        let mut generator = crate::sources::synthetic::Generator::new(sdef, 0, def.id, def.symbols.len());
        let start = tokio::time::Instant::now();
        let start_wall = tickgate_proto::now_ns() as i64;
        let period_ns = 1e9 / sdef.rate_per_s;
        let mut emitted = 0u64;
        let mut burst: Vec<Record> = Vec::new();
        loop {
            if count.is_some_and(|c| emitted >= c) || cancel.is_cancelled() {
                return Ok(());
            }
            let elapsed = start.elapsed().as_nanos() as f64;
            let mut due = ((elapsed / period_ns) as u64).saturating_sub(emitted).min(50_000);
            if let Some(c) = count {
                due = due.min(c - emitted);
            }
            if due == 0 {
                let next_at = start + Duration::from_nanos(((emitted + 1) as f64 * period_ns) as u64);
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep_until(next_at) => continue,
                }
            }
            burst.clear();
            for _ in 0..due {
                emitted += 1;
                let scheduled = start_wall + (emitted as f64 * period_ns) as i64;
                burst.push(generator.next_tick(scheduled, 0).record);
            }
            // Longer runs per message: a burst grouped by instrument (a stable sort keeps each
            // instrument's seq order, which its trades and quotes share, so it must not be
            // sorted by type too).
            burst.sort_by_key(|r| r.instrument_id());
            self.publish(&burst).await?;
        }
    }

    async fn recording(
        &mut self,
        def: &FeedDef,
        input: Box<dyn std::io::Read + Send>,
        cancel: &CancellationToken,
    ) -> Result<(), HandlerError> {
        let mut reader = tickgate_proto::recording::Reader::new(input)
            .map_err(|e| HandlerError::Input(format!("recording: {e}")))?;
        if reader.meta().symbols != def.symbols {
            return Err(HandlerError::Input(format!(
                "the recording's symbols ({}) are not feed {}'s ({}): instrument ids would not match",
                reader.meta().symbols.len(),
                def.name,
                def.symbols.len()
            )));
        }
        let mut batch = Vec::with_capacity(4096);
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            batch.clear();
            while batch.len() < 4096 {
                match reader.next_record() {
                    Ok(Some(r)) => batch.push(r.with_feed_id(def.id).with_recv_ts(0)),
                    Ok(None) => break,
                    Err(e) => return Err(HandlerError::Input(format!("recording: {e}"))),
                }
            }
            if batch.is_empty() {
                return Ok(());
            }
            self.publish(&batch).await?;
        }
    }
}
