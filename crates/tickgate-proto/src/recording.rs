//! The recording format (`*.tgrec`) written by `tickgate record` and read by `replay`
//! feeds: [`Meta`] (the header's JSON), [`Writer`], the streaming [`Reader`] (records
//! checked by the codec's [`check_known_header`], the rule publishers' batches obey
//! too) and [`read_meta`].
//!
//! ```text
//! offset  size        field
//! 0       8           magic "TGREC\0\0\x01" (the last byte is the format version, 1)
//! 8       4           u32 LE: length M of the metadata
//! 12      M           metadata, UTF-8 JSON: {"feed","feed_id","symbols":[...],"recorded_at_ns"}
//! 12+M    0..7        zero padding to a multiple of 8
//! ...                 records, back to back, each exactly as on the wire (protocol §5):
//!                     32-byte header (len, rtype, feed_id, instrument_id, seq,
//!                     ts_event_ns, ts_recv_ns) + body; `len` (byte 0) gives the size.
//! ```
//!
//! Instrument ids are 1-based positions in `symbols`. Within a recording `seq` runs
//! 1, 2, 3, ... per instrument (the recorder renumbers what it captured), record flags are
//! zero and `ts_event_ns` is the source time used to pace the replay. The format is
//! append-only, so a recorder killed mid-way leaves a file that reads up to its last
//! whole record.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::codec::{check_known_header, DecodeError, Record, MAX_RECORD_LEN, RECORD_HEADER_LEN};

/// The file magic; the last byte is the format version.
pub const MAGIC: [u8; 8] = *b"TGREC\0\0\x01";
/// Largest metadata block accepted (a symbol table of 100,000 names fits).
pub const MAX_META_BYTES: usize = 8 << 20;

/// A recording that cannot be read or written.
#[derive(Debug, Error)]
pub enum RecordingError {
    /// I/O failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a recording, or a damaged one.
    #[error("not a valid tickgate recording: {0}")]
    Format(String),
}

/// The metadata block.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Name of the feed that was recorded.
    pub feed: String,
    /// Its feed id at the time.
    pub feed_id: u16,
    /// Instrument symbols; instrument id k is `symbols[k - 1]`.
    pub symbols: Vec<String>,
    /// When the recording started (ns since the Unix epoch).
    pub recorded_at_ns: u64,
}

/// Writes a recording.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    records: u64,
}

impl<W: Write> Writer<W> {
    /// Writes the header.
    pub fn new(mut out: W, meta: &Meta) -> Result<Writer<W>, RecordingError> {
        let json = serde_json::to_vec(meta).map_err(|e| RecordingError::Format(e.to_string()))?;
        if json.len() > MAX_META_BYTES {
            return Err(RecordingError::Format("metadata too large".into()));
        }
        out.write_all(&MAGIC)?;
        out.write_all(&(json.len() as u32).to_le_bytes())?;
        out.write_all(&json)?;
        let pad = (8 - (12 + json.len()) % 8) % 8;
        out.write_all(&[0u8; 8][..pad])?;
        Ok(Writer { out, records: 0 })
    }

    /// Appends one record (its flags must already be cleared by the caller).
    pub fn write(&mut self, rec: &Record) -> Result<(), RecordingError> {
        self.out.write_all(rec.as_bytes())?;
        self.records += 1;
        Ok(())
    }

    /// Records written.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Flushes and returns the inner writer.
    pub fn finish(mut self) -> Result<W, RecordingError> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a recording record by record (bounded memory whatever the file size).
#[derive(Debug)]
pub struct Reader<R: Read> {
    input: BufReader<R>,
    meta: Meta,
    offset: u64,
}

impl Reader<std::fs::File> {
    /// Opens a file.
    pub fn open(path: &Path) -> Result<Reader<std::fs::File>, RecordingError> {
        Reader::new(std::fs::File::open(path)?)
    }
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn new(input: R) -> Result<Reader<R>, RecordingError> {
        let mut input = BufReader::with_capacity(64 * 1024, input);
        let mut head = [0u8; 12];
        input.read_exact(&mut head).map_err(|_| RecordingError::Format("file shorter than its header".into()))?;
        if head[..8] != MAGIC {
            return Err(RecordingError::Format("bad magic (expected TGREC version 1)".into()));
        }
        let len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
        if len > MAX_META_BYTES {
            return Err(RecordingError::Format(format!("metadata of {len} bytes is over the limit")));
        }
        // Read what is there rather than allocate the announced length up front: a 12-byte
        // file announcing 8 MiB of metadata must not cost 8 MiB (found by fuzzing).
        let mut json = Vec::new();
        let got = (&mut input).take(len as u64).read_to_end(&mut json);
        if !got.is_ok_and(|n| n == len) {
            return Err(RecordingError::Format("truncated metadata".into()));
        }
        let meta: Meta = serde_json::from_slice(&json).map_err(|e| RecordingError::Format(format!("metadata: {e}")))?;
        if meta.symbols.is_empty() {
            return Err(RecordingError::Format("metadata lists no symbols".into()));
        }
        let pad = (8 - (12 + len) % 8) % 8;
        let mut skip = [0u8; 8];
        input.read_exact(&mut skip[..pad]).map_err(|_| RecordingError::Format("truncated header".into()))?;
        Ok(Reader { input, meta, offset: (12 + len + pad) as u64 })
    }

