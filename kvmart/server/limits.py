"""Per-key limits: how many requests one API key may start per minute (a token bucket: `rate_limit_burst` at once,
then `rate_limit_per_minute`) and how many it may have in flight at once (`max_concurrent_per_key`). Beyond
either: HTTP 429 with Retry-After, before the request is read, authenticated or queued, so a flood from one key
costs the node almost nothing and cannot starve other keys of the model worker's queue.

Applied as ASGI middleware to /v1 requests that carry a key (a request without one is refused as 401 anyway),
and to the web page's POSTs by their session;
keys are told apart by their sha256, so an unknown key is limited like a known one (no free brute force). A
request is in flight until its response is complete, streams included.

Where the limits live: in this node's memory (`KeyLimiter`: with N nodes a key gets N times its limit), or, when
the cluster has a Redis tier, in Redis (`SharedKeyLimiter`, kvmart/cluster/state.py: one limit across the
cluster). A node that cannot reach Redis falls back to its own memory until Redis answers again (it logs so):
limits loosen to per-node, they never refuse everything."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Protocol

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import Send

from kvmart.cluster.state import RedisState
from kvmart.errors import RateLimitedError, StoreUnavailableError
from kvmart.server.auth import api_key
from kvmart.server.config import ServerSettings
from kvmart.server.errors import HttpError, http_error

log = logging.getLogger("kvmart.server")
DRAIN_LIMIT_BYTES = 1 << 20  # a refused request's body is read up to this, to keep its connection usable
RETRY_SECONDS = 2.0  # a Redis that failed is tried again after this long (meanwhile: this node's memory)
MAX_TRACKED_KEYS = 100_000  # idle keys beyond this are forgotten (a full bucket and nothing in flight: no state)


@dataclass(frozen=True)
class Budget:
    """A key's request budget at one moment (read-only; for the response headers of kvmart/server/headers.py)."""

    limit_per_minute: int
    remaining: int  # requests it may start now
    reset_seconds: float  # until its bucket is full again

Release = Callable[[], None]


class Limiter(Protocol):
    """Admits requests of a key (its sha256 digest) or refuses them."""

    @property
    def is_active(self) -> bool: ...

    def admit(self, key: str) -> Release:
        """RateLimitedError, or a function to call once when the admitted request ends."""
        ...

    def budget(self, key: str) -> Budget | None:
        """Read-only: the key's budget now (a key never seen has a full bucket); None without a per-minute rate."""
        ...


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
    def admit(self, key: str) -> Release:
        self.acquire(key)
        return lambda: self.release(key)

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


class SharedKeyLimiter:
    """The limits of a KeyLimiter, kept in Redis for the whole cluster (one atomic script per admission). While
    Redis cannot be reached, `local` (this node's own KeyLimiter with the same limits) admits instead."""

    def __init__(self, state: RedisState, local: KeyLimiter, per_minute: int, burst: int, max_concurrent: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state, self.local, self.clock = state, local, clock
        self.per_minute, self.burst, self.max_concurrent = per_minute, burst, max_concurrent
        self._down_until: float | None = None  # Redis failed: admit locally until then, then try it again

    @property
    def is_active(self) -> bool:
        return bool(self.per_minute or self.max_concurrent)

    def admit(self, key: str) -> Release:
        if not self.is_active:
            return lambda: None  # no limit to keep: no round trip
        if self._down_until is not None and self.clock() < self._down_until:
            return self.local.admit(key)  # no request waits on a down Redis' timeouts
        try:
            request_id = self.state.admit(key, self.per_minute, self.burst, self.max_concurrent)
        except StoreUnavailableError as e:
            if self._down_until is None:
                log.warning("per-key limits fall back to this node's memory (per node, not per cluster): %s", e)
            self._down_until = self.clock() + RETRY_SECONDS
            return self.local.admit(key)
        if self._down_until is not None:
            log.warning("per-key limits are cluster-wide again (redis answers)")
            self._down_until = None

        def release() -> None:
            with contextlib.suppress(StoreUnavailableError):  # else the lease expires by itself
                self.state.release(key, request_id)

        return release


    def budget(self, key: str) -> Budget | None:
        if not self.per_minute:
            return None
        if self._down_until is not None and self.clock() < self._down_until:
            return self.local.budget(key)
        try:
            tokens = self.state.tokens(key, self.per_minute, self.burst)
        except StoreUnavailableError:
            return self.local.budget(key)  # admit() notices and logs the fallback
        per_second = self.per_minute / 60.0
        return Budget(self.per_minute, max(0, math.floor(tokens)), (self.burst - tokens) / per_second)

def limiter_for(settings: ServerSettings, state: RedisState | None = None) -> Limiter:
    """The per-key limiter of `settings`: in Redis when the cluster shares `state`, else in this node's memory."""
    per_minute = settings.rate_limit_per_minute
    burst = settings.rate_limit_burst if per_minute else 0
    local = KeyLimiter(per_minute, burst, settings.max_concurrent_per_key)
    if state is None:
        return local
    return SharedKeyLimiter(state, local, per_minute, burst, settings.max_concurrent_per_key)


def signin_limiter_for(settings: ServerSettings, state: RedisState | None = None) -> Limiter:
    """Sign-in attempts per client address (a rate, no concurrency limit): a guesser gets
    `signin_attempts_per_minute` tries a minute, however many nodes or keys it tries."""
    per_minute = settings.signin_attempts_per_minute
    local = KeyLimiter(per_minute, per_minute, 0)
    return local if state is None else SharedKeyLimiter(state, local, per_minute, per_minute, 0)


class KeyLimits:
    """ASGI middleware applying a KeyLimiter to /v1 requests; `respond(path, error)` writes the 429."""

    def __init__(self, app, limiter: Limiter, respond: Callable[[str, HttpError], Response],
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

    async def __call__(self, scope, receive, send: Send) -> None:
        key = self.key_of(scope) if scope["type"] == "http" and self.limiter.is_active else None
        if key is None:
            return await self.app(scope, receive, send)
        digest = hashlib.sha256(key.encode()).hexdigest()
        in_memory = isinstance(self.limiter, KeyLimiter)  # else a network round trip: off the event loop
        try:
            release = self.limiter.admit(digest) if in_memory else await asyncio.to_thread(self.limiter.admit, digest)
        except RateLimitedError as e:
            self.on_reject()
            response = self.respond(scope["path"], http_error(e))
            if not await _drain(receive):
                response.headers["connection"] = "close"
            return await response(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            if in_memory:
                release()
            else:
                await asyncio.to_thread(release)


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
