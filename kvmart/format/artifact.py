"""The KV artifact: kvmart's on-disk format (docs/FORMAT.md). One file that is also a valid safetensors file:

    u64 little-endian N | N bytes of JSON header | tensor bytes, in header order, no gaps

The header's `__metadata__["kvmart"]` holds the manifest (format version, cache id, model fingerprint, token ids,
shapes, codec, per-tensor codec, params and checksums, manifest hash). A raw tensor is stored as its dtype and shape;
an encoded one (kvmart.codec) as a U8 vector, so the file stays valid safetensors either way. Reading verifies
everything before a single tensor is handed out: a truncated, bit-flipped, foreign or mismatched file raises
ArtifactError saying why, and is never used. Version 1 artifacts (raw only) and 2 are still read.

Version 3 adds the document index: a manifest with no tensors that lists the chunks a document's KV is stored as
(`chunks`: [num_tokens, key] in order, each key chained over the chunks before it, kvmart/format/keys.py) and the
document's licence terms (`terms`, part of its cache id). Each chunk is an ordinary KV artifact whose cache id is its
chained key. A KV artifact of a whole document (version 1 and 2 documents) is a one-chunk document."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import BinaryIO, cast

import torch

from kvmart import __version__
from kvmart import codec as codecs
from kvmart.canonical import spaced
from kvmart.codec.raw import byte_view
from kvmart.errors import ArtifactError, FingerprintMismatchError
from kvmart.format.keys import cache_id as make_cache_id
from kvmart.format.keys import chain_keys, is_cache_id
from kvmart.format.signing import SIGNATURE_FIELD, cluster_key, sign
from kvmart.format.signing import check as check_signature
from kvmart.runtime.fingerprint import ModelFingerprint
from kvmart.runtime.kv import KV, large_buffer, mapped_file

FORMAT = "kvmart-kv"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: raw tensors only, `tensors` maps names to checksums; 3: document indexes
DECODE_THREADS = min(4, os.cpu_count() or 1)  # encoded tensors of a mapped artifact decode in parallel
MAX_HEADER_BYTES = 64 << 20  # token ids of a 1M-token document fit easily
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
SAFETENSORS_BY_NAME = {str(k).removeprefix("torch."): v for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorRecord:
    """How one tensor is stored: its codec and params, the xxh3-128 checksum of its decoded bytes and of its stored
    bytes (checked before decoding, so corrupt data never reaches a decoder; the same as `checksum` for raw)."""

    checksum: str
    codec: str = "raw"
    params: dict = field(default_factory=dict)
    stored_checksum: str = ""

    def as_json(self) -> dict:
        return {"checksum": self.checksum, "codec": self.codec, "params": self.params,
                "stored_checksum": self.stored_checksum or self.checksum}


@dataclass(frozen=True)
class Manifest:
    """What an artifact says about itself. `tensors` maps names to how each is stored; `codec` is the codec the
    artifact was written with (a tensor it did not shrink is stored raw)."""

    cache_id: str
    fingerprint: dict[str, str]
    fingerprint_digest: str
    token_ids: list[int]
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    codec: str
    tensors: dict[str, TensorRecord]
    created_by: dict[str, str]
    salt_hash: str = ""
    chunks: tuple[tuple[int, str], ...] = ()  # a document index: its chunks (tokens, chained key), in order
    terms: str = ""  # a document's licence terms, canonical (part of its cache id)
    # set when read: the recorded hash of the body, and the cluster's signature of it (kvmart/format/signing.py)
    manifest_sha256: str = field(default="", compare=False)
    signature: str = field(default="", compare=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_index(self) -> bool:
        """A document index (chunks listed, no tensors of its own), not KV."""
        return bool(self.chunks)

    def body(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "cache_id": self.cache_id,
                "fingerprint": self.fingerprint, "fingerprint_digest": self.fingerprint_digest,
                "token_ids": self.token_ids, "num_layers": self.num_layers, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "dtype": self.dtype, "codec": self.codec,
                "tensors": {name: record.as_json() for name, record in self.tensors.items()},
                "created_by": self.created_by, "salt_hash": self.salt_hash,
                "chunks": [[n, key] for n, key in self.chunks], "terms": self.terms}


def runtime_versions() -> dict[str, str]:
    import transformers

    return {"kvmart": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def manifest_for(kv: KV, token_ids: list[int], fingerprint: ModelFingerprint, salt: str = "",
                 codec: str = "raw", tensors: dict[str, TensorRecord] | None = None,
                 cache_id: str | None = None) -> Manifest:
    """The manifest of `kv`: raw tensors unless `tensors` records how each was encoded. `cache_id`: a chunk's
    chained key (kvmart/format/keys.py); by default the cache id of `token_ids` alone."""
    if kv.num_tokens != len(token_ids):
        raise AssertionError(f"KV holds {kv.num_tokens} tokens but {len(token_ids)} token ids were given")
    k0 = kv.keys[0]
    return Manifest(
        cache_id=cache_id or make_cache_id(fingerprint.digest, token_ids, salt),
        fingerprint=fingerprint.as_dict(), fingerprint_digest=fingerprint.digest, token_ids=list(token_ids),
        num_layers=kv.num_layers, kv_heads=k0.shape[1], head_dim=k0.shape[3], dtype=str(kv.dtype).removeprefix("torch."),
        codec=codec, created_by=runtime_versions(),
        tensors=tensors or {name: TensorRecord(checksum(t)) for name, t in kv.tensors().items()},
        salt_hash=hashlib.sha256(salt.encode()).hexdigest() if salt else "",
    )


def index_manifest(token_ids: list[int], chunks: list[tuple[int, str]], fingerprint: ModelFingerprint,
                   shape: tuple[int, int, int], dtype: str, salt: str = "", terms: str = "") -> Manifest:
    """The index of a document stored as `chunks` ([num_tokens, chained key] in order; the keys are checked
    against the token ids when read). `shape`: (num_layers, kv_heads, head_dim) of the chunks' KV."""
    if sum(n for n, _ in chunks) != len(token_ids) or not chunks:
        raise AssertionError(f"chunks of {[n for n, _ in chunks]} tokens do not cover {len(token_ids)} token ids")
    num_layers, kv_heads, head_dim = shape
    return Manifest(
        cache_id=make_cache_id(fingerprint.digest, token_ids, salt, terms), fingerprint=fingerprint.as_dict(),
        fingerprint_digest=fingerprint.digest, token_ids=list(token_ids), num_layers=num_layers, kv_heads=kv_heads,
        head_dim=head_dim, dtype=dtype, codec="raw", tensors={}, created_by=runtime_versions(),
        salt_hash=hashlib.sha256(salt.encode()).hexdigest() if salt else "", chunks=tuple(chunks), terms=terms)


