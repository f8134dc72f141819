"""Starts and stops the real tickgate server binary for the tests.

The binary is ``$TICKGATE_BIN`` or ``<repo>/target/debug/tickgate``. Each server runs in its
own temporary directory (no ``feeds/`` there, so it streams the compiled-in DEMO feed;
its epoch file goes to ``state/``), listens on 127.0.0.1 with an ephemeral port unless
told one, and is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
STARTUP = re.compile(r"^tickgate: stream (ws://\S+)\s+issuer (http://\S+)\s+admin (http://\S+)$", re.M)

SECRET = "demo-secret-for-tests"
OPS_SECRET = "ops-secret-for-tests"
CLIENTS = (
    f'clients = [ {{ id = "demo", secret = "{SECRET}", scopes = ["md:read:*"] }}, '
    f'{{ id = "ops", secret = "{OPS_SECRET}", scopes = ["md:read:*", "tickgate:admin"] }}, '
    f'{{ id = "other", secret = "{SECRET}", scopes = ["md:read:OTHER"] }} ]'
)


def binary() -> Path:
    p = Path(os.environ.get("TICKGATE_BIN") or REPO / "target" / "debug" / "tickgate").resolve()
    if not os.access(p, os.X_OK):
        raise RuntimeError(f"no tickgate binary at {p}: build it (cargo build) or set TICKGATE_BIN")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One tickgate process. ``issuer``/``server`` are extra TOML lines for those tables."""

    def __init__(self, workdir: Path, *, port: int | None = None, issuer: str = "", server: str = "", auth: str = ""):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.issuer_toml = issuer
        self.server_toml = server
        self.auth_toml = auth
        self.proc: subprocess.Popen | None = None
        self.stream_url = self.token_url = self.admin_url = self.base_url = ""
        self.starts = 0

    def config(self) -> str:
        listen = f"127.0.0.1:{self.port}" if self.port else "127.0.0.1:0"
        return (
            f'listen = "{listen}"\nadmin_listen = "127.0.0.1:0"\n\n'
            f'[server]\nstate_dir = "{self.dir / "state"}"\n{self.server_toml}\n\n'
            f"[issuer]\n{CLIENTS}\n{self.issuer_toml}\n\n"
            f"[auth]\n{self.auth_toml}\n"
        )

    def start(self, timeout: float = 60.0) -> "Server":
        cfg = self.dir / "tickgate.toml"
        cfg.write_text(self.config())
        self.starts += 1
        out = self.dir / f"stdout.{self.starts}.txt"
        err = self.dir / f"stderr.{self.starts}.txt"
        env = {k: v for k, v in os.environ.items() if k != "TICKGATE_DEMO_SECRET"}
        env.setdefault("RUST_LOG", "warn")
        with open(out, "wb") as o, open(err, "wb") as e:
            self.proc = subprocess.Popen(
                [str(binary()), "serve", "--config", str(cfg)], cwd=self.dir, stdout=o, stderr=e,
                stdin=subprocess.DEVNULL, env=env,
            )
        deadline = time.monotonic() + timeout
        while True:
            m = STARTUP.search(out.read_text(errors="replace"))
            if m:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"tickgate exited with {self.proc.returncode}: {err.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"tickgate printed no start-up line in {timeout} s: {err.read_text()[-2000:]}")
            time.sleep(0.02)
        self.stream_url, self.token_url, admin = m.group(1), m.group(2), m.group(3)
        self.admin_url = admin.rsplit("/metrics", 1)[0]
        self.base_url = self.token_url.rsplit("/oauth2/token", 1)[0]
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit; SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stderr(self) -> str:
        return (self.dir / f"stderr.{self.starts}.txt").read_text(errors="replace")

    def revoke(self, admin_token: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.admin_url + "/admin/revoke", data=json.dumps(body).encode(), method="POST",
            headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as r:
            return json.loads(r.read())
