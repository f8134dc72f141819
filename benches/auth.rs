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

#[path = "../tests/it/common/rsa.rs"]
mod rsa;

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

    // RS256 (RSA-2048), the algorithm most external issuers use, through the same code path.
    let k = rsa::rsa_key();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let rsa_keys = Arc::new(KeyStore::new());
    let mut set = tickgate::auth::keys::KeySet::new();
    let jwk = serde_json::json!({"kty":"RSA","kid":"r1","n":b64.encode(&k.n),"e":b64.encode(&k.e)});
    let (kid, vk) = tickgate::auth::jwks::parse_jwk(&jwk).unwrap();
    set.insert(kid, vk);
    rsa_keys.replace(set);
    let rsa_validator =
        Validator::new(rsa_keys.clone(), "http://bench".into(), "tickgate".into(), &AuthConfig::default());
    let now = jsonwebtoken::get_current_timestamp();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.typ = Some("at+jwt".into());
    h.kid = Some("r1".into());
    let claims = serde_json::json!({"iss":"http://bench","sub":"c","aud":"tickgate","iat":now,"exp":now+900,"scope":"md:read:*"});
    let rsa_token = jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_rsa_der(&k.pkcs1)).unwrap();
    assert!(rsa_validator.validate(&rsa_token).is_ok());
    g.bench_function("tickgate_validate_rs256", |b| {
        b.iter(|| black_box(rsa_validator.validate(black_box(&rsa_token)).is_ok()))
    });
    let rkey = rsa_keys.get("r1").unwrap();
    let mut rv = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    rv.set_audience(&["tickgate"]);
    g.bench_function("peer_jsonwebtoken_decode_rs256", |b| {
        b.iter(|| black_box(jsonwebtoken::decode::<serde_json::Value>(black_box(&rsa_token), &rkey.key, &rv).is_ok()))
    });
    g.finish();
}

criterion_group!(benches, bench_validate);
criterion_main!(benches);
