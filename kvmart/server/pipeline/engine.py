"""The engine: what one planned request computes, as a stream of events. Runs only on the model worker's thread
(forward passes are not thread-safe); the worker advances one generator per step, computing a prompt chunk there,
except what it batches: a request yields `Batched(decoder)` before each decode step (and, with `batch_prompts`,
`Batched(Piece)` for each prompt chunk), and the worker runs those of every active request together (`Engine.step`:
the decode steps in one forward pass; the prompt pieces packed into shared forward passes where that changes no
bit, Model.continue_many; continuous batching, docs/SERVER.md "The model worker").

By the time a job reaches the engine its prompt is planned (plan.py: laid out, chunked, cached chunks found), its
money held and its cached chunks loaded (plan.Loader). The engine computes the rest, chunk after chunk, each chunk
continuing from the ones before it (kvmart/reuse/chunks.py), keeps every chunk it computed in the hot tier (a
document's own chunks also in the store), and generates after the last one. A `bypass` request computes every chunk
and keeps none: the same steps from scratch, so its answer is bit-identical to the cached one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import BinaryIO

import torch

from kvmart.errors import TooLargeError
from kvmart.reuse import core
from kvmart.reuse.catalog import Catalog, Document
from kvmart.reuse.chunks import Chunk, ChunkStore
from kvmart.reuse.upload import verify_upload
from kvmart.runtime.chat import Layout, layout_for, question_ids
from kvmart.runtime.kv import KV, Prefix, prefix_tokens
from kvmart.runtime.model import Decoder, Model, Step
from kvmart.server.config import ServerSettings
from kvmart.server.pipeline.hot import HotTier
from kvmart.server.pipeline.plan import Loaded, Plan, Sampling
from kvmart.server.pipeline.text import Detokenizer, StopMatcher
from kvmart.server.pipeline.worker import Batched

log = logging.getLogger("kvmart.server")

# Prompt tokens one batch step computes at most, with batch_prompts (a chunk's worth, one packed forward pass where
# the model packs): bounds how long a step holds back the first tokens of the requests in it.
PROMPT_TOKENS_PER_STEP = 256


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, int, float], ...]  # (token, id, logprob), most likely first


@dataclass(frozen=True)
class Computed:
    """A chunk of the prompt was computed (one forward pass): the worker's other jobs get their turn."""

    num_tokens: int


@dataclass
class Piece:
    """A prompt piece a request asks the batch step to compute (Batched(Piece)): its tokens after its prefix, and
    the step once computed."""

    prefix: Prefix
    token_ids: list[int]
    step: Step | None = None


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
class PublishJob:
    """A document to store: its token ids, where it comes from, the salt and terms its cache id is made with, and
    its KV when the publisher uploaded it (`upload`: the artifact's bytes, or an open file holding them for a large
    body streamed to disk, kvmart/server/publish_body.py; verified before anything is stored)."""

    token_ids: list[int]
    title: str
    source: str
    salt: str = ""
    terms: str = ""
    upload: bytes | BinaryIO | None = None


@dataclass(frozen=True)
class Published:
    entry: core.Entry
    is_new: bool  # False: it was already stored and nothing was computed
    seconds: float
    computed_tokens: int


def decoded(decoder: Decoder, model: Model | None) -> Iterator[tuple[int, torch.Tensor] | Batched]:
    """The decoder's tokens with the logits that chose each (the model's own `stream`). Between them, each decode
    step is run by `model`, or, with no model, asked for by a Batched(decoder) and left to the consumer."""
    while True:
        yield decoder.token, decoder.logits
        if decoder.done:
            return
        if model is None:
            yield Batched(decoder)
        else:
            model.step([decoder])


