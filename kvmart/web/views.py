"""What the catalogue, document and publisher pages show, assembled from the catalogue (the store) and the ledger.
Pure data: the templates only lay it out. Every function lists documents through `access`, so a viewer never
gets a row, a search hit or a chart bar for a document it may not see. Call these off the event loop (they read
the store and the database)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from markupsafe import Markup

from kvmart.errors import RequestError
from kvmart.ledger import Account
from kvmart.ledger.reports import DocumentReport, Usage
from kvmart.reuse.catalog import Document
from kvmart.server.pipeline.services import Services
from kvmart.web import charts, stats
from kvmart.web.access import visible_document, visible_documents
from kvmart.web.formatting import usd

SORTS = ("newest", "title", "tokens", "bytes", "reads", "saved", "price")


@dataclass(frozen=True)
class Row:
    """One document as the catalogue shows it."""

    id: str
    cache_id: str
    title: str
    source: str
    model: str
    num_tokens: int
    artifact_bytes: int
    prefill_seconds: float
    created_at: float
    licence: str  # public | private | priced
    read_usd_per_mtok: Decimal  # what 1M cached tokens of it cost a reader
    publisher: str | None
    reads: int
    cached_tokens: int  # tokens read from its cache: prefill not recomputed
    saved_nanousd: int
    revenue_nanousd: int
    royalty_nanousd: int

    @property
    def prefill_seconds_saved(self) -> float:
        """Compute saved so far: its measured prefill time for every token read from cache."""
        return self.prefill_seconds * self.cached_tokens / max(self.num_tokens, 1)


def _row(services: Services, doc: Document, report: DocumentReport | None, terms: stats.Terms | None) -> Row:
    e = doc.entry
    price = terms.cache_read_usd_per_mtok if terms and terms.cache_read_usd_per_mtok is not None else None
    return Row(doc.id, doc.cache_id, e.title or doc.id, e.source, e.model, e.num_tokens, e.artifact_bytes,
               e.prefill_seconds, e.created_at, terms.kind if terms else "public",
               price if price is not None else services.ledger.tariff.read_usd_per_mtok,
               report.publisher if report else None, report.reads if report else 0,
               report.cached_tokens if report else 0, report.saved_nanousd if report else 0,
               report.revenue_nanousd if report else 0, report.royalty_nanousd if report else 0)


def rows(services: Services, docs: list[Document]) -> list[Row]:
    reports = {r.cache_id: r for r in services.ledger.documents()}
    terms = stats.licence_terms(services.ledger)
    return [_row(services, d, reports.get(d.cache_id), terms.get(d.cache_id)) for d in docs]


def matches(row: Row, query: str) -> bool:
    q = query.casefold()
    return any(q in field.casefold() for field in (row.title, row.source, row.id, row.publisher or ""))


def sort_rows(found: list[Row], sort: str) -> list[Row]:
    """Newest first unless `sort` names another order (largest first; titles A-Z); RequestError for others."""
    if sort not in SORTS:
        raise RequestError(f"sort must be one of {', '.join(SORTS)}", "sort")
    if sort == "title":
        return sorted(found, key=lambda r: (r.title.casefold(), r.id))
    if sort == "newest":
        return found  # the catalogue's own order
    key = {"tokens": "num_tokens", "bytes": "artifact_bytes", "reads": "reads", "saved": "saved_nanousd",
           "price": "read_usd_per_mtok"}[sort]
    return sorted(found, key=lambda r: (-getattr(r, key), r.id))


@dataclass(frozen=True)
class Catalogue:
    rows: list[Row]
    total: int  # documents visible before the search
    query: str
    sort: str
    chart: Markup  # reads of the visible documents found


def catalogue(services: Services, account: Account | None, query: str = "", sort: str = "newest") -> Catalogue:
    visible = rows(services, visible_documents(services, account))
    found = sort_rows([r for r in visible if matches(r, query)] if query else visible, sort)
    top = sorted(found, key=lambda r: -r.reads)[:8]
    chart = charts.hbar_chart([(r.title, r.reads) for r in top if r.reads], "Reads per document")
    return Catalogue(found, len(visible), query, sort, chart)


@dataclass(frozen=True)
class DocumentPage:
    row: Row
    chart: Markup  # reads over time
    may_delete: bool


def document_page(services: Services, account: Account | None, doc_id: str) -> DocumentPage:
    doc = visible_document(services, account, doc_id)
    row = rows(services, [doc])[0]
    series = stats.reads_over_time(services.ledger, doc.cache_id)
    labels = [stats.bucket_label(s, series.bucket_seconds) for s in series.starts]
    chart = charts.bar_chart(labels, series.values, f"Reads per {_unit(series.bucket_seconds)}")
    licence = services.ledger.licence(doc.cache_id)
    may_delete = account is not None and (account.is_admin or (licence is not None and
                                                               licence.publisher_id == account.id))
    return DocumentPage(row, chart, may_delete)


def _unit(seconds: int) -> str:
    return {60: "minute", 3600: "hour", 86400: "day"}.get(seconds, "week")


@dataclass(frozen=True)
class PublisherPage:
    usage: Usage
    rows: list[Row]  # the documents it published
    revenue_nanousd: int
    chart: Markup  # royalties per document


def publisher_page(services: Services, account: Account) -> PublisherPage:
    usage = services.ledger.usage(account)
    own = {d.cache_id for d in usage.documents}
    mine = rows(services, [d for d in visible_documents(services, account) if d.cache_id in own])
    chart = charts.hbar_chart([(r.title, r.royalty_nanousd / 1e9) for r in mine], "Royalties per document (USD)",
                              lambda v: usd(round(v * 1e9)))
    return PublisherPage(usage, mine, sum(r.revenue_nanousd for r in mine), chart)
