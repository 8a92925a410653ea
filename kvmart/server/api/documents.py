"""The documents API: publish a text under a licence (the provider tokenizes and prefills it itself, once, and
charges the publisher the precompute fee), list the catalogue, read one entry, delete one (its publisher only).
Publishing goes through `core.precompute_ids`, as `kvmart precompute` does, into the same store, as a chunk chain
(kvmart/reuse/chunks.py): the CLI and the server see the same public documents under the same ids, and documents
that share a prefix share its chunks. A private document is stored under its publisher's
tenant salt and is invisible (404) to accounts it does not list."""

from __future__ import annotations

import base64
import binascii
import logging
from typing import BinaryIO, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from kvmart.errors import ArtifactRejectedError, ForbiddenError, ForgedArtifactError, RequestError, TooLargeError
from kvmart.format.keys import cache_id as make_cache_id
from kvmart.ledger import Account, Hold, Licence, Terms, parse_money, usd_text
from kvmart.reuse import core
from kvmart.reuse.catalog import Document
from kvmart.reuse.upload import chunk_spans, plan, upload_size
from kvmart.runtime.chat import document_ids, layout_for
from kvmart.server.auth import caller, require_role
from kvmart.server.body import parse
from kvmart.server.pipeline.engine import Published, PublishJob
from kvmart.server.pipeline.plan import MAX_CHARS_PER_TOKEN
from kvmart.server.pipeline.runs import first_event, submit
from kvmart.server.pipeline.services import Services
from kvmart.server.publish_body import read_publish_body

router = APIRouter()
log = logging.getLogger("kvmart.server")
MAX_PAGE = 100
MAX_QUERY_CHARS = 200  # a search is a substring of a title, source or id


class PublishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    title: str = ""
    source: str = ""
    system: str | None = None  # a system prompt the document is laid out after (requests must send the same)
    licence: Literal["public", "private", "priced"] = "public"
    readers: list[str] = []  # account names that may read a private document
    cache_read_usd_per_mtok: str | float | int | None = None  # a priced document's price of 1M cached tokens
    royalty_share: str | float | int | None = None  # the publisher's share of each cache read (default: tariff's)
    artifact: str | None = None  # base64 of an artifact the publisher computed (kvmart/reuse/upload.py), verified first

    def terms(self) -> Terms:
        """The licence terms; TariffError (400) for a bad price or share."""
        price = self.cache_read_usd_per_mtok
        share = self.royalty_share
        return Terms(self.licence, tuple(self.readers),
                     None if price is None else parse_money(price, "cache_read_usd_per_mtok"),
                     None if share is None else parse_money(share, "royalty_share"))


def document_json(doc: Document) -> dict:
    e = doc.entry
    return {"id": doc.id, "object": "document", "cache_id": e.cache_id, "title": e.title, "source": e.source,
            "model": e.model, "num_tokens": e.num_tokens, "artifact_bytes": e.artifact_bytes,
            "prefill_seconds": e.prefill_seconds, "created_at": int(e.created_at)}


def licence_json(licence: Licence | None) -> dict:
    """The terms a reader sees (none recorded: public, no publisher, as for documents the CLI precomputed)."""
    if licence is None:
        return {"kind": "public", "cache_read_usd_per_mtok": None, "royalty_share": None}
    price, share = licence.cache_read_usd_per_mtok, licence.royalty_share
    return {"kind": licence.kind, "cache_read_usd_per_mtok": None if price is None else str(price),
            "royalty_share": None if share is None else str(share)}


@router.post("/v1/documents")
async def publish(request: Request):
    """201 with the new document (the publisher is charged the precompute fee); 200 with the stored one if this
    text was already published (nothing computed, nothing charged)."""
    services: Services = request.app.state.services
    account = await caller(request)
    require_role(account, "publisher")  # before the body: only publishers may send one as large as an artifact
    body = await read_publish_body(request, services.server, services.settings.data_dir / "uploads",
                                   request.app.state.uploads)  # a large one streamed to disk (server/publish_body.py)
    try:
        req = parse(PublishRequest, body.fields)
        answer, is_new = await publish_as(services, account, req, body.artifact)
    finally:
        body.close()
    return JSONResponse(answer, status_code=201 if is_new else 200)


