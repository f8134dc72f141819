//! External issuer mode against a real JWKS HTTP server on loopback: the cache's
//! behaviour on good, bad and hostile responses, key rotation, kid floods, and the token
//! attacks of RFC 8725, each with its exact status and metric reason.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tickgate::config::IssuerMode;

const ISS: &str = "https://idp.example.test/realms/markets";

/// A signing key of the test issuer.
struct Signer {
    kid: String,
    enc: EncodingKey,
    jwk: Value,
    raw_public: Vec<u8>,
}

impl Signer {
    fn new(kid: &str) -> Signer {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new()).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let p = pair.public_key().as_ref().to_vec();
        let jwk = json!({"kty":"EC","crv":"P-256","kid":kid,"use":"sig","alg":"ES256",
            "x":URL_SAFE_NO_PAD.encode(&p[1..33]),"y":URL_SAFE_NO_PAD.encode(&p[33..65])});
        Signer { kid: kid.into(), enc: EncodingKey::from_ec_der(pkcs8.as_ref()), jwk, raw_public: p }
    }

    fn sign_with(&self, header: Header, claims: &Value) -> String {
        jsonwebtoken::encode(&header, claims, &self.enc).unwrap()
    }

    fn header(&self) -> Header {
        let mut h = Header::new(Algorithm::ES256);
        h.typ = Some("at+jwt".into());
        h.kid = Some(self.kid.clone());
        h
    }

    fn token(&self, claims: &Value) -> String {
        self.sign_with(self.header(), claims)
    }
}

fn claims() -> Value {
    let now = unix_now();
    json!({"iss": ISS, "sub": "svc-1", "aud": "tickgate", "iat": now, "exp": now + 300, "jti": "j1",
        "scope": "md:read:T"})
}

#[derive(Clone)]
enum Mode {
    Keys(Value),
    Status(u16),
    Html,
    Hang,
    /// The key set, once the test opens `Idp::gate`: a slow IdP.
    Held(Value),
    HugeWithLength,
    HugeChunked,
    Redirect,
}

#[derive(Clone)]
struct Idp {
    mode: Arc<Mutex<Mode>>,
    hits: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
}

async fn jwks_handler(axum::extract::State(idp): axum::extract::State<Idp>) -> Response {
    idp.hits.fetch_add(1, Ordering::SeqCst);
    let mode = idp.mode.lock().unwrap().clone();
    match mode {
        Mode::Keys(v) => ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response(),
        Mode::Status(s) => StatusCode::from_u16(s).unwrap().into_response(),
        Mode::Html => ([(header::CONTENT_TYPE, "text/html")], "<html>login</html>").into_response(),
        Mode::Held(v) => {
            idp.gate.acquire().await.unwrap().forget();
            ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
        }
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK.into_response()
        }
        Mode::HugeWithLength => ([(header::CONTENT_TYPE, "application/json")], vec![b' '; 50 << 20]).into_response(),
        Mode::HugeChunked => {
            let chunks = futures_util::stream::iter(
                (0..800).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 64 << 10]))),
            );
            ([(header::CONTENT_TYPE, "application/json")], axum::body::Body::from_stream(chunks)).into_response()
        }
        Mode::Redirect => (StatusCode::FOUND, [(header::LOCATION, "/other")]).into_response(),
    }
}

