//! Token validation on arbitrary input: must never panic, and never accept.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tickgate::auth::issuer::EmbeddedIssuer;
use tickgate::auth::keys::KeyStore;
use tickgate::auth::validate::Validator;
use tickgate::config::{AuthConfig, IssuerConfig};

fn validator() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| {
        let keys = Arc::new(KeyStore::new());
        let (_iss, _) = EmbeddedIssuer::new(&IssuerConfig::default(), "http://fuzz".into(), &keys, Some("x".into()))
            .expect("issuer");
        Validator::new(keys, "http://fuzz".into(), "tickgate".into(), &AuthConfig::default())
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        assert!(validator().validate(s).is_err());
    }
});
