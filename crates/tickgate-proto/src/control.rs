//! Control messages (spec §4): JSON text frames in both directions. Both message types
//! parse and serialise: [`ClientMsg`] (parsed by the server with [`parse_client_msg`],
//! written by clients with [`ClientMsg::to_json`]) and [`ServerMsg`] (written by the
//! server with [`ServerMsg::to_json`], parsed by clients with serde). Also here:
//! [`SecretString`] (a token whose `Debug` is redacted), [`ErrorCode`], [`FeedInfo`],
//! [`InstrumentInfo`] and [`ParseError`].
//!
//! Parsing is two-step on purpose: the frame is first read as a generic JSON value so the
//! optional `id` can be echoed even in the error reply to a malformed message, then it is
//! read into the typed [`ClientMsg`]. Control traffic is rare next to data, so the extra
//! step costs nothing that matters.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A token carried in a control message. Its `Debug` output is redacted so a token can
/// never reach a log line by accident.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretString(pub String);

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0.len())
    }
}

/// A message from the client. Serialising it gives exactly the JSON the server parses:
/// absent optional fields are left out (as a client writing by hand would), which the
/// parser reads as their defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Subscribe to instruments of a feed.
    Subscribe {
        /// Echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<i64>,
        /// Feed name.
        feed: String,
        /// Symbols, or `["*"]` for every instrument of the feed.
        symbols: Vec<String>,
        /// Send the last trade and quote first.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        snapshot: bool,
        /// Replay from the resume buffer: symbol → last seq seen.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<BTreeMap<String, u64>>,
        /// Extension: the epoch the `resume` seqs belong to. When it is not the feed's
        /// current epoch the seqs are ignored and those instruments get a snapshot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
        /// Protocol v1.1: at most this many updates per second per instrument (a
        /// throttled subscription: the latest quote and the trades since the last update).
        /// Given, it applies to every listed instrument, already subscribed ones too (0:
        /// not throttled); absent, new instruments are not throttled and subscribed ones
        /// keep theirs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_rate: Option<MaxRate>,
    },
    /// Protocol v1.1: change the throttle of subscribed instruments (`feed`, `symbols`,
    /// `max_rate`; 0 lifts it) and/or the connection's bandwidth cap (`max_bytes_per_s`;
    /// 0 lifts it). Answered with `throttled`.
    Throttle {
        /// Echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<i64>,
        /// Feed of `symbols`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        feed: Option<String>,
        /// Subscribed symbols of `feed`, or `["*"]` for all of them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        symbols: Option<Vec<String>>,
        /// Updates per second per instrument (0: not throttled).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_rate: Option<MaxRate>,
        /// Bytes per second the connection is written at most (0: no cap).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bytes_per_s: Option<u64>,
    },
    /// Stop receiving instruments.
    Unsubscribe {
        /// Echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<i64>,
        /// Feed name.
        feed: String,
        /// Symbols, or `["*"]` for all of the feed.
        symbols: Vec<String>,
    },
    /// Replace the connection's token in-band.
    Refresh {
        /// Echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<i64>,
        /// The new access token.
        token: SecretString,
    },
    /// Application-level ping; answered with `pong`.
    Ping {
        /// Echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<i64>,
    },
    /// In-band authentication (first message when the handshake carried no credential).
    Auth {
        /// The access token.
        token: SecretString,
    },
}

impl ClientMsg {
    /// Serialises to the JSON text sent on the wire; [`parse_client_msg`] reads it back
    /// as the same message.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail (string map keys, no fallible
        // Serialize impls). Fall back to a ping rather than panic.
        serde_json::to_string(self).unwrap_or_else(|_| r#"{"op":"ping"}"#.to_owned())
    }
}

/// Updates per second per instrument of a throttled subscription (`max_rate`, protocol
/// v1.1): a JSON number, whose range the server checks (0 means "not throttled").
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MaxRate(pub f64);

// A JSON number is never NaN, so equality of parsed rates is reflexive.
impl Eq for MaxRate {}

/// Why a control message was refused at parse time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The `id` of the message, when it could be read.
    pub id: Option<i64>,
    /// Human-readable reason, sent back in `error.message`.
    pub message: String,
}

