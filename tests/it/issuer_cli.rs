//! The embedded issuer over real HTTP, and the command line end to end.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_follows_rfc6749() {
    let ts = TestServer::start(100.0, |_| {}).await;
    let http = reqwest::Client::new();
    let ep = format!("{}/oauth2/token", ts.base);

    // Discovery and JWKS.
    let d: Value =
        http.get(format!("{}/.well-known/openid-configuration", ts.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(d["issuer"], ts.base);
    assert_eq!(d["token_endpoint"], ep);
    assert_eq!(d["grant_types_supported"], serde_json::json!(["client_credentials"]));
    let jwks: Value = http.get(d["jwks_uri"].as_str().unwrap()).send().await.unwrap().json().await.unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(
        (key["alg"].as_str(), key["use"].as_str(), key["kty"].as_str()),
        (Some("ES256"), Some("sig"), Some("EC"))
    );
    assert!(key["kid"].as_str().unwrap().len() >= 40);
    assert!(key.get("d").is_none(), "private key material in the JWKS");

    // Basic auth, default scopes.
    let r = http
        .post(&ep)
        .basic_auth("demo", Some(SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 900);
    let token = t["access_token"].as_str().unwrap();
    // RFC 9068 header and claims.
    use base64::Engine as _;
    let part = |i: usize| -> Value {
        let seg = token.split('.').nth(i).unwrap();
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap()
    };
    assert_eq!(part(0)["typ"], "at+jwt");
    assert_eq!(part(0)["alg"], "ES256");
    assert_eq!(part(0)["kid"], key["kid"]);
    let claims = part(1);
    for c in ["iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope"] {
        assert!(claims.get(c).is_some(), "claim {c} missing");
    }
    assert_eq!(claims["aud"], "tickgate");
    // The token opens a stream.
    let mut sub = ts.subscriber(token).await;
    assert!(matches!(next_control(&mut sub).await, tickgate_proto::control::ServerMsg::Welcome { .. }));

    // Form credentials with a narrower scope.
    let r = http
        .post(&ep)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "demo"),
            ("client_secret", SECRET),
            ("scope", "md:read:T"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["scope"], "md:read:T");

    let err = |status: u16, error: &'static str| {
        move |r: (u16, Value)| {
            assert_eq!(r.0, status, "{}", r.1);
            assert_eq!(r.1["error"], error);
            assert!(r.1["error_description"].is_string());
        }
    };
    async fn call(rb: reqwest::RequestBuilder) -> (u16, Value) {
        let r = rb.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }
    err(401, "invalid_client")(
        call(http.post(&ep).basic_auth("demo", Some("wrong")).form(&[("grant_type", "client_credentials")])).await,
    );
    err(401, "invalid_client")(
        call(http.post(&ep).basic_auth("nobody", Some(SECRET)).form(&[("grant_type", "client_credentials")])).await,
    );
    err(401, "invalid_client")(call(http.post(&ep).form(&[("grant_type", "client_credentials")])).await);
    // The Basic challenge (RFC 6749 §5.2) goes only to a client that tried the Authorization
    // header: a browser page sending its secret in the body would otherwise get a password
    // dialog instead of the error.
    let challenge = |r: &reqwest::Response| r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
    let r = http.post(&ep).basic_auth("demo", Some("wrong")).form(&[("grant_type", "client_credentials")]);
    assert_eq!(challenge(&r.send().await.unwrap()).as_deref(), Some("Basic realm=\"tickgate\""));
    let r =
        http.post(&ep).form(&[("grant_type", "client_credentials"), ("client_id", "demo"), ("client_secret", "wrong")]);
    let r = r.send().await.unwrap();
    assert_eq!((r.status().as_u16(), challenge(&r)), (401, None));
    err(400, "unsupported_grant_type")(
        call(http.post(&ep).basic_auth("demo", Some(SECRET)).form(&[("grant_type", "password")])).await,
    );
    err(400, "invalid_scope")(
        call(
            http.post(&ep)
                .basic_auth("demo", Some(SECRET))
                .form(&[("grant_type", "client_credentials"), ("scope", "tickgate:admin")]),
        )
        .await,
    );
    // Scopes joined with a comma are one scope (RFC 6749 §3.3), for no possible feed: refused,
    // with the fix in the message, not granted as a token that fails at subscribe.
    let r = call(
        http.post(&ep)
            .basic_auth("demo", Some(SECRET))
            .form(&[("grant_type", "client_credentials"), ("scope", "md:read:T,md:read:U")]),
    )
    .await;
    assert!(r.1["error_description"].as_str().is_some_and(|d| d.contains("spaces, not commas")), "{}", r.1);
    err(400, "invalid_scope")(r);
    err(400, "invalid_request")(
        call(http.post(&ep).basic_auth("demo", Some(SECRET)).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "demo"),
            ("client_secret", SECRET),
        ]))
        .await,
    );
    // Unknown paths are JSON 404s.
    let r = http.get(format!("{}/nope", ts.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    ts.shutdown().await;
}

/// Key rotation: the new key is in the JWKS before it signs; the old one stays until its
/// tokens have expired, and tokens it signed keep working meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_key_rotation_publishes_first_and_retires_late() {
    let ts = TestServer::start(100.0, |c| {
        c.issuer.token_ttl_s = 2;
        c.issuer.key_rotation_s = 0;
        c.issuer.key_publish_ahead_s = 1;
        c.auth.leeway_s = 0;
    })
    .await;
    let iss = ts.server().issuer().unwrap().clone();
    let jwks_kids = || async {
        let v: Value = reqwest::get(format!("{}/oauth2/jwks", ts.base)).await.unwrap().json().await.unwrap();
        let mut kids: Vec<String> =
            v["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect();
        kids.sort();
        kids
    };
    let kid_of = |t: &str| -> String {
        use base64::Engine as _;
        let h = t.split('.').next().unwrap();
        let v: Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap();
        v["kid"].as_str().unwrap().to_owned()
    };
    let old_kid = iss.kid();
    let t_old = ts.token(&["md:read:T"]);
    assert_eq!(kid_of(&t_old), old_kid);
    // Timed from before the rotation, so the 1 s lead time cannot have started earlier.
    let rotated = std::time::Instant::now();
    let new_kid = iss.rotate().unwrap();
    // Published at once, not signing yet.
    let mut both = vec![old_kid.clone(), new_kid.clone()];
    both.sort();
    assert_eq!(jwks_kids().await, both);
    assert_eq!(kid_of(&ts.token(&["md:read:T"])), old_kid, "the new key signed before its lead time");
    // The new key signs once its 1 s lead time has passed: poll for the first token it signs.
    let t_new = eventually("a token signed by the new key", EVENTUALLY, || async {
        let t = ts.token(&["md:read:T"]);
        (kid_of(&t) == new_kid).then_some(t)
    })
    .await;
    assert!(rotated.elapsed() >= Duration::from_secs(1), "the new key signed after {:?}", rotated.elapsed());
    // Tokens of both keys open streams while both are published.
    for t in [&t_old, &t_new] {
        let (s, _) = bearer_handshake(&ts, t).await;
        assert_eq!(s, 101);
    }
    // The old key leaves once its last token (2 s lifetime, no leeway) has expired.
    let kids = eventually("the old key retired", EVENTUALLY, || async {
        let kids = jwks_kids().await;
        (kids.len() == 1).then_some(kids)
    })
    .await;
    assert_eq!(kids, vec![new_kid.clone()]);
    assert_eq!(ts.metric("tickgate_jwks_keys").await, 1.0);
    ts.shutdown().await;
}

/// `tickgate serve` with no configuration from a folder without `feeds/`: embedded issuer,
/// compiled-in DEMO feed, printed secret; then `token` and `subscribe --json` against it,
/// and SIGTERM for a graceful stop.
#[test]
fn serve_token_subscribe_from_an_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Command::new(bin::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("TICKGATE_DEMO_SECRET")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(serve.stdout.take().unwrap());
    let mut secret = None;
    let mut url = None;
    let mut issuer = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.split("secret ").nth(1) {
            secret = Some(rest.split_whitespace().next().unwrap().to_owned());
        }
        if let Some(s) = Serving::parse(&line) {
            url = Some(s.stream);
            issuer = Some(s.base);
            break;
        }
    }
    let (secret, url, issuer) = (secret.expect("secret printed"), url.unwrap(), issuer.unwrap());
    let token = Command::new(bin::BIN)
        .args(["token", "--issuer", &issuer, "--client-id", "demo", &format!("--client-secret={secret}")])
        .output()
        .unwrap();
    assert!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3);
    let sub = Command::new(bin::BIN)
        .args([
            "subscribe",
            "--url",
            &url,
            "--token",
            &token,
            "--feed",
            "DEMO",
            "--symbols",
            "AAPL,MSFT",
            "--snapshot",
            "--json",
            "--limit",
            "50",
        ])
        .output()
        .unwrap();
    assert!(sub.status.success(), "{}", String::from_utf8_lossy(&sub.stderr));
    let lines: Vec<Value> =
        String::from_utf8(sub.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["type"], "welcome");
    assert_eq!(lines[1]["type"], "subscribed");
    let records: Vec<&Value> = lines.iter().filter(|l| l["type"] == "trade" || l["type"] == "quote").collect();
    assert!(records.len() >= 50);
    assert!(records.iter().all(|r| r["symbol"] == "AAPL" || r["symbol"] == "MSFT"));
    assert!(lines.iter().all(|l| l["type"] != "delivery_violation"));
    // A wrong secret fails with a clear message.
    let bad = Command::new(bin::BIN)
        .args(["token", "--issuer", &issuer, "--client-id", "demo", "--client-secret", "nope"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid_client"));

    // Graceful stop on SIGTERM.
    let _ = Command::new("kill").args(["-TERM", &serve.id().to_string()]).status();
    let status = eventually_blocking("serve stopped on SIGTERM", EVENTUALLY, || serve.try_wait().unwrap());
    assert!(status.success());
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut logs).unwrap();
    assert!(logs.contains("compiled-in DEMO feed"), "{logs}");
    assert!(!logs.contains(&secret), "the secret must not be logged");
    assert!(!logs.contains(&token), "the token must not be logged");
}

