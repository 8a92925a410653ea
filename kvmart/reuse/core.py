"""The core loop: precompute a document's KV once and store it as a chunk chain; load it back verified; answer
from it.

A request flows one way: text -> token ids (chat layout) -> cache id -> store (hit, or compute the chunks not
stored yet, store them, and write the document's index) -> the chunks' KVs -> continue with the question's tokens
-> answer. A document's chunks are keyed by their content only (kvmart/reuse/chunks.py), so documents that share a
prefix share its chunks, and a document whose first chunks are stored computes only the rest."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvmart.codec import Spec
from kvmart.errors import ArtifactError, InputError, UnknownCacheError
from kvmart.format.artifact import check_requested, index_manifest, read_index, read_manifest, write_index
from kvmart.format.keys import cache_id as make_cache_id
from kvmart.reuse.chunks import Chunk, ChunkStore, Segment, chunks_of
from kvmart.runtime.chat import Layout, document_ids, layout_for, question_ids
from kvmart.runtime.kv import KV, Prefix, prefix_tokens
from kvmart.runtime.model import Model
from kvmart.store import Entry, Store

DEFAULT_CHUNK_TOKENS = 256  # Settings.chunk_tokens' default


@dataclass(frozen=True)
class Precomputed:
    entry: Entry
    is_new: bool  # False: the store already held it and nothing was computed
    seconds: float
    computed_tokens: int = 0  # tokens prefilled now; the rest were chunks another document had stored


@dataclass(frozen=True)
class Loaded:
    """A stored document read back: its chunks' KVs, in order (a `Prefix`), and its token ids."""

    entry: Entry
    prefix: Prefix
    token_ids: list[int]
    load_seconds: float

    @property
    def num_tokens(self) -> int:
        return prefix_tokens(self.prefix)

    @property
    def kv(self) -> KV:
        """The document's KV as one KV (a copy of its chunks, joined; continue from `prefix` to reuse it)."""
        return KV.concat(list(self.prefix))


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]
    cached_tokens: int
    computed_tokens: int  # prompt tokens prefilled for this request (the question), not generated ones
    load_seconds: float
    generate_seconds: float
    saved_seconds: float  # the document's measured prefill time minus the time to load its artifact


def check_text(text: str) -> str:
    if not text.strip():
        raise InputError("the document is empty: nothing to precompute")
    return text


