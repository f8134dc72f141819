//! What a shard counts and shows: [`CoreStats`] (hot-path counters kept in plain integers
//! on the shard's thread and added to Prometheus by the shard's flusher), [`GapReason`]
//! (the `reason` of `gap` messages and of `tickgate_gaps_sent_total`), [`ResumeResult`]
//! and [`RefreshResult`] (the `result` labels of the resume and refresh counters, primed
//! by `Engine::start`), and [`ConnInfo`]
//! (one connection in `GET /admin/connections`). Plain data: the core that fills them
//! depends on this module, never the other way round (the view that reads the core is
//! `view`).

use tickgate_proto::control::ErrorCode;

/// Why a `gap` message is sent: its `reason` field on the wire and the `reason` label of
/// `tickgate_gaps_sent_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GapReason {
    /// A conflating connection dropped trades while it was behind.
    SlowConsumer,
    /// A resume asked for seqs the feed log no longer holds (a snapshot follows).
    ReplayUnavailable,
    /// The source itself skipped seqs.
    SourceGap,
    /// A throttled subscription's interval had more trades than one update carries
    /// (`limits.max_trades_per_update`).
    Throttled,
}

impl GapReason {
    /// Every reason, in [`CoreStats::gaps`] order.
    pub(crate) const ALL: [GapReason; 4] =
        [GapReason::SlowConsumer, GapReason::ReplayUnavailable, GapReason::SourceGap, GapReason::Throttled];

    /// The reason as it appears on the wire and in the metric label.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            GapReason::SlowConsumer => "slow_consumer",
            GapReason::ReplayUnavailable => "replay_unavailable",
            GapReason::SourceGap => "source_gap",
            GapReason::Throttled => "throttled",
        }
    }

    /// Position in [`GapReason::ALL`] and [`CoreStats::gaps`].
    const fn index(self) -> usize {
        self as usize
    }
}

/// How a resume was answered: the `result` label of `tickgate_resumes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResumeResult {
    /// Served from the feed log.
    Replayed,
    /// Answered with a `gap` and a snapshot.
    Unavailable,
}

impl ResumeResult {
    /// Every result, in [`CoreStats::resumes`] order.
    pub(crate) const ALL: [ResumeResult; 2] = [ResumeResult::Replayed, ResumeResult::Unavailable];

    /// The metric label.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            ResumeResult::Replayed => "replayed",
            ResumeResult::Unavailable => "unavailable",
        }
    }
}

/// How an in-band refresh was answered: the `result` label of
/// `tickgate_token_refreshes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefreshResult {
    /// The new token was applied.
    Ok,
    /// The new token was refused (invalid, another subject or issuer, no scope left).
    Refused,
    /// Over the refresh rate limit.
    RateLimited,
}

impl RefreshResult {
    /// Every result, in the order the label values are primed.
    pub(crate) const ALL: [RefreshResult; 3] = [RefreshResult::Ok, RefreshResult::Refused, RefreshResult::RateLimited];

    /// The metric label.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            RefreshResult::Ok => "ok",
            RefreshResult::Refused => "refused",
            RefreshResult::RateLimited => "rate_limited",
        }
    }
}

/// Counters kept locally by the shard and flushed to Prometheus periodically, so the
/// delivery path touches no shared atomic.
#[derive(Debug, Default, Clone)]
pub struct CoreStats {
    /// Records written to sockets, per feed index.
    pub delivered: Vec<u64>,
    /// Binary frames written.
    pub frames: u64,
    /// Bytes of binary and text frames written.
    pub bytes: u64,
    /// Socket flushes (one per writer wake-up that wrote something).
    pub flushes: u64,
    /// Slow-consumer disconnects.
    pub slow_disconnects: u64,
    /// Control errors by code.
    pub control_errors: Vec<(ErrorCode, u64)>,
    /// Refreshes by result.
    pub refresh_ok: u64,
    /// Refused refreshes.
    pub refresh_refused: u64,
    /// Source gaps observed (a seq jump in the feed itself).
    pub source_gaps: u64,
    /// Connections closed at token expiry.
    pub expiries: u64,
    /// Connections closed by revocation.
    pub revocations: u64,
    /// Refreshes refused for coming too often.
    pub refresh_rate_limited: u64,
    /// Times a connection started conflating.
    pub conflate_episodes: u64,
    /// Records not queued because their connection was conflating.
    pub conflated_records: u64,
    /// `gap` messages sent, in `GapReason::ALL` order.
    pub gaps: [u64; 4],
    /// Updates of throttled subscriptions queued (one per subscriber and interval).
    pub throttle_updates: u64,
    /// Quotes of throttled subscriptions replaced by a later quote of the same interval.
    pub throttle_replaced: u64,
    /// Records sent from the resume buffer.
    pub replayed_records: u64,
    /// Resumes, in `ResumeResult::ALL` order.
    pub resumes: [u64; 2],
    /// Epoch resets applied.
    pub resets: u64,
    /// Connections closed (4008) to bring the server back within its outbound budget.
    pub budget_disconnects: u64,
    /// Connections set conflating to bring the server back within its outbound budget.
    pub budget_conflations: u64,
    /// Nanoseconds the shard took no ticks because it owed writes (`ShardCore::owes`).
    pub intake_paused_ns: u64,
    /// How long the last tick dispatched had waited since ingest, in ns (0 once the
    /// inbound queue was found empty).
    pub dispatch_lag_ns: u64,
}

impl CoreStats {
    /// Counts a control error reply.
    pub(crate) fn error(&mut self, code: ErrorCode) {
        match self.control_errors.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => self.control_errors.push((code, 1)),
        }
    }

    /// Counts a `gap` message.
    pub(crate) fn gap(&mut self, reason: GapReason) {
        self.gaps[reason.index()] += 1;
    }

    /// Refreshes answered with `result` so far.
    pub(crate) fn refreshes(&self, result: RefreshResult) -> u64 {
        match result {
            RefreshResult::Ok => self.refresh_ok,
            RefreshResult::Refused => self.refresh_refused,
            RefreshResult::RateLimited => self.refresh_rate_limited,
        }
    }

    /// Counts a resume.
    pub(crate) fn resume(&mut self, result: ResumeResult) {
        self.resumes[result as usize] += 1;
    }
}

/// One connection as `GET /admin/connections` shows it (no token, no per-symbol detail).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnInfo {
    /// Session id (as in `welcome`).
    pub session: String,
    /// Token subject.
    pub sub: String,
    /// Shard the connection lives on.
    pub shard: usize,
    /// Subscribed instruments.
    pub subscriptions: usize,
    /// Outbound bytes queued, not yet taken by the socket.
    pub queued_bytes: usize,
    /// Token expiry (seconds since the epoch); absent in the no-auth bench mode.
    pub token_exp: Option<u64>,
    /// A close has been decided (expiry, revocation, slow consumer, shutdown).
    pub closing: bool,
}
