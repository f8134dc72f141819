"""One stream connection (protocol §3-§12) on ``websockets.asyncio.client``.

:func:`connect` opens ``GET /v1/stream`` offering the subprotocol ``tickgate.v1`` and the
credential in one of three ways (``auth``):

* ``"header"`` (default): ``Authorization: Bearer <JWT>``;
* ``"subprotocol"``: a second subprotocol entry ``bearer.<JWT>`` (the browser way);
* ``"ticket"``: ``?ticket=<ticket>``, fetched from ``POST /v1/ticket`` with the token
  (or given as ``ticket=``).

It waits for ``welcome`` and returns a :class:`Connection`. :meth:`Connection.recv`
returns control messages (:mod:`tickgate_client.messages`) and decoded batches
(:class:`~tickgate_client.records.Batch`); an ``error`` reply raises
:class:`~tickgate_client.errors.ControlError` (the connection stays usable) and the end
of the connection raises the typed :class:`~tickgate_client.errors.StreamClosed` for
its close code.

Throttled subscriptions (protocol v1.1, §6a): ``subscribe(..., max_rate=N)`` asks for at
most N updates per second per instrument; :meth:`Connection.throttle` changes the rate of
live subscriptions or caps the connection's bandwidth and waits for its ``throttled`` reply.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import json
import logging
import math
import re
import urllib.parse
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .auth import fetch_ticket
from .errors import (
    ConnectFailed,
    ControlError,
    HandshakeRefused,
    ProtocolError,
    StreamClosed,
    closed_error,
)
from .messages import ErrorReply, Message, Shutdown, Throttled, Welcome, parse_message
from .records import Batch, decode_batch

__all__ = ["SUBPROTOCOL", "Connection", "connect", "AUTH_MODES"]

SUBPROTOCOL = "tickgate.v1"
BEARER_PREFIX = "bearer."
AUTH_MODES = ("header", "subprotocol", "ticket")

_CONNECT_PARAMS = set(inspect.signature(ws_connect.__init__).parameters)

_SECRETS = re.compile(r"(?i)(bearer[ .])[\w.~+/=-]+|(ticket=)[^&\s]+")


class _Redact(logging.Filter):
    """websockets logs the handshake (request line and headers) at DEBUG level: the
    token and the ticket in it are replaced, so enabling debug logs never leaks one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(_SECRETS.sub(_mask, a) if isinstance(a, str) else a for a in args)
        if isinstance(record.msg, str):
            record.msg = _SECRETS.sub(_mask, record.msg)
        return True


def _mask(m: re.Match) -> str:
    return (m.group(1) or m.group(2)) + "<redacted>"


#: The logger handed to websockets (a child of ``tickgate_client``), with :class:`_Redact`.
ws_logger = logging.getLogger("tickgate_client.websockets")
ws_logger.addFilter(_Redact())


