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
//! - a token with an unknown `kid` triggers one refetch and waits for it (at most
//!   `issuer.jwks_timeout_ms`), then is validated again: a key the issuer published after our
//!   last fetch works on its first use. Callers meeting unknown kids while that refetch is
//!   pending share it (single flight); after it, unknown kids are refused at once until
//!   `issuer.jwks_cooldown_s` has passed, so a flood of random kids costs at most one fetch
//!   per cooldown. Only these refetches start a cooldown (not the start-up or scheduled
//!   fetches), and tokens with a known `kid` never wait.
//!
//! Each JWK is pinned to one algorithm: its `alg` when present (which must agree with its
//! `kty`/`crv`), else the only one its key type allows here (RSA: RS256, P-256: ES256,
//! P-384: ES384, Ed25519: EdDSA). `use`, when present, must be `sig`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use thiserror::Error;
use tokio::sync::{watch, Notify};
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
            if alg.is_some_and(|a| a != super::keys::alg_str(want)) {
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
    /// When the last unknown-kid refetch was asked for: the start of the cooldown. The
    /// start-up and scheduled fetches leave it alone, so a key published after either is
    /// still looked for on its first use.
    last_demand: Option<Instant>,
    /// Unknown-kid refetches asked for so far (a sequence number).
    requested: u64,
    /// The highest request a finished fetch served.
    served: u64,
}

/// The cache: fetcher task plus the shared state handshakes consult on an unknown kid.
#[derive(Debug)]
pub struct JwksCache {
    settings: JwksSettings,
    store: Arc<KeyStore>,
    http: reqwest::Client,
    state: Mutex<State>,
    wake: Notify,
    /// Carries `State::served` to the handshakes waiting for a refetch.
    done: watch::Sender<u64>,
    metrics: Metrics,
}

impl JwksCache {
    /// A cache filling `store`. Call [`JwksCache::run`] to start fetching.
    pub fn new(settings: JwksSettings, store: Arc<KeyStore>, metrics: Metrics) -> Result<JwksCache, JwksError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| JwksError::Transport(e.to_string()))?;
        Ok(JwksCache {
            settings,
            store,
            http,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            done: watch::Sender::new(0),
            metrics,
        })
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

    /// Fetches once and applies the result; returns whether it succeeded. Every request
    /// made before the fetch started counts as served by it, whatever its outcome.
    async fn refresh(&self) -> bool {
        let serving = self.lock().requested;
        let ok = match self.fetch().await {
            Ok(set) => {
                let n = set.len();
                self.store.replace(set);
                self.lock().last_good = Some(Instant::now());
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
        };
        let served = {
            let mut st = self.lock();
            st.served = st.served.max(serving);
            st.served
        };
        self.done.send_replace(served);
        ok
    }

    /// Whether an unknown-kid refetch is asked for and not yet served.
    fn demanded(&self) -> bool {
        let st = self.lock();
        st.requested > st.served
    }

    /// Called by a handshake or refresh whose token names a `kid` the cache does not hold:
    /// waits (at most `issuer.jwks_timeout_ms`) for one refetch, shared by every caller
    /// that asks while it is pending. Returns `false` at once, without a fetch, when an
    /// unknown-kid refetch was already asked for within `issuer.jwks_cooldown_s`, so a
    /// flood of random kids costs at most one fetch per cooldown. `true`: a fetch ended
    /// (validate again); `false`: nothing new to validate against.
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        let now = Instant::now();
        let (wanted, mut done) = {
            let mut st = self.lock();
            let wanted = if st.requested > st.served {
                st.requested // one is pending: share it
            } else if st.last_demand.is_some_and(|t| now.duration_since(t) < self.settings.cooldown) {
                return false;
            } else {
                st.last_demand = Some(now);
                st.requested += 1;
                self.wake.notify_one();
                st.requested
            };
            // Subscribed under the lock, so the fetch cannot finish unseen in between.
            (wanted, self.done.subscribe())
        };
        let served = tokio::time::timeout(self.settings.timeout, done.wait_for(|s| *s >= wanted)).await;
        matches!(served, Ok(Ok(_)))
    }

    /// The fetcher loop: first fetch at once (the server is not ready until it succeeds),
    /// then every `refresh`, after a failure with exponential backoff from 1 s up to a
    /// minute, and at once when a handshake asks for an unknown-kid refetch (the cooldown
    /// is applied where that is asked for). All fetches happen here, one at a time: that is
    /// what makes the refetch single-flight, and a handshake that gives up waiting does
    /// not cancel it.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Duration::from_secs(1);
        let mut next = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next || self.demanded() {
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
                next = tokio::time::Instant::now() + wait;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
                // A request (or a stale wake-up from one a fetch already served: the check
                // at the top of the loop tells them apart).
                _ = self.wake.notified() => {}
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
