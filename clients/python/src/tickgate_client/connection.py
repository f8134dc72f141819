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
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
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
from .messages import ErrorReply, Message, Shutdown, Welcome, parse_message
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
        id: int | None = None,
    ) -> int:
        """Sends ``subscribe`` (§6) and returns its id. ``resume`` maps symbols to the last
        seq held; ``epoch`` (always send it with ``resume``) the epoch those seqs belong to."""
        id = self.next_id() if id is None else id
        msg: dict[str, Any] = {"op": "subscribe", "id": id, "feed": feed, "symbols": list(symbols), "snapshot": snapshot}
        if resume:
            msg["resume"] = dict(resume)
            if epoch is not None:
                msg["epoch"] = epoch
        await self.send(msg)
        return id

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

    async def recv_raw(self) -> Message | Batch:
        """The next message: a control message or a batch, ``error`` replies included."""
        try:
            data = await self.ws.recv()
        except ConnectionClosed as e:
            raise self._closed_error(e) from None
        if isinstance(data, str):
            msg = parse_message(data)
            if isinstance(msg, Shutdown):
                self._shutdown_after_ms = msg.reconnect_after_ms
            return msg
        return decode_batch(data)

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