def write_index(f: BinaryIO, manifest: Manifest) -> int:
    """Write a document index (a header with no tensors); returns bytes written."""
    assert manifest.is_index and not manifest.tensors, "write_index writes document indexes only"
    return f.write(_header(manifest, []))


def read_index(f: BinaryIO, size_bytes: int, fingerprint: ModelFingerprint, salt: str = "") -> Manifest:
    """Read and verify what a document is stored as: an index (its chunks' keys checked against its token ids,
    model and salt) or, for a document stored whole (versions 1 and 2), its KV artifact's manifest as a one-chunk
    index. ArtifactError (or FingerprintMismatchError) on any problem."""
    manifest, _ = read_manifest(f, size_bytes)
    check_model(manifest, fingerprint)
    if manifest.cache_id != make_cache_id(fingerprint.digest, manifest.token_ids, salt, manifest.terms):
        raise ArtifactError(f"document {manifest.cache_id[:16]}: its cache id does not match its tokens, model and "
                            "terms")
    if not manifest.is_index:
        return replace(manifest, chunks=((manifest.num_tokens, manifest.cache_id),))
    pieces, start = [], 0
    for n, _ in manifest.chunks:
        pieces.append(manifest.token_ids[start:start + n])
        start += n
    if [key for _, key in manifest.chunks] != chain_keys(fingerprint.digest, pieces, salt):
        raise ArtifactError(f"document {manifest.cache_id[:16]}: its chunk keys do not match its tokens")
    return manifest


