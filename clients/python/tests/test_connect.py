"""Against the real server: tokens, tickets, the three ways to connect, refusals,
control errors, subscribe/resume/unsubscribe/ping."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from conftest import Collector, wait_for
from tgserver import SECRET, free_port
import tickgate_client as tg
from tickgate_client import (
    Batch,
    ConnectFailed,
    ControlError,
    HandshakeRefused,
    Pong,
    SeqTracker,
    Stream,
    TicketError,
    TokenError,
    Unsubscribed,
)


async def token(server, client="demo", scope=None) -> str:
    return await tg.fetch_token(server.token_url, client, SECRET, scope)


async def read_records(conn, tracker: SeqTracker, n: int, timeout: float = 30.0, msgs: list | None = None) -> list:
    """Receives until ``n`` records arrived; every message goes through ``tracker`` (and
    control messages into ``msgs``)."""
    recs: list = []

    async def go():
        while len(recs) < n:
            m = await conn.recv()
            if isinstance(m, Batch):
                tracker.on_batch(m)
                recs.extend(m.records())
            else:
                tracker.on_message(m)
                if msgs is not None:
                    msgs.append(m)

    await asyncio.wait_for(go(), timeout)
    return recs


async def test_fetch_token_and_errors(server):
    info = await tg.fetch_token_info(server.token_url, "demo", SECRET, "md:read:DEMO")
    assert info.scope == "md:read:DEMO" and info.token_type.lower() == "bearer" and info.expires_in > 0
    assert info.access_token not in repr(info)
    # a bare base URL gets the token path
    assert await tg.fetch_token(server.base_url, "demo", SECRET)
    with pytest.raises(TokenError) as e:
        await tg.fetch_token(server.token_url, "demo", "wrong secret")
    assert (e.value.status, e.value.error) == (401, "invalid_client")
    with pytest.raises(TokenError) as e:
        await tg.fetch_token(server.token_url, "demo", SECRET, "tickgate:admin")
    assert (e.value.status, e.value.error) == (400, "invalid_scope")
    with pytest.raises(TokenError) as e:
        await tg.fetch_token(f"http://127.0.0.1:{free_port()}/oauth2/token", "demo", SECRET)
    assert (e.value.status, e.value.error) == (0, "connection_failed")


async def test_client_credentials_provider_gives_fresh_tokens(server):
    provider = tg.client_credentials(server.token_url, "demo", SECRET)
    a, b = await provider(), await provider()
    assert a != b and provider.fetches == 2 and a not in repr(provider)


@pytest.mark.parametrize("auth", ["header", "subprotocol", "ticket"])
async def test_connect_all_three_ways_and_stream(server, auth):
    tok = await token(server)
    conn = await tg.connect(server.stream_url, tok, auth=auth)
    try:
        assert conn.ws.subprotocol == tg.SUBPROTOCOL
        assert conn.welcome.sub == "demo" and conn.welcome.feed("DEMO") is not None
        tracker = SeqTracker()
        tracker.on_message(conn.welcome)
        sid = await conn.subscribe("DEMO", ["AAPL", "MSFT"], snapshot=True)
        msgs: list = []
        recs = await read_records(conn, tracker, 20, msgs=msgs)
        assert {tracker.symbol(r.feed_id, r.instrument_id) for r in recs} <= {"AAPL", "MSFT"}
        assert tracker.stats.violations == 0
        sub = next(m for m in msgs if isinstance(m, tg.Subscribed))
        for ins in sub.instruments:  # a snapshot of everything that has a last value
            snaps = [r for r in recs if r.snapshot and r.instrument_id == ins.id]
            assert (len(snaps) >= 1) == (ins.seq > 0) and len(snaps) <= 2
        assert tracker.epoch("DEMO") == conn.welcome.feed("DEMO").epoch
        assert sid == 1
    finally:
        await conn.close()


async def test_ticket_is_single_use(server):
    tok = await token(server)
    ticket = await tg.fetch_ticket(server.base_url, tok)
    conn = await tg.connect(server.stream_url, auth="ticket", ticket=ticket)
    await conn.close()
    with pytest.raises(HandshakeRefused) as e:
        await tg.connect(server.stream_url, auth="ticket", ticket=ticket)
    assert e.value.status == 401 and e.value.description == "unknown or already used ticket"
    with pytest.raises(TicketError) as e:
        await tg.fetch_ticket(server.stream_url, "garbage")
    assert (e.value.status, e.value.error) == (401, "invalid_token")


@pytest.mark.parametrize("auth", ["header", "subprotocol"])
async def test_garbage_token_is_refused_with_the_servers_description(server, auth):
    with pytest.raises(HandshakeRefused) as e:
        await tg.connect(server.stream_url, "not-a-jwt", auth=auth)
    r = e.value
    assert (r.status, r.error) == (401, "invalid_token")
    assert "malformed" in r.description and '"error_description"' in r.body
    assert "not-a-jwt" not in str(r)


async def test_no_token_is_refused(server):
    with pytest.raises(HandshakeRefused) as e:
        await tg.connect(server.stream_url, None)
    assert (e.value.status, e.value.description) == (401, "no access token presented")


async def test_expired_token_is_refused_as_expired(make_server):
    srv = make_server(issuer="token_ttl_s = 1")
    tok = await tg.fetch_token(srv.token_url, "demo", SECRET)
    deadline = time.monotonic() + 30
    while True:  # poll until the token is past its exp
        try:
            conn = await tg.connect(srv.stream_url, tok)
        except HandshakeRefused as e:
            refused = e
            break
        await conn.close()
        assert time.monotonic() < deadline, "token never expired"
        await asyncio.sleep(0.1)
    assert (refused.status, refused.error, refused.description) == (401, "invalid_token", "token expired")


async def test_no_server_is_connect_failed():
    with pytest.raises(ConnectFailed):
        await tg.connect(f"ws://127.0.0.1:{free_port()}/v1/stream", "x")
    with pytest.raises(ConnectFailed):
        await tg.connect("http://127.0.0.1:1/v1/stream", "x")


async def test_scope_refusal_is_403(server):
    # md:read:OTHER still reads something, but a token of no md:read scope cannot connect;
    # "other" can connect and is refused DEMO at subscribe time.
    tok = await token(server, "other")
    conn = await tg.connect(server.stream_url, tok)
    try:
        assert conn.welcome.feeds == ()
        await conn.subscribe("DEMO", ["AAPL"])
        with pytest.raises(ControlError) as e:
            await asyncio.wait_for(conn.recv(), 30)
        assert e.value.error in ("insufficient_scope", "unknown_feed")
    finally:
        await conn.close()


async def test_unknown_feed_and_symbol_are_control_errors(server):
    conn = await tg.connect(server.stream_url, await token(server))
    try:
        sid = await conn.subscribe("NOPE", ["AAPL"])
        with pytest.raises(ControlError) as e:
            await asyncio.wait_for(conn.recv(), 30)
        assert (e.value.error, e.value.id) == ("unknown_feed", sid) and e.value.description
        sid = await conn.subscribe("DEMO", ["AAPL", "NOT-A-SYMBOL"])
        with pytest.raises(ControlError) as e:
            await asyncio.wait_for(conn.recv(), 30)
        assert (e.value.error, e.value.id) == ("unknown_symbol", sid)
        # the connection is still usable
        pid = await conn.ping()
        pong = await asyncio.wait_for(conn.recv(), 30)
        assert isinstance(pong, Pong) and pong.id == pid and pong.ts > 0
    finally:
        await conn.close()


async def test_stream_raises_control_error_for_unknown_feed(server):
    provider = tg.client_credentials(server.token_url, "demo", SECRET)
    stream = Stream(server.stream_url, provider, feed="NOPE", symbols=["AAPL"])
    with pytest.raises(ControlError) as e:
        async with stream:
            async for _ in stream:
                pass
    assert e.value.error == "unknown_feed"


async def test_unsubscribe(server):
    conn = await tg.connect(server.stream_url, await token(server))
    try:
        tracker = SeqTracker()
        tracker.on_message(conn.welcome)
        await conn.subscribe("DEMO", ["AAPL", "MSFT"])
        await read_records(conn, tracker, 3)
        uid = await conn.unsubscribe("DEMO", ["AAPL", "MSFT"])

        async def until_unsubscribed():
            while True:
                m = await conn.recv()
                if isinstance(m, Batch):
                    tracker.on_batch(m)
                else:
                    tracker.on_message(m)
                    if isinstance(m, Unsubscribed):
                        return m

        u = await asyncio.wait_for(until_unsubscribed(), 30)
        assert u.id == uid and set(u.symbols) == {"AAPL", "MSFT"} and u.reason == "request"
        assert tracker.last_seqs("DEMO") == {}
    finally:
        await conn.close()


async def test_resume_replays_what_was_missed(server):
    tok = await token(server)
    conn = await tg.connect(server.stream_url, tok)
    tracker = SeqTracker()
    tracker.on_message(conn.welcome)
    await conn.subscribe("DEMO", ["AAPL"])
    await read_records(conn, tracker, 3)
    epoch = tracker.epoch("DEMO")
    held = tracker.last_seqs("DEMO")
    await conn.close()

    # Another connection watches AAPL until it is a few records further.
    watch = await tg.connect(server.stream_url, tok)
    wt = SeqTracker()
    wt.on_message(watch.welcome)
    await watch.subscribe("DEMO", ["AAPL"])
    while wt.expected("DEMO", "AAPL") is None or wt.expected("DEMO", "AAPL") <= held["AAPL"] + 3:
        await read_records(watch, wt, 1)
    await watch.close()

    conn = await tg.connect(server.stream_url, tok)
    try:
        t2 = SeqTracker()
        t2.on_message(conn.welcome)
        assert conn.welcome.feed("DEMO").epoch == epoch
        t2.expect_resume("DEMO", epoch, held)
        await conn.subscribe("DEMO", ["AAPL"], resume=held, epoch=epoch)
        recs = await read_records(conn, t2, 5)
        replayed = [r for r in recs if r.replay]
        assert len(replayed) >= 3 and [r.seq for r in recs[:3]] == [held["AAPL"] + k for k in (1, 2, 3)]
        assert all(r.replay for r in recs[:3])
        assert t2.stats.violations == 0 and t2.stats.snapshots == 0 and t2.stats.replayed >= 3
    finally:
        await conn.close()


async def test_resume_with_another_epoch_gets_a_snapshot(server):
    tok = await token(server)
    conn = await tg.connect(server.stream_url, tok)
    try:
        t = SeqTracker()
        t.on_message(conn.welcome)
        epoch = conn.welcome.feed("DEMO").epoch
        t.expect_resume("DEMO", epoch - 1, {"AAPL": 1})
        await conn.subscribe("DEMO", ["AAPL"], resume={"AAPL": 1}, epoch=epoch - 1)
        msgs: list = []
        recs = await read_records(conn, t, 3, msgs=msgs)
        sub = next(m for m in msgs if isinstance(m, tg.Subscribed))
        assert not any(r.replay for r in recs)
        assert any(r.snapshot for r in recs) == (sub.instruments[0].seq > 0)
        assert t.stats.violations == 0 and t.stats.gaps == 0
    finally:
        await conn.close()


async def test_stream_yields_batches_and_events(server):
    provider = tg.client_credentials(server.token_url, "demo", SECRET)
    async with Stream(server.stream_url, provider, feed="DEMO", symbols=["AAPL", "MSFT"]) as stream:
        c = Collector(stream)
        await wait_for(lambda: stream.stats.records >= 30 or c.error, what="30 records")
        assert c.error is None
        kinds = [type(i).__name__ for i in c.items]
        assert kinds[0] == "Connected" and "Subscribed" in kinds and "Batch" in kinds
        b = c.of(Batch)[0]
        assert {stream.symbol(1, int(i)) for i in b.ordered("instrument_id")} <= {"AAPL", "MSFT"}
        pid = await stream.ping()
        await wait_for(lambda: any(isinstance(i, Pong) and i.id == pid for i in c.items), what="pong")
        await c.stop()
    assert stream.stats.violations == 0 and stream.stats.connects == 1


async def test_stream_records_mode_with_ticket(server):
    provider = tg.client_credentials(server.token_url, "demo", SECRET)
    stream = Stream(server.stream_url, provider, feed="DEMO", symbols=["MSFT"], auth="ticket", records=True,
                    events=False)
    seen = []
    async with stream:
        async for rec in stream:
            assert isinstance(rec, (tg.Trade, tg.Quote))
            seen.append(rec)
            if len(seen) >= 10:
                break
    assert {stream.symbol(r) for r in seen} == {"MSFT"}
    assert stream.stats.violations == 0


async def test_stream_with_a_bad_static_token_raises_the_refusal(server):
    stream = Stream(server.stream_url, "not-a-jwt", feed="DEMO", symbols=["AAPL"])
    with pytest.raises(HandshakeRefused) as e:
        async with stream:
            async for _ in stream:
                pass
    assert e.value.status == 401 and "malformed" in e.value.description


async def test_stream_gives_up_after_repeated_401s_with_fresh_tokens(server):
    async def bad_provider():
        return "still-not-a-jwt"

    stream = Stream(server.stream_url, bad_provider, feed="DEMO", symbols=["AAPL"], max_auth_retries=2,
                    backoff_initial_s=0.01, backoff_max_s=0.05)
    with pytest.raises(HandshakeRefused):
        async with stream:
            async for _ in stream:
                pass
    assert stream.stats.tokens_fetched == 3


async def test_debug_logs_never_show_a_token_or_ticket(server, caplog):
    tok = await token(server)
    ticket = await tg.fetch_ticket(server.base_url, tok)
    with caplog.at_level(logging.DEBUG):
        for auth, kw in (("header", {}), ("subprotocol", {}), ("ticket", {"ticket": ticket})):
            conn = await tg.connect(server.stream_url, tok, auth=auth, **kw)
            await conn.close()
        with pytest.raises(HandshakeRefused):
            await tg.connect(server.stream_url, tok + "x")
    text = caplog.text
    assert "> GET /v1/stream" in text and "<redacted>" in text  # websockets did log the handshakes
    for part in tok.split("."):
        assert part not in text
    assert ticket not in text
