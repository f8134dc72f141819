//! The rules of nats-feeds-v1 that a single message is checked against, with no I/O:
//! stream and subject names, the `Tickgate-Epoch` header, the batch a message carries
//! (§2), the description a creating edge writes on a stream and how a found one is read
//! (§1), and [`NatsReject`], the reasons a message is dropped
//! (`tickgate_nats_rejects_total{feed,reason}`).

use async_nats::HeaderMap;
use bytes::Bytes;
use tickgate_proto::codec::{encode_batch, DecodeError, Record, StrictBatch, RTYPE_QUOTE, RTYPE_TRADE};

use crate::auth::hash::sha256;
use crate::feeds::FeedDef;
use crate::metrics::Metrics;

/// Why a NATS message was dropped (spec §2): the `reason` label of
/// `tickgate_nats_rejects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum NatsReject {
    /// The payload is not one batch in the protocol-v1 §5 layout.
    MalformedBatch,
    /// A record of another feed than the stream's.
    WrongFeed,
    /// The subject is not `<prefix>.<FEED>.<ID>.t|q` of this feed, or a record's
    /// instrument or type differs from the subject's.
    WrongSubject,
    /// A record's flags or padding are not 0.
    BadFlags,
    /// A seq of 0, or not above the instrument's last one.
    BadSeq,
    /// No `Tickgate-Epoch` header, or not a decimal number ≥ 1.
    EpochMissing,
    /// An epoch below the feed's current one.
    EpochBackwards,
}

impl NatsReject {
    /// Every reason, in the order the label values are primed.
    pub(crate) const ALL: [NatsReject; 7] = [
        NatsReject::MalformedBatch,
        NatsReject::WrongFeed,
        NatsReject::WrongSubject,
        NatsReject::BadFlags,
        NatsReject::BadSeq,
        NatsReject::EpochMissing,
        NatsReject::EpochBackwards,
    ];

    /// The label value.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            NatsReject::MalformedBatch => "malformed_batch",
            NatsReject::WrongFeed => "wrong_feed",
            NatsReject::WrongSubject => "wrong_subject",
            NatsReject::BadFlags => "bad_flags",
            NatsReject::BadSeq => "bad_seq",
            NatsReject::EpochMissing => "epoch_missing",
            NatsReject::EpochBackwards => "epoch_backwards",
        }
    }

    /// Primes every reason of `feed` at zero, so a dashboard sees the series before the
    /// first violation.
    pub(crate) fn prime(metrics: &Metrics, feed: &str) {
        for r in NatsReject::ALL {
            metrics.nats_rejects.with_label_values(&[feed, r.as_str()]);
        }
    }
}

/// Most records one message carries when tickgate publishes (the handler, the forwarder):
/// 8,192 quotes are 590 KB, under NATS's default `max_payload` of 1 MB.
pub(crate) const MAX_RECORDS_PER_MESSAGE: usize = 8192;

/// The header that carries a message's epoch.
pub(crate) const EPOCH_HEADER: &str = "Tickgate-Epoch";

/// `MD_<FEED>`: the feed's stream.
pub(crate) fn stream_name(feed: &str) -> String {
    format!("MD_{feed}")
}

/// `MDLV_<FEED>`: the feed's last values (one message per subject, no age limit).
pub(crate) fn last_values_name(feed: &str) -> String {
    format!("MDLV_{feed}")
}

/// `<prefix>.<FEED>.>`: what the feed's stream captures.
pub(crate) fn stream_subjects(prefix: &str, feed: &str) -> String {
    format!("{prefix}.{feed}.>")
}

/// One message as tickgate publishes it (the feed handler, the edge's forwarder).
pub(crate) struct Outgoing {
    /// `<prefix>.<FEED>.<ID>.t|q`.
    pub(crate) subject: String,
    /// `Nats-Msg-Id`: `<FEED>.<ID>.<epoch>.<seq of the first record>`.
    pub(crate) id: String,
    /// `Tickgate-Epoch` and `Nats-Msg-Id`.
    pub(crate) headers: HeaderMap,
    /// One §5 batch.
    pub(crate) payload: Bytes,
    /// Records in it.
    pub(crate) records: usize,
}

