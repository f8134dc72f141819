//! TLS on both listeners with certificates made by rcgen: wss:// end to end, TLS 1.2 and
//! 1.3, plain clients refused, and certificate reload (API and SIGHUP) without dropping
//! established connections.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;
use tickgate_client::{self as client, ConnectOptions, Event, Subscriber};
use tickgate_proto::control::ServerMsg;

/// Writes a fresh self-signed certificate for 127.0.0.1/localhost; returns its DER.
fn write_cert(dir: &Path) -> Vec<u8> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    ck.cert.der().to_vec()
}

/// The certificate a TLS server presents, with a client limited to one TLS version.
async fn presented_cert(
    addr: std::net::SocketAddr,
    ca: &Path,
    version: &'static rustls::SupportedProtocolVersion,
) -> Vec<u8> {
    try_presented_cert(addr, ca, version).await.expect("TLS handshake against the given CA")
}

/// As [`presented_cert`], `None` when the presented certificate does not verify against `ca`.
async fn try_presented_cert(
    addr: std::net::SocketAddr,
    ca: &Path,
    version: &'static rustls::SupportedProtocolVersion,
) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.ok()?;
    assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
    Some(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_end_to_end_and_reload_keeps_connections() {
    let certs = tempfile::tempdir().unwrap();
    let first = write_cert(certs.path());
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let ts = TestServer::start(1000.0, |c| {
        c.tls.cert = Some(cert.clone());
        c.tls.key = Some(key.clone());
        c.tls.admin = true;
    })
    .await;
    let addr = ts.server().addr();
    let wss = format!("wss://127.0.0.1:{}/v1/stream", addr.port());
    let https = format!("https://127.0.0.1:{}", addr.port());
    let ca = certs.path().join("ca.pem");
    std::fs::copy(&cert, &ca).unwrap();

    // Token over https from the embedded issuer (its iss is https://...).
    let token = client::fetch_token_with_ca(&https, "demo", SECRET, Some("md:read:T"), Some(&ca)).await.unwrap();
    let opts = ConnectOptions { ca_file: Some(ca.clone()), ..ConnectOptions::default() };
    let mut sub = Subscriber::connect(&wss, &token, &opts).await.unwrap();
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Welcome { .. }));
    sub.send_json(&json!({"op":"subscribe","feed":"T","symbols":["*"]})).await.unwrap();
    assert!(matches!(next_control(&mut sub).await, ServerMsg::Subscribed { .. }));
    let (_, a) = read_records(&mut sub, 20).await;
    assert_eq!(a, 0);

    // Both TLS versions; the admin listener is TLS too.
    assert_eq!(presented_cert(addr, &ca, &rustls::version::TLS13).await, first);
    assert_eq!(presented_cert(addr, &ca, &rustls::version::TLS12).await, first);
    let admin = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let r = admin.get(format!("https://127.0.0.1:{}/healthz", ts.server().admin_addr().port())).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // A plain WebSocket client gets no HTTP answer from a TLS listener.
    let plain = format!("ws://127.0.0.1:{}/v1/stream", addr.port());
    let r =
        tokio::time::timeout(Duration::from_secs(10), Subscriber::connect(&plain, &token, &ConnectOptions::default()))
            .await
            .expect("refused promptly");
    assert!(r.is_err());
    // A client that does not trust the certificate fails the handshake.
    assert!(Subscriber::connect(&wss, &token, &ConnectOptions::default()).await.is_err());

    // Reload with a new certificate: new handshakes see it, the old stream goes on.
    let second = write_cert(certs.path());
    assert!(ts.server().reload_tls().unwrap());
    let ca2 = certs.path().join("ca2.pem");
    std::fs::copy(&cert, &ca2).unwrap();
    assert_eq!(presented_cert(addr, &ca2, &rustls::version::TLS13).await, second);
    let (_, a) = read_records(&mut sub, 20).await;
    assert_eq!(a, 0, "the established stream was disturbed by the reload");
    // A broken file on reload is refused and the current certificate stays.
    std::fs::write(&key, "not a key").unwrap();
    assert!(ts.server().reload_tls().is_err());
    assert_eq!(presented_cert(addr, &ca2, &rustls::version::TLS12).await, second);
    ts.shutdown().await;
}

/// `tickgate serve` reloads its certificate on SIGHUP without dropping a live stream.
#[test]
fn sighup_reloads_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_cert(dir.path());
    std::fs::copy(dir.path().join("cert.pem"), dir.path().join("ca1.pem")).unwrap();
    let cfg = dir.path().join("tls.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.path().join("cert.pem").display(),
            dir.path().join("key.pem").display()
        ),
    )
    .unwrap();
    let (child, serving) = common::bin::spawn_serving(
        Command::new(common::bin::BIN)
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .current_dir(dir.path())
            .env("TICKGATE_DEMO_SECRET", "s3cret")
            .stderr(Stdio::null()),
    );
    let (wss, issuer) = (serving.stream.clone(), serving.base.clone());
    assert!(wss.starts_with("wss://") && issuer.starts_with("https://"), "{serving:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ca1 = dir.path().join("ca1.pem");
        let token = client::fetch_token_with_ca(&issuer, "demo", "s3cret", None, Some(&ca1)).await.unwrap();
        let opts = ConnectOptions { ca_file: Some(ca1.clone()), ..ConnectOptions::default() };
        let mut sub = Subscriber::connect(&wss, &token, &opts).await.unwrap();
        sub.send_json(&json!({"op":"subscribe","feed":"DEMO","symbols":["AAPL"]})).await.unwrap();
        let addr: std::net::SocketAddr =
            wss.trim_start_matches("wss://").trim_end_matches("/v1/stream").parse().unwrap();
        assert_eq!(presented_cert(addr, &ca1, &rustls::version::TLS13).await, first);

        let second = write_cert(dir.path());
        std::fs::copy(dir.path().join("cert.pem"), dir.path().join("ca2.pem")).unwrap();
        let _ = Command::new("kill").args(["-HUP", &child.0.id().to_string()]).status();
        let ca2 = dir.path().join("ca2.pem");
        // The new certificate is presented once the signal is handled...
        let seen = eventually("the certificate reloaded on SIGHUP", EVENTUALLY, || async {
            try_presented_cert(addr, &ca2, &rustls::version::TLS13).await
        })
        .await;
        assert_eq!(seen, second, "SIGHUP did not reload the certificate");
        assert!(try_presented_cert(addr, &ca1, &rustls::version::TLS13).await.is_none());
        // ...and the stream opened before the reload still delivers.
        let mut got = 0;
        while got < 5 {
            match tokio::time::timeout(EVENTUALLY, sub.next_event()).await.unwrap().unwrap() {
                Event::Batch { records, anomalies, .. } => {
                    assert!(anomalies.is_empty());
                    got += records.len();
                }
                Event::Control(_) => {}
                Event::Closed { code, .. } => panic!("stream closed by the reload: {code}"),
            }
        }
    });
    drop(child);
}
