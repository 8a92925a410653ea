"""A `kvmart serve` process for the tests that kill one (crash, fault injection): a real node on a free loopback
port, on the test's data dir (KVMART_DATA_DIR). Not a test module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
from pg_support import free_port
from server_support import wait_until

MODEL = "builtin:tiny"


class Node:
    """`kvmart serve` started and waited for; `kill()` is SIGKILL (no shutdown, no cleanup)."""

    def __init__(self, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from kvmart.cli.main import main; main()", "serve", "--port", str(self.port)],
            env={**os.environ, "KVMART_MODEL": MODEL, "KVMART_ADMIN_KEY": "a" * 32, **env},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until(self.is_up, "kvmart serve to listen")
        assert self.process.poll() is None, self.process.communicate()

    def is_up(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return self.process.poll() is not None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.communicate()