class Engine:
    """Not thread-safe: `execute` and `publish` run on the model worker's thread. Chunks are written to the store by
    a writer thread of its own, so the model never waits on the disk or the network."""

    steps_are_forward_passes = True  # each `step` is one forward pass (the worker's batch count is a metric)

    def __init__(self, model: Model, catalog: Catalog, hot: HotTier, chunks: ChunkStore,
                 settings: ServerSettings, chunk_tokens: int) -> None:
        self.model, self.catalog, self.hot, self.chunks = model, catalog, hot, chunks
        self.settings, self.chunk_tokens = settings, chunk_tokens
        self.batch_prompts = settings.batch_prompts  # prompt chunks asked of the batch step (else computed here)
        self.decode_steps = self.decode_rows = 0  # batched decode steps and the sequences they advanced (metrics)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvmart-chunk-writer")

    def close(self) -> None:
        """Finish writing the chunks already handed to the writer."""
        self._writer.shutdown(wait=True)

    # -- answering -----------------------------------------------------------------------------------------------
    def execute(self, plan: Plan, loaded: Loaded, batched: bool = False
                ) -> Iterator[Computed | Delta | Finished | Batched]:
        """Compute the chunks not loaded, then generate: Computed per chunk, Deltas, then Finished. `batched`: yield
        a Batched(decoder) before each decode step, and with `batch_prompts` a Batched(Piece) for each chunk, and
        leave that computation to whoever iterates (the worker, which runs every active request's in one batch step:
        `step`); else compute it here."""
        prefix = loaded.kvs
        todo = plan.chunks[len(prefix):]
        keep, s = self._keeper(plan), plan.request.sampling
        # checked before anything is computed, so that a request that cannot fit never fails a batch it shares
        self.model.check_room(prefix_tokens(prefix) + sum(c.num_tokens for c in todo), plan.max_new_tokens)
        for chunk in todo[:-1]:
            kv = (yield from self._compute(prefix, list(chunk.token_ids), batched)).new_kv
            keep(chunk, kv)
            prefix += (kv,)
            yield Computed(chunk.num_tokens)
        last = todo[-1]
        step = yield from self._compute(prefix, list(last.token_ids), batched)
        decoder = self.model.begin(prefix, list(last.token_ids), plan.max_new_tokens, s.temperature, s.top_p,
                                   s.seed, on_prompt=lambda kv: keep(last, kv), computed=step)
        yield from self.emit(decoded(decoder, None if batched else self.model), s)

    def _compute(self, prefix: Prefix, token_ids: list[int], batched: bool) -> Generator[Batched, None, Step]:
        """One prompt piece after `prefix`: computed here, or asked for by a Batched(Piece) and computed by `step`
        among the other requests' pieces (the same bits: Model.continue_many)."""
        if not (batched and self.batch_prompts):
            return self.model.continue_from(prefix, token_ids)
        piece = Piece(prefix, token_ids)
        while piece.step is None:  # a batch step computes as many pieces as fit its budget; the rest ask again
            yield Batched(piece)
        return piece.step

    def memory_bytes(self, plan: Plan, loaded: Loaded) -> int:
        """The KV a request holds while it runs (what the worker admits it by): the prompt tokens it computes and
        room for its answer. Its loaded chunks are left out: the hot tier holds them already."""
        tokens = plan.prompt_tokens - loaded.num_tokens + plan.max_new_tokens
        return tokens * self.model.kv_bytes_per_token

    def step(self, payloads: list[object]) -> None:
        """The worker's batch_step: the parked requests' prompt pieces, first come first, up to PROMPT_TOKENS_PER_STEP
        tokens (one at least; Model.continue_many packs them into one forward pass where it can; the others wait for
        the next step, so that a first token is not held back by every other request's prompt), then one decode step
        of their decoders in one forward pass."""
        pieces: list[Piece] = []
        budget = PROMPT_TOKENS_PER_STEP
        for piece in (p for p in payloads if isinstance(p, Piece)):
            if pieces and len(piece.token_ids) > budget:
                break
            pieces.append(piece)
            budget -= len(piece.token_ids)
        if pieces:
            for piece, step in zip(pieces, self.model.continue_many([(p.prefix, p.token_ids) for p in pieces]),
                                   strict=True):
                piece.step = step
        decoders = [d for d in payloads if isinstance(d, Decoder)]
        if decoders:
            self.model.step(decoders)
            self.decode_steps += 1
            self.decode_rows += len(decoders)

    def wake(self) -> None:
        """A job was queued (the worker's `wake`): nothing to do here, the worker never waits inside `step`."""

    def _keeper(self, plan: Plan) -> Callable[[Chunk, KV], None]:
        """Where a computed chunk goes: the hot tier (the prefix cache), and the store too if it is one of the
        first document's own chunks (a chunk lost from the store, repaired). A bypass request keeps nothing."""

        def keep(chunk: Chunk, kv: KV) -> None:
            if plan.request.bypass:
                return
            self.hot.put(chunk.key, kv)
            if chunk.key in plan.store_keys:
                owner = plan.documents[0].entry
                self._writer.submit(self._store_chunk, chunk, kv, owner.title)

        return keep

    def _store_chunk(self, chunk: Chunk, kv: KV, title: str) -> None:
        try:
            self.chunks.put(chunk, kv, title=title)
        except Exception:  # noqa: BLE001  (the answer does not depend on it: the chunk stays in RAM, and is recomputed if lost)
            log.exception("could not store chunk %s", chunk.key[:16])

    def emit(self, steps: Iterator[tuple[int, object] | Batched], sampling: Sampling
             ) -> Iterator[Delta | Finished | Batched]:
        """Generated (token, scores) pairs as text deltas and a Finished; stops at an end-of-turn token or a stop
        sequence. Scores are what `logprob` reads (here the logits that chose the token; None: no logprobs). A
        Batched from `steps` is passed on as it is (the worker runs the decode step it asks for before `steps` goes
        on). Closing this generator closes `steps`."""
        detokenizer, stops, count, reason = Detokenizer(self.model.decode), StopMatcher(sampling.stop), 0, "length"
        with closing(steps):  # type: ignore[type-var]  # a generator has close(); the Iterator type does not say so
            for item in steps:
                if isinstance(item, Batched):
                    yield item
                    continue
                token, logits = item
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

    def logprob(self, logits: object, token: int, top: int | None) -> TokenLogprob | None:
        """The chosen token's log-probability and the `top` most likely, from the logits that chose it."""
        if top is None or not isinstance(logits, torch.Tensor):
            return None
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = torch.topk(logprobs, top) if top else (logprobs[:0], torch.empty(0, dtype=torch.long))
        decode = self.model.decode
        return TokenLogprob(decode([token]), token, float(logprobs[token]),
                            tuple((decode([int(i)]), int(i), float(v)) for v, i in zip(values, ids, strict=True)))

    # -- publishing ----------------------------------------------------------------------------------------------
    def check_limits(self, num_tokens: int, upload_bytes: int | None, layout: Layout | None = None) -> None:
        """TooLargeError (413) for a document beyond max_document_tokens, for one no request could use (it leaves
        no room in the model's context for the shortest question, "?", laid out after it with `layout`, and a
        one-token answer: the message names the usable limit), or for an artifact beyond max_artifact_bytes (the
        one to upload, or the one the provider would write). Checked before anything is computed or charged."""
        max_tokens = self.settings.max_document_tokens
        if max_tokens and num_tokens > max_tokens:
            raise TooLargeError(f"the document is {num_tokens:,} tokens; this server publishes documents of at "
                                f"most {max_tokens:,} tokens", "text")
        room = len(question_ids(self.model.tokenize, layout or layout_for(self.model.tokenizer), "?")) + 1
        usable = self.model.context_tokens - room
        if num_tokens > usable:
            raise TooLargeError(
                f"the document is {num_tokens:,} tokens, and no request could use it: {self.model.spec}'s context "
                f"holds {self.model.context_tokens:,} tokens, so a document can be at most {usable:,} tokens (room "
                f"for a question and an answer of at least {room:,} tokens)", "text")
        size = upload_bytes if upload_bytes is not None else num_tokens * self.model.kv_bytes_per_token
        limit = self.settings.max_artifact_bytes
        if limit and size > limit:
            what = "the uploaded artifact is" if upload_bytes is not None else "its KV cache would be"
            raise TooLargeError(f"{what} {size:,} bytes; this server stores artifacts of at most {limit:,} bytes",
                                "artifact" if upload_bytes is not None else "text")

    def publish(self, job: PublishJob, codec: str) -> Iterator[Published | Batched]:
        """Store a document as a chunk chain (chunks another document stored are shared, not recomputed), or find
        it already stored: one Published (an engine that computes elsewhere yields Batched while it waits). An upload is verified first (kvmart/reuse/upload.py): ArtifactRejectedError if it is
        not the model's KV of exactly these tokens; nothing is stored then."""
        start = time.perf_counter()
        computed = None
        if job.upload is not None:
            computed = verify_upload(self.model, job.upload, job.token_ids, self.chunk_tokens,
                                     self.settings.upload_sample_percent).pieces
        result = core.precompute_ids(self.model, self.chunks.store, job.token_ids, job.title, job.source,
                                     salt=job.salt, codec=codec, chunk_tokens=self.chunk_tokens, terms=job.terms,
                                     computed=computed)
        yield Published(result.entry, result.is_new, time.perf_counter() - start, result.computed_tokens)

    def register(self, published: Published) -> Document:
        """The published document in the catalogue (read from its index)."""
        return self.catalog.add(published.entry)
