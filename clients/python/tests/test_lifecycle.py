"""Stream lifetime against the real server: in-band refresh with short tokens, revocation
(4003), and a server restart on the same port (shutdown, reconnect, new token, new epoch)."""

from __future__ import annotations

import asyncio

import pytest

from conftest import Collector, wait_for
from tgserver import OPS_SECRET, SECRET, free_port
import tickgate_client as tg
from tickgate_client import (
    Batch,
    Connected,
    Disconnected,
    Refreshed,
    Reset,
    ServerShutdown,
    Shutdown,
    Stream,
    TokenExpiring,
    TokenRevoked,
)


async def test_refresh_cycle_keeps_the_connection(make_server):
    srv = make_server(issuer="token_ttl_s = 8")
    provider = tg.client_credentials(srv.token_url, "demo", SECRET)
    stream = Stream(srv.stream_url, provider, feed="DEMO", symbols=["AAPL", "MSFT"], reconnect=False)
    async with stream:
        c = Collector(stream)
        await wait_for(lambda: stream.stats.refreshes >= 2 or c.error, timeout=60, what="two refreshes")
        assert c.error is None, repr(c.error)
        records_at_second_refresh = stream.stats.records
        await wait_for(lambda: stream.stats.records > records_at_second_refresh or c.error, what="records after refresh")
        await c.stop()
    s = stream.stats
    assert s.connects == 1 and s.reconnects == 0 and s.last_close in (None, 1000)
    assert s.refreshes >= 2 and s.refresh_failures == 0 and s.violations == 0
    assert len(c.of(TokenExpiring)) >= 2 and len(c.of(Refreshed)) >= 2
    assert provider.fetches >= 3  # the first token and one per refresh
    assert not c.of(Disconnected)


async def test_revocation_closes_with_4003(make_server):
    srv = make_server()
    provider = tg.client_credentials(srv.token_url, "demo", SECRET)
    stream = Stream(srv.stream_url, provider, feed="DEMO", symbols=["AAPL"])
    async with stream:
        c = Collector(stream)
        await wait_for(lambda: stream.stats.records >= 5 or c.error, what="records")
        admin = await tg.fetch_token(srv.token_url, "ops", OPS_SECRET)
        answer = await asyncio.to_thread(srv.revoke, admin, {"sub": "demo"})
        assert answer["streams_closed"] >= 1
        await wait_for(lambda: c.task.done(), what="the stream to end")
    assert isinstance(c.error, TokenRevoked), repr(c.error)
    assert (c.error.code, c.error.reason) == (4003, "token revoked")
    assert stream.stats.reconnects == 0


async def test_token_revoked_on_a_plain_connection(make_server):
    srv = make_server()
    tok = await tg.fetch_token(srv.token_url, "demo", SECRET)
    conn = await tg.connect(srv.stream_url, tok)
    await conn.subscribe("DEMO", ["AAPL"])
    admin = await tg.fetch_token(srv.token_url, "ops", OPS_SECRET)
    await asyncio.to_thread(srv.revoke, admin, {"sub": "demo"})
    with pytest.raises(TokenRevoked):
        while True:
            await conn.recv()
    with pytest.raises(tg.HandshakeRefused) as e:
        await tg.connect(srv.stream_url, tok)
    assert (e.value.status, e.value.description) == (401, "token revoked")


async def test_server_restart_resubscribes_with_new_token_and_epoch(make_server):
    port = free_port()
    srv = make_server(port=port, server="drain_ms = 2000\nreconnect_after_max_ms = 1000")
    provider = tg.client_credentials(srv.token_url, "demo", SECRET)
    stream = Stream(srv.stream_url, provider, feed="DEMO", symbols=["AAPL", "MSFT"],
                    backoff_initial_s=0.2, backoff_max_s=1.0)
    async with stream:
        c = Collector(stream)
        await wait_for(lambda: stream.stats.records >= 10 or c.error, what="records before the restart")
        first_epoch = stream.tracker.epoch("DEMO")
        await asyncio.to_thread(srv.terminate)
        await wait_for(lambda: any(isinstance(i, Disconnected) for i in c.items) or c.error, what="the shutdown")
        await asyncio.to_thread(srv.start)
        await wait_for(lambda: stream.stats.reconnects >= 1 or c.error, what="the reconnect")
        at = stream.stats.records
        await wait_for(lambda: stream.stats.records >= at + 10 or c.error, what="records after the restart")
        assert c.error is None, repr(c.error)
        await c.stop()
    shutdowns = [d for d in c.of(Disconnected) if isinstance(d.error, ServerShutdown)]
    assert shutdowns and shutdowns[0].error.reconnect_after_ms == 1000 and shutdowns[0].delay_s == 1.0
    assert c.of(Shutdown)
    resets = c.of(Reset)
    new_epoch = stream.tracker.epoch("DEMO")
    assert new_epoch != first_epoch
    assert resets and resets[0].on_reconnect and resets[0].epoch == new_epoch
    connected = c.of(Connected)
    assert [x.reconnect for x in connected] == [False, True]
    # The old server's token is refused by the new one (a new signing key): a new token.
    assert provider.fetches >= 2 and stream.stats.tokens_fetched == provider.fetches
    assert stream.stats.violations == 0
    # after the restart, the new epoch's subscription began with a snapshot (of whatever
    # already had a value on the new server)
    after = c.items[c.items.index(connected[1]):]
    sub = next(i for i in after if isinstance(i, tg.Subscribed))
    assert sub.epoch == new_epoch
    first_batch = next(i for i in after if isinstance(i, Batch))
    has_values = any(ins.seq > 0 for ins in sub.instruments)
    assert bool(first_batch.ordered("flags")[0] & tg.FLAG_SNAPSHOT) == has_values


async def test_expiry_after_failed_refreshes_reconnects_and_resumes(make_server):
    """Refreshes that the server refuses (the provider gives a bad token while connected)
    end in 4001; the Stream connects again with a good token, in the same epoch, and
    resumes: what it missed comes back flagged REPLAY, with no gap and no violation."""
    srv = make_server(issuer="token_ttl_s = 4")
    good = tg.client_credentials(srv.token_url, "demo", SECRET)
    stream: Stream

    async def provider():
        if stream.connection is not None:
            return "refused.by.server"  # a refresh: the server answers invalid_token
        return await good()

    stream = Stream(srv.stream_url, provider, feed="DEMO", symbols=["AAPL", "MSFT"], refresh_retry_s=0.3,
                    backoff_initial_s=0.4, backoff_max_s=1.0)
    async with stream:
        c = Collector(stream)
        await wait_for(lambda: stream.stats.reconnects >= 1 or c.error, what="the reconnect after 4001")
        at = stream.stats.records
        await wait_for(lambda: stream.stats.records >= at + 10 or c.error, what="records after the reconnect")
        assert c.error is None, repr(c.error)
        await c.stop()
    expired = [d for d in c.of(Disconnected) if isinstance(d.error, tg.TokenExpired)]
    assert expired and expired[0].error.code == 4001
    failed = c.of(tg.RefreshFailed)
    assert failed and failed[0].error.error == "invalid_token" and "malformed" in failed[0].error.description
    assert all(isinstance(f.error, tg.ControlError) and f.error.error in ("invalid_token", "rate_limited")
               for f in failed)
    subs = c.of(tg.Subscribed)
    assert len(subs) == 2 and subs[0].epoch == subs[1].epoch and not c.of(Reset)
    assert stream.stats.violations == 0 and stream.stats.refreshes == 0
    assert stream.tracker.stats.replayed > 0 and stream.stats.gaps == 0
