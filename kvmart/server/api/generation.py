"""The one way every generation endpoint (OpenAI chat and completions, Anthropic messages) opens and closes a
metered request, so they differ only in how they read a request and write an answer:

    open:  authenticate -> read and validate the body -> check the model -> the endpoint's own checks and
           GenerationRequest -> the payer (idempotency) -> what it may read and a stored answer to replay, in one
           ledger read -> start the run (plan, hold, load, queue: kvmart/server/pipeline/runs.py)
    close: the answer's JSON, kept for idempotent retries, then sent; or a stream, whose events are kept once it
           has been sent whole and charged (kvmart/server/pipeline/billing.py `kept_stream`).

A retry with an Idempotency-Key already charged replays the kept answer, a stream as a stream, or is refused (409:
charged on another endpoint, for another body, or cut off with nothing kept); it is never computed again for
free. The request hash names the endpoint (its route's path), so a key charged on one endpoint never replays on
another."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Generic, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from kvmart.errors import UnknownModelError
from kvmart.ledger import parse_money
from kvmart.server.auth import caller, idempotency_key, request_hash
from kvmart.server.body import parse, read_json
from kvmart.server.pipeline.billing import Payer, kept_stream, replayed_response, settle
from kvmart.server.pipeline.plan import Caller, GenerationRequest
from kvmart.server.pipeline.runs import Run, guarded, start_generation
from kvmart.server.pipeline.services import Services

T = TypeVar("T", bound=BaseModel)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Opened(Generic[T]):
    """A metered generation in progress: the parsed request, who pays, and the run."""

    services: Services
    req: T
    payer: Payer
    run: Run

    async def answer(self, build: Callable[[], dict]) -> JSONResponse:
        """Charge the run (`run.collect()` left it unsettled) and send its complete answer, `build()` (made once the
        charge is known: its usage holds the receipt). With an Idempotency-Key the answer is kept for the request's
        retries in the charge's own transaction, so no node dies between charging a request and keeping its answer."""
        built: list[dict] = []

        def keep() -> str:
            built.append(build())
            return json.dumps(built[-1], separators=(",", ":"))

        await settle(self.services, self.run.bill, self.run.ended.completion_tokens,
                     keep if self.payer.idempotency_key is not None else None)
        return JSONResponse(built[-1] if built else build())

    def stream(self, events: AsyncGenerator[str, None]) -> StreamingResponse:
        """Send a streamed answer (its SSE events), kept for the request's idempotent retries once sent whole, and
        settled however early its client hangs up (runs.py `guarded`)."""
        return StreamingResponse(guarded(self.run, kept_stream(self.services, self.payer, self.run.bill, events)),
                                 media_type="text/event-stream", headers=SSE_HEADERS)


async def open_generation(request: Request, model: type[T], to_generation: Callable[[T], GenerationRequest],
                          endpoint: str) -> Opened[T] | Response:
    """Open a metered generation for `request` (see the module's docstring): the running generation, or the stored
    answer of an idempotent retry (nothing computed or charged again). Every refusal raises here, before anything
    is computed or any byte of the answer is sent."""
    services: Services = request.app.state.services
    account = await caller(request)
    body = await read_json(request, services.server.max_body_bytes)
    req = parse(model, body)
    check_model(services, getattr(req, "model"))  # noqa: B009  (every generation request names its model)
    generation = to_generation(req)
    payer = Payer(account, idempotency_key(request), request_hash(route_path(request), body))
    readable, stored = await run_in_threadpool(services.ledger.request_context, account, payer.idempotency_key,
                                               payer.request_hash)  # one read for both
    if replay := replayed_response(services, stored):  # a stream replays as a stream
        return replay
    run = await start_generation(services, generation, endpoint, payer, Caller(account, readable, account.tenant_salt))
    return Opened(services, req, payer, run)


def route_path(request: Request) -> str:
    """The path of the route that `request` matched (`/v1/messages`): what names its endpoint in a request hash."""
    route = request.scope.get("route")
    return str(getattr(route, "path", request.url.path))


def check_model(services: Services, requested: str) -> None:
    if requested != services.model_id:
        raise UnknownModelError(requested, services.model_id)


def read_price_cap(value: str | float | int | None) -> Decimal | None:
    """A request's `max_cache_read_usd_per_mtok` (the most a document it did not name may cost per 1M cached
    tokens); TariffError (400) for a bad number."""
    return None if value is None else parse_money(value, "max_cache_read_usd_per_mtok")
