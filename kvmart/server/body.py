"""Request bodies: read within the size limit (HTTP 413 beyond it), parsed as JSON (HTTP 400 if malformed) and
validated into a pydantic model (HTTP 400 naming the field, as OpenAI answers; never FastAPI's 422).

JSON that Python's parser accepts but nothing downstream can use is refused here, once, for every endpoint, with
the parameter named: a lone surrogate in a string (`"\ud800"`: no UTF-8 text, so no tokenizer, can hold it), NaN
and Infinity (not JSON), and nesting deeper than MAX_JSON_DEPTH (deep enough for any request; deeper ones made
recursive code overflow)."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from kvmart.errors import BodyTooLargeError, RequestError

T = TypeVar("T", bound=BaseModel)
DRAIN_FACTOR = 8  # an oversized body is read (and dropped) up to this many limits, so the client sees the 413
MAX_JSON_DEPTH = 32  # objects and arrays within one another; a chat request needs 5


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
    return parse_json(await read_body(request, max_bytes))


def parse_json(raw: bytes | str) -> dict:
    """`raw` as a JSON object whose every string is text and whose nesting is within MAX_JSON_DEPTH;
    RequestError (400) naming where it is not."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError as e:
        raise RequestError(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                           code="invalid_json") from e
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    check_values(body)
    return body


def _no_constant(name: str) -> object:
    raise RequestError(f"the request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


def check_values(body: dict) -> None:
    """RequestError naming the first string that is not text (a lone surrogate) or the first value nested beyond
    MAX_JSON_DEPTH. Iterative: a hostile depth cannot overflow the stack here."""
    stack: list[tuple[object, tuple[str, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        where = ".".join(path) or None
        if len(path) > MAX_JSON_DEPTH:
            raise RequestError(f"{path[0]} is nested too deeply (at most {MAX_JSON_DEPTH} levels)", path[0],
                               "invalid_json")
        if isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, where)
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, str(i))) for i, item in enumerate(value))


def _check_text(text: str, where: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"invalid value for {where or 'the body'}: a string holds a lone surrogate "
                           f"({text[e.start]!r} at position {e.start}), which is not text", where,
                           "invalid_text") from e


def parse(model: type[T], body: dict) -> T:
    """`body` validated as `model`; RequestError naming the first offending field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        raise RequestError(f"invalid value for {where or 'the body'}: {first['msg']}", where) from e
