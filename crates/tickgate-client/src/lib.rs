//! The Rust client: token fetching, connecting, decoding batches and checking delivery.
//! Batches are decoded by the protocol crate's client decoder
//! (`tickgate_proto::codec::decode_batch`) and control messages are written as typed
//! `tickgate_proto::control::ClientMsg` values ([`Subscriber::send`]), so the client
//! holds no copy of the wire format. [`publisher`] is the `GET /v1/publish` side and
//! [`tools`] the CLI commands built on both.
//!
//! [`SeqTracker`] enforces the client side of the delivery guarantees (spec §6): for each
//! subscribed instrument every seq arrives in order, or a `gap` message names the missing
//! range first. Anything else (a duplicate, a hole nobody announced) is reported as an
//! [`Anomaly`], which `tickgate subscribe` prints loudly and `tickgate load` counts.

pub mod admin;
pub mod publisher;
pub mod tools;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use tickgate_proto::codec::{decode_batch, DecodeError, Record, FLAG_CONFLATED, FLAG_REPLAY, FLAG_SNAPSHOT};
use tickgate_proto::control::{ClientMsg, ServerMsg};
use tickgate_proto::{BEARER_PROTOCOL_PREFIX, SUBPROTOCOL};

/// The delay before reconnect attempt `attempt` (0 = the first after a close): the
/// server's `reconnect_after_ms` hint when it gave one (first attempt only), else `unit`
/// (uniform in [0, 1]) of a jitter window that starts at `jitter_ms` and doubles with every
/// failed attempt up to `max_ms` ("full jitter": a storm of clients that failed together
/// does not retry together).
pub fn backoff_ms(attempt: u32, hint_ms: Option<u64>, jitter_ms: u64, max_ms: u64, unit: f64) -> u64 {
    if attempt == 0 {
        if let Some(h) = hint_ms {
            return h;
        }
    }
    let window = jitter_ms.max(1).saturating_mul(1u64 << attempt.min(20)).min(max_ms.max(1));
    (window as f64 * unit.clamp(0.0, 1.0)) as u64
}

/// Client errors.
#[derive(Debug, Error)]
pub enum ClientError {
    /// HTTP failure talking to the issuer.
    #[error("token request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The issuer refused.
    #[error("token refused ({status}): {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
    /// The admin API refused (403 without `tickgate:admin`, 400 for a bad request, ...).
    #[error("admin API refused ({status}): {body}")]
    AdminRefused {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
    /// Bad URL.
    #[error("bad URL: {0}")]
    Url(String),
    /// TCP or file failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered the upgrade with an HTTP refusal (protocol §3): its status and,
    /// from its JSON body, `error` and `error_description` (empty when the body had none).
    #[error("handshake refused ({status} {error}): {description}")]
    HandshakeRefused {
        /// HTTP status (401 token refused, 403 scope or origin, 429 limits, 503 draining, ...).
        status: u16,
        /// The body's `error` (`invalid_token`, `insufficient_scope`, ...).
        error: String,
        /// The body's `error_description`: why, in words ("token expired", ...).
        description: String,
        /// The body as sent.
        body: String,
    },
    /// WebSocket failure.
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// A binary message that does not decode.
    #[error("undecodable batch: {0}")]
    Decode(#[from] DecodeError),
    /// A text message that is not a known server message.
    #[error("unparseable control message: {0}")]
    Control(String),
}

/// Fetches an access token with the client credentials grant. `issuer` is the issuer's
/// base URL; its discovery document names the token endpoint (falls back to
/// `<issuer>/oauth2/token`).
pub async fn fetch_token(
    issuer: &str,
    client_id: &str,
    client_secret: &str,
    scope: Option<&str>,
) -> Result<String, ClientError> {
    fetch_token_with_ca(issuer, client_id, client_secret, scope, None).await
}

/// [`fetch_token`] trusting an extra CA certificate (PEM) for an `https://` issuer.
pub async fn fetch_token_with_ca(
    issuer: &str,
    client_id: &str,
    client_secret: &str,
    scope: Option<&str>,
    ca_file: Option<&Path>,
) -> Result<String, ClientError> {
    let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10));
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca)?;
        let cert = reqwest::Certificate::from_pem(&pem)?;
        builder = builder.add_root_certificate(cert);
    }
    let http = builder.build()?;
    let base = issuer.trim_end_matches('/');
    let endpoint = match http.get(format!("{base}/.well-known/openid-configuration")).send().await {
        Ok(r) if r.status().is_success() => r
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v.get("token_endpoint").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| format!("{base}/oauth2/token")),
        _ => format!("{base}/oauth2/token"),
    };
    let mut form = vec![("grant_type", "client_credentials")];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    let resp = http.post(endpoint).basic_auth(client_id, Some(client_secret)).form(&form).send().await?;
    let status = resp.status().as_u16();
    let body = resp.text().await?;
    if status != 200 {
        return Err(ClientError::Refused { status, body });
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| ClientError::Refused { status, body: format!("not JSON: {e}") })?;
    v.get("access_token")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .ok_or(ClientError::Refused { status, body: "no access_token in the response".into() })
}

