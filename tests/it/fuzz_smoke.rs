//! A stable-toolchain fuzz smoke test run in CI: random and mutated inputs through every
//! parser that network input reaches (control messages, batches, tokens, feed and config
//! files). Nothing may panic, and a token whose header or payload was changed never
//! validates. The coverage-guided targets in `fuzz/` (docs/fuzzing.md) go deeper; their
//! committed corpus and past findings are replayed here too.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use tickgate::auth::issuer::EmbeddedIssuer;
use tickgate::auth::keys::KeyStore;
use tickgate::auth::validate::Validator;
use tickgate::config::{AuthConfig, Config, IssuerConfig};
use tickgate::feeds::FeedDef;
use tickgate_proto::codec::{decode_batch, write_batch_header, Body, Quote, Record, Trade};
use tickgate_proto::control::parse_client_msg;

fn mutate(rng: &mut ChaCha8Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..5) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] = rng.random();
            }
            1 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v.truncate(i);
            }
            2 => {
                let i = rng.random_range(0..=v.len());
                v.insert(i, rng.random());
            }
            3 if v.len() > 1 => {
                let i = rng.random_range(0..v.len());
                v.remove(i);
            }
            _ => {
                let i = rng.random_range(0..=v.len());
                let b = *b".{}\"[]:,*0\\".get(rng.random_range(0..11)).unwrap();
                v.insert(i, b);
            }
        }
    }
    v
}

#[test]
fn control_messages_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let seeds: [&[u8]; 5] = [
        br#"{"op":"subscribe","id":1,"feed":"XNAS","symbols":["AAPL","MSFT"],"snapshot":true,"resume":{"AAPL":1234}}"#,
        br#"{"op":"unsubscribe","id":2,"feed":"XNAS","symbols":["*"]}"#,
        br#"{"op":"refresh","id":3,"token":"a.b.c"}"#,
        br#"{"op":"ping","id":4}"#,
        br#"{"op":"auth","token":"x"}"#,
    ];
    for i in 0..60_000 {
        let input = if i % 10 == 0 {
            (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
        } else {
            mutate(&mut rng, seeds[i % seeds.len()])
        };
        let _ = parse_client_msg(&String::from_utf8_lossy(&input));
    }
}

#[test]
fn batches_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut good = vec![0u8; 16];
    write_batch_header(&mut good, 2, 7);
    good.extend_from_slice(Record::encode(1, 2, 3, 4, 5, &Body::Trade(Trade::default()), 0).as_bytes());
    good.extend_from_slice(Record::encode(1, 2, 4, 4, 5, &Body::Quote(Quote::default()), 0).as_bytes());
    assert_eq!(decode_batch(&good).unwrap().records.len(), 2);
    for i in 0..100_000 {
        let input = if i % 10 == 0 {
            (0..rng.random_range(0..200)).map(|_| rng.random()).collect()
        } else {
            mutate(&mut rng, &good)
        };
        if let Ok(b) = decode_batch(&input) {
            // Whatever decodes is internally consistent.
            for r in &b.records {
                assert!(r.len() == 56 || r.len() == 72);
            }
        }
    }
}

#[test]
fn tokens_never_panic_and_tampering_never_validates() {
    let keys = Arc::new(KeyStore::new());
    let (iss, _) =
        EmbeddedIssuer::new(&IssuerConfig::default(), "http://fuzz".into(), &keys, Some("x".into())).unwrap();
    let v = Validator::new(keys, "http://fuzz".into(), "tickgate".into(), &AuthConfig::default());
    let good = iss.issue("client", &["md:read:*".into()], 600).unwrap();
    assert!(v.validate(&good).is_ok());
    let signed_part = &good[..good.rfind('.').unwrap()];
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for i in 0..3_000 {
        let input = if i % 10 == 0 {
            (0..rng.random_range(0..300)).map(|_| rng.random_range(32u8..127)).collect()
        } else {
            mutate(&mut rng, good.as_bytes())
        };
        let text = String::from_utf8_lossy(&input).into_owned();
        let result = v.validate(&text);
        let same_signed_part = text.rfind('.').map(|d| &text[..d]) == Some(signed_part);
        if !same_signed_part {
            assert!(result.is_err(), "a token with a changed header or payload validated: {text}");
        }
    }
}

