"""Planning a request, off the model thread: what its prompt is, which of its chunks are cached, who is paid for
them, and the most it can cost. The pipeline holds that much money before any forward pass (runs.py), then loads
the cached chunks (`Loader`, also off the model thread) and only then queues compute on the model worker.

A request's prompt is laid out documents first (kvmart/reuse/prompt.py), then cut into segments: each named
document, keyed under its own salt ('' public, its publisher's tenant salt if private), then everything after the
documents (system prompt, messages), keyed under the caller's tenant salt, so an agent's own prefixes are reused
by its later requests and never by another tenant's. Each segment is cut into chunks (kvmart/reuse/chunks.py); a
prompt reuses its longest run of leading chunks found in the hot tier or the store: one lookup per chunk, whatever
the catalogue's size. The first document's chunks are the ones its index lists (where it was published), so a
document stored whole by an older version, or with another chunk size, is still reused.

Billing rules (docs/SERVER.md "Billing"):
- a named document always wins: its tokens are read from its chunks and pay its licence (price and royalty);
- a document pasted into the prompt without being named (found by its first chunk's key) is used only if its
  cache-read price is at most the request's `max_cache_read_usd_per_mtok` (the list price when not stated), and
  then pays its licence; otherwise the text is computed and cached as the caller's own;
- tokens read from the caller's own prefix cache pay the list cache-read price, with no royalty."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from kvmart.errors import ContextOverflowError, RequestError, UnknownDocumentError
from kvmart.format.keys import chain_key
from kvmart.ledger import Account, Ledger, Licence
from kvmart.reuse.catalog import Catalog, Document, Readable
from kvmart.reuse.chunks import Chunk, ChunkStore, Segment, chain, cut
from kvmart.reuse.prompt import ChatPrompt, Laid, Prompt, lay_out_chat, lay_out_text
from kvmart.runtime.chat import document_ids, layout_for
from kvmart.runtime.kv import KV
from kvmart.runtime.model import Model
from kvmart.server.config import ServerSettings
from kvmart.server.pipeline.hot import HotTier

# a prompt's text longer than this many characters per token of context cannot fit, whatever the tokenizer does: it
# is refused before tokenizing (a token is rarely longer than 16 characters; 32 leaves room)
MAX_CHARS_PER_TOKEN = 32


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
    bypass: bool = False  # compute every chunk from scratch, reuse and keep nothing (the exactness reference)
    max_cache_read_usd_per_mtok: Decimal | None = None  # the most a pasted document may cost per 1M tokens read


@dataclass(frozen=True)
class Caller:
    """Who a request is planned for: what it may read and the salt of its own prefixes (never a client's)."""

    account: Account | None  # None: no ledger (tests, benchmarks): every document readable, no salt
    readable: Readable
    salt: str


@dataclass(frozen=True)
class Source:
    """A run of cached prompt tokens and who is paid for them: a document (its licence, if recorded) or the
    caller's own prefix cache (`document` None)."""

    document: Document | None
    licence: Licence | None
    num_tokens: int


@dataclass(frozen=True)
class Plan:
    request: GenerationRequest
    laid: Laid
    chunks: tuple[Chunk, ...]
    cached_chunks: int  # the leading chunks found in a cache (read, not computed)
    documents: tuple[Document, ...]  # laid out first: the named ones, or one found pasted
    sources: tuple[Source, ...]
    max_new_tokens: int
    store_keys: frozenset[str]  # computed chunks written back to the store: a document's own (its index lists them)
    seconds: float

    @property
    def prompt_tokens(self) -> int:
        return len(self.laid.token_ids)

    @property
    def cached_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks[:self.cached_chunks])

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def named(self) -> bool:
        return bool(self.request.prompt.documents)


