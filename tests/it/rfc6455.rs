//! RFC 6455 §4.2.1 checks of the upgrade request, over a raw TCP socket to a real server
//! (the request bytes are written by hand, since a WebSocket client library would never
//! send these), and unit tests of the pure `parse_upgrade`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Version};
use serde_json::Value;
use tickgate::server::authorize::Credential;
use tickgate::server::handshake::{parse_upgrade, Upgrade};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The request lines of a good upgrade (after the request line), minus `skip`, plus `extra`.
fn head(path: &str, version: &str, skip: &[&str], extra: &[&str]) -> String {
    let base = [
        "Host: localhost".to_owned(),
        "Connection: Upgrade".to_owned(),
        "Upgrade: websocket".to_owned(),
        "Sec-WebSocket-Version: 13".to_owned(),
        format!("Sec-WebSocket-Key: {KEY}"),
        "Sec-WebSocket-Protocol: tickgate.v1".to_owned(),
    ];
    let mut s = format!("GET {path} {version}\r\n");
    for line in base.iter().filter(|l| !skip.iter().any(|k| l.starts_with(k))) {
        s.push_str(line);
        s.push_str("\r\n");
    }
    for line in extra {
        s.push_str(line);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s
}

/// Sends `request` on a fresh socket; returns the status code and the JSON body (if any).
async fn raw(ts: &common::TestServer, request: &str) -> (u16, Value) {
    let mut tcp = tokio::net::TcpStream::connect(ts.server().addr()).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .map(|v| v.parse::<usize>().unwrap())
                .unwrap_or(0);
            if status == 101 || buf.len() >= end + 4 + len {
                let body = serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap_or(Value::Null);
                return (status, body);
            }
        }
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a full answer: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// (what, request head after path substitution, expected description)
fn cases(path: &str) -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("HTTP/1.0", head(path, "HTTP/1.0", &[], &[]), "a WebSocket upgrade must use HTTP/1.1 or higher"),
        ("no Host", head(path, "HTTP/1.1", &["Host:"], &[]), "the Host header is required"),
        ("two Hosts", head(path, "HTTP/1.1", &[], &["Host: other"]), "more than one Host header"),
        (
            "two keys",
            head(path, "HTTP/1.1", &[], &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="]),
            "more than one Sec-WebSocket-Key header",
        ),
        (
            "key not base64",
            head(path, "HTTP/1.1", &["Sec-WebSocket-Key"], &["Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!!!"]),
            "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
        ),
        (
            "key of 18 bytes",
            head(path, "HTTP/1.1", &["Sec-WebSocket-Key"], &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAAA"]),
            "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
        ),
        (
            "key with stray bits",
            head(path, "HTTP/1.1", &["Sec-WebSocket-Key"], &["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR=="]),
            "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
        ),
        (
            "key of 23 characters (existing answer)",
            head(path, "HTTP/1.1", &["Sec-WebSocket-Key"], &["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ="]),
            "missing or malformed Sec-WebSocket-Key",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_refuses_upgrades_that_break_rfc6455() {
    let ts = common::TestServer::start(10.0, |_| {}).await;
    let token = ts.token(&["md:read:*"]);
    // Control: the same hand-written request, well formed, is upgraded.
    let auth = format!("Authorization: Bearer {token}");
    let (status, _) = raw(&ts, &head("/v1/stream", "HTTP/1.1", &[], &[&auth])).await;
    assert_eq!(status, 101, "the well-formed raw request is accepted");

    refuses_every_case(&ts, "/v1/stream", "tickgate_handshakes_total{result=\"bad_request\"}").await;
    ts.shutdown().await;
}

/// Every one of [`cases`] at `path` is refused with 400 `invalid_request` and its own
/// description, and `counter` counts each.
async fn refuses_every_case(ts: &common::TestServer, path: &str, counter: &str) {
    let all = cases(path);
    for (what, req, desc) in &all {
        let (status, body) = raw(ts, req).await;
        assert_eq!(status, 400, "{what}");
        assert_eq!(body["error"], "invalid_request", "{what}: {body}");
        assert_eq!(body["error_description"], *desc, "{what}: {body}");
    }
    let want = all.len() as f64;
    common::eventually(&format!("{counter} == {want}"), common::EVENTUALLY, || async {
        (ts.metric(counter).await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refuses_upgrades_that_break_rfc6455() {
    let ts = common::TestServer::start(10.0, |_| {}).await;
    refuses_every_case(&ts, "/v1/publish?feed=T", "tickgate_publish_handshakes_total{result=\"bad_request\"}").await;
    ts.shutdown().await;
}

// ---- unit tests of the pure function ----

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    h
}

const GOOD: [(&str, &str); 6] = [
    ("host", "localhost"),
    ("connection", "keep-alive, Upgrade"),
    ("upgrade", "websocket"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", KEY),
    ("sec-websocket-protocol", "tickgate.v1"),
];

fn without(name: &str, extra: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut v: Vec<(&str, &str)> = GOOD.iter().copied().filter(|(k, _)| *k != name).collect();
    v.extend_from_slice(extra);
    headers(&v)
}

fn refused(method: Method, version: Version, query: Option<&str>, h: &HeaderMap) -> String {
    let r = parse_upgrade(&method, version, query, h).unwrap_err();
    assert_eq!((r.status.as_u16(), r.error, r.result.as_str()), (400, "invalid_request", "bad_request"));
    r.description
}

#[test]
fn parse_upgrade_accepts_a_good_request_and_reads_the_credential() {
    let h = headers(&GOOD);
    let ok = |v, q, h: &HeaderMap| parse_upgrade(&Method::GET, v, q, h).unwrap();
    assert_eq!(ok(Version::HTTP_11, None, &h), Upgrade { key: KEY.into(), credential: Credential::None });
    // HTTP/2 and later are "higher than 1.1".
    assert_eq!(ok(Version::HTTP_2, None, &h).credential, Credential::None);
    assert_eq!(ok(Version::HTTP_11, Some("ticket=abc"), &h).credential, Credential::Ticket("abc".into()));
    let h = without("", &[("authorization", "Bearer a.b.c")]);
    assert_eq!(ok(Version::HTTP_11, None, &h).credential, Credential::Bearer("a.b.c".into()));
    let h = without("sec-websocket-protocol", &[("sec-websocket-protocol", "tickgate.v1, bearer.x.y.z")]);
    assert_eq!(ok(Version::HTTP_11, None, &h).credential, Credential::Bearer("x.y.z".into()));
}

#[test]
fn parse_upgrade_applies_rfc6455_4_2_1() {
    let v11 = Version::HTTP_11;
    let good = headers(&GOOD);
    assert_eq!(refused(Method::GET, Version::HTTP_10, None, &good), "a WebSocket upgrade must use HTTP/1.1 or higher");
    assert_eq!(refused(Method::GET, Version::HTTP_09, None, &good), "a WebSocket upgrade must use HTTP/1.1 or higher");
    assert_eq!(refused(Method::GET, v11, None, &without("host", &[])), "the Host header is required");
    assert_eq!(refused(Method::GET, v11, None, &without("", &[("host", "b")])), "more than one Host header");
    assert_eq!(
        refused(Method::GET, v11, None, &without("", &[("sec-websocket-key", KEY)])),
        "more than one Sec-WebSocket-Key header"
    );
    for bad in
        ["!!!!!!!!!!!!!!!!!!!!!!!!", "AAAAAAAAAAAAAAAAAAAAAAAA", "dGhlIHNhbXBsZSBub25jZR==", "AAAAAAAAAAAAAAAAAAAAA==="]
    {
        assert_eq!(
            refused(Method::GET, v11, None, &without("sec-websocket-key", &[("sec-websocket-key", bad)])),
            "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
            "{bad}"
        );
    }
}

#[test]
fn parse_upgrade_keeps_the_existing_answers() {
    let v11 = Version::HTTP_11;
    let good = headers(&GOOD);
    assert_eq!(refused(Method::HEAD, v11, None, &good), "the stream endpoint takes GET");
    assert_eq!(refused(Method::GET, v11, None, &without("upgrade", &[])), "not a WebSocket upgrade request");
    assert_eq!(
        refused(Method::GET, v11, None, &without("sec-websocket-version", &[("sec-websocket-version", "8")])),
        "Sec-WebSocket-Version must be 13"
    );
    assert_eq!(
        refused(Method::GET, v11, None, &without("sec-websocket-key", &[])),
        "missing or malformed Sec-WebSocket-Key"
    );
    assert_eq!(
        refused(Method::GET, v11, Some("access_token=x"), &good).split(';').next().unwrap(),
        "tokens in the URL are refused"
    );
    assert_eq!(refused(Method::GET, v11, Some("ticket=a&ticket=b"), &good), "more than one ticket");
    assert_eq!(
        refused(Method::GET, v11, None, &without("sec-websocket-protocol", &[])),
        "the `tickgate.v1` subprotocol is required"
    );
    assert_eq!(
        refused(Method::GET, v11, Some("ticket=a"), &without("", &[("authorization", "Bearer t")])),
        "two credentials at once (Authorization header, bearer subprotocol, ticket: use exactly one)"
    );
    assert_eq!(
        refused(Method::GET, v11, None, &without("", &[("authorization", "Basic x")])),
        "Authorization must use the Bearer scheme"
    );
}

/// Reads one server frame (unmasked) from `buf`, filling it from `tcp`: (opcode, payload).
async fn next_frame(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if let Some((op, (at, len))) = common::server_frame(buf) {
            let payload = buf[at..at + len].to_vec();
            buf.drain(..at + len);
            return (op, payload);
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(common::EVENTUALLY, tcp.read(&mut chunk)).await.expect("a frame in time").unwrap();
        assert!(n > 0, "closed before a whole frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Frames a client sends in the same packet as its upgrade request (hyper has read them
/// by the time the upgrade completes) are read first: a Ping is answered, then the
/// in-band `auth` is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_pipelined_behind_the_upgrade_request_are_read() {
    let ts = common::TestServer::start(50.0, |c| c.auth.inband_timeout_ms = 20_000).await;
    let path = ts.url.split("127.0.0.1").nth(1).and_then(|r| r.find('/').map(|i| &r[i..])).unwrap().to_owned();
    let mut bytes = head(&path, "HTTP/1.1", &[], &[]).into_bytes();
    bytes.extend(common::client_frame(0x9, b"early"));
    let auth = serde_json::json!({"op": "auth", "token": ts.token(&["md:read:T"])}).to_string();
    bytes.extend(common::client_frame(0x1, auth.as_bytes()));
    let mut tcp = tokio::net::TcpStream::connect(ts.server().addr()).await.unwrap();
    tcp.write_all(&bytes).await.unwrap();
    let mut buf = Vec::new();
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(common::EVENTUALLY, tcp.read(&mut chunk)).await.expect("an answer").unwrap();
        assert!(n > 0, "closed before the 101");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf[..end]));
    buf.drain(..end + 4);
    assert_eq!(next_frame(&mut tcp, &mut buf).await, (0xA, b"early".to_vec()), "the Pong first");
    let (op, payload) = next_frame(&mut tcp, &mut buf).await;
    assert_eq!(op, 0x1);
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["type"], "welcome", "{v}");
    ts.shutdown().await;
}
