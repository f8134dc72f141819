//! The embedded OAuth2 issuer: client credentials grant (RFC 6749 §4.4) issuing RFC 9068
//! JWT access tokens signed with ES256, plus discovery and the JWK Set. The signing keys
//! are generated at start-up and rotated (one node), or loaded from
//! `issuer.signing_key_files` (several nodes issuing and accepting the same tokens; see
//! [`super::keyfile`]). It publishes its public key straight into the server's [`KeyStore`], so
//! the handshake validates embedded tokens exactly like external ones, without HTTP.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use jsonwebtoken::{Algorithm, Header};
use serde::Deserialize;
use serde_json::json;
use thiserror::Error;

use super::hash::{constant_time_eq, sha256};
use super::keyfile::{KeyFileError, SigningKey};
use super::keys::{KeySet, KeyStore, VerifyKey};
use super::scopes::split_scope;
use crate::config::{ClientConfig, IssuerConfig};
use crate::ratelimit::KeyedBuckets;

/// Errors building the issuer or signing a token.
#[derive(Debug, Error)]
pub enum IssuerError {
    /// Key generation or parsing failed in the crypto library.
    #[error("signing key: {0}")]
    Key(String),
    /// A signing key file of `issuer.signing_key_files` could not be used (the message
    /// names the file).
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// `rotate` was called while the keys come from files: they change with the files.
    #[error("the signing keys come from issuer.signing_key_files: change the files and restart to rotate")]
    KeysFromFiles,
    /// JWT encoding failed.
    #[error("token signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

struct Client {
    id: String,
    secret_sha256: [u8; 32],
    scopes: Vec<String>,
}

/// Source addresses whose failed client authentications are tracked at once.
const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// How a `POST /oauth2/token` request was answered: the `result` label of
/// `tickgate_token_requests_total`. For refusals the label is also the OAuth2 `error` code
/// of the answer, except `RateLimited` (`too_many_requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenResult {
    /// A token was issued.
    Ok,
    /// The request is malformed (body, Authorization header, credentials in two places).
    InvalidRequest,
    /// A grant other than `client_credentials`.
    UnsupportedGrantType,
    /// No credentials, an unknown client or a wrong secret.
    InvalidClient,
    /// A scope the client may not have.
    InvalidScope,
    /// Too many failed client authentications from the address or for the client id.
    RateLimited,
    /// Signing failed.
    ServerError,
}

impl TokenResult {
    /// Every result, so the counter shows all of them from the start.
    pub const ALL: [TokenResult; 7] = [
        TokenResult::Ok,
        TokenResult::InvalidRequest,
        TokenResult::UnsupportedGrantType,
        TokenResult::InvalidClient,
        TokenResult::InvalidScope,
        TokenResult::RateLimited,
        TokenResult::ServerError,
    ];

    /// The metric label (and, for refusals, the OAuth2 error code).
    pub fn as_str(self) -> &'static str {
        match self {
            TokenResult::Ok => "ok",
            TokenResult::InvalidRequest => "invalid_request",
            TokenResult::UnsupportedGrantType => "unsupported_grant_type",
            TokenResult::InvalidClient => "invalid_client",
            TokenResult::InvalidScope => "invalid_scope",
            TokenResult::RateLimited => "rate_limited",
            TokenResult::ServerError => "server_error",
        }
    }

    /// A refusal whose OAuth2 `error` code is this result's label.
    fn refuse(self, status: StatusCode, description: &str) -> (TokenResult, Response) {
        (self, oauth_error(status, self.as_str(), description))
    }
}

/// Limits guessing at `/oauth2/token`: failed client authentications are taken from a token
/// bucket per source address and one per (known) client id. While either is empty the
/// endpoint answers 429, even to the right secret, so a guesser learns nothing from it.
/// Only failures cost tokens: a client that authenticates never notices the limit.
struct FailureGuard {
    by_ip: Mutex<KeyedBuckets<IpAddr>>,
    by_client: Mutex<KeyedBuckets<String>>,
}

