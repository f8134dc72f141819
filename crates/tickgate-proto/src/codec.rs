//! The binary record layout of spec §5: one WebSocket binary message is one batch,
//! a 16-byte batch header followed by `count` records, each a 32-byte header plus a
//! body, every record a multiple of 8 bytes long. All integers are little-endian.
//!
//! Encoding happens once per tick, at ingest ([`Record`] holds the finished bytes);
//! the shards only copy those bytes into per-connection batches.
//!
//! This module is the only place that knows byte offsets. It holds the encoder
//! ([`Record::encode`], [`encode_batch`], [`write_batch_header`]) and the decoders, which
//! share their rules and one error ([`DecodeError`], a variant per rule):
//! - [`decode_batch`], the client's: unknown record types are skipped by their length
//!   and flags are kept, as spec §5 asks of clients;
//! - [`StrictBatch`], the strict one for what publishers send: clean header, at least
//!   one record, only trades and quotes of their exact length, flags and padding 0;
//! - [`check_known_header`], the per-record rule the strict decoder and the recording
//!   reader share.

use thiserror::Error;

/// Protocol version carried in byte 0 of every batch.
pub const VERSION: u8 = 1;
/// Size of the batch header.
pub const BATCH_HEADER_LEN: usize = 16;
/// Size of every record's common header.
pub const RECORD_HEADER_LEN: usize = 32;
/// `rtype` of a trade.
pub const RTYPE_TRADE: u8 = 1;
/// `rtype` of a top-of-book quote.
pub const RTYPE_QUOTE: u8 = 2;
/// Total length of a trade record.
pub const TRADE_LEN: usize = 56;
/// Total length of a quote record.
pub const QUOTE_LEN: usize = 72;
/// The longest record this server writes; sizes the fixed record buffer.
pub const MAX_RECORD_LEN: usize = QUOTE_LEN;
/// Most records one batch can carry (the count field is a u16).
pub const MAX_BATCH_RECORDS: usize = u16::MAX as usize;

/// Record flag: last value sent on subscribe.
pub const FLAG_SNAPSHOT: u8 = 1 << 0;
/// Record flag: sent from the resume buffer.
pub const FLAG_REPLAY: u8 = 1 << 1;
/// Record flag: earlier quotes of this instrument were skipped.
pub const FLAG_CONFLATED: u8 = 1 << 2;

/// Fixed-point scale of prices and sizes: 9 decimals.
pub const FIXED_SCALE: i64 = 1_000_000_000;

/// Byte offset of the `flags` field inside a trade record.
const TRADE_FLAGS_AT: usize = 49;
/// Byte offset of the `flags` field inside a quote record.
const QUOTE_FLAGS_AT: usize = 64;

/// Why a batch or record could not be decoded: the one error of every decoder here
/// ([`decode_batch`] for clients, [`StrictBatch`] for publishers' batches,
/// [`check_known_header`] for the recording reader). Each variant is one rule of the
/// layout, so a caller that answers a peer (the publish endpoint) maps variants to its
/// own reasons without looking at bytes.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the structure needs.
    #[error("truncated: need {need} bytes at offset {at}, have {have}")]
    Truncated {
        /// Index of the record being read, `None` for the batch header.
        record: Option<usize>,
        /// Offset where the structure starts.
        at: usize,
        /// Bytes the structure needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Batch version is not 1.
    #[error("unsupported batch version {0}")]
    Version(u8),
    /// Strict only: the batch header's flags or reserved bytes are not 0.
    #[error("batch flags and reserved bytes must be 0")]
    HeaderNotZero,
    /// Strict only: the batch announces no record.
    #[error("batch has no record")]
    Empty,
    /// A record length below the header size or not a multiple of 8.
    #[error("bad record length {len} at offset {at}")]
    BadLength {
        /// Offset of the record.
        at: usize,
        /// Its declared length.
        len: u8,
    },
    /// Strict only: a record type other than trade or quote.
    #[error("unknown record type {rtype} at offset {at}")]
    UnknownRtype {
        /// Index of the record in its batch (0 outside a batch).
        record: usize,
        /// Offset of the record.
        at: usize,
        /// The record type found.
        rtype: u8,
    },
    /// Known `rtype` with the wrong length.
    #[error("record type {rtype} must be {expected} bytes, got {len}")]
    WrongLengthForType {
        /// Index of the record in its batch (0 outside a batch).
        record: usize,
        /// Offset of the record.
        at: usize,
        /// The record type.
        rtype: u8,
        /// The length the layout requires.
        expected: usize,
        /// The length found.
        len: usize,
    },
    /// Strict only: a record's flag byte or padding is not 0 (flags are the server's).
    #[error("record flags and padding must be 0 at offset {at}")]
    FlagsNotZero {
        /// Index of the record in its batch.
        record: usize,
        /// Offset of the record.
        at: usize,
    },
    /// Bytes left over after `count` records.
    #[error("{extra} trailing bytes after the last record")]
    Trailing {
        /// How many records the header announced.
        count: usize,
        /// The bytes left over.
        extra: usize,
    },
}