def tensor_names(num_layers: int) -> list[str]:
    """The order tensors are written and read in: layer 0 keys, layer 0 values, layer 1 keys..."""
    return [f"layers.{i}.{kind}" for i in range(num_layers) for kind in ("keys", "values")]


def checksum(tensor: torch.Tensor) -> str:
    return codecs.tensor_checksum(tensor)


@dataclass(frozen=True)
class EncodedArtifact:
    """An artifact ready to write: its manifest, header and the stored bytes of each tensor, in order."""

    manifest: Manifest
    header: bytes
    blobs: tuple[bytes | memoryview, ...]

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(len(b) for b in self.blobs)

    def write(self, f: BinaryIO) -> int:
        """Write the artifact to `f`; returns bytes written. Atomicity is the store's job (temp file + rename)."""
        return f.write(self.header) + sum(f.write(b) for b in self.blobs)


def encode_artifact(kv: KV, token_ids: list[int], fingerprint: ModelFingerprint, salt: str = "",
                    codec: str | codecs.Spec = codecs.DEFAULT_CODEC,
                    progress: Callable[[float], None] | None = None, cache_id: str | None = None) -> EncodedArtifact:
    """Encode every tensor of `kv` with `codec` (a tensor it does not shrink is kept raw) and build the artifact.
    Holds the encoded tensors in memory until written (for raw: views of `kv`, no copy)."""
    spec = codecs.parse_spec(codec) if isinstance(codec, str) else codec
    records, blobs, entries = {}, [], []
    named = kv.tensors()
    for i, (name, t) in enumerate(named.items()):
        records[name], blob, entry = store_tensor(name, t.contiguous(), spec)
        blobs.append(blob)
        entries.append(entry)
        if progress:
            progress((i + 1) / len(named))
    manifest = manifest_for(kv, token_ids, fingerprint, salt, spec.name, records, cache_id)
    return EncodedArtifact(manifest, _header(manifest, entries), tuple(blobs))


def store_tensor(name: str, t: torch.Tensor, spec: codecs.Spec,
                 digest: str = "") -> tuple[TensorRecord, bytes | memoryview, tuple[str, str, list[int], int]]:
    """How the contiguous tensor `t` is stored with `spec`: (record, stored bytes, header entry). A tensor the
    codec does not shrink is stored raw (its bytes are then a view of `t`). `digest`: its checksum, if known."""
    raw, digest = byte_view(t), digest or checksum(t)
    encoded = codecs.encode(t, spec) if spec.name != "raw" else None
    if encoded is None or len(encoded.data) >= len(raw):
        return TensorRecord(digest, "raw", {}, digest), raw, (name, SAFETENSORS_DTYPES[t.dtype], list(t.shape), len(raw))
    record = TensorRecord(digest, encoded.codec, encoded.params, codecs.checksum(encoded.data))
    return record, encoded.data, (name, "U8", [len(encoded.data)], len(encoded.data))


def _manifest_json(manifest: Manifest) -> dict:
    body = manifest.body()
    body["manifest_sha256"] = hashlib.sha256(spaced(body)).hexdigest()  # docs/FORMAT.md "Manifest hash"
    return body


def _header(manifest: Manifest, entries: list[tuple[str, str, list[int], int]]) -> bytes:
    """The safetensors header: the manifest (signed beside it when a cluster key is set, kvmart/format/signing.py), then
    (name, dtype, shape, stored bytes) of each tensor in order."""
    body = _manifest_json(manifest)
    metadata = {"kvmart": json.dumps(body, sort_keys=True)}
    key = cluster_key()
    if key is not None:
        metadata[SIGNATURE_FIELD] = sign(key, manifest.cache_id, body["manifest_sha256"])
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)  # align the tensor data to 64 bytes, as safetensors allows
    return struct.pack("<Q", len(raw)) + raw


def encode_header(manifest: Manifest, kv: KV) -> bytes:
    """The header of a raw artifact of `kv`."""
    return _header(manifest, [(name, SAFETENSORS_DTYPES[t.dtype], list(t.shape), t.numel() * t.element_size())
                              for name, t in kv.tensors().items()])


def artifact_size(manifest: Manifest, kv: KV) -> int:
    return len(encode_header(manifest, kv)) + kv.nbytes


