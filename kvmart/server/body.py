"""Request bodies: read within the size limit (HTTP 413 beyond it), parsed as JSON (HTTP 400 if malformed) and
validated into a pydantic model (HTTP 400 naming the field, as OpenAI answers; never FastAPI's 422)."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from kvmart.errors import BodyTooLargeError, RequestError

T = TypeVar("T", bound=BaseModel)
DRAIN_FACTOR = 8  # an oversized body is read (and dropped) up to this many limits, so the client sees the 413


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body; BodyTooLargeError if it is longer than `max_bytes`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes * DRAIN_FACTOR:
        raise BodyTooLargeError(max_bytes)
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received <= max_bytes:
            chunks.append(chunk)
        elif received > max_bytes * DRAIN_FACTOR:
            break
    if received > max_bytes:
        raise BodyTooLargeError(max_bytes)
    return b"".join(chunks)


async def read_json(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object."""
    raw = await read_body(request, max_bytes)
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    return body


def parse(model: type[T], body: dict) -> T:
    """`body` validated as `model`; RequestError naming the first offending field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        raise RequestError(f"invalid value for {where or 'the body'}: {first['msg']}", where) from e
