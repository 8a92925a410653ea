"""The provider's page: the figures `/metrics` exports (read from the samples of the very registry Prometheus
scrapes, so the page and the scraper never disagree) and the ledger's report, drawn. Hit ratio per tier, bytes per
tier, queue depth, requests and latency per endpoint, the top documents and the money saved over time."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from markupsafe import Markup
from prometheus_client.metrics_core import Metric

from kvmart.ledger import Account
from kvmart.server.pipeline.services import Services
from kvmart.web import charts, stats
from kvmart.web.access import visible_documents
from kvmart.web.formatting import usd
from kvmart.web.views import Row, rows

TOP_DOCUMENTS = 10

Labels = frozenset[tuple[str, str]]


class Samples:
    """A registry's collected samples (`registry.collect()`): sample name (as exported, `_total`, `_bucket`...)
    -> {labels: value}."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.by_name: dict[str, dict[Labels, float]] = defaultdict(dict)
        for family in families:
            for sample in family.samples:
                self.by_name[sample.name][frozenset(sample.labels.items())] = sample.value

    def get(self, name: str, **labels: str) -> float:
        return self.by_name.get(name, {}).get(frozenset(labels.items()), 0.0)

    def total(self, name: str) -> float:
        return sum(self.by_name.get(name, {}).values())

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.by_name.get(name, {}).items():
            out[dict(labels).get(label, "")] += value
        return dict(out)


@dataclass(frozen=True)
class Tier:
    name: str
    hits: int
    hit_ratio: float  # of every request that looked up a cache (hits, misses, bypasses)
    bytes: int | None  # bytes held, if this tier reports them
    budget_bytes: int | None


@dataclass(frozen=True)
class Endpoint:
    name: str
    requests: int
    mean_seconds: float
    p95_seconds: float  # from the histogram's buckets: the upper bound of the bucket holding the 95th percentile
    top_bucket_seconds: float  # the largest finite bucket: a p95 beyond it (inf) is shown as "> that"


@dataclass(frozen=True)
class ProviderPage:
    tiers: list[Tier]
    misses: int
    lookups: int
    queue_active: int
    queue_waiting: int
    endpoints: list[Endpoint]
    cached_tokens: int
    computed_tokens: int
    prefill_seconds_saved: float
    saved_nanousd: int
    top: list[Row]
    top_chart: Markup
    savings_chart: Markup


def quantile(buckets: dict[float, float], q: float) -> float:
    """Upper bound of the cumulative bucket holding quantile `q` (0 without observations)."""
    ordered = sorted(buckets.items())
    count = ordered[-1][1] if ordered else 0
    for bound, cumulative in ordered:
        if count and cumulative >= q * count:
            return bound
    return 0.0


def endpoints(samples: Samples, name: str) -> list[Endpoint]:
    found = []
    counts = samples.by_label(f"{name}_count", "endpoint")
    for endpoint, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        buckets = {float(dict(lb)["le"]): v for lb, v in samples.by_name[f"{name}_bucket"].items()
                   if dict(lb).get("endpoint") == endpoint}
        total = samples.get(f"{name}_sum", endpoint=endpoint)
        top = max((b for b in buckets if not math.isinf(b)), default=0.0)
        found.append(Endpoint(endpoint, int(count), total / count if count else 0.0, quantile(buckets, 0.95), top))
    return found


def tiers(services: Services, samples: Samples) -> tuple[list[Tier], int, int]:
    hits = samples.by_label("kvmart_cache_hits_total", "tier")
    misses = int(samples.total("kvmart_cache_misses_total"))
    lookups = int(sum(hits.values())) + misses + int(samples.total("kvmart_cache_bypass_total"))
    store_bytes = sum(d.entry.artifact_bytes for d in services.catalog.documents())
    held = {"ram": (int(samples.total("kvmart_hot_bytes")), int(samples.total("kvmart_hot_budget_bytes"))),
            "store": (store_bytes, None)}
    names = ["ram", "store"] + sorted(set(hits) - {"ram", "store"})
    found = [Tier(n, int(hits.get(n, 0)), hits.get(n, 0) / lookups if lookups else 0.0, *held.get(n, (None, None)))
             for n in names]
    return found, misses, lookups


def provider_page(services: Services, admin: Account) -> ProviderPage:
    """For the admin only (the caller checks), who sees every document."""
    samples = Samples(services.metrics.samples(full=True))  # the provider page is the admin's: every document
    tier_list, misses, lookups = tiers(services, samples)
    everything = rows(services, visible_documents(services, admin))
    top = sorted(everything, key=lambda r: (-r.revenue_nanousd, -r.reads, r.id))[:TOP_DOCUMENTS]
    series = stats.savings_over_time(services.ledger)
    labels = [stats.bucket_label(s, series.bucket_seconds) for s in series.starts]
    tokens = samples.by_label("kvmart_prompt_tokens_total", "source")
    return ProviderPage(
        tier_list, misses, lookups, int(samples.total("kvmart_queue_active")),
        int(samples.total("kvmart_queue_waiting")), endpoints(samples, "kvmart_http_request_seconds"),
        int(tokens.get("cache", 0)), int(tokens.get("computed", 0)),
        samples.total("kvmart_prefill_seconds_saved_total"), sum(r.saved_nanousd for r in everything), top,
        charts.hbar_chart([(r.title, r.reads) for r in top], "Reads of the top documents"),
        charts.bar_chart(labels, [v / 1e9 for v in series.values], "Saved against re-prefilling (USD)",
                         lambda v: usd(round(v * 1e9))))