/// The fields of a trade body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trade {
    /// Price, 9 decimals.
    pub price: i64,
    /// Size, 9 decimals.
    pub size: u64,
    /// 0 unknown, 1 buy aggressor, 2 sell aggressor.
    pub side: u8,
}

/// The fields of a quote body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quote {
    /// Best bid price.
    pub bid_px: i64,
    /// Size at the best bid.
    pub bid_sz: u64,
    /// Best ask price.
    pub ask_px: i64,
    /// Size at the best ask.
    pub ask_sz: u64,
}

/// Body of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// A trade print.
    Trade(Trade),
    /// A top-of-book quote.
    Quote(Quote),
}

/// An encoded record: the exact bytes that go on the wire, in a fixed buffer so a tick
/// moves through the lock-free shard queues without a heap allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Record {
    buf: [u8; MAX_RECORD_LEN],
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("rtype", &self.rtype())
            .field("feed_id", &self.feed_id())
            .field("instrument_id", &self.instrument_id())
            .field("seq", &self.seq())
            .finish()
    }
}

impl Record {
    /// Encodes a record. `flags` is the record's flag byte (SNAPSHOT/REPLAY/CONFLATED).
    pub fn encode(
        feed_id: u16,
        instrument_id: u32,
        seq: u64,
        ts_event_ns: i64,
        ts_recv_ns: i64,
        body: &Body,
        flags: u8,
    ) -> Record {
        let mut buf = [0u8; MAX_RECORD_LEN];
        let (len, rtype) = match body {
            Body::Trade(_) => (TRADE_LEN, RTYPE_TRADE),
            Body::Quote(_) => (QUOTE_LEN, RTYPE_QUOTE),
        };
        // Lengths are compile-time constants below 256.
        buf[0] = len as u8;
        buf[1] = rtype;
        buf[2..4].copy_from_slice(&feed_id.to_le_bytes());
        buf[4..8].copy_from_slice(&instrument_id.to_le_bytes());
        buf[8..16].copy_from_slice(&seq.to_le_bytes());
        buf[16..24].copy_from_slice(&ts_event_ns.to_le_bytes());
        buf[24..32].copy_from_slice(&ts_recv_ns.to_le_bytes());
        match body {
            Body::Trade(t) => {
                buf[32..40].copy_from_slice(&t.price.to_le_bytes());
                buf[40..48].copy_from_slice(&t.size.to_le_bytes());
                buf[48] = t.side;
                buf[TRADE_FLAGS_AT] = flags;
            }
            Body::Quote(q) => {
                buf[32..40].copy_from_slice(&q.bid_px.to_le_bytes());
                buf[40..48].copy_from_slice(&q.bid_sz.to_le_bytes());
                buf[48..56].copy_from_slice(&q.ask_px.to_le_bytes());
                buf[56..64].copy_from_slice(&q.ask_sz.to_le_bytes());
                buf[QUOTE_FLAGS_AT] = flags;
            }
        }
        Record { buf }
    }

