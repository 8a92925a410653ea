"""The HTTP API: `build_api(services)` -> FastAPI (kvmart/app.py composes it with the web page and runs it).

A request flows one way: parse (openai.py, anthropic.py, documents.py) -> resolve documents and the longest stored
prefix -> hot tier / store -> engine on the model worker -> response. Typed errors are translated to HTTP here,
once, in the body format of the API the path belongs to."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from kvmart.errors import AuthenticationError, KvmartError, LedgerError, RequestError
from kvmart.ledger.entries import LEASE_RENEW_SECONDS
from kvmart.reuse import core
from kvmart.server.api import accounts, anthropic, claims, documents, market, openai, responses
from kvmart.server.auth import api_key
from kvmart.server.errors import HttpError, http_error
from kvmart.server.headers import EXPOSED_HEADERS, ResponseHeaders
from kvmart.server.limits import KeyLimits, Limiter
from kvmart.server.pipeline.services import Services
from kvmart.server.publish_body import UploadSlots

log = logging.getLogger("kvmart.server")
ESCROW_SWEEP_SECONDS = 3600
KNOWN_PATHS: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions", "/v1/responses",
                                "/v1/messages/count_tokens", "/v1/messages", "/v1/documents",
                                "/v1/models", "/v1/usage", "/v1/receipts", "/v1/accounts", "/metrics", "/healthz",
                                "/v1/statements", "/v1/claims", "/.well-known/kvmart.json")
KNOWN_PATHS += ("/", "/documents", "/ask", "/signin", "/signout", "/publisher", "/provider", "/static",
                "/favicon.ico")  # web page


def build_api(services: Services) -> FastAPI:
    """The HTTP API over `services`, with its own model worker (started and drained by the app's lifespan). The
    web page and the per-key limits are added by the composing app (kvmart/app.py)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        released = await asyncio.to_thread(services.ledger.start_node, services.node)
        if released:
            log.warning("released %d holds left by requests that never finished", released)
        await asyncio.to_thread(repair_publications, services)  # before the catalogue first looks at the store
        await asyncio.to_thread(services.start)
        leases = asyncio.create_task(renew_leases(services))
        sweeper = asyncio.create_task(refund_due_escrow(services))
        try:
            yield
        finally:
            leases.cancel()
            sweeper.cancel()
            await asyncio.to_thread(services.stop)  # requests in flight are done: uvicorn waited
            close = getattr(services.model, "close", None)  # an engine with processes of its own (vllm)
            if close is not None:
                close()

    app = FastAPI(title="kvmart", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.services = services
    app.state.uploads = UploadSlots(services.server.max_concurrent_uploads)  # large publish bodies at once
    for module in (openai, responses, anthropic, documents, accounts, market, claims):
        app.include_router(module.router)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]  # FastAPI's documented way to extend it
    app.add_exception_handler(KvmartError, kvmart_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_exception)
    return app


async def renew_leases(services: Services) -> None:
    """Keep this node's holds and publications in progress alive while they run (kvmart/ledger/charges.py):
    every LEASE_RENEW_SECONDS, well inside the lease, so a node that dies stops renewing and its holds lapse."""
    while True:
        await asyncio.sleep(LEASE_RENEW_SECONDS)
        try:
            await asyncio.to_thread(services.ledger.renew_leases)
        except LedgerError:  # the ledger is unreachable now: the next renewal may reach it, within the lease
            log.exception("could not renew the leases of this node's holds")


def repair_publications(services: Services) -> None:
    """At start-up, finish what a killed publish left: a document stored without its licence (a kill between
    the two) is deleted, its index and the chunks no other document lists, never left public and unpaid; the
    publisher may publish it again (its fee was only held: the hold went with the node, `start_node`). Covers this
    node's own interrupted publications and any other node's whose lease lapsed."""
    for note, cache_id in services.ledger.interrupted_publications():
        if services.ledger.licence(cache_id) is None:  # killed before its licence: nothing of it may stay
            chunks = core.remove(services.store, cache_id)  # its index, if written, and the chunks it stored
            log.warning("a publication of %s was interrupted before its licence was recorded: what it stored is "
                        "deleted (%d chunks; nothing was charged; it can be published again)", cache_id[:16], chunks)
        services.ledger.end_publication(note)


# the JSON bodies the routes read themselves (kvmart/server/body.py), described in the OpenAPI schema so that
# clients, and tests/test_fuzz.py's schema-driven property test, know them
REQUEST_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/chat/completions", "post"): openai.ChatCompletionRequest,
    ("/v1/completions", "post"): openai.CompletionRequest,
    ("/v1/messages", "post"): anthropic.MessagesRequest,
    ("/v1/documents", "post"): documents.PublishRequest,
    ("/v1/accounts", "post"): accounts.NewAccount,
    ("/v1/accounts/{name}/deposits", "post"): accounts.Deposit,
}


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema of the routes, with the request bodies of REQUEST_BODIES and the bearer key scheme."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {})
        models = components.setdefault("schemas", {})
        for (path, method), model in REQUEST_BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            models.update(body.pop("$defs", {}))
            schema["paths"][path][method]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": body}}}
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema


