"""The request pipeline over vLLM (`kvmart serve --engine vllm`): the same plan, hold, load, execute steps, with
vLLM computing and kvmart's KV connector loading a matched document's KV from the store inside vLLM.

Prompts are laid out exactly as with the transformers engine (plan.py: same token ids). vLLM's KV is not
kvmart's (other kernels: another fingerprint), and its connector reuses whole published documents, in whole
blocks, by the longest-prefix rule both sides compute (kvmart/engines/vllm.py `reusable_prefix`); so the plan here
is two pieces, the matched document's blocks (read by the connector) and the rest (computed by vLLM), and the hold
is taken on that plan before vLLM runs, as with the transformers engine. vLLM's own prefix cache is its automatic
prefix caching.

Not yet served here (refused with a clear 400): logprobs, private documents (the connector matches prompts across
tenants), priced documents (their cache id holds their terms; the connector's holds none), uploads. One request is
one vLLM call: its tokens come as one burst (issue: vLLM's async engine)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from kvmart.config import Settings
from kvmart.engines.vllm import VllmEngine, reusable_prefix
from kvmart.errors import UnsupportedParameterError
from kvmart.ledger import Ledger
from kvmart.reuse.chunks import Chunk, ChunkStore
from kvmart.server.config import ServerSettings
from kvmart.server.pipeline.engine import Computed, Delta, Engine, Finished, Published, PublishJob
from kvmart.server.pipeline.hot import HotTier
from kvmart.server.pipeline.plan import Caller, GenerationRequest, Loaded, Loader, Plan, Planner, Source
from kvmart.server.pipeline.services import Services, assemble
from kvmart.server.pipeline.worker import Batched
from kvmart.store import Store


class VllmPlanner(Planner):
    """Plans as the connector will act: the longest published document the prompt starts with, in whole blocks."""

    def __init__(self, engine: VllmEngine, *args, **kwargs) -> None:
        super().__init__(engine, *args, **kwargs)  # type: ignore[arg-type]  # VllmEngine has a Model's text side
        self.vllm = engine

    def plan(self, request: GenerationRequest, caller: Caller) -> Plan:
        if request.sampling.top_logprobs is not None:
            raise UnsupportedParameterError("logprobs", "not with the vllm engine (kvmart serve --engine vllm)")
        start = time.perf_counter()
        named = [self.document(doc_id, caller.readable) for doc_id in request.prompt.documents]
        laid = self.lay_out(request.prompt, named)
        max_new = self.max_new_tokens(len(laid.token_ids), request.sampling.max_tokens)
        ids = laid.token_ids
        found = reusable_prefix(self.catalog, ids, self.vllm.block_size)
        if found is None:
            return Plan(request, laid, (Chunk(0, tuple(ids), "", ""),), 0, (), (), max_new, frozenset(),
                        time.perf_counter() - start)
        k, doc = found.num_tokens, found.document
        chunks = (Chunk(0, tuple(ids[:k]), "", doc.cache_id), Chunk(k, tuple(ids[k:]), "", ""))
        cached = 0 if request.bypass else 1
        sources = (Source(doc, self.licence(doc), k),) if cached else ()
        return Plan(request, laid, chunks, cached, (doc,), sources, max_new, frozenset(),
                    time.perf_counter() - start)


class VllmLoader(Loader):
    """Nothing to load here: the connector reads the document inside vLLM."""

    def load(self, plan: Plan, cancelled=lambda: False) -> Loaded:  # noqa: ARG002
        tokens = plan.cached_tokens
        return Loaded((), 0, 1 if tokens else 0, 0.0, engine_tokens=tokens)


class VllmServerEngine(Engine):
    """Not thread-safe: every method runs on the model worker's thread (the one that drives vLLM)."""

    def __init__(self, engine: VllmEngine, *args, **kwargs) -> None:
        super().__init__(engine, *args, **kwargs)  # type: ignore[arg-type]  # VllmEngine has a Model's text side
        self.vllm = engine

    def memory_bytes(self, plan: Plan, loaded: Loaded) -> int:  # noqa: ARG002
        return 0  # vLLM manages its own KV memory

    def execute(self, plan: Plan, loaded: Loaded, batched: bool = False  # noqa: ARG002  (vLLM batches itself)
                ) -> Iterator[Computed | Delta | Finished | Batched]:
        s = plan.request.sampling
        done = self.vllm.complete(plan.laid.token_ids, plan.max_new_tokens, s.temperature, s.seed,
                                  plan.request.bypass, top_p=s.top_p)
        yield from self.emit(((token, None) for token in done.token_ids), s)

    def publish(self, job: PublishJob, codec: str) -> Iterator[Published]:
        if job.upload is not None:  # an upload is verified against the transformers engine's chunked prefill
            raise UnsupportedParameterError("artifact", "uploaded artifacts are not accepted by the vllm engine "
                                            "(its KV comes from vLLM's kernels); publish the text")
        if job.salt:  # the connector matches prompts against every stored document, whoever asks: no tenant salts yet
            raise UnsupportedParameterError("licence", "private documents are not served by the vllm engine yet "
                                            "(its KV connector matches prompts across tenants); publish them on a "
                                            "node running --engine transformers")
        if job.terms:
            raise UnsupportedParameterError("licence", "priced documents are not served by the vllm engine yet; "
                                            "publish them on a node running --engine transformers")
        result = self.vllm.publish(job.token_ids, job.title, job.source)
        yield Published(result.entry, result.is_new, result.seconds, len(job.token_ids) if result.is_new else 0)


def build_vllm_services(settings: Settings, server: ServerSettings, store: Store | None, ledger: Ledger
                        ) -> Services:
    vllm = VllmEngine.open(settings)
    store = store or vllm.store
    catalog = vllm.catalog
    hot = HotTier(server.ram_cache_bytes)
    chunks = ChunkStore(store, vllm.fingerprint, settings.artifact_codec)
    planner = VllmPlanner(vllm, catalog, hot, chunks, ledger, server, settings.chunk_tokens)
    engine = VllmServerEngine(vllm, catalog, hot, chunks, server, settings.chunk_tokens)
    return assemble(settings, server, vllm, store, catalog, hot, chunks, planner,  # type: ignore[arg-type]  # VllmEngine stands in for the Model
                    VllmLoader(hot, chunks), engine, ledger)  # VllmEngine stands in for the Model

