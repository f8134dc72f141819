//! The JWKS cache for an external issuer (`issuer.mode = "external"`).
//!
//! Keys are fetched from `issuer.jwks_url` in the background, never per connection:
//! - a fetch must answer 200 with a JSON body no larger than `issuer.jwks_max_bytes`, within
//!   `issuer.jwks_timeout_ms`, without redirects; anything else (an error status, HTML, bad
//!   JSON, a set with no usable key) never replaces the last good set. A single bad key in an
//!   otherwise good set is skipped and the rest are used;
//! - a good fetch replaces the whole set (a key removed at the issuer is a revoked key);
//! - the set is refreshed every `issuer.jwks_refresh_s`; failures are retried with backoff;
//!   past `issuer.jwks_max_stale_s` without a good fetch the keys are dropped and the server
//!   reports not ready (503) rather than trusting keys the issuer may have rotated out;
//! - a token with an unknown `kid` triggers one refetch, at most one per
//!   `issuer.jwks_cooldown_s`, and recently unknown kids are remembered, so a flood of random
//!   kids costs at most one fetch per cooldown; the handshake itself never waits for it.
//!
//! Each JWK is pinned to one algorithm: its `alg` when present (which must agree with its
//! `kty`/`crv`), else the only one its key type allows here (RSA: RS256, P-256: ES256,
//! P-384: ES384, Ed25519: EdDSA). `use`, when present, must be `sig`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::keys::{KeySet, KeyStore, VerifyKey};
use crate::metrics::Metrics;

/// Why a fetch did not produce a usable key set. The variant name is the metric label.
#[derive(Debug, Error)]
pub enum JwksError {
    /// Connect/read failure or timeout.
    #[error("transport: {0}")]
    Transport(String),
    /// A status other than 200 (redirects included).
    #[error("HTTP status {0}")]
    Status(u16),
    /// The response is not JSON.
    #[error("content type `{0}` is not JSON")]
    NotJson(String),
    /// The body is over the size limit.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// The body is not a JWK Set.
    #[error("not a JWK Set: {0}")]
    BadJson(String),
    /// No key of the set is usable.
    #[error("no usable key in the set")]
    Empty,
}

impl JwksError {
    /// The `result` label of `tickgate_jwks_refreshes_total`.
    pub fn label(&self) -> &'static str {
        match self {
            JwksError::Transport(_) => "transport",
            JwksError::Status(_) => "http_status",
            JwksError::NotJson(_) => "not_json",
            JwksError::TooLarge(_) => "too_large",
            JwksError::BadJson(_) => "bad_json",
            JwksError::Empty => "empty",
        }
    }
}

/// Settings of the cache.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// Where the set is fetched.
    pub url: String,
    /// Regular refresh period.
    pub refresh: Duration,
    /// Least time between two fetches triggered by unknown kids.
    pub cooldown: Duration,
    /// Longest time keys are used without a good fetch.
    pub max_stale: Duration,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Largest body accepted.
    pub max_bytes: usize,
}

fn b64_len(s: &str) -> Option<usize> {
    URL_SAFE_NO_PAD.decode(s).ok().map(|v| v.len())
}

/// Turns one JWK into a pinned verification key, or says why not.
pub fn parse_jwk(jwk: &Value) -> Result<(String, VerifyKey), String> {
    let field = |k: &str| jwk.get(k).and_then(Value::as_str);
    let kid = field("kid").filter(|k| !k.is_empty()).ok_or("no kid")?;
    if let Some(u) = jwk.get("use") {
        if u.as_str() != Some("sig") {
            return Err(format!("kid {kid}: use is not sig"));
        }
    }
    let alg = field("alg");
    let (alg, key) = match field("kty") {
        Some("RSA") => {
            let (n, e) = (field("n").ok_or("RSA key without n")?, field("e").ok_or("RSA key without e")?);
            let alg = match alg {
                None | Some("RS256") => Algorithm::RS256,
                Some("PS256") => Algorithm::PS256,
                Some(other) => return Err(format!("kid {kid}: alg {other} not allowed for RSA")),
            };
            if b64_len(n).is_none_or(|l| l < 256) {
                return Err(format!("kid {kid}: RSA modulus missing or under 2048 bits"));
            }
            (alg, DecodingKey::from_rsa_components(n, e).map_err(|e| e.to_string())?)
        }
        Some("EC") => {
            let (x, y) = (field("x").ok_or("EC key without x")?, field("y").ok_or("EC key without y")?);
            let (want, len) = match field("crv") {
                Some("P-256") => (Algorithm::ES256, 32),
                Some("P-384") => (Algorithm::ES384, 48),
                other => return Err(format!("kid {kid}: curve {other:?} not allowed")),
            };
            if alg.is_some_and(|a| a != super::validate::alg_str(want)) {
                return Err(format!("kid {kid}: alg does not match the curve"));
            }
            if b64_len(x) != Some(len) || b64_len(y) != Some(len) {
                return Err(format!("kid {kid}: coordinates of the wrong length"));
            }
            (want, DecodingKey::from_ec_components(x, y).map_err(|e| e.to_string())?)
        }
        Some("OKP") => {
            let x = field("x").ok_or("OKP key without x")?;
            if field("crv") != Some("Ed25519") || alg.is_some_and(|a| a != "EdDSA") {
                return Err(format!("kid {kid}: only Ed25519 with EdDSA is allowed"));
            }
            if b64_len(x) != Some(32) {
                return Err(format!("kid {kid}: Ed25519 key of the wrong length"));
            }
            (Algorithm::EdDSA, DecodingKey::from_ed_components(x).map_err(|e| e.to_string())?)
        }
        other => return Err(format!("kid {kid}: key type {other:?} not allowed")),
    };
    Ok((kid.to_owned(), VerifyKey { alg, key: Arc::new(key) }))
}

