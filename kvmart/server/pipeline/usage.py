"""What one request used: prompt tokens (cached and computed), generated tokens, where its cached tokens came from
(documents, the caller's own prefix cache; RAM or the store) and what it was charged. Built from the request's
plan, what was loaded, how it finished and its bill; kvmart/server/api/usage.py renders it per API."""

from __future__ import annotations

from dataclasses import dataclass

from kvmart.ledger import Charge
from kvmart.server.pipeline.billing import Bill
from kvmart.server.pipeline.engine import Finished
from kvmart.server.pipeline.plan import Loaded, Plan


@dataclass(frozen=True)
class DocumentRead:
    document_id: str
    cache_id: str
    cached_tokens: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # read from a cache (RAM or the store), not computed
    completion_tokens: int
    cache_creation_tokens: int  # computed and kept for later requests (the prefix cache, or a document's chunks)
    tier: str  # ram | store | ram+store (where the cached tokens came from) | bypass | none
    documents: tuple[DocumentRead, ...]  # the documents read from cache, in order
    own_cached_tokens: int  # cached tokens from the caller's own prefix cache (no document)
    layout: str  # how named documents were placed (kvmart/reuse/prompt.py), '' without any
    load_seconds: float
    prefill_seconds_saved: float
    is_metered: bool = True  # False: the admin, never charged
    charge: Charge | None = None  # None until settled (or not metered)

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def document_id(self) -> str | None:
        return self.documents[0].document_id if self.documents else None

    @property
    def cache_id(self) -> str | None:
        return self.documents[0].cache_id if self.documents else None


def usage_of(plan: Plan, loaded: Loaded, finished: Finished | None, bill: Bill | None = None) -> Usage:
    cached = loaded.num_tokens
    created = 0 if plan.request.bypass else plan.prompt_tokens - cached
    if plan.request.bypass:
        tier = "bypass"
    elif not cached:
        tier = "none"
    else:
        tier = "+".join(name for name, n in (("ram", loaded.from_ram), ("store", loaded.from_store)) if n)
    reads, left = [], cached
    for source in plan.sources:
        tokens = min(source.num_tokens, left)
        left -= tokens
        if source.document is not None and tokens:
            reads.append(DocumentRead(source.document.id, source.document.cache_id, tokens))
    own = cached - sum(r.cached_tokens for r in reads)
    return Usage(
        prompt_tokens=plan.prompt_tokens, cached_tokens=cached,
        completion_tokens=finished.completion_tokens if finished else 0, cache_creation_tokens=created, tier=tier,
        documents=tuple(reads), own_cached_tokens=own, layout=plan.laid.layout, load_seconds=loaded.seconds,
        prefill_seconds_saved=saved_seconds(plan, cached, loaded.seconds),
        is_metered=bill.is_metered if bill else True, charge=bill.charge if bill else None,
    )


def saved_seconds(plan: Plan, cached_tokens: int, load_seconds: float) -> float:
    """The prefill time the cached tokens spared, estimated from their documents' measured prefill rate (a
    document's prefill seconds per token), less the load time. 0 without a document to measure by."""
    rates = [d.entry.prefill_seconds / d.num_tokens for d in plan.documents if d.num_tokens]
    if not rates or not cached_tokens:
        return 0.0
    return max(0.0, cached_tokens * sum(rates) / len(rates) - load_seconds)
