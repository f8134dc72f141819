"""The high-level client: :class:`Stream` keeps a subscription alive.

It connects, subscribes, checks every record with a :class:`~tickgate_client.SeqTracker`,
refreshes the token in band when the server says ``token_expiring`` (through the token
provider), and reconnects after the server goes away, the connection drops, this client
falls behind (4008) or the token expired (4001): it waits the ``shutdown`` message's
``reconnect_after_ms`` or a jittered exponential backoff, fetches a new token when the
handshake gets 401 (a restarted server signs with a new key), and subscribes again with
``resume`` + ``epoch`` from the last seq it holds, or with a snapshot when the feed's
epoch changed. It gives up on what reconnecting cannot fix: a revocation (4003), a
refused subscription (``ControlError``), a handshake refused for another reason than
401/429/503, a close for something this client sent, or a sequence violation in
``on_violation="raise"`` mode.
"""

from __future__ import annotations

import asyncio
import collections
import random
from dataclasses import dataclass
from typing import Any, AsyncIterator, Union

from .auth import TokenProvider, call_provider
from .connection import Connection, _number, connect
from .errors import (
    ConnectFailed,
    ControlError,
    HandshakeRefused,
    HttpError,
    ServerShutdown,
    SlowConsumer,
    StreamClosed,
    TicketError,
    TokenError,
    TokenExpired,
    TokenRevoked,
)
from .messages import (
    ErrorReply,
    Gap,
    Message,
    Refreshed,
    Reset,
    Subscribed,
    Throttled,
    TokenExpiring,
    Unsubscribed,
    Welcome,
)
from .records import Batch, Record
from .tracker import SeqTracker, Violation

__all__ = ["Stream", "StreamStats", "Connected", "Disconnected", "RefreshFailed", "Item", "backoff_delay"]