/// How the token is presented at the handshake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenPlacement {
    /// `Authorization: Bearer`.
    #[default]
    Header,
    /// `Sec-WebSocket-Protocol: tickgate.v1, bearer.<JWT>` (the browser way).
    Subprotocol,
}

/// Connection options.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Source address to bind (spreads load generators over 127.0.0.x).
    pub local_ip: Option<IpAddr>,
    /// Kernel receive buffer (a small one makes a slow reader stall the server sooner).
    pub recv_buffer: Option<u32>,
    /// Where the token goes.
    pub placement: TokenPlacement,
    /// For `wss://`: trust this CA certificate (PEM) instead of the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// A raw client WebSocket.
pub type ClientWs = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn tls_connector(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector, ClientError> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls_err = |e: rustls::Error| ClientError::Url(format!("TLS client: {e}"));
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(tls_err)?;
    let config = match ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
                .map_err(|e| ClientError::Url(format!("{}: {e}", ca.display())))?
            {
                let cert = cert.map_err(|e| ClientError::Url(format!("{}: {e}", ca.display())))?;
                roots.add(cert).map_err(tls_err)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            let verifier = rustls_platform_verifier::Verifier::new(provider).map_err(tls_err)?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Opens a stream connection (`ws://` or `wss://` URLs).
pub async fn connect(url: &str, token: &str, opts: &ConnectOptions) -> Result<ClientWs, ClientError> {
    let uri: tokio_tungstenite::tungstenite::http::Uri =
        url.parse().map_err(|e| ClientError::Url(format!("{url}: {e}")))?;
    let tls = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(ClientError::Url(format!("{url}: the URL must be ws:// or wss://"))),
    };
    let host = uri.host().ok_or_else(|| ClientError::Url(format!("{url}: no host")))?;
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr: SocketAddr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| ClientError::Url(format!("{url}: host does not resolve")))?;
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(n) = opts.recv_buffer {
        socket.set_recv_buffer_size(n)?;
    }
    if let Some(ip) = opts.local_ip {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = if tls {
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
                .map_err(|e| ClientError::Url(format!("{url}: {e}")))?;
        MaybeTlsStream::Rustls(tls_connector(opts.ca_file.as_deref())?.connect(name, tcp).await?)
    } else {
        MaybeTlsStream::Plain(tcp)
    };
    let mut req = url.into_client_request()?;
    let h = req.headers_mut();
    let bad = |_| ClientError::Url("token is not a valid header value".into());
    match opts.placement {
        // An empty token presents no credential (servers in the benchmark-only no-auth
        // mode, or in-band `auth`).
        _ if token.is_empty() => {
            h.insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
        }
        TokenPlacement::Header => {
            h.insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).map_err(bad)?);
            h.insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
        }
        TokenPlacement::Subprotocol => {
            let v = format!("{SUBPROTOCOL}, {BEARER_PROTOCOL_PREFIX}{token}");
            h.insert("sec-websocket-protocol", HeaderValue::from_str(&v).map_err(bad)?);
        }
    }
    // tungstenite zero-fills its read buffer up to this size on every read attempt; the
    // 128 KiB default dominates a load generator's profile.
    let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    config.read_buffer_size = 4096;
    match tokio_tungstenite::client_async_with_config(req, stream, Some(config)).await {
        Ok((ws, _resp)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(refusal(&resp)),
        Err(e) => Err(e.into()),
    }
}