async def publish_as(services: Services, account: Account, req: PublishRequest,
                     upload: bytes | BinaryIO | None = None) -> tuple[dict, bool]:
    """Publish `req` for `account` (the API and the web page both come here): the document's JSON, and whether it
    was computed now. `upload`: the artifact read from the body (else `req.artifact`, base64). ForbiddenError for
    an agent, TariffError/AccountError for bad terms, 413 for a document beyond the limits or one no request could
    use, 402 for the fee: each before any forward pass (the fee is held first, charged once the document is
    stored, released if it is not). The publication is noted in the ledger before anything is stored and the note
    deleted with the licence, in one transaction: a node killed between the two is repaired when it starts again
    (kvmart/server/app.py `repair_publications`), so a document is never left public and unpaid."""
    require_role(account, "publisher")
    terms = req.terms()
    await run_in_threadpool(services.ledger.check_readers, terms.readers)
    salt = account.tenant_salt if terms.is_private else ""
    upload = upload if upload is not None else decode_artifact(req.artifact)
    if upload is not None and not await run_in_threadpool(services.ledger.may_upload, account):
        raise ForbiddenError(f"account {account.name!r} had an upload refused as a forgery and may not upload "
                             "artifacts until the operator allows it (kvmart accounts allow-uploads); publish the "
                             "text instead, and the provider computes it")
    job = await run_in_threadpool(publish_job, services, req, salt, terms.canonical(), upload)
    existing = await run_in_threadpool(stored_document, services, job)
    if existing is not None:  # already stored: nothing computed, nothing charged (an upload is not needed)
        services.metrics.published.inc(outcome="already_stored")
        claimed = None
        if req.source and not terms.is_private:  # a verified owner outranks whoever published the text first
            claimed = await run_in_threadpool(services.ledger.claim_document, existing.cache_id, account, terms,
                                              req.source)
        return await document_body(services, existing, False, 0.0, 0, claimed), False
    hold = await run_in_threadpool(hold_fee, services, account, len(job.token_ids))
    note = None  # the ledger's note of this publication, written before anything of it is stored
    try:
        note = await run_in_threadpool(services.ledger.begin_publication, job_cache_id(services, job), account)
        ticket = submit(services, services.engine.publish(job, services.settings.artifact_codec))
        published = await first_event(ticket)
        assert isinstance(published, Published), published
        doc = await run_in_threadpool(services.engine.register, published)
        outcome = "already_stored" if not published.is_new else "computed" if upload is None else "uploaded"
        services.metrics.published.inc(outcome=outcome)
        fee: int | None = 0
        if published.is_new:  # None: another node published the same text first; its licence stands
            fee = await run_in_threadpool(record_publication, services, doc, account, terms, salt, hold, req.source,
                                          note)
            if upload is not None:
                await run_in_threadpool(services.ledger.record_upload_check, doc.cache_id, account,
                                        upload_check_json(services, doc.num_tokens))
        else:
            release_hold(services, hold)
    except ArtifactRejectedError as e:
        release_hold(services, hold)
        services.metrics.published.inc(outcome="refused")
        log.warning("upload by %s refused: %s", account.name, e)
        if isinstance(e, ForgedArtifactError):  # one strike: a sample must not be retried until it misses
            await run_in_threadpool(services.ledger.record_forged_upload, account, str(e))
        raise
    except BaseException:
        release_hold(services, hold)
        raise
    finally:  # a note not ended with its licence (already stored, refused, failed): the publication is over
        if note is not None:
            await run_in_threadpool(services.ledger.end_publication, note)
    return await document_body(services, doc, published.is_new, published.seconds, fee or 0), published.is_new


def publish_job(services: Services, req: PublishRequest, salt: str, terms: str, upload: bytes | BinaryIO | None
                ) -> PublishJob:
    """The document's token ids (laid out as requests will lay it out; the text's length bounded before it is
    tokenized), checked against the server's limits (a document no request could use is refused here too)."""
    model, engine = services.model, services.engine
    text = core.check_text(req.text)
    bound = model.context_tokens * MAX_CHARS_PER_TOKEN
    if len(text) > bound:
        raise TooLargeError(f"the document is {len(text):,} characters: it cannot fit the model's context of "
                            f"{model.context_tokens:,} tokens", "text")
    layout = layout_for(model.tokenizer, req.system) if req.system else layout_for(model.tokenizer)
    ids = document_ids(model.tokenize, layout, text)
    engine.check_limits(len(ids), upload_size(upload) if upload is not None else None, layout)
    return PublishJob(ids, req.title, req.source, salt, terms, upload)