def decode_utf8(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{name} is not UTF-8 text (invalid byte at offset {e.start}); convert it first") from e


def precompute(model: Model, store: Store, text: str, title: str = "", source: str = "",
               progress: Callable[[float], None] | None = None, layout: Layout | None = None,
               salt: str = "", codec: str | Spec = "raw", chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               terms: str = "") -> Precomputed:
    """Prefill `text` once and store it; a document already stored is returned without computing. A tenant
    `salt` (the server's, for private documents) gives the same text its own cache id and its own chunks; `terms`
    (a licence's canonical terms) another cache id, the chunks shared."""
    ids = document_ids(model.tokenize, layout or layout_for(model.tokenizer), check_text(text))
    return precompute_ids(model, store, ids, title, source, progress, salt, codec, chunk_tokens, terms)


def document_chunks(model: Model, token_ids: list[int], salt: str = "",
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[Chunk]:
    """The chunks a document of `token_ids` is stored as: one segment, cut every `chunk_tokens`."""
    return chunks_of(model.fingerprint.digest, [Segment(tuple(token_ids), salt)], chunk_tokens)


def precompute_ids(model: Model, store: Store, token_ids: list[int], title: str = "", source: str = "",
                   progress: Callable[[float], None] | None = None, salt: str = "",
                   codec: str | Spec = "raw", chunk_tokens: int = DEFAULT_CHUNK_TOKENS, terms: str = "",
                   computed: Prefix | None = None) -> Precomputed:
    """Store exactly these token ids as a document: the chunks not stored yet are computed (each continuing from
    the ones before it, stored ones read back), stored, and the document's index written last, so a reader sees
    either no document or a whole one. Chunks are encoded with `codec` (`raw` by default: a local store maps them
    in place; callers pass `Settings.artifact_codec`, which picks kvmart's codec for shared stores). `computed`:
    the chunks' KVs already in hand (a verified upload), stored instead of computed."""
    start = time.perf_counter()
    model.check_fits("the document", len(token_ids))
    cid = make_cache_id(model.fingerprint.digest, token_ids, salt, terms)
    existing = store.entry(cid)
    if existing is not None:
        return Precomputed(existing, False, time.perf_counter() - start)
    chunks = document_chunks(model, token_ids, salt, chunk_tokens)
    chunk_store = ChunkStore(store, model.fingerprint, codec if isinstance(codec, str) else codec.name)
    kvs = list(computed) if computed is not None else chunk_store.read_run(chunks)
    todo = chunks[len(kvs):]
    if todo:
        kvs += model.prefill_pieces([list(c.token_ids) for c in todo], tuple(kvs), progress)
    seconds = time.perf_counter() - start
    stored_bytes = 0
    for chunk, kv in zip(chunks, kvs, strict=True):
        stored_bytes += chunk_store.put(chunk, kv, owner=cid, title=title).artifact_bytes
    index = index_manifest(token_ids, [(c.num_tokens, c.key) for c in chunks], model.fingerprint,
                           (model.num_layers, model.kv_heads, model.head_dim), model.dtype_name, salt, terms)
    entry = Entry(cache_id=cid, title=title, source=source, model=model.spec, fingerprint=model.fingerprint.digest,
                  num_tokens=len(token_ids), artifact_bytes=0, prefill_seconds=seconds, created_at=time.time(),
                  kv_bytes=stored_bytes)
    stored = store.put(entry, lambda f: write_index(f, index))
    return Precomputed(stored, True, time.perf_counter() - start, sum(c.num_tokens for c in todo))


def read_document(model: Model, store: Store, cache_id: str, salt: str = "") -> tuple[Entry, list[Chunk]]:
    """A stored document's entry and chunks (its index verified against its tokens, model and salt; a document
    stored whole by older versions is one chunk). UnknownCacheError if absent, ArtifactError if refused."""
    absent = UnknownCacheError(f"no document with cache id {cache_id[:16]!r} in this store (see `kvmart ls`)")
    entry = store.entry(cache_id)  # None too for an entry a shared tier refuses: opening it then says why
    if entry is not None and not entry.is_document:
        raise absent
    # the head only, from the fastest tier that has it, filling nothing: the index is checked against its tokens
    # whatever tier it comes from, and a document stored whole is read (and kept on the local tiers) as its chunk;
    # a shared tier refuses a head not signed for this id here
    with store.open_head(cache_id) as (f, size):
        manifest = read_index(f, size, model.fingerprint, salt)
    check_requested(manifest, cache_id)  # another document's index copied under this id is refused, never served
    entry = entry or store.entry(cache_id)
    if entry is None or not entry.is_document:  # its entry quarantined or removed meanwhile: as good as absent
        raise absent
    chunks, begin = [], 0
    for n, key in manifest.chunks:  # keys checked against the tokens by read_index (a whole artifact: its own id)
        chunks.append(Chunk(begin, tuple(manifest.token_ids[begin:begin + n]), salt, key))
        begin += n
    return entry, chunks


def load(model: Model, store: Store, cache_id: str, salt: str = "") -> Loaded:
    """Read and verify a document for `model` (made with `salt`): every chunk's KV. ArtifactError if a chunk is
    missing, corrupt or foreign (`load_or_recompute` computes such chunks again instead)."""
    start = time.perf_counter()
    entry, chunks = read_document(model, store, cache_id, salt)
    chunk_store, kvs = ChunkStore(store, model.fingerprint), []
    for n, chunk in enumerate(chunks):
        kv = chunk_store.read(chunk, strict=True)  # a refused chunk raises, saying why
        if kv is None:
            raise ArtifactError(f"document {cache_id[:16]}: chunk {n} of {len(chunks)} is missing from the store")
        kvs.append(kv)
    return Loaded(entry, tuple(kvs), [t for c in chunks for t in c.token_ids], time.perf_counter() - start)


def remove(store: Store, cache_id: str) -> int:
    """Delete a document and those of its chunks no other stored document lists; how many chunks went. Its chunks
    are the ones its index lists and the ones stored as its own (`owner`): a publication cut off before its index
    was written leaves only those. (A chunk of the automatic prefix cache belongs to no document: the store's
    placement evicts those.)"""
    entries = store.entries()
    mine = set(chunk_keys_of(store, cache_id)) | {e.cache_id for e in entries if e.kind == "chunk"
                                                  and e.owner == cache_id}
    store.delete(cache_id)
    for entry in entries:
        if entry.is_document and entry.cache_id != cache_id and mine:
            mine -= set(chunk_keys_of(store, entry.cache_id))
    return sum(store.delete(key) for key in mine if key != cache_id)


def chunk_keys_of(store: Store, cache_id: str) -> list[str]:
    """The chunk keys a stored document's index lists (none for a document stored whole, or unreadable)."""
    try:
        with store.open_head(cache_id) as (f, size):
            manifest, _ = read_manifest(f, size)
    except (ArtifactError, UnknownCacheError):
        return []
    return [key for _, key in manifest.chunks]


def ask_stream(model: Model, loaded: Loaded, question_token_ids: list[int], max_new_tokens: int = 64,
               temperature: float = 0.0, seed: int | None = None) -> Iterator[int]:
    """Generated token ids, one by one, continuing from the loaded document (end-of-turn tokens dropped)."""
    for token, _ in model.stream(loaded.prefix, question_token_ids, max_new_tokens, temperature, seed=seed):
        if token not in model.eos_ids:
            yield token


def ask(model: Model, loaded: Loaded, question: str, max_new_tokens: int = 64, temperature: float = 0.0,
        seed: int | None = None) -> Answer:
    if not question.strip():
        raise InputError("the question is empty")
    start = time.perf_counter()
    q = question_ids(model.tokenize, layout_for(model.tokenizer), question)
    tokens = list(ask_stream(model, loaded, q, max_new_tokens, temperature, seed))
    return Answer(
        text=model.decode(tokens), token_ids=tokens, cached_tokens=loaded.num_tokens, computed_tokens=len(q),
        load_seconds=loaded.load_seconds, generate_seconds=time.perf_counter() - start,
        saved_seconds=max(0.0, loaded.entry.prefill_seconds - loaded.load_seconds),
    )