    /// The wire bytes of this record (`len` bytes).
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len()]
    }

    /// Record length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.buf[0] as usize
    }

    /// Always false: a record has at least its header. Present for API symmetry.
    #[inline]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Record type.
    #[inline]
    pub fn rtype(&self) -> u8 {
        self.buf[1]
    }

    /// Feed id.
    #[inline]
    pub fn feed_id(&self) -> u16 {
        u16::from_le_bytes([self.buf[2], self.buf[3]])
    }

    /// Instrument id.
    #[inline]
    pub fn instrument_id(&self) -> u32 {
        u32::from_le_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]])
    }

    /// Sequence number.
    #[inline]
    pub fn seq(&self) -> u64 {
        read_u64(&self.buf, 8)
    }

    /// Source timestamp.
    #[inline]
    pub fn ts_event_ns(&self) -> i64 {
        read_u64(&self.buf, 16) as i64
    }

    /// Gateway ingest timestamp.
    #[inline]
    pub fn ts_recv_ns(&self) -> i64 {
        read_u64(&self.buf, 24) as i64
    }

    /// The record's flag byte.
    #[inline]
    pub fn flags(&self) -> u8 {
        self.buf[flags_at(self.rtype())]
    }

    /// A copy of this record with `flags` or-ed into its flag byte.
    #[inline]
    pub fn with_flags(mut self, flags: u8) -> Record {
        let at = flags_at(self.rtype());
        self.buf[at] |= flags;
        self
    }

    /// A copy with another seq (the server assigning one).
    #[inline]
    pub fn with_seq(mut self, seq: u64) -> Record {
        self.buf[8..16].copy_from_slice(&seq.to_le_bytes());
        self
    }

    /// A copy with another feed id (a replay into a feed of another id).
    #[inline]
    pub fn with_feed_id(mut self, feed_id: u16) -> Record {
        self.buf[2..4].copy_from_slice(&feed_id.to_le_bytes());
        self
    }

    /// A copy stamped with the gateway's ingest time.
    #[inline]
    pub fn with_recv_ts(mut self, ts_recv_ns: i64) -> Record {
        self.buf[24..32].copy_from_slice(&ts_recv_ns.to_le_bytes());
        self
    }

    /// A copy with its flag byte cleared.
    #[inline]
    pub fn without_flags(mut self) -> Record {
        let at = flags_at(self.rtype());
        self.buf[at] = 0;
        self
    }

    /// Decodes the body (trade or quote).
    pub fn body(&self) -> Body {
        match self.rtype() {
            RTYPE_TRADE => Body::Trade(Trade {
                price: read_u64(&self.buf, 32) as i64,
                size: read_u64(&self.buf, 40),
                side: self.buf[48],
            }),
            _ => Body::Quote(Quote {
                bid_px: read_u64(&self.buf, 32) as i64,
                bid_sz: read_u64(&self.buf, 40),
                ask_px: read_u64(&self.buf, 48) as i64,
                ask_sz: read_u64(&self.buf, 56),
            }),
        }
    }

    /// Parses one known record (trade or quote) from wire bytes that hold exactly it.
    pub fn from_wire(bytes: &[u8]) -> Result<Record, DecodeError> {
        if bytes.len() < RECORD_HEADER_LEN {
            return Err(DecodeError::Truncated { record: Some(0), at: 0, need: RECORD_HEADER_LEN, have: bytes.len() });
        }
        let expected = match bytes[1] {
            RTYPE_TRADE => TRADE_LEN,
            RTYPE_QUOTE => QUOTE_LEN,
            rtype => return Err(DecodeError::UnknownRtype { record: 0, at: 0, rtype }),
        };
        if bytes.len() != expected || bytes[0] as usize != expected {
            return Err(DecodeError::WrongLengthForType {
                record: 0,
                at: 0,
                rtype: bytes[1],
                expected,
                len: bytes.len(),
            });
        }
        Ok(Record::from_checked(bytes))
    }

    /// Copies a record whose header was checked ([`check_known_header`]) and whose
    /// `bytes` are exactly its length.
    #[inline]
    fn from_checked(bytes: &[u8]) -> Record {
        let mut buf = [0u8; MAX_RECORD_LEN];
        buf[..bytes.len()].copy_from_slice(bytes);
        Record { buf }
    }
}