def job_cache_id(services: Services, job: PublishJob) -> str:
    """The cache id `job` is stored under (its ids, salt and terms)."""
    return make_cache_id(services.model.fingerprint.digest, job.token_ids, job.salt, job.terms)


def stored_document(services: Services, job: PublishJob) -> Document | None:
    """The document if these ids, salt and terms are stored already."""
    entry = services.store.entry(job_cache_id(services, job))
    return services.catalog.add(entry) if entry is not None and entry.is_document else None


def hold_fee(services: Services, account: Account, num_tokens: int) -> Hold | None:
    """Hold the precompute fee before anything is computed: InsufficientFundsError (402) if it is not covered."""
    fee = services.ledger.precompute_fee(account, num_tokens)
    if not fee:
        return None
    return services.ledger.open_hold(account, fee, None, f"publish:{num_tokens}")


def release_hold(services: Services, hold: Hold | None) -> None:
    if hold is not None:
        services.ledger.release(hold)


async def document_body(services: Services, doc: Document, is_new: bool, seconds: float, fee: int,
                        claimed=None) -> dict:
    """The document's JSON as a publish answers it: its licence, ownership, upload check and what it cost."""
    licence = await run_in_threadpool(services.ledger.licence, doc.cache_id)
    body = {**document_json(doc), "licence": licence_json(licence), "computed": is_new, "seconds": seconds,
            "precompute_charge_usd": usd_text(fee),
            "ownership": await run_in_threadpool(ownership_json, services, licence),
            "upload_check": await run_in_threadpool(services.ledger.upload_check, doc.cache_id)}
    if claimed is not None:
        body["ownership"]["claimed_now"] = True
        body["ownership"]["escrow_paid_usd"] = usd_text(claimed.amount_nanousd)
    return body


def upload_check_json(services: Services, num_tokens: int) -> dict:
    """How much of an upload of `num_tokens` the provider recomputed under its settings, and what that buys
    (kvmart/reuse/upload.py `plan`): recorded on the document."""
    chunk_tokens = services.settings.chunk_tokens
    checked = plan(len(chunk_spans(num_tokens, chunk_tokens)), services.server.upload_sample_percent).as_json()
    return {**checked, "chunk_tokens": chunk_tokens}


def ownership_json(services: Services, licence: Licence | None) -> dict:
    """Who is paid for reads (docs/LEDGER.md "Owners, not first comers"): an open document's royalties wait in
    escrow until its publisher is its verified owner."""
    if licence is None:
        return {"source": None, "owner_verified": False, "royalties_to": None, "escrow_held_usd": usd_text(0)}
    to = "publisher" if licence.is_owner_verified or not licence.is_open else "escrow"
    return {"source": licence.source or None, "owner_verified": licence.is_owner_verified, "royalties_to": to,
            "escrow_held_usd": usd_text(services.ledger.escrow_held(licence.cache_id))}


def decode_artifact(encoded: str | None) -> bytes | None:
    """The uploaded artifact's bytes; RequestError (400) if `artifact` is not base64."""
    if encoded is None:
        return None
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"artifact must be the artifact file in base64 ({e})", "artifact") from e


def record_publication(services: Services, doc: Document, account: Account, terms: Terms, salt: str,
                       hold: Hold | None, source: str = "", note: int | None = None) -> int | None:
    """The licence and the publisher's fee (spending its hold), together, ending the publication's `note`; if
    they cannot be recorded (the publisher cannot pay: 402; the ledger fails), the new document is deleted again:
    never public and unpaid. (A node killed before this is repaired at its next start: kvmart/server/app.py
    `repair_publications`.)"""
    try:
        return services.ledger.publish(doc.cache_id, account, terms, salt, doc.num_tokens, source, hold, note)
    except BaseException:
        remove(services, doc)
        release_hold(services, hold)
        raise


def remove(services: Services, doc: Document) -> None:
    """Delete a document (its index: its chunks stay, shared with others, until the store evicts them)."""
    services.store.delete(doc.cache_id)
    services.catalog.remove(doc.id)


