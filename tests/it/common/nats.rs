//! What the NATS tests share: a free port, a real nats-server (JetStream, optionally a
//! WebSocket listener, on loopback or any address of the machine) that can be stopped and
//! started again on the same port and store, a feed handler publishing by the contract
//! (nats-feeds-v1 §2), and an edge's `/readyz` and metrics read from its admin URL (so the
//! same helpers serve an in-process [`super::TestServer`] and a `tickgate serve` process).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use async_nats::jetstream;
use tickgate_proto::codec::{encode_batch, Body, Quote, Record, Trade};

use super::{eventually, eventually_blocking, Kill, EVENTUALLY};

/// A port free on loopback now (the OS's choice), for a server the test starts next.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Panics with how to get nats-server when it is not on PATH: the NATS tests run a real one.
pub fn require_nats_server() {
    let found = Command::new("nats-server").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "nats-server is not on PATH: these tests run a real one. Run ./scripts/test.sh, which installs it \
         (Debian package nats-server), or `apt-get install -y nats-server`."
    );
}

/// A feed file of a `source = "nats"` feed (the edges' side of the contract), written as
/// `feeds/<file>` under `dir`; returns the feeds folder.
pub fn write_nats_feed(dir: &Path, file: &str, name: &str, id: u16, symbols: &[&str]) -> PathBuf {
    let feeds = dir.join("feeds");
    std::fs::create_dir_all(&feeds).unwrap();
    let syms: Vec<String> = symbols.iter().map(|s| format!("\"{s}\"")).collect();
    let text = format!("name = \"{name}\"\nid = {id}\nsource = \"nats\"\nsymbols = [{}]\n", syms.join(", "));
    std::fs::write(feeds.join(file), text).unwrap();
    feeds
}

/// How [`start_nats_with`] runs the server.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// The address it listens on (client port, and the WebSocket port if any).
    pub host: String,
    /// JetStream on, its store in the server's temp folder.
    pub jetstream: bool,
    /// A plain (no TLS) WebSocket listener too, on its own free port.
    pub websocket: bool,
}

impl Default for NatsOptions {
    /// JetStream on loopback, no WebSocket listener: what the edges' tests need.
    fn default() -> Self {
        NatsOptions { host: "127.0.0.1".into(), jetstream: true, websocket: false }
    }
}

/// A nats-server owned by the test: killed (by its PID) when dropped, its store in a temp
/// folder that outlives [`Nats::stop`], so that [`Nats::start`] brings the same streams back.
pub struct Nats {
    proc: Option<Kill>,
    _dir: tempfile::TempDir,
    conf: PathBuf,
    /// The address it listens on.
    pub host: String,
    /// The client port.
    pub port: u16,
    /// The WebSocket port, when asked for.
    pub ws_port: Option<u16>,
    /// `nats://host:port`.
    pub url: String,
}

/// A nats-server with JetStream on loopback, started and listening.
pub fn start_nats() -> Nats {
    start_nats_with(NatsOptions::default())
}

/// A nats-server as `opts` says, started and listening.
pub fn start_nats_with(opts: NatsOptions) -> Nats {
    require_nats_server();
    let dir = tempfile::tempdir().unwrap();
    // The ports are taken on loopback: a port free there is free on the machine's other
    // addresses too in practice, and the server fails loudly (never listening) if not.
    let port = free_port();
    let ws_port = opts.websocket.then(free_port);
    let host = &opts.host;
    let mut text = format!("listen: \"{host}:{port}\"\n");
    if opts.jetstream {
        text.push_str(&format!("jetstream {{ store_dir: {:?} }}\n", dir.path().join("store")));
    }
    if let Some(ws) = ws_port {
        text.push_str(&format!("websocket {{ listen: \"{host}:{ws}\", no_tls: true }}\n"));
    }
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, text).unwrap();
    let mut n = Nats {
        proc: None,
        _dir: dir,
        conf,
        host: opts.host.clone(),
        port,
        ws_port,
        url: format!("nats://{}:{port}", opts.host),
    };
    n.start();
    n
}

impl Nats {
    /// (Re)starts the server on the same ports and store, and waits until it listens.
    pub fn start(&mut self) {
        let proc = Kill(
            Command::new("nats-server")
                .arg("-c")
                .arg(&self.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        for port in std::iter::once(self.port).chain(self.ws_port) {
            let addr = format!("{}:{port}", self.host);
            eventually_blocking(&format!("nats-server listening on {addr}"), EVENTUALLY, || {
                std::net::TcpStream::connect(&addr).ok()
            });
        }
        self.proc = Some(proc);
    }

    /// Stops the server gracefully (SIGTERM: JetStream flushes its store) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = Command::new("kill").arg("-TERM").arg(p.0.id().to_string()).status();
            let _ = p.0.wait();
        }
    }

