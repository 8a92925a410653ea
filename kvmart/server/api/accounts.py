"""The ledger over HTTP: GET /v1/usage (the caller's balance, spending, savings and royalties), POST
/v1/receipts/verify (is this receipt one the ledger signed, unchanged?), and for the admin key only POST
/v1/accounts (create a publisher or agent; its key is in the response, once) and POST
/v1/accounts/{name}/deposits (credit money paid in)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from kvmart.errors import RequestError
from kvmart.ledger import Charge, Tariff, parse_money, usd_text
from kvmart.ledger.reports import DocumentReport, Usage
from kvmart.server.api.usage import charge_json
from kvmart.server.auth import caller, require_role
from kvmart.server.body import parse, read_json
from kvmart.server.pipeline.services import Services

router = APIRouter()
MAX_CHARGES = 100


class NewAccount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    role: Literal["publisher", "agent"]


class Deposit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    usd: str | float | int


def document_report_json(d: DocumentReport) -> dict:
    return {"cache_id": d.cache_id, "document": "doc_" + d.cache_id[:24], "licence": d.licence, "reads": d.reads,
            "cached_tokens": d.cached_tokens, "revenue_usd": usd_text(d.revenue_nanousd),
            "cache_read_usd": usd_text(d.cache_read_nanousd), "royalty_usd": usd_text(d.royalty_nanousd),
            "saved_vs_prefill_usd": usd_text(d.saved_nanousd), "precompute_usd": usd_text(d.precompute_nanousd),
            "royalty_share": d.royalty_share, "cache_read_usd_per_mtok": d.cache_read_usd_per_mtok}


def tariff_json(t: Tariff) -> dict:
    return {"prefill_usd_per_mtok": str(t.prefill_usd_per_mtok), "cache_read_fraction": str(t.cache_read_fraction),
            "output_usd_per_mtok": str(t.output_usd_per_mtok), "royalty_share": str(t.royalty_share),
            "precompute_usd_per_mtok": str(t.precompute_usd_per_mtok)}


def usage_json(u: Usage, tariff: Tariff, recent: list[Charge]) -> dict:
    return {"object": "usage", "account": u.account, "role": u.role, "balance_usd": usd_text(u.balance_nanousd),
            "held_usd": usd_text(u.held_nanousd), "requests": u.requests,
            "tokens": {"cached": u.cached_tokens, "computed": u.computed_tokens, "output": u.output_tokens},
            "spent_usd": usd_text(u.spent_nanousd), "saved_vs_prefill_usd": usd_text(u.saved_nanousd),
            "royalties_usd": usd_text(u.royalties_nanousd),
            "royalties_in_escrow_usd": usd_text(u.royalties_in_escrow_nanousd),
            "documents": [document_report_json(d) for d in u.documents], "tariff": tariff_json(tariff),
            "charges": [{"id": f"rcpt_{c.transaction_id}", **(charge_json(c) or {})} for c in recent]}


@router.get("/v1/usage")
async def usage(request: Request, limit: int = 20):
    """The caller's account: balance, what it spent and saved as a reader, what it earned as a publisher (per
    document: reads, revenue, royalties, the licence's split), the default tariff, and its latest `limit` (0-100)
    charges with their receipts."""
    services: Services = request.app.state.services
    account = await caller(request)
    if not 0 <= limit <= MAX_CHARGES:
        raise RequestError(f"limit must be between 0 and {MAX_CHARGES}", "limit")
    totals = await run_in_threadpool(services.ledger.usage, account)
    recent = await run_in_threadpool(services.ledger.recent_charges, account, limit)
    return usage_json(totals, services.ledger.tariff, recent)


@router.post("/v1/receipts/verify")
async def verify_receipt(request: Request):
    """{"valid": true} for a receipt exactly as the ledger signed it."""
    services: Services = request.app.state.services
    await caller(request)
    receipt = await read_json(request, services.server.max_body_bytes)
    return {"object": "receipt.verification", "valid": services.ledger.verify_receipt(receipt)}


@router.post("/v1/accounts")
async def create_account(request: Request):
    services: Services = request.app.state.services
    require_role(await caller(request), "admin")
    req = parse(NewAccount, await read_json(request, services.server.max_body_bytes))
    account, key = await run_in_threadpool(services.ledger.create_account, req.name, req.role)
    return JSONResponse({"object": "account", "name": account.name, "role": account.role, "api_key": key},
                        status_code=201)


@router.post("/v1/accounts/{name}/deposits")
async def deposit(request: Request, name: str):
    services: Services = request.app.state.services
    require_role(await caller(request), "admin")
    req = parse(Deposit, await read_json(request, services.server.max_body_bytes))
    amount = parse_money(req.usd, "usd")
    await run_in_threadpool(services.ledger.deposit, name, amount)
    balance = (await run_in_threadpool(services.ledger.account, name)).balance_nanousd
    return JSONResponse({"object": "deposit", "account": name, "usd": str(amount), "balance_usd": usd_text(balance)},
                        status_code=201)
