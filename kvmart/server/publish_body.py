"""Publish bodies (POST /v1/documents), which may carry an uploaded artifact of up to `max_artifact_bytes`, in
base64 in the JSON field `artifact`: a body of up to max_body_bytes + 4/3 max_artifact_bytes (1.4 GB by default).

Read whole, such a body was held three times over (the bytes, the JSON string, the decoded artifact: +131 MB of
memory for a 45 MB body). Here a body no larger than `max_body_bytes` is read into memory as any other; a larger
one is streamed to an unnamed temporary file in the data directory (gone when closed, even after a kill -9; never
/tmp, which may be RAM), then scanned once: the artifact's base64 is decoded piece by piece into a second unnamed
file, and every other field is parsed within `max_body_bytes`. The artifact is verified from that file, mapped
(kvmart/reuse/upload.py), never copied into the heap.

The bound: a large body holds at most `max_body_bytes` of fields and a 64 KiB read buffer in memory while it is
read; verifying its artifact then holds the recomputed KV of one chunk at a time over the mapped upload (page
cache, which the kernel may reclaim). At most `max_concurrent_uploads` large bodies are read and verified at once
(more get 429 with Retry-After), so the worst case is that many times the above (docs/SECURITY.md)."""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import Request

from kvmart.errors import BodyTooLargeError, RateLimitedError, RequestError, TooLargeError
from kvmart.server.body import DRAIN_FACTOR, MAX_JSON_DEPTH, check_values, parse_json
from kvmart.server.config import ServerSettings

CHUNK_BYTES = 1 << 16
UPLOAD_RETRY_SECONDS = 5
_WHITESPACE = b" \t\r\n"


