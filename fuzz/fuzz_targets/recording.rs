//! The `.tgrec` reader (`tickgate_proto::recording::Reader`, the one `replay` feeds use on a file)
//! on arbitrary bytes. Nothing may panic, it ends (every record consumes input), and what
//! it reads, written again with `Writer`, reads back identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickgate_proto::recording::{Reader, Writer};

fuzz_target!(|data: &[u8]| {
    let Ok(mut r) = Reader::new(data) else { return };
    let meta = r.meta().clone();
    assert!(!meta.symbols.is_empty());
    let mut recs = Vec::new();
    // A record is at least 32 bytes, so this bounds the loop even if `next_record` failed
    // to make progress.
    for _ in 0..=data.len() / 32 {
        match r.next_record() {
            Ok(Some(rec)) => {
                assert!(rec.instrument_id() >= 1 && rec.instrument_id() as usize <= meta.symbols.len());
                recs.push(rec);
            }
            Ok(None) | Err(_) => break,
        }
    }
    assert!(recs.len() <= data.len() / 32);
    let mut w = Writer::new(Vec::new(), &meta).expect("metadata that was read can be written");
    for rec in &recs {
        w.write(rec).expect("write to a Vec");
    }
    let bytes = w.finish().expect("finish");
    let mut back = Reader::new(&bytes[..]).expect("what the writer wrote reads");
    assert_eq!(back.meta(), &meta);
    for rec in &recs {
        assert_eq!(back.next_record().expect("record").as_ref(), Some(rec));
    }
    assert!(back.next_record().expect("end").is_none());
});