#[test]
fn bad_config_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[limits]\nmax_outbound_byte = 5\n").unwrap();
    let out = Command::new(bin::BIN).args(["serve", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_outbound_byte"), "{err}");
}

/// `POST /demo/token` (the trading screen's token with no secret) exists only while the
/// configuration lists no client: a read-only `md:read:*` token of the generated `demo`
/// client, that opens a stream; with configured clients it is a JSON 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_tokens_only_without_configured_clients() {
    let http = reqwest::Client::new();
    let ts = TestServer::start(100.0, |c| c.issuer.clients.clear()).await;
    let r = http.post(format!("{}/demo/token", ts.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let t: Value = r.json().await.unwrap();
    assert_eq!((t["scope"].as_str(), t["token_type"].as_str()), (Some("md:read:*"), Some("Bearer")));
    let token = t["access_token"].as_str().unwrap().to_owned();
    let mut sub = ts.subscriber(&token).await;
    assert!(matches!(next_control(&mut sub).await, tickgate_proto::control::ServerMsg::Welcome { .. }));
    assert_eq!(ts.metric("tickgate_token_requests_total{result=\"ok\"}").await, 1.0);
    ts.shutdown().await;

    let ts = TestServer::start(100.0, |_| {}).await;
    let r = http.post(format!("{}/demo/token", ts.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_found");
    ts.shutdown().await;
}

/// The trading screen is served from the binary: the page at `/`, its script and the JS
/// client it imports, as JavaScript (a module script of another type is refused by browsers),
/// revalidated on every load (`no-cache`) so a new build never runs an old client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trading_screen_and_its_scripts_are_served() {
    let http = reqwest::Client::new();
    let ts = TestServer::start(100.0, |_| {}).await;
    let page = http.get(format!("{}/", ts.base)).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/demo.js">"#), "the page loads its script");
    for (path, needle) in
        [("/demo.js", "from '/tickgate-client.js'"), ("/tickgate-client.js", "export class TickgateStream")]
    {
        let r = http.get(format!("{}{path}", ts.base)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], "text/javascript; charset=utf-8", "{path}");
        assert_eq!(r.headers()["cache-control"], "no-cache", "{path}");
        assert!(r.text().await.unwrap().contains(needle), "{path} holds {needle}");
    }
    ts.shutdown().await;
}
