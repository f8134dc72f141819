//! The client-side batch decoder (`tickgate_proto::codec::decode_batch`) on arbitrary input.
//! Nothing may panic (nor allocate for what the input only claims: scripts/fuzz.sh runs
//! with -malloc_limit_mb), and a batch of known records with a clean header re-encodes
//! (`encode_batch`) to exactly its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickgate_proto::codec::{decode_batch, encode_batch, DecodeError, StrictBatch};

fuzz_target!(|data: &[u8]| {
    let Ok(b) = decode_batch(data) else { return };
    for r in &b.records {
        assert!(r.len() == 56 || r.len() == 72);
    }
    // The decoder skips unknown records and does not look at the flag/reserved bytes,
    // which the encoder writes as 0: only then is the round trip exact.
    // (`StrictBatch` is the codec's rule for a clean header.)
    if b.skipped_unknown == 0 && !matches!(StrictBatch::parse(data), Err(DecodeError::HeaderNotZero)) {
        let mut again = Vec::new();
        encode_batch(&b.records, b.send_ts_ns, &mut again);
        assert_eq!(again, data);
    }
});