/// Checks the header of a record that must be a trade or a quote (publishers' batches,
/// recordings) and returns its length. The type is checked before the length, so an
/// unknown type is named as such whatever its length says. `record` and `at` only
/// locate the record in the error.
///
/// `header` must hold at least the first two bytes (length and type).
#[inline]
pub fn check_known_header(header: &[u8], record: usize, at: usize) -> Result<usize, DecodeError> {
    let (len, rtype) = (header[0] as usize, header[1]);
    let expected = match rtype {
        RTYPE_TRADE => TRADE_LEN,
        RTYPE_QUOTE => QUOTE_LEN,
        rtype => return Err(DecodeError::UnknownRtype { record, at, rtype }),
    };
    if len != expected {
        return Err(DecodeError::WrongLengthForType { record, at, rtype, expected, len });
    }
    Ok(len)
}

/// Where a known record's flag byte is: everything from it to the record's end is
/// flags and padding.
#[inline]
fn flags_at(rtype: u8) -> usize {
    match rtype {
        RTYPE_TRADE => TRADE_FLAGS_AT,
        _ => QUOTE_FLAGS_AT,
    }
}

#[inline]
fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Writes a batch header into the first 16 bytes of `out`.
///
/// # Panics
/// Never on a buffer of at least [`BATCH_HEADER_LEN`] bytes; callers reserve it first.
#[inline]
pub fn write_batch_header(out: &mut [u8], count: u16, send_ts_ns: u64) {
    out[0] = VERSION;
    out[1] = 0;
    out[2..4].copy_from_slice(&count.to_le_bytes());
    out[4..8].copy_from_slice(&0u32.to_le_bytes());
    out[8..16].copy_from_slice(&send_ts_ns.to_le_bytes());
}

/// Encodes one whole batch (header and records) into `out`, replacing what it held. At
/// most [`MAX_BATCH_RECORDS`] records are taken: callers split longer runs.
pub fn encode_batch<'a>(records: impl IntoIterator<Item = &'a Record>, send_ts_ns: u64, out: &mut Vec<u8>) {
    out.clear();
    out.resize(BATCH_HEADER_LEN, 0);
    let mut count: u16 = 0;
    for r in records.into_iter().take(MAX_BATCH_RECORDS) {
        out.extend_from_slice(r.as_bytes());
        count += 1;
    }
    write_batch_header(out, count, send_ts_ns);
}

/// A decoded batch: its header fields and the records it carried. Records of an unknown
/// `rtype` are skipped by their length, as the spec requires of clients.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Server wall clock when the batch was written.
    pub send_ts_ns: u64,
    /// The known records, in order.
    pub records: Vec<Record>,
    /// How many records of an unknown type were skipped.
    pub skipped_unknown: usize,
}

/// Reads and checks a batch header: its length and version. Returns `(count, send_ts_ns)`.
#[inline]
fn batch_header(msg: &[u8]) -> Result<(usize, u64), DecodeError> {
    if msg.len() < BATCH_HEADER_LEN {
        return Err(DecodeError::Truncated { record: None, at: 0, need: BATCH_HEADER_LEN, have: msg.len() });
    }
    if msg[0] != VERSION {
        return Err(DecodeError::Version(msg[0]));
    }
    Ok((u16::from_le_bytes([msg[2], msg[3]]) as usize, read_u64(msg, 8)))
}

