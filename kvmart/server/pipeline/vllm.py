"""The server's engine over vLLM (`kvmart serve --engine vllm`). Prompts are laid out exactly as with the
transformers engine (engine.py: same token ids, same document matching); vLLM computes, and kvmart's KV connector
loads the matched document's KV from the store. Usage reports the document's cached tokens as the transformers
engine does, so metering and the ledger see no difference.

One request is one vLLM call: its tokens come as one burst (streaming still works, but the first token arrives
with the last), and logprobs are not offered."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

from kvmart.engines.vllm import VllmEngine
from kvmart.errors import UnsupportedParameterError
from kvmart.format.keys import cache_id as make_cache_id
from kvmart.reuse.catalog import document_id
from kvmart.reuse.core import check_text
from kvmart.runtime.chat import document_ids, layout_for
from kvmart.server.pipeline.engine import (
    NO_REUSE,
    Delta,
    Engine,
    Finished,
    GenerationRequest,
    Published,
    Reuse,
    Started,
)


class VllmServerEngine(Engine):
    """Not thread-safe: every method runs on the model worker's thread (the one that drives vLLM)."""

    def __init__(self, engine: VllmEngine, *args, **kwargs) -> None:
        super().__init__(engine, *args, **kwargs)  # type: ignore[arg-type]  # VllmEngine has the text side of a Model
        self.engine = engine

    def generate(self, request: GenerationRequest) -> Iterator[Started | Delta | Finished]:
        if request.sampling.top_logprobs is not None:
            raise UnsupportedParameterError("logprobs", "not with the vllm engine (kvmart serve --engine vllm)")
        named = [self.catalog.get(doc_id, request.readable) for doc_id in request.prompt.documents]
        ids = self.prompt_ids(request.prompt, named)
        max_new = self.max_new_tokens(len(ids), request.sampling.max_tokens)
        s = request.sampling
        done = self.engine.complete(ids, max_new, s.temperature, s.seed, request.bypass, top_p=s.top_p)
        yield Started(len(ids), max_new, self.reuse(done.document, done.cached_tokens, done.tier, request.bypass))
        yield from self.emit(((token, None) for token in done.token_ids), s)

    def reuse(self, entry, cached_tokens: int, tier: str, bypass: bool) -> Reuse:
        """tier: `store` (the connector loaded the document from kvmart's store) or `ram` (vLLM's own prefix cache
        still held it)."""
        if entry is None:
            return NO_REUSE
        doc = self.catalog.get(document_id(entry.cache_id))
        if bypass:
            return Reuse("bypass", doc, 0, 0, 0.0, 0.0)
        if cached_tokens == 0:
            return NO_REUSE
        saved = doc.entry.prefill_seconds * cached_tokens / doc.num_tokens
        return Reuse(tier, doc, cached_tokens, cached_tokens, 0.0, saved)

    def publish(self, text: str, title: str, source: str, system: str | None, salt: str = "",
                upload: bytes | BinaryIO | None = None, before_store: Callable[[str], None] | None = None
                ) -> Iterator[Published]:
        if upload is not None:  # an upload is verified against the transformers engine's chunked prefill
            raise UnsupportedParameterError("artifact", "uploaded artifacts are not accepted by the vllm engine "
                                            "(its KV comes from vLLM's kernels); publish the text")
        if salt:  # the connector matches prompts against every stored document, whoever asks: no tenant salts yet
            raise UnsupportedParameterError("licence", "private documents are not served by the vllm engine yet "
                                            "(its KV connector matches prompts across tenants); publish them on a "
                                            "node running --engine transformers")
        layout = layout_for(self.model.tokenizer, system)
        ids = document_ids(self.model.tokenize, layout, check_text(text))
        self.check_usable(len(ids), layout)
        cid = make_cache_id(self.engine.fingerprint.digest, ids)
        if before_store is not None and self.store.entry(cid) is None:
            before_store(cid)  # the publication is noted before vLLM's connector stores its artifact
        result = self.engine.publish(ids, title, source)
        yield Published(self.catalog.add(result.entry), result.is_new, result.seconds)

