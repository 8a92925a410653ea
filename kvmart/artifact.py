"""The KV artifact: kvmart's on-disk format (docs/FORMAT.md). One file that is also a valid safetensors file:

    u64 little-endian N | N bytes of JSON header | tensor bytes, in header order, no gaps

The header's `__metadata__["kvmart"]` holds the manifest (format version, cache id, model fingerprint, token ids,
shapes, codec, per-tensor checksums, manifest hash). Reading verifies everything before a single tensor is handed
out: a truncated, bit-flipped, foreign or mismatched file raises ArtifactError saying why, and is never used."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import torch
import xxhash

from . import __version__
from .errors import ArtifactError, FingerprintMismatchError
from .fingerprint import ModelFingerprint, cache_id as make_cache_id
from .kv import KV, large_buffer, mapped_file

FORMAT = "kvmart-kv"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 << 20  # token ids of a 1M-token document fit easily
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class Manifest:
    """What an artifact says about itself. `tensors` maps names to their xxh3-128 checksums."""

    cache_id: str
    fingerprint: dict[str, str]
    fingerprint_digest: str
    token_ids: list[int]
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    codec: str
    tensors: dict[str, str]
    created_by: dict[str, str]
    salt_hash: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def body(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "cache_id": self.cache_id,
                "fingerprint": self.fingerprint, "fingerprint_digest": self.fingerprint_digest,
                "token_ids": self.token_ids, "num_layers": self.num_layers, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "dtype": self.dtype, "codec": self.codec, "tensors": self.tensors,
                "created_by": self.created_by, "salt_hash": self.salt_hash}


def runtime_versions() -> dict[str, str]:
    import transformers

    return {"kvmart": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def manifest_for(kv: KV, token_ids: list[int], fingerprint: ModelFingerprint, salt: str = "") -> Manifest:
    if kv.num_tokens != len(token_ids):
        raise AssertionError(f"KV holds {kv.num_tokens} tokens but {len(token_ids)} token ids were given")
    k0 = kv.keys[0]
    return Manifest(
        cache_id=make_cache_id(fingerprint.digest, token_ids, salt),
        fingerprint=fingerprint.as_dict(), fingerprint_digest=fingerprint.digest, token_ids=list(token_ids),
        num_layers=kv.num_layers, kv_heads=k0.shape[1], head_dim=k0.shape[3], dtype=str(kv.dtype).removeprefix("torch."),
        codec="raw", tensors={name: checksum(t) for name, t in kv.tensors().items()},
        created_by=runtime_versions(), salt_hash=hashlib.sha256(salt.encode()).hexdigest() if salt else "",
    )


def tensor_names(num_layers: int) -> list[str]:
    """The order tensors are written and read in: layer 0 keys, layer 0 values, layer 1 keys..."""
    return [f"layers.{i}.{kind}" for i in range(num_layers) for kind in ("keys", "values")]


def checksum(tensor: torch.Tensor) -> str:
    return xxhash.xxh3_128_hexdigest(_bytes_view(tensor.contiguous()))


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's memory as a writable byte buffer, without a copy (works for bfloat16, which numpy lacks)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _manifest_json(manifest: Manifest) -> dict:
    body = manifest.body()
    body["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return body


def encode_header(manifest: Manifest, kv: KV) -> bytes:
    header: dict = {"__metadata__": {"kvmart": json.dumps(_manifest_json(manifest), sort_keys=True)}}
    offset = 0
    for name, t in kv.tensors().items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)  # align the tensor data to 64 bytes, as safetensors allows
    return struct.pack("<Q", len(raw)) + raw


def artifact_size(manifest: Manifest, kv: KV) -> int:
    return len(encode_header(manifest, kv)) + kv.nbytes


def write_artifact(f: BinaryIO, manifest: Manifest, kv: KV) -> int:
    """Write the artifact to `f`; returns bytes written. Atomicity is the store's job (temp file + rename)."""
    written = f.write(encode_header(manifest, kv))
    for t in kv.tensors().values():
        written += f.write(_bytes_view(t.contiguous()))
    return written


