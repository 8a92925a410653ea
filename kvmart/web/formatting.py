"""How numbers read on the page (Jinja filters): dollars from nano-dollars, bytes, seconds, ages."""

from __future__ import annotations

import math
import time
from decimal import Decimal

from kvmart.ledger.tariffs import NANO_PER_USD

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def usd(nanousd: int) -> str:
    """Exact dollars, trailing zeros trimmed to cents: 1_500_000_000 -> '$1.50', 429_400 -> '$0.0004294'."""
    whole, frac = divmod(abs(nanousd), NANO_PER_USD)
    sign = "-" if nanousd < 0 else ""
    return f"{sign}${whole:,}.{f'{frac:09d}'.rstrip('0').ljust(2, '0')}"


def price(usd_per_mtok: Decimal) -> str:
    return f"${usd_per_mtok.normalize():f} / Mtok"


def size(num_bytes: float) -> str:
    value, unit = float(num_bytes), 0
    while value >= 1024 and unit < len(BYTE_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{value:,.0f} {BYTE_UNITS[unit]}" if unit == 0 else f"{value:,.1f} {BYTE_UNITS[unit]}"


def seconds(value: float) -> str:
    """Always in seconds, so figures compare at a glance across the pages: '0.004 s', '3.41 s', '14,378 s'."""
    if value < 1:
        return f"{value:.3f} s"
    return f"{value:,.2f} s" if value < 100 else f"{value:,.0f} s"


def latency_bound(value: float, top_bucket_seconds: float) -> str:
    """A quantile read from histogram buckets: its bucket's upper bound, or '> 60 s' when it fell beyond the
    largest finite bucket (the histogram only knows it was longer)."""
    if math.isinf(value):
        return f"> {seconds(top_bucket_seconds).removesuffix(' s').removesuffix('.00')} s"
    return seconds(value)


def age(created_at: float, now: float | None = None) -> str:
    elapsed = max(0.0, (time.time() if now is None else now) - created_at)
    for span, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if elapsed >= span:
            return f"{elapsed // span:.0f} {unit} ago"
    return "just now"


FILTERS = {"usd": usd, "price": price, "size": size, "seconds": seconds, "age": age, "latency_bound": latency_bound}
