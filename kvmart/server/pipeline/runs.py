"""One request's life on the event loop, in one direction: plan it (off the model thread: prompt laid out and
chunked, cached chunks found, the quote), hold its largest charge (402 here, before any work), load its cached
chunks (off the model thread), queue its compute on the model worker, stream the result, then charge what it used
and record its metrics once, at the end. Every generation endpoint (chat, completions, messages, the web page)
starts a request through `start_generation`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

from starlette.concurrency import run_in_threadpool

from kvmart.errors import KvmartError, QueueFullError
from kvmart.server.pipeline.billing import Bill, Payer, open_bill, release, settle, settle_cut_off
from kvmart.server.pipeline.engine import Delta, Finished
from kvmart.server.pipeline.plan import Caller, GenerationRequest, Loaded, Plan
from kvmart.server.pipeline.services import Services
from kvmart.server.pipeline.usage import Usage, usage_of
from kvmart.server.pipeline.worker import Ticket


def submit(services: Services, events: Iterator[object], memory_bytes: int = 0) -> Ticket:
    """Queue a job that will hold about `memory_bytes` of KV on the model worker (QueueFullError counted as a
    rejection)."""
    try:
        return services.worker.submit(events, asyncio.get_running_loop(), memory_bytes)
    except QueueFullError:
        services.metrics.rejected.inc()
        raise


async def first_event(ticket: Ticket) -> object:
    """The job's first event; its error if it failed first. Cancels the job if the caller is cancelled."""
    try:
        return await anext(ticket)
    except BaseException:
        ticket.cancel()
        raise


class Run:
    """A generation in progress. Iterate `deltas()` once; `usage` is complete after it ends."""

    def __init__(self, services: Services, ticket: Ticket, plan: Plan, loaded: Loaded, endpoint: str,
                 began: float, bill: Bill) -> None:
        self.services, self.ticket, self.plan, self.loaded = services, ticket, plan, loaded
        self.endpoint, self.began, self.bill = endpoint, began, bill
        self.finished: Finished | None = None
        self.failed = False
        self.sent_tokens = 0  # generated tokens handed to the consumer (what a client that hangs up is charged)
        self._first_token_seen = False
        self._began = False  # deltas() was asked for its first event: from then on it settles the request itself

    @property
    def usage(self) -> Usage:
        return usage_of(self.plan, self.loaded, self.finished, self.bill)

    @property
    def ended(self) -> Finished:
        """How the generation ended; only once `deltas()` has run to its end."""
        if self.finished is None:
            raise AssertionError("the run has not finished: iterate deltas() to its end first")
        return self.finished

    async def deltas(self, settle_at_end: bool = True) -> AsyncIterator[Delta]:
        """The generated text, piece by piece, then the charge is settled (unless not `settle_at_end`: the caller
        settles, `Opened.answer`). If the job fails, its hold is released: nothing is charged. If the consumer stops
        early (the client hung up), the job is cancelled and the request charged for what was sent
        (`settle_cut_off`): its prompt and every token handed to the consumer."""
        self._began = True
        try:
            async for event in self.ticket:
                if isinstance(event, Delta):
                    self._first_token(event)
                    self.sent_tokens += event.token_id is not None
                    yield event
                elif isinstance(event, Finished):
                    self.finished = event
        except KvmartError:
            self.failed = True
            raise
        finally:
            self._record()
            if self.failed:
                release(self.services, self.bill)
            elif self.finished is None:  # cut off by its client: not free (a client could hang up at the last token)
                settle_cut_off(self.services, self.bill, self.sent_tokens)
        if settle_at_end:
            await settle(self.services, self.bill, self.ended.completion_tokens)

    def abandon(self) -> None:
        """The consumer went away before it asked `deltas()` for anything (a stream closed before its first delta,
        or never started): the job is cancelled and the request settled as cut off, for its prompt and nothing
        generated (`settle_cut_off`: hanging up early never makes a prompt free), so its hold never outlives it.
        Nothing to do once `deltas()` has begun: it settles the request itself."""
        if self._began:
            return
        self._began = True
        self.ticket.cancel()
        self.services.metrics.cancelled.inc()
        settle_cut_off(self.services, self.bill, 0)

    async def collect(self) -> list[Delta]:
        """Every delta of a complete (non-streamed) answer, the charge left to `Opened.answer`, which settles it and
        keeps the answer in one transaction."""
        return [delta async for delta in self.deltas(settle_at_end=False)]

    def _first_token(self, delta: Delta) -> None:
        if not self._first_token_seen and delta.token_id is not None:
            self._first_token_seen = True
            self.services.metrics.first_token_seconds.observe(time.perf_counter() - self.began,
                                                              endpoint=self.endpoint)

    def _record(self) -> None:
        m = self.services.metrics
        if self.finished is not None:
            m.completion_tokens.inc(self.finished.completion_tokens)
        elif not self.failed:  # the consumer stopped early: the client went away
            self.ticket.cancel()
            m.cancelled.inc()


async def guarded(run: Run, events: AsyncGenerator[str, None]) -> AsyncIterator[str]:
    """`events` (a streamed answer built on `run`) passed through; however early the stream is closed (the client
    hung up, even before its first event), `run` is settled or abandoned, never left holding money."""
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()
        run.abandon()


async def start_generation(services: Services, request: GenerationRequest, endpoint: str, payer: Payer,
                           caller: Caller | None = None) -> Run:
    """Plan `request` for `payer` (hiding what it may not read: `caller`, read from the ledger unless given), hold
    its charge, load its cached chunks and queue its compute. Unknown documents, a prompt too long, insufficient
    funds and a full queue raise here, before any response is sent and before any forward pass."""
    began = time.perf_counter()
    if caller is None:
        caller = await run_in_threadpool(caller_of, services, payer)
    plan = await run_in_threadpool(services.planner.plan, request, caller)
    bill = await open_bill(services, payer, plan)
    try:
        loaded = await run_in_threadpool(services.loader.load, plan)
        ticket = submit(services, services.engine.execute(plan, loaded, batched=True),
                        services.engine.memory_bytes(plan, loaded))
    except BaseException:
        release(services, bill)
        raise
    record_reuse(services, plan, loaded)
    return Run(services, ticket, plan, loaded, endpoint, began, bill)


def caller_of(services: Services, payer: Payer) -> Caller:
    """What the paying account may read and the salt of its own prefixes (one ledger read, cached by account)."""
    account = payer.account
    return Caller(account, services.ledger.readable(account), account.tenant_salt)


def record_reuse(services: Services, plan: Plan, loaded: Loaded) -> None:
    m = services.metrics
    cached = loaded.num_tokens
    if plan.request.bypass:
        m.cache_bypass.inc()
    elif loaded.from_store:
        m.cache_hits.inc(tier="store")
    elif loaded.from_ram:
        m.cache_hits.inc(tier="ram")
    else:
        m.cache_misses.inc()
    if loaded.slowest_tier is not None and not plan.request.bypass:
        m.reads_by_tier.inc(tier=loaded.slowest_tier)
    for tier in set(loaded.tiers):
        m.chunk_reads.inc(loaded.tiers.count(tier), tier=tier)
    m.saved_seconds.inc(usage_of(plan, loaded, None).prefill_seconds_saved)
    m.prompt_tokens.inc(cached, source="cache")
    m.prompt_tokens.inc(plan.prompt_tokens - cached, source="computed")
