"""Throttled subscriptions (protocol v1.1, §6a) against the real server: ``max_rate`` on
subscribe, the ``throttle`` op (live rate changes, lifting, the bandwidth cap), its errors,
sequence tracking with CONFLATED trades, and a Stream that keeps its rate across a restart.

Rates are checked only from above, generously: per instrument, the batches holding live
records of it number at most ``rate * (elapsed + 0.5) + 1``; from below only "at least one"."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import AsyncIterator

import pytest

from conftest import Collector, wait_for
from tgserver import SECRET
import tickgate_client as tg
from tickgate_client import (
    FLAG_CONFLATED,
    Batch,
    Connected,
    ControlError,
    Pong,
    SeqTracker,
    Stream,
    Subscribed,
    Throttled,
)
from tickgate_client.records import RTYPE_TRADE

SYMBOLS = ["AAPL", "MSFT"]


@contextlib.asynccontextmanager
async def open_conn(server) -> AsyncIterator[tuple[tg.Connection, SeqTracker]]:
    """A connection (closed at the end) and a tracker that raises on any break of §9; the
    tracker has seen no violation when the block ends."""
    tok = await tg.fetch_token(server.token_url, "demo", SECRET)
    conn = await tg.connect(server.stream_url, tok)
    tracker = SeqTracker()
    tracker.on_message(conn.welcome)
    try:
        yield conn, tracker
        assert tracker.stats.violations == 0
    finally:
        await conn.close()


class Window:
    """What one stretch of reading saw: per instrument, the batches with live records of it
    (its updates), the live records, and the CONFLATED trades."""

    def __init__(self):
        self.start = time.monotonic()
        self.updates: collections.Counter = collections.Counter()
        self.records: dict[int, list] = collections.defaultdict(list)
        self.conflated_trades = 0
        self.messages: list = []

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def bound(self, rate: float) -> float:
        return rate * (self.elapsed + 0.5) + 1

    def assert_rate_at_most(self, rate: float, instruments) -> None:
        bound = self.bound(rate)
        for iid in instruments:
            n = self.updates[iid]
            assert 1 <= n <= bound, f"instrument {iid}: {n} updates in {self.elapsed:.2f} s at max_rate {rate}"


async def read_window(conn, tracker: SeqTracker, until, timeout: float = 60.0) -> Window:
    """Reads (every message through ``tracker``) until ``until(window)`` holds."""
    w = Window()

    async def go():
        while not until(w):
            m = await conn.recv()
            if isinstance(m, Batch):
                tracker.on_batch(m)
                seen = set()
                for r in m.records():
                    if r.snapshot:
                        continue
                    seen.add(r.instrument_id)
                    w.records[r.instrument_id].append(r)
                    if r.rtype == RTYPE_TRADE and r.flags & FLAG_CONFLATED:
                        w.conflated_trades += 1
                for iid in seen:
                    w.updates[iid] += 1
            else:
                tracker.on_message(m)
                w.messages.append(m)

    await asyncio.wait_for(go(), timeout)
    return w


async def subscribed(conn, tracker: SeqTracker) -> Subscribed:
    while True:
        m = await asyncio.wait_for(conn.recv(), 30)
        if isinstance(m, Batch):
            tracker.on_batch(m)
            continue
        tracker.on_message(m)
        if isinstance(m, Subscribed):
            return m


def consecutive(records) -> bool:
    seqs = [r.seq for r in records]
    return all(b == a + 1 for a, b in zip(seqs, seqs[1:]))


async def test_max_rate_caps_updates_and_conflated_trades_keep_the_tracker_happy(server):
    async with open_conn(server) as (conn, tracker):
        await conn.subscribe("DEMO", SYMBOLS, snapshot=True, max_rate=5)
        sub = await subscribed(conn, tracker)
        assert sub.max_rate == 5.0
        ids = [i.id for i in sub.instruments]
        w = await read_window(conn, tracker, lambda w: w.elapsed >= 3 and w.conflated_trades > 0)
        w.assert_rate_at_most(5, ids)
        # skipped seqs behind CONFLATED trades and quotes are no violation (§6a, §9)
        assert tracker.stats.violations == 0 and tracker.stats.conflated > 0
        assert all(r.seq > 0 for rs in w.records.values() for r in rs)


async def test_throttle_changes_the_rate_live_and_zero_lifts_it(server):
    async with open_conn(server) as (conn, tracker):
        await conn.subscribe("DEMO", SYMBOLS)
        sub = await subscribed(conn, tracker)
        assert sub.max_rate is None
        ids = [i.id for i in sub.instruments]
        # unthrottled: every seq arrives
        w = await read_window(conn, tracker, lambda w: all(len(w.records[i]) >= 5 for i in ids))
        assert all(consecutive(w.records[i]) for i in ids) and w.conflated_trades == 0

        # Another task reads the connection meanwhile: the reply still reaches throttle().
        reader = asyncio.ensure_future(read_window(conn, tracker, lambda w: any(isinstance(m, Throttled) for m in w.messages)))
        reply = await conn.throttle("DEMO", ["*"], 1)
        before = await reader
        assert reply == Throttled(reply.id, "DEMO", reply.symbols, 1.0, None)
        assert sorted(reply.symbols) == sorted(SYMBOLS)  # "*": every subscribed instrument
        assert [m for m in before.messages if isinstance(m, Throttled)] == [reply]  # recv returns it too
        w = await read_window(conn, tracker, lambda w: w.elapsed >= 3 and all(w.updates[i] for i in ids))
        w.assert_rate_at_most(1, ids)
        assert tracker.stats.violations == 0

        # max_rate 0 lifts it: what the old interval held comes before the reply, then every seq
        reply = await conn.throttle("DEMO", SYMBOLS, 0)
        assert reply.max_rate == 0.0 and reply.symbols == tuple(SYMBOLS)
        w = await read_window(conn, tracker, lambda w: any(isinstance(m, Throttled) for m in w.messages))
        w = await read_window(conn, tracker, lambda w: all(len(w.records[i]) >= 10 for i in ids))
        for i in ids:
            assert consecutive(w.records[i]), [r.seq for r in w.records[i]]
            assert not any(r.flags & FLAG_CONFLATED for r in w.records[i])


async def test_bad_rates_and_throttle_errors_are_typed(server):
    async with open_conn(server) as (conn, tracker):
        # a subscribe with a max_rate out of range: error bad_request, nothing subscribed
        sid = await conn.subscribe("DEMO", ["AAPL"], max_rate=2000)
        with pytest.raises(ControlError) as e:
            await asyncio.wait_for(conn.recv(), 30)
        assert (e.value.error, e.value.id) == ("bad_request", sid)
        assert "max_rate" in e.value.description
        with pytest.raises(ControlError) as e:
            await conn.throttle("DEMO", ["AAPL"], 5)
        assert e.value.error == "bad_request" and "not subscribed" in e.value.description

        await conn.subscribe("DEMO", ["AAPL"])
        await subscribed(conn, tracker)
        cases = [
            (dict(feed="DEMO", symbols=["AAPL"], max_rate=0.001), "bad_request"),
            (dict(feed="DEMO", symbols=["AAPL"], max_rate=1000.5), "bad_request"),
            (dict(feed="DEMO", symbols=["AAPL"], max_rate=-1), "bad_request"),
            (dict(feed="DEMO", symbols=["MSFT"], max_rate=5), "bad_request"),  # not subscribed
            (dict(feed="DEMO", symbols=[], max_rate=5), "bad_request"),
            (dict(feed="DEMO", max_rate=5), "bad_request"),  # the three go together
            (dict(), "bad_request"),  # neither part
            (dict(max_bytes_per_s=100), "bad_request"),
            (dict(max_bytes_per_s=2**40 + 1), "bad_request"),
            (dict(feed="DEMO", symbols=["NOPE"], max_rate=5), "unknown_symbol"),
            (dict(feed="NOPE", symbols=["AAPL"], max_rate=5), "unknown_feed"),
        ]
        for kw, code in cases:
            with pytest.raises(ControlError) as e:
                await conn.throttle(**kw)
            assert e.value.error == code, (kw, e.value)
            assert e.value.id is not None and e.value.description
        # what the client cannot encode is refused before sending
        with pytest.raises(TypeError):
            await conn.throttle("DEMO", ["AAPL"], "5")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await conn.throttle("DEMO", ["AAPL"], float("nan"))
        with pytest.raises(TypeError):
            await conn.subscribe("DEMO", ["AAPL"], max_rate=True)
        with pytest.raises(TypeError):
            await conn.throttle(max_bytes_per_s=1024.0)  # type: ignore[arg-type]
        # the connection is still fine, and no error of a throttle() leaks into recv
        pid = await conn.ping()
        while True:
            m = await asyncio.wait_for(conn.recv(), 30)
            if isinstance(m, Pong):
                assert m.id == pid
                break
            if isinstance(m, Batch):
                tracker.on_batch(m)


async def test_max_bytes_per_s_reply(server):
    async with open_conn(server) as (conn, tracker):
        r = await conn.throttle(max_bytes_per_s=65536)
        assert r == Throttled(r.id, None, None, None, 65536)
        await conn.subscribe("DEMO", ["AAPL"])
        await subscribed(conn, tracker)
        r = await conn.throttle("DEMO", ["AAPL"], 2.5, 2**40)
        assert (r.feed, r.symbols, r.max_rate, r.max_bytes_per_s) == ("DEMO", ("AAPL",), 2.5, 2**40)
        r = await conn.throttle(max_bytes_per_s=0)
        assert r.max_bytes_per_s == 0 and r.max_rate is None
        # records still flow under a cap well above what the subscription produces
        await read_window(conn, tracker, lambda w: sum(w.updates.values()) >= 2)


async def test_stream_keeps_its_max_rate_across_a_reconnect(server):
    provider = tg.client_credentials(server.token_url, "demo", SECRET)
    stream = Stream(server.stream_url, provider, feed="DEMO", symbols=SYMBOLS, max_rate=5, backoff_initial_s=0.2)
    async with stream:
        c = Collector(stream)
        await wait_for(lambda: c.of(Subscribed) or c.error, what="subscribed")
        assert c.error is None, repr(c.error)
        assert c.of(Subscribed)[0].max_rate == 5.0
        # a new rate on the live connection, while the collector iterates
        replies = await stream.throttle(2)
        assert [(r.feed, sorted(r.symbols), r.max_rate) for r in replies] == [("DEMO", sorted(SYMBOLS), 2.0)]
        with pytest.raises(ControlError):
            await stream.throttle(5000)
        assert stream.max_rate == 2
        records = stream.stats.records
        await wait_for(lambda: stream.stats.records > records or c.error, what="records after throttle")

        # the connection drops (no close frame: 1006); the stream resumes in the same epoch
        stream.connection.ws.transport.abort()
        await wait_for(lambda: len(c.of(Subscribed)) >= 2 or c.error, what="the subscribe after the reconnect")
        assert c.error is None, repr(c.error)
        again = c.of(Subscribed)[1]
        assert again.max_rate == 2.0 and again.epoch == c.of(Subscribed)[0].epoch
        assert [e.reconnect for e in c.of(Connected)] == [False, True]
        records = stream.stats.records
        await wait_for(lambda: stream.stats.records > records or c.error, what="records after the reconnect")
        await c.stop()
    assert c.error is None, repr(c.error)
    assert stream.stats.violations == 0 and stream.stats.reconnects == 1
    assert stream.tracker.stats.replayed > 0  # what was missed came back, then throttled delivery