/// Parses a JWK Set body, skipping unusable keys.
pub fn parse_set(body: &[u8]) -> Result<KeySet, JwksError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| JwksError::BadJson(e.to_string()))?;
    let keys = v.get("keys").and_then(Value::as_array).ok_or_else(|| JwksError::BadJson("no `keys` array".into()))?;
    let mut set = KeySet::new();
    for k in keys {
        match parse_jwk(k) {
            Ok((kid, key)) => {
                set.insert(kid, key);
            }
            Err(why) => tracing::warn!(why = %why, "JWKS key skipped"),
        }
    }
    if set.is_empty() {
        return Err(JwksError::Empty);
    }
    Ok(set)
}

#[derive(Debug, Default)]
struct State {
    last_good: Option<Instant>,
    last_attempt: Option<Instant>,
    unknown: HashMap<String, Instant>,
}

/// The cache: fetcher task plus the shared state handshakes consult on an unknown kid.
#[derive(Debug)]
pub struct JwksCache {
    settings: JwksSettings,
    store: Arc<KeyStore>,
    http: reqwest::Client,
    state: Mutex<State>,
    wake: Notify,
    metrics: Metrics,
}

/// Most unknown kids remembered (their entries expire after one cooldown).
const MAX_UNKNOWN: usize = 10_000;

