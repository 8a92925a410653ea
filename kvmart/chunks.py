"""Prefix-shared caches: a document's KV stored as fixed-size token chunks under chained keys (kvmart/keys.py),
so documents that share a prefix (a common system prompt, a versioned document changed at the end) share those
chunks, and a prompt whose first k chunks match reuses exactly those k chunks.

Each chunk is an ordinary kvmart artifact (kvmart/artifact.py: manifest, per-tensor checksums, the codec the
artifact format applies) holding the chunk's KV positions and its own token ids, with its chained key as cache id;
reading one checks that key against the key the reader derives from its own prompt. A chunk store should be a
store of its own (or its own prefix of a shared one): its entries are chunks, not documents.

Exactness: a chunk is a slice of a whole-document prefill. With chunk boundaries on multiples of ALIGN_TOKENS,
kvmart's attention kernels make that slice bit-identical to prefilling the prefix alone (tests/test_chunks.py
checks it with torch.equal), so reusing k chunks then continuing is bit-exact against prefilling those k*C tokens
and continuing."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from .artifact import manifest_for, read_artifact, write_artifact
from .errors import ArtifactError
from .keys import DEFAULT_CHUNK_TOKENS, check_chunk_tokens, chunk_keys
from .kv import KV
from .model import Model
from .store import Entry, Store

log = logging.getLogger("kvmart.chunks")


@dataclass(frozen=True)
class ChunkReport:
    """What storing one document's chunks did. `shared_bytes`: bytes not written because another document (or an
    earlier version) had already stored those chunks, i.e. the bytes saved by sharing."""

    chunks: int
    new_chunks: int
    stored_bytes: int
    shared_bytes: int
    tail_tokens: int  # tokens after the last full chunk (not stored as a chunk; recomputed by a reader)


@dataclass(frozen=True)
class PrefixHit:
    kv: KV | None  # the reused prefix, None if no chunk matched
    chunks: int
    num_tokens: int
    load_seconds: float


def kv_slice(kv: KV, start: int, end: int) -> KV:
    return KV(tuple(t[:, :, start:end].contiguous() for t in kv.keys),
              tuple(t[:, :, start:end].contiguous() for t in kv.values))


def kv_concat(parts: list[KV]) -> KV:
    if len(parts) == 1:
        return parts[0]
    layers = range(parts[0].num_layers)
    return KV(tuple(torch.cat([p.keys[i] for p in parts], dim=-2) for i in layers),
              tuple(torch.cat([p.values[i] for p in parts], dim=-2) for i in layers))


class ChunkStore:
    """Chunks of one model's documents in `store`. Thread-safe as its store is."""

    def __init__(self, store: Store, model: Model, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        self.store, self.model, self.chunk_tokens = store, model, check_chunk_tokens(chunk_tokens)

    def keys(self, token_ids: list[int], salt: str = "") -> list[str]:
        return chunk_keys(self.model.fingerprint.digest, token_ids, self.chunk_tokens, salt)

    def put(self, token_ids: list[int], kv: KV, salt: str = "", title: str = "") -> ChunkReport:
        """Store the full chunks of a document's KV that are not stored yet."""
        assert kv.num_tokens == len(token_ids), "the KV must hold exactly these token ids"
        keys, c = self.keys(token_ids, salt), self.chunk_tokens
        new = stored = shared = 0
        for i, key in enumerate(keys):
            existing = self.store.entry(key)
            if existing is not None:
                shared += existing.artifact_bytes
                continue
            ids, part = list(token_ids[i * c:(i + 1) * c]), kv_slice(kv, i * c, (i + 1) * c)
            manifest = dataclasses.replace(manifest_for(part, ids, self.model.fingerprint, salt), cache_id=key)
            entry = Entry(cache_id=key, title=f"{title} chunk {i}", source=f"chunk {i} of {len(keys)}",
                          model=self.model.spec, fingerprint=self.model.fingerprint.digest, num_tokens=c,
                          artifact_bytes=0, prefill_seconds=0.0, created_at=time.time())
            stored += self.store.put(entry, lambda f, m=manifest, p=part: write_artifact(f, m, p)).artifact_bytes
            new += 1
        return ChunkReport(len(keys), new, stored, shared, len(token_ids) - len(keys) * c)

    def precompute(self, token_ids: list[int], salt: str = "", title: str = "") -> ChunkReport:
        """Prefill a document whole and store its chunks (already stored ones are shared, not rewritten)."""
        self.model.check_fits("the document", len(token_ids))
        keys = self.keys(token_ids, salt)
        if keys and all(self.store.entry(k) is not None for k in keys):
            size = sum(e.artifact_bytes for e in (self.store.entry(k) for k in keys) if e is not None)
            return ChunkReport(len(keys), 0, 0, size, len(token_ids) - len(keys) * self.chunk_tokens)
        return self.put(token_ids, self.model.prefill(token_ids), salt, title)

    def longest_prefix(self, token_ids: list[int], salt: str = "") -> PrefixHit:
        """The KV of the prompt's longest run of stored leading chunks. A chunk that is missing or fails its checks
        ends the run there: the rest is computed, never served partially."""
        start, parts = time.perf_counter(), []
        c = self.chunk_tokens
        for i, key in enumerate(self.keys(token_ids, salt)):
            part = self._read(key, list(token_ids[i * c:(i + 1) * c]), salt)
            if part is None:
                break
            parts.append(part)
        kv = kv_concat(parts) if parts else None
        return PrefixHit(kv, len(parts), len(parts) * c, time.perf_counter() - start)

    def _read(self, key: str, ids: list[int], salt: str) -> KV | None:
        opened = self.store._open(key)
        if opened is None:
            return None
        f, size = opened
        try:
            with f:
                manifest, kv = read_artifact(f, size, self.model.fingerprint, salt, expected_cache_id=key)
        except ArtifactError as e:
            log.warning("prefix chunk %s refused and dropped (it will be recomputed): %s", key[:16], e)
            self.store.delete(key)
            return None
        if manifest.token_ids != ids:
            log.warning("prefix chunk %s holds other tokens than its key says; refused", key[:16])
            return None
        return kv
