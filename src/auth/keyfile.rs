//! The embedded issuer's ES256 signing keys: generated at start (one node, automatic
//! rotation), or loaded from PEM files (`issuer.signing_key_files`) so that every node of a
//! cluster signs and accepts the same tokens. Also writes new key files (`tickgate keygen`).
//!
//! A key's `kid` is its RFC 7638 JWK thumbprint (base64url SHA-256 of the canonical public
//! JWK), so it depends on the public key alone: every node that loads the same file
//! publishes the same `kid`, without any coordination.
//!
//! No error or log line here ever shows key material: errors name the file and say what
//! is wrong with it, nothing more.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::{DecodingKey, EncodingKey};
use rustls_pki_types::pem::{PemObject, SectionKind};
use serde_json::json;
use thiserror::Error;

use super::hash::sha256;

/// Why a signing key file could not be used (or written). Each names the file; none
/// carries key material.
#[derive(Debug, Error)]
pub enum KeyFileError {
    /// An entry of `issuer.signing_key_files` is the empty string.
    #[error("issuer.signing_key_files[{index}] is empty: give the path of a PEM key file")]
    EmptyEntry {
        /// Position in the list (from 0).
        index: usize,
    },
    /// The file could not be read.
    #[error("signing key file {path}: cannot read it: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not PEM, or its PEM is malformed.
    #[error("signing key file {path}: not a PEM file ({why}); expected `-----BEGIN PRIVATE KEY-----` (PKCS#8) or `-----BEGIN EC PRIVATE KEY-----` (SEC1)")]
    NotPem {
        /// The file.
        path: PathBuf,
        /// What the PEM reader found wrong.
        why: String,
    },
    /// The file is PEM but holds no private key (a certificate, a public key...).
    #[error("signing key file {path}: holds no private key (found {found}); expected an EC P-256 private key")]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
        /// The PEM sections found instead.
        found: String,
    },
    /// The file holds more than one private key, so which one signs would be a guess.
    #[error("signing key file {path}: holds {count} private keys; put one key in each file")]
    SeveralKeys {
        /// The file.
        path: PathBuf,
        /// How many.
        count: usize,
    },
    /// The private key is not an EC key on P-256 (RSA, P-384, Ed25519...).
    #[error("signing key file {path}: not an EC P-256 private key ({found}); ES256 needs a P-256 key (`tickgate keygen --out FILE` writes one)")]
    NotP256 {
        /// The file.
        path: PathBuf,
        /// What kind of key it seems to be.
        found: &'static str,
    },
    /// Two entries hold the same key (the same file listed twice, or a copy).
    #[error("signing key files {first} and {second} hold the same key (kid {kid}); list each key once")]
    Duplicate {
        /// The earlier entry.
        first: PathBuf,
        /// The later entry.
        second: PathBuf,
        /// The key's id (public).
        kid: String,
    },
    /// The crypto library failed on a key it had accepted (not expected).
    #[error("signing key {path}: {why}")]
    Crypto {
        /// The file, or `<generated>`.
        path: PathBuf,
        /// The library's message.
        why: String,
    },
    /// A new key file could not be written.
    #[error("cannot write key file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// An ES256 signing key with its public JWK.
pub(crate) struct SigningKey {
    /// RFC 7638 thumbprint of the public key.
    pub(crate) kid: String,
    pub(crate) encoding: EncodingKey,
    pub(crate) jwk: serde_json::Value,
    pub(crate) decoding: Arc<DecodingKey>,
}

