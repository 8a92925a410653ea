"""Taking artifacts apart and putting them back together, for tests that forge or damage them on purpose.
Not a test module."""

from __future__ import annotations

import hashlib
import json
import struct


def split(data: bytes) -> tuple[dict, dict, bytes]:
    """(safetensors header, kvmart manifest, tensor bytes) of an artifact."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return header, json.loads(header["__metadata__"]["kvmart"]), data[8 + n:]


def join(header: dict, tensors: bytes) -> bytes:
    """An artifact from a safetensors header and tensor bytes, the header padded as kvmart writes it."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)
    return struct.pack("<Q", len(raw)) + raw + tensors


def rewrite(data: bytes, change) -> bytes:
    """The artifact with its manifest edited by `change(manifest)` and its manifest hash recomputed, so that only
    the edit itself can be what a reader objects to."""
    header, manifest, tensors = split(data)
    manifest.pop("manifest_sha256")
    change(manifest)
    manifest["manifest_sha256"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    header["__metadata__"]["kvmart"] = json.dumps(manifest, sort_keys=True)
    return join(header, tensors)