def read_manifest(f: BinaryIO, size_bytes: int) -> tuple[Manifest, dict]:
    """Parse and check the header of an artifact of `size_bytes`; returns the manifest and tensor table."""
    head = f.read(8)
    if len(head) < 8:
        raise ArtifactError(f"truncated artifact: {size_bytes} bytes is too short to hold a header")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(MAX_HEADER_BYTES, size_bytes - 8):
        raise ArtifactError(f"not a kvmart artifact, or truncated: header length {header_len} does not fit in "
                            f"{size_bytes} bytes")
    try:
        header = json.loads(f.read(header_len))
        body = json.loads(header["__metadata__"]["kvmart"])
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"not a kvmart artifact: its header has no readable kvmart manifest ({e})") from e
    manifest = _parse_manifest(body)
    table = {name: header.get(name) for name in tensor_names(manifest.num_layers)}
    if set(table) != set(manifest.tensors):
        raise ArtifactError("corrupt artifact: the manifest's tensor list does not match its layer count")
    expected = 8 + header_len + _data_bytes(table)
    if size_bytes != expected:
        raise ArtifactError(f"truncated or padded artifact: {size_bytes} bytes on disk, the header describes {expected}")
    return manifest, table


_FIELD_TYPES = {"cache_id": str, "fingerprint": dict, "fingerprint_digest": str, "token_ids": list, "num_layers": int,
                "kv_heads": int, "head_dim": int, "dtype": str, "codec": str, "tensors": dict, "created_by": dict,
                "salt_hash": str}


def _parse_manifest(body: object) -> Manifest:
    if not isinstance(body, dict):
        raise ArtifactError(f"not a kvmart artifact: its manifest is a JSON {type(body).__name__}, not an object")
    if body.get("format") != FORMAT:
        raise ArtifactError(f"not a kvmart artifact: format is {body.get('format')!r}, expected {FORMAT!r}")
    if body.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact format_version {body.get('format_version')!r} is not supported by this "
                            f"kvmart (reads version {FORMAT_VERSION})")
    recorded = body.pop("manifest_sha256", None)
    if hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() != recorded:
        raise ArtifactError("corrupt artifact: the manifest does not match its recorded hash")
    if body.get("codec") != "raw":
        raise ArtifactError(f"artifact codec {body.get('codec')!r} is not supported by this kvmart")
    missing = [k for k in _FIELD_TYPES if k not in body and k != "salt_hash"]
    if missing:
        raise ArtifactError(f"corrupt artifact: its manifest lacks {', '.join(missing)}")
    wrong = [k for k, kind in _FIELD_TYPES.items() if k in body and not _is(body[k], kind)]
    if wrong or not all(_is(t, int) and t >= 0 for t in body["token_ids"]) or min(
            body["num_layers"], body["kv_heads"], body["head_dim"]) <= 0:
        raise ArtifactError(f"corrupt artifact: manifest fields of the wrong type or range: {', '.join(wrong) or 'shape'}")
    return Manifest(**{k: body[k] for k in _FIELD_TYPES if k in body})


