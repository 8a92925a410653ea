"""The core loop: precompute a document's KV once and store it; load it back verified; answer from it.

A request flows one way: text -> token ids (chat layout) -> cache id -> store (hit, or prefill and put) -> KV ->
continue with the question's tokens -> answer."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvmart.codec import Spec
from kvmart.errors import InputError, UnknownCacheError
from kvmart.format.artifact import encode_artifact, read_artifact
from kvmart.format.keys import cache_id as make_cache_id
from kvmart.runtime.chat import Layout, document_ids, layout_for, question_ids
from kvmart.runtime.kv import KV
from kvmart.runtime.model import Model
from kvmart.store import Entry, Store


@dataclass(frozen=True)
class Precomputed:
    entry: Entry
    is_new: bool  # False: the store already held it and nothing was computed
    seconds: float


@dataclass(frozen=True)
class Loaded:
    entry: Entry
    kv: KV
    token_ids: list[int]
    load_seconds: float


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
               salt: str = "", codec: str | Spec = "raw") -> Precomputed:
    """Prefill `text` once and store its artifact; a document already stored is returned without computing.
    A tenant `salt` (the server's, for private documents) gives the same text its own cache id."""
    ids = document_ids(model.tokenize, layout or layout_for(model.tokenizer), check_text(text))
    return precompute_ids(model, store, ids, title, source, progress, salt, codec)


def precompute_ids(model: Model, store: Store, token_ids: list[int], title: str = "", source: str = "",
                   progress: Callable[[float], None] | None = None, salt: str = "",
                   codec: str | Spec = "raw") -> Precomputed:
    """Prefill exactly these token ids once and store the artifact, its tensors encoded with `codec` (or return
    the stored one, whatever its codec: the cache id names the content, not its encoding). `raw` by default: a
    local store maps it in place; callers pass `Settings.artifact_codec`, which picks kvmart's codec for shared
    stores."""
    start = time.perf_counter()
    model.check_fits("the document", len(token_ids))
    cid = make_cache_id(model.fingerprint.digest, token_ids, salt)
    existing = store.entry(cid)
    if existing is not None:
        return Precomputed(existing, False, time.perf_counter() - start)
    kv = model.prefill(token_ids, progress)
    prefill_seconds = time.perf_counter() - start
    artifact = encode_artifact(kv, token_ids, model.fingerprint, salt=salt, codec=codec)
    entry = Entry(cache_id=cid, title=title, source=source, model=model.spec, fingerprint=model.fingerprint.digest,
                  num_tokens=len(token_ids), artifact_bytes=artifact.nbytes,
                  prefill_seconds=prefill_seconds, created_at=time.time())
    stored = store.put(entry, artifact.write)
    return Precomputed(stored, True, time.perf_counter() - start)


def load(model: Model, store: Store, cache_id: str, salt: str = "") -> Loaded:
    """Read and verify an artifact for `model` (made with `salt`); ArtifactError if it is corrupt or foreign."""
    start = time.perf_counter()
    with store.open(cache_id) as (f, size):
        manifest, kv = read_artifact(f, size, model.fingerprint, salt, requested_cache_id=cache_id)
    entry = store.entry(cache_id)
    if entry is None:  # its entry was unreadable (quarantined) or removed meanwhile: as good as absent
        raise UnknownCacheError(f"artifact {cache_id[:16]} has no catalogue entry: precompute the document again")
    return Loaded(entry, kv, manifest.token_ids, time.perf_counter() - start)


def ask_stream(model: Model, loaded: Loaded, question_token_ids: list[int], max_new_tokens: int = 64,
               temperature: float = 0.0, seed: int | None = None) -> Iterator[int]:
    """Generated token ids, one by one, continuing from the loaded document (end-of-turn tokens dropped)."""
    for token, _ in model.stream(loaded.kv, question_token_ids, max_new_tokens, temperature, seed=seed):
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
        text=model.decode(tokens), token_ids=tokens, cached_tokens=loaded.kv.num_tokens, computed_tokens=len(q),
        load_seconds=loaded.load_seconds, generate_seconds=time.perf_counter() - start,
        saved_seconds=max(0.0, loaded.entry.prefill_seconds - loaded.load_seconds),
    )