impl FailureGuard {
    fn new(cfg: &IssuerConfig, clients: usize) -> FailureGuard {
        let rate = f64::from(cfg.client_auth_failures_per_min) / 60.0;
        let burst = f64::from(cfg.client_auth_failure_burst);
        FailureGuard {
            by_ip: Mutex::new(KeyedBuckets::new(rate, burst, MAX_TRACKED_ADDRESSES)),
            // Only configured client ids are tracked, so this map is as small as the client list.
            by_client: Mutex::new(KeyedBuckets::new(rate, burst, clients.max(1))),
        }
    }

    /// How long the caller must wait before its next attempt; zero when it may try now.
    fn wait(&self, ip: Option<IpAddr>, client: Option<&str>) -> Duration {
        let now = Instant::now();
        let by_ip = ip.map_or(Duration::ZERO, |ip| lock(&self.by_ip).wait(&ip, now));
        let by_client = client.map_or(Duration::ZERO, |c| lock(&self.by_client).wait(&c.to_owned(), now));
        by_ip.max(by_client)
    }

    /// Records one failed authentication.
    fn failed(&self, ip: Option<IpAddr>, client: Option<&str>) {
        let now = Instant::now();
        if let Some(ip) = ip {
            lock(&self.by_ip).take(ip, now);
        }
        if let Some(c) = client {
            lock(&self.by_client).take(c.to_owned(), now);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A bucket map is consistent after any panic (each update is one insert).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The embedded issuer.
pub struct EmbeddedIssuer {
    issuer: String,
    audience: String,
    ttl_s: u64,
    clients: Vec<Client>,
    /// Published keys, oldest first. The newest one whose `signs_from` has passed signs;
    /// the others stay published until `retire_at`, so tokens they signed keep verifying.
    /// With key files: the files' keys in their order, none retiring, the last signing.
    ring: RwLock<Vec<KeyEntry>>,
    /// The keys come from `issuer.signing_key_files` (never rotated here).
    from_files: bool,
    store: Arc<KeyStore>,
    publish_ahead: Duration,
    retire_after: Duration,
    guard: FailureGuard,
    /// `tickgate_token_requests_total`, once the server has handed it over.
    requests: Option<prometheus::IntCounterVec>,
    /// The configuration lists no client, so the generated `demo` client is the only one:
    /// `POST /demo/token` hands out its read-only tokens to the demo page (development).
    demo_page_tokens: bool,
}

/// A key of the issuer's ring.
struct KeyEntry {
    key: Arc<SigningKey>,
    signs_from: Instant,
    retire_at: Option<Instant>,
}

impl std::fmt::Debug for EmbeddedIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedIssuer").field("issuer", &self.issuer).field("kid", &self.kid()).finish_non_exhaustive()
    }
}

/// Name of the default client when the configuration lists none.
pub const DEMO_CLIENT: &str = "demo";
/// Environment variable holding the demo client's secret.
pub const DEMO_SECRET_ENV: &str = "TICKGATE_DEMO_SECRET";

/// Hex SHA-256 of a client secret, the form `secret_sha256` takes in the config.
pub fn hash_secret(secret: &str) -> String {
    sha256(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

/// A fresh random secret (32 bytes, base64url). It never starts with `-`, so it can be
/// passed as a command-line value (`--client-secret <secret>`) without being read as a flag.
pub fn random_secret() -> Result<String, IssuerError> {
    let rng = SystemRandom::new();
    loop {
        let mut b = [0u8; 32];
        rng.fill(&mut b).map_err(|e| IssuerError::Key(e.to_string()))?;
        let s = URL_SAFE_NO_PAD.encode(b);
        if !s.starts_with('-') {
            return Ok(s);
        }
    }
}

impl EmbeddedIssuer {
    /// Builds the issuer and publishes its keys into `keys`: the keys of
    /// `issuer.signing_key_files` (the last one signs, all verify), or one generated key
    /// when the list is empty. When the configuration lists
    /// no client, a `demo` client with scope `md:read:*` is created; its secret comes from
    /// `demo_secret` (the caller reads the environment) or is generated, and is returned so
    /// the caller can print it once.
    pub fn new(
        cfg: &IssuerConfig,
        issuer: String,
        keys: &Arc<KeyStore>,
        demo_secret: Option<String>,
    ) -> Result<(EmbeddedIssuer, Option<String>), IssuerError> {
        let mut clients = Vec::new();
        let mut generated = None;
        if cfg.clients.is_empty() {
            let secret = match demo_secret {
                Some(s) if !s.is_empty() => s,
                _ => {
                    let s = random_secret()?;
                    generated = Some(s.clone());
                    s
                }
            };
            clients.push(Client {
                id: DEMO_CLIENT.to_owned(),
                secret_sha256: sha256(secret.as_bytes()),
                scopes: vec!["md:read:*".to_owned()],
            });
        } else {
            for ClientConfig { id, secret, secret_sha256, scopes } in &cfg.clients {
                let digest = match (secret, secret_sha256) {
                    (Some(s), _) => sha256(s.as_bytes()),
                    (None, Some(h)) => {
                        parse_hex32(h).ok_or_else(|| IssuerError::Key(format!("client {id}: bad secret_sha256")))?
                    }
                    (None, None) => {
                        return Err(IssuerError::Key(format!("client {id}: no secret")));
                    }
                };
                clients.push(Client { id: id.clone(), secret_sha256: digest, scopes: scopes.clone() });
            }
        }
        let now = Instant::now();
        let from_files = !cfg.signing_key_files.is_empty();
        let ring: Vec<KeyEntry> = if from_files {
            // Every key signs "from now": `signing_key` takes the newest such, the last
            // file. None retires: the list is the operator's, and a key leaves the JWKS and
            // the verification keys when its file leaves the list (at the next start).
            let keys = super::keyfile::load(&cfg.signing_key_files)?;
            keys.into_iter().map(|k| KeyEntry { key: Arc::new(k), signs_from: now, retire_at: None }).collect()
        } else {
            vec![KeyEntry { key: Arc::new(SigningKey::generate()?), signs_from: now, retire_at: None }]
        };
        if from_files {
            let kids: Vec<&str> = ring.iter().map(|e| e.key.kid.as_str()).collect();
            let signing = kids.last().copied().unwrap_or_default();
            tracing::info!(files = ring.len(), signing_kid = %signing, kids = %kids.join(","),
                "issuer signing keys loaded from issuer.signing_key_files");
        }
        let guard = FailureGuard::new(cfg, clients.len());
        let issuer = EmbeddedIssuer {
            guard,
            requests: None,
            demo_page_tokens: cfg.clients.is_empty(),
            issuer,
            audience: cfg.audience.clone(),
            ttl_s: cfg.token_ttl_s,
            clients,
            ring: RwLock::new(ring),
            from_files,
            store: keys.clone(),
            publish_ahead: Duration::from_secs(cfg.key_publish_ahead_s),
            // A key that stopped signing retires once the last token it signed has expired,
            // plus the largest validation leeway a server may be configured with (300 s).
            retire_after: Duration::from_secs(cfg.token_ttl_s + 300),
        };
        keys.replace(issuer.key_set());
        Ok((issuer, generated))
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, Vec<KeyEntry>> {
        // Every update replaces whole entries; the vector is consistent after a panic.
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The key that signs now: the newest whose publication lead time has passed.
    fn signing_key(&self) -> Arc<SigningKey> {
        let now = Instant::now();
        let ring = self.ring();
        ring.iter().rev().find(|e| e.signs_from <= now).or(ring.first()).map(|e| e.key.clone()).unwrap_or_else(|| {
            // The ring is never empty: rotation adds before it retires, and the entry that
            // signs has no retirement time.
            unreachable!("issuer key ring is empty")
        })
    }

    /// Starts a key rotation: a new key is published at once (JWKS and the verification
    /// cache) but signs only after `issuer.key_publish_ahead_s`, so clients and peers that
    /// cache the JWKS see it before any token carries its kid. The keys signing until then
    /// stay published until their last tokens have expired. Returns the new `kid`. Refused
    /// ([`IssuerError::KeysFromFiles`]) when the keys come from files.
    pub fn rotate(&self) -> Result<String, IssuerError> {
        if self.from_files {
            return Err(IssuerError::KeysFromFiles);
        }
        let key = Arc::new(SigningKey::generate()?);
        let kid = key.kid.clone();
        let now = Instant::now();
        let signs_from = now + self.publish_ahead;
        {
            let mut ring = self.ring.write().unwrap_or_else(|p| p.into_inner());
            for e in ring.iter_mut().filter(|e| e.retire_at.is_none()) {
                e.retire_at = Some(signs_from + self.retire_after);
            }
            ring.push(KeyEntry { key, signs_from, retire_at: None });
        }
        self.store.replace(self.key_set());
        tracing::info!(kid = %kid, "issuer key rotation started");
        Ok(kid)
    }

    /// Sets how long after a key stops signing it stays published: the token lifetime plus
    /// this margin (the server passes its validation leeway; the default is 300 s, the
    /// largest leeway allowed).
    pub fn with_retire_margin(mut self, margin: Duration) -> EmbeddedIssuer {
        self.retire_after = Duration::from_secs(self.ttl_s) + margin;
        self
    }

    /// Counts every `/oauth2/token` answer by result in `counter`
    /// (`tickgate_token_requests_total`).
    pub fn with_request_counter(mut self, counter: prometheus::IntCounterVec) -> EmbeddedIssuer {
        // Every result shows from the start (at 0), so dashboards and alerts need no
        // "absent" special case.
        for r in TokenResult::ALL {
            counter.with_label_values(&[r.as_str()]);
        }
        self.requests = Some(counter);
        self
    }

    /// Drops keys whose tokens have all expired. Called periodically.
    pub fn retire_expired(&self) {
        let now = Instant::now();
        let removed = {
            let mut ring = self.ring.write().unwrap_or_else(|p| p.into_inner());
            let before = ring.len();
            ring.retain(|e| e.retire_at.is_none_or(|t| t > now));
            before - ring.len()
        };
        if removed > 0 {
            self.store.replace(self.key_set());
            tracing::info!(retired = removed, "issuer keys retired");
        }
    }

    /// The verification keys this issuer signs with.
    pub fn key_set(&self) -> KeySet {
        self.ring()
            .iter()
            .map(|e| (e.key.kid.clone(), VerifyKey { alg: Algorithm::ES256, key: e.key.decoding.clone() }))
            .collect()
    }

    /// The `iss` value.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The `kid` of the current signing key.
    pub fn kid(&self) -> String {
        self.signing_key().kid.clone()
    }

    /// The JWK Set document.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self.ring().iter().map(|e| e.key.jwk.clone()).collect();
        json!({ "keys": keys })
    }

    /// Checks a client's credentials in constant time with respect to the secret: both
    /// sides are SHA-256 digests, compared by the crypto provider's constant-time check.
    fn authenticate(&self, id: &str, secret: &str) -> Option<&Client> {
        let presented = sha256(secret.as_bytes());
        let client = self.clients.iter().find(|c| c.id == id)?;
        constant_time_eq(&client.secret_sha256, &presented).then_some(client)
    }

    /// Issues an access token for `sub` with the given scopes and lifetime.
    pub fn issue(&self, sub: &str, scopes: &[String], ttl_s: u64) -> Result<String, IssuerError> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({
            "iss": self.issuer,
            "sub": sub,
            "aud": self.audience,
            "iat": now,
            "exp": now + ttl_s,
            "jti": random_secret()?,
            "client_id": sub,
            "scope": scopes.join(" "),
        });
        self.sign_raw("at+jwt", &claims)
    }

    /// Signs arbitrary claims with the issuer's key and the given `typ` header. Used by
    /// [`EmbeddedIssuer::issue`] and by tests that need tokens with unusual claims.
    pub fn sign_raw(&self, typ: &str, claims: &serde_json::Value) -> Result<String, IssuerError> {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some(typ.to_owned());
        let key = self.signing_key();
        header.kid = Some(key.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &key.encoding)?)
    }

    /// Routes of the issuer, mounted on the public listener.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/oauth2/jwks", get(jwks))
            .route("/oauth2/token", post(token))
            .route("/demo/token", post(demo_token))
            .with_state(self)
    }
}

async fn discovery(State(iss): State<Arc<EmbeddedIssuer>>) -> impl IntoResponse {
    Json(json!({
        "issuer": iss.issuer,
        "jwks_uri": format!("{}/oauth2/jwks", iss.issuer),
        "token_endpoint": format!("{}/oauth2/token", iss.issuer),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "id_token_signing_alg_values_supported": ["ES256"],
    }))
}

async fn jwks(State(iss): State<Arc<EmbeddedIssuer>>) -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "public, max-age=300")], Json(iss.jwks()))
}

