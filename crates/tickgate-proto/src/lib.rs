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
//! | [`close`] | WebSocket close codes (spec §8) |
//! | [`recording`] | the `*.tgrec` recording format written by `tickgate record`, read by replay feeds |

pub mod codec;
pub mod control;
pub mod recording;

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
}

/// Nanoseconds since the Unix epoch, from the wall clock.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}
