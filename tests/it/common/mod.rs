//! Shared harness: a real server on 127.0.0.1:0 with real tokens from its embedded issuer.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs, unreachable_pub)]

use std::time::Duration;

pub mod bin;
pub mod logs;
pub mod nats;
pub mod rsa;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tickgate::config::{ClientConfig, Config};
use tickgate::Server;
use tickgate_bench::prom;
use tickgate_client::{ConnectOptions, Event, Subscriber, TokenPlacement};
use tickgate_proto::control::ServerMsg;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &str = "s3cret-for-tests";

/// A feed file for tests.
pub fn feed_toml(name: &str, id: u16, symbols: usize, rate: f64) -> String {
    let syms: Vec<String> = (0..symbols).map(|i| format!("\"S{i}\"")).collect();
    format!(
        "name = \"{name}\"\nid = {id}\nsource = \"synthetic\"\nsymbols = [{}]\n[synthetic]\nseed = 7\nrate_per_s = {rate}\nquote_ratio = 0.6\n",
        syms.join(", ")
    )
}

/// A `publish` feed file for tests.
pub fn publish_toml(name: &str, id: u16, symbols: usize, policy: &str, resume_records: usize) -> String {
    let syms: Vec<String> = (0..symbols).map(|i| format!("\"S{i}\"")).collect();
    format!(
        "name = \"{name}\"\nid = {id}\nsource = \"publish\"\npolicy = \"{policy}\"\nsymbols = [{}]\n[resume]\nrecords = {resume_records}\n",
        syms.join(", ")
    )
}

pub struct TestServer {
    pub server: Option<Server>,
    pub url: String,
    pub base: String,
    pub admin: String,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with feed `T` (id 1, 5 symbols at `rate` ticks/s) and feed `OTHER`
    /// (id 2, 3 symbols, 50/s), after letting the caller adjust the config.
    pub async fn start(rate: f64, tweak: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_with_feeds(rate, &[], tweak).await
    }

    /// Like [`TestServer::start`], with extra feed files (file name, contents).
    pub async fn start_with_feeds(rate: f64, extra: &[(&str, String)], tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in extra {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        std::fs::write(dir.path().join("t.toml"), feed_toml("T", 1, 5, rate)).unwrap();
        std::fs::write(dir.path().join("other.toml"), feed_toml("OTHER", 2, 3, 50.0)).unwrap();
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            feeds_dir: dir.path().to_owned(),
            ..Config::default()
        };
        cfg.engine.shards = 2;
        cfg.server.drain_ms = 3000;
        // Each test server keeps its epoch state in its own folder, not in the checkout.
        cfg.server.state_dir = Some(dir.path().join("state"));
        cfg.issuer.clients = vec![ClientConfig {
            id: "demo".into(),
            secret: Some(SECRET.into()),
            secret_sha256: None,
            scopes: vec!["md:read:*".into(), "md:read:T".into(), "md:read:OTHER".into(), "openid".into()],
        }];
        tweak(&mut cfg);
        let server = Server::start(cfg).await.expect("server starts");
        let url = format!("ws://{}/v1/stream", server.addr());
        let base = format!("http://{}", server.addr());
        let admin = format!("http://{}", server.admin_addr());
        TestServer { server: Some(server), url, base, admin, _dir: dir }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    /// A real token from the embedded issuer.
    pub fn token(&self, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        self.server().issuer().unwrap().issue("tester", &scopes, 300).unwrap()
    }

    /// A token with chosen claims, signed by the server's issuer.
    pub fn token_with(&self, sub: &str, scopes: &str, iat: u64, exp: u64, jti: &str) -> String {
        let iss = self.server().issuer().unwrap();
        let claims = json!({"iss": iss.issuer(), "sub": sub, "aud": "tickgate", "iat": iat, "exp": exp,
            "jti": jti, "scope": scopes, "client_id": sub});
        iss.sign_raw("at+jwt", &claims).unwrap()
    }

    pub async fn subscriber(&self, token: &str) -> Subscriber {
        Subscriber::connect(&self.url, token, &ConnectOptions::default()).await.expect("connects")
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin)).await.unwrap().text().await.unwrap()
    }

    /// Value of one series (`name{labels}` exactly as rendered), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// Waits until `series` reaches at least `want` (shard counters are flushed every
    /// 100 ms) and returns its value then; panics naming the series when it is not reached
    /// within [`EVENTUALLY`].
    pub async fn wait_metric(&self, series: &str, want: f64) -> f64 {
        eventually(&format!("{series} >= {want}"), EVENTUALLY, || async {
            let v = self.metric(series).await;
            (v >= want).then_some(v)
        })
        .await
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

/// Value of one series (`name{labels}` as rendered; label order does not matter) in an
/// exposition, 0 when absent. Read with the load tool's parser (`tickgate_bench::prom`),
/// so that text which is not valid exposition fails the test.
pub fn metric_value(text: &str, series: &str) -> f64 {
    let series: prom::Series = series.parse().unwrap_or_else(|e| panic!("series {series:?}: {e}"));
    parse_metrics(text).value(&series).unwrap_or(0.0)
}

/// A whole exposition, parsed; panics (naming the line) when it is not valid text.
pub fn parse_metrics(text: &str) -> prom::Exposition {
    prom::Exposition::parse(text).unwrap_or_else(|e| panic!("/metrics: {e}\n{text}"))
}

/// Waits for the next control message, skipping data.
pub async fn next_control(sub: &mut Subscriber) -> ServerMsg {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), sub.next_event()).await {
            Ok(Ok(Event::Control(m))) => return m,
            Ok(Ok(Event::Batch { anomalies, .. })) => {
                assert!(anomalies.is_empty(), "{anomalies:?}")
            }
            Ok(Ok(Event::Closed { code, reason })) => {
                panic!("closed {code} {reason} while waiting for a control message")
            }
            Ok(Err(e)) => panic!("client error: {e}"),
            Err(_) => panic!("no control message within 10 s"),
        }
    }
}

