"""The `transformers` engine: kvmart's own path (kvmart/runtime/model.py), the embedded default and the exactness
reference. Reusing a stored document's chunks is bit-identical to prefilling them chunk by chunk and then the rest
of the prompt (README, "Exactness")."""

from __future__ import annotations

import time

from kvmart.config import Settings
from kvmart.engines.base import Completion, Engine
from kvmart.reuse import core
from kvmart.reuse.catalog import Catalog
from kvmart.reuse.chunks import ChunkStore
from kvmart.reuse.core import Precomputed
from kvmart.runtime.kv import KV
from kvmart.runtime.model import Model
from kvmart.store import Store, open_store


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, model: Model, store: Store, min_prefix_tokens: int = 1) -> None:
        self.model, self.store, self.min_prefix_tokens = model, store, min_prefix_tokens
        self.spec, self.fingerprint = model.spec, model.fingerprint
        self.catalog = Catalog(store, model.fingerprint.digest)

    @classmethod
    def open(cls, settings: Settings, store: Store | None = None) -> "TransformersEngine":
        return cls(Model.load(settings), store or open_store(settings.store_url))

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def context_tokens(self) -> int:
        return self.model.context_tokens

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.model.eos_ids

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def publish(self, token_ids: list[int], title: str = "", source: str = "") -> Precomputed:
        result = core.precompute_ids(self.model, self.store, token_ids, title, source)
        self.catalog.add(result.entry)
        return result

    def complete(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 bypass: bool = False) -> Completion:
        """Reuse the leading chunks of the longest published document the prompt starts with (whole chunks only:
        a chunk is reused as computed, never cut), or compute them in the same steps when `bypass`."""
        start = time.perf_counter()
        self.catalog.refresh()
        match = self.catalog.longest_prefix(prompt_ids[:-1], self.min_prefix_tokens)  # one token left to compute
        prefix: tuple[KV, ...] = ()
        cached, document = 0, None
        if match is not None:
            document = match.document.entry
            chunks = core.read_document(self.model, self.store, document.cache_id)[1]
            usable = [c for c in chunks if c.end <= match.num_tokens]
            if usable:
                prefix = (self.model.prefill_pieces([list(c.token_ids) for c in usable]) if bypass
                          else tuple(ChunkStore(self.store, self.model.fingerprint).read_run(usable)))
                cached = 0 if bypass else sum(kv.num_tokens for kv in prefix)
        done = sum(kv.num_tokens for kv in prefix)
        generation = self.model.generate(prefix, prompt_ids[done:], max_new_tokens, temperature, seed=seed)
        return Completion(generation.token_ids, len(prompt_ids), cached, document, time.perf_counter() - start,
                          "store" if cached else "none")