/// Decodes one binary WebSocket message as a client must (spec §5): records of an
/// unknown type are skipped by their length, flags are kept (the server sets them).
pub fn decode_batch(msg: &[u8]) -> Result<Batch, DecodeError> {
    let (count, send_ts_ns) = batch_header(msg)?;
    // `count` is the peer's claim: reserve only what the message can actually hold (a
    // record is at least a header), so a 16-byte message cannot make us allocate for
    // 65,535 records (found by fuzzing: 4.7 MB per message).
    let mut records = Vec::with_capacity(count.min((msg.len() - BATCH_HEADER_LEN) / RECORD_HEADER_LEN));
    let mut skipped_unknown = 0;
    let mut at = BATCH_HEADER_LEN;
    for k in 0..count {
        if msg.len() < at + RECORD_HEADER_LEN {
            return Err(DecodeError::Truncated { record: Some(k), at, need: RECORD_HEADER_LEN, have: msg.len() - at });
        }
        let len = msg[at];
        if (len as usize) < RECORD_HEADER_LEN || !len.is_multiple_of(8) {
            return Err(DecodeError::BadLength { at, len });
        }
        let len = len as usize;
        if msg.len() < at + len {
            return Err(DecodeError::Truncated { record: Some(k), at, need: len, have: msg.len() - at });
        }
        match msg[at + 1] {
            RTYPE_TRADE | RTYPE_QUOTE => {
                check_known_header(&msg[at..], k, at)?;
                records.push(Record::from_checked(&msg[at..at + len]));
            }
            _ => skipped_unknown += 1,
        }
        at += len;
    }
    if at != msg.len() {
        return Err(DecodeError::Trailing { count, extra: msg.len() - at });
    }
    Ok(Batch { send_ts_ns, records, skipped_unknown })
}

/// The strict decoder: a batch as a publisher must send it (spec §5 and the publish
/// rules). On top of [`decode_batch`]'s checks the header's flags and reserved bytes
/// are 0, at least one record is announced, every record is a trade or a quote of its
/// exact length, and its flag byte and padding are 0. Nothing is allocated: records are
/// yielded one by one, each a copy into a fixed [`Record`].
///
/// Errors come in layout order (header, then record by record, then trailing bytes), so
/// a batch with several faults is named by its first one.
#[derive(Debug, Clone)]
pub struct StrictBatch<'a> {
    msg: &'a [u8],
    count: usize,
    send_ts_ns: u64,
}

impl<'a> StrictBatch<'a> {
    /// Checks the batch header.
    pub fn parse(msg: &'a [u8]) -> Result<StrictBatch<'a>, DecodeError> {
        let (count, send_ts_ns) = batch_header(msg)?;
        if msg[1] != 0 || msg[4..8] != [0; 4] {
            return Err(DecodeError::HeaderNotZero);
        }
        if count == 0 {
            return Err(DecodeError::Empty);
        }
        Ok(StrictBatch { msg, count, send_ts_ns })
    }

    /// Records the header announces.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The batch's send time as the publisher wrote it.
    pub fn send_ts_ns(&self) -> u64 {
        self.send_ts_ns
    }

    /// The records, each checked; after the last one, a leftover tail is an error.
    pub fn records(&self) -> StrictRecords<'a> {
        StrictRecords { msg: self.msg, count: self.count, next: 0, at: BATCH_HEADER_LEN, done: false }
    }
}

/// Iterator over a [`StrictBatch`]'s records. It ends after the first error.
#[derive(Debug, Clone)]
pub struct StrictRecords<'a> {
    msg: &'a [u8],
    count: usize,
    next: usize,
    at: usize,
    done: bool,
}

