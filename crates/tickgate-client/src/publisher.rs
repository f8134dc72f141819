//! A publisher for `GET /v1/publish`: sends batches of records into a `publish` feed and
//! waits for acknowledgements (`ping` → `pong` once everything before it is taken in).
//! Batches are written by the protocol crate's encoder and the ping is a typed
//! `ClientMsg`.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::{connect, ClientError, ClientWs, ConnectOptions};
use tickgate_proto::codec::{encode_batch, Record, MAX_BATCH_RECORDS};
use tickgate_proto::control::{ClientMsg, ServerMsg};
use tickgate_proto::now_ns;

/// A publisher connection.
pub struct Publisher {
    ws: ClientWs,
    buf: Vec<u8>,
    next_ping: i64,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

/// The publish URL for a stream URL's server: `ws://host:port/v1/publish?feed=F[&epoch=E]`.
pub fn publish_url(stream_url: &str, feed: &str, epoch: Option<u64>) -> String {
    let base = stream_url.strip_suffix("/v1/stream").unwrap_or(stream_url.trim_end_matches('/'));
    let q: String = serde_urlencoded::to_string([("feed", feed)]).unwrap_or_default();
    match epoch {
        Some(e) => format!("{base}/v1/publish?{q}&epoch={e}"),
        None => format!("{base}/v1/publish?{q}"),
    }
}

impl Publisher {
    /// Connects to `url` (a publish URL, see [`publish_url`]).
    pub async fn connect(url: &str, token: &str, opts: &ConnectOptions) -> Result<Publisher, ClientError> {
        Ok(Publisher { ws: connect(url, token, opts).await?, buf: Vec::new(), next_ping: 0 })
    }

    /// Sends records as one batch (more than 65535 are split).
    pub async fn send(&mut self, records: &[Record]) -> Result<(), ClientError> {
        for chunk in records.chunks(MAX_BATCH_RECORDS) {
            encode_batch(chunk, now_ns(), &mut self.buf);
            self.ws.send(Message::binary(self.buf.clone())).await?;
        }
        Ok(())
    }

    /// Sends raw bytes as one binary message (tests of malformed batches).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.ws.send(Message::binary(bytes)).await?;
        Ok(())
    }

    /// Waits until everything sent so far is taken in; returns the server messages that
    /// came before the acknowledgement (errors for refused batches).
    pub async fn sync(&mut self) -> Result<Vec<ServerMsg>, ClientError> {
        self.next_ping += 1;
        let id = self.next_ping;
        self.ws.send(Message::text(ClientMsg::Ping { id: Some(id) }.to_json())).await?;
        let mut seen = Vec::new();
        loop {
            match self.ws.next().await {
                None => return Err(ClientError::Control("publisher connection closed".into())),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => {
                    let m: ServerMsg =
                        serde_json::from_str(t.as_str()).map_err(|e| ClientError::Control(format!("{e}: {t}")))?;
                    if matches!(m, ServerMsg::Pong { id: Some(p), .. } if p == id) {
                        return Ok(seen);
                    }
                    seen.push(m);
                }
                Some(Ok(Message::Close(f))) => {
                    let why = f.map(|f| format!("{} {}", u16::from(f.code), f.reason)).unwrap_or_default();
                    return Err(ClientError::Control(format!("publisher connection closed: {why}")));
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
