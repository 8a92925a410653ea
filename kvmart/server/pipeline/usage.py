"""What one request used: prompt tokens (cached and computed), generated tokens, where its prefix came from and
what it was charged. Built from the request's events and bill; kvmart/server/api/usage.py renders it per API."""

from __future__ import annotations

from dataclasses import dataclass

from kvmart.ledger import Charge
from kvmart.server.pipeline.billing import Bill
from kvmart.server.pipeline.engine import Finished, Started


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    tier: str  # ram | store | bypass | none
    document_id: str | None
    cache_id: str | None
    prefix_tokens: int  # where the prompt was split: document prefix, then the rest
    load_seconds: float
    prefill_seconds_saved: float
    is_metered: bool = True  # False: the admin, never charged
    charge: Charge | None = None  # None until settled (or not metered)

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def usage_of(started: Started, finished: Finished | None, bill: Bill | None = None) -> Usage:
    reuse = started.reuse
    return Usage(
        prompt_tokens=started.prompt_tokens, cached_tokens=reuse.cached_tokens,
        completion_tokens=finished.completion_tokens if finished else 0, tier=reuse.tier,
        document_id=reuse.document.id if reuse.document else None,
        cache_id=reuse.document.cache_id if reuse.document else None, prefix_tokens=reuse.prefix_tokens,
        load_seconds=reuse.load_seconds, prefill_seconds_saved=reuse.saved_seconds,
        is_metered=bill.is_metered if bill else True, charge=bill.charge if bill else None,
    )