/// `POST /demo/token`: a read-only token (`md:read:*`) of the generated `demo` client, for
/// the page at `/`, with no secret. Only while the configuration lists no client (the
/// out-of-the-box development setup, where the server warns when it listens beyond
/// loopback); any configured client list turns it into a 404. Counted as a token request.
async fn demo_token(State(iss): State<Arc<EmbeddedIssuer>>) -> Response {
    if !iss.demo_page_tokens {
        return oauth_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no demo tokens: the configuration lists its own clients (use /oauth2/token)",
        );
    }
    let scopes = vec!["md:read:*".to_owned()];
    let (result, resp) = match iss.issue(DEMO_CLIENT, &scopes, iss.ttl_s) {
        Ok(t) => (TokenResult::Ok, token_response(t, iss.ttl_s, &scopes)),
        Err(e) => {
            tracing::error!(error = %e, "token signing failed");
            TokenResult::ServerError.refuse(StatusCode::INTERNAL_SERVER_ERROR, "token signing failed")
        }
    };
    if let Some(c) = &iss.requests {
        c.with_label_values(&[result.as_str()]).inc();
    }
    resp
}

/// The RFC 6749 §5.1 answer carrying a token.
fn token_response(access_token: String, ttl_s: u64, scopes: &[String]) -> Response {
    let mut body = BTreeMap::new();
    body.insert("access_token", json!(access_token));
    body.insert("token_type", json!("Bearer"));
    body.insert("expires_in", json!(ttl_s));
    body.insert("scope", json!(scopes.join(" ")));
    ([(header::CACHE_CONTROL, "no-store"), (header::PRAGMA, "no-cache")], Json(body)).into_response()
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    scope: Option<String>,
}