class Planner:
    """Thread-safe (the model is used only for its tokenizer, under its own lock)."""

    def __init__(self, model: Model, catalog: Catalog, hot: HotTier, chunks: ChunkStore, ledger: Ledger | None,
                 settings: ServerSettings, chunk_tokens: int) -> None:
        self.model, self.catalog, self.hot, self.chunks, self.ledger = model, catalog, hot, chunks, ledger
        self.settings, self.chunk_tokens = settings, chunk_tokens
        self.header_ids = document_ids(model.tokenize, layout_for(model.tokenizer), "")
        self.fingerprint = model.fingerprint.digest

    # -- the plan ------------------------------------------------------------------------------------------------
    def plan(self, request: GenerationRequest, caller: Caller) -> Plan:
        """The request's plan; typed errors (unknown document, prompt too long, bad parameters) before any work."""
        start = time.perf_counter()
        check_length(request.prompt, self.model.context_tokens)
        named = [self.document(doc_id, caller.readable) for doc_id in request.prompt.documents]
        laid = self.lay_out(request.prompt, named)
        max_new = self.max_new_tokens(len(laid.token_ids), request.sampling.max_tokens)
        documents, licences = named, {d.cache_id: self.licence(d) for d in named}
        if not named:  # the same plan with or without `bypass`: the same chunks, computed or read
            pasted = self.pasted(laid, caller, request.max_cache_read_usd_per_mtok)
            if pasted is not None:
                document, tokens = pasted
                documents, licences[document.cache_id] = [document], self.licence(document)
                laid = dataclasses.replace(laid, documents=((0, tokens),))
        chunks = self.chunk(laid, documents, caller)
        cached = 0 if request.bypass else self.cached_run(chunks)
        sources = self.sources(laid, documents, licences, chunks[:cached])
        store_keys = frozenset(c.key for c in chunks if documents and c.end <= laid.documents[0][1])
        return Plan(request, laid, tuple(chunks), cached, tuple(documents), sources, max_new,
                    store_keys if not request.bypass else frozenset(), time.perf_counter() - start)

    def document(self, doc_id: str, readable: Readable) -> Document:
        """A named document, checked to be still stored (a deletion anywhere is seen at once)."""
        found = self.catalog.get(doc_id, readable)
        if not self.catalog.still_stored(found):
            raise UnknownDocumentError(doc_id)
        return found

    def lay_out(self, prompt: Prompt, documents: list[Document]) -> Laid:
        stored = [d.token_list() for d in documents]
        if isinstance(prompt, ChatPrompt):
            return lay_out_chat(self.model.tokenize, self.model.tokenizer, prompt, stored, self.header_ids)
        return lay_out_text(self.model.tokenize, prompt, stored, self.model.vocab_size)

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

    def pasted(self, laid: Laid, caller: Caller, cap: Decimal | None) -> tuple[Document, int] | None:
        """A public document the prompt starts with though it names none (and how many of its tokens, in whole
        chunks), if its cache-read price is within the cap."""
        ids = laid.token_ids
        keys = {n: chain_key("", self.fingerprint, "", ids[:n]) for n in self.catalog.first_chunk_lengths()
                if n < len(ids)}
        limit = cap if cap is not None else self.list_read_price()
        for document, tokens in self.catalog.pasted_at_start(ids, keys):
            if not document.visible_to(caller.readable) or not self.catalog.still_stored(document):
                continue
            licence = self.licence(document)
            price = licence.read_usd_per_mtok(self.ledger.tariff) if licence and self.ledger else None
            if price is None or price <= limit:
                return document, tokens
        return None

    def chunk(self, laid: Laid, documents: list[Document], caller: Caller) -> list[Chunk]:
        """The prompt's chunks: the first document's as its index lists them, the other documents' under their own
        salts, the rest under the caller's."""
        ids = laid.token_ids
        found: list[Chunk] = []
        if documents:
            first, end = documents[0], laid.documents[0][1]
            begin, salt = 0, self.salt_of(first)
            for n, key in first.chunks:
                if begin + n > end:  # a pasted document: the prompt repeats its first chunks only
                    break
                found.append(Chunk(begin, tuple(ids[begin:begin + n]), salt, key))
                begin += n
        segments = [Segment(tuple(ids[s:e]), self.salt_of(d)) for d, (s, e) in
                    zip(documents[1:], laid.documents[1:], strict=True)]
        segments += [Segment(tuple(ids[s:e]), caller.salt) for s, e in laid.spans()]
        parent, start = (found[-1].key, found[-1].end) if found else ("", 0)
        return found + chain(self.fingerprint, cut(segments, self.chunk_tokens), parent, start)

    def cached_run(self, chunks: list[Chunk]) -> int:
        """How many leading chunks are cached (hot tier or store), leaving the last one to compute (it gives the
        logits of the first token)."""
        n = 0
        for chunk in chunks[:-1]:
            if chunk.key not in self.hot and self.chunks.store.entry(chunk.key) is None:
                break
            n += 1
        return n

    def sources(self, laid: Laid, documents: list[Document], licences: dict[str, Licence | None],
                cached: list[Chunk]) -> tuple[Source, ...]:
        """Who is paid for the cached chunks: each document's block pays its licence, the rest the caller's."""
        found = []
        for document, (start, end) in zip(documents, laid.documents, strict=True):
            tokens = sum(c.num_tokens for c in cached if start <= c.start and c.end <= end)
            if tokens:
                found.append(Source(document, licences.get(document.cache_id), tokens))
        own = sum(c.num_tokens for c in cached if c.start >= laid.documents_end)
        if own:
            found.append(Source(None, None, own))
        return tuple(found)

    # -- the ledger's side ----------------------------------------------------------------------------------------
    def licence(self, document: Document) -> Licence | None:
        return self.ledger.licence(document.cache_id) if self.ledger is not None else None

    def salt_of(self, document: Document) -> str:
        return self.ledger.salt_of(document.cache_id) if self.ledger is not None and document.is_salted else ""

    def list_read_price(self) -> Decimal:
        return self.ledger.tariff.read_usd_per_mtok if self.ledger is not None else Decimal("Infinity")


