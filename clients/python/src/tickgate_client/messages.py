"""Control messages from the server (protocol §4-§11, v1.1 §6a) as frozen dataclasses.

:func:`parse_message` turns one text frame into one of them; a frame that is not a JSON
object with a string ``type``, or a known message with a missing or wrongly typed field,
raises :class:`~tickgate_client.errors.ProtocolError`. A message of a type this client
does not know becomes :class:`UnknownMessage` (newer servers may add some).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import ProtocolError

__all__ = [
    "FeedInfo",
    "Instrument",
    "Welcome",
    "Subscribed",
    "Throttled",
    "Unsubscribed",
    "Gap",
    "Reset",
    "TokenExpiring",
    "Refreshed",
    "Pong",
    "ErrorReply",
    "Shutdown",
    "UnknownMessage",
    "Message",
    "parse_message",
]


@dataclass(frozen=True, slots=True)
class FeedInfo:
    """A feed the token may read: ``id`` appears in records, ``epoch`` numbers its seqs."""

    name: str
    id: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Instrument:
    """One instrument of a ``subscribed`` reply: live records start at ``seq + 1``."""

    symbol: str
    id: int
    seq: int


@dataclass(frozen=True, slots=True)
class Welcome:
    """The server's first message (§4)."""

    protocol: int
    session: str
    sub: str
    exp: int
    heartbeat_ms: int
    feeds: tuple[FeedInfo, ...]

    def feed(self, name: str) -> FeedInfo | None:
        return next((f for f in self.feeds if f.name == name), None)


@dataclass(frozen=True, slots=True)
class Subscribed:
    """Reply to ``subscribe`` (§6). ``max_rate`` (v1.1, §6a) echoes the request's
    ``max_rate`` (updates per second per instrument, 0: not throttled); None when it gave none."""

    id: int | None
    feed: str
    epoch: int
    instruments: tuple[Instrument, ...]
    max_rate: float | None = None


@dataclass(frozen=True, slots=True)
class Throttled:
    """Reply to ``throttle`` (v1.1, §6a). ``feed``, ``symbols`` and ``max_rate`` are set when the
    request changed the rate of live subscriptions (``symbols`` lists the instruments it applied
    to: for ``["*"]``, every subscribed instrument of the feed); ``max_bytes_per_s`` when it set
    the connection's bandwidth cap (0: no cap). The fields a request did not give are None."""

    id: int | None
    feed: str | None = None
    symbols: tuple[str, ...] | None = None
    max_rate: float | None = None
    max_bytes_per_s: int | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """Reply to ``unsubscribe`` (reason ``request``), or sent after a refresh that lost a
    feed's scope (reason ``scope_revoked``, no id)."""

    id: int | None
    feed: str
    symbols: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Gap:
    """Seqs ``from_seq..=to_seq`` of ``symbol`` will not be delivered (§6, §9, §11).
    ``reason``: ``replay_unavailable``, ``slow_consumer``, ``source_gap`` or (v1.1, §6a)
    ``throttled``: trades past ``limits.max_trades_per_update`` in one interval of a throttled
    subscription. Every reason is handled the same way: ``expected = to_seq + 1``."""

    feed: str
    symbol: str
    from_seq: int
    to_seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class Reset:
    """The feed's numbering restarted at ``epoch`` (§9): every instrument expects seq 1.
    ``on_reconnect`` is True when the client saw the new epoch in a new connection's
    ``welcome`` (a restarted server) rather than in a ``reset`` message."""

    feed: str
    epoch: int
    on_reconnect: bool = False


@dataclass(frozen=True, slots=True)
class TokenExpiring:
    """Refresh now: the token expires at ``exp`` (seconds, §10a)."""

    exp: int


@dataclass(frozen=True, slots=True)
class Refreshed:
    """A ``refresh`` was accepted (§10): ``exp`` is the connection's new deadline."""

    id: int | None
    exp: int
    feeds: tuple[FeedInfo, ...]


