"""The market's web routes, served by `kvmart serve` beside the APIs: the catalogue at `/` (search, sort), a page
per document with a "try it" box, sign-in with an API key, the publisher's page (own documents, money, publish,
delete) and the provider's page (admin key). Every state-changing request is a POST carrying the session's CSRF
token; the API key travels only in the sign-in form's body. Typed errors become a page with their status (or, for
the two fetch endpoints, the JSON error body every other path answers)."""

from __future__ import annotations

import hashlib
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvmart.errors import AuthenticationError, ForbiddenError, KvmartError, RequestError
from kvmart.reuse.prompt import ChatPrompt, chat_message
from kvmart.server.api.documents import PublishRequest, delete_as, publish_as
from kvmart.server.api.usage import kvmart_usage
from kvmart.server.auth import request_hash, require_role
from kvmart.server.body import parse
from kvmart.server.errors import http_error
from kvmart.server.pipeline.billing import Payer
from kvmart.server.pipeline.plan import GenerationRequest, Sampling
from kvmart.server.pipeline.runs import Run, guarded, start_generation
from kvmart.web.access import visible_document
from kvmart.web.pages import (
    Viewer,
    error_page,
    form_fields,
    render,
    require_account,
    require_csrf,
    services_of,
    sessions_of,
    viewer_of,
    with_session,
)
from kvmart.web.provider import provider_page
from kvmart.web.views import catalogue, document_page, publisher_page

router = APIRouter(include_in_schema=False)
ASK_MAX_TOKENS = 256


@router.get("/")
async def catalogue_view(request: Request, q: str = "", sort: str = "newest"):
    viewer = await viewer_of(request)
    try:
        found = await run_in_threadpool(catalogue, services_of(request), viewer.account, q.strip(), sort)
    except KvmartError as e:
        return error_page(request, viewer, e)
    return render(request, viewer, "catalogue.html", catalogue=found, model=services_of(request).model_id)


@router.get("/documents/{doc_id}")
async def document_view(request: Request, doc_id: str):
    viewer = await viewer_of(request)
    try:
        page = await run_in_threadpool(document_page, services_of(request), viewer.account, doc_id)
    except KvmartError as e:
        return error_page(request, viewer, e)
    return render(request, viewer, "document.html", page=page, doc=page.row, max_tokens=ASK_MAX_TOKENS)


@router.post("/ask")
async def ask(request: Request):
    """Ask a question about one document as the signed-in account (charged as any API read); streams
    newline-delimited JSON: {"text": ...} pieces, then {"done": true, "usage": ...} with tokens from cache vs
    computed, the time saved and the charge."""
    services = services_of(request)
    viewer = await viewer_of(request)
    fields = await form_fields(request)
    require_csrf(request, viewer, fields)
    account = require_account(viewer)
    doc = await run_in_threadpool(visible_document, services, account, fields.get("document", ""))
    question = fields.get("question", "").strip()
    if not question:
        raise RequestError("ask a question", "question")
    max_tokens = _int_field(fields, "max_tokens", 64, 1, ASK_MAX_TOKENS)
    prompt = ChatPrompt((chat_message("user", question),), (doc.id,))
    payer = Payer(account, None, request_hash("/ask", {"document": doc.id, "question": question}))
    run = await start_generation(services, GenerationRequest(prompt, Sampling(max_tokens, temperature=0.0)),
                                 "web", payer)
    response = StreamingResponse(guarded(run, _answer(run)), media_type="application/x-ndjson",
                                 headers={"X-Accel-Buffering": "no"})
    return with_session(response, request, viewer)


async def _answer(run: Run):
    try:
        async for delta in run.deltas():
            if delta.text:
                yield json.dumps({"text": delta.text}) + "\n"
        usage = run.usage
        yield json.dumps({"done": True, "finish_reason": run.ended.finish_reason,
                          "usage": {"prompt_tokens": usage.prompt_tokens, **kvmart_usage(usage)}}) + "\n"
    except KvmartError as e:
        yield json.dumps({"error": http_error(e).message}) + "\n"  # a 5xx's own message stays in the log