impl SigningKey {
    /// A fresh random key.
    pub(crate) fn generate() -> Result<SigningKey, KeyFileError> {
        let pkcs8 = generate_pkcs8()?;
        let crypto = |why: String| KeyFileError::Crypto { path: PathBuf::from("<generated>"), why };
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8).map_err(|e| crypto(e.to_string()))?;
        SigningKey::from_pair(&pair, pkcs8).map_err(crypto)
    }

    /// The key of a parsed pair; `pkcs8` is the same key as PKCS#8 DER (what the JWT
    /// library signs with).
    fn from_pair(pair: &EcdsaKeyPair, pkcs8: Vec<u8>) -> Result<SigningKey, String> {
        // Uncompressed SEC1 point: 0x04 || X (32 bytes) || Y (32 bytes).
        let point = pair.public_key().as_ref();
        if point.len() != 65 || point[0] != 4 {
            return Err("unexpected public key encoding".into());
        }
        let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&point[33..65]);
        let kid = thumbprint(&x, &y);
        let decoding = DecodingKey::from_ec_components(&x, &y).map_err(|e| e.to_string())?;
        Ok(SigningKey {
            jwk: json!({"kty":"EC","crv":"P-256","x":x,"y":y,"kid":kid,"alg":"ES256","use":"sig"}),
            kid,
            encoding: EncodingKey::from_ec_der(&pkcs8),
            decoding: Arc::new(decoding),
        })
    }

    /// Loads the one private key of a PEM file.
    pub(crate) fn from_file(path: &Path) -> Result<SigningKey, KeyFileError> {
        let text = std::fs::read(path).map_err(|source| KeyFileError::Read { path: path.to_owned(), source })?;
        let key = SigningKey::from_pem(path, &text)?;
        // Only a file that really holds a key is worth the warning.
        warn_if_shared(path);
        Ok(key)
    }

    /// Parses the PEM text of `path` (read by the caller).
    fn from_pem(path: &Path, text: &[u8]) -> Result<SigningKey, KeyFileError> {
        let mut sections = Vec::new();
        for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(text) {
            match item {
                Ok(s) => sections.push(s),
                // The PEM reader's errors describe the structure (a missing END line, bad
                // base64), never the decoded bytes.
                Err(e) => return Err(KeyFileError::NotPem { path: path.to_owned(), why: e.to_string() }),
            }
        }
        if sections.is_empty() {
            return Err(KeyFileError::NotPem { path: path.to_owned(), why: "no PEM section found".into() });
        }
        let keys: Vec<&(SectionKind, Vec<u8>)> = sections
            .iter()
            .filter(|(k, _)| {
                matches!(k, SectionKind::PrivateKey | SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey)
            })
            .collect();
        let (kind, der) = match keys.as_slice() {
            [] => {
                let found: Vec<&str> = sections.iter().map(|(k, _)| section_name(*k)).collect();
                return Err(KeyFileError::NoPrivateKey { path: path.to_owned(), found: found.join(", ") });
            }
            [one] => (one.0, &one.1),
            more => return Err(KeyFileError::SeveralKeys { path: path.to_owned(), count: more.len() }),
        };
        if kind == SectionKind::RsaPrivateKey {
            return Err(KeyFileError::NotP256 { path: path.to_owned(), found: "an RSA key" });
        }
        // PKCS#8 of any EC curve, or SEC1 (RFC 5915): the curve is checked against P-256.
        let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der).map_err(|_| {
            KeyFileError::NotP256 {
                path: path.to_owned(),
                found: if kind == SectionKind::EcPrivateKey {
                    "an EC key on another curve, or a malformed one"
                } else {
                    "another key type or curve, or a malformed key"
                },
            }
        })?;
        // Normalised to PKCS#8 v1, the one form the JWT library signs with, so a SEC1 file
        // works too.
        let crypto = |why: String| KeyFileError::Crypto { path: path.to_owned(), why };
        let pkcs8 = pair.to_pkcs8v1().map_err(|e| crypto(e.to_string()))?;
        SigningKey::from_pair(&pair, pkcs8.as_ref().to_vec()).map_err(crypto)
    }
}

/// The PEM label of a section kind, for error messages.
fn section_name(k: SectionKind) -> &'static str {
    match k {
        SectionKind::Certificate => "CERTIFICATE",
        SectionKind::PublicKey => "PUBLIC KEY",
        SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
        SectionKind::PrivateKey => "PRIVATE KEY",
        SectionKind::EcPrivateKey => "EC PRIVATE KEY",
        SectionKind::Crl => "X509 CRL",
        SectionKind::Csr => "CERTIFICATE REQUEST",
        SectionKind::EchConfigList => "ECHCONFIG",
        // Kinds added to the library later.
        _ => "another PEM section",
    }
}

/// RFC 7638 thumbprint of a P-256 public key: base64url SHA-256 of the JWK's required
/// members in lexicographic order, without whitespace.
fn thumbprint(x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    URL_SAFE_NO_PAD.encode(sha256(canonical.as_bytes()))
}

