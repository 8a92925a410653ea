"""Who is calling: every /v1 request authenticates with an API key (`Authorization: Bearer KEY`, or Anthropic's
`x-api-key: KEY`), looked up in the ledger by its sha256. No key, an unknown key or a revoked one is HTTP 401."""

from __future__ import annotations

import hashlib
import json

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from kvmart.errors import AuthenticationError, ForbiddenError, RequestError
from kvmart.ledger import Account
from kvmart.ledger.entries import article
from kvmart.server.pipeline.services import Services

IDEMPOTENCY_HEADER = "idempotency-key"
MAX_IDEMPOTENCY_KEY_CHARS = 255


def api_key(headers: Headers) -> str | None:
    auth = headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "").strip()
    return key or None


async def caller(request: Request) -> Account:
    """The authenticated account; AuthenticationError (401) otherwise."""
    key = api_key(request.headers)
    if key is None:
        raise AuthenticationError("missing API key: send `Authorization: Bearer KEY` (or `x-api-key: KEY`); "
                                  "`kvmart accounts create NAME --role agent` makes one")
    services: Services = request.app.state.services
    return await run_in_threadpool(services.ledger.authenticate, key)


def require_role(account: Account, *roles: str) -> None:
    """ForbiddenError (403) unless the account has one of `roles` or is the admin."""
    if not account.is_admin and account.role not in roles:
        needed = " or ".join(roles)
        raise ForbiddenError(f"account {account.name!r} is {article(account.role)} {account.role}; this needs "
                             f"{article(needed)} {needed} account")


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise RequestError(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters", "Idempotency-Key")
    return key


def request_hash(endpoint: str, body: dict) -> str:
    """What identifies a request for idempotency: the endpoint it was sent to (a key charged on one endpoint never
    replays on another) and its JSON body, canonically written: keys sorted, and a whole number written as an
    integer however it was sent (`0`, `0.0` and `0e0` are one temperature)."""
    canonical = json.dumps([endpoint, _canonical(body)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _canonical(value: object) -> object:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value
