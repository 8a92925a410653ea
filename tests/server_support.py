"""Helpers for the server tests: a real uvicorn server on a free loopback port in a background thread, and a
Prometheus text parser. Not a test module (pytest collects test_*.py only)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx
import uvicorn

from kvmart.app import create_app
from kvmart.cluster.local import HANG_SECONDS
from kvmart.config import Settings
from kvmart.runtime.model import Model
from kvmart.server import ServerSettings
from kvmart.server.pipeline.services import Services

# how long to wait for something that must happen: a guard against hangs, never a timing (a loaded machine is slow)
DEADLINE_SECONDS = HANG_SECONDS


class LiveServer:
    """`with LiveServer(...) as s:` serves create_app(...) on 127.0.0.1:<free port> until the block ends. Its
    ledger (SQLite in `data_dir`) has a funded `publisher` and a funded `agent`; `http` sends the agent's key and
    `publish` the publisher's."""

    def __init__(self, model: Model, data_dir: Path, store: str = "", chunk_tokens: int = 256,
                 **server: object) -> None:
        """`store`: the store URL (default: a disk store in `data_dir`); `server`: ServerSettings overrides."""
        settings = Settings(data_dir=data_dir, model=model.spec, dtype=model.dtype_name, attention=model.attention,
                            store=store, chunk_tokens=chunk_tokens)
        base = ServerSettings(port=0, log_level="warning", rate_limit_per_minute=0, max_concurrent_per_key=0,
                              signin_attempts_per_minute=0)
        self.app = create_app(settings, base.with_overrides(**server), model)  # limits: off unless asked
        self.publisher_key = self.account("publisher", "publisher")
        self.agent_key = self.account("agent", "agent")
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=None))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    @property
    def services(self) -> Services:
        return self.app.state.services

    def __enter__(self) -> "LiveServer":
        """Start serving; return once uvicorn says it listens (its own `started` flag, set after its start-up: no
        wall-clock allowance). If it dies or hangs instead, it is stopped before the error is raised."""
        self.thread.start()
        try:
            wait_until(lambda: self.server.started or not self.thread.is_alive(), "the server to start")
            assert self.server.started, "the server thread ended before it listened (see the log above)"
        except BaseException:
            self.stop()
            raise
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=DEADLINE_SECONDS,
                                 headers={"Authorization": f"Bearer {self.agent_key}"})
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(DEADLINE_SECONDS)
        assert not self.thread.is_alive(), "the server did not shut down"

    def __exit__(self, *exc) -> None:
        try:
            self.http.close()
        finally:
            if self.thread.is_alive():
                self.stop()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.http.get("/metrics").text)

    def account(self, name: str, role: str, usd: str = "100") -> str:
        """A new account with `usd` dollars; its API key."""
        _, key = self.services.ledger.create_account(name, role)
        if Decimal(usd) > 0:
            self.services.ledger.deposit(name, Decimal(usd))
        return key

    def verify_owner(self, name: str, source: str) -> None:
        """Account `name` proved control of the origin of `source`, as POST /v1/claims/{id}/verify records it when
        the token is found (tests/test_server_market.py drives that flow itself): its documents with a source
        there are paid their royalties at once instead of into escrow (docs/LEDGER.md)."""
        ledger = self.services.ledger
        ledger.mark_claim_verified(ledger.new_claim(ledger.account(name), source))

    def publish(self, text: str | None, key: str | None = None, **fields: object) -> httpx.Response:
        """POST /v1/documents with `key` (default: the publisher's); text None leaves it out."""
        headers = {"Authorization": f"Bearer {key or self.publisher_key}"}
        body = {"text": text, **fields} if text is not None else fields
        return self.http.post("/v1/documents", json=body, headers=headers)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.01)


def parse_metrics(text: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample line (labels as written, sorted by the exporter)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = re.fullmatch(r"(\S+?(?:\{.*\})?) (\S+)", line)
            assert match, f"not a Prometheus sample line: {line!r}"
            values[match.group(1)] = float(match.group(2))
    return values