/// A private key file that group or others may read is logged as a warning, not refused:
/// secret mounts (Kubernetes, some config managers) often hand out 0644 files on a host
/// where no other user exists, and refusing to start there would only teach people to
/// disable the check.
fn warn_if_shared(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(file = %path.display(), mode = %format!("{mode:03o}"),
                    "signing key file is accessible by group or others; `chmod 600` it");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Loads `issuer.signing_key_files`, in the order given (the last one signs). Every entry
/// must name a readable PEM file with one EC P-256 private key, and no key may appear twice.
pub(crate) fn load(paths: &[PathBuf]) -> Result<Vec<SigningKey>, KeyFileError> {
    let mut keys: Vec<(PathBuf, SigningKey)> = Vec::with_capacity(paths.len());
    for (index, path) in paths.iter().enumerate() {
        if path.as_os_str().is_empty() {
            return Err(KeyFileError::EmptyEntry { index });
        }
        let key = SigningKey::from_file(path)?;
        if let Some((first, _)) = keys.iter().find(|(_, k)| k.kid == key.kid) {
            return Err(KeyFileError::Duplicate { first: first.clone(), second: path.clone(), kid: key.kid });
        }
        keys.push((path.clone(), key));
    }
    Ok(keys.into_iter().map(|(_, k)| k).collect())
}

/// A new random P-256 key as PKCS#8 DER.
fn generate_pkcs8() -> Result<Vec<u8>, KeyFileError> {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .map_err(|e| KeyFileError::Crypto { path: PathBuf::from("<generated>"), why: e.to_string() })?;
    Ok(doc.as_ref().to_vec())
}

/// A new random EC P-256 private key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), the
/// form `issuer.signing_key_files` reads.
pub fn generate_pem() -> Result<String, KeyFileError> {
    let der = generate_pkcs8()?;
    let b64 = STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    // RFC 7468: lines of 64 base64 characters.
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok(pem)
}

/// The `kid` the issuer publishes for the key in the PEM file `path` (public information).
pub fn kid_of_file(path: &Path) -> Result<String, KeyFileError> {
    Ok(SigningKey::from_file(path)?.kid)
}

/// Writes a new key to `path` (which must not exist yet), readable by its owner only
/// (mode 0600, set when the file is created, so the key is never readable by others even
/// for a moment). Returns the new key's `kid`.
pub fn write_new_key_file(path: &Path) -> Result<String, KeyFileError> {
    use std::io::Write as _;
    let pem = generate_pem()?;
    let write = |source| KeyFileError::Write { path: path.to_owned(), source };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(write)?;
    file.write_all(pem.as_bytes()).map_err(write)?;
    file.sync_all().map_err(write)?;
    let key = SigningKey::from_pem(path, pem.as_bytes())?;
    Ok(key.kid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    /// The SEC1 (`EC PRIVATE KEY`, RFC 5915) form of a PKCS#8 PEM key, as OpenSSL's
    /// `openssl ecparam -genkey` writes it.
    fn sec1_pem(pkcs8_pem: &str) -> String {
        use aws_lc_rs::encoding::AsDer;
        let (_, der) = <(SectionKind, Vec<u8>)>::from_pem_slice(pkcs8_pem.as_bytes()).expect("pem");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der).expect("pair");
        let sec1 = pair.private_key().as_der().expect("sec1");
        format!("-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n", STANDARD.encode(sec1.as_ref()))
    }

    #[test]
    fn pkcs8_and_sec1_files_give_the_same_kid() {
        let dir = tempfile::tempdir().expect("dir");
        let pem = generate_pem().expect("pem");
        let a = write(dir.path(), "a.pem", &pem);
        let b = write(dir.path(), "b.pem", &sec1_pem(&pem));
        let ka = SigningKey::from_file(&a).expect("pkcs8");
        let kb = SigningKey::from_file(&b).expect("sec1");
        assert_eq!(ka.kid, kb.kid);
        assert_eq!(ka.kid.len(), 43, "base64url of 32 bytes");
        // The kid is the thumbprint of the published JWK.
        let (x, y) = (ka.jwk["x"].as_str().expect("x"), ka.jwk["y"].as_str().expect("y"));
        assert_eq!(thumbprint(x, y), ka.kid);
        // Two loads of one file agree (what two nodes do).
        assert_eq!(SigningKey::from_file(&a).expect("again").kid, ka.kid);
    }

    #[test]
    fn load_keeps_order_and_refuses_duplicates() {
        let dir = tempfile::tempdir().expect("dir");
        let k1 = write(dir.path(), "k1.pem", &generate_pem().expect("pem"));
        let k2 = write(dir.path(), "k2.pem", &generate_pem().expect("pem"));
        let keys = load(&[k1.clone(), k2.clone()]).expect("load");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].kid, kid_of_file(&k1).expect("kid"));
        assert_eq!(keys[1].kid, kid_of_file(&k2).expect("kid"));
        let copy = dir.path().join("copy.pem");
        std::fs::copy(&k1, &copy).expect("copy");
        let e = load(&[k1.clone(), k2.clone(), copy.clone()]).err().expect("duplicate");
        let msg = e.to_string();
        assert!(matches!(e, KeyFileError::Duplicate { .. }), "{msg}");
        assert!(msg.contains("k1.pem") && msg.contains("copy.pem"), "{msg}");
        let e = load(&[k1.clone(), k1.clone()]).err().expect("same file twice");
        assert!(matches!(e, KeyFileError::Duplicate { .. }), "{e}");
    }

    /// Every refusal names the file and never shows the key.
    #[test]
    fn bad_files_are_refused_with_their_name() {
        let dir = tempfile::tempdir().expect("dir");
        let pem = generate_pem().expect("pem");
        let b64_body: String = pem.lines().nth(1).expect("body").to_owned();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
        let rsa = format!(
            "-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----\n",
            STANDARD.encode([0x30u8, 0x03, 0x02, 0x01, 0x00])
        );
        // (file name, contents, the expected variant, words the message must contain)
        type Case = (&'static str, String, fn(&KeyFileError) -> bool, &'static str);
        let cases: Vec<Case> = vec![
            ("plain.pem", "just some text\n".into(), |e| matches!(e, KeyFileError::NotPem { .. }), "not a PEM file"),
            (
                "truncated.pem",
                format!("-----BEGIN PRIVATE KEY-----\n{b64_body}\n"),
                |e| matches!(e, KeyFileError::NotPem { .. }),
                "not a PEM file",
            ),
            (
                "cert.pem",
                cert.cert.pem(),
                |e| matches!(e, KeyFileError::NoPrivateKey { .. }),
                "holds no private key (found CERTIFICATE)",
            ),
            (
                "two.pem",
                format!("{pem}{pem}"),
                |e| matches!(e, KeyFileError::SeveralKeys { .. }),
                "holds 2 private keys",
            ),
            ("p384.pem", p384.serialize_pem(), |e| matches!(e, KeyFileError::NotP256 { .. }), "not an EC P-256"),
            ("ed.pem", ed.serialize_pem(), |e| matches!(e, KeyFileError::NotP256 { .. }), "not an EC P-256"),
            ("rsa.pem", rsa, |e| matches!(e, KeyFileError::NotP256 { .. }), "an RSA key"),
        ];
        for (name, text, is, words) in cases {
            let p = write(dir.path(), name, &text);
            let e = load(std::slice::from_ref(&p)).err().unwrap_or_else(|| panic!("{name} accepted"));
            let msg = e.to_string();
            assert!(is(&e), "{name}: {msg}");
            assert!(msg.contains(&p.display().to_string()), "{name}: the message names the file: {msg}");
            assert!(msg.contains(words), "{name}: {msg}");
            assert!(!msg.contains(&b64_body[..20]), "{name}: key material in the message");
        }
        let missing = dir.path().join("missing.pem");
        let e = load(std::slice::from_ref(&missing)).err().expect("missing");
        assert!(matches!(e, KeyFileError::Read { .. }) && e.to_string().contains("missing.pem"), "{e}");
        let e = load(&[missing.clone(), PathBuf::new()]).err().expect("read first");
        assert!(matches!(e, KeyFileError::Read { .. }), "{e}");
        let good = write(dir.path(), "good.pem", &pem);
        let e = load(&[good, PathBuf::new()]).err().expect("empty entry");
        assert!(matches!(e, KeyFileError::EmptyEntry { index: 1 }), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn new_key_files_are_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("new.pem");
        let kid = write_new_key_file(&p).expect("written");
        assert_eq!(std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777, 0o600);
        assert_eq!(kid_of_file(&p).expect("kid"), kid);
        let before = std::fs::read(&p).expect("read");
        let e = write_new_key_file(&p).expect_err("exists");
        assert!(matches!(e, KeyFileError::Write { .. }) && e.to_string().contains("new.pem"), "{e}");
        assert_eq!(std::fs::read(&p).expect("read"), before, "the old key is kept");
        assert_ne!(write_new_key_file(&dir.path().join("other.pem")).expect("second"), kid);
    }
}
