"""Re-storing an artifact's tensors with another codec, its identity kept (kvmart/store/tiered.py uses it).

A node that fetches a `kvmart`-encoded artifact from a shared tier keeps it raw on its own disk and RAM tiers: it
decodes it once, and every later load maps it in place. The transcoded artifact is the same artifact: the same
cache id, token ids, model fingerprint, salt hash, artifact codec (the one it was written with) and the checksum
of every decoded tensor. What changes is how each tensor is stored (its record's codec, params and stored
checksum), so the manifest hash changes with it, and the signature is made anew with this cluster's key when one
is set (local tiers are not signature-checked: only the node writes there)."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import torch

from kvmart import codec as codecs
from kvmart.codec.raw import byte_view
from kvmart.errors import ArtifactError
from kvmart.format.artifact import (
    SAFETENSORS_BY_NAME,
    TORCH_DTYPES,
    EncodedArtifact,
    TensorRecord,
    _decode_into,
    _header,
    read_manifest,
    store_tensor,
)


def transcode(data: bytes | memoryview, codec: str | codecs.Spec) -> EncodedArtifact:
    """The artifact in `data` with every tensor stored with `codec` (`raw`: decoded). Each tensor is checked on
    the way, its stored bytes before decoding and its decoded bytes after; ArtifactError if anything is off."""
    spec = codecs.parse_spec(codec) if isinstance(codec, str) else codec
    view = memoryview(data)
    f = io.BytesIO(view)
    manifest, table = read_manifest(f, len(view))
    start_of_data = f.tell()
    shape = [1, manifest.kv_heads, manifest.num_tokens, manifest.head_dim]
    dtype = TORCH_DTYPES[SAFETENSORS_BY_NAME[manifest.dtype]]
    records: dict[str, TensorRecord] = {}
    blobs: list[bytes | memoryview] = []
    entries: list[tuple[str, str, list[int], int]] = []
    for name, entry in table.items():
        record = manifest.tensors[name]
        start, end = (start_of_data + x for x in entry["data_offsets"])
        stored = view[start:end]
        if codecs.checksum(stored) != record.stored_checksum:
            raise ArtifactError(f"corrupt artifact: tensor {name} does not match its checksum (bit flip or tampering)")
        if record.codec == spec.name and (record.codec == "raw" or spec.level is None):
            records[name] = record  # already stored as wanted: kept as it is
            entries.append((name, entry["dtype"], entry["shape"], end - start))
            blobs.append(stored)
            continue
        tensor = torch.empty(shape, dtype=dtype)
        if record.codec == "raw":
            if end - start != math.prod(shape) * dtype.itemsize:
                raise ArtifactError(f"corrupt artifact: tensor {name} has {end - start} bytes")
            byte_view(tensor)[:] = stored
        else:
            _decode_into(name, stored, record, tensor)
        records[name], blob, stored_entry = store_tensor(name, tensor, spec, record.checksum)
        entries.append(stored_entry)
        blobs.append(blob)
    kept = replace(manifest, tensors=records)
    return EncodedArtifact(kept, _header(kept, entries), tuple(blobs))
