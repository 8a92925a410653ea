"""Per-key limits: how many requests one API key may start per minute (a token bucket: `rate_limit_burst` at once,
then `rate_limit_per_minute`) and how many it may have in flight at once (`max_concurrent_per_key`). Beyond
either: HTTP 429 with Retry-After, before the request is read, authenticated or queued, so a flood from one key
costs the node almost nothing and cannot starve other keys of the model worker's queue.

Applied as ASGI middleware to /v1 requests that carry a key (a request without one is refused as 401 anyway),
and to the web page's POSTs by their session;
keys are told apart by their sha256, so an unknown key is limited like a known one (no free brute force). A
request is in flight until its response is complete, streams included."""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie

from starlette.datastructures import Headers

from kvmart.errors import RateLimitedError
from kvmart.server.auth import api_key
from kvmart.server.config import ServerSettings
from kvmart.server.errors import HttpError, http_error

DRAIN_LIMIT_BYTES = 1 << 20  # a refused request's body is read up to this, to keep its connection usable
MAX_TRACKED_KEYS = 100_000  # idle keys beyond this are forgotten (a full bucket and nothing in flight: no state)


@dataclass(frozen=True)
class Budget:
    """A key's request budget at one moment (read-only; for the response headers of kvmart/server/headers.py)."""

    limit_per_minute: int
    remaining: int  # requests it may start now
    reset_seconds: float  # until its bucket is full again


@dataclass
class _KeyState:
    tokens: float
    updated: float
    in_flight: int = 0


class KeyLimiter:
    """Thread-safe. `acquire(key)` admits a request or raises RateLimitedError; `release(key)` when it ends."""

    def __init__(self, per_minute: int, burst: int, max_concurrent: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second, self.burst, self.max_concurrent = per_minute / 60.0, burst, max_concurrent
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._lock = threading.Lock()

    @property
    def is_active(self) -> bool:
        return bool(self.per_second or self.max_concurrent)

    def acquire(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            state = self._keys.get(key)
            if state is None:
                state = self._keys[key] = _KeyState(float(self.burst), now)
                self._forget_idle()
            if self.per_second:
                state.tokens = min(float(self.burst), state.tokens + (now - state.updated) * self.per_second)
                state.updated = now
            if self.max_concurrent and state.in_flight >= self.max_concurrent:
                raise RateLimitedError(f"too many concurrent requests for this API key: {state.in_flight} in "
                                       f"flight, the limit is {self.max_concurrent}; wait for one to finish", 1)
            if self.per_second:
                if state.tokens < 1:
                    wait = math.ceil((1 - state.tokens) / self.per_second)
                    raise RateLimitedError(f"rate limit exceeded for this API key: at most "
                                           f"{round(self.per_second * 60)} requests per minute (bursts of "
                                           f"{self.burst}); retry in {wait} s", wait)
                state.tokens -= 1
            state.in_flight += 1

    def budget(self, key: str) -> Budget | None:
        """Read-only: `key`'s budget now (a key never seen has a full bucket); None without a per-minute rate."""
        if not self.per_second:
            return None
        with self._lock:
            state, now = self._keys.get(key), self.clock()
            tokens = float(self.burst) if state is None else min(
                float(self.burst), state.tokens + (now - state.updated) * self.per_second)
        return Budget(round(self.per_second * 60), max(0, math.floor(tokens)),
                      (self.burst - tokens) / self.per_second)

    def release(self, key: str) -> None:
        with self._lock:
            state = self._keys.get(key)
            if state is not None and state.in_flight > 0:
                state.in_flight -= 1

    def _forget_idle(self) -> None:
        if len(self._keys) <= MAX_TRACKED_KEYS:
            return
        now = self.clock()
        for key, state in list(self._keys.items()):
            full = not self.per_second or state.tokens + (now - state.updated) * self.per_second >= self.burst
            if state.in_flight == 0 and full:
                del self._keys[key]


def limiter_for(settings: ServerSettings) -> KeyLimiter:
    per_minute = settings.rate_limit_per_minute
    return KeyLimiter(per_minute, settings.rate_limit_burst if per_minute else 0, settings.max_concurrent_per_key)


class KeyLimits:
    """ASGI middleware applying a KeyLimiter to /v1 requests; `respond(path, error)` writes the 429."""

    def __init__(self, app, limiter: KeyLimiter, respond: Callable[[str, HttpError], object],
                 on_reject: Callable[[], None] = lambda: None, session_cookie: str | None = None,
                 session_key: Callable[[str], str | None] = lambda token: None) -> None:
        """`session_cookie`, `session_key`: the web page's cookie, and the API key its session token signed in
        with (None: none), so the page's POSTs share their key's budget with the API."""
        self.app, self.limiter, self.respond, self.on_reject = app, limiter, respond, on_reject
        self.session_cookie, self.session_key = session_cookie, session_key

    def key_of(self, scope) -> str | None:
        """What a request is limited by: its API key on /v1 paths, and on the web page's POSTs the key its
        session signed in with (a question asked on the page runs the same model); None: not limited."""
        headers = Headers(scope=scope)
        if scope["path"].startswith("/v1/"):
            return api_key(headers)
        if self.session_cookie and scope["method"] == "POST":
            token = SimpleCookie(headers.get("cookie", "")).get(self.session_cookie)
            return None if token is None else self.session_key(token.value)
        return None

    async def __call__(self, scope, receive, send: Callable[[dict], Awaitable[None]]) -> None:
        key = self.key_of(scope) if scope["type"] == "http" and self.limiter.is_active else None
        if key is None:
            return await self.app(scope, receive, send)
        digest = hashlib.sha256(key.encode()).hexdigest()
        try:
            self.limiter.acquire(digest)
        except RateLimitedError as e:
            self.on_reject()
            response = self.respond(scope["path"], http_error(e))
            if not await _drain(receive):
                response.headers["connection"] = "close"
            return await response(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(digest)


async def _drain(receive, limit_bytes: int = DRAIN_LIMIT_BYTES) -> bool:
    """Read (and drop) the refused request's body, so that its connection can carry the next request: a response
    sent before the body is read closes the connection under the client, which may already be reusing it. False
    if the body is longer than `limit_bytes` or the client left (the connection is then closed)."""
    received = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
        if received > limit_bytes:
            return False
