"""A `kvmart serve` process for the tests that kill one (crash, fault injection): a real node on a free loopback
port, on the test's data dir (KVMART_DATA_DIR), ready when it logs that it listens (kvmart/cluster/local.py
LogWatch: no wall-clock allowance). Every node started during a test is killed when the test ends, even when it
fails (conftest.py `stop_leftover_nodes`). Not a test module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import ClassVar

from pg_support import free_port

from kvmart.cluster.local import KVMART_READY, LogWatch

MODEL = "builtin:tiny"


class Node:
    """`kvmart serve` started and waited for; `kill()` is SIGKILL (no shutdown, no cleanup)."""

    started: ClassVar[list["Node"]] = []  # every node started, for the end-of-test sweep

    def __init__(self, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from kvmart.cli.main import main; main()", "serve", "--port", str(self.port)],
            env={**os.environ, "KVMART_MODEL": MODEL, "KVMART_ADMIN_KEY": "a" * 32, "KVMART_LOG_LEVEL": "info", **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        Node.started.append(self)
        assert self.process.stdout is not None
        self.output = LogWatch(self.process.stdout, KVMART_READY)
        try:
            self.output.wait_ready(f"kvmart serve on port {self.port}")
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    @classmethod
    def kill_all(cls) -> None:
        """Kill every node still running (the end-of-test sweep)."""
        while cls.started:
            cls.started.pop().kill()
