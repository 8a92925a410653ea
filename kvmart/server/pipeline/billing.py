"""Metering one generation: hold its largest possible charge once it is planned (402 before any forward pass if
the agent cannot cover it), charge what it actually used when it is complete, charge what was sent if the client
hangs up, release the hold if it fails (nothing charged). The admin is never charged. With an Idempotency-Key, a
completed request's answer is kept (a stream as its events) and replayed to its retries, as a stream for a stream;
a key charged without a kept answer is refused, never computed again for free. See kvmart/ledger/charges.py.

A request may read several documents (named together) and its own prefix cache: each document's tokens are
priced by its licence and earn its publisher's royalty; the caller's own cached tokens are read at the list price
with no royalty (docs/SERVER.md "Billing")."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvmart.errors import InsufficientFundsError, LedgerError
from kvmart.ledger import Account, Charge, Hold, Licence
from kvmart.ledger.tariffs import NANO_PER_USD
from kvmart.server.pipeline.plan import Plan
from kvmart.server.pipeline.services import Services

log = logging.getLogger("kvmart.server")
Reads = list[tuple[str | None, Licence | None, int]]  # (document cache id or None for one's own cache, licence, tokens)


@dataclass(frozen=True)
class Payer:
    """Who pays for a request, and what makes a retry the same request."""

    account: Account
    idempotency_key: str | None
    request_hash: str


@dataclass
class Bill:
    """One request's money. `charge` is set once settled."""

    payer: Payer
    reads: Reads = field(default_factory=list)
    computed_tokens: int = 0
    hold: Hold | None = None
    charge: Charge | None = None

    @property
    def is_metered(self) -> bool:
        return not self.payer.account.is_admin


def reads_of(plan: Plan) -> Reads:
    return [(s.document.cache_id if s.document else None, s.licence, s.num_tokens) for s in plan.sources]


async def open_bill(services: Services, payer: Payer, plan: Plan) -> Bill:
    """Hold the most `plan` can cost; InsufficientFundsError (402) or IdempotencyConflictError (409)."""
    bill = Bill(payer, reads_of(plan), plan.computed_tokens)
    if not bill.is_metered:
        return bill
    most, _ = services.ledger.quote_reads(bill.reads, bill.computed_tokens, plan.max_new_tokens)
    try:
        bill.hold = await run_in_threadpool(services.ledger.open_hold, payer.account, most.total_nanousd,
                                            payer.idempotency_key, payer.request_hash)
    except InsufficientFundsError:
        services.metrics.charges.inc(outcome="payment_required")
        raise
    return bill


async def settle(services: Services, bill: Bill, output_tokens: int, keep: Callable[[], str] | None = None) -> None:
    """Charge what the request used (one transaction: entries, receipt, hold dropped, and with `keep` the answer
    `keep()` makes, kept for the request's Idempotency-Key; `bill.charge` is set before it is called). The prompt is
    billed as planned: a cached chunk found gone when loaded is computed again at the provider's cost, not the
    agent's."""
    if bill.hold is None:
        return
    used, reads = services.ledger.quote_reads(bill.reads, bill.computed_tokens, output_tokens)
    hold, bill.hold = bill.hold, None

    def kept(charge: Charge) -> str:
        bill.charge = charge
        return keep() if keep is not None else ""

    bill.charge = await run_in_threadpool(services.ledger.settle_reads, hold, used, reads,
                                          kept if keep is not None else None)
    m = services.metrics
    m.charges.inc(outcome="charged")
    m.charged_usd.inc(used.total_nanousd / NANO_PER_USD)  # a float for Prometheus only; the ledger keeps integers
    m.royalty_usd.inc(used.royalty_nanousd / NANO_PER_USD)


STREAM_OBJECT = "kvmart.stream"  # a kept streamed answer: {"object": STREAM_OBJECT, "events": [SSE event, ...]}


