"""Metering one generation: hold its largest possible charge once it is planned (402 before any forward pass if
the agent cannot cover it), charge what it actually used when it is complete, release the hold if it fails or
the client goes away (nothing charged). The admin is never charged. See kvmart/ledger/charges.py.

A request may read several documents (named together) and its own prefix cache: each document's tokens are
priced by its licence and earn its publisher's royalty; the caller's own cached tokens are read at the list price
with no royalty (docs/SERVER.md "Billing")."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse
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
    """One request's money. `charge` is set once settled, or at once for an idempotent retry of a charged
    request (then nothing is held, and nothing charged again)."""

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
        held = await run_in_threadpool(services.ledger.open_hold, payer.account, most.total_nanousd,
                                       payer.idempotency_key, payer.request_hash)
    except InsufficientFundsError:
        services.metrics.charges.inc(outcome="payment_required")
        raise
    if isinstance(held, Charge):
        bill.charge = held
        services.metrics.charges.inc(outcome="replayed")
    else:
        bill.hold = held
    return bill


async def settle(services: Services, bill: Bill, output_tokens: int) -> None:
    """Charge what the request used (one transaction: entries, receipt, hold dropped). The prompt is billed as
    planned: a cached chunk found gone when loaded is computed again at the provider's cost, not the agent's."""
    if bill.hold is None:
        return
    used, reads = services.ledger.quote_reads(bill.reads, bill.computed_tokens, output_tokens)
    hold, bill.hold = bill.hold, None
    bill.charge = await run_in_threadpool(services.ledger.settle_reads, hold, used, reads)
    m = services.metrics
    m.charges.inc(outcome="charged")
    m.charged_usd.inc(used.total_nanousd / NANO_PER_USD)  # a float for Prometheus only; the ledger keeps integers
    m.royalty_usd.inc(used.royalty_nanousd / NANO_PER_USD)


def replayed_response(services: Services, stored: str | None) -> JSONResponse | None:
    """The kept answer (`stored`, from the ledger's request context) of an idempotent request already charged: the
    same text, usage and receipt, marked `replayed`; None if there is none. Nothing is computed or charged."""
    if stored is None:
        return None
    body = json.loads(stored)
    charge = body.get("usage", {}).get("kvmart", {}).get("charge")
    if charge:
        charge["replayed"] = True
    services.metrics.charges.inc(outcome="replayed")
    return JSONResponse(body, headers={"Idempotent-Replayed": "true"})


async def remember_response(services: Services, payer: Payer, bill: Bill, body: dict) -> None:
    """Keep a charged idempotent request's answer for its retries."""
    if payer.idempotency_key is not None and bill.charge is not None and not bill.charge.replayed:
        await run_in_threadpool(services.ledger.remember_response, payer.account, payer.idempotency_key,
                                json.dumps(body, separators=(",", ":")))


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
