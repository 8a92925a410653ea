"""The request pipeline over vLLM (`kvmart serve --engine vllm`): the same plan, hold, load, execute steps, with
vLLM computing and kvmart's KV connector loading a matched document's KV from the store inside vLLM.

Prompts are laid out exactly as with the transformers engine (plan.py: same token ids). vLLM's KV is not
kvmart's (other kernels: another fingerprint), and its connector reuses whole published documents in whole
blocks; so the plan here is two pieces, the matched document's blocks (read by the connector) and the rest
(computed by vLLM), and the hold is taken on that plan before vLLM runs, as with the transformers engine. The
document is chosen here, among those the caller may read: the first named one, or else a public one the prompt
starts with (within the request's price cap); the connector is told which (with the document's salt if it is
private) and loads exactly that one. vLLM's own prefix cache (automatic prefix caching) is salted with the
caller's tenant salt, so one tenant's requests never hit blocks another tenant's requests left there.

Concurrency: vLLM's async engine holds every admitted request at once and batches them in each of its steps
(continuous batching). The model worker hands a request to vLLM as soon as it is admitted, passes its new tokens
on as vLLM makes them (a stream's tokens arrive one by one), and, when none of its requests has anything new, waits
for vLLM (`VllmServerEngine.step`) instead of running a forward pass. Publishing is a request like the others.

Not served here (a clear 400): uploaded artifacts (they are verified against the transformers engine's prefill)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from decimal import Decimal

from kvmart.config import Settings
from kvmart.engines.vllm import Reusable, VllmEngine, document_prefix, request_params, reusable_prefix
from kvmart.engines.vllm_async import Stream
from kvmart.errors import UnsupportedParameterError
from kvmart.ledger import Ledger
from kvmart.reuse.catalog import Document
from kvmart.reuse.chunks import Chunk, ChunkStore
from kvmart.server.config import ServerSettings
from kvmart.server.pipeline.engine import Computed, Delta, Engine, Finished, Published, PublishJob, TokenLogprob
from kvmart.server.pipeline.hot import HotTier
from kvmart.server.pipeline.plan import Caller, GenerationRequest, Loaded, Loader, Plan, Planner, Source, check_length
from kvmart.server.pipeline.services import Services, assemble
from kvmart.server.pipeline.worker import Batched
from kvmart.store import Store

# the longest the model worker waits for vLLM without looking at its own queue: a new request wakes it at once
# (Worker.wake); a client gone or a hold is seen within this (vLLM's next token usually comes sooner)
WAIT_SECONDS = 0.1


class VllmPlanner(Planner):
    """Plans as the connector will act: one document, the prompt's first blocks, chosen among the caller's."""

    def __init__(self, engine: VllmEngine, *args, **kwargs) -> None:
        super().__init__(engine, *args, **kwargs)  # type: ignore[arg-type]  # VllmEngine has a Model's text side
        self.vllm = engine

    def plan(self, request: GenerationRequest, caller: Caller) -> Plan:
        start = time.perf_counter()
        check_length(request.prompt, self.model.context_tokens)
        named = [self.document(doc_id, caller.readable) for doc_id in request.prompt.documents]
        laid = self.lay_out(request.prompt, named)
        max_new = self.max_new_tokens(len(laid.token_ids), request.sampling.max_tokens)
        ids = laid.token_ids
        found = self.reuse(ids, named, caller, request.max_cache_read_usd_per_mtok)
        if found is None:  # the computed chunk carries the caller's salt: vLLM's prefix cache is salted with it
            return Plan(request, laid, (Chunk(0, tuple(ids), caller.salt, ""),), 0, (), (), max_new, frozenset(),
                        time.perf_counter() - start)
        k, doc = found.num_tokens, found.document
        chunks = (Chunk(0, tuple(ids[:k]), found.salt, doc.cache_id), Chunk(k, tuple(ids[k:]), caller.salt, ""))
        cached = 0 if request.bypass else 1
        sources = (Source(doc, self.licence(doc), k),) if cached else ()
        return Plan(request, laid, chunks, cached, (doc,), sources, max_new, frozenset(),
                    time.perf_counter() - start)

    def reuse(self, ids: list[int], named: list[Document], caller: Caller, cap: Decimal | None) -> Reusable | None:
        """The document the prompt reuses: the first named one (laid out first; the caller may read it, or
        `document` refused it), or else the longest public one it starts with if its cache-read price is within
        the cap (the list price when not stated), as plan.py's `pasted`; a private document is only ever reused
        when named."""
        if named:
            return document_prefix(named[0], ids, self.vllm.block_size, self.salt_of(named[0]))
        found = reusable_prefix(self.catalog, ids, self.vllm.block_size)
        if found is None or not self.catalog.still_stored(found.document):
            return None
        licence = self.licence(found.document)
        price = licence.read_usd_per_mtok(self.ledger.tariff) if licence and self.ledger else None
        limit = cap if cap is not None else self.list_read_price()
        return found if price is None or price <= limit else None


class VllmLoader(Loader):
    """Nothing to load here: the connector reads the document inside vLLM."""

    def load(self, plan: Plan, cancelled=lambda: False) -> Loaded:  # noqa: ARG002
        tokens = plan.cached_tokens
        return Loaded((), 0, 1 if tokens else 0, 0.0, engine_tokens=tokens)


class VllmServerEngine(Engine):
    """Every method but `wake` runs on the model worker's thread; vLLM computes in its own processes."""

    steps_are_forward_passes = False

    def __init__(self, engine: VllmEngine, *args, **kwargs) -> None:
        super().__init__(engine, *args, **kwargs)  # type: ignore[arg-type]  # VllmEngine has a Model's text side
        self.vllm = engine

    def memory_bytes(self, plan: Plan, loaded: Loaded) -> int:  # noqa: ARG002
        return 0  # vLLM manages its own KV memory (requests beyond it wait in vLLM's queue)

    def execute(self, plan: Plan, loaded: Loaded, batched: bool = False  # noqa: ARG002  (vLLM batches itself)
                ) -> Iterator[Computed | Delta | Finished | Batched]:
        """Hand the request to vLLM, then its tokens as vLLM makes them (a Batched whenever none is waiting:
        the worker then waits for vLLM). The connector loads the planned document (nothing if `bypass`, and
        vLLM's prefix cache gives a bypass request nothing either)."""
        s, request = plan.request.sampling, plan.request
        first = plan.chunks[0]
        document = None
        if plan.documents and first.key == plan.documents[0].cache_id:
            document = Reusable(plan.documents[0], first.num_tokens, first.salt)
        transfer = request_params(bypass=request.bypass, document=document)
        params = self.vllm.params(plan.max_new_tokens, s.temperature, s.seed, s.top_p, transfer, s.top_logprobs)
        # the caller's salt (kept on its computed chunk); a bypass request gets a salt of its own, so vLLM's prefix
        # cache gives it nothing either: every token is computed, as the transformers engine's bypass does
        salt = uuid.uuid4().hex if request.bypass else plan.chunks[-1].salt
        stream = self.vllm.stream(plan.laid.token_ids, params, cache_salt=salt)
        yield from self.emit(tokens_of(stream), s)

    def step(self, decoders: list[object]) -> None:  # noqa: ARG002  (the streams are vLLM's to advance)
        """Wait until some request has new tokens from vLLM (or a job was queued, or WAIT_SECONDS passed)."""
        self.vllm.runner.wait(WAIT_SECONDS)

    def wake(self) -> None:
        self.vllm.runner.wake()

    def logprob(self, logits: object, token: int, top: int | None) -> TokenLogprob | None:
        """From vLLM's logprobs of the step ({token id: Logprob with its rank}: the chosen token and the top ones;
        raw log-probabilities, before temperature and top-p, as the transformers engine reports them)."""
        if top is None or not isinstance(logits, dict) or token not in logits:
            return None
        best = sorted((lp.rank, t, lp.logprob) for t, lp in logits.items() if lp.rank is not None and lp.rank <= top)
        decode = self.model.decode
        return TokenLogprob(decode([token]), token, float(logits[token].logprob),
                            tuple((decode([int(t)]), int(t), float(lp)) for _, t, lp in best[:top]))

    def publish(self, job: PublishJob, codec: str) -> Iterator[Published | Batched]:  # noqa: ARG002  (vLLM's KV)
        if job.upload is not None:  # an upload is verified against the transformers engine's chunked prefill
            raise UnsupportedParameterError("artifact", "uploaded artifacts are not accepted by the vllm engine "
                                            "(its KV comes from vLLM's kernels); publish the text")
        start = time.perf_counter()
        cid, stream = self.vllm.start_publish(job.token_ids, job.title, job.source, job.salt, job.terms)
        if stream is not None:
            for item in outputs_of(stream):
                if isinstance(item, Batched):
                    yield item
        result = self.vllm.published(cid, stream is not None, time.perf_counter() - start)
        yield Published(result.entry, result.is_new, result.seconds, len(job.token_ids) if result.is_new else 0)


def outputs_of(stream: Stream) -> Iterator[object]:
    """vLLM's outputs for the request as they come, a Batched(stream) whenever there is none yet (the worker
    waits for vLLM, then resumes this). Closing it early aborts the request in vLLM."""
    try:
        while not stream.finished:
            outputs = stream.take()
            yield from outputs
            if not outputs and not stream.finished:
                yield Batched(stream)
    finally:
        stream.abort()


def tokens_of(stream: Stream) -> Iterator[tuple[int, object] | Batched]:
    """(token, its step's logprobs or None) pairs, one per generated token, as vLLM makes them."""
    for item in outputs_of(stream):
        if isinstance(item, Batched):
            yield item
            continue
        completion = item.outputs[0]  # type: ignore[attr-defined]  # a vLLM RequestOutput
        steps = completion.logprobs or [None] * len(completion.token_ids)
        yield from zip(completion.token_ids, steps, strict=True)


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