/// Splits `records` (each instrument's in seq order) into the contract's messages: one per
/// run of one instrument and type, at most [`MAX_RECORDS_PER_MESSAGE`] records each.
pub(crate) fn messages<'a>(
    prefix: &'a str,
    feed: &'a str,
    epoch: u64,
    records: &'a [Record],
) -> impl Iterator<Item = Outgoing> + 'a {
    let mut rest = records;
    std::iter::from_fn(move || {
        let first = *rest.first()?;
        let n = rest
            .iter()
            .take_while(|r| r.instrument_id() == first.instrument_id() && r.rtype() == first.rtype())
            .count()
            .min(MAX_RECORDS_PER_MESSAGE);
        let (run, tail) = rest.split_at(n);
        rest = tail;
        let kind = if first.rtype() == RTYPE_TRADE { "t" } else { "q" };
        let instrument = first.instrument_id();
        let id = format!("{feed}.{instrument}.{epoch}.{}", first.seq());
        let mut payload = Vec::with_capacity(16 + run.len() * 72);
        encode_batch(run, 0, &mut payload);
        let mut headers = HeaderMap::new();
        headers.insert(EPOCH_HEADER, epoch.to_string().as_str());
        headers.insert("Nats-Msg-Id", id.as_str());
        Some(Outgoing {
            subject: format!("{prefix}.{feed}.{instrument}.{kind}"),
            id,
            headers,
            payload: Bytes::from(payload),
            records: run.len(),
        })
    })
}

/// The instrument (dense index) and record type a subject names, or `WrongSubject`.
pub(crate) fn parse_subject(
    subject: &str,
    prefix: &str,
    feed: &str,
    instruments: usize,
) -> Result<(u32, u8), NatsReject> {
    let rest = subject
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_prefix(feed))
        .and_then(|r| r.strip_prefix('.'))
        .ok_or(NatsReject::WrongSubject)?;
    let (id, kind) = rest.split_once('.').ok_or(NatsReject::WrongSubject)?;
    let rtype = match kind {
        "t" => RTYPE_TRADE,
        "q" => RTYPE_QUOTE,
        _ => return Err(NatsReject::WrongSubject),
    };
    // Decimal without sign or leading zeros: one spelling per instrument, so one subject.
    if id.is_empty() || id.len() > 10 || id.starts_with('0') || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NatsReject::WrongSubject);
    }
    let id: u64 = id.parse().map_err(|_| NatsReject::WrongSubject)?;
    if id == 0 || id > instruments as u64 {
        return Err(NatsReject::WrongSubject);
    }
    Ok(((id - 1) as u32, rtype))
}

/// The epoch of the `Tickgate-Epoch` header value (decimal, ≥ 1).
pub(crate) fn parse_epoch(value: Option<&str>) -> Result<u64, NatsReject> {
    let v = value.ok_or(NatsReject::EpochMissing)?;
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NatsReject::EpochMissing);
    }
    match v.parse::<u64>() {
        Ok(e) if e >= 1 => Ok(e),
        _ => Err(NatsReject::EpochMissing),
    }
}

/// Decodes a message's batch into `out`, checking every record against the subject's
/// feed, instrument and type, its flags, and seqs that are non-zero and rise within the
/// message. Seqs against the feed's last one are checked by the caller, under the log's
/// lock. On `Err`, `out` holds nothing usable.
pub(crate) fn decode(
    payload: &[u8],
    feed_id: u16,
    instr: u32,
    rtype: u8,
    out: &mut Vec<Record>,
) -> Result<(), NatsReject> {
    out.clear();
    let batch = StrictBatch::parse(payload).map_err(layout)?;
    let mut prev = 0u64;
    for rec in batch.records() {
        let rec = rec.map_err(layout)?;
        if rec.feed_id() != feed_id {
            return Err(NatsReject::WrongFeed);
        }
        if rec.instrument_id() != instr + 1 || rec.rtype() != rtype {
            return Err(NatsReject::WrongSubject);
        }
        if rec.seq() == 0 || rec.seq() <= prev {
            return Err(NatsReject::BadSeq);
        }
        prev = rec.seq();
        out.push(rec);
    }
    Ok(())
}

