from __future__ import annotations

import asyncio
import time

import pytest

from tgserver import Server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One server shared by the tests that neither revoke, restart nor need short tokens."""
    s = Server(tmp_path_factory.mktemp("tickgate-shared")).start()
    yield s
    s.terminate()


@pytest.fixture
def make_server(tmp_path):
    """Starts dedicated servers (stopped at the end of the test)."""
    started: list[Server] = []

    def make(**kw) -> Server:
        s = Server(tmp_path / f"srv{len(started)}", **kw)
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.terminate()


async def wait_for(cond, timeout: float = 60.0, what: str = "condition", step: float = 0.02):
    """Polls ``cond()`` (sync) until true; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


class Collector:
    """Runs ``async for`` over a stream in a task and keeps every item."""

    def __init__(self, stream):
        self.stream = stream
        self.items: list = []
        self.error: BaseException | None = None
        self.task = asyncio.ensure_future(self._run())

    async def _run(self):
        try:
            async for item in self.stream:
                self.items.append(item)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            self.error = e

    def of(self, cls) -> list:
        return [i for i in self.items if isinstance(i, cls)]

    async def stop(self):
        await self.stream.close()
        try:
            await asyncio.wait_for(self.task, 30)
        except asyncio.TimeoutError:
            self.task.cancel()
