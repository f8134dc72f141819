"""tickgate-client: an asyncio client for the tickgate market-data WebSocket server.

* tokens: :func:`fetch_token`, :func:`client_credentials`, :func:`fetch_ticket`;
* one connection: :func:`connect` → :class:`Connection` (subscribe, resume, refresh, ping,
  throttle: protocol v1.1 throttled subscriptions);
* records: :func:`decode_batch` (numpy) and :func:`decode_batch_records` (dataclasses);
* delivery checking: :class:`SeqTracker` (protocol §9);
* everything together: :class:`Stream` (refresh, reconnect with resume).
"""

from .auth import ClientCredentials, TokenInfo, client_credentials, fetch_ticket, fetch_token, fetch_token_info
from .connection import SUBPROTOCOL, Connection, connect
from .errors import (
    ConnectFailed,
    ControlError,
    DecodeError,
    HandshakeRefused,
    HttpError,
    ProtocolError,
    SequenceViolation,
    ServerShutdown,
    SlowConsumer,
    StreamClosed,
    TicketError,
    TickgateError,
    TokenError,
    TokenExpired,
    TokenRevoked,
)
from .messages import (
    ErrorReply,
    FeedInfo,
    Gap,
    Instrument,
    Pong,
    Refreshed,
    Reset,
    Shutdown,
    Subscribed,
    Throttled,
    TokenExpiring,
    UnknownMessage,
    Unsubscribed,
    Welcome,
    parse_message,
)
from .records import (
    FLAG_CONFLATED,
    FLAG_REPLAY,
    FLAG_SNAPSHOT,
    QUOTE_DTYPE,
    SCALE,
    TRADE_DTYPE,
    Batch,
    Quote,
    Trade,
    decode_batch,
    decode_batch_records,
    encode_batch,
    to_float,
)
from .stream import Connected, Disconnected, RefreshFailed, Stream, StreamStats
from .tracker import SeqTracker, Violation

__version__ = "0.1.0"

__all__ = [
    "Batch", "ClientCredentials", "ConnectFailed", "Connected", "Connection", "ControlError", "DecodeError",
    "Disconnected", "ErrorReply", "FLAG_CONFLATED", "FLAG_REPLAY", "FLAG_SNAPSHOT", "FeedInfo", "Gap",
    "HandshakeRefused", "HttpError", "Instrument", "Pong", "ProtocolError", "QUOTE_DTYPE", "Quote", "RefreshFailed",
    "Refreshed", "Reset", "SCALE", "SUBPROTOCOL", "SeqTracker", "SequenceViolation", "ServerShutdown", "Shutdown",
    "SlowConsumer", "Stream", "StreamClosed", "StreamStats", "Subscribed", "TRADE_DTYPE", "Throttled", "TicketError",
    "TickgateError", "TokenError", "TokenExpired", "TokenExpiring", "TokenInfo", "TokenRevoked", "Trade",
    "UnknownMessage", "Unsubscribed", "Violation", "Welcome", "client_credentials", "connect", "decode_batch",
    "decode_batch_records", "encode_batch", "fetch_ticket", "fetch_token", "fetch_token_info", "parse_message",
    "to_float",
]