def write_artifact(f: BinaryIO, manifest: Manifest, kv: KV) -> int:
    """Write the raw artifact of `manifest_for(kv, ...)` to `f`; returns bytes written (see encode_artifact for
    other codecs). Atomicity is the store's job (temp file + rename)."""
    assert all(r.codec == "raw" for r in manifest.tensors.values()), "write_artifact writes raw tensors only"
    written = f.write(encode_header(manifest, kv))
    for t in kv.tensors().values():
        written += f.write(byte_view(t.contiguous()))
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
        signature = header["__metadata__"].get(SIGNATURE_FIELD, "")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"not a kvmart artifact: its header has no readable kvmart manifest ({e})") from e
    if not isinstance(signature, str):
        raise ArtifactError(f"corrupt artifact: its {SIGNATURE_FIELD} is not a string")
    manifest = replace(_parse_manifest(body), signature=signature)
    names = [] if manifest.is_index else tensor_names(manifest.num_layers)
    table = {name: header.get(name) for name in names}
    if set(table) != set(manifest.tensors):
        raise ArtifactError("corrupt artifact: the manifest's tensor list does not match its layer count")
    expected = 8 + header_len + _data_bytes(table)
    if size_bytes != expected:
        raise ArtifactError(f"truncated or padded artifact: {size_bytes} bytes on disk, the header describes {expected}")
    return manifest, table


_FIELD_TYPES = {"cache_id": str, "fingerprint": dict, "fingerprint_digest": str, "token_ids": list, "num_layers": int,
                "kv_heads": int, "head_dim": int, "dtype": str, "codec": str, "tensors": dict, "created_by": dict,
                "salt_hash": str, "chunks": list, "terms": str}
_OPTIONAL_FIELDS = ("salt_hash", "chunks", "terms")  # absent from older versions


def _parse_manifest(body: object) -> Manifest:
    if not isinstance(body, dict):
        raise ArtifactError(f"not a kvmart artifact: its manifest is a JSON {type(body).__name__}, not an object")
    if body.get("format") != FORMAT:
        raise ArtifactError(f"not a kvmart artifact: format is {body.get('format')!r}, expected {FORMAT!r}")
    version = body.get("format_version")
    if not (_is(version, int) and version in READABLE_VERSIONS):
        raise ArtifactError(f"artifact format_version {version!r} is not supported by this kvmart (reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))})")
    recorded = body.pop("manifest_sha256", None)
    try:
        matches = hashlib.sha256(spaced(body)).hexdigest() == recorded
    except (TypeError, ValueError):  # a value no JSON form holds (NaN): no hash can match it
        matches = False
    if not matches:
        raise ArtifactError("corrupt artifact: the manifest does not match its recorded hash")
    codec = body.get("codec")
    if not (isinstance(codec, str) and codec in (("raw",) if version == 1 else codecs.CODECS)):
        raise ArtifactError(f"artifact codec {codec!r} is not supported by this kvmart")
    missing = [k for k in _FIELD_TYPES if k not in body and k not in _OPTIONAL_FIELDS]
    if missing:
        raise ArtifactError(f"corrupt artifact: its manifest lacks {', '.join(missing)}")
    wrong = [k for k, kind in _FIELD_TYPES.items() if k in body and not _is(body[k], kind)]
    if wrong or not all(_is(t, int) and t >= 0 for t in body["token_ids"]) or min(
            body["num_layers"], body["kv_heads"], body["head_dim"]) <= 0:
        raise ArtifactError(f"corrupt artifact: manifest fields of the wrong type or range: {', '.join(wrong) or 'shape'}")
    if body["dtype"] not in SAFETENSORS_BY_NAME:
        raise ArtifactError(f"corrupt artifact: dtype {body['dtype']!r} is not one kvmart writes")
    fields = {k: body[k] for k in _FIELD_TYPES if k in body}
    fields["chunks"] = _parse_chunks(body.get("chunks", []), len(body["token_ids"]))
    if fields["chunks"] and body["tensors"]:
        raise ArtifactError("corrupt artifact: a document index holds tensors")
    return Manifest(**{**fields, "tensors": {n: _parse_record(n, r, version) for n, r in body["tensors"].items()},
                       "manifest_sha256": recorded})


