//! A stable-toolchain fuzz smoke test run in CI: random and mutated inputs through every
//! parser that network input reaches (control messages, batches, tokens, feed and config
//! files). Nothing may panic, and a token whose header or payload was changed never
//! validates. The coverage-guided targets in `fuzz/` (cargo-fuzz, nightly) go deeper.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tickgate::auth::issuer::EmbeddedIssuer;
use tickgate::auth::keys::KeyStore;
use tickgate::auth::validate::Validator;
use tickgate::config::{AuthConfig, Config, IssuerConfig};
use tickgate::feeds::FeedDef;
use tickgate::protocol::codec::{decode_batch, write_batch_header, Body, Quote, Record, Trade};
use tickgate::protocol::control::parse_client_msg;

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
    let cfg = include_str!("../tickgate.example.toml").as_bytes();
    let feed = include_str!("../feeds/demo.toml").as_bytes();
    for _ in 0..3_000 {
        let _ = Config::from_toml(&String::from_utf8_lossy(&mutate(&mut rng, cfg)));
        let _ = FeedDef::parse("fuzz", &String::from_utf8_lossy(&mutate(&mut rng, feed)));
    }
}
