"""The README's example runs as written against a server with short tokens, prints
trades and keeps printing them after an in-band refresh."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tgserver import SECRET

README = Path(__file__).resolve().parents[1] / "README.md"
TRADE_LINE = re.compile(r"^(AAPL |MSFT ) (buy |sell|\?   ) +\d+ @ \d+\.\d\d  seq \d+$")


def example_code() -> str:
    text = README.read_text()
    marker = text.index("<!-- readme-example")
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, marker)
    assert m, "no python block after the readme-example marker"
    return m.group(1)


def test_readme_example_streams_and_survives_a_refresh(make_server, tmp_path):
    srv = make_server(issuer="token_ttl_s = 6")
    host = srv.base_url.split("://", 1)[1]
    code = example_code()
    assert code.count("127.0.0.1:8080") == 2
    script = tmp_path / "example.py"
    script.write_text(code.replace("127.0.0.1:8080", host))
    out = tmp_path / "out.txt"
    env = dict(os.environ, TICKGATE_DEMO_SECRET=SECRET, PYTHONUNBUFFERED="1")
    with open(out, "wb") as o:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=o, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            lines = out.read_text(errors="replace").splitlines()
            refreshed = [k for k, line in enumerate(lines) if line.startswith("token refreshed in band")]
            if refreshed and any(TRADE_LINE.match(line) for line in lines[refreshed[0] + 1:]):
                break
            assert proc.poll() is None, "the example ended:\n" + "\n".join(lines[-30:])
            assert time.monotonic() < deadline, "no trade after a refresh within 60 s:\n" + "\n".join(lines[-30:])
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    trades = [line for line in lines if TRADE_LINE.match(line)]
    assert trades and all(line.split()[0] in ("AAPL", "MSFT") for line in trades)
    assert not any("Traceback" in line for line in lines[: refreshed[0] + 1])


def test_the_example_file_is_the_readme_example():
    """examples/stream.py (what the top-level README runs) is the README's example."""
    example = Path(__file__).resolve().parents[1] / "examples" / "stream.py"
    assert example.read_text().endswith(example_code())