def check_length(prompt: Prompt, context_tokens: int) -> None:
    """RequestError for a prompt whose text is too long to fit the context whatever it tokenizes to (checked
    before tokenizing: a huge text must not cost a tokenizer pass)."""
    if isinstance(prompt, ChatPrompt):
        chars = sum(len(m.content) for m in prompt.messages)
        param = "messages"
    else:
        chars = len(prompt.text) if prompt.token_ids is None else len(prompt.token_ids)
        param = "prompt"
    if chars > context_tokens * MAX_CHARS_PER_TOKEN:
        raise RequestError(f"the prompt is {chars:,} characters: it cannot fit the model's context of "
                           f"{context_tokens:,} tokens", param, "context_length_exceeded")


HOT_TIER = "hot"  # the tier name `Loaded.tiers` gives a chunk found in the hot tier (RAM, decoded KV)


@dataclass(frozen=True)
class Loaded:
    """The cached chunks of a plan, in order: how many came from RAM and from the store, and how long it took.
    Fewer than planned where a chunk was gone or refused: the rest is computed (and billed as planned).
    An engine that loads KV itself (vLLM) holds no `kvs` and says how many tokens it reads (`engine_tokens`)."""

    kvs: tuple[KV, ...]
    from_ram: int
    from_store: int
    seconds: float
    engine_tokens: int | None = None
    tiers: tuple[str, ...] = ()  # where each chunk of `kvs` came from: HOT_TIER, or the store tier that answered
    slowest_tier: str | None = None  # the slowest of `tiers` (the store's tiers are ordered fastest first)

    @property
    def num_tokens(self) -> int:
        """The prompt tokens read from a cache."""
        return self.engine_tokens if self.engine_tokens is not None else sum(kv.num_tokens for kv in self.kvs)


class Loader:
    """Reads a plan's cached chunks into memory (hot tier, else the store: read, verified, decoded) and keeps them
    in the hot tier. Thread-safe; runs off the model thread, after the request's money is held."""

    def __init__(self, hot: HotTier, chunks: ChunkStore) -> None:
        self.hot, self.chunks = hot, chunks
        self.order = (HOT_TIER, *chunks.store.tier_names())  # fastest first

    def load(self, plan: Plan, cancelled: Callable[[], bool] = lambda: False) -> Loaded:
        start, kvs, tiers = time.perf_counter(), [], []
        for chunk in plan.chunks[:plan.cached_chunks]:
            if cancelled():
                break
            kv = self.hot.get(chunk.key)
            tier = HOT_TIER
            if kv is None:
                found = self.chunks.read_located(chunk)
                if found is None:
                    break
                kv, tier = found
                self.hot.put(chunk.key, kv)
            kvs.append(kv)
            tiers.append(tier)
        ram = tiers.count(HOT_TIER)
        slowest = max(tiers, key=self.order.index, default=None)
        return Loaded(tuple(kvs), ram, len(tiers) - ram, time.perf_counter() - start, tiers=tuple(tiers),
                      slowest_tier=slowest)
