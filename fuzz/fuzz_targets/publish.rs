//! The server's publish path on arbitrary bytes: `sources::publish::decode` (the batch a
//! publisher sends, through the codec's strict decoder) and then `sequence` and the
//! engine's `Ingest::append_with` (one hold of the log lock) into a fresh test feed. Nothing may panic, and:
//! - every refusal's reason is one of `PublishReject::ALL`;
//! - a batch `decode` accepts re-encodes to exactly the input bytes (nothing is dropped
//!   or altered), its records are of the connection's feed with in-range instruments and
//!   no flags;
//! - `sequence` is all-or-nothing: on success (and once appended) every instrument's
//!   last seq is the highest of the batch and seqs rise; on refusal the log is
//!   untouched; the same batch sent again is refused unless every seq was 0
//!   (server-assigned).
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tickgate::engine::{Ingest, ShardInbox, Tick};
use tickgate::feeds::{Catalog, FeedDef};
use tickgate::sources::publish::{decode, sequence, PublishReject, Reject};
use tickgate_proto::codec::{encode_batch, Record, StrictBatch};

const FEED_ID: u16 = 7;
const SYMBOLS: usize = 4;

fn def() -> &'static FeedDef {
    static D: OnceLock<FeedDef> = OnceLock::new();
    D.get_or_init(|| {
        let text = "name = \"F\"\nid = 7\nsource = \"publish\"\nsymbols = [\"A\", \"B\", \"C\", \"D\"]\n[resume]\nrecords = 64\n";
        FeedDef::parse("fuzz.toml", text).expect("test feed")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    if let Err(r) = decode(data, FEED_ID, SYMBOLS, &mut out) {
        assert!(PublishReject::ALL.contains(&r.reason), "undeclared reason {}", r.reason);
        return;
    }
    assert!(!out.is_empty());
    for (idx, rec) in &out {
        assert!((*idx as usize) < SYMBOLS);
        assert_eq!(rec.feed_id(), FEED_ID);
        assert_eq!(rec.instrument_id(), idx + 1);
        assert_eq!(rec.flags(), 0);
    }
    let send_ts = StrictBatch::parse(data).expect("decode accepted its header").send_ts_ns();
    let mut again = Vec::new();
    encode_batch(out.iter().map(|(_, r)| r), send_ts, &mut again);
    assert_eq!(again, data, "decode is not the inverse of encode_batch");

    let catalog = Arc::new(Catalog::new(vec![def().clone()], 1).expect("catalog"));
    // No shards and no counters: only the log side of the engine's ingest is exercised.
    let ingest = Ingest::new(Arc::from(Vec::<Arc<ShardInbox>>::new()), catalog.clone(), Arc::from(Vec::new()));
    let feed = &catalog.feeds()[0];
    let original: Vec<(u32, Record)> = out.clone();
    let mut scratch = HashMap::new();
    let mut ticks: Vec<Tick> = Vec::new();
    // The publish source's path: sequenced and appended under one hold of the log's lock.
    let taken: Result<(), Reject> = ingest.append_with(0, &mut ticks, |log, ticks| {
        sequence(feed, log, &mut out, 42, &mut scratch)?;
        ticks.extend(out.iter().map(|&(instr, record)| Tick { feed_idx: 0, instr, record }));
        Ok(())
    });
    match taken {
        Err(r) => {
            assert_eq!(r.reason, PublishReject::SeqBackwards);
            assert_eq!(feed.log().len(), 0, "a refused batch left records in the log");
        }
        Ok(()) => {
            assert_eq!(ticks.len(), out.len());
            let mut last: HashMap<u32, u64> = HashMap::new();
            for (idx, rec) in &out {
                let prev = last.insert(*idx, rec.seq()).unwrap_or(0);
                assert!(rec.seq() > prev, "seq did not rise");
                assert_eq!(rec.ts_recv_ns(), 42);
            }
            for (idx, seq) in &last {
                assert_eq!(feed.log().last_seq(*idx), *seq);
            }
            let len = feed.log().len();
            let mut resend = original.clone();
            let all_zero = original.iter().all(|(_, r)| r.seq() == 0);
            assert_eq!(sequence(feed, &feed.log(), &mut resend, 43, &mut scratch).is_ok(), all_zero);
            if !all_zero {
                assert_eq!(feed.log().len(), len);
            }
        }
    }
});
