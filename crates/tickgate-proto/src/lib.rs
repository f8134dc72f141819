//! tickgate's wire protocol, exactly as `shared/spec/protocol-v1.md` defines it, and
//! nothing else: no tokio, no sockets, so the server, the Rust client, the load tools and
//! the fuzz targets all share one definition of every byte.
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | [`codec`] | binary batches and records (spec §5): the encoder, the client decoder (`decode_batch`) and the strict decoder publishers' batches and recordings go through (`StrictBatch`, `check_known_header`), one `DecodeError` |
//! | [`control`] | JSON control messages (spec §4), each type both parsed and serialised; error codes |
//! | [`close`] | WebSocket close codes (spec §8) and every fixed (code, reason) pair the server sends (`close::Reason`) |
//! | [`recording`] | the `*.tgrec` recording format written by `tickgate record`, read by replay feeds |
//! | [`ws`] | RFC 6455 headers of the server's own frames (final, unmasked), which the server and the load tools write themselves |

pub mod codec;
pub mod control;
pub mod recording;
pub mod ws;

/// The WebSocket subprotocol every client must offer.
pub const SUBPROTOCOL: &str = "tickgate.v1";
/// Prefix of the browser credential subprotocol (`bearer.<JWT>`).
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// Close codes of spec §8.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Server shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Binary frame from the client.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Policy violation (repeated bad control messages, rate limit).
    pub const POLICY: u16 = 1008;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Token expired.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// No in-band auth in time.
    pub const AUTH_TIMEOUT: u16 = 4002;
    /// Token revoked.
    pub const TOKEN_REVOKED: u16 = 4003;
    /// In-band auth refused.
    pub const AUTH_REFUSED: u16 = 4004;
    /// Slow consumer.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// A text frame that is not UTF-8 (RFC 6455 §7.4.1; the spec's protocol errors).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The server cannot go on for a reason of its own (RFC 6455 §7.4.1).
    pub const INTERNAL_ERROR: u16 = 1011;

    /// Every close the server sends with a fixed reason text: the one place a (code,
    /// reason) pair is written, so the engine (streams), the edge (publishers, the
    /// connection loop) and clients read the same bytes. The one close with a variable
    /// reason, 4004 (in-band auth refused, the reason naming the refusal), is not here:
    /// it is [`AUTH_REFUSED`] with its own text.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Reason {
        /// 1001 `server shutting down`: shutdown (streams after a `shutdown` message).
        ShuttingDown,
        /// 1002 `protocol error`: a frame RFC 6455 refuses.
        ProtocolError,
        /// 1002 `frame length with the most significant bit set` (RFC 6455 §5.2).
        LengthHighBit,
        /// 1003 `binary frames are not accepted`: a stream client sent a binary frame.
        BinaryFrame,
        /// 1007 `invalid UTF-8 in a text frame`.
        InvalidUtf8,
        /// 1008 `heartbeat timeout`: no pong for two heartbeat intervals.
        HeartbeatTimeout,
        /// 1008 `too many bad or rate-limited messages`: a stream over its strike limit.
        TooManyStrikes,
        /// 1008 `too many refused batches`: a publisher over its strike limit.
        TooManyRefusedBatches,
        /// 1008 `too many connections for this subject`: the per-subject cap, found at
        /// in-band `auth` (a handshake with a token is refused with 429 instead).
        SubjectLimit,
        /// 1009 `message too big`: a message over the frame limits.
        MessageTooBig,
        /// 1009 `frame too big`: a frame over the frame limits.
        FrameTooBig,
        /// 1011 `NATS did not acknowledge`: a publisher of a `nats` feed whose batches
        /// JetStream did not take (the publisher resends from its last `pong`).
        NatsUnavailable,
        /// 4001 `token expired`: the session's deadline (`exp` + grace) passed.
        TokenExpired,
        /// 4002 `no in-band auth in time`.
        AuthTimeout,
        /// 4003 `token revoked`: `/admin/revoke` named the session's `sub` or `jti`.
        TokenRevoked,
        /// 4008 `slow consumer`: the connection's queue overflowed under the disconnect
        /// policy.
        SlowConsumer,
    }

    impl Reason {
        /// Every reason, in code order.
        pub const ALL: [Reason; 16] = [
            Reason::ShuttingDown,
            Reason::ProtocolError,
            Reason::LengthHighBit,
            Reason::BinaryFrame,
            Reason::InvalidUtf8,
            Reason::HeartbeatTimeout,
            Reason::TooManyStrikes,
            Reason::TooManyRefusedBatches,
            Reason::SubjectLimit,
            Reason::MessageTooBig,
            Reason::FrameTooBig,
            Reason::NatsUnavailable,
            Reason::TokenExpired,
            Reason::AuthTimeout,
            Reason::TokenRevoked,
            Reason::SlowConsumer,
        ];

        /// The close code (spec §8).
        pub const fn code(self) -> u16 {
            match self {
                Reason::ShuttingDown => GOING_AWAY,
                Reason::ProtocolError | Reason::LengthHighBit => PROTOCOL_ERROR,
                Reason::BinaryFrame => UNSUPPORTED_DATA,
                Reason::InvalidUtf8 => INVALID_PAYLOAD,
                Reason::HeartbeatTimeout
                | Reason::TooManyStrikes
                | Reason::TooManyRefusedBatches
                | Reason::SubjectLimit => POLICY,
                Reason::MessageTooBig | Reason::FrameTooBig => TOO_BIG,
                Reason::NatsUnavailable => INTERNAL_ERROR,
                Reason::TokenExpired => TOKEN_EXPIRED,
                Reason::AuthTimeout => AUTH_TIMEOUT,
                Reason::TokenRevoked => TOKEN_REVOKED,
                Reason::SlowConsumer => SLOW_CONSUMER,
            }
        }

        /// The reason text the close frame carries (at most 123 bytes, as RFC 6455
        /// allows).
        pub const fn reason(self) -> &'static str {
            match self {
                Reason::ShuttingDown => "server shutting down",
                Reason::ProtocolError => "protocol error",
                Reason::LengthHighBit => "frame length with the most significant bit set",
                Reason::BinaryFrame => "binary frames are not accepted",
                Reason::InvalidUtf8 => "invalid UTF-8 in a text frame",
                Reason::HeartbeatTimeout => "heartbeat timeout",
                Reason::TooManyStrikes => "too many bad or rate-limited messages",
                Reason::TooManyRefusedBatches => "too many refused batches",
                Reason::SubjectLimit => "too many connections for this subject",
                Reason::MessageTooBig => "message too big",
                Reason::FrameTooBig => "frame too big",
                Reason::NatsUnavailable => "NATS did not acknowledge",
                Reason::TokenExpired => "token expired",
                Reason::AuthTimeout => "no in-band auth in time",
                Reason::TokenRevoked => "token revoked",
                Reason::SlowConsumer => "slow consumer",
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::Reason;

        /// The wire's pairs, byte for byte: a changed text or code is a protocol change.
        #[test]
        fn reasons_are_the_wire_pairs() {
            let pairs: Vec<(u16, &str)> = Reason::ALL.iter().map(|r| (r.code(), r.reason())).collect();
            assert_eq!(
                pairs,
                [
                    (1001, "server shutting down"),
                    (1002, "protocol error"),
                    (1002, "frame length with the most significant bit set"),
                    (1003, "binary frames are not accepted"),
                    (1007, "invalid UTF-8 in a text frame"),
                    (1008, "heartbeat timeout"),
                    (1008, "too many bad or rate-limited messages"),
                    (1008, "too many refused batches"),
                    (1008, "too many connections for this subject"),
                    (1009, "message too big"),
                    (1009, "frame too big"),
                    (1011, "NATS did not acknowledge"),
                    (4001, "token expired"),
                    (4002, "no in-band auth in time"),
                    (4003, "token revoked"),
                    (4008, "slow consumer"),
                ]
            );
            assert!(Reason::ALL.iter().all(|r| r.reason().len() <= 123));
        }
    }
}

/// Nanoseconds since the Unix epoch, from the wall clock.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}