impl StrictRecords<'_> {
    fn step(&mut self) -> Result<Record, DecodeError> {
        let (k, at) = (self.next, self.at);
        let rest = &self.msg[at..];
        if rest.len() < RECORD_HEADER_LEN {
            return Err(DecodeError::Truncated { record: Some(k), at, need: RECORD_HEADER_LEN, have: rest.len() });
        }
        let len = check_known_header(rest, k, at)?;
        if rest.len() < len {
            return Err(DecodeError::Truncated { record: Some(k), at, need: len, have: rest.len() });
        }
        if rest[flags_at(rest[1])..len].iter().any(|&b| b != 0) {
            return Err(DecodeError::FlagsNotZero { record: k, at });
        }
        self.next += 1;
        self.at += len;
        Ok(Record::from_checked(&rest[..len]))
    }
}

impl Iterator for StrictRecords<'_> {
    type Item = Result<Record, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.next == self.count {
            self.done = true;
            let extra = self.msg.len() - self.at;
            return (extra != 0).then_some(Err(DecodeError::Trailing { count: self.count, extra }));
        }
        let r = self.step();
        self.done = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trade_layout_matches_spec_offsets() {
        let r = Record::encode(
            7,
            0x0102_0304,
            42,
            -5,
            99,
            &Body::Trade(Trade { price: 1_500_000_000, size: 3 * FIXED_SCALE as u64, side: 2 }),
            FLAG_SNAPSHOT,
        );
        let b = r.as_bytes();
        assert_eq!(b.len(), 56);
        assert_eq!(b[0], 56);
        assert_eq!(b[1], RTYPE_TRADE);
        assert_eq!(&b[2..4], &7u16.to_le_bytes());
        assert_eq!(&b[4..8], &[4, 3, 2, 1]);
        assert_eq!(&b[8..16], &42u64.to_le_bytes());
        assert_eq!(&b[16..24], &(-5i64).to_le_bytes());
        assert_eq!(&b[24..32], &99i64.to_le_bytes());
        assert_eq!(&b[32..40], &1_500_000_000i64.to_le_bytes());
        assert_eq!(&b[40..48], &3_000_000_000u64.to_le_bytes());
        assert_eq!(b[48], 2);
        assert_eq!(b[49], FLAG_SNAPSHOT);
        assert_eq!(&b[50..56], &[0u8; 6]);
    }

    #[test]
    fn quote_layout_matches_spec_offsets() {
        let r =
            Record::encode(1, 17, 1, 0, 0, &Body::Quote(Quote { bid_px: 10, bid_sz: 20, ask_px: 30, ask_sz: 40 }), 0)
                .with_flags(FLAG_CONFLATED);
        let b = r.as_bytes();
        assert_eq!(b.len(), 72);
        assert_eq!(b[1], RTYPE_QUOTE);
        assert_eq!(&b[32..40], &10i64.to_le_bytes());
        assert_eq!(&b[40..48], &20u64.to_le_bytes());
        assert_eq!(&b[48..56], &30i64.to_le_bytes());
        assert_eq!(&b[56..64], &40u64.to_le_bytes());
        assert_eq!(b[64], FLAG_CONFLATED);
        assert_eq!(&b[65..72], &[0u8; 7]);
        assert_eq!(r.flags(), FLAG_CONFLATED);
    }

    #[test]
    fn encode_batch_round_trips_and_caps_the_count() {
        let recs: Vec<Record> =
            (1..=3).map(|s| Record::encode(2, 1, s, 0, 0, &Body::Trade(Trade::default()), 0)).collect();
        let mut out = vec![9u8; 5];
        encode_batch(&recs, 42, &mut out);
        let b = decode_batch(&out).expect("decodes");
        assert_eq!((b.send_ts_ns, b.records), (42, recs.clone()));
        let many = vec![recs[0]; MAX_BATCH_RECORDS + 1];
        encode_batch(&many, 0, &mut out);
        assert_eq!(decode_batch(&out).expect("decodes").records.len(), MAX_BATCH_RECORDS);
    }

    #[test]
    fn batch_round_trip_skips_unknown_rtype() {
        let t = Record::encode(1, 1, 1, 0, 0, &Body::Trade(Trade::default()), 0);
        let mut msg = vec![0u8; BATCH_HEADER_LEN];
        write_batch_header(&mut msg, 3, 1234);
        msg.extend_from_slice(t.as_bytes());
        // An unknown record type of 40 bytes must be skipped by its length.
        let mut unknown = [0u8; 40];
        unknown[0] = 40;
        unknown[1] = 9;
        msg.extend_from_slice(&unknown);
        msg.extend_from_slice(t.as_bytes());
        let b = decode_batch(&msg).expect("valid batch");
        assert_eq!(b.send_ts_ns, 1234);
        assert_eq!(b.records.len(), 2);
        assert_eq!(b.skipped_unknown, 1);
    }

    #[test]
    fn decode_rejects_malformed() {
        assert!(matches!(decode_batch(&[1, 0]), Err(DecodeError::Truncated { .. })));
        let mut msg = vec![0u8; BATCH_HEADER_LEN];
        write_batch_header(&mut msg, 1, 0);
        msg.push(33);
        msg.extend_from_slice(&[0u8; 40]);
        assert!(matches!(decode_batch(&msg), Err(DecodeError::BadLength { .. })));
        let mut msg = vec![0u8; BATCH_HEADER_LEN];
        write_batch_header(&mut msg, 0, 0);
        msg.push(0);
        assert_eq!(decode_batch(&msg).unwrap_err(), DecodeError::Trailing { count: 0, extra: 1 });
        msg[0] = 2;
        assert_eq!(decode_batch(&msg).unwrap_err(), DecodeError::Version(2));
    }

    #[test]
    fn strict_decoder_names_the_first_broken_rule() {
        let t = |instr| Record::encode(9, instr, 0, 0, 0, &Body::Trade(Trade::default()), 0);
        let mut good = Vec::new();
        encode_batch(&[t(1), t(2)], 7, &mut good);
        let b = StrictBatch::parse(&good).expect("header");
        assert_eq!((b.count(), b.send_ts_ns()), (2, 7));
        let got: Result<Vec<Record>, DecodeError> = b.records().collect();
        assert_eq!(got.expect("records"), vec![t(1), t(2)]);
        let first_err = |msg: &[u8]| match StrictBatch::parse(msg) {
            Err(e) => e,
            Ok(b) => b.records().find_map(Result::err).expect("refused"),
        };
        assert!(matches!(first_err(&good[..10]), DecodeError::Truncated { record: None, .. }));
        let mut h = good.clone();
        h[1] = 1;
        assert_eq!(first_err(&h), DecodeError::HeaderNotZero);
        let mut empty = good[..BATCH_HEADER_LEN].to_vec();
        empty[2] = 0;
        assert_eq!(first_err(&empty), DecodeError::Empty);
        let mut u = good.clone();
        u[BATCH_HEADER_LEN + 56 + 1] = 7;
        assert_eq!(first_err(&u), DecodeError::UnknownRtype { record: 1, at: 72, rtype: 7 });
        let mut l = good.clone();
        l[BATCH_HEADER_LEN] = 40;
        assert!(matches!(first_err(&l), DecodeError::WrongLengthForType { record: 0, len: 40, .. }));
        assert!(matches!(first_err(&good[..good.len() - 1]), DecodeError::Truncated { record: Some(1), need: 56, .. }));
        let mut f = good.clone();
        f[BATCH_HEADER_LEN + 55] = 1;
        assert_eq!(first_err(&f), DecodeError::FlagsNotZero { record: 0, at: 16 });
        let mut x = good.clone();
        x.extend_from_slice(&[0; 8]);
        assert_eq!(first_err(&x), DecodeError::Trailing { count: 2, extra: 8 });
        // The client decoder keeps what the server set and skips what it does not know.
        assert_eq!(decode_batch(&f).expect("client").records.len(), 2);
    }
}