fn layout(e: DecodeError) -> NatsReject {
    match e {
        DecodeError::FlagsNotZero { .. } => NatsReject::BadFlags,
        _ => NatsReject::MalformedBatch,
    }
}

/// Hex SHA-256 of the feed's symbols joined by `\n` (spec §1).
pub(crate) fn symbols_sha256(def: &FeedDef) -> String {
    sha256(def.symbols.join("\n").as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The description a creating edge or publisher writes on both streams:
/// `tickgate feed <FEED> id <ID> symbols-sha256 <hex>`.
pub(crate) fn description(def: &FeedDef) -> String {
    format!("tickgate feed {} id {} symbols-sha256 {}", def.name, def.id, symbols_sha256(def))
}

/// Checks a found stream's description against this node's feed file: one of the
/// `tickgate feed ...` form must name the same feed, id and symbols; any other
/// description (a stream made by another program) is accepted. `Err` says what differs.
pub(crate) fn check_description(found: Option<&str>, def: &FeedDef) -> Result<(), String> {
    let Some(found) = found else { return Ok(()) };
    let words: Vec<&str> = found.split(' ').collect();
    let ours = matches!(words.as_slice(), ["tickgate", "feed", _, "id", _, "symbols-sha256", _]);
    if !ours {
        return Ok(());
    }
    let expected = description(def);
    if found == expected {
        return Ok(());
    }
    Err(format!(
        "its description is {found:?} but this node's feed file gives {expected:?}: the feed files of the \
         edges differ (name, id or symbols); use the same file on every edge"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickgate_proto::codec::{encode_batch, Body, Quote, Trade};

    fn trade(feed: u16, instr: u32, seq: u64) -> Record {
        Record::encode(feed, instr, seq, 1, 0, &Body::Trade(Trade { price: 1, size: 1, side: 1 }), 0)
    }

    fn batch(recs: &[Record]) -> Vec<u8> {
        let mut b = Vec::new();
        encode_batch(recs, 0, &mut b);
        b
    }

    #[test]
    fn subjects_parse_exactly() {
        assert_eq!(parse_subject("md.XNAS.1.t", "md", "XNAS", 3), Ok((0, RTYPE_TRADE)));
        assert_eq!(parse_subject("md.XNAS.3.q", "md", "XNAS", 3), Ok((2, RTYPE_QUOTE)));
        assert_eq!(parse_subject("a.b.XNAS.2.q", "a.b", "XNAS", 3), Ok((1, RTYPE_QUOTE)));
        for bad in [
            "md.XNAS.4.t",
            "md.XNAS.0.t",
            "md.XNAS.01.t",
            "md.XNAS.1.x",
            "md.XNAS.1",
            "md.XNASX.1.t",
            "mdx.XNAS.1.t",
            "md.XNAS.+1.t",
            "md.XNAS.1.t.extra",
            "md.OTHER.1.t",
        ] {
            assert_eq!(parse_subject(bad, "md", "XNAS", 3), Err(NatsReject::WrongSubject), "{bad}");
        }
    }

    #[test]
    fn messages_are_runs_of_one_instrument_and_type() {
        let q = |instr, seq| Record::encode(9, instr, seq, 1, 0, &Body::Quote(Quote::default()), 0);
        let recs = [trade(9, 1, 1), trade(9, 1, 2), q(1, 3), trade(9, 2, 1)];
        let out: Vec<Outgoing> = messages("md", "X", 7, &recs).collect();
        let got: Vec<(&str, &str, usize)> =
            out.iter().map(|m| (m.subject.as_str(), m.id.as_str(), m.records)).collect();
        assert_eq!(got, [("md.X.1.t", "X.1.7.1", 2), ("md.X.1.q", "X.1.7.3", 1), ("md.X.2.t", "X.2.7.1", 1)]);
        assert_eq!(out[0].headers.get(EPOCH_HEADER).map(|v| v.as_str()), Some("7"));
        let mut again = Vec::new();
        decode(&out[0].payload, 9, 0, RTYPE_TRADE, &mut again).expect("a contract message");
        assert_eq!(again, recs[..2]);
    }

    #[test]
    fn epochs_parse_exactly() {
        assert_eq!(parse_epoch(Some("1")), Ok(1));
        assert_eq!(parse_epoch(Some("18446744073709551615")), Ok(u64::MAX));
        for bad in [None, Some(""), Some("0"), Some("-1"), Some("1.5"), Some(" 1"), Some("18446744073709551616")] {
            assert_eq!(parse_epoch(bad), Err(NatsReject::EpochMissing), "{bad:?}");
        }
    }

    #[test]
    fn every_violation_has_its_reason() {
        let mut out = Vec::new();
        decode(&batch(&[trade(9, 1, 1), trade(9, 1, 2)]), 9, 0, RTYPE_TRADE, &mut out).expect("good");
        assert_eq!(out.len(), 2);
        let d = |b: &[u8], rtype| decode(b, 9, 0, rtype, &mut Vec::new());
        let good = batch(&[trade(9, 1, 5)]);
        assert_eq!(d(&good[..10], RTYPE_TRADE), Err(NatsReject::MalformedBatch));
        assert_eq!(d(&batch(&[trade(8, 1, 5)]), RTYPE_TRADE), Err(NatsReject::WrongFeed));
        assert_eq!(d(&batch(&[trade(9, 2, 5)]), RTYPE_TRADE), Err(NatsReject::WrongSubject));
        assert_eq!(d(&good, RTYPE_QUOTE), Err(NatsReject::WrongSubject));
        assert_eq!(d(&batch(&[trade(9, 1, 5).with_flags(1)]), RTYPE_TRADE), Err(NatsReject::BadFlags));
        assert_eq!(d(&batch(&[trade(9, 1, 0)]), RTYPE_TRADE), Err(NatsReject::BadSeq));
        assert_eq!(d(&batch(&[trade(9, 1, 5), trade(9, 1, 5)]), RTYPE_TRADE), Err(NatsReject::BadSeq));
        let q = Record::encode(9, 1, 3, 0, 0, &Body::Quote(Quote::default()), 0);
        assert_eq!(d(&batch(&[q]), RTYPE_QUOTE), Ok(()));
        let labels: std::collections::HashSet<&str> = NatsReject::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), NatsReject::ALL.len());
    }

    #[test]
    fn descriptions_catch_a_different_feed_file() {
        let def = |symbols: &str| {
            FeedDef::parse("f", &format!("name = \"X\"\nid = 4\nsource = \"nats\"\nsymbols = [{symbols}]\n"))
                .expect("feed")
        };
        let a = def("\"A\", \"B\"");
        // sha256("A\nB"), computed outside Rust.
        assert_eq!(
            description(&a),
            "tickgate feed X id 4 symbols-sha256 23519a43c66b4c342f25b32e09797ec5f3fc0be388cd8243fb3449afbdce4013"
        );
        assert_eq!(check_description(Some(&description(&a)), &a), Ok(()));
        assert_eq!(check_description(None, &a), Ok(()));
        assert_eq!(check_description(Some("made by our own feed handler"), &a), Ok(()));
        let b = def("\"B\", \"A\"");
        let e = check_description(Some(&description(&b)), &a).expect_err("other symbols");
        assert!(e.contains("feed files of the edges differ"), "{e}");
    }
}