@dataclass(frozen=True, slots=True)
class Connected:
    """A connection is up (``reconnect`` is False for the first one)."""

    welcome: Welcome
    reconnect: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection ended or an attempt failed; the next attempt comes in ``delay_s``."""

    error: Exception
    delay_s: float


@dataclass(frozen=True, slots=True)
class RefreshFailed:
    """An in-band refresh did not succeed (the current token stays in force; it is retried)."""

    error: Exception


@dataclass(slots=True)
class StreamStats:
    """Counters of a :class:`Stream`."""

    records: int = 0
    batches: int = 0
    connects: int = 0
    reconnects: int = 0
    refreshes: int = 0
    refresh_failures: int = 0
    tokens_fetched: int = 0
    gaps: int = 0
    resets: int = 0
    violations: int = 0
    last_close: int | None = None


Item = Union[Batch, Record, Message, Connected, Disconnected, RefreshFailed, Violation]


def backoff_delay(attempt: int, initial_s: float, max_s: float, rnd: float | None = None) -> float:
    """Delay before reconnect attempt ``attempt`` (0 = first): a window of
    ``initial_s * 2**attempt`` (at most ``max_s``), drawn in its upper half, so clients that
    failed together do not retry together and the delay is never 0."""
    window = min(max_s, initial_s * (2 ** min(attempt, 30)))
    u = random.random() if rnd is None else rnd
    return window / 2 + window / 2 * u


class _Fatal(Exception):
    """Internal: an error the stream must not retry, wrapped."""


class Stream:
    """Subscribe and keep streaming (async iterator and async context manager).

    ``token`` is a string or a token provider (an async or plain callable returning a
    fresh token, e.g. :func:`~tickgate_client.client_credentials`); only a provider allows
    in-band refresh and new tokens on reconnect. Subscriptions: ``feed`` + ``symbols``,
    or ``subscriptions={"DEMO": ["AAPL", "MSFT"], ...}``.

    The iterator yields :class:`~tickgate_client.records.Batch` objects (numpy), or with
    ``records=True`` each :class:`~tickgate_client.Trade` / :class:`~tickgate_client.Quote`.
    With ``events=True`` (default) it also yields :class:`Connected`, :class:`Disconnected`,
    :class:`RefreshFailed`, the server's messages (``Subscribed``, ``Gap``, ``Reset``,
    ``Refreshed``, ``TokenExpiring``, ``Shutdown``, ``Unsubscribed``, ``Pong``, ``Throttled``)
    and, with ``on_violation="report"``, :class:`~tickgate_client.tracker.Violation` items.

    ``max_rate`` (protocol v1.1, §6a): every subscribe of the stream, after a reconnect too,
    asks for at most that many updates per second per instrument (None or 0: every record);
    :meth:`throttle` changes it on the live connection and for the reconnects to come.
    """

    def __init__(
        self,
        url: str,
        token: str | TokenProvider,
        *,
        feed: str | None = None,
        symbols: list[str] | None = None,
        subscriptions: dict[str, list[str]] | None = None,
        snapshot: bool = True,
        max_rate: float | None = None,
        auth: str = "header",
        records: bool = False,
        events: bool = True,
        on_violation: str = "raise",
        reconnect: bool = True,
        max_retries: int | None = None,
        max_auth_retries: int = 5,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 10.0,
        refresh_retry_s: float = 1.5,
        connect_options: dict[str, Any] | None = None,
    ):
        self.url = url
        if isinstance(token, str):
            self._provider: TokenProvider | None = None
            self._token: str | None = token
        elif callable(token):
            self._provider = token
            self._token = None
        else:
            raise TypeError("token must be a string or a token provider (a callable)")
        subs: dict[str, list[str]] = {}
        if subscriptions:
            subs.update({f: list(s) for f, s in subscriptions.items()})
        if feed is not None:
            subs.setdefault(feed, [])
            subs[feed] += [s for s in (symbols or ["*"]) if s not in subs[feed]]
        elif symbols:
            raise ValueError("symbols need a feed")
        self._subs = subs
        self.snapshot = snapshot
        #: Updates per second per instrument asked for in every subscribe (None: not sent).
        self.max_rate = max_rate
        self.auth = auth
        self.records = records
        self.events = events
        self.reconnect = reconnect
        self.max_retries = max_retries
        self.max_auth_retries = max_auth_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.refresh_retry_s = refresh_retry_s
        self.connect_options = dict(connect_options or {})
        self.tracker = SeqTracker(on_violation)
        self.stats = StreamStats()
        self.connection: Connection | None = None
        self._gen: AsyncIterator[Item] | None = None
        self._closing = False
        self._pending_subs: dict[int, str] = {}
        self._refresh_waiters: dict[int, asyncio.Future] = {}
        self._refresh_task: asyncio.Task | None = None
        self._side_events: collections.deque = collections.deque()

    def __repr__(self) -> str:
        return f"<Stream {self.url} subscriptions={self._subs!r}>"

    # -- public API ----------------------------------------------------------------------

    @property
    def welcome(self) -> Welcome | None:
        return self.connection.welcome if self.connection else None

    def symbol(self, rec_or_feed_id, instrument_id: int | None = None) -> str | None:
        """The symbol of a record (or of ``feed_id, instrument_id``), once subscribed."""
        if instrument_id is None:
            return self.tracker.symbol(rec_or_feed_id.feed_id, rec_or_feed_id.instrument_id)
        return self.tracker.symbol(rec_or_feed_id, instrument_id)

    async def subscribe(self, feed: str, symbols: list[str]) -> None:
        """Adds symbols to the subscriptions (kept across reconnects)."""
        cur = self._subs.setdefault(feed, [])
        new = [s for s in symbols if s not in cur]
        cur += new
        if self.connection is not None and new:
            rid = await self.connection.subscribe(feed, new, snapshot=self.snapshot, max_rate=self.max_rate)
            self._pending_subs[rid] = feed

    async def throttle(self, max_rate: float) -> list[Throttled]:
        """Sets the stream's ``max_rate`` (0: not throttled): on every subscribed instrument of
        the live connection (a ``throttle`` per feed, ``symbols: ["*"]``; the replies are
        returned) and in the subscribes of later reconnects. Raises :class:`ControlError` for a
        rate the server refuses (``bad_request``); the stream's rate is then left unchanged."""
        conn = self.connection
        replies = []
        if conn is not None:
            for feed in self._subs:
                replies.append(await conn.throttle(feed, ["*"], max_rate))
        else:
            _number("max_rate", max_rate)
        self.max_rate = max_rate
        return replies

    async def unsubscribe(self, feed: str, symbols: list[str]) -> None:
        """Removes symbols from the subscriptions."""
        cur = self._subs.get(feed, [])
        self._subs[feed] = [s for s in cur if s not in symbols]
        if not self._subs[feed]:
            del self._subs[feed]
        if self.connection is not None:
            await self.connection.unsubscribe(feed, symbols)

    async def ping(self) -> int:
        """Sends the application ping; its ``Pong`` comes out of the iterator."""
        if self.connection is None:
            raise StreamClosed(1006, "not connected")
        return await self.connection.ping()

    async def close(self) -> None:
        """Stops the stream: closes the connection; the iterator ends."""
        self._closing = True
        self._cancel_refresh()
        if self.connection is not None:
            await self.connection.close()
        if self._gen is not None:
            try:
                await self._gen.aclose()
            except RuntimeError:
                pass  # iterated by another task right now: it ends on the closed connection

    def __aiter__(self) -> AsyncIterator[Item]:
        if self._gen is None:
            self._gen = self._run()
        return self._gen

    async def __aenter__(self) -> "Stream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- tokens ----------------------------------------------------------------------------

    async def _fresh_token(self) -> str:
        if self._provider is None:
            raise _Fatal(TokenExpired(4001, "the token expired and no token provider was given"))
        token = await call_provider(self._provider)
        self.stats.tokens_fetched += 1
        self._token = token
        return token

    async def _current_token(self) -> str:
        if self._token is None:
            return await self._fresh_token()
        return self._token

    # -- in-band refresh -----------------------------------------------------------------

    def _cancel_refresh(self) -> None:
        if self._refresh_task is not None and not self._refresh_task.done():
            self._refresh_task.cancel()
        self._refresh_task = None
        for f in self._refresh_waiters.values():
            if not f.done():
                f.cancel()
        self._refresh_waiters.clear()

    def _start_refresh(self, conn: Connection) -> None:
        if self._provider is None or (self._refresh_task is not None and not self._refresh_task.done()):
            return
        self._refresh_task = asyncio.ensure_future(self._refresh(conn))

    async def _refresh(self, conn: Connection) -> None:
        """Fetches a token and sends ``refresh`` until the server takes one (retrying a
        rate limit or a refusal a few times; the old token stays in force meanwhile)."""
        loop = asyncio.get_running_loop()
        for _ in range(5):
            try:
                token = await self._fresh_token()
                rid = conn.next_id()
                fut = loop.create_future()
                self._refresh_waiters[rid] = fut
                await conn.refresh(token, id=rid)
                res = await asyncio.wait_for(fut, 30)
                if isinstance(res, Refreshed):
                    return
                err: Exception = ControlError(res.code, res.message, res.id)
            except asyncio.CancelledError:
                raise
            except StreamClosed:
                return
            except (HttpError, asyncio.TimeoutError) as e:
                err = e
            self.stats.refresh_failures += 1
            self._side_events.append(RefreshFailed(err))
            limited = isinstance(err, ControlError) and err.error == "rate_limited"
            # a rate limit is one refresh per auth.min_refresh_interval_ms (1 s by default)
            await asyncio.sleep(max(self.refresh_retry_s, 1.0) if limited else self.refresh_retry_s)

    # -- the loop --------------------------------------------------------------------------

    async def _open(self) -> Connection:
        token = await self._current_token()
        opts = dict(self.connect_options)
        if self.auth == "ticket":
            from .auth import fetch_ticket

            ticket = await fetch_ticket(self.url, token)
            return await connect(self.url, auth="ticket", ticket=ticket, **opts)
        return await connect(self.url, token, auth=self.auth, **opts)

    async def _subscribe_all(self, conn: Connection, reconnect: bool) -> list[Item]:
        """Subscribes every feed: ``resume`` + ``epoch`` where the epoch is the one held,
        a snapshot where it changed. Returns the synthetic ``Reset`` events."""
        out: list[Item] = []
        plans = []
        for feed, symbols in self._subs.items():
            held_epoch = self.tracker.epoch(feed)
            info = conn.welcome.feed(feed)
            last = self.tracker.last_seqs(feed) if reconnect else {}
            if reconnect and last and held_epoch is not None and info is not None and info.epoch == held_epoch:
                plans.append((feed, symbols, self.snapshot, last, held_epoch))
            else:
                if reconnect and held_epoch is not None and info is not None and info.epoch != held_epoch:
                    out.append(Reset(feed, info.epoch, on_reconnect=True))
                    self.stats.resets += 1
                plans.append((feed, symbols, self.snapshot or reconnect, None, None))
        self.tracker.forget()
        self.tracker.on_feeds(conn.welcome.feeds)
        for feed, symbols, snapshot, resume, epoch in plans:
            if not symbols:
                continue
            if resume:
                self.tracker.expect_resume(feed, epoch, resume)
            rid = await conn.subscribe(
                feed, symbols, snapshot=snapshot, resume=resume, epoch=epoch, max_rate=self.max_rate
            )
            self._pending_subs[rid] = feed
        return out

    def _retry_plan(self, e: Exception, attempt: int, auth_failures: int) -> tuple[float, int]:
        """How long to wait before the next attempt after ``e``, and the new count of
        consecutive 401s; raises ``e`` when it must not be retried."""
        delay = backoff_delay(attempt, self.backoff_initial_s, self.backoff_max_s)
        if not self.reconnect or self._closing:
            raise e
        if self.max_retries is not None and attempt >= self.max_retries:
            raise e
        if isinstance(e, ServerShutdown):
            if e.reconnect_after_ms is not None and attempt == 0:
                delay = e.reconnect_after_ms / 1000
            return delay, 0
        if isinstance(e, TokenRevoked):
            raise e
        if isinstance(e, TokenExpired):
            if self._provider is None:
                raise e
            self._token = None
            return delay, auth_failures
        if isinstance(e, SlowConsumer):
            return delay, 0
        if isinstance(e, StreamClosed):
            if e.code in (1006, 1011, 1012, 1013):
                return delay, 0
            raise e
        if isinstance(e, HandshakeRefused):
            if e.status == 401 and self._provider is not None:
                if auth_failures >= self.max_auth_retries:
                    raise e
                self._token = None  # e.g. unknown_kid after a restart: a new signing key
                # The first retry with a fresh token comes at once; later ones back off.
                return (0.0 if auth_failures == 0 else delay), auth_failures + 1
            if e.status in (429, 503):
                return max(delay, e.retry_after or 0.0), auth_failures
            raise e
        if isinstance(e, (TicketError, TokenError)):
            if e.status == 401 and isinstance(e, TicketError) and self._provider is not None:
                if auth_failures >= self.max_auth_retries:
                    raise e
                self._token = None
                return delay, auth_failures + 1
            if e.status == 0 or e.status == 429 or e.status >= 500:
                return max(delay, e.retry_after or 0.0), auth_failures
            raise e
        if isinstance(e, ConnectFailed):
            if self.stats.connects == 0:
                raise e  # never connected: most likely a wrong URL
            return delay, auth_failures
        raise e

    async def _run(self) -> AsyncIterator[Item]:
        attempt = 0
        auth_failures = 0
        try:
            while not self._closing:
                try:
                    conn = await self._open()
                except _Fatal as f:
                    raise f.args[0] from None
                except (HandshakeRefused, ConnectFailed, HttpError, StreamClosed) as e:
                    delay, auth_failures = self._retry_plan(e, attempt, auth_failures)
                    attempt += 1
                    if self.events:
                        yield Disconnected(e, delay)
                    await asyncio.sleep(delay)
                    continue
                reconnect = self.stats.connects > 0
                self.connection = conn
                self.stats.connects += 1
                if reconnect:
                    self.stats.reconnects += 1
                auth_failures = 0
                try:
                    synthetic = await self._subscribe_all(conn, reconnect)
                    if self.events:
                        yield Connected(conn.welcome, reconnect)
                        for ev in synthetic:
                            yield ev
                    async for item in self._pump(conn):
                        attempt = 0
                        yield item
                except StreamClosed as e:
                    self.stats.last_close = e.code
                    self._cancel_refresh()
                    self.connection = None
                    if self._closing:
                        return
                    delay, auth_failures = self._retry_plan(e, attempt, auth_failures)
                    attempt += 1
                    if self.events:
                        yield Disconnected(e, delay)
                    await asyncio.sleep(delay)
                except BaseException as e:
                    self._cancel_refresh()
                    self.connection = None
                    try:
                        await conn.close()
                    except Exception:
                        pass
                    if isinstance(e, _Fatal):
                        raise e.args[0] from None
                    raise
        finally:
            self._cancel_refresh()

    def _on_control(self, conn: Connection, msg: Message) -> bool:
        """Acts on a control message; returns whether it is an item for the caller."""
        stats = self.stats
        if isinstance(msg, Subscribed):
            self._pending_subs.pop(msg.id, None)
        elif isinstance(msg, Gap):
            stats.gaps += 1
        elif isinstance(msg, Reset):
            stats.resets += 1
        elif isinstance(msg, TokenExpiring):
            self._start_refresh(conn)
        elif isinstance(msg, Refreshed):
            stats.refreshes += 1
            fut = self._refresh_waiters.pop(msg.id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, ErrorReply):
            fut = self._refresh_waiters.pop(msg.id, None) if msg.id is not None else None
            if fut is None:
                self._pending_subs.pop(msg.id, None)
                raise _Fatal(ControlError(msg.code, msg.message, msg.id))
            if not fut.done():
                fut.set_result(msg)  # the refresh task reports it
            return False
        elif isinstance(msg, Unsubscribed) and msg.reason == "scope_revoked":
            for s in msg.symbols:
                if s in self._subs.get(msg.feed, []):
                    self._subs[msg.feed].remove(s)
        return self.events

    async def _pump(self, conn: Connection) -> AsyncIterator[Item]:
        tracker = self.tracker
        stats = self.stats
        while True:
            msg = await conn.recv_raw()
            out: Any
            if isinstance(msg, Batch):
                violations = tracker.on_batch(msg)
                stats.batches += 1
                stats.records += len(msg)
                out = msg.records() if self.records else (msg,)
            else:
                violations = tracker.on_message(msg)
                out = (msg,) if self._on_control(conn, msg) else ()
            if violations:
                stats.violations += len(violations)
                if self.events:
                    for v in violations:
                        yield v
            for item in out:
                yield item
            while self._side_events:
                ev = self._side_events.popleft()
                if self.events:
                    yield ev