/// RFC 6749 §5.2 error response.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], Json(json!({"error": error, "error_description": description})))
        .into_response()
}

fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, ()> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| ())?;
    let Some(b64) = v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic ")) else {
        return Err(());
    };
    let raw = STANDARD.decode(b64.trim()).map_err(|_| ())?;
    let raw = String::from_utf8(raw).map_err(|_| ())?;
    let (id, secret) = raw.split_once(':').ok_or(())?;
    // RFC 6749 §2.3.1: both parts are form-urlencoded inside Basic.
    let decode = |s: &str| -> Result<String, ()> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&format!("v={s}")).map_err(|_| ())?;
        pairs.into_iter().next().map(|(_, v)| v).ok_or(())
    };
    Ok(Some((decode(id)?, decode(secret)?)))
}

/// A requested scope is allowed when the client holds it exactly, or when it is a
/// single-feed read scope and the client holds `md:read:*` (a token can be narrowed). The
/// feed must be a possible feed name: `md:read:DEMO,md:read:X` (scopes joined with a comma
/// instead of a space) would otherwise be granted as one scope for a feed `DEMO,md:read:X`
/// that cannot exist, and the token would then fail at subscribe with `insufficient_scope`.
fn scope_allowed(allowed: &[String], requested: &str) -> bool {
    allowed.iter().any(|a| a == requested)
        || (requested.strip_prefix(super::scopes::READ_PREFIX).is_some_and(crate::feeds::valid_name)
            && allowed.iter().any(|a| a == "md:read:*"))
}