    /// The metadata.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The next record; `Ok(None)` at the end of the file. A record whose instrument id
    /// is outside the symbol table, or of an unknown type, is an error naming its offset.
    pub fn next_record(&mut self) -> Result<Option<Record>, RecordingError> {
        if self.input.fill_buf()?.is_empty() {
            return Ok(None);
        }
        let at = self.offset;
        let mut buf = [0u8; MAX_RECORD_LEN];
        let bad = |m: String| RecordingError::Format(format!("record at byte {at}: {m}"));
        self.input.read_exact(&mut buf[..RECORD_HEADER_LEN]).map_err(|_| bad("truncated header".into()))?;
        // The codec's one rule for a known record's header; recordings hold only trades
        // and quotes, exactly as the recorder took them off the wire.
        let len = check_known_header(&buf, 0, 0).map_err(|e| match e {
            DecodeError::UnknownRtype { rtype, .. } => bad(format!("unknown rtype {rtype}")),
            DecodeError::WrongLengthForType { rtype, len, .. } => {
                bad(format!("len {len} does not match rtype {rtype}"))
            }
            other => bad(other.to_string()),
        })?;
        self.input.read_exact(&mut buf[RECORD_HEADER_LEN..len]).map_err(|_| bad("truncated body".into()))?;
        let rec = Record::from_wire(&buf[..len]).map_err(|e| bad(e.to_string()))?;
        let id = rec.instrument_id() as usize;
        if id == 0 || id > self.meta.symbols.len() {
            return Err(bad(format!("instrument id {id} outside the symbol table")));
        }
        self.offset += len as u64;
        Ok(Some(rec))
    }
}

/// Reads only the metadata of a file (used when loading feed definitions).
pub fn read_meta(path: &Path) -> Result<Meta, RecordingError> {
    Ok(Reader::open(path)?.meta.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Body, Quote, Trade};

    fn meta() -> Meta {
        Meta { feed: "X".into(), feed_id: 3, symbols: vec!["A".into(), "B".into()], recorded_at_ns: 1 }
    }

    #[test]
    fn round_trip() {
        let recs = vec![
            Record::encode(3, 1, 1, 10, 11, &Body::Trade(Trade { price: 5, size: 6, side: 1 }), 0),
            Record::encode(3, 2, 1, 12, 13, &Body::Quote(Quote { bid_px: 1, bid_sz: 2, ask_px: 3, ask_sz: 4 }), 0),
        ];
        let mut w = Writer::new(Vec::new(), &meta()).expect("header");
        for r in &recs {
            w.write(r).expect("write");
        }
        let bytes = w.finish().expect("finish");
        let mut r = Reader::new(&bytes[..]).expect("reader");
        assert_eq!(r.meta(), &meta());
        let mut got = Vec::new();
        while let Some(rec) = r.next_record().expect("record") {
            got.push(rec);
        }
        assert_eq!(got, recs);
        // A truncated tail is reported with its offset, not silently dropped.
        let mut r = Reader::new(&bytes[..bytes.len() - 3]).expect("reader");
        assert!(r.next_record().expect("first").is_some());
        let e = r.next_record().unwrap_err().to_string();
        assert!(e.contains("truncated body"), "{e}");
        assert!(Reader::new(&b"nope"[..]).is_err());
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(Reader::new(&bad[..]).unwrap_err().to_string().contains("magic"));
    }
}
