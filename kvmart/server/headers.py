"""Headers every response carries, so that the official clients' own accessors work against kvmart: a request id
(`x-request-id`, which openai's `_request_id` reads, and the same id as `request-id`, which anthropic's reads), and
on API requests with a key the key's request budget as its client family names it: Anthropic's
`anthropic-ratelimit-requests-*` for the Anthropic paths and for any request sent with an `anthropic-version`
header (every anthropic client sends one), OpenAI's `x-ratelimit-*-requests` otherwise. The budget is read from
the per-key limiter (kvmart/server/limits.py: this node's, or the cluster's in Redis) when the response starts,
so a 429 says `remaining 0`."""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
from datetime import UTC, datetime, timedelta

from starlette.datastructures import Headers, MutableHeaders

from kvmart.server.auth import api_key
from kvmart.server.limits import Budget, KeyLimiter, Limiter

ANTHROPIC_PATHS = ("/v1/messages",)  # and below it: /v1/messages/count_tokens
EXPOSED_HEADERS = ("x-request-id", "request-id", "retry-after", "x-ratelimit-limit-requests",
                   "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                   "anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining",
                   "anthropic-ratelimit-requests-reset")  # what a browser's script may read (CORS)


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def is_anthropic(path: str, headers: Headers) -> bool:
    """Whether the caller speaks Anthropic's dialect: its paths, or its client's `anthropic-version` header."""
    return "anthropic-version" in headers or any(path == p or path.startswith(p + "/") for p in ANTHROPIC_PATHS)


def duration_text(seconds: float) -> str:
    """OpenAI's reset format: '1s', '6m0s', '1h2m3s' (whole seconds, rounded up)."""
    total = math.ceil(max(seconds, 0.0))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def budget_headers(budget: Budget, anthropic: bool, now: datetime | None = None) -> dict[str, str]:
    """The request budget in the header names of the API family (`anthropic` or OpenAI)."""
    if anthropic:
        reset = (now or datetime.now(UTC)) + timedelta(seconds=math.ceil(budget.reset_seconds))
        return {"anthropic-ratelimit-requests-limit": str(budget.limit_per_minute),
                "anthropic-ratelimit-requests-remaining": str(budget.remaining),
                "anthropic-ratelimit-requests-reset": reset.strftime("%Y-%m-%dT%H:%M:%SZ")}
    return {"x-ratelimit-limit-requests": str(budget.limit_per_minute),
            "x-ratelimit-remaining-requests": str(budget.remaining),
            "x-ratelimit-reset-requests": duration_text(budget.reset_seconds)}


class ResponseHeaders:
    """ASGI middleware: a request id on every HTTP response (also in `scope["state"]["request_id"]`), and on /v1
    requests that carry an API key its request budget. Placed outside the per-key limits, so 429s get them too."""

    def __init__(self, app, limiter: Limiter) -> None:
        self.app, self.limiter = app, limiter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        request_headers = Headers(scope=scope)
        key = api_key(request_headers) if scope["path"].startswith("/v1/") else None
        anthropic = is_anthropic(scope["path"], request_headers)

        async def stamp(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = headers["request-id"] = request_id
                # keys are told apart by their sha256, as the limiter's middleware does (limits.py)
                budget = None if key is None else await self.budget(hashlib.sha256(key.encode()).hexdigest())
                if budget is not None:
                    headers.update(budget_headers(budget, anthropic))
            await send(message)

        await self.app(scope, receive, stamp)

    async def budget(self, digest: str) -> Budget | None:
        if isinstance(self.limiter, KeyLimiter):
            return self.limiter.budget(digest)  # in memory
        return await asyncio.to_thread(self.limiter.budget, digest)  # a round trip to Redis: off the event loop