impl JwksCache {
    /// A cache filling `store`. Call [`JwksCache::run`] to start fetching.
    pub fn new(settings: JwksSettings, store: Arc<KeyStore>, metrics: Metrics) -> Result<JwksCache, JwksError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| JwksError::Transport(e.to_string()))?;
        Ok(JwksCache { settings, store, http, state: Mutex::new(State::default()), wake: Notify::new(), metrics })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds since the last good fetch, if there was one.
    pub fn age(&self) -> Option<Duration> {
        self.lock().last_good.map(|t| t.elapsed())
    }

    /// One fetch: the parsed set, or why it is unusable.
    pub async fn fetch(&self) -> Result<KeySet, JwksError> {
        let mut resp =
            self.http.get(&self.settings.url).send().await.map_err(|e| JwksError::Transport(e.to_string()))?;
        if resp.status().as_u16() != 200 {
            return Err(JwksError::Status(resp.status().as_u16()));
        }
        let ctype = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !ctype.contains("json") {
            return Err(JwksError::NotJson(ctype.chars().take(64).collect()));
        }
        let max = self.settings.max_bytes;
        if resp.content_length().is_some_and(|l| l as usize > max) {
            return Err(JwksError::TooLarge(max));
        }
        // Read in chunks so a body without a length (or lying about it) stops at the cap.
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| JwksError::Transport(e.to_string()))? {
            if body.len() + chunk.len() > max {
                return Err(JwksError::TooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        parse_set(&body)
    }

    /// Fetches once and applies the result; returns whether it succeeded.
    async fn refresh(&self) -> bool {
        self.lock().last_attempt = Some(Instant::now());
        match self.fetch().await {
            Ok(set) => {
                let n = set.len();
                self.store.replace(set);
                {
                    let mut st = self.lock();
                    st.last_good = Some(Instant::now());
                    st.unknown.clear();
                }
                self.metrics.jwks_refreshes.with_label_values(&["ok"]).inc();
                tracing::info!(keys = n, "JWKS loaded");
                true
            }
            Err(e) => {
                self.metrics.jwks_refreshes.with_label_values(&[e.label()]).inc();
                tracing::warn!(error = %e, "JWKS fetch failed; keeping the last good keys");
                let stale = self.lock().last_good.is_none_or(|t| t.elapsed() > self.settings.max_stale);
                if stale && !self.store.is_empty() {
                    tracing::error!("JWKS older than issuer.jwks_max_stale_s: keys dropped, not ready");
                    self.store.replace(KeySet::new());
                }
                false
            }
        }
    }

    /// Called by a handshake that met an unknown `kid`: asks the fetcher for one refetch
    /// unless this kid was just looked for or a fetch happened within the cooldown. Never
    /// waits.
    pub fn note_unknown_kid(&self, kid: &str) {
        let now = Instant::now();
        let cooldown = self.settings.cooldown;
        let mut st = self.lock();
        if st.unknown.get(kid).is_some_and(|t| now.duration_since(*t) < cooldown) {
            return;
        }
        if st.unknown.len() >= MAX_UNKNOWN {
            st.unknown.retain(|_, t| now.duration_since(*t) < cooldown);
            if st.unknown.len() >= MAX_UNKNOWN {
                return;
            }
        }
        st.unknown.insert(kid.chars().take(128).collect(), now);
        if st.last_attempt.is_some_and(|t| now.duration_since(t) < cooldown) {
            return;
        }
        drop(st);
        self.wake.notify_one();
    }

    /// The fetcher loop: first fetch at once (the server is not ready until it succeeds),
    /// then every `refresh`, on demand (unknown kid, rate-limited), and after a failure with
    /// exponential backoff from 1 s up to a minute.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let ok = self.refresh().await;
            let wait = if ok {
                backoff = Duration::from_secs(1);
                self.settings.refresh
            } else {
                // Never wait longer after a failure than the regular refresh period.
                let w = backoff.min(self.settings.refresh);
                backoff = (backoff * 2).min(Duration::from_secs(60));
                w
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {
                    // On-demand refetch: respect the cooldown since the last attempt.
                    let since = self.lock().last_attempt.map(|t| t.elapsed()).unwrap_or(Duration::MAX);
                    if since < self.settings.cooldown {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(self.settings.cooldown - since) => {}
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(n: usize) -> String {
        URL_SAFE_NO_PAD.encode(vec![7u8; n])
    }

    #[test]
    fn jwk_algorithms_are_pinned_and_checked() {
        let ec = json!({"kty":"EC","crv":"P-256","x":b64(32),"y":b64(32),"kid":"a"});
        assert_eq!(parse_jwk(&ec).expect("ok").1.alg, Algorithm::ES256);
        let ec384 = json!({"kty":"EC","crv":"P-384","x":b64(48),"y":b64(48),"kid":"b","alg":"ES384"});
        assert_eq!(parse_jwk(&ec384).expect("ok").1.alg, Algorithm::ES384);
        let mismatch = json!({"kty":"EC","crv":"P-256","x":b64(32),"y":b64(32),"kid":"c","alg":"ES384"});
        assert!(parse_jwk(&mismatch).is_err());
        let short = json!({"kty":"EC","crv":"P-256","x":b64(31),"y":b64(32),"kid":"d"});
        assert!(parse_jwk(&short).is_err());
        let rsa = json!({"kty":"RSA","n":b64(256),"e":"AQAB","kid":"e"});
        assert_eq!(parse_jwk(&rsa).expect("ok").1.alg, Algorithm::RS256);
        let ps = json!({"kty":"RSA","n":b64(256),"e":"AQAB","kid":"f","alg":"PS256"});
        assert_eq!(parse_jwk(&ps).expect("ok").1.alg, Algorithm::PS256);
        let hs = json!({"kty":"RSA","n":b64(256),"e":"AQAB","kid":"g","alg":"HS256"});
        assert!(parse_jwk(&hs).is_err());
        let small = json!({"kty":"RSA","n":b64(128),"e":"AQAB","kid":"h"});
        assert!(parse_jwk(&small).is_err(), "1024-bit RSA refused");
        let enc = json!({"kty":"EC","crv":"P-256","x":b64(32),"y":b64(32),"kid":"i","use":"enc"});
        assert!(parse_jwk(&enc).is_err());
        let oct = json!({"kty":"oct","k":"c2VjcmV0","kid":"j"});
        assert!(parse_jwk(&oct).is_err());
        let nokid = json!({"kty":"EC","crv":"P-256","x":b64(32),"y":b64(32)});
        assert!(parse_jwk(&nokid).is_err());
        let ed = json!({"kty":"OKP","crv":"Ed25519","x":b64(32),"kid":"k"});
        assert_eq!(parse_jwk(&ed).expect("ok").1.alg, Algorithm::EdDSA);
    }

    #[test]
    fn one_bad_key_is_skipped_an_empty_set_is_an_error() {
        let body =
            json!({"keys":[{"kty":"oct","kid":"x"},{"kty":"EC","crv":"P-256","x":b64(32),"y":b64(32),"kid":"ok"}]});
        let set = parse_set(body.to_string().as_bytes()).expect("one good key");
        assert_eq!(set.len(), 1);
        assert!(matches!(parse_set(br#"{"keys":[]}"#), Err(JwksError::Empty)));
        assert!(matches!(parse_set(b"<html>"), Err(JwksError::BadJson(_))));
        assert!(matches!(parse_set(br#"{"nokeys":1}"#), Err(JwksError::BadJson(_))));
    }
}
