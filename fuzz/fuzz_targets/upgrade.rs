//! The upgrade request head through `server::handshake::parse_upgrade` (which reads the
//! `Authorization` header with `bearer_token` and the `bearer.` subprotocol), then the
//! token validator on whatever token it extracts.
//!
//! Input: an HTTP request head as text, `METHOD TARGET VERSION` then `Name: value` lines
//! (values may be any bytes, so non-UTF-8 headers are reached). Nothing may panic, and:
//! - an accepted head is a GET of HTTP/1.1 or later with one `Host`, one
//!   `Sec-WebSocket-Key` that is base64 of 16 bytes, and `tickgate.v1` offered;
//! - every refusal is a 400 `invalid_request` with one of the fixed descriptions, so
//!   nothing of the request (a token above all) is echoed into a response or a log;
//! - no extracted token validates (the validator's key was never used to sign anything).
#![no_main]

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};
use libfuzzer_sys::fuzz_target;
use tickgate::auth::issuer::EmbeddedIssuer;
use tickgate::auth::keys::KeyStore;
use tickgate::auth::validate::Validator;
use tickgate::config::{AuthConfig, IssuerConfig};
use tickgate::server::authorize::Credential;
use tickgate::server::handshake::parse_upgrade;

fn validator() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| {
        let keys = Arc::new(KeyStore::new());
        let (_iss, _) = EmbeddedIssuer::new(&IssuerConfig::default(), "http://fuzz".into(), &keys, Some("x".into()))
            .expect("issuer");
        Validator::new(keys, "http://fuzz".into(), "tickgate".into(), &AuthConfig::default())
    })
}

/// Every refusal text of `parse_upgrade` (and `bearer_token`, which it calls).
const DESCRIPTIONS: [&str; 19] = [
    "the stream endpoint takes GET",
    "a WebSocket upgrade must use HTTP/1.1 or higher",
    "the Host header is required",
    "more than one Host header",
    "not a WebSocket upgrade request",
    "Sec-WebSocket-Version must be 13",
    "more than one Sec-WebSocket-Key header",
    "missing or malformed Sec-WebSocket-Key",
    "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
    "malformed query string",
    "tokens in the URL are refused; use the Authorization header, the bearer subprotocol or a ticket",
    "more than one ticket",
    "malformed Sec-WebSocket-Protocol header",
    "the `tickgate.v1` subprotocol is required",
    "more than one bearer subprotocol",
    "two credentials at once (Authorization header, bearer subprotocol, ticket: use exactly one)",
    "more than one Authorization header",
    "malformed Authorization header",
    "Authorization must use the Bearer scheme",
];

fn version(v: &[u8]) -> Option<Version> {
    Some(match v {
        b"HTTP/0.9" => Version::HTTP_09,
        b"HTTP/1.0" => Version::HTTP_10,
        b"HTTP/1.1" => Version::HTTP_11,
        b"HTTP/2" | b"HTTP/2.0" => Version::HTTP_2,
        b"HTTP/3" | b"HTTP/3.0" => Version::HTTP_3,
        _ => return None,
    })
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let Some(first) = lines.next() else { return };
    let mut parts = first.splitn(3, |&b| b == b' ');
    let (Some(m), Some(target), Some(v)) = (parts.next(), parts.next(), parts.next()) else { return };
    let (Ok(method), Some(version)) = (Method::from_bytes(m), version(v)) else { return };
    let query = target.iter().position(|&b| b == b'?').map(|i| &target[i + 1..]);
    let Ok(query) = query.map(std::str::from_utf8).transpose() else { return };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }

    match parse_upgrade(&method, version, query, &headers) {
        Err(r) => {
            assert_eq!((r.status.as_u16(), r.error, r.result.as_str()), (400, "invalid_request", "bad_request"));
            // Only fixed texts: nothing from the request (a token above all) is echoed.
            assert!(DESCRIPTIONS.contains(&r.description.as_str()), "unexpected refusal text: {}", r.description);
        }
        Ok(up) => {
            assert_eq!(method, Method::GET);
            assert!(version >= Version::HTTP_11);
            assert_eq!(headers.get_all(http::header::HOST).iter().count(), 1);
            assert_eq!(headers.get_all(http::header::SEC_WEBSOCKET_KEY).iter().count(), 1);
            let key = base64::engine::general_purpose::STANDARD.decode(&up.key).expect("key is base64");
            assert_eq!(key.len(), 16);
            let protos: Vec<&str> = headers
                .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(',').map(str::trim))
                .collect();
            assert!(protos.contains(&"tickgate.v1"));
            if let Credential::Bearer(t) = &up.credential {
                assert!(validator().validate(t).is_err(), "a fuzzed token validated");
            }
        }
    }
});