async fn start_idp(mode: Mode) -> (Idp, String) {
    let idp = Idp {
        mode: Arc::new(Mutex::new(mode)),
        hits: Arc::new(AtomicUsize::new(0)),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let app = axum::Router::new().route("/certs", axum::routing::get(jwks_handler)).with_state(idp.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/certs", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (idp, url)
}

async fn external(url: &str, refresh_s: u64, cooldown_s: u64) -> TestServer {
    external_with(url, refresh_s, cooldown_s, 1000).await
}

async fn external_with(url: &str, refresh_s: u64, cooldown_s: u64, timeout_ms: u64) -> TestServer {
    let url = url.to_owned();
    TestServer::start(200.0, move |c| {
        c.issuer.mode = IssuerMode::External;
        c.issuer.issuer = Some(ISS.into());
        c.issuer.jwks_url = Some(url);
        c.issuer.jwks_refresh_s = refresh_s;
        c.issuer.jwks_cooldown_s = cooldown_s;
        c.issuer.jwks_timeout_ms = timeout_ms;
        c.issuer.clients.clear();
    })
    .await
}

async fn wait_ready(ts: &TestServer) -> bool {
    eventually("ready", EVENTUALLY, || async {
        let r = reqwest::get(format!("{}/readyz", ts.admin)).await.unwrap();
        (r.status().as_u16() == 200).then_some(true)
    })
    .await
}

/// Waits until `series` has grown past `before`.
async fn wait_counted(ts: &TestServer, series: &str, before: f64) -> f64 {
    eventually(series, EVENTUALLY, || async {
        let v = ts.metric(series).await;
        (v > before).then_some(v)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jwks_answers_never_replace_the_last_good_keys() {
    let a = Signer::new("key-a");
    let (idp, url) = start_idp(Mode::Hang).await;
    let ts = external(&url, 1, 1).await;
    // Not ready, and streams refused with 503, until a first good fetch.
    assert_eq!(reqwest::get(format!("{}/readyz", ts.admin)).await.unwrap().status().as_u16(), 503);
    let tok = a.token(&claims());
    let (s, b) = bearer_handshake(&ts, &tok).await;
    assert_eq!((s, b["error"].as_str()), (503, Some("unavailable")));
    *idp.mode.lock().unwrap() = Mode::Keys(json!({"keys": [a.jwk]}));
    assert!(wait_ready(&ts).await, "ready after the first good fetch");
    assert_eq!(bearer_handshake(&ts, &tok).await.0, 101);

    let cases = [
        (Mode::Status(500), "http_status"),
        (Mode::Html, "not_json"),
        (Mode::Keys(json!({"keys": []})), "empty"),
        (Mode::Keys(json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]})), "empty"),
        (Mode::Keys(json!("not a set")), "bad_json"),
        (Mode::HugeWithLength, "too_large"),
        (Mode::HugeChunked, "too_large"),
        (Mode::Redirect, "http_status"),
        (Mode::Hang, "transport"),
    ];
    for (mode, label) in cases {
        let series = format!("tickgate_jwks_refreshes_total{{result=\"{label}\"}}");
        let before = ts.metric(&series).await;
        *idp.mode.lock().unwrap() = mode;
        // The next scheduled fetch (every second) gets the bad answer and counts it.
        wait_counted(&ts, &series, before).await;
        // The last good key still verifies, and the server stays ready.
        assert_eq!(bearer_handshake(&ts, &tok).await.0, 101, "after a {label} answer");
        assert_eq!(reqwest::get(format!("{}/readyz", ts.admin)).await.unwrap().status().as_u16(), 200);
    }
    // One bad key next to a good one: the good one is used.
    let b2 = Signer::new("key-b");
    *idp.mode.lock().unwrap() =
        Mode::Keys(json!({"keys": [{"kty": "RSA", "kid": "weak", "n": "AQAB", "e": "AQAB"}, b2.jwk]}));
    let ok = ts.metric("tickgate_jwks_refreshes_total{result=\"ok\"}").await;
    wait_counted(&ts, "tickgate_jwks_refreshes_total{result=\"ok\"}", ok).await;
    assert_eq!(bearer_handshake(&ts, &b2.token(&claims())).await.0, 101);
    // The whole set was replaced: key A is gone (a removed key is a revoked key).
    let (s, b) = bearer_handshake(&ts, &tok).await;
    assert_eq!((s, b["error_description"].as_str()), (401, Some("unknown signing key")));
    assert_eq!(ts.metric("tickgate_jwks_keys").await, 1.0);
    ts.shutdown().await;
}

/// A token signed with `kid` (not in any set).
fn random_kid_token(a: &Signer, i: usize) -> String {
    let mut h = a.header();
    h.kid = Some(format!("random-{i}-{}", rand_suffix(i)));
    a.sign_with(h, &claims())
}

/// The IdP starts signing with a key it published after our last fetch, right after
/// start-up (the start-up fetch starts no cooldown): the FIRST handshake with it waits for
/// one refetch and gets 101. Another unknown kid within the cooldown that refetch started
/// is refused at once, without a fetch. (Before the fix: 401, and within the cooldown after
/// start-up no refetch at all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_published_after_the_last_fetch_works_on_first_use() {
    let a = Signer::new("key-a");
    let b = Signer::new("key-b");
    let (idp, url) = start_idp(Mode::Keys(json!({"keys": [a.jwk.clone()]}))).await;
    let ts = external(&url, 600, 30).await;
    assert!(wait_ready(&ts).await);
    let base = idp.hits.load(Ordering::SeqCst);
    let ok = ts.metric("tickgate_jwks_refreshes_total{result=\"ok\"}").await;
    *idp.mode.lock().unwrap() = Mode::Keys(json!({"keys": [a.jwk.clone(), b.jwk.clone()]}));
    let tb = b.token(&claims());
    let (s, body) = bearer_handshake(&ts, &tb).await;
    assert_eq!(s, 101, "first use of the rotated key: {body}");
    assert_eq!(idp.hits.load(Ordering::SeqCst), base + 1, "exactly one refetch");
    assert_eq!(ts.metric("tickgate_jwks_refreshes_total{result=\"ok\"}").await, ok + 1.0);
    // Within the cooldown: an unknown kid is refused at once and fetches nothing.
    let (s, body) = bearer_handshake(&ts, &random_kid_token(&a, 0)).await;
    assert_eq!((s, body["error_description"].as_str()), (401, Some("unknown signing key")));
    assert_eq!(idp.hits.load(Ordering::SeqCst), base + 1, "no fetch within the cooldown");
    assert_eq!(bearer_handshake(&ts, &tb).await.0, 101);
    ts.shutdown().await;
}

/// A refresh whose token is signed with a newly published key waits for the refetch too
/// and gets `refreshed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_with_a_newly_published_key_is_refreshed() {
    let a = Signer::new("key-a");
    let b = Signer::new("key-b");
    let (idp, url) = start_idp(Mode::Keys(json!({"keys": [a.jwk.clone()]}))).await;
    let ts = external(&url, 600, 30).await;
    assert!(wait_ready(&ts).await);
    let (mut sub, r) = subscribed(&ts, &a.token(&claims()), "T", json!(["S0"]), false).await;
    assert!(matches!(r, tickgate_proto::control::ServerMsg::Subscribed { .. }), "{r:?}");
    let base = idp.hits.load(Ordering::SeqCst);
    *idp.mode.lock().unwrap() = Mode::Keys(json!({"keys": [a.jwk.clone(), b.jwk.clone()]}));
    sub.send_json(&json!({"op": "refresh", "id": 5, "token": b.token(&claims())})).await.unwrap();
    match next_control(&mut sub).await {
        tickgate_proto::control::ServerMsg::Refreshed { id, .. } => assert_eq!(id, Some(5)),
        m => panic!("expected refreshed, got {m:?}"),
    }
    assert_eq!(idp.hits.load(Ordering::SeqCst), base + 1, "exactly one refetch");
    ts.shutdown().await;
}

