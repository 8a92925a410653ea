"""Ownership claims over HTTP (docs/LEDGER.md "Owners, not first comers"): a publisher asks for a claim on the
origin of a URL (POST /v1/claims), serves its token at ORIGIN/.well-known/kvmart-claim, and asks the provider to
check it (POST /v1/claims/{id}/verify). The provider fetches the token file under the constraints of
kvmart/server/fetch.py; once verified, the publisher's documents whose source is on that origin are owner-verified
and escrow pays them what it held."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from kvmart.errors import ClaimCheckError, UnknownClaimError
from kvmart.ledger import usd_text
from kvmart.ledger.ownership import Claim
from kvmart.server.auth import caller, require_role
from kvmart.server.body import parse, read_json
from kvmart.server.fetch import fetch_text, has_token
from kvmart.server.pipeline.services import Services

router = APIRouter()
CLAIM_PREFIX = "claim_"


class NewClaim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1)  # any URL on the origin claimed (a document's `source`)


def claim_json(claim: Claim) -> dict:
    return {"id": f"{CLAIM_PREFIX}{claim.id}", "object": "claim", "origin": claim.origin, "token": claim.token,
            "well_known_url": claim.url, "status": "verified" if claim.verified_at else "pending",
            "created_at": claim.created_at, "verified_at": claim.verified_at,
            "instructions": f"serve the token as a line of text at {claim.url}, then POST "
                            f"/v1/claims/{CLAIM_PREFIX}{claim.id}/verify"}


def claim_number(claim_id: str) -> int:
    number = claim_id.removeprefix(CLAIM_PREFIX)
    if not number.isdigit() or not number.isascii():
        raise UnknownClaimError(f"no claim {claim_id!r} (claim ids read claim_N; see GET /v1/claims)")
    return int(number)


@router.post("/v1/claims")
async def new_claim(request: Request):
    """201 with a new claim on the origin of `source` and its token, or 200 with the caller's existing one."""
    services: Services = request.app.state.services
    account = await caller(request)
    require_role(account, "publisher")
    req = parse(NewClaim, await read_json(request, services.server.max_body_bytes))
    before = {c.id for c in await run_in_threadpool(services.ledger.claims, account)}
    claim = await run_in_threadpool(services.ledger.new_claim, account, req.source)
    return JSONResponse(claim_json(claim), status_code=200 if claim.id in before else 201)


@router.get("/v1/claims")
async def list_claims(request: Request):
    services: Services = request.app.state.services
    account = await caller(request)
    claims = await run_in_threadpool(services.ledger.claims, account)
    return {"object": "list", "data": [claim_json(c) for c in claims]}


@router.post("/v1/claims/{claim_id}/verify")
async def verify_claim(request: Request, claim_id: str):
    """Fetch the claim's token file and, if the token is there, verify the claim: the documents it makes
    owner-verified and what escrow paid for them. 422 (nothing changed) if the token is not found or the fetch is
    refused."""
    services: Services = request.app.state.services
    account = await caller(request)
    require_role(account, "publisher")
    claim = await run_in_threadpool(services.ledger.claim, account, claim_number(claim_id))
    text = await run_in_threadpool(fetch_text, claim.url, services.server.claim_allow_loopback)
    if not has_token(text, claim.token):
        raise ClaimCheckError(f"{claim.url} does not hold this claim's token on a line of its own; nothing changed")
    verified = await run_in_threadpool(services.ledger.mark_claim_verified, claim)
    fresh = await run_in_threadpool(services.ledger.claim, account, claim.id)
    return {**claim_json(fresh), "documents_verified": [
        {"cache_id": cache_id, "document": "doc_" + cache_id[:24], "escrow_paid_usd": usd_text(p.amount_nanousd)}
        for cache_id, p in verified]}