def _number(name: str, v: Any) -> float:
    """A number for a JSON field: a finite int or float (the server checks the range)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite")
    return v


def _refusal(e: InvalidStatus) -> HandshakeRefused:
    resp = e.response
    status = resp.status_code
    raw = resp.body or b""
    body = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    error = description = None
    if isinstance(obj, dict):
        error = obj.get("error") if isinstance(obj.get("error"), str) else None
        description = obj.get("error_description") if isinstance(obj.get("error_description"), str) else None
    if error is None:
        error = resp.reason_phrase or str(status)
    if description is None:
        description = body.strip() if obj is None and len(body) <= 200 else ""
    retry_after = None
    ra = resp.headers.get("Retry-After") if resp.headers is not None else None
    if ra is not None:
        try:
            retry_after = float(ra)
        except ValueError:
            retry_after = None
    return HandshakeRefused(status, error, description, body, retry_after)


class Connection:
    """An open stream connection. Use :func:`connect` to make one."""

    def __init__(self, ws: ClientConnection, welcome: Welcome):
        self.ws = ws
        #: The server's ``welcome`` (session, sub, exp, heartbeat, feeds with ids and epochs).
        self.welcome = welcome
        self._ids = itertools.count(1)
        self._shutdown_after_ms: int | None = None
        self._closed: StreamClosed | None = None
        # Requests that wait for their reply (throttle): id -> future of the reply. One task
        # reads the socket at a time (_read_lock); what a waiting request read for others is
        # kept in _backlog, in order, for the next recv.
        self._waiters: dict[int, asyncio.Future] = {}
        self._backlog: collections.deque = collections.deque()
        self._read_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<Connection session={self.welcome.session!r} sub={self.welcome.sub!r}>"

    @property
    def session(self) -> str:
        return self.welcome.session

    def next_id(self) -> int:
        return next(self._ids)

    # -- sending ---------------------------------------------------------------------

    async def send(self, msg: dict[str, Any]) -> None:
        """Sends one control message (a JSON object)."""
        try:
            await self.ws.send(json.dumps(msg, separators=(",", ":")))
        except ConnectionClosed as e:
            raise self._closed_error(e) from None

    async def subscribe(
        self,
        feed: str,
        symbols: list[str],
        *,
        snapshot: bool = False,
        resume: dict[str, int] | None = None,
        epoch: int | None = None,
        max_rate: float | None = None,
        id: int | None = None,
    ) -> int:
        """Sends ``subscribe`` (§6) and returns its id. ``resume`` maps symbols to the last
        seq held; ``epoch`` (always send it with ``resume``) the epoch those seqs belong to.
        ``max_rate`` (v1.1, §6a): at most that many updates per second per instrument, for
        every listed instrument (0: not throttled; the server takes 0 or 0.01..=1000 and
        answers anything else with ``error`` ``bad_request``); None leaves rates as they are."""
        id = self.next_id() if id is None else id
        msg: dict[str, Any] = {"op": "subscribe", "id": id, "feed": feed, "symbols": list(symbols), "snapshot": snapshot}
        if resume:
            msg["resume"] = dict(resume)
            if epoch is not None:
                msg["epoch"] = epoch
        if max_rate is not None:
            msg["max_rate"] = _number("max_rate", max_rate)
        await self.send(msg)
        return id

    async def throttle(
        self,
        feed: str | None = None,
        symbols: list[str] | None = None,
        max_rate: float | None = None,
        max_bytes_per_s: int | None = None,
        *,
        id: int | None = None,
        timeout: float = 30.0,
    ) -> Throttled:
        """Sends ``throttle`` (v1.1, §6a) and returns its ``throttled`` reply.

        ``feed`` + ``symbols`` (or ``["*"]``: every subscribed instrument of the feed) +
        ``max_rate`` change the rate of live subscriptions (0 lifts the throttle);
        ``max_bytes_per_s`` caps the connection's bandwidth (0: no cap, else 1024..=2**40).
        Either part or both. A refusal raises :class:`ControlError` (``bad_request`` for a
        missing part, a value out of range or a symbol not subscribed; ``unknown_feed``,
        ``unknown_symbol``); nothing is applied then. No reply within ``timeout`` seconds
        raises :class:`asyncio.TimeoutError`.

        Another task may be iterating the connection meanwhile: the reply reaches this call
        either way, and the ``throttled`` message is also returned by :meth:`recv` in its place
        in the stream (an ``error`` reply only raises here)."""
        id = self.next_id() if id is None else id
        msg: dict[str, Any] = {"op": "throttle", "id": id}
        if feed is not None:
            msg["feed"] = feed
        if symbols is not None:
            if isinstance(symbols, str) or not all(isinstance(x, str) for x in symbols):
                raise TypeError("throttle: symbols must be a list of strings")
            msg["symbols"] = list(symbols)
        if max_rate is not None:
            msg["max_rate"] = _number("max_rate", max_rate)
        if max_bytes_per_s is not None:
            if isinstance(max_bytes_per_s, bool) or not isinstance(max_bytes_per_s, int):
                raise TypeError("throttle: max_bytes_per_s must be an int")
            msg["max_bytes_per_s"] = max_bytes_per_s
        reply = await self._request(id, msg, timeout)
        if isinstance(reply, ErrorReply):
            raise ControlError(reply.code, reply.message, reply.id)
        if not isinstance(reply, Throttled):
            raise ProtocolError(f"throttle (id {id}) was answered with {type(reply).__name__}")
        return reply

    async def _request(self, id: int, msg: dict[str, Any], timeout: float) -> Message:
        """Sends ``msg`` and waits for the message carrying its ``id``: read by another task
        that iterates the connection, or by this one (keeping what it reads for ``recv``)."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters[id] = fut

        async def drive() -> None:
            while not fut.done():
                async with self._read_lock:
                    if fut.done():
                        return
                    m = await self._read_one()
                    if m is not None:
                        self._backlog.append(m)

        driver: asyncio.Task | None = None
        try:
            await self.send(msg)
            driver = asyncio.ensure_future(drive())
            done, _ = await asyncio.wait({fut, driver}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if fut.done():
                return fut.result()
            if driver in done:
                driver.result()  # the connection ended: raises its StreamClosed
            raise asyncio.TimeoutError(f"no reply to {msg['op']} (id {id}) within {timeout} s")
        finally:
            self._waiters.pop(id, None)
            if driver is not None and not driver.done():
                driver.cancel()  # websockets' recv can be cancelled without losing a message
                try:
                    await driver
                except (asyncio.CancelledError, StreamClosed):
                    pass

    async def unsubscribe(self, feed: str, symbols: list[str], *, id: int | None = None) -> int:
        """Sends ``unsubscribe`` (§7) and returns its id."""
        id = self.next_id() if id is None else id
        await self.send({"op": "unsubscribe", "id": id, "feed": feed, "symbols": list(symbols)})
        return id

    async def refresh(self, token: str, *, id: int | None = None) -> int:
        """Sends ``refresh`` (§10) with a new token and returns its id."""
        id = self.next_id() if id is None else id
        await self.send({"op": "refresh", "id": id, "token": token})
        return id

    async def ping(self, *, id: int | None = None) -> int:
        """Sends the application ``ping`` (answered by ``pong``) and returns its id."""
        id = self.next_id() if id is None else id
        await self.send({"op": "ping", "id": id})
        return id

    # -- receiving -------------------------------------------------------------------

    def _closed_error(self, e: ConnectionClosed) -> StreamClosed:
        if self._closed is None:
            rcvd = e.rcvd
            if rcvd is None:
                code, reason = 1006, "connection dropped without a close frame"
            else:
                code, reason = rcvd.code, rcvd.reason
            self._closed = closed_error(code, reason, self._shutdown_after_ms)
        return self._closed

    async def _read_one(self) -> Message | Batch | None:
        """Reads one message (the caller holds ``_read_lock``). A reply to a waiting request
        resolves it; an ``error`` reply to one is not returned (None): the request raises it."""
        try:
            data = await self.ws.recv()
        except ConnectionClosed as e:
            raise self._closed_error(e) from None
        if isinstance(data, str):
            msg = parse_message(data)
            if isinstance(msg, Shutdown):
                self._shutdown_after_ms = msg.reconnect_after_ms
            elif self._waiters:
                mid = getattr(msg, "id", None)
                fut = self._waiters.pop(mid, None) if isinstance(mid, int) else None
                if fut is not None:
                    if not fut.done():
                        fut.set_result(msg)
                    if isinstance(msg, ErrorReply):
                        return None
            return msg
        return decode_batch(data)

    async def recv_raw(self) -> Message | Batch:
        """The next message: a control message or a batch, ``error`` replies included (but
        not those that :meth:`throttle` raises)."""
        while True:
            if self._backlog:
                return self._backlog.popleft()
            async with self._read_lock:
                if self._backlog:
                    return self._backlog.popleft()
                msg = await self._read_one()
            if msg is not None:
                return msg

    async def recv(self) -> Message | Batch:
        """Like :meth:`recv_raw`, but an ``error`` reply raises :class:`ControlError`."""
        msg = await self.recv_raw()
        if isinstance(msg, ErrorReply):
            raise ControlError(msg.code, msg.message, msg.id)
        return msg

    def __aiter__(self):
        return self

    async def __anext__(self) -> Message | Batch:
        return await self.recv()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Closes the connection (normal closure by default)."""
        await self.ws.close(code, reason)

    async def __aenter__(self) -> "Connection":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def connect(
    url: str,
    token: str | None = None,
    *,
    auth: str = "header",
    ticket: str | None = None,
    open_timeout: float = 10.0,
    max_size: int = 4 * 1024 * 1024,
    **ws_options: Any,
) -> Connection:
    """Opens a stream connection and waits for ``welcome``.

    ``auth`` is ``"header"``, ``"subprotocol"`` or ``"ticket"`` (then ``ticket`` or, to
    fetch one, ``token``). Raises :class:`HandshakeRefused` for an HTTP refusal (with the
    server's ``error_description``), :class:`ConnectFailed` when there is no connection,
    :class:`StreamClosed` when the server closes before ``welcome``. ``ws_options`` go
    to ``websockets.asyncio.client.connect``.
    """
    if auth not in AUTH_MODES:
        raise ValueError(f"auth must be one of {AUTH_MODES}, not {auth!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ConnectFailed(f"bad stream URL {url!r}: it must be ws:// or wss://")
    subprotocols = [SUBPROTOCOL]
    headers: dict[str, str] = {}
    if auth == "ticket":
        if ticket is None:
            if not token:
                raise ValueError("auth='ticket' needs a ticket or a token to fetch one with")
            ticket = await fetch_ticket(url, token)
        query = parts.query + ("&" if parts.query else "") + "ticket=" + urllib.parse.quote(ticket, safe="")
        url = urllib.parse.urlunsplit(parts._replace(query=query))
    elif token:
        if auth == "header":
            headers["Authorization"] = f"Bearer {token}"
        else:
            subprotocols.append(BEARER_PREFIX + token)
    opts: dict[str, Any] = {
        "subprotocols": subprotocols,
        "additional_headers": headers,
        "open_timeout": open_timeout,
        "max_size": max_size,
        "compression": None,
        # The server pings (§10) and websockets answers; no client pings needed.
        "ping_interval": None,
        "logger": ws_logger,
    }
    host = parts.hostname or ""
    if "proxy" in _CONNECT_PARAMS and (host in ("localhost", "::1") or host.startswith("127.")):
        opts["proxy"] = None
    opts.update(ws_options)
    try:
        ws = await ws_connect(url, **opts)
    except InvalidStatus as e:
        raise _refusal(e) from None
    except InvalidURI:
        raise ConnectFailed(f"bad stream URL {parts.scheme}://{parts.netloc}{parts.path}") from None
    except (InvalidHandshake, OSError, asyncio.TimeoutError, TimeoutError) as e:
        raise ConnectFailed(f"cannot connect to {parts.scheme}://{parts.netloc}{parts.path}: {e!r}") from None
    conn = Connection(ws, Welcome(0, "", "", 0, 0, ()))
    try:
        first = await asyncio.wait_for(conn.recv_raw(), open_timeout)
    except asyncio.TimeoutError:
        await ws.close()
        raise ConnectFailed(f"no welcome within {open_timeout} s") from None
    except BaseException:
        await ws.close()
        raise
    if not isinstance(first, Welcome):
        await ws.close()
        raise ProtocolError(f"the server's first message is not welcome but {type(first).__name__}")
    conn.welcome = first
    return conn

