//! Criterion bench of token validation with a cached key: the whole per-handshake auth cost
//! (header checks, pinned algorithm, ES256 signature, claims, lifetime, scopes, revocation
//! list), against the peer of calling `jsonwebtoken::decode` alone on the same token.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tickgate::auth::issuer::EmbeddedIssuer;
use tickgate::auth::keys::KeyStore;
use tickgate::auth::validate::Validator;
use tickgate::config::{AuthConfig, IssuerConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench_validate(c: &mut Criterion) {
    let keys = Arc::new(KeyStore::new());
    let (iss, _) =
        EmbeddedIssuer::new(&IssuerConfig::default(), "http://bench".into(), &keys, Some("x".into())).unwrap();
    let token = iss.issue("client", &["md:read:*".into()], 900).unwrap();
    let validator = Validator::new(keys.clone(), "http://bench".into(), "tickgate".into(), &AuthConfig::default());
    assert!(validator.validate(&token).is_ok());
    let mut g = c.benchmark_group("token_validation");
    g.throughput(Throughput::Elements(1));
    g.bench_function("tickgate_validate_es256", |b| {
        b.iter(|| black_box(validator.validate(black_box(&token)).is_ok()))
    });
    let key = keys.get(&iss.kid()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["tickgate"]);
    g.bench_function("peer_jsonwebtoken_decode_es256", |b| {
        b.iter(|| black_box(jsonwebtoken::decode::<serde_json::Value>(black_box(&token), &key.key, &v).is_ok()))
    });
    g.finish();
}

criterion_group!(benches, bench_validate);
criterion_main!(benches);