/// The typed form of an HTTP answer to the upgrade: a refusal's JSON body names the
/// `error` and says why in `error_description`; a body that is not such JSON is kept as
/// it came (as the description, when it is short text).
fn refusal(resp: &tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>>) -> ClientError {
    let body = resp.body().as_deref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
    let json: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    let field = |k: &str| json.as_ref().and_then(|v| v.get(k)).and_then(|v| v.as_str()).map(str::to_owned);
    let status = resp.status();
    let error = field("error").unwrap_or_else(|| status.canonical_reason().unwrap_or("refused").to_owned());
    let description = field("error_description").unwrap_or_else(|| {
        if json.is_none() && body.len() <= 200 {
            body.trim().to_owned()
        } else {
            String::new()
        }
    });
    ClientError::HandshakeRefused { status: status.as_u16(), error, description, body }
}

/// Something the client saw that the delivery guarantees forbid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    /// A record at or below the last seq already seen.
    Duplicate {
        /// Feed id.
        feed_id: u16,
        /// Instrument id.
        instrument_id: u32,
        /// The seq received.
        seq: u64,
        /// The seq expected.
        expected: u64,
    },
    /// Records skipped without a `gap` message.
    SilentGap {
        /// Feed id.
        feed_id: u16,
        /// Instrument id.
        instrument_id: u32,
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
    /// A record for an instrument that was never subscribed.
    Unsubscribed {
        /// Feed id.
        feed_id: u16,
        /// Instrument id.
        instrument_id: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct InstrTrack {
    /// Next live seq expected.
    expected: u64,
    /// While the snapshot is arriving: highest snapshot seq allowed.
    snapshot_upto: u64,
}

/// Per-instrument delivery checking.
#[derive(Debug, Default)]
pub struct SeqTracker {
    feeds: HashMap<String, u16>,
    ids: HashMap<u16, String>,
    symbols: HashMap<(u16, u32), String>,
    by_symbol: HashMap<(u16, String), u32>,
    track: HashMap<(u16, u32), InstrTrack>,
    epochs: HashMap<String, u64>,
    /// Resume points announced for the next `subscribed` of a feed: (epoch, symbol → seq).
    resuming: HashMap<String, (Option<u64>, BTreeMap<String, u64>)>,
    /// Records checked.
    pub records: u64,
    /// Records flagged CONFLATED (earlier quotes of the instrument were skipped).
    pub conflated: u64,
    /// Records flagged REPLAY.
    pub replayed: u64,
    /// `reset` messages received.
    pub resets: u64,
    /// Gap messages received.
    pub gaps: u64,
    /// Records missed as announced by gap messages.
    pub gap_records: u64,
}

impl SeqTracker {
    /// Learns from a control message (feed ids, subscriptions, gaps).
    pub fn on_control(&mut self, m: &ServerMsg) {
        match m {
            ServerMsg::Welcome { feeds, .. } | ServerMsg::Refreshed { feeds, .. } => {
                for f in feeds {
                    self.epochs.insert(f.name.clone(), f.epoch);
                    self.feeds.insert(f.name.clone(), f.id);
                    self.ids.insert(f.id, f.name.clone());
                }
            }
            ServerMsg::Subscribed { feed, instruments, epoch, .. } => {
                self.epochs.insert(feed.clone(), *epoch);
                let Some(&fid) = self.feeds.get(feed) else {
                    return;
                };
                // Resume seqs count only in the epoch they were taken in.
                let resume = self
                    .resuming
                    .remove(feed)
                    .filter(|(e, _)| e.is_none_or(|e| e == *epoch))
                    .map(|(_, r)| r)
                    .unwrap_or_default();
                for i in instruments {
                    self.symbols.insert((fid, i.id), i.symbol.clone());
                    self.by_symbol.insert((fid, i.symbol.clone()), i.id);
                    // An instrument subscribed before keeps its tracking; a resumed one
                    // continues after the client's own last seq (replay or gap follow).
                    let start = resume.get(&i.symbol).copied().unwrap_or(i.seq);
                    self.track.entry((fid, i.id)).or_insert(InstrTrack { expected: start + 1, snapshot_upto: i.seq });
                }
            }
            ServerMsg::Unsubscribed { feed, symbols, .. } => {
                let Some(&fid) = self.feeds.get(feed) else {
                    return;
                };
                for s in symbols {
                    if let Some(id) = self.by_symbol.get(&(fid, s.clone())) {
                        self.track.remove(&(fid, *id));
                    }
                }
            }
            ServerMsg::Gap { feed, symbol, from, to, .. } => {
                self.gaps += 1;
                let Some(&fid) = self.feeds.get(feed) else {
                    return;
                };
                let Some(&iid) = self.by_symbol.get(&(fid, symbol.clone())) else {
                    return;
                };
                if let Some(t) = self.track.get_mut(&(fid, iid)) {
                    if *from <= t.expected && *to >= t.expected {
                        self.gap_records += to - t.expected + 1;
                        t.expected = to + 1;
                    } else if *from < t.expected {
                        // A resume gap announced before the `subscribed` seq: already past it.
                    } else {
                        self.gap_records += to - from + 1;
                    }
                }
            }
            ServerMsg::Reset { feed, epoch } => {
                self.resets += 1;
                self.epochs.insert(feed.clone(), *epoch);
                if let Some(&fid) = self.feeds.get(feed) {
                    for ((f, _), t) in self.track.iter_mut() {
                        if *f == fid {
                            t.expected = 1;
                            t.snapshot_upto = 0;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Checks one record; returns what was wrong with it, if anything.
    pub fn on_record(&mut self, r: &Record) -> Option<Anomaly> {
        self.records += 1;
        let key = (r.feed_id(), r.instrument_id());
        let Some(t) = self.track.get_mut(&key) else {
            return Some(Anomaly::Unsubscribed { feed_id: key.0, instrument_id: key.1 });
        };
        let seq = r.seq();
        if r.flags() & FLAG_SNAPSHOT != 0 {
            // Snapshot records carry their own (older) seq and never move `expected`.
            if seq > t.snapshot_upto {
                return Some(Anomaly::Duplicate { feed_id: key.0, instrument_id: key.1, seq, expected: t.expected });
            }
            return None;
        }
        let expected = t.expected;
        if r.flags() & FLAG_REPLAY != 0 {
            self.replayed += 1;
        }
        if r.flags() & FLAG_CONFLATED != 0 {
            self.conflated += 1;
        }
        if seq == expected {
            t.expected += 1;
            None
        } else if seq > expected && r.flags() & FLAG_CONFLATED != 0 {
            // A conflated quote stands for the quotes skipped before it.
            t.expected = seq + 1;
            None
        } else if seq < expected {
            Some(Anomaly::Duplicate { feed_id: key.0, instrument_id: key.1, seq, expected })
        } else {
            t.expected = seq + 1;
            Some(Anomaly::SilentGap { feed_id: key.0, instrument_id: key.1, from: expected, to: seq - 1 })
        }
    }

    /// Announces a `resume` about to be sent for `feed` (taken in `epoch`, when known),
    /// so the next `subscribed` of that feed starts checking after those seqs.
    pub fn expect_resume(&mut self, feed: &str, epoch: Option<u64>, resume: BTreeMap<String, u64>) {
        self.resuming.insert(feed.to_owned(), (epoch, resume));
    }

    /// The epoch of a feed's numbering as last announced (welcome, subscribed, reset).
    pub fn epoch(&self, feed: &str) -> Option<u64> {
        self.epochs.get(feed).copied()
    }

    /// The numeric id of a feed, from `welcome`.
    pub fn feed_id_of(&self, feed: &str) -> Option<u16> {
        self.feeds.get(feed).copied()
    }

    /// Symbol of an instrument id, once subscribed.
    pub fn symbol(&self, feed_id: u16, instrument_id: u32) -> Option<&str> {
        self.symbols.get(&(feed_id, instrument_id)).map(String::as_str)
    }

    /// Feed name of a feed id.
    pub fn feed_name(&self, feed_id: u16) -> Option<&str> {
        self.ids.get(&feed_id).map(String::as_str)
    }

    /// Next expected seq per subscribed instrument, by feed name and symbol (what a
    /// reconnecting client passes as `resume`: the last seq seen is `expected - 1`).
    pub fn last_seen(&self) -> Vec<(String, String, u64)> {
        self.track
            .iter()
            .filter_map(|(&(f, i), t)| {
                Some((self.ids.get(&f)?.clone(), self.symbols.get(&(f, i))?.clone(), t.expected.saturating_sub(1)))
            })
            .collect()
    }
}

/// What a [`Subscriber`] yields.
#[derive(Debug)]
pub enum Event {
    /// A control message.
    Control(ServerMsg),
    /// A batch of records with the anomalies found in it.
    Batch {
        /// Server send time of the batch.
        send_ts_ns: u64,
        /// The records.
        records: Vec<Record>,
        /// Delivery violations.
        anomalies: Vec<Anomaly>,
    },
    /// The server closed the connection.
    Closed {
        /// Close code (1006 when the socket dropped without one).
        code: u16,
        /// Close reason.
        reason: String,
    },
}

/// A connection plus its delivery tracking.
pub struct Subscriber {
    ws: ClientWs,
    /// Delivery checking state.
    pub tracker: SeqTracker,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber").field("tracker", &self.tracker).finish()
    }
}

impl Subscriber {
    /// Connects.
    pub async fn connect(url: &str, token: &str, opts: &ConnectOptions) -> Result<Subscriber, ClientError> {
        Ok(Subscriber { ws: connect(url, token, opts).await?, tracker: SeqTracker::default() })
    }

    /// Subscribes to `symbols` of `feed`; with `resume` (epoch, symbol → last seq seen)
    /// the tracker continues from the client's own seqs.
    pub async fn subscribe(
        &mut self,
        id: i64,
        feed: &str,
        symbols: &[&str],
        snapshot: bool,
        resume: Option<(Option<u64>, BTreeMap<String, u64>)>,
    ) -> Result<(), ClientError> {
        let (epoch, resume) = match resume {
            Some((epoch, seqs)) => {
                self.tracker.expect_resume(feed, epoch, seqs.clone());
                (epoch, Some(seqs))
            }
            None => (None, None),
        };
        let msg = ClientMsg::Subscribe {
            id: Some(id),
            feed: feed.to_owned(),
            symbols: symbols.iter().map(|s| (*s).to_owned()).collect(),
            snapshot,
            resume,
            epoch,
            max_rate: None,
        };
        self.send(&msg).await
    }

    /// Sends a control message.
    pub async fn send(&mut self, m: &ClientMsg) -> Result<(), ClientError> {
        self.ws.send(Message::text(m.to_json())).await?;
        Ok(())
    }

    /// Sends arbitrary JSON as a control message (tests of what the server refuses).
    pub async fn send_json(&mut self, v: &serde_json::Value) -> Result<(), ClientError> {
        self.ws.send(Message::text(v.to_string())).await?;
        Ok(())
    }

    /// Waits for the next event.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            let msg = match self.ws.next().await {
                None => return Ok(Event::Closed { code: 1006, reason: "connection dropped".into() }),
                Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) => {
                    return Ok(Event::Closed { code: 1006, reason: "connection closed".into() })
                }
                Some(m) => m?,
            };
            match msg {
                Message::Text(t) => {
                    let m: ServerMsg =
                        serde_json::from_str(t.as_str()).map_err(|e| ClientError::Control(format!("{e}: {t}")))?;
                    self.tracker.on_control(&m);
                    return Ok(Event::Control(m));
                }
                Message::Binary(b) => {
                    let batch = decode_batch(&b)?;
                    let anomalies = batch.records.iter().filter_map(|r| self.tracker.on_record(r)).collect();
                    return Ok(Event::Batch { send_ts_ns: batch.send_ts_ns, records: batch.records, anomalies });
                }
                Message::Close(f) => {
                    let (code, reason) =
                        f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                    return Ok(Event::Closed { code, reason });
                }
                _ => continue,
            }
        }
    }

    /// Closes the connection normally.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// The underlying socket, for tests that need raw frames.
    pub fn ws_mut(&mut self) -> &mut ClientWs {
        &mut self.ws
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_honours_the_hint_then_doubles_with_full_jitter() {
        assert_eq!(backoff_ms(0, Some(1500), 250, 4000, 0.3), 1500);
        assert_eq!(backoff_ms(0, None, 250, 4000, 1.0), 250);
        assert_eq!(backoff_ms(0, None, 250, 4000, 0.0), 0);
        assert_eq!(backoff_ms(1, Some(1500), 250, 4000, 1.0), 500, "the hint is for the first attempt only");
        assert_eq!(backoff_ms(2, None, 250, 4000, 1.0), 1000);
        assert_eq!(backoff_ms(9, None, 250, 4000, 1.0), 4000, "capped");
        assert_eq!(backoff_ms(60, None, 250, 4000, 0.5), 2000, "no overflow");
    }
}
