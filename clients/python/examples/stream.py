#!/usr/bin/env python3
"""Streams DEMO AAPL/MSFT trades from a tickgate server and prints them; refreshes its token
in band and reconnects by itself. The example of clients/python/README.md, as a file
(tests/test_readme.py checks that the two are the same and runs it).

    TICKGATE_DEMO_SECRET=... python clients/python/examples/stream.py
"""
import asyncio
import os

from tickgate_client import Refreshed, Stream, Trade, client_credentials

ISSUER = "http://127.0.0.1:8080/oauth2/token"
STREAM = "ws://127.0.0.1:8080/v1/stream"


async def main():
    # A fresh token from the client credentials grant: now, at every refresh, after a restart.
    tokens = client_credentials(ISSUER, "demo", os.environ["TICKGATE_DEMO_SECRET"])
    async with Stream(STREAM, tokens, feed="DEMO", symbols=["AAPL", "MSFT"], records=True) as stream:
        async for item in stream:
            if isinstance(item, Trade):
                side = {1: "buy", 2: "sell"}.get(item.side, "?")
                print(f"{stream.symbol(item):5} {side:4} {item.size:>6.0f} @ {item.price:.2f}  seq {item.seq}")
            elif isinstance(item, Refreshed):
                print(f"token refreshed in band, valid until {item.exp}")


asyncio.run(main())