@dataclass(frozen=True, slots=True)
class Pong:
    """Reply to ``ping``; ``ts`` is the server clock in ns."""

    id: int | None
    ts: int


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An ``error`` (§13); :class:`~tickgate_client.errors.ControlError` carries the same."""

    id: int | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The server is going away; reconnect after ``reconnect_after_ms`` (§11). A close 1001 follows."""

    reconnect_after_ms: int | None


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A message type this client does not know; ``data`` is the parsed JSON object."""

    type: str
    data: dict = field(compare=False)


Message = Union[
    Welcome, Subscribed, Throttled, Unsubscribed, Gap, Reset, TokenExpiring, Refreshed, Pong, ErrorReply, Shutdown,
    UnknownMessage,
]


def _get(obj: dict, key: str, kind, optional: bool = False) -> Any:
    v = obj.get(key)
    if v is None:
        if optional:
            return None
        raise ProtocolError(f"{obj.get('type')!s} message without {key!r}")
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if not ok:
        raise ProtocolError(f"{obj.get('type')!s} message: {key!r} has the wrong type ({type(v).__name__})")
    return v


def _rate(obj: dict, key: str) -> float | None:
    """An optional JSON number (``max_rate``), as a float."""
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError(f"{obj.get('type')!s} message: {key!r} has the wrong type ({type(v).__name__})")
    return float(v)


def _symbols(obj: dict) -> tuple[str, ...]:
    syms = _get(obj, "symbols", list)
    if not all(isinstance(s, str) for s in syms):
        raise ProtocolError(f"{obj.get('type')!s} message: a symbol is not a string")
    return tuple(syms)


def _feeds(obj: dict) -> tuple[FeedInfo, ...]:
    out = []
    for f in _get(obj, "feeds", list):
        if not isinstance(f, dict):
            raise ProtocolError(f"{obj.get('type')} message: a feed entry is not an object")
        out.append(FeedInfo(_get(f, "name", str), _get(f, "id", int), _get(f, "epoch", int)))
    return tuple(out)


def parse_message(text: str | bytes) -> Message:
    """Parses one control message (a text frame)."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"control message is not JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("control message is not a JSON object with a string 'type'")
    t = obj["type"]
    mid = _get(obj, "id", int, optional=True)
    if t == "welcome":
        return Welcome(
            _get(obj, "protocol", int),
            _get(obj, "session", str, optional=True) or "",
            _get(obj, "sub", str, optional=True) or "",
            _get(obj, "exp", int, optional=True) or 0,
            _get(obj, "heartbeat_ms", int, optional=True) or 0,
            _feeds(obj),
        )
    if t == "subscribed":
        ins = []
        for i in _get(obj, "instruments", list):
            if not isinstance(i, dict):
                raise ProtocolError("subscribed message: an instrument entry is not an object")
            ins.append(Instrument(_get(i, "symbol", str), _get(i, "id", int), _get(i, "seq", int)))
        return Subscribed(mid, _get(obj, "feed", str), _get(obj, "epoch", int), tuple(ins), _rate(obj, "max_rate"))
    if t == "throttled":
        return Throttled(
            mid,
            _get(obj, "feed", str, optional=True),
            _symbols(obj) if obj.get("symbols") is not None else None,
            _rate(obj, "max_rate"),
            _get(obj, "max_bytes_per_s", int, optional=True),
        )
    if t == "unsubscribed":
        return Unsubscribed(mid, _get(obj, "feed", str), _symbols(obj), _get(obj, "reason", str, optional=True) or "")
    if t == "gap":
        return Gap(
            _get(obj, "feed", str), _get(obj, "symbol", str), _get(obj, "from", int), _get(obj, "to", int),
            _get(obj, "reason", str, optional=True) or "",
        )
    if t == "reset":
        return Reset(_get(obj, "feed", str), _get(obj, "epoch", int))
    if t == "token_expiring":
        return TokenExpiring(_get(obj, "exp", int))
    if t == "refreshed":
        return Refreshed(mid, _get(obj, "exp", int), _feeds(obj) if obj.get("feeds") is not None else ())
    if t == "pong":
        return Pong(mid, _get(obj, "ts", int, optional=True) or 0)
    if t == "error":
        return ErrorReply(mid, _get(obj, "code", str), _get(obj, "message", str, optional=True) or "")
    if t == "shutdown":
        return Shutdown(_get(obj, "reconnect_after_ms", int, optional=True))
    return UnknownMessage(t, obj)
