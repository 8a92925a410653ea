"""Chunk chains: how a token sequence's KV is cut, keyed and stored, so that anything computed once (a published
document, an agent's system prompt, a conversation so far) is reused by every later prompt that starts the same.

A prompt is a run of *segments* (a document, a message: kvmart/reuse/prompt.py lays them out), each with the salt
its chunks are keyed under ('' for public documents, a tenant's server-side salt for anything private). Each segment
is cut into chunks of `chunk_tokens` from its start, the last one shorter; so a chunk never spans two segments and
a document's chunks are the same wherever it is laid out after the same prefix. Chunk i's key chains the key of
chunk i-1, the model fingerprint, chunk i's salt and its token ids (kvmart/format/keys.py): two prompts share a key
exactly when they share every token up to the end of that chunk, under the same model and salts.

Exactness: a chunk's KV is computed by one forward pass continuing from the KVs of the chunks before it, held as
separate pieces (kvmart/runtime/kv.py `Prefix`), never merged. So a chunk's KV is a function of its prefix's tokens
and of the chunk boundaries only, computed with the same shapes whoever computes it: reusing k stored chunks and
continuing is bit-identical to computing those k chunks from scratch in the same steps and continuing
(tests/test_chunks.py, torch.equal, both dtypes). Why not slices of one long prefill: CPU SDPA's blocking depends
on the sequence length, so the first k positions of a longer prefill are not always bit-identical to prefilling k
tokens (measured: float32 differs at k = 8, 256 and 768 of 1,100 tokens from layer 1 on).

Each stored chunk is an ordinary kvmart artifact (kvmart/format/artifact.py) holding the chunk's KV and its own
token ids, with its chained key as cache id and an entry of kind `chunk`; reading one checks that key and those ids
against the reader's own prompt, so a chunk stored under the wrong key is refused, never used."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvmart.errors import ArtifactError
from kvmart.format.artifact import encode_artifact, read_artifact
from kvmart.format.keys import chain_key, check_chunk_tokens
from kvmart.runtime.fingerprint import ModelFingerprint
from kvmart.runtime.kv import KV
from kvmart.store import Entry, Store

log = logging.getLogger("kvmart.chunks")


@dataclass(frozen=True)
class Segment:
    """A run of a prompt's token ids that ends at a boundary (a document's or a message's end)."""

    token_ids: tuple[int, ...]
    salt: str = ""  # keys its chunks: '' public, else a tenant's server-side salt (never a client's)


@dataclass(frozen=True)
class Chunk:
    """One chunk of a prompt: where it starts, its token ids, the salt and chained key it is stored under."""

    start: int
    token_ids: tuple[int, ...]
    salt: str
    key: str

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


def cut(segments: Sequence[Segment], chunk_tokens: int) -> list[tuple[tuple[int, ...], str]]:
    """The (token ids, salt) of each chunk: every segment cut every `chunk_tokens` from its start."""
    check_chunk_tokens(chunk_tokens)
    pieces = []
    for segment in segments:
        ids = segment.token_ids
        pieces += [(ids[s:s + chunk_tokens], segment.salt) for s in range(0, len(ids), chunk_tokens)]
    return pieces


def chain(fingerprint_digest: str, pieces: Sequence[tuple[Sequence[int], str]], parent: str = "",
          start: int = 0) -> list[Chunk]:
    """Key consecutive pieces ((ids, salt) each), continuing the chain after `parent` at position `start`."""
    chunks = []
    for ids, salt in pieces:
        parent = chain_key(parent, fingerprint_digest, salt, list(ids))
        chunks.append(Chunk(start, tuple(ids), salt, parent))
        start += len(ids)
    return chunks


def chunks_of(fingerprint_digest: str, segments: Sequence[Segment], chunk_tokens: int) -> list[Chunk]:
    """A prompt's chunks, keyed."""
    return chain(fingerprint_digest, cut(segments, chunk_tokens))


class ChunkStore:
    """The chunks of one model in `store`, beside its documents (entries of kind `chunk`). Thread-safe as its store
    is. Reading a chunk checks its artifact in full (kvmart/format/artifact.py), its key and its token ids."""

    def __init__(self, store: Store, fingerprint: ModelFingerprint, codec: str = "raw") -> None:
        self.store, self.fingerprint, self.codec = store, fingerprint, codec

    def entry(self, key: str) -> Entry | None:
        """The stored chunk's entry, or None: one lookup, whatever the catalogue's size."""
        found = self.store.entry(key)
        return found if found is not None and found.kind == "chunk" else None

    def put(self, chunk: Chunk, kv: KV, owner: str = "", title: str = "", compute_seconds: float = 0.0) -> Entry:
        """Store `kv` as `chunk` (nothing is written if it is already stored: same key, same KV). `owner`: the
        document that stores it first, whose licence prices automatic reads of it ('' for an agent's own cache)."""
        existing = self.entry(chunk.key)
        if existing is not None:
            return existing
        artifact = encode_artifact(kv, list(chunk.token_ids), self.fingerprint, codec=self.codec, cache_id=chunk.key)
        entry = Entry(cache_id=chunk.key, title=title, source=f"chunk at {chunk.start}", model="",
                      fingerprint=self.fingerprint.digest, num_tokens=chunk.num_tokens,
                      artifact_bytes=artifact.nbytes, prefill_seconds=compute_seconds, created_at=time.time(),
                      kind="chunk", owner=owner)
        return self.store.put(entry, artifact.write)

    def read(self, chunk: Chunk, strict: bool = False) -> KV | None:
        """The stored KV of `chunk`, or None if it is not stored. A chunk that fails its checks (corrupt,
        foreign, other tokens than its key says) is refused, logged and dropped: it will be computed again; with
        `strict`, the refusal is raised (ArtifactError saying why) instead of answered None."""
        found = self.read_located(chunk, strict)
        return None if found is None else found[0]

    def read_located(self, chunk: Chunk, strict: bool = False) -> tuple[KV, str] | None:
        """As `read`, with the name of the store tier that answered (one of the store's `tier_names`)."""
        try:
            opened = self.store._open_located(chunk.key)  # a shared tier checks the cluster's signature here
            if opened is None:
                return None
            f, size, tier = opened
            with f:
                manifest, kv = read_artifact(f, size, self.fingerprint, expected_cache_id=chunk.key)
        except ArtifactError as e:
            log.warning("chunk %s refused and dropped (it will be computed again): %s", chunk.key[:16], e)
            self.store.delete(chunk.key)
            if strict:
                raise
            return None
        if tuple(manifest.token_ids) != chunk.token_ids:
            log.warning("chunk %s holds other tokens than its key says; refused", chunk.key[:16])
            if strict:
                raise ArtifactError(f"chunk {chunk.key[:16]} holds other tokens than its key says")
            return None
        return kv, tier

    def read_run(self, chunks: Sequence[Chunk]) -> list[KV]:
        """The KVs of the longest run of `chunks`, from the first, that are stored and pass their checks."""
        found = []
        for chunk in chunks:
            kv = self.read(chunk)
            if kv is None:
                break
            found.append(kv)
        return found
