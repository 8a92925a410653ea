"""The market's public faces (docs/LEDGER.md): GET /.well-known/kvmart.json (the provider's receipt keys, open to
anyone: what an agent or publisher needs to check a receipt or statement offline), GET /v1/statements (a
publisher's signed statement of a period, with its receipts and their Merkle root) and GET /v1/statements/proof
(the inclusion proof of one receipt)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from kvmart.errors import RequestError, UnknownReceiptError
from kvmart.ledger import Account
from kvmart.ledger.statements import proof
from kvmart.server.auth import caller, require_role
from kvmart.server.pipeline.services import Services

router = APIRouter()


@router.get("/.well-known/kvmart.json")
async def well_known(request: Request):
    """The provider's public receipt keys (JWK, RFC 8037, with validity periods) and how receipts, statements and
    ownership claims are signed and checked. No key needed."""
    services: Services = request.app.state.services
    return await run_in_threadpool(services.ledger.well_known)


async def statement_publisher(services: Services, account: Account, publisher: str | None) -> Account:
    """The publisher a statement is for: the caller, or for the admin the one it names."""
    require_role(account, "publisher")
    if publisher is None or publisher == account.name:
        return account
    if not account.is_admin:
        raise RequestError("a publisher gets its own statements only (leave out `publisher`)", "publisher")
    return await run_in_threadpool(services.ledger.account, publisher)


def period(start: int | None, end: int | None) -> tuple[int, int | None]:
    return (0 if start is None else start), end


@router.get("/v1/statements")
async def statements(request: Request, to: int | None = None, publisher: str | None = None, receipts: bool = True):
    """The caller's signed statement of [from, to) in unix seconds (from: 0; to: now; a period that has not ended is
    400): its documents' reads, tokens, prices and royalties, and the Merkle root over the period's receipts
    (attached unless `receipts=false`)."""
    services: Services = request.app.state.services
    start = request.query_params.get("from")  # `from` is a Python keyword
    who = await statement_publisher(services, await caller(request), publisher)
    body = await run_in_threadpool(services.ledger.statement, who, *period(_int(start, "from"), to))
    if not receipts:
        body.pop("receipts")
    return body


@router.get("/v1/statements/proof")
async def statement_proof(request: Request, receipt: str, to: int | None = None, publisher: str | None = None):
    """The inclusion proof (RFC 9162 audit path) of receipt `receipt` (rcpt_N) in the statement of [from, to); 404
    if the statement does not hold it."""
    services: Services = request.app.state.services
    who = await statement_publisher(services, await caller(request), publisher)
    body = await run_in_threadpool(services.ledger.statement, who,
                                   *period(_int(request.query_params.get("from"), "from"), to))
    found = next((r for r in body["receipts"] if r.get("receipt") == receipt), None)
    shown = None if found is None else proof(body, found)
    if shown is None:
        raise UnknownReceiptError(f"receipt {receipt!r} is not in {who.name}'s statement of this period")
    return {**shown, "statement": {k: v for k, v in body.items() if k != "receipts"}}


def _int(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise RequestError(f"{name} must be whole unix seconds, got {value!r}", name) from None
