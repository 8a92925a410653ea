"""The engine: what one request computes, as a stream of events. Runs only on the model worker's thread (forward
passes and the tokenizer are not thread-safe); the worker advances one generator per step.

A request flows one way: prompt -> token ids -> longest stored prefix (catalogue) -> its KV (hot tier, else the
store; or, with `bypass`, a fresh prefill of the same document) -> continue with the rest of the prompt -> tokens.
Both paths compute the same two steps, document then the rest, so they agree bit for bit."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import BinaryIO

import torch

from kvmart.errors import ArtifactError, ContextOverflowError, TooLargeError, UnknownCacheError
from kvmart.format.artifact import manifest_for, write_artifact
from kvmart.format.keys import cache_id as make_cache_id
from kvmart.reuse import core
from kvmart.reuse.catalog import Catalog, Document, Match, Readable
from kvmart.reuse.prompt import ChatPrompt, Prompt, chat_token_ids, text_token_ids
from kvmart.reuse.upload import upload_size, verify_upload
from kvmart.runtime.chat import Layout, document_ids, layout_for, question_ids
from kvmart.runtime.kv import KV
from kvmart.runtime.model import Model
from kvmart.server.config import ServerSettings
from kvmart.server.pipeline.hot import HotTier
from kvmart.server.pipeline.text import Detokenizer, StopMatcher
from kvmart.store import Entry, Store

log = logging.getLogger("kvmart.server")


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None  # None: the server's default, within the context
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Prompt
    sampling: Sampling
    bypass: bool = False  # prefill the matched document from scratch instead of reusing its stored KV
    readable: Readable = None  # the private documents the caller may read (None: all); others are never matched


@dataclass(frozen=True)
class Reuse:
    """How the prompt's first `prefix_tokens` were obtained: tier `ram` or `store` (reused, `cached_tokens` ==
    prefix_tokens), `bypass` (the same document prefilled afresh, nothing cached), `recomputed` (its artifact was
    missing or refused, e.g. lost from a shared tier: prefilled again and stored back) or `none` (no stored
    prefix)."""

    tier: str
    document: Document | None
    prefix_tokens: int
    cached_tokens: int
    load_seconds: float
    saved_seconds: float  # estimated prefill time not spent: the document's share minus the load


NO_REUSE = Reuse("none", None, 0, 0, 0.0, 0.0)


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, int, float], ...]  # (token, id, logprob), most likely first


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    max_new_tokens: int
    reuse: Reuse


@dataclass(frozen=True)
class Delta:
    text: str
    token_id: int | None  # None: text held back until the end
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # stop | length
    stop_sequence: str | None
    completion_tokens: int  # tokens generated, an end-of-turn token included


@dataclass(frozen=True)
class Published:
    document: Document
    is_new: bool  # False: it was already stored and nothing was computed
    seconds: float


Event = Started | Delta | Finished | Published


class Engine:
    """Not thread-safe: every method runs on the model worker's thread."""

    def __init__(self, model: Model, store: Store, catalog: Catalog, hot: HotTier, settings: ServerSettings,
                 salt_for: Callable[[str], str] = lambda cache_id: "", codec: str = "raw") -> None:
        self.model, self.store, self.catalog, self.hot, self.settings = model, store, catalog, hot, settings
        self.salt_for = salt_for  # the tenant salt a cache id was made with (the ledger's licence), to verify it
        self.codec = codec  # how published documents' artifacts are encoded (KVMART_CODEC)
        self.header_ids = document_ids(model.tokenize, layout_for(model.tokenizer), "")

    def generate(self, request: GenerationRequest) -> Iterator[Started | Delta | Finished]:
        """Started, then Deltas, then Finished. Typed errors (unknown document, context overflow) come before
        Started."""
        named = [self.catalog.get(doc_id, request.readable) for doc_id in request.prompt.documents]
        ids = self.prompt_ids(request.prompt, named)
        max_new = self.max_new_tokens(len(ids), request.sampling.max_tokens)
        prefix, reuse = self.acquire(self.match(ids, named, request.readable), request.bypass)
        yield Started(len(ids), max_new, reuse)
        yield from self.decode(prefix, ids[reuse.prefix_tokens:], max_new, request.sampling)

    def publish(self, text: str, title: str, source: str, system: str | None, salt: str = "",
                upload: bytes | BinaryIO | None = None, before_store: Callable[[str], None] | None = None
                ) -> Iterator[Published]:
        """Prefill and store a document (the CLI's `core.precompute` path), or find it already stored. A private
        document is stored under its publisher's tenant `salt`. With `upload` (an artifact the publisher
        computed), its KV is stored instead, once verified (kvmart/reuse/upload.py); ArtifactRejectedError if not.
        TooLargeError for a document or artifact beyond the server's limits. `before_store(cache_id)` is called
        before a new artifact is stored (the caller notes the publication in the ledger: kvmart/ledger/licences.py)."""
        start = time.perf_counter()
        layout = layout_for(self.model.tokenizer, system) if system else None
        ids = document_ids(self.model.tokenize, layout or layout_for(self.model.tokenizer), core.check_text(text))
        self.check_limits(len(ids), upload_size(upload) if upload is not None else None)
        self.check_usable(len(ids), layout or layout_for(self.model.tokenizer))
        if upload is None:
            cid = make_cache_id(self.model.fingerprint.digest, ids, salt)
            if before_store is not None and self.store.entry(cid) is None:
                before_store(cid)
            result = core.precompute_ids(self.model, self.store, ids, title, source, salt=salt, codec=self.codec)
            yield Published(self.catalog.add(result.entry), result.is_new, result.seconds)
            return
        existing = self.store.entry(make_cache_id(self.model.fingerprint.digest, ids, salt))
        if existing is not None:  # already stored: the upload is not needed (nor trusted)
            yield Published(self.catalog.add(existing), False, time.perf_counter() - start)
            return
        self.model.check_fits("the document", len(ids))
        verified = verify_upload(self.model, upload, ids, self.settings.upload_chunk_tokens,
                                 self.settings.upload_sample_percent)
        manifest = manifest_for(verified.kv, ids, self.model.fingerprint, salt)
        entry = Entry(cache_id=manifest.cache_id, title=title, source=source, model=self.model.spec,
                      fingerprint=self.model.fingerprint.digest, num_tokens=len(ids), artifact_bytes=upload_size(upload),
                      prefill_seconds=time.perf_counter() - start, created_at=time.time())
        if before_store is not None:
            before_store(manifest.cache_id)
        stored = self.store.put(entry, lambda f: write_artifact(f, manifest, verified.kv))
        yield Published(self.catalog.add(stored), True, time.perf_counter() - start)

    def check_limits(self, num_tokens: int, upload_bytes: int | None) -> None:
        """TooLargeError for a document beyond max_document_tokens or an artifact beyond max_artifact_bytes (the
        one to upload, or the one the provider would write)."""
        max_tokens = self.settings.max_document_tokens
        if max_tokens and num_tokens > max_tokens:
            raise TooLargeError(f"the document is {num_tokens:,} tokens; this server publishes documents of at "
                                f"most {max_tokens:,} tokens", "text")
        size = upload_bytes if upload_bytes is not None else num_tokens * self.model.kv_bytes_per_token
        limit = self.settings.max_artifact_bytes
        if limit and size > limit:
            what = "the uploaded artifact is" if upload_bytes is not None else "its KV cache would be"
            raise TooLargeError(f"{what} {size:,} bytes; this server stores artifacts of at most {limit:,} bytes",
                                "artifact" if upload_bytes is not None else "text")

    def check_usable(self, num_tokens: int, layout: Layout) -> None:
        """TooLargeError (413) for a document no request could use: one that leaves no room in the model's context
        for the shortest question ("?") and a one-token answer. Checked before anything is computed or charged."""
        room = len(question_ids(self.model.tokenize, layout, "?")) + 1
        usable = self.model.context_tokens - room
        if num_tokens > usable:
            raise TooLargeError(
                f"the document is {num_tokens:,} tokens, and no request could use it: {self.model.spec}'s context "
                f"holds {self.model.context_tokens:,} tokens, so a document can be at most {usable:,} tokens (room "
                f"for a question and an answer of at least {room:,} tokens)", "text")

    def prompt_ids(self, prompt: Prompt, documents: list[Document]) -> list[int]:
        stored = [d.token_list() for d in documents]
        if isinstance(prompt, ChatPrompt):
            return chat_token_ids(self.model.tokenize, self.model.tokenizer, prompt, stored, self.header_ids)
        return text_token_ids(self.model.tokenize, prompt, stored, self.model.vocab_size)

    def max_new_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        """`requested`, or the default clipped to the room left; ContextOverflowError saying by how much."""
        limit = self.model.context_tokens
        if requested is None:
            if prompt_tokens + 1 > limit:
                raise ContextOverflowError(f"the prompt ({prompt_tokens:,} tokens) plus one generated token",
                                           prompt_tokens + 1, limit)
            return min(self.settings.default_max_tokens, limit - prompt_tokens)
        if prompt_tokens + requested > limit:
            raise ContextOverflowError(f"the prompt ({prompt_tokens:,} tokens) plus max_tokens ({requested:,})",
                                       prompt_tokens + requested, limit)
        return requested

    def match(self, ids: list[int], named: list[Document], readable: Readable = None) -> Match | None:
        """The stored prefix to reuse. At least one prompt token is always left to compute."""
        min_tokens = self.settings.min_prefix_tokens
        if named:  # a named document is reused however short it is
            min_tokens = min(min_tokens, named[0].num_tokens)
        found = self.catalog.longest_prefix(ids, min_tokens, readable)
        if found is None or min(found.num_tokens, len(ids) - 1) < 1:
            return None
        return Match(found.document, min(found.num_tokens, len(ids) - 1))

    def acquire(self, match: Match | None, bypass: bool) -> tuple[KV | None, Reuse]:
        """The KV of the matched prefix and how it was obtained."""
        if match is None:
            return None, NO_REUSE
        doc, k = match.document, match.num_tokens
        if bypass:
            return self.model.prefill(doc.token_list()).slice(0, k), Reuse("bypass", doc, k, 0, 0.0, 0.0)
        loaded, tier = self.hot.get(doc.cache_id), "ram"
        if loaded is None:
            salt = self.salt_for(doc.cache_id) if doc.is_salted else ""
            try:
                loaded, tier = core.load(self.model, self.store, doc.cache_id, salt), "store"
            except (UnknownCacheError, ArtifactError) as e:
                log.warning("artifact %s unusable (%s): recomputing it", doc.cache_id[:16], e)
                loaded = self.recompute(doc, salt)
                self.hot.put(loaded)
                return loaded.kv.slice(0, k), Reuse("recomputed", doc, k, 0, 0.0, 0.0)
            self.hot.put(loaded)
        load_seconds = loaded.load_seconds if tier == "store" else 0.0
        saved = max(0.0, doc.entry.prefill_seconds * k / doc.num_tokens - load_seconds)
        return loaded.kv.slice(0, k), Reuse(tier, doc, k, k, load_seconds, saved)

    def recompute(self, doc: Document, salt: str = "") -> core.Loaded:
        """Prefill a catalogued document whose artifact is gone or refused, and store it back (under its tenant's
        salt, for a private document). The same ids give the same KV as the lost artifact held, so answers stay
        bit-exact."""
        start, ids = time.perf_counter(), doc.token_list()
        kv = self.model.prefill(ids)
        manifest = manifest_for(kv, ids, self.model.fingerprint, salt)
        entry = self.store.put(doc.entry, lambda f: write_artifact(f, manifest, kv))
        return core.Loaded(entry, kv, ids, time.perf_counter() - start)

    def decode(self, prefix: KV | None, rest: list[int], max_new: int, sampling: Sampling
               ) -> Iterator[Delta | Finished]:
        """Generate after `prefix` + `rest`: text deltas (stop sequences and partial characters held back)."""
        steps = self.model.stream(prefix, rest, max_new, sampling.temperature, sampling.top_p, sampling.seed)
        return self.emit(steps, sampling)

    def emit(self, steps: Iterator[tuple[int, torch.Tensor | None]], sampling: Sampling) -> Iterator[Delta | Finished]:
        """Generated (token, logits) pairs as text deltas and a Finished; stops at an end-of-turn token or a stop
        sequence. Logits may be None (an engine that reports none; then no logprobs)."""
        detokenizer, stops, count, reason = Detokenizer(self.model.decode), StopMatcher(sampling.stop), 0, "length"
        with closing(steps):
            for token, logits in steps:
                count += 1
                if token in self.model.eos_ids:
                    reason = "stop"
                    break
                text, stop = stops.feed(detokenizer.push(token))
                yield Delta(text, token, self.logprob(logits, token, sampling.top_logprobs))
                if stop is not None:
                    yield Finished("stop", stop, count)
                    return
        tail, stop = stops.feed(detokenizer.flush())
        tail += "" if stop else stops.flush()
        if tail:
            yield Delta(tail, None, None)
        yield Finished("stop" if stop else reason, stop, count)

    def logprob(self, logits: torch.Tensor | None, token: int, top: int | None) -> TokenLogprob | None:
        if top is None or logits is None:
            return None
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = torch.topk(logprobs, top) if top else (logprobs[:0], torch.empty(0, dtype=torch.long))
        decode = self.model.decode
        return TokenLogprob(decode([token]), token, float(logprobs[token]),
                            tuple((decode([int(i)]), int(i), float(v)) for v, i in zip(values, ids, strict=True)))