async fn token(
    State(iss): State<Arc<EmbeddedIssuer>>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (result, mut resp) = token_answer(&iss, peer.map(|p| p.0 .0.ip()), &headers, &body);
    // RFC 6749 §5.2: the Basic challenge answers a client that tried the Authorization
    // header. One that sent its secret in the body (a browser page) must not get it: a
    // browser answers a Basic challenge to `fetch` with a password dialog, and the page's
    // request hangs behind it instead of showing "wrong secret".
    if resp.status() == StatusCode::UNAUTHORIZED && headers.contains_key(header::AUTHORIZATION) {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"tickgate\""));
    }
    if let Some(c) = &iss.requests {
        c.with_label_values(&[result.as_str()]).inc();
    }
    resp
}

/// The answer to one token request, with its `result` label.
fn token_answer(iss: &EmbeddedIssuer, ip: Option<IpAddr>, headers: &HeaderMap, body: &[u8]) -> (TokenResult, Response) {
    let form: TokenForm = match serde_urlencoded::from_bytes(body) {
        Ok(f) => f,
        Err(_) => {
            return TokenResult::InvalidRequest
                .refuse(StatusCode::BAD_REQUEST, "body must be application/x-www-form-urlencoded")
        }
    };
    if form.grant_type.as_deref() != Some("client_credentials") {
        return TokenResult::UnsupportedGrantType
            .refuse(StatusCode::BAD_REQUEST, "only grant_type=client_credentials is supported");
    }
    let basic = match basic_credentials(headers) {
        Ok(b) => b,
        Err(()) => {
            return TokenResult::InvalidRequest.refuse(StatusCode::BAD_REQUEST, "malformed Authorization header")
        }
    };
    let (id, secret) = match (basic, form.client_id, form.client_secret) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return TokenResult::InvalidRequest
                .refuse(StatusCode::BAD_REQUEST, "client credentials in both the header and the body")
        }
        (Some(b), None, None) => b,
        (None, Some(id), Some(secret)) => (id, secret),
        _ => return TokenResult::InvalidClient.refuse(StatusCode::UNAUTHORIZED, "client authentication required"),
    };
    // Only configured ids have a bucket of their own; unknown ids are limited by address.
    let known = iss.clients.iter().any(|c| c.id == id).then_some(id.as_str());
    let wait = iss.guard.wait(ip, known);
    if !wait.is_zero() {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut resp = oauth_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            &format!("too many failed client authentications; retry after {secs} s"),
        );
        resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        return (TokenResult::RateLimited, resp);
    }
    let Some(client) = iss.authenticate(&id, &secret) else {
        iss.guard.failed(ip, known);
        return TokenResult::InvalidClient.refuse(StatusCode::UNAUTHORIZED, "unknown client or wrong secret");
    };
    let scopes: Vec<String> = match form.scope.as_deref() {
        None | Some("") => client.scopes.clone(),
        Some(s) => {
            let requested: Vec<String> = split_scope(s).map(str::to_owned).collect();
            if let Some(bad) = requested.iter().find(|r| !scope_allowed(&client.scopes, r)) {
                let shown: String = bad.chars().take(64).collect();
                // RFC 6749 §3.3: scopes are separated by spaces; a comma is part of a scope.
                let hint = if bad.contains(',') { " (separate scopes with spaces, not commas)" } else { "" };
                return TokenResult::InvalidScope
                    .refuse(StatusCode::BAD_REQUEST, &format!("scope `{shown}` is not allowed for this client{hint}"));
            }
            requested
        }
    };
    match iss.issue(&client.id, &scopes, iss.ttl_s) {
        Ok(access_token) => (TokenResult::Ok, token_response(access_token, iss.ttl_s, &scopes)),
        Err(e) => {
            tracing::error!(error = %e, "token signing failed");
            TokenResult::ServerError.refuse(StatusCode::INTERNAL_SERVER_ERROR, "token signing failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::validate::{AuthError, Validator};
    use crate::config::{AuthConfig, IssuerConfig};

    fn setup() -> (EmbeddedIssuer, Validator) {
        let keys = Arc::new(KeyStore::new());
        let (iss, secret) =
            EmbeddedIssuer::new(&IssuerConfig::default(), "http://127.0.0.1:1".into(), &keys, Some("s3cret".into()))
                .expect("issuer");
        assert!(secret.is_none());
        let v = Validator::new(keys, iss.issuer().to_owned(), "tickgate".into(), &AuthConfig::default());
        (iss, v)
    }

    #[test]
    fn issued_tokens_validate() {
        let (iss, v) = setup();
        let t = iss.issue("demo", &["md:read:DEMO".into()], 60).expect("token");
        let p = v.validate(&t).expect("valid");
        assert_eq!(p.sub, "demo");
        assert!(p.entitlements.can_read("DEMO"));
        assert!(!p.entitlements.can_read("OTHER"));
        assert!(iss.authenticate("demo", "s3cret").is_some());
        assert!(iss.authenticate("demo", "s3cre").is_none());
        assert!(iss.authenticate("nobody", "s3cret").is_none());
    }

    #[test]
    fn typ_and_expiry_are_enforced() {
        let (iss, v) = setup();
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({"iss": iss.issuer(), "sub": "x", "aud": "tickgate", "exp": now + 60, "iat": now});
        let jwt = iss.sign_raw("JWT", &claims).expect("sign");
        assert_eq!(v.validate(&jwt).unwrap_err(), AuthError::BadTyp("at+jwt".into()));
        let old = json!({"iss": iss.issuer(), "sub": "x", "aud": "tickgate", "exp": now - 120, "iat": now - 180});
        let jwt = iss.sign_raw("at+jwt", &old).expect("sign");
        assert_eq!(v.validate(&jwt).unwrap_err(), AuthError::Expired);
        let wrong_aud = json!({"iss": iss.issuer(), "sub": "x", "aud": "other", "exp": now + 60});
        let jwt = iss.sign_raw("at+jwt", &wrong_aud).expect("sign");
        assert_eq!(v.validate(&jwt).unwrap_err(), AuthError::WrongAudience);
    }

    #[test]
    fn wildcard_read_can_be_narrowed_but_nothing_else() {
        let allowed = vec!["md:read:*".to_owned(), "openid".to_owned()];
        assert!(scope_allowed(&allowed, "md:read:DEMO"));
        assert!(scope_allowed(&allowed, "md:read:*"));
        assert!(scope_allowed(&allowed, "openid"));
        assert!(!scope_allowed(&allowed, "md:read:"));
        assert!(!scope_allowed(&allowed, "md:read:DEMO,md:read:X"), "a comma list is not a feed");
        assert!(!scope_allowed(&allowed, "md:publish:DEMO"));
        assert!(!scope_allowed(&allowed, "tickgate:admin"));
    }

    #[test]
    fn secret_hash_format() {
        assert_eq!(hash_secret("abc").len(), 64);
        assert_eq!(parse_hex32(&hash_secret("abc")), Some(sha256(b"abc")));
    }
}
