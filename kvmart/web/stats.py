"""Figures over time, read from the ledger's charges in one query each: reads of a document, and the money saved
against re-prefilling, per time bucket. The bucket width adapts to how long the market has been running (a minute,
an hour, a day or a week), so a new server and an old one both draw a readable chart. Also the licence terms of
every document in one query (the catalogue shows each one's licence and price)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from kvmart.ledger import Ledger
from kvmart.ledger.schema import charges, licences

BUCKET_SECONDS = (60, 3600, 86400, 7 * 86400)
MAX_BUCKETS = 24


@dataclass(frozen=True)
class Series:
    """`values[i]` summed over [starts[i], starts[i] + bucket_seconds)."""

    bucket_seconds: int
    starts: list[int]
    values: list[int]

    @property
    def total(self) -> int:
        return sum(self.values)


@dataclass(frozen=True)
class Terms:
    kind: str  # public | private | priced
    cache_read_usd_per_mtok: Decimal | None  # a priced document's own price


def bucket_width(span_seconds: int) -> int:
    """The smallest width that fits `span_seconds` in MAX_BUCKETS buckets (the widest if none does)."""
    return next((w for w in BUCKET_SECONDS if span_seconds < w * MAX_BUCKETS), BUCKET_SECONDS[-1])


def _series(conn: Connection, aggregate, where, now: int) -> Series:
    """`aggregate` (count, or a sum) of the charges matching `where`, per bucket, the last MAX_BUCKETS to `now`."""
    first = conn.execute(select(func.min(charges.c.created_at)).where(*where)).scalar()
    width = bucket_width(now - int(first) if first is not None else 0)
    end = now // width + 1
    begin = end - MAX_BUCKETS
    bucket = (charges.c.created_at // width).label("bucket")
    rows = conn.execute(select(bucket, aggregate).where(*where, charges.c.created_at >= begin * width)
                        .group_by(bucket))
    by_bucket = {int(b): int(v) for b, v in rows}
    return Series(width, [b * width for b in range(begin, end)], [by_bucket.get(b, 0) for b in range(begin, end)])


def reads_over_time(ledger: Ledger, cache_id: str, now: int | None = None) -> Series:
    """Charged reads of one document per bucket."""
    now = int(time.time()) if now is None else now
    return ledger.run(lambda conn: _series(conn, func.count(), [charges.c.cache_id == cache_id], now))


def savings_over_time(ledger: Ledger, now: int | None = None) -> Series:
    """Nano-dollars saved against re-prefilling, over every charged request, per bucket."""
    now = int(time.time()) if now is None else now
    return ledger.run(lambda conn: _series(conn, func.sum(charges.c.saved_nanousd), [], now))


def licence_terms(ledger: Ledger) -> dict[str, Terms]:
    """cache id -> its licence terms (documents the CLI precomputed have none: public at the tariff)."""
    query = select(licences.c.cache_id, licences.c.kind, licences.c.cache_read_usd_per_mtok)
    rows = ledger.run(lambda conn: list(conn.execute(query)))
    return {r.cache_id: Terms(r.kind, None if r.cache_read_usd_per_mtok is None else Decimal(r.cache_read_usd_per_mtok))
            for r in rows}


def bucket_label(start: int, width: int) -> str:
    """A bucket's start as the chart's x label (UTC)."""
    fmt = "%H:%M" if width < 86400 else "%m-%d"
    return time.strftime(fmt, time.gmtime(start))