    /// `ws://host:ws_port` of the WebSocket listener; panics when none was asked for.
    pub fn ws_url(&self) -> String {
        format!("ws://{}:{}", self.host, self.ws_port.expect("started with websocket: true"))
    }
}

/// A feed handler of the test: records of one feed and epoch, numbered 1, 2, ... per
/// instrument (ids 1-based, positions in the feed's symbol list), published by the contract
/// with every ack awaited.
pub struct Handler {
    /// The JetStream context it publishes with.
    pub js: jetstream::Context,
    /// The feed's name (subjects `md.<FEED>.<ID>.t|q`).
    pub feed: String,
    /// The feed's id, in every record.
    pub feed_id: u16,
    /// The `Tickgate-Epoch` of [`Handler::send`].
    pub epoch: u64,
    /// The last seq of each instrument.
    pub seqs: HashMap<u32, u64>,
}

impl Handler {
    /// A handler on its own connection to `url`.
    pub async fn new(url: &str, feed: &str, feed_id: u16, epoch: u64) -> Handler {
        Handler::with_client(async_nats::connect(url).await.unwrap(), feed, feed_id, epoch)
    }

    /// A handler on a connection the caller made (several servers, say).
    pub fn with_client(client: async_nats::Client, feed: &str, feed_id: u16, epoch: u64) -> Handler {
        Handler { js: jetstream::new(client), feed: feed.to_owned(), feed_id, epoch, seqs: HashMap::new() }
    }

    /// The next record of instrument `id`: a quote or a trade whose fields follow its seq.
    pub fn record(&mut self, id: u32, quote: bool) -> Record {
        let seq = self.seqs.entry(id).or_insert(0);
        *seq += 1;
        let body = if quote {
            Body::Quote(Quote { bid_px: 100 + *seq as i64, ask_px: 101 + *seq as i64, bid_sz: 1, ask_sz: 2 })
        } else {
            Body::Trade(Trade { price: 100 + *seq as i64, size: *seq, side: 1 })
        };
        Record::encode(self.feed_id, id, *seq, 1_000 + *seq as i64, 0, &body, 0)
    }

    /// Publishes raw: subject, epoch header (None: left out), records; waits for the ack.
    /// `tag` makes the `Nats-Msg-Id` of a deliberately bad message unique, so JetStream's
    /// deduplication does not swallow it (or the good message sent after it).
    pub async fn send_raw(&self, subject: &str, epoch: Option<u64>, recs: &[Record], tag: &str) {
        let mut payload = Vec::new();
        encode_batch(recs, 0, &mut payload);
        let mut headers = async_nats::HeaderMap::new();
        if let Some(e) = epoch {
            headers.insert("Tickgate-Epoch", e.to_string().as_str());
        }
        let first = recs.first().map(|r| (r.instrument_id(), r.seq())).unwrap_or((0, 0));
        let msg_id = format!("{}.{}.{}.{}{tag}", self.feed, first.0, epoch.unwrap_or(0), first.1);
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        let ack = self.js.publish_with_headers(subject.to_string(), headers, payload.into()).await.unwrap();
        ack.await.expect("JetStream acknowledged");
    }

    /// One message of `n` records of instrument `id` (all trades or all quotes).
    pub async fn send(&mut self, id: u32, quote: bool, n: usize) -> Vec<Record> {
        let recs: Vec<Record> = (0..n).map(|_| self.record(id, quote)).collect();
        let kind = if quote { "q" } else { "t" };
        self.send_raw(&format!("md.{}.{id}.{kind}", self.feed), Some(self.epoch), &recs, "").await;
        recs
    }
}

/// `GET <admin>/readyz`: status and body.
pub async fn readyz(admin: &str) -> (u16, String) {
    let r = reqwest::get(format!("{admin}/readyz")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Waits until `<admin>/readyz` answers 200.
pub async fn wait_ready(admin: &str) {
    eventually("the edge reports ready", EVENTUALLY, || async { (readyz(admin).await.0 == 200).then_some(()) }).await;
}

/// One series of `<admin>/metrics` (as [`super::metric_value`] reads it), 0 when absent.
pub async fn metric_at(admin: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics")).await.unwrap().text().await.unwrap();
    super::metric_value(&text, series)
}
