"""One request's life on the event loop: submit its job to the model worker, wait for the first event (so every
error that can be reported as an HTTP status is), hold its charge, stream the rest, charge it and record its
metrics once, at the end."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator

from starlette.concurrency import run_in_threadpool

from kvmart.errors import KvmartError, QueueFullError
from kvmart.server.pipeline.billing import Bill, Payer, open_bill, release, settle, settle_cut_off
from kvmart.server.pipeline.engine import Delta, Finished, GenerationRequest, Started
from kvmart.server.pipeline.services import Services
from kvmart.server.pipeline.usage import Usage, usage_of
from kvmart.server.pipeline.worker import Ticket


def submit(services: Services, events: Iterator[object]) -> Ticket:
    """Queue a job on the model worker (QueueFullError counted as a rejection)."""
    try:
        return services.worker.submit(events, asyncio.get_running_loop())
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

    def __init__(self, services: Services, ticket: Ticket, started: Started, endpoint: str, began: float,
                 bill: Bill) -> None:
        self.services, self.ticket, self.started, self.endpoint, self.began = services, ticket, started, endpoint, began
        self.bill = bill
        self.finished: Finished | None = None
        self.failed = False
        self.sent_tokens = 0  # generated tokens handed to the consumer (what a client that hangs up is charged)
        self._first_token_seen = False

    @property
    def usage(self) -> Usage:
        return usage_of(self.started, self.finished, self.bill)

    async def deltas(self) -> AsyncIterator[Delta]:
        """The generated text, piece by piece, then the charge is settled. If the job fails, its hold is released:
        nothing is charged. If the consumer stops early (the client hung up), the job is cancelled and the request
        charged for what was sent (`settle_cut_off`): its prompt and every token handed to the consumer."""
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
                usage = self.usage
                settle_cut_off(self.services, self.bill, usage.cached_tokens, usage.computed_tokens,
                               self.sent_tokens)
        usage = self.usage
        await settle(self.services, self.bill, usage.cached_tokens, usage.computed_tokens, usage.completion_tokens)

    async def collect(self) -> list[Delta]:
        return [delta async for delta in self.deltas()]

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


async def start_generation(services: Services, request: GenerationRequest, endpoint: str, payer: Payer) -> Run:
    """Queue `request` (hiding what `payer` may not read) and wait until its prompt is resolved and its charge
    held: unknown documents, a prompt too long, a full queue and insufficient funds raise here, before any
    response is sent."""
    began = time.perf_counter()
    readable = await run_in_threadpool(services.ledger.readable, payer.account)
    ticket = submit(services, services.engine.generate(dataclasses.replace(request, readable=readable)))
    started = await first_event(ticket)
    assert isinstance(started, Started), started
    try:
        bill = await open_bill(services, payer, started)
    except BaseException:
        ticket.cancel()
        raise
    _record_reuse(services, started)
    return Run(services, ticket, started, endpoint, began, bill)


def _record_reuse(services: Services, started: Started) -> None:
    m, reuse = services.metrics, started.reuse
    if reuse.tier in ("ram", "store"):
        m.cache_hits.inc(tier=reuse.tier)
        m.saved_seconds.inc(reuse.saved_seconds)
    elif reuse.tier == "bypass":
        m.cache_bypass.inc()
    else:
        m.cache_misses.inc()
    m.prompt_tokens.inc(reuse.cached_tokens, source="cache")
    m.prompt_tokens.inc(started.prompt_tokens - reuse.cached_tokens, source="computed")