/// A flood of random kids within one cooldown costs at most one fetch: the first one
/// triggers it, every later one is refused at once. Each is counted as `unknown_kid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kid_flood_costs_at_most_one_fetch_per_cooldown() {
    let a = Signer::new("key-a");
    let (idp, url) = start_idp(Mode::Keys(json!({"keys": [a.jwk.clone()]}))).await;
    let ts = external(&url, 600, 600).await;
    assert!(wait_ready(&ts).await);
    let base = idp.hits.load(Ordering::SeqCst);
    let before = ts.metric("tickgate_auth_failures_total{reason=\"unknown_kid\"}").await;
    let tokens: Vec<String> = (0..200).map(|i| random_kid_token(&a, i)).collect();
    for chunk in tokens.chunks(20) {
        let answers = futures_util::future::join_all(chunk.iter().map(|t| bearer_handshake(&ts, t))).await;
        for (s, body) in answers {
            assert_eq!((s, body["error_description"].as_str()), (401, Some("unknown signing key")));
        }
    }
    let fetched = idp.hits.load(Ordering::SeqCst) - base;
    assert!(fetched <= 1, "{fetched} fetches for 200 random kids within one cooldown");
    assert_eq!(ts.metric("tickgate_auth_failures_total{reason=\"unknown_kid\"}").await, before + 200.0);
    assert_eq!(bearer_handshake(&ts, &a.token(&claims())).await.0, 101, "known kids unaffected");
    ts.shutdown().await;
}