def replayed_response(services: Services, stored: str | None) -> Response | None:
    """The kept answer (`stored`, from the ledger's request context) of an idempotent request already charged: the
    same text, usage and receipt, its charge marked `replayed`: a JSON body for a JSON request, the same events as
    a stream for a streamed one; None if there is none. Nothing is computed or charged. (The ledger raised
    IdempotencyConflictError (409) already if the key was charged for another request, or on another endpoint:
    the endpoint is part of the request hash, or charged with no complete answer kept.)"""
    if stored is None:
        return None
    body = _marked_replayed(json.loads(stored))
    assert isinstance(body, dict), "kept answers are JSON objects"
    services.metrics.charges.inc(outcome="replayed")
    headers = {"Idempotent-Replayed": "true"}
    if body.get("object") == STREAM_OBJECT:
        return StreamingResponse(_replay(body["events"]), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(body, headers=headers)


async def _replay(events: list[str]) -> AsyncIterator[str]:
    for event in events:
        yield event


def _marked_replayed(value: object) -> object:
    """`value` (a response body, or an SSE event's lines) with every `kvmart.charge` in it marked replayed."""
    if isinstance(value, str) and "data: {" in value:  # an SSE event: its data line is JSON
        lines = [("data: " + json.dumps(_marked_replayed(json.loads(line[6:])), separators=(",", ":"))
                  if line.startswith("data: {") else line) for line in value.split("\n")]
        return "\n".join(lines)
    if isinstance(value, list):
        return [_marked_replayed(v) for v in value]
    if isinstance(value, dict):
        marked = {k: _marked_replayed(v) for k, v in value.items()}
        charge = marked.get("charge")
        if isinstance(charge, dict) and "receipt" in charge:
            charge["replayed"] = True
        return marked
    return value


async def remember_response(services: Services, payer: Payer, bill: Bill, body: dict) -> None:
    """Keep a charged idempotent request's answer for its retries."""
    if payer.idempotency_key is not None and bill.charge is not None and not bill.charge.replayed:
        await run_in_threadpool(services.ledger.remember_response, payer.account, payer.idempotency_key,
                                json.dumps(body, separators=(",", ":")))


async def kept_stream(services: Services, payer: Payer, bill: Bill, events: AsyncIterator[str]
                      ) -> AsyncGenerator[str, None]:
    """`events` (a streamed answer's SSE events) passed through; once the stream has ended and was charged in
    full, they are kept for the Idempotency-Key's retries (which replay them: `replayed_response`). A stream cut
    off by its client is charged for what was sent and keeps nothing: its retries are refused."""
    kept: list[str] = []
    async for event in events:
        kept.append(event)
        yield event
    await remember_response(services, payer, bill, {"object": STREAM_OBJECT, "events": kept})


def settle_cut_off(services: Services, bill: Bill, sent_tokens: int) -> None:
    """Charge a request whose client hung up for what was sent: its prompt as planned (read or computed: that work
    was done, or is the provider's to redo) and the `sent_tokens` handed to the connection; the rest of its hold is released with it (settling drops the
    hold, and the charge never exceeds it). Synchronous, as `release`: it runs while the request's task is being
    cancelled, when awaiting is no longer possible. Nothing is kept for an Idempotency-Key: its retries are refused
    (kvmart/ledger/charges.py `stored_response`)."""
    if bill.hold is None:
        return
    used, reads = services.ledger.quote_reads(bill.reads, bill.computed_tokens, sent_tokens)
    hold, bill.hold = bill.hold, None
    try:
        bill.charge = services.ledger.settle_reads(hold, used, reads)
    except LedgerError:  # the hold lapses with its lease: the request goes uncharged, nothing is lost
        log.exception("could not charge the cut-off request of hold %d", hold.id)
        return
    m = services.metrics
    m.charges.inc(outcome="cut_off")
    m.charged_usd.inc(used.total_nanousd / NANO_PER_USD)
    m.royalty_usd.inc(used.royalty_nanousd / NANO_PER_USD)


def release(services: Services, bill: Bill) -> None:
    """Drop the hold of a request that will not be charged. Synchronous: it may run while the request's task is
    being cancelled, when awaiting is no longer possible."""
    if bill.hold is not None:
        hold, bill.hold = bill.hold, None
        services.metrics.charges.inc(outcome="released")
        try:
            services.ledger.release(hold)
        except LedgerError:  # the request's own error matters more; a hold left behind is dropped at next start
            log.exception("could not release hold %d", hold.id)