@router.get("/v1/documents")
async def list_documents(request: Request, limit: int = 20, after: str | None = None, q: str = ""):
    """Newest first; page with `limit` (1-100) and `after` (the last id of the previous page); `q`: only documents
    whose title, source or id contains it (case-insensitive)."""
    services: Services = request.app.state.services
    account = await caller(request)
    if not 1 <= limit <= MAX_PAGE:
        raise RequestError(f"limit must be between 1 and {MAX_PAGE}", "limit")
    if len(q) > MAX_QUERY_CHARS:
        raise RequestError(f"q must be at most {MAX_QUERY_CHARS} characters", "q")
    await run_in_threadpool(services.catalog.refresh)  # reads the store: off the event loop
    docs = services.catalog.documents(await run_in_threadpool(services.ledger.readable, account))
    if q:
        docs = [d for d in docs if matches(d, q)]
    start = 0
    if after is not None:
        ids = [d.id for d in docs]
        if after not in ids:
            raise RequestError(f"after={after!r} is not a document id in the catalogue", "after")
        start = ids.index(after) + 1
    page = docs[start:start + limit]
    return {"object": "list", "data": [document_json(d) for d in page], "has_more": start + limit < len(docs),
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


def matches(document: Document, query: str) -> bool:
    """Whether `query` is in the document's title, source or id, ignoring case."""
    needle = query.casefold()
    return any(needle in text.casefold() for text in (document.entry.title, document.entry.source, document.id))


def visible_document(services: Services, account: Account, doc_id: str) -> Document:
    """The document, unless it does not exist or `account` may not see it: UnknownDocumentError (404) alike."""
    return services.catalog.get(doc_id, services.ledger.readable(account))


def card_json(services: Services, doc: Document) -> dict:
    """One document's card: its entry, its licence, who published it (None: the operator, with `kvmart
    precompute`), what reading it costs (the price of 1M cached tokens, and of reading the whole document once
    from cache, before the question and answer), who is paid for reads (`ownership`) and how an uploaded artifact
    was checked (`upload_check`)."""
    licence = services.ledger.licence(doc.cache_id)
    publisher = None if licence is None else services.ledger.publisher_name(licence)
    tariff = services.ledger.tariff if licence is None else licence.tariff(services.ledger.tariff)
    read_once = services.ledger.quote(licence, doc.num_tokens, 0, 0).total_nanousd
    return {**document_json(doc), "licence": licence_json(licence), "publisher": publisher,
            "price": {"cache_read_usd_per_mtok": str(tariff.read_usd_per_mtok), "read_once_usd": usd_text(read_once),
                      "output_usd_per_mtok": str(tariff.output_usd_per_mtok)},
            "ownership": ownership_json(services, licence), "upload_check": services.ledger.upload_check(doc.cache_id)}


@router.get("/v1/documents/{doc_id}")
async def get_document(request: Request, doc_id: str):
    """The document's card (card_json)."""
    services: Services = request.app.state.services
    account = await caller(request)
    doc = await run_in_threadpool(visible_document, services, account, doc_id)
    return await run_in_threadpool(card_json, services, doc)


@router.delete("/v1/documents/{doc_id}")
async def delete_document(request: Request, doc_id: str):
    """Only its publisher (or the admin) may delete a document; documents precomputed by the CLI are deleted with
    `kvmart rm`. Another tenant's private document is a 404, as if it did not exist."""
    services: Services = request.app.state.services
    await delete_as(services, await caller(request), doc_id)
    return {"id": doc_id, "object": "document.deleted", "deleted": True}


async def delete_as(services: Services, account: Account, doc_id: str) -> None:
    """Delete `doc_id` for `account` (the API and the web page): 404 if it may not see it, 403 unless it is the
    document's publisher or the admin."""
    doc = await run_in_threadpool(visible_document, services, account, doc_id)
    licence = await run_in_threadpool(services.ledger.licence, doc.cache_id)
    if not account.is_admin and (licence is None or licence.publisher_id != account.id):
        why = "was not published through the API" if licence is None else "was published by another account"
        raise ForbiddenError(f"document {doc_id!r} {why}; only its publisher may delete it")
    remove(services, doc)
    await run_in_threadpool(services.ledger.forget, doc.cache_id)