def _no_constant(name: str) -> object:
    raise RequestError(f"the request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


DECODER = json.JSONDecoder(parse_constant=_no_constant)


class UploadSlots:
    """How many large publish bodies are read and verified at once; beyond `limit`, RateLimitedError (429). Used
    from the event loop only (no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.taken = limit, 0

    def take(self) -> None:
        if self.taken >= self.limit:
            raise RateLimitedError(f"{self.limit} large publish bodies (with an artifact) are being received and "
                                   f"verified already; retry in {UPLOAD_RETRY_SECONDS} s", UPLOAD_RETRY_SECONDS)
        self.taken += 1

    def give_back(self) -> None:
        self.taken -= 1


@dataclass
class PublishBody:
    """A publish request's fields (every one but `artifact`) and its artifact: bytes (a small body), an open
    unnamed file (a large one) or None. `close` frees the file and the upload slot."""

    fields: dict
    artifact: bytes | BinaryIO | None = None
    slots: UploadSlots | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.artifact is not None and not isinstance(self.artifact, bytes):
            self.artifact.close()
        if self.slots is not None:
            self.slots.give_back()
            self.slots = None


async def read_publish_body(request: Request, server: ServerSettings, spool_dir: Path,
                            slots: UploadSlots) -> PublishBody:
    """The body of a publish request, within `server`'s limits: BodyTooLargeError (413) beyond max_body_bytes +
    4/3 max_artifact_bytes, TooLargeError (413) for an artifact beyond max_artifact_bytes or other fields beyond
    max_body_bytes, RequestError (400) for malformed JSON or an artifact that is not base64, RateLimitedError (429)
    when `slots` are all taken. The caller closes the result."""
    limit = server.max_body_bytes + 4 * -(-server.max_artifact_bytes // 3)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit * DRAIN_FACTOR:
        raise BodyTooLargeError(limit)
    memory, spool, received, slot = bytearray(), None, 0, False
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                if received > limit * DRAIN_FACTOR:
                    break
                continue  # read and dropped, so that the client sees the 413
            if spool is None and received > server.max_body_bytes:  # a large body: to a file, if a slot is free
                slots.take()
                slot = True
                spool_dir.mkdir(parents=True, exist_ok=True)
                spool = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115  (closed below or by the result)
                spool.write(memory)
                memory = bytearray()
            if spool is not None:
                spool.write(chunk)
            else:
                memory += chunk
        if received > limit:
            raise BodyTooLargeError(limit)
        if spool is None:
            fields = parse_json(bytes(memory))
            return PublishBody(fields, _decoded(fields.pop("artifact", None)))
        spool.seek(0)
        out = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115  (handed to the result, which closes it)
        try:
            fields, has_artifact = split_publish_json(spool, out, server.max_body_bytes, server.max_artifact_bytes)
        except BaseException:
            out.close()
            raise
        out.seek(0)
        if not has_artifact:
            out.close()
        return PublishBody(fields, out if has_artifact else None, slots)
    except BaseException:
        if slot:
            slots.give_back()
        raise
    finally:
        if spool is not None:
            spool.close()


def _decoded(encoded: object) -> bytes | None:
    if encoded is None:
        return None
    if not isinstance(encoded, str):
        raise RequestError("artifact must be the artifact file in base64, as a JSON string", "artifact")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"artifact must be the artifact file in base64 ({e})", "artifact") from e


class _Scanner:
    """A JSON text read from a file through a bounded buffer."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.buffer, self.at, self.is_eof = f, b"", 0, False

    def fill(self, n: int) -> None:
        """Have at least `n` bytes buffered past the position, unless the file ends first."""
        if len(self.buffer) - self.at >= n or self.is_eof:
            return
        parts = [self.buffer[self.at:]]
        have = len(parts[0])
        while have < n:
            data = self.f.read(max(CHUNK_BYTES, n - have))
            if not data:
                self.is_eof = True
                break
            parts.append(data)
            have += len(data)
        self.buffer, self.at = b"".join(parts), 0

    def peek(self) -> bytes:
        self.skip_space()
        return self.buffer[self.at:self.at + 1]

    def skip_space(self) -> None:
        while True:
            self.fill(1)
            while self.at < len(self.buffer) and self.buffer[self.at] in _WHITESPACE:
                self.at += 1
            if self.at < len(self.buffer) or self.is_eof:
                return

    def expect(self, token: bytes) -> None:
        if self.peek() != token:
            raise RequestError(f"the request body is not valid JSON: expected {token.decode()!r}", code="invalid_json")
        self.at += 1

    def value(self, budget: int) -> tuple[object, int]:
        """The JSON value at the position and its size in bytes; TooLargeError if it does not end within
        `budget` bytes, RequestError if it is malformed. Reads only as far as the value goes (a window that grows
        fourfold until the value ends inside it): a small field costs a small buffer."""
        self.skip_space()
        size = CHUNK_BYTES
        while True:
            limit = min(size, budget + 1)
            self.fill(limit)
            window = self.buffer[self.at:self.at + limit]
            is_last = len(window) < limit or limit > budget  # the body, or the budget, ends within this window
            try:
                text, _ = codecs.utf_8_decode(window, "strict", False)
                value, end = DECODER.raw_decode(text)
                number_may_go_on = isinstance(value, int | float) and text[end:end + 1] in ("", *"0123456789.eE+-")
                if is_last or (end < len(text) and not number_may_go_on):  # it surely ends inside the window
                    break
            except UnicodeDecodeError as e:
                raise RequestError(f"the request body is not UTF-8 (invalid byte at offset {e.start})",
                                   code="invalid_json") from e
            except RecursionError as e:
                raise RequestError(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                                   code="invalid_json") from e
            except json.JSONDecodeError as e:  # malformed, or cut by the window's edge: a wider one tells
                if not is_last:
                    size *= 4
                    continue
                if limit > budget and len(window) > budget:
                    raise TooLargeError(f"the publish request's fields other than its artifact exceed {budget:,} "
                                        "bytes (max_body_bytes)", "text") from e
                raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from e
            size *= 4
        used = len(text[:end].encode())
        self.at += used
        return value, used

    def base64_string(self, out: BinaryIO, max_bytes: int) -> int:
        """Decode the JSON string at the position (base64; its only escape allowed is `\\/`) into `out`, piece by
        piece; the bytes written. TooLargeError beyond `max_bytes`, RequestError if it is not base64."""
        self.expect(b'"')
        pending, written, ended = b"", 0, False
        while not ended:
            self.fill(CHUNK_BYTES)
            data = self.buffer[self.at:]
            if not data:
                raise RequestError("the request body ends inside the artifact string", "artifact", "invalid_json")
            quote = data.find(b'"')
            ended = quote >= 0
            piece = data[:quote] if ended else data
            self.at += len(piece) + ended
            pending += piece
            held = b"\\" if not ended and pending.endswith(b"\\") else b""  # an escape cut by the buffer
            pending = pending[:len(pending) - len(held)].replace(b"\\/", b"/")
            if b"\\" in pending:
                raise RequestError("artifact must be plain base64 (a JSON string with no escapes but \\/)",
                                   "artifact")
            whole = len(pending) if ended else max(0, len(pending) - len(pending) % 4 - 4)  # padding: the end
            chunk, pending = pending[:whole], pending[whole:] + held
            padded_early = b"=" in (chunk.rstrip(b"=") if ended else chunk)
            if padded_early:
                raise RequestError("artifact must be base64: padding before its end", "artifact")
            try:
                decoded = base64.b64decode(chunk, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError(f"artifact must be the artifact file in base64 ({e})", "artifact") from e
            written += len(decoded)
            if max_bytes and written > max_bytes:
                raise TooLargeError(f"the uploaded artifact is more than {max_bytes:,} bytes; this server stores "
                                    f"artifacts of at most {max_bytes:,} bytes", "artifact")
            out.write(decoded)
        return written


def split_publish_json(f: BinaryIO, out: BinaryIO, max_fields_bytes: int, max_artifact_bytes: int
                       ) -> tuple[dict, bool]:
    """Scan a publish body (a JSON object) from `f`: every field but `artifact` parsed, within `max_fields_bytes`
    in all; `artifact` (a base64 string) decoded into `out`. (fields, whether an artifact was written)."""
    scanner, fields, used, has_artifact = _Scanner(f), {}, 0, False
    scanner.expect(b"{")
    if scanner.peek() == b"}":
        scanner.at += 1
    else:
        while True:
            key, size = scanner.value(max_fields_bytes - used)
            used += size
            if not isinstance(key, str):
                raise RequestError("the request body is not valid JSON: an object key is not a string",
                                   code="invalid_json")
            scanner.expect(b":")
            if key == "artifact" and scanner.peek() == b'"':
                if has_artifact:
                    raise RequestError("the body names artifact twice", "artifact")
                scanner.base64_string(out, max_artifact_bytes)
                has_artifact = True
            else:
                value, size = scanner.value(max_fields_bytes - used)
                used += size
                if key == "artifact" and value is not None:
                    raise RequestError("artifact must be the artifact file in base64, as a JSON string", "artifact")
                if key != "artifact":
                    fields[key] = value
            if scanner.peek() == b"}":
                scanner.at += 1
                break
            scanner.expect(b",")
    if scanner.peek():
        raise RequestError("the request body is not valid JSON: extra data after the object", code="invalid_json")
    check_values(fields)
    return fields, has_artifact