def _int_field(fields: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = fields.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:  # "²".isdigit(), but int() refuses it
        raise RequestError(f"{name} must be a whole number from {low} to {high}", name)
    return int(raw)


@router.get("/favicon.ico")
async def favicon():
    """Browsers may ask for /favicon.ico without reading the page's <link rel=icon>: the same icon."""
    return RedirectResponse("/static/favicon.svg", status_code=301)


@router.get("/signin")
async def signin_form(request: Request):
    viewer = await viewer_of(request)
    return render(request, viewer, "signin.html")


@router.post("/signin")
async def signin(request: Request):
    """The API key comes in the form's body only; the session that signs in is replaced by a new one, the first
    one stored for this visitor. Attempts are limited per client address (`signin_attempts_per_minute`, across the
    cluster when it shares Redis): 429 beyond."""
    viewer = await viewer_of(request)
    try:
        fields = await form_fields(request)
        require_csrf(request, viewer, fields)
        address = request.client.host if request.client else "unknown"
        release = await run_in_threadpool(request.app.state.signin_limiter.admit,
                                          hashlib.sha256(f"signin\0{address}".encode()).hexdigest())
        release()  # a rate, not a concurrency limit
        account = await run_in_threadpool(services_of(request).ledger.authenticate, fields.get("api_key", "").strip())
        sessions = sessions_of(request)
        sessions.drop(viewer.session.token)
        session = await run_in_threadpool(sessions.new, fields["api_key"].strip())
    except AuthenticationError:
        return render(request, viewer, "signin.html", status=401, failed="that API key is unknown or revoked")
    except KvmartError as e:
        return error_page(request, viewer, e)
    signed_in = Viewer(session, account, True)
    target = "/provider" if account.is_admin else "/publisher"
    return with_session(RedirectResponse(target, status_code=303), request, signed_in)


@router.post("/signout")
async def signout(request: Request):
    viewer = await viewer_of(request)
    try:
        require_csrf(request, viewer, await form_fields(request))
    except KvmartError as e:
        return error_page(request, viewer, e)
    sessions = sessions_of(request)
    await run_in_threadpool(sessions.drop, viewer.session.token)
    return with_session(RedirectResponse("/", status_code=303), request,
                        Viewer(sessions.anonymous(), None, True))


@router.get("/publisher")
async def publisher_view(request: Request):
    viewer = await viewer_of(request)
    if viewer.account is None:
        return with_session(RedirectResponse("/signin", status_code=303), request, viewer)
    page = await run_in_threadpool(publisher_page, services_of(request), viewer.account)
    return render(request, viewer, "publisher.html", page=page,
                  may_publish=viewer.account.is_admin or viewer.account.role == "publisher",
                  default_royalty=services_of(request).ledger.tariff.royalty_share)


@router.post("/publisher/documents")
async def publish(request: Request) -> Response:
    """Publish from the page. A script (Accept: application/json) gets the document's JSON; a plain form is
    redirected to the new document's page."""
    viewer = await viewer_of(request)
    wants_json = "application/json" in request.headers.get("accept", "")
    try:
        fields = await form_fields(request)
        require_csrf(request, viewer, fields)
        req = publish_request(fields)
        body, is_new = await publish_as(services_of(request), require_account(viewer), req)
    except KvmartError as e:
        if wants_json:
            raise
        return error_page(request, viewer, e)
    if wants_json:
        return with_session(JSONResponse(body, status_code=201 if is_new else 200), request, viewer)
    return with_session(RedirectResponse(f"/documents/{body['id']}", status_code=303), request, viewer)


def publish_request(fields: dict[str, str]) -> PublishRequest:
    """The form's fields as the API's publish request (empty fields left out; readers comma-separated)."""
    body: dict[str, object] = {k: fields[k] for k in ("text", "title", "source", "licence") if fields.get(k)}
    for key in ("cache_read_usd_per_mtok", "royalty_share"):
        if fields.get(key, "").strip():
            body[key] = fields[key].strip()
    readers = [r.strip() for r in fields.get("readers", "").split(",") if r.strip()]
    if readers:
        body["readers"] = readers
    return parse(PublishRequest, body)


@router.post("/publisher/documents/{doc_id}/delete")
async def delete(request: Request, doc_id: str):
    viewer = await viewer_of(request)
    try:
        require_csrf(request, viewer, await form_fields(request))
        await delete_as(services_of(request), require_account(viewer), doc_id)
    except KvmartError as e:
        return error_page(request, viewer, e)
    return with_session(RedirectResponse("/publisher", status_code=303), request, viewer)


@router.get("/provider")
async def provider_view(request: Request):
    viewer = await viewer_of(request)
    if viewer.account is None:
        return with_session(RedirectResponse("/signin", status_code=303), request, viewer)
    try:
        require_role(viewer.account, "admin")
    except ForbiddenError as e:
        return error_page(request, viewer, e)
    page = await run_in_threadpool(provider_page, services_of(request), viewer.account)
    return render(request, viewer, "provider.html", page=page)