#[test]
fn config_and_feed_files_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let cfg = include_str!("../../tickgate.example.toml").as_bytes();
    let feed = include_str!("../../feeds/demo.toml").as_bytes();
    for _ in 0..3_000 {
        let _ = Config::from_toml(&String::from_utf8_lossy(&mutate(&mut rng, cfg)));
        let _ = FeedDef::parse("fuzz", &String::from_utf8_lossy(&mutate(&mut rng, feed)));
    }
}

/// The files of `fuzz/<dir>/<target>/` (the committed corpus or past findings).
fn fuzz_files(dir: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir).join(target);
    let Ok(entries) = std::fs::read_dir(&path) else { return Vec::new() };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

/// The coverage-guided corpus (fuzz/corpus, see docs/fuzzing.md) replayed on stable
/// through the same parsers, so the inputs that reach deep paths run in every test run.
#[test]
fn committed_fuzz_corpus_never_panics() {
    let mut n = 0;
    for (_, data) in fuzz_files("corpus", "batch") {
        let _ = decode_batch(&data);
        n += 1;
    }
    let mut out = Vec::new();
    for (_, data) in fuzz_files("corpus", "publish") {
        let _ = tickgate::sources::publish::decode(&data, 7, 4, &mut out);
        n += 1;
    }
    for (_, data) in fuzz_files("corpus", "control") {
        let _ = parse_client_msg(&String::from_utf8_lossy(&data));
        n += 1;
    }
    for (_, data) in fuzz_files("corpus", "recording") {
        if let Ok(mut r) = tickgate_proto::recording::Reader::new(&data[..]) {
            while let Ok(Some(_)) = r.next_record() {}
        }
        n += 1;
    }
    for (_, data) in fuzz_files("corpus", "jwks") {
        let _ = tickgate::auth::jwks::parse_set(&data);
        n += 1;
    }
    assert!(n >= 15, "the committed corpus is missing ({n} files)");
}

/// Finding (fuzz/regressions/batch): a 48-byte batch announcing 65,281 records made the
/// batch decoder reserve room for all of them (4.7 MB) before reading the first. Its
/// answer is unchanged (the first record's length is bad); the allocation is now bounded
/// by the message size, which `scripts/fuzz.sh` checks with `-malloc_limit_mb=4`.
#[test]
fn fuzz_finding_batch_count_is_not_trusted_for_allocation() {
    let files = fuzz_files("regressions", "batch");
    assert!(!files.is_empty());
    for (name, data) in files {
        let e = decode_batch(&data).unwrap_err();
        assert_eq!(e.to_string(), "bad record length 38 at offset 16", "{name}");
        let mut out = Vec::new();
        let r = tickgate::sources::publish::decode(&data, 1, 1, &mut out).unwrap_err();
        assert_eq!(r.reason.as_str(), "malformed_batch", "{name}");
    }
}

/// Finding (fuzz/regressions/recording): a 14-byte file announcing 8 MiB of metadata made
/// the recording reader allocate the 8 MiB before reading. Same answer as before (truncated
/// metadata); the reader now only holds what the file really has.
#[test]
fn fuzz_finding_recording_metadata_length_is_not_trusted_for_allocation() {
    let files = fuzz_files("regressions", "recording");
    assert!(!files.is_empty());
    for (name, data) in files {
        let e = tickgate_proto::recording::Reader::new(&data[..]).unwrap_err();
        assert_eq!(e.to_string(), "not a valid tickgate recording: truncated metadata", "{name}");
    }
}
