//! The JWKS parser (`auth::jwks::parse_set`, and `parse_jwk` on each entry) on arbitrary
//! bytes. Nothing may panic, and `parse_set` agrees with `parse_jwk`: it succeeds exactly
//! when some entry of `keys` is usable, and holds only the kids of usable entries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickgate::auth::jwks::{parse_jwk, parse_set};

fuzz_target!(|data: &[u8]| {
    let set = parse_set(data);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        assert!(set.is_err());
        return;
    };
    let Some(keys) = v.get("keys").and_then(serde_json::Value::as_array) else {
        assert!(set.is_err());
        return;
    };
    let usable: Vec<String> = keys.iter().filter_map(|k| parse_jwk(k).ok()).map(|(kid, _)| kid).collect();
    match set {
        Ok(set) => {
            assert!(!usable.is_empty());
            for kid in set.keys() {
                assert!(usable.contains(kid), "parse_set kept a kid parse_jwk refuses");
            }
        }
        Err(_) => assert!(usable.is_empty(), "parse_set refused a set with a usable key"),
    }
});
