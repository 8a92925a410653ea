"""Prefix-shared caches: a document's KV stored as fixed-size token chunks under chained keys (kvmart/format/keys.py),
so documents that share a prefix (a common system prompt, a versioned document changed at the end) share those
chunks, and a prompt whose first k chunks match reuses exactly those k chunks.

Each chunk is an ordinary kvmart artifact (kvmart/format/artifact.py: manifest, per-tensor checksums, the codec the
artifact format applies) holding the chunk's KV positions and its own token ids, with its chained key as cache id;
reading one checks that key against the key the reader derives from its own prompt. A chunk store should be a
store of its own (or its own prefix of a shared one): its entries are chunks, not documents.

Exactness: chunks are computed by *chunked prefill*: chunk 0 is prefilled, each next chunk continues from the KV of
the chunks before it. A chunk's KV is then a function of its prefix's tokens only, computed with the same shapes
whoever computes it, so reusing k stored chunks and continuing is bit-identical to a chunked prefill of those
k x C tokens from scratch and continuing (tests/test_chunks.py, torch.equal, both dtypes). Why not slices of a
whole-document prefill: CPU SDPA's blocking depends on the sequence length, so the first k positions of a longer
prefill are not always bit-identical to prefilling k tokens, even with k a multiple of 8 or 256 (measured: float32
differs at k = 8, 256 and 768 of 1,100 tokens from layer 1 on). Chunked prefill also saves compute: a document
whose first chunks are stored computes only the rest."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from kvmart.errors import ArtifactError
from kvmart.format.artifact import manifest_for, read_artifact, write_artifact
from kvmart.format.keys import DEFAULT_CHUNK_TOKENS, check_chunk_tokens, chunk_keys
from kvmart.runtime.kv import KV
from kvmart.runtime.model import Model
from kvmart.store import Entry, Store

log = logging.getLogger("kvmart.reuse.chunks")


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


def extend(model: Model, kv: KV | None, chunk_ids: list[int]) -> KV:
    """One step of chunked prefill: the KV of everything so far plus `chunk_ids`."""
    return model.prefill(chunk_ids) if kv is None else model.continue_from(kv, chunk_ids).kv


def chunked_prefill(model: Model, token_ids: list[int], chunk_tokens: int) -> KV:
    """The KV of the full chunks of `token_ids`, computed chunk by chunk from nothing: the reference a reuse of
    stored chunks is bit-identical to."""
    check_chunk_tokens(chunk_tokens)
    kv = None
    for start in range(0, len(token_ids) - chunk_tokens + 1, chunk_tokens):
        kv = extend(model, kv, list(token_ids[start:start + chunk_tokens]))
    if kv is None:
        raise ValueError(f"{len(token_ids)} tokens hold no full chunk of {chunk_tokens}")
    return kv


class ChunkStore:
    """Chunks of one model's documents in `store`. Thread-safe as its store is."""

    def __init__(self, store: Store, model: Model, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        self.store, self.model, self.chunk_tokens = store, model, check_chunk_tokens(chunk_tokens)

    def keys(self, token_ids: list[int], salt: str = "") -> list[str]:
        return chunk_keys(self.model.fingerprint.digest, token_ids, self.chunk_tokens, salt)

    def precompute(self, token_ids: list[int], salt: str = "", title: str = "") -> ChunkReport:
        """Store a document's full chunks, computing only those not stored yet (a chunked prefill continued from
        the longest stored run of leading chunks)."""
        self.model.check_fits("the document", len(token_ids))
        keys, c = self.keys(token_ids, salt), self.chunk_tokens
        hit = self.longest_prefix(token_ids, salt)
        shared = sum(e.artifact_bytes for e in (self.store.entry(k) for k in keys[:hit.chunks]) if e is not None)
        kv, new, stored = hit.kv, 0, 0
        for i in range(hit.chunks, len(keys)):
            kv = extend(self.model, kv, list(token_ids[i * c:(i + 1) * c]))
            existing = self.store.entry(keys[i])
            if existing is not None:  # stored meanwhile (another writer) or beyond a missing chunk
                shared += existing.artifact_bytes
                continue
            stored += self._put(keys[i], i, len(keys), list(token_ids[i * c:(i + 1) * c]),
                                kv.slice(i * c, (i + 1) * c), salt, title)
            new += 1
        return ChunkReport(len(keys), new, stored, shared, len(token_ids) - len(keys) * c)

    def _put(self, key: str, index: int, count: int, ids: list[int], part: KV, salt: str, title: str) -> int:
        manifest = dataclasses.replace(manifest_for(part, ids, self.model.fingerprint, salt), cache_id=key)
        entry = Entry(cache_id=key, title=f"{title} chunk {index}", source=f"chunk {index} of {count}",
                      model=self.model.spec, fingerprint=self.model.fingerprint.digest, num_tokens=len(ids),
                      artifact_bytes=0, prefill_seconds=0.0, created_at=time.time())
        return self.store.put(entry, lambda f: write_artifact(f, manifest, part)).artifact_bytes

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
        kv = KV.concat(parts) if parts else None
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
