//! The verification key cache: keys by `kid`, each bound to the one algorithm it may
//! verify. Handshakes only read it (a short read lock and an `Arc` clone); the embedded
//! issuer or the JWKS fetcher replace the whole set at once, so a reader never sees half
//! an update.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use jsonwebtoken::{Algorithm, DecodingKey};

/// A verification key and the algorithm it is pinned to.
#[derive(Clone)]
pub struct VerifyKey {
    /// The only algorithm this key verifies (from the JWK's `alg`, or its key type).
    pub alg: Algorithm,
    /// The key material.
    pub key: Arc<DecodingKey>,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey").field("alg", &self.alg).finish()
    }
}

/// An immutable set of keys, replaced as a whole.
pub type KeySet = HashMap<String, VerifyKey>;

/// The shared key cache.
#[derive(Debug, Default)]
pub struct KeyStore {
    keys: RwLock<Arc<KeySet>>,
}

impl KeyStore {
    /// An empty store (not ready).
    pub fn new() -> KeyStore {
        KeyStore::default()
    }

    /// Replaces the whole key set.
    pub fn replace(&self, set: KeySet) {
        let set = Arc::new(set);
        match self.keys.write() {
            Ok(mut g) => *g = set,
            // A writer panicked while holding the lock; the Arc swap itself cannot leave
            // the map half-written, so recover the guard and carry on.
            Err(poisoned) => *poisoned.into_inner() = set,
        }
    }

    /// The current key set.
    pub fn snapshot(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Looks a key up by `kid`.
    pub fn get(&self, kid: &str) -> Option<VerifyKey> {
        self.snapshot().get(kid).cloned()
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    /// True when no key is loaded (the server is not ready).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The JOSE name of an algorithm.
pub fn alg_str(a: Algorithm) -> &'static str {
    match a {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
        // Algorithms added to the crate later are simply not on the allowlist.
        _ => "unsupported",
    }
}