/// While a slow refetch is in flight: handshakes with the new kid all wait for that one
/// fetch (single flight) and are accepted when it lands, and a handshake with a known kid
/// does not wait for it at all (it completes while the IdP still holds its answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kids_share_one_slow_refetch_and_known_kids_never_wait() {
    let a = Signer::new("key-a");
    let b = Signer::new("key-b");
    let (idp, url) = start_idp(Mode::Keys(json!({"keys": [a.jwk.clone()]}))).await;
    let ts = external_with(&url, 600, 30, 5000).await;
    assert!(wait_ready(&ts).await);
    let base = idp.hits.load(Ordering::SeqCst);
    *idp.mode.lock().unwrap() = Mode::Held(json!({"keys": [a.jwk.clone(), b.jwk.clone()]}));
    let tb = b.token(&claims());
    let ta = a.token(&claims());
    let waiting = futures_util::future::join_all((0..10).map(|_| bearer_handshake(&ts, &tb)));
    let probe = async {
        eventually("the refetch reached the IdP", EVENTUALLY, || async {
            (idp.hits.load(Ordering::SeqCst) > base).then_some(())
        })
        .await;
        // The IdP holds its answer until the gate opens below: this handshake can only
        // complete if it does not wait for the refetch.
        let (s, _) = bearer_handshake(&ts, &ta).await;
        assert_eq!(idp.gate.available_permits(), 0);
        idp.gate.add_permits(1000);
        s
    };
    let (answers, known) = tokio::join!(waiting, probe);
    assert_eq!(known, 101, "known kid accepted while the refetch was pending");
    for (s, body) in answers {
        assert_eq!(s, 101, "{body}");
    }
    assert_eq!(idp.hits.load(Ordering::SeqCst), base + 1, "one fetch for all of them");
    ts.shutdown().await;
}