def _parse_chunks(chunks: list, num_tokens: int) -> tuple[tuple[int, str], ...]:
    """A document index's chunk list: [positive token count, 64 hex digits] pairs covering every token."""
    parsed = []
    for item in chunks:
        if not (isinstance(item, list) and len(item) == 2 and _is(item[0], int) and item[0] > 0
                and is_cache_id(item[1])):
            raise ArtifactError(f"corrupt artifact: a chunk of its index is malformed: {item!r:.100}")
        parsed.append((item[0], item[1]))
    if parsed and sum(n for n, _ in parsed) != num_tokens:
        raise ArtifactError("corrupt artifact: its chunks do not cover its token ids")
    return tuple(parsed)


_RECORD_FIELDS = {"checksum": str, "codec": str, "params": dict, "stored_checksum": str}


def _parse_record(name: str, record: object, version: int) -> TensorRecord:
    """A tensor's record: version 1 has only a checksum (raw); version 2 says how the tensor is stored."""
    if version == 1 and isinstance(record, str):
        return TensorRecord(record, "raw", {}, record)
    if not (isinstance(record, dict) and set(record) == set(_RECORD_FIELDS)
            and all(isinstance(record[k], kind) for k, kind in _RECORD_FIELDS.items())):
        raise ArtifactError(f"corrupt artifact: the record of tensor {name} is malformed: {record!r:.200}")
    parsed = TensorRecord(**record)
    if parsed.codec not in codecs.CODECS:
        raise ArtifactError(f"artifact codec {parsed.codec!r} (tensor {name}) is not supported by this kvmart")
    if parsed.codec == "raw" and (parsed.params or parsed.stored_checksum != parsed.checksum):
        raise ArtifactError(f"corrupt artifact: the record of raw tensor {name} is inconsistent")
    return parsed


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
                  expected_cache_id: str | None = None, requested_cache_id: str | None = None
                  ) -> tuple[Manifest, KV]:
    """Read and fully verify an artifact; raises ArtifactError (or FingerprintMismatchError) on any problem.
    `expected_cache_id`: the id the reader derived itself (a prefix chunk's chained key, kvmart/format/keys.py), checked
    instead of the document cache id recomputed from the token ids. `requested_cache_id`: the id the caller asked
    its store for; the artifact must be that one (a store, or someone writing to a shared one, may hand back
    another artifact, valid in itself, under a requested id)."""
    manifest, table = read_manifest(f, size_bytes)
    check_requested(manifest, requested_cache_id)
    check_model(manifest, fingerprint)
    if manifest.is_index:
        raise ArtifactError(f"artifact {manifest.cache_id[:16]} is a document index, not KV (read its chunks)")
    expected = expected_cache_id or make_cache_id(fingerprint.digest, manifest.token_ids, salt, manifest.terms)
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
    """Every tensor, checked. Raw tensors are used in place (mapped) or read at once into one huge-page buffer;
    encoded ones are decoded into one buffer, from the mapped file (DECODE_THREADS tensors at a time) or streamed
    tensor by tensor through one scratch buffer, so an artifact is never held twice in memory. Stored bytes are checked before decoding, decoded bytes after."""
    shape = [1, manifest.kv_heads, manifest.num_tokens, manifest.head_dim]
    dtype = TORCH_DTYPES[SAFETENSORS_BY_NAME[manifest.dtype]]
    nbytes = math.prod(shape) * dtype.itemsize
    for name, entry in table.items():
        _check_entry(name, entry, manifest.tensors[name], shape, manifest.dtype, nbytes)
    total = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in table.values())
    source = _mapped_data(f, total)
    if all(r.codec == "raw" for r in manifest.tensors.values()):
        if source is None:
            source = large_buffer(total)
            if _readinto(f, source.numpy().data) != total:
                raise ArtifactError("truncated artifact: the tensor data is cut short")
        out, scratch = source, None
    else:
        out, scratch = large_buffer(nbytes * len(table)), None if source is not None else bytearray(
            max(e["data_offsets"][1] - e["data_offsets"][0] for e in table.values()))
    def one(i: int, name: str, entry: dict) -> torch.Tensor:
        start, end = entry["data_offsets"]
        if source is not None:
            stored = source[start:end].numpy().data
        else:
            assert scratch is not None  # set whenever the file is not mapped
            stored = _read_exact(f, scratch, end - start)
        record = manifest.tensors[name]
        if codecs.checksum(stored) != record.stored_checksum:
            raise ArtifactError(f"corrupt artifact: tensor {name} does not match its checksum (bit flip or tampering)")
        if out is source:
            return source[start:end].view(dtype).view(shape)
        target = out[i * nbytes:(i + 1) * nbytes].view(dtype).view(shape)
        _decode_into(name, stored, record, target)
        return target

    jobs = [(i, name, entry) for i, (name, entry) in enumerate(table.items())]
    if source is None or out is source or DECODE_THREADS == 1:
        return {name: one(i, name, entry) for i, name, entry in jobs}
    with ThreadPoolExecutor(DECODE_THREADS) as pool:  # the decoders release the GIL: tensors decode in parallel
        return dict(zip(table, pool.map(lambda job: one(*job), jobs), strict=True))