def _is(value: object, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _data_bytes(table: dict[str, dict | None]) -> int:
    """Total tensor bytes; tensors must follow one another in manifest order, as they are read sequentially."""
    offset = 0
    for name, entry in table.items():
        if not isinstance(entry, dict) or "data_offsets" not in entry:
            raise ArtifactError(f"corrupt artifact: tensor {name!r} is listed in the manifest but not in the header")
        span = entry["data_offsets"]
        if not (isinstance(span, list) and len(span) == 2 and all(_is(x, int) for x in span)):
            raise ArtifactError(f"corrupt artifact: tensor {name!r} has data_offsets {span!r}, not two integers")
        start, end = span
        if start != offset or end < start:
            raise ArtifactError(f"corrupt artifact: tensor {name!r} is not where the format puts it")
        offset = end
    return offset


def check_model(manifest: Manifest, fingerprint: ModelFingerprint) -> None:
    """Refuse an artifact made by any other model, tokenizer, dtype, attention implementation or engine."""
    differing = fingerprint.differences(manifest.fingerprint)
    if differing or manifest.fingerprint_digest != fingerprint.digest:
        loaded = fingerprint.as_dict()
        details = "; ".join(f"{k}: artifact {manifest.fingerprint.get(k, '(none)')!s:.40} vs loaded "
                            f"{loaded.get(k, '(none)')!s:.40}" for k in differing)
        raise FingerprintMismatchError(
            f"artifact {manifest.cache_id[:16]} was made by a different model: {', '.join(differing) or 'fingerprint'} "
            f"differ ({details}). Recompute it with the loaded model, or load the model it was made with."
        )


def read_artifact(f: BinaryIO, size_bytes: int, fingerprint: ModelFingerprint, salt: str = "",
                  expected_cache_id: str | None = None) -> tuple[Manifest, KV]:
    """Read and fully verify an artifact; raises ArtifactError (or FingerprintMismatchError) on any problem.
    `expected_cache_id`: the id the reader derived itself (a prefix chunk's chained key, kvmart/keys.py), checked
    instead of the document cache id recomputed from the token ids."""
    manifest, table = read_manifest(f, size_bytes)
    check_model(manifest, fingerprint)
    expected = expected_cache_id or make_cache_id(fingerprint.digest, manifest.token_ids, salt)
    if expected != manifest.cache_id:
        raise ArtifactError(f"artifact {manifest.cache_id[:16]}: its cache id does not match its tokens and model")
    tensors = _read_tensors(f, table, manifest)
    keys = tuple(tensors[f"layers.{i}.keys"] for i in range(manifest.num_layers))
    values = tuple(tensors[f"layers.{i}.values"] for i in range(manifest.num_layers))
    return manifest, KV(keys, values)


def _mapped_data(f: BinaryIO, total: int) -> torch.Tensor | None:
    """The tensor data of an artifact file, used in place from the page cache (see kv.mapped_file); None if `f`
    cannot be mapped or is not exactly as long as its header says."""
    data_start = f.tell()
    try:
        file_size = os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        return None
    if file_size != data_start + total:
        return None
    whole = mapped_file(f, file_size)
    return None if whole is None else whole[data_start:]


def _read_tensors(f: BinaryIO, table: dict[str, dict], manifest: Manifest) -> dict[str, torch.Tensor]:
    """All tensor data in one read into one huge-page buffer, then each slice checked and viewed as a tensor."""
    shape = [1, manifest.kv_heads, manifest.num_tokens, manifest.head_dim]
    total = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in table.values())
    buffer = _mapped_data(f, total)
    if buffer is None:
        buffer = large_buffer(total)
        if f.readinto(memoryview(buffer.numpy())) != total:
            raise ArtifactError("truncated artifact: the tensor data is cut short")
    tensors = {}
    for name, entry in table.items():
        dtype = TORCH_DTYPES.get(entry.get("dtype"))
        if entry.get("shape") != shape or dtype is None or str(dtype).removeprefix("torch.") != manifest.dtype:
            raise ArtifactError(f"corrupt artifact: tensor {name} has shape {entry.get('shape')} and dtype "
                                f"{entry.get('dtype')}, the manifest implies {shape} {manifest.dtype}")
        start, end = entry["data_offsets"]
        if end - start != manifest.num_tokens * manifest.kv_heads * manifest.head_dim * dtype.itemsize:
            raise ArtifactError(f"corrupt artifact: tensor {name} spans {end - start} bytes, its shape {shape} "
                                f"{manifest.dtype} needs {math.prod(shape) * dtype.itemsize}")
        raw = buffer[start:end]
        if xxhash.xxh3_128_hexdigest(memoryview(raw.numpy())) != manifest.tensors[name]:
            raise ArtifactError(f"corrupt artifact: tensor {name} does not match its checksum (bit flip or tampering)")
        tensors[name] = raw.view(dtype).view(shape)
    return tensors