/// Parses one control text frame.
pub fn parse_client_msg(text: &str) -> Result<ClientMsg, ParseError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ParseError { id: None, message: format!("malformed JSON: {e}") })?;
    let obj = value
        .as_object()
        .ok_or_else(|| ParseError { id: None, message: "a control message must be a JSON object".to_owned() })?;
    let id = obj.get("id").and_then(serde_json::Value::as_i64);
    if obj.get("id").is_some_and(|v| !v.is_null() && v.as_i64().is_none()) {
        return Err(ParseError { id: None, message: "`id` must be an integer".to_owned() });
    }
    match obj.get("op").and_then(serde_json::Value::as_str) {
        None => return Err(ParseError { id, message: "missing string field `op`".to_owned() }),
        Some("subscribe" | "unsubscribe" | "refresh" | "ping" | "auth" | "throttle") => {}
        Some(other) => return Err(ParseError { id, message: format!("unknown op `{}`", truncate(other, 32)) }),
    }
    serde_json::from_value(value).map_err(|e| ParseError { id, message: format!("invalid message: {e}") })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A feed as listed in `welcome` and `refreshed`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FeedInfo {
    /// Feed name.
    pub name: String,
    /// Numeric id used in records.
    pub id: u16,
    /// Current epoch of the feed's numbering.
    pub epoch: u64,
}

/// An instrument as listed in `subscribed`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstrumentInfo {
    /// Symbol.
    pub symbol: String,
    /// Numeric id used in records.
    pub id: u32,
    /// The last seq published for the instrument when the subscription took effect; live
    /// records continue at `seq + 1`.
    pub seq: u64,
}

/// Error codes of spec §4.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed or invalid control message.
    BadRequest,
    /// No such feed.
    UnknownFeed,
    /// No such symbol in the feed.
    UnknownSymbol,
    /// The token does not entitle the feed.
    InsufficientScope,
    /// A refreshed or in-band token was refused.
    InvalidToken,
    /// Too many control messages.
    RateLimited,
    /// A configured limit (subscriptions per connection, ...) would be exceeded.
    LimitExceeded,
    /// Publish endpoint: a batch was refused (the message names the record and rule).
    BadRecord,
}

impl ErrorCode {
    /// The wire spelling, also used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownFeed => "unknown_feed",
            ErrorCode::UnknownSymbol => "unknown_symbol",
            ErrorCode::InsufficientScope => "insufficient_scope",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::BadRecord => "bad_record",
        }
    }
}

/// A message from the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// First message after the upgrade.
    Welcome {
        /// Protocol version (1).
        protocol: u32,
        /// Session id, for support and logs.
        session: String,
        /// Token subject.
        sub: String,
        /// Token expiry (seconds since the epoch).
        exp: u64,
        /// Interval of WebSocket pings.
        heartbeat_ms: u64,
        /// Feeds the token entitles.
        feeds: Vec<FeedInfo>,
    },
    /// Reply to `subscribe`.
    Subscribed {
        /// Echo of the request id.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<i64>,
        /// Feed name.
        feed: String,
        /// Feed epoch.
        epoch: u64,
        /// The instruments now subscribed.
        instruments: Vec<InstrumentInfo>,
        /// Protocol v1.1: the `max_rate` of the request, when it gave one.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        max_rate: Option<MaxRate>,
    },
    /// Protocol v1.1: reply to `throttle`, with what was applied.
    Throttled {
        /// Echo of the request id.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<i64>,
        /// Feed of `symbols`, when the request named one.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        feed: Option<String>,
        /// The instruments whose throttle changed.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        symbols: Option<Vec<String>>,
        /// Their updates per second (0: not throttled).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        max_rate: Option<MaxRate>,
        /// The connection's bandwidth cap (0: none), when the request set it.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        max_bytes_per_s: Option<u64>,
    },
    /// Reply to `unsubscribe`, or notice of a scope loss.
    Unsubscribed {
        /// Echo of the request id.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<i64>,
        /// Feed name.
        feed: String,
        /// Symbols no longer subscribed.
        symbols: Vec<String>,
        /// `request` or `scope_revoked`.
        reason: String,
    },
    /// Reply to a successful `refresh`.
    Refreshed {
        /// Echo of the request id.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<i64>,
        /// New expiry.
        exp: u64,
        /// Feeds the new token entitles.
        feeds: Vec<FeedInfo>,
    },
    /// The token is nearing its expiry.
    TokenExpiring {
        /// Expiry (seconds since the epoch).
        exp: u64,
    },
    /// Records `from..=to` of an instrument will not be delivered.
    Gap {
        /// Feed name.
        feed: String,
        /// Symbol.
        symbol: String,
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
        /// Why.
        reason: String,
    },
    /// The feed restarted its numbering.
    Reset {
        /// Feed name.
        feed: String,
        /// New epoch.
        epoch: u64,
    },
    /// The server is shutting down; reconnect after the given delay.
    Shutdown {
        /// Suggested reconnect delay (jittered per connection).
        reconnect_after_ms: u64,
    },
    /// Reply to `ping`.
    Pong {
        /// Echo of the request id.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<i64>,
        /// Server wall clock (ns since the epoch).
        ts: u64,
    },
    /// A request was refused.
    Error {
        /// Echo of the request id.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<i64>,
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
}

