//! Batch decoding on arbitrary input: must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tickgate::protocol::codec::decode_batch(data);
});
