//! RSA-2048 test keys (rcgen on aws-lc-rs) in the forms jsonwebtoken and a JWK need. Shared
//! by the JWKS tests and the auth bench (`#[path]`-included there).
#![allow(dead_code, clippy::unwrap_used, unreachable_pub, missing_docs)]

/// Minimal DER reader: (tag, content, rest).
pub fn der(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let (len, hdr) = if input[1] < 0x80 {
        (input[1] as usize, 2)
    } else {
        let n = (input[1] & 0x7f) as usize;
        (input[2..2 + n].iter().fold(0usize, |a, b| (a << 8) | *b as usize), 2 + n)
    };
    (tag, &input[hdr..hdr + len], &input[hdr + len..])
}

/// A fresh RSA-2048 key: the PKCS#1 private key, the modulus and exponent (big-endian,
/// no leading zero), and the PKCS#1 public key DER.
pub struct RsaKey {
    pub pkcs1: Vec<u8>,
    pub n: Vec<u8>,
    pub e: Vec<u8>,
    pub public_der: Vec<u8>,
}

pub fn rsa_key() -> RsaKey {
    let kp = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    // PKCS#8 PrivateKeyInfo: SEQUENCE { version, algorithm, OCTET STRING { RSAPrivateKey } }.
    let pkcs8 = kp.serialize_der();
    let (_, info, _) = der(&pkcs8);
    let (_, _, rest) = der(info);
    let (_, _, rest) = der(rest);
    let (tag, pkcs1, _) = der(rest);
    assert_eq!(tag, 0x04, "PKCS#8 private key is an OCTET STRING");
    // RSAPublicKey: SEQUENCE { INTEGER n, INTEGER e }.
    let public_der = kp.public_key_raw().to_vec();
    let (_, seq, _) = der(&public_der);
    let (_, n, rest) = der(seq);
    let (_, e, _) = der(rest);
    let n = if n[0] == 0 { &n[1..] } else { n };
    RsaKey { pkcs1: pkcs1.to_vec(), n: n.to_vec(), e: e.to_vec(), public_der: public_der.clone() }
}