/// Waits for the close, skipping everything else; returns the close code.
pub async fn wait_close(sub: &mut Subscriber, within: Duration) -> u16 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, sub.next_event()).await {
            Ok(Ok(Event::Closed { code, .. })) => return code,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("client error before close: {e}"),
            Err(_) => panic!("no close within {within:?}"),
        }
    }
}

/// Connects with a welcome already consumed and subscribes; returns the `subscribed` reply.
pub async fn subscribed(
    ts: &TestServer,
    token: &str,
    feed: &str,
    symbols: Value,
    snapshot: bool,
) -> (Subscriber, ServerMsg) {
    let mut sub = ts.subscriber(token).await;
    let w = next_control(&mut sub).await;
    assert!(matches!(w, ServerMsg::Welcome { .. }), "{w:?}");
    sub.send_json(&json!({"op": "subscribe", "id": 1, "feed": feed, "symbols": symbols, "snapshot": snapshot}))
        .await
        .unwrap();
    let r = next_control(&mut sub).await;
    (sub, r)
}

/// The HTTP answer to a raw handshake with the given extra headers (and URL suffix).
pub async fn handshake_status(ts: &TestServer, suffix: &str, headers: &[(&str, &str)]) -> (u16, Value, Option<String>) {
    let url = format!("{}{}", ts.url, suffix);
    let mut req = url.as_str().into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let tcp = tokio::net::TcpStream::connect(ts.server().addr()).await.unwrap();
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((mut ws, resp)) => {
            let _ = ws.close(None).await;
            (resp.status().as_u16(), Value::Null, None)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let www = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
            let body =
                resp.body().as_ref().map(|b| serde_json::from_slice(b).unwrap_or(Value::Null)).unwrap_or(Value::Null);
            (status, body, www)
        }
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

/// The stream handshake's status and JSON body with `token` as a bearer header and the
/// `tickgate.v1` subprotocol (what every client sends).
pub async fn bearer_handshake(ts: &TestServer, token: &str) -> (u16, Value) {
    let (s, body, _) = handshake_status(
        ts,
        "",
        &[("authorization", &format!("Bearer {token}")), ("sec-websocket-protocol", "tickgate.v1")],
    )
    .await;
    (s, body)
}

/// A WebSocket on a plain TCP socket, without the client library's reading in between.
pub type RawWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// An upgraded stream connection with a bearer token, or (None) none: in-band `auth` follows.
pub async fn raw_stream(ts: &TestServer, token: Option<&str>) -> RawWs {
    let mut req = ts.url.as_str().into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", "tickgate.v1".parse().unwrap());
    if let Some(t) = token {
        req.headers_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let tcp = tokio::net::TcpStream::connect(ts.server().addr()).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// Reads until the server's close frame, within [`EVENTUALLY`]; returns its code and reason
/// (panics on the end of the stream or an error before a close frame).
pub async fn close_frame<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return (u16::from(f.code), f.reason.to_string()),
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

/// `POST /v1/ticket` with `bearer` (or no credential): status, JSON body, `Retry-After`.
pub async fn get_ticket(ts: &TestServer, bearer: Option<&str>) -> (u16, Value, Option<String>) {
    let mut rb = reqwest::Client::new().post(format!("{}/v1/ticket", ts.base));
    if let Some(b) = bearer {
        rb = rb.bearer_auth(b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (status, r.json().await.unwrap_or(Value::Null), retry)
}

/// `POST /admin/revoke` with `admin_token` and a JSON `body`: status and JSON body.
pub async fn revoke(ts: &TestServer, admin_token: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/admin/revoke", ts.admin))
        .bearer_auth(admin_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The publish handshake to `/v1/publish{query}`: 101 and no body when it is accepted,
/// else the HTTP status and JSON body of the refusal.
pub async fn publish_handshake(ts: &TestServer, query: &str, token: &str) -> (u16, Value) {
    let url = format!("{}/v1/publish{query}", ts.base.replace("http://", "ws://"));
    match tickgate_client::connect(&url, token, &ConnectOptions::default()).await {
        Err(tickgate_client::ClientError::HandshakeRefused { status, body, .. }) => {
            (status, if body.is_empty() { Value::Null } else { serde_json::from_str(&body).unwrap() })
        }
        Ok(_) => (101, Value::Null),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Sends a raw WebSocket message on a subscriber.
pub async fn send_raw(sub: &mut Subscriber, m: Message) {
    sub.ws_mut().send(m).await.unwrap();
}

/// Drains events for a while and returns (records, anomalies).
pub async fn drain_for(sub: &mut Subscriber, d: Duration) -> (u64, usize) {
    let deadline = tokio::time::Instant::now() + d;
    let (mut n, mut a) = (0, 0);
    while let Ok(ev) = tokio::time::timeout_at(deadline, sub.next_event()).await {
        match ev.unwrap() {
            Event::Batch { records, anomalies, .. } => {
                n += records.len() as u64;
                a += anomalies.len();
            }
            Event::Control(_) => {}
            Event::Closed { code, reason } => panic!("closed {code} {reason}"),
        }
    }
    (n, a)
}

pub fn placement_subprotocol() -> ConnectOptions {
    ConnectOptions { placement: TokenPlacement::Subprotocol, ..ConnectOptions::default() }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Nanoseconds since the Unix epoch.
pub fn unix_now_ns() -> u64 {
    tickgate_proto::now_ns()
}

/// The token with one signature character changed. A middle character is used: the last
/// one of a base64url segment may carry only padding bits, so changing it can leave the
/// decoded signature intact.
pub fn forge_signature(token: &str) -> String {
    let dot = token.rfind('.').unwrap();
    let mut bytes = token.as_bytes().to_vec();
    let i = dot + 10;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

/// Held for the whole run of a test that loads the machine (thousands of connections) or
/// that a loaded machine fails (a socket buffer that must fill before a deadline). As
/// separate test binaries these never ran side by side; in one process libtest would run
/// them together, and each made the others fail. With the default two test threads, one
/// waiting here also keeps any other test from running beside the holder.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Kills and reaps a child process when dropped (a test's server or Prometheus).
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The generous bound `eventually` callers use: long enough that a slow or busy machine
/// never fails a test on time, short enough that a real hang is reported.
pub const EVENTUALLY: Duration = Duration::from_secs(30);

/// Polls `check` (every 20 ms) until it yields `Some(value)`, and returns that value; panics
/// naming `what` when `timeout` passes first. Tests use this instead of sleeping for a
/// guessed time: they wait for the condition itself.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not reached within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually`] for tests without a runtime (child processes, blocking sockets): polls
/// `check` every 20 ms until it yields `Some(value)`; panics naming `what` after `timeout`.
pub fn eventually_blocking<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if std::time::Instant::now() >= deadline {
            panic!("{what}: not reached within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads until at least `min` records have arrived (a stream that is alive delivers them
/// however slow the machine), within [`EVENTUALLY`]; returns (records, anomalies). Unlike
/// [`drain_for`], it waits for data instead of reading for a fixed time.
pub async fn read_records(sub: &mut Subscriber, min: u64) -> (u64, usize) {
    let (mut n, mut a) = (0, 0);
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while n < min {
        match tokio::time::timeout_at(deadline, sub.next_event()).await {
            Ok(Ok(Event::Batch { records, anomalies, .. })) => {
                n += records.len() as u64;
                a += anomalies.len();
            }
            Ok(Ok(Event::Control(_))) => {}
            Ok(Ok(Event::Closed { code, reason })) => panic!("closed {code} {reason} after {n} of {min} records"),
            Ok(Err(e)) => panic!("client error: {e}"),
            Err(_) => panic!("{n} of {min} records within {EVENTUALLY:?}"),
        }
    }
    (n, a)
}

/// Reads a bystander's stream until `stop` is cancelled and at least `min` records have
/// arrived, within [`EVENTUALLY`]; returns (records, anomalies). For "others are not
/// disturbed while X happens": it watches for as long as X takes, not for a guessed time.
pub async fn read_until_cancelled(
    sub: &mut Subscriber,
    stop: &tokio_util::sync::CancellationToken,
    min: u64,
) -> (u64, usize) {
    let (mut n, mut a) = (0, 0);
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while !(stop.is_cancelled() && n >= min) {
        let ev = tokio::select! {
            // Wakes the loop when `stop` fires on a quiet stream.
            _ = stop.cancelled(), if !stop.is_cancelled() => continue,
            ev = tokio::time::timeout_at(deadline, sub.next_event()) => ev,
        };
        match ev {
            Ok(Ok(Event::Batch { records, anomalies, .. })) => {
                n += records.len() as u64;
                a += anomalies.len();
            }
            Ok(Ok(Event::Control(_))) => {}
            Ok(Ok(Event::Closed { code, reason })) => panic!("closed {code} {reason}"),
            Ok(Err(e)) => panic!("client error: {e}"),
            Err(_) => panic!("stopped: {}, {n} of {min} records within {EVENTUALLY:?}", stop.is_cancelled()),
        }
    }
    (n, a)
}

/// The addresses `tickgate serve` prints on its `tickgate: stream <ws-url>  issuer
/// <token-url>  admin <metrics-url>` line, for tests that run the real binary.
#[derive(Debug, Clone)]
pub struct Serving {
    /// The stream URL (`ws://` or `wss://` ... `/v1/stream`).
    pub stream: String,
    /// The public listener's base URL (`http(s)://host:port`), where the issuer lives.
    pub base: String,
    /// The admin listener's base URL.
    pub admin: String,
}

impl Serving {
    /// Parses the start-up line; `None` for any other line.
    pub fn parse(line: &str) -> Option<Serving> {
        let words: Vec<&str> = line.strip_prefix("tickgate: stream ")?.split_whitespace().collect();
        match words.as_slice() {
            [stream, "issuer", token, "admin", metrics] => Some(Serving {
                stream: (*stream).to_owned(),
                base: token.strip_suffix("/oauth2/token")?.to_owned(),
                admin: metrics.strip_suffix("/metrics")?.to_owned(),
            }),
            _ => None,
        }
    }

    /// The token endpoint.
    pub fn token_endpoint(&self) -> String {
        format!("{}/oauth2/token", self.base)
    }
}

/// A client frame (FIN, `opcode`, masked with a zero key, which leaves the payload as is).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The first complete server frame in `b` (unmasked, unfragmented): its opcode and where
/// its payload lies (offset, length); `None` until it has all arrived.
pub fn server_frame(b: &[u8]) -> Option<(u8, (usize, usize))> {
    if b.len() < 2 {
        return None;
    }
    let (len, start) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (b.len() >= start + len).then_some((b[0] & 0x0f, (start, len)))
}