fn rand_suffix(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A loopback "canary" that counts any request: `jku`/`x5u` must never be followed.
async fn canary() -> (Arc<AtomicUsize>, String) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/keys", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (hits, url)
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_attacks_are_refused_with_exact_reasons() {
    let logs = common::logs::capture();
    let a = Signer::new("key-a");
    let (_idp, url) = start_idp(Mode::Keys(json!({"keys": [a.jwk.clone()]}))).await;
    let ts = external(&url, 600, 30).await;
    assert!(wait_ready(&ts).await);
    let (canary_hits, canary_url) = canary().await;
    let now = unix_now();
    let good = claims();
    assert_eq!(bearer_handshake(&ts, &a.token(&good)).await.0, 101);

    let with = |k: &str, v: Value| {
        let mut c = claims();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    let sig_of = |t: &str| t.rsplit('.').next().unwrap().to_owned();
    let good_tok = a.token(&good);

    // alg none: header {"alg":"none"} and an empty signature.
    let none = format!("{}.{}.", b64(&json!({"alg":"none","typ":"at+jwt","kid":"key-a"})), b64(&good));
    // none with a signature segment (some libraries accept any).
    let none2 =
        format!("{}.{}.{}", b64(&json!({"alg":"none","typ":"at+jwt","kid":"key-a"})), b64(&good), sig_of(&good_tok));
    // HS256 "signed" with the public key as the HMAC secret (key confusion).
    let mut hs = Header::new(Algorithm::HS256);
    hs.typ = Some("at+jwt".into());
    hs.kid = Some("key-a".into());
    let confused = jsonwebtoken::encode(&hs, &good, &EncodingKey::from_secret(&a.raw_public).unwrap()).unwrap();
    // ES256 key presented as ES384.
    let es384 =
        format!("{}.{}.{}", b64(&json!({"alg":"ES384","typ":"at+jwt","kid":"key-a"})), b64(&good), sig_of(&good_tok));
    // Tampered payload (scope widened) under the original signature.
    let parts: Vec<&str> = good_tok.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], b64(&with("scope", json!("md:read:*"))), parts[2]);
    let mut kid_trav = a.header();
    kid_trav.kid = Some("../../../../etc/passwd".into());
    let mut jku = a.header();
    jku.jku = Some(canary_url.clone());
    let mut x5u = a.header();
    x5u.x5u = Some(canary_url.clone());
    x5u.kid = Some("not-in-the-set".into());
    let mut typ_jwt = a.header();
    typ_jwt.typ = Some("JWT".into());
    let mut crit = a.header();
    crit.crit = Some(vec!["exp".into()]);
    let id_token = {
        let mut h = a.header();
        h.typ = Some("JWT".into());
        a.sign_with(h, &with("aud", json!("web-client")))
    };

    let all_tokens: std::cell::RefCell<Vec<String>> = Default::default();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("alg none", none, 401, "alg_not_allowed"),
        ("alg none with a signature", none2, 401, "alg_not_allowed"),
        ("HS256 with the public key", confused, 401, "alg_not_allowed"),
        ("key used with another alg", es384, 401, "alg_mismatch"),
        ("tampered payload", tampered, 401, "bad_signature"),
        ("kid path traversal", a.sign_with(kid_trav, &good), 401, "unknown_kid"),
        ("x5u to a canary, unknown kid", a.sign_with(x5u, &good), 401, "unknown_kid"),
        ("typ JWT", a.sign_with(typ_jwt, &good), 401, "bad_typ"),
        ("crit", a.sign_with(crit, &good), 401, "crit"),
        ("ID token instead of access token", id_token, 401, "bad_typ"),
        ("missing aud", a.token(&without("aud")), 401, "missing_claim"),
        ("wrong aud", a.token(&with("aud", json!("other-api"))), 401, "wrong_aud"),
        ("missing iss", a.token(&without("iss")), 401, "missing_claim"),
        ("iss with a trailing slash", a.token(&with("iss", json!(format!("{ISS}/")))), 401, "wrong_iss"),
        ("expired", a.token(&with("exp", json!(now - 120))), 401, "expired"),
        ("nbf in the future", a.token(&with("nbf", json!(now + 300))), 401, "not_yet_valid"),
        ("lifetime too long", a.token(&with("exp", json!(now + 90_000))), 401, "lifetime_too_long"),
        ("exp as a string", a.token(&with("exp", json!(format!("{}", now + 300)))), 401, "bad_claims"),
        ("four segments", format!("{good_tok}.AAAA"), 401, "malformed"),
        ("scope prefix", a.token(&with("scope", json!("md:read:"))), 403, ""),
        ("oversized (9 KB)", format!("{}.{}.{}", parts[0], "A".repeat(9000), parts[2]), 401, "too_large"),
    ];
    all_tokens.borrow_mut().extend(cases.iter().map(|c| c.1.clone()));
    for (name, token, status, reason) in cases {
        let before = if reason.is_empty() {
            0.0
        } else {
            ts.metric(&format!("tickgate_auth_failures_total{{reason=\"{reason}\"}}")).await
        };
        let (s, body) = bearer_handshake(&ts, &token).await;
        assert_eq!(s, status, "{name}: {body}");
        if !reason.is_empty() {
            assert_eq!(body["error"], "invalid_token", "{name}");
            let after = ts.metric(&format!("tickgate_auth_failures_total{{reason=\"{reason}\"}}")).await;
            assert_eq!(after, before + 1.0, "{name}: reason {reason} not counted");
        }
    }
    // The leeway (30 s) is clock skew for nbf and iat, never slack after exp: expired 20 s
    // ago is refused; an nbf 20 s ahead is accepted, 40 s ahead is not.
    let (s, body) = bearer_handshake(&ts, &a.token(&with("exp", json!(now - 20)))).await;
    assert_eq!((s, body["error_description"].as_str()), (401, Some("token expired")));
    assert_eq!(bearer_handshake(&ts, &a.token(&with("nbf", json!(now + 20)))).await.0, 101);
    assert_eq!(bearer_handshake(&ts, &a.token(&with("nbf", json!(now + 40)))).await.0, 401);
    // A jku header is ignored, not followed: the token verifies against the cached key.
    assert_eq!(bearer_handshake(&ts, &a.sign_with(jku, &good)).await.0, 101);
    // A 100 KB token cannot even be sent: the request head limit answers 431.
    let huge = format!("{}.{}.{}", parts[0], "A".repeat(100_000), parts[2]);
    let (s, _) = bearer_handshake(&ts, &huge).await;
    assert_eq!(s, 431);
    // Nothing is fetched in the background on a token's behalf (the only fetch an unknown
    // kid causes is of the configured JWKS URL, awaited by its handshake), so the count is
    // final here.
    assert_eq!(canary_hits.load(Ordering::SeqCst), 0, "a jku/x5u URL was fetched");
    // Scope matching is exact: `md:read:OTH` opens a stream (it is a read scope) but does not
    // grant feed OTHER.
    let prefix = a.token(&with("scope", json!("md:read:OTH")));
    let mut sub = ts.subscriber(&prefix).await;
    let _ = next_control(&mut sub).await;
    sub.send_json(&json!({"op":"subscribe","id":1,"feed":"OTHER","symbols":["*"]})).await.unwrap();
    match next_control(&mut sub).await {
        tickgate_proto::control::ServerMsg::Error { code, .. } => {
            assert_eq!(code, tickgate_proto::control::ErrorCode::InsufficientScope)
        }
        m => panic!("{m:?}"),
    }
    ts.shutdown().await;
    // No token, nor any of its segments, ever reached a log line (debug level included).
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("stream handshake refused"), "the refusals were logged");
    for t in all_tokens.borrow().iter().chain([&good_tok, &prefix]) {
        for seg in t.split('.').filter(|s| s.len() >= 16) {
            assert!(!text.contains(seg), "a token segment was logged");
        }
    }
}