def _check_entry(name: str, entry: dict, record: TensorRecord, shape: list[int], dtype: str, nbytes: int) -> None:
    """A raw tensor's header entry must give the manifest's dtype and shape; an encoded one's, U8 bytes."""
    start, end = entry["data_offsets"]
    expected = (SAFETENSORS_BY_NAME[dtype], shape) if record.codec == "raw" else ("U8", [end - start])
    if (entry.get("dtype"), entry.get("shape")) != expected:
        raise ArtifactError(f"corrupt artifact: tensor {name} has shape {entry.get('shape')} and dtype "
                            f"{entry.get('dtype')}, the manifest implies {expected[1]} {expected[0]}")
    if record.codec == "raw" and end - start != nbytes:
        raise ArtifactError(f"corrupt artifact: tensor {name} spans {end - start} bytes, its shape {shape} "
                            f"{dtype} needs {nbytes}")


def _read_exact(f: BinaryIO, scratch: bytearray, n: int) -> memoryview:
    view = memoryview(scratch)[:n]
    if _readinto(f, view) != n:
        raise ArtifactError("truncated artifact: the tensor data is cut short")
    return view


def _readinto(f: BinaryIO, view: memoryview) -> int | None:
    """typing.BinaryIO declares no readinto, though every binary file (open(..., "rb"), BytesIO) has one."""
    return cast(io.BufferedIOBase, f).readinto(view)


def _decode_into(name: str, stored: memoryview, record: TensorRecord, target: torch.Tensor) -> None:
    try:
        codecs.decoder(record.codec).decode(stored, record.params, target)
    except ArtifactError as e:
        raise ArtifactError(f"corrupt artifact: tensor {name} cannot be decoded: {e}") from e
    if record.codec != "raw" and codecs.tensor_checksum(target) != record.checksum:
        raise ArtifactError(f"corrupt artifact: tensor {name} decodes to data that does not match its checksum")


def check_requested(manifest: Manifest, requested_cache_id: str | None) -> None:
    """ArtifactError if the artifact read is not the one asked for (None: nothing asked, nothing to check)."""
    if requested_cache_id is not None and manifest.cache_id != requested_cache_id:
        raise ArtifactError(f"the store returned artifact {manifest.cache_id[:16]} for cache id "
                            f"{requested_cache_id[:16]}: refused (copied under another id?); it will be recomputed")


def check_fetched(data: bytes | bytearray | memoryview, size_bytes: int, cache_id: str) -> None:
    """Check the header of an artifact fetched from a shared tier under `cache_id` (`data` holds at least its
    header; `size_bytes` is the whole artifact's size). Nothing to do when no key is configured; otherwise
    ArtifactError for a header that cannot be read, another artifact's, a missing signature or a wrong one (the
    signature names the cache id: kvmart/format/signing.py)."""
    key = cluster_key()
    if key is None:
        return
    manifest, _ = read_manifest(io.BytesIO(data), size_bytes)
    check_requested(manifest, cache_id)
    check_signature(key, manifest.manifest_sha256, manifest.signature, cache_id)