async def refund_due_escrow(services: Services) -> None:
    """Refund escrowed royalties whose period has ended (kvmart/ledger/escrow.py): at start, then every hour."""
    while True:
        try:
            paid = await asyncio.to_thread(services.ledger.refund_due_escrow)
            if paid.receipts:
                log.info("refunded %d unclaimed royalties from escrow to their readers", paid.receipts)
        except KvmartError:  # a ledger hiccup: the next round refunds what is still due
            log.exception("escrow refunds failed")
        await asyncio.sleep(ESCROW_SWEEP_SECONDS)


def add_middleware(app: FastAPI, services: Services, limiter: Limiter, session_cookie: str,
                   session_key: Callable[[str], str | None]) -> None:
    """Per-key rate and concurrency limits (429) by `limiter` (this node's, or the cluster's in Redis), for the API
    and the web page alike (a web session counts against the API key it signed in with: `session_key` maps a
    session cookie to it); request metrics around them; the request id and rate-limit headers around those (so a
    429 carries them); CORS outermost, when origins are set (a browser's preflight is answered before anything
    else looks at it)."""
    app.add_middleware(KeyLimits, limiter=limiter, respond=error_response,
                       on_reject=services.metrics.rate_limited.inc, session_cookie=session_cookie,
                       session_key=session_key)
    app.add_middleware(RequestMetrics, services=services)
    app.add_middleware(ResponseHeaders, limiter=limiter)
    origins = services.server.cors_origins
    if origins:
        # API keys travel in headers, never cookies: no credentials mode, so no cookie of the web page is exposed
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["*"], expose_headers=list(EXPOSED_HEADERS), max_age=600)


def error_response(path: str, error: HttpError) -> JSONResponse:
    """The error in the body format of the API `path` belongs to."""
    body = anthropic.error_body(error) if path.startswith("/v1/messages") else openai.error_body(error)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


async def kvmart_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KvmartError)  # registered for KvmartError (Starlette types every handler's exc as Exception)
    return error_response(request.url.path, http_error(exc))


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)  # registered for it
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"][1:]) or None
    return error_response(request.url.path, http_error(RequestError(f"invalid {where}: {first['msg']}", where)))


async def http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)  # registered for it
    kind = {404: "not_found", 405: "invalid_request"}.get(exc.status_code, "invalid_request")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(request.url.path, HttpError(exc.status_code, kind, message))


async def healthz(request: Request):
    """200 while the model worker is alive (status `degraded` while a shared store tier is unreachable: the node
    keeps serving from its local tiers, prefilling on a miss); 503 otherwise."""
    services: Services = request.app.state.services
    active, waiting = services.worker.depth()
    alive = services.worker.is_alive()
    store_health = getattr(services.store, "health", None)
    tiers = await asyncio.to_thread(store_health) if store_health else None
    status = "unavailable" if not alive else "degraded" if tiers and tiers["degraded"] else "ok"
    full = await is_admin_call(request)  # no key needed here: private documents are counted for the admin only
    body = {"status": status, "model": services.model_id, "active": active,
            "waiting": waiting, "documents": len(services.catalog.documents(None if full else frozenset()))}
    if tiers is not None:
        body["store"] = tiers
    return JSONResponse(body, status_code=200 if alive else 503)


async def metrics(request: Request):
    """The app's metrics, in the format the scraper's Accept header asks for (Prometheus text 0.0.4 by default).
    No key needed: document counts are of public documents unless the admin key is sent."""
    services: Services = request.app.state.services
    body, content_type = services.metrics.render(request.headers.get("accept"), full=await is_admin_call(request))
    return Response(body, media_type=content_type)


async def is_admin_call(request: Request) -> bool:
    """Whether the request carries the admin's key (no key, or any other, is an anonymous caller here)."""
    key = api_key(request.headers)
    if key is None:
        return False
    services: Services = request.app.state.services
    try:
        account = await asyncio.to_thread(services.ledger.authenticate, key)
    except AuthenticationError:
        return False
    return account.is_admin


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by endpoint and status and times it to the end of its response
    (streams included)."""

    def __init__(self, app, services: Services) -> None:
        self.app, self.services = app, services

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began, status = time.perf_counter(), [500]

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            endpoint = endpoint_label(scope["path"])
            self.services.metrics.requests.inc(endpoint=endpoint, status=str(status[0]))
            self.services.metrics.request_seconds.observe(time.perf_counter() - began, endpoint=endpoint)


def endpoint_label(path: str) -> str:
    """A bounded label: the known endpoint the path belongs to, or `other`."""
    return next((p for p in KNOWN_PATHS if path == p or path.startswith(p + "/")), "other")