impl ServerMsg {
    /// Serializes to the JSON text sent on the wire.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: no maps with non-string keys, no
        // fallible Serialize impls. Fall back to a fixed error text rather than panic.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"bad_request","message":"internal encoding error"}"#.to_owned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spec_examples() {
        let m = parse_client_msg(
            r#"{"op":"subscribe","id":1,"feed":"XNAS","symbols":["AAPL","MSFT"],"snapshot":true,"resume":{"AAPL":1234}}"#,
        )
        .expect("valid");
        match m {
            ClientMsg::Subscribe { id, feed, symbols, snapshot, resume, epoch, max_rate } => {
                assert_eq!((epoch, max_rate), (None, None));
                assert_eq!(id, Some(1));
                assert_eq!(feed, "XNAS");
                assert_eq!(symbols, vec!["AAPL", "MSFT"]);
                assert!(snapshot);
                assert_eq!(resume.and_then(|r| r.get("AAPL").copied()), Some(1234));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(parse_client_msg(r#"{"op":"ping","id":4}"#), Ok(ClientMsg::Ping { id: Some(4) }));
    }

    #[test]
    fn errors_keep_the_id() {
        let e = parse_client_msg(r#"{"op":"bogus","id":9}"#).unwrap_err();
        assert_eq!(e.id, Some(9));
        assert!(e.message.contains("unknown op"));
        let e = parse_client_msg(r#"{"op":"subscribe","id":3}"#).unwrap_err();
        assert_eq!(e.id, Some(3));
        assert!(e.message.contains("feed"), "{}", e.message);
        let e = parse_client_msg("{not json").unwrap_err();
        assert!(e.message.starts_with("malformed JSON"));
        let e = parse_client_msg("[1,2]").unwrap_err();
        assert!(e.message.contains("object"));
        let e = parse_client_msg(r#"{"op":"ping","id":"x"}"#).unwrap_err();
        assert!(e.message.contains("id"));
    }

    #[test]
    fn token_is_redacted_in_debug() {
        let m = parse_client_msg(r#"{"op":"auth","token":"eyJsecret.payload.sig"}"#).expect("ok");
        let dbg = format!("{m:?}");
        assert!(!dbg.contains("eyJsecret"), "{dbg}");
    }

    #[test]
    fn server_messages_match_spec_shape() {
        let m = ServerMsg::Pong { id: Some(4), ts: 5 };
        assert_eq!(m.to_json(), r#"{"type":"pong","id":4,"ts":5}"#);
        let m = ServerMsg::Error { id: None, code: ErrorCode::InsufficientScope, message: "x".into() };
        assert_eq!(m.to_json(), r#"{"type":"error","code":"insufficient_scope","message":"x"}"#);
        let m = ServerMsg::TokenExpiring { exp: 7 };
        assert_eq!(m.to_json(), r#"{"type":"token_expiring","exp":7}"#);
    }

    /// Every client message variant, serialised, is what the server parses back, and the
    /// JSON is the spec's spelling.
    #[test]
    fn client_messages_round_trip() {
        let token = || SecretString("eyJ.a.b".into());
        let resume: BTreeMap<String, u64> = [("AAPL".to_owned(), 12)].into_iter().collect();
        let cases = [
            (
                ClientMsg::Subscribe {
                    id: Some(1),
                    feed: "XNAS".into(),
                    symbols: vec!["AAPL".into(), "MSFT".into()],
                    snapshot: true,
                    resume: Some(resume),
                    epoch: Some(3),
                    max_rate: Some(MaxRate(2.5)),
                },
                r#"{"op":"subscribe","id":1,"feed":"XNAS","symbols":["AAPL","MSFT"],"snapshot":true,"resume":{"AAPL":12},"epoch":3,"max_rate":2.5}"#,
            ),
            (
                ClientMsg::Subscribe {
                    id: None,
                    feed: "F".into(),
                    symbols: vec!["*".into()],
                    snapshot: false,
                    resume: None,
                    epoch: None,
                    max_rate: None,
                },
                r#"{"op":"subscribe","feed":"F","symbols":["*"]}"#,
            ),
            (
                ClientMsg::Throttle {
                    id: Some(5),
                    feed: Some("F".into()),
                    symbols: Some(vec!["A".into()]),
                    max_rate: Some(MaxRate(20.0)),
                    max_bytes_per_s: None,
                },
                r#"{"op":"throttle","id":5,"feed":"F","symbols":["A"],"max_rate":20.0}"#,
            ),
            (
                ClientMsg::Throttle {
                    id: None,
                    feed: None,
                    symbols: None,
                    max_rate: None,
                    max_bytes_per_s: Some(65536),
                },
                r#"{"op":"throttle","max_bytes_per_s":65536}"#,
            ),
            (
                ClientMsg::Unsubscribe { id: Some(2), feed: "F".into(), symbols: vec!["A".into()] },
                r#"{"op":"unsubscribe","id":2,"feed":"F","symbols":["A"]}"#,
            ),
            (ClientMsg::Refresh { id: Some(101), token: token() }, r#"{"op":"refresh","id":101,"token":"eyJ.a.b"}"#),
            (ClientMsg::Refresh { id: None, token: token() }, r#"{"op":"refresh","token":"eyJ.a.b"}"#),
            (ClientMsg::Ping { id: Some(4) }, r#"{"op":"ping","id":4}"#),
            (ClientMsg::Ping { id: None }, r#"{"op":"ping"}"#),
            (ClientMsg::Auth { token: token() }, r#"{"op":"auth","token":"eyJ.a.b"}"#),
        ];
        for (msg, json) in cases {
            assert_eq!(msg.to_json(), json);
            assert_eq!(parse_client_msg(json), Ok(msg));
        }
    }

    /// Server messages read back as written, for the variants a client acts on.
    #[test]
    fn server_messages_round_trip() {
        let feeds = vec![FeedInfo { name: "F".into(), id: 1, epoch: 2 }];
        let cases = [
            ServerMsg::Welcome {
                protocol: 1,
                session: "s".into(),
                sub: "u".into(),
                exp: 9,
                heartbeat_ms: 10,
                feeds: feeds.clone(),
            },
            ServerMsg::Subscribed {
                id: Some(1),
                feed: "F".into(),
                epoch: 2,
                instruments: vec![InstrumentInfo { symbol: "A".into(), id: 1, seq: 5 }],
                max_rate: Some(MaxRate(20.0)),
            },
            ServerMsg::Throttled {
                id: Some(2),
                feed: Some("F".into()),
                symbols: Some(vec!["A".into()]),
                max_rate: Some(MaxRate(0.5)),
                max_bytes_per_s: Some(1 << 20),
            },
            ServerMsg::Unsubscribed { id: None, feed: "F".into(), symbols: vec!["A".into()], reason: "request".into() },
            ServerMsg::Refreshed { id: Some(101), exp: 9, feeds },
            ServerMsg::TokenExpiring { exp: 9 },
            ServerMsg::Gap { feed: "F".into(), symbol: "A".into(), from: 1, to: 2, reason: "source_gap".into() },
            ServerMsg::Reset { feed: "F".into(), epoch: 3 },
            ServerMsg::Shutdown { reconnect_after_ms: 100 },
            ServerMsg::Pong { id: None, ts: 1 },
            ServerMsg::Error { id: Some(101), code: ErrorCode::InvalidToken, message: "m".into() },
        ];
        for m in cases {
            let back: ServerMsg = serde_json::from_str(&m.to_json()).expect("reads back");
            assert_eq!(back, m);
        }
    }
}