/// An RSA-2048 signer: PKCS#1 private key for jsonwebtoken, n/e for the JWK.
struct RsaSigner {
    enc: EncodingKey,
    jwk: Value,
    public_der: Vec<u8>,
}

fn rsa_signer(kid: &str, alg: Option<&str>) -> RsaSigner {
    let k = common::rsa::rsa_key();
    let mut jwk =
        json!({"kty":"RSA","kid":kid,"use":"sig","n":URL_SAFE_NO_PAD.encode(&k.n),"e":URL_SAFE_NO_PAD.encode(&k.e)});
    if let Some(a) = alg {
        jwk["alg"] = json!(a);
    }
    RsaSigner { enc: EncodingKey::from_rsa_der(&k.pkcs1), jwk, public_der: k.public_der }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_key_confusion_attacks_are_refused() {
    // An RSA key published without `alg` (as Entra ID does) is pinned to RS256.
    let rsa = rsa_signer("rsa-1", None);
    let (_idp, url) = start_idp(Mode::Keys(json!({"keys": [rsa.jwk.clone()]}))).await;
    let ts = external(&url, 600, 30).await;
    assert!(wait_ready(&ts).await);
    let header = |alg: Algorithm| {
        let mut h = Header::new(alg);
        h.typ = Some("at+jwt".into());
        h.kid = Some("rsa-1".into());
        h
    };
    let good = jsonwebtoken::encode(&header(Algorithm::RS256), &claims(), &rsa.enc).unwrap();
    assert_eq!(bearer_handshake(&ts, &good).await.0, 101, "a genuine RS256 token");
    // PS256 with the same RSA key: the key is pinned to RS256.
    let ps = jsonwebtoken::encode(&header(Algorithm::PS256), &claims(), &rsa.enc).unwrap();
    let (s, b) = bearer_handshake(&ts, &ps).await;
    assert_eq!((s, b["error_description"].as_str()), (401, Some("algorithm does not match the signing key")));
    // HS256 "signed" with the RSA public key (DER, and the JWK's n) as the HMAC secret.
    for secret in [rsa.public_der.clone(), rsa.jwk["n"].as_str().unwrap().as_bytes().to_vec()] {
        let hs =
            jsonwebtoken::encode(&header(Algorithm::HS256), &claims(), &EncodingKey::from_secret(&secret).unwrap())
                .unwrap();
        let (s, b) = bearer_handshake(&ts, &hs).await;
        assert_eq!((s, b["error_description"].as_str()), (401, Some("algorithm HS256 is not allowed")));
    }
    assert_eq!(ts.metric("tickgate_auth_failures_total{reason=\"alg_mismatch\"}").await, 1.0);
    assert_eq!(ts.metric("tickgate_auth_failures_total{reason=\"alg_not_allowed\"}").await, 2.0);
    ts.shutdown().await;

    // A key published as PS256 verifies PS256 and refuses RS256.
    let pss = rsa_signer("rsa-1", Some("PS256"));
    let (_idp, url) = start_idp(Mode::Keys(json!({"keys": [pss.jwk.clone()]}))).await;
    let ts = external(&url, 600, 30).await;
    assert!(wait_ready(&ts).await);
    let ok = jsonwebtoken::encode(&header(Algorithm::PS256), &claims(), &pss.enc).unwrap();
    assert_eq!(bearer_handshake(&ts, &ok).await.0, 101);
    let rs = jsonwebtoken::encode(&header(Algorithm::RS256), &claims(), &pss.enc).unwrap();
    assert_eq!(bearer_handshake(&ts, &rs).await.0, 401);
    ts.shutdown().await;
}
