"""The documents API: publish a text (the provider tokenizes and prefills it itself, once), list the catalogue,
read one entry, delete one (its publisher only). Publishing goes through `cache.precompute`, as `kvmart
precompute` does, into the same store: the CLI and the server see the same documents under the same ids."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .body import parse, read_json
from .catalog import Document
from .engine import Published
from .errors import ForbiddenError, RequestError
from .owners import caller_key_hash
from .runs import first_event, submit
from .services import Services

router = APIRouter()
MAX_PAGE = 100


class PublishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    title: str = ""
    source: str = ""
    system: str | None = None  # a system prompt the document is laid out after (requests must send the same)


def document_json(doc: Document) -> dict:
    e = doc.entry
    return {"id": doc.id, "object": "document", "cache_id": e.cache_id, "title": e.title, "source": e.source,
            "model": e.model, "num_tokens": e.num_tokens, "artifact_bytes": e.artifact_bytes,
            "prefill_seconds": e.prefill_seconds, "created_at": int(e.created_at)}


@router.post("/v1/documents")
async def publish(request: Request):
    """201 with the new document; 200 with the stored one if this text was already published (nothing computed)."""
    services: Services = request.app.state.services
    req = parse(PublishRequest, await read_json(request, services.server.max_body_bytes))
    ticket = submit(services, services.engine.publish(req.text, req.title, req.source, req.system))
    published = await first_event(ticket)
    assert isinstance(published, Published), published
    services.metrics.published.inc(outcome="computed" if published.is_new else "already_stored")
    if published.is_new:
        services.owners.claim(published.document.cache_id, caller_key_hash(request.headers))
    body = {**document_json(published.document), "computed": published.is_new, "seconds": published.seconds}
    return JSONResponse(body, status_code=201 if published.is_new else 200)


@router.get("/v1/documents")
async def list_documents(request: Request, limit: int = 20, after: str | None = None):
    """Newest first; page with `limit` (1-100) and `after` (the last id of the previous page)."""
    services: Services = request.app.state.services
    if not 1 <= limit <= MAX_PAGE:
        raise RequestError(f"limit must be between 1 and {MAX_PAGE}", "limit")
    await run_in_threadpool(services.catalog.refresh)  # reads the store: off the event loop
    docs = services.catalog.documents()
    start = 0
    if after is not None:
        ids = [d.id for d in docs]
        if after not in ids:
            raise RequestError(f"after={after!r} is not a document id in the catalogue", "after")
        start = ids.index(after) + 1
    page = docs[start:start + limit]
    return {"object": "list", "data": [document_json(d) for d in page], "has_more": start + limit < len(docs),
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


@router.get("/v1/documents/{doc_id}")
async def get_document(request: Request, doc_id: str):
    services: Services = request.app.state.services
    return document_json(await run_in_threadpool(services.catalog.get, doc_id))


@router.delete("/v1/documents/{doc_id}")
async def delete_document(request: Request, doc_id: str):
    """Only the API key that published a document may delete it; documents published by the CLI or without a
    key are deleted with `kvmart rm`."""
    services: Services = request.app.state.services
    doc = await run_in_threadpool(services.catalog.get, doc_id)
    owner = services.owners.owner(doc.cache_id)
    if owner is None or owner != caller_key_hash(request.headers):
        why = "was not published through the API with a key" if owner is None else "was published by another key"
        raise ForbiddenError(f"document {doc_id!r} {why}; only its publisher may delete it")
    services.store.delete(doc.cache_id)
    services.catalog.remove(doc_id)
    services.hot.discard(doc.cache_id)
    services.owners.forget(doc.cache_id)
    return {"id": doc_id, "object": "document.deleted", "deleted": True}
