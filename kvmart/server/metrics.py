"""Observability: everything `kvmart serve` exports at `/metrics`, kept by `prometheus_client` in a registry of the
app's own (never the library's global one: every `create_app` builds its own `ServerMetrics`, and tests build many).

The call sites keep one small API: `counter.inc(amount, **labels)` and `histogram.observe(seconds, **labels)`, the
label names fixed when the metric is made (a call with other labels raises ValueError). Values that live in other
objects (queue depth, the hot tier, the catalogue's size) are read when scraped, by a collector, so they are never
stale. `render` picks the exposition format from the scraper's Accept header (Prometheus text 0.0.4 by default,
OpenMetrics when asked), as prometheus_client's own HTTP handlers do."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Mapping, Sequence

import prometheus_client
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

# Request latency: from 5 ms to 10 minutes, so a long generation (several minutes on a CPU) still lands in a finite
# bucket; a page's p95 reads "> 600 s" only beyond the last.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_FULL_VIEW = contextvars.ContextVar("kvmart_metrics_full_view", default=False)  # this scrape is the admin's


class Counter:
    """A monotonically increasing value per label set. Thread-safe."""

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self._metric = prometheus_client.Counter(name, help_text, labels, registry=registry)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` (>= 0; ValueError otherwise) to the series of `labels` (exactly the metric's label names)."""
        (self._metric.labels(**labels) if labels else self._metric).inc(amount)


class Histogram:
    """Observations counted in cumulative buckets per label set, with their sum and count. Thread-safe."""

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = SECONDS_BUCKETS) -> None:
        self._metric = prometheus_client.Histogram(name, help_text, labels, registry=registry, buckets=buckets)

    def observe(self, value: float, **labels: str) -> None:
        """Count `value` in the series of `labels` (exactly the metric's label names)."""
        (self._metric.labels(**labels) if labels else self._metric).observe(value)


class ReadAtScrape(Collector):
    """Unlabelled counters and gauges whose values live in another object, read each time the registry is collected
    (never stale): `read` returns all of them at once by key (one lock in their owner, not one per value).
    `families` are (metric name, help, key in read's dict, "counter" or "gauge")."""

    def __init__(self, read: Callable[[], Mapping[str, float]], families: Sequence[tuple[str, str, str, str]]) -> None:
        self.read, self.families = read, list(families)

    def collect(self) -> Iterable[Metric]:
        values = self.read()
        return [self._family(name, help_text, kind, values[key]) for name, help_text, key, kind in self.families]

    def describe(self) -> Iterable[Metric]:
        """The families without reading their values: the registry checks their names against the others'."""
        return [self._family(name, help_text, kind, 0.0) for name, help_text, _, kind in self.families]

    @staticmethod
    def _family(name: str, help_text: str, kind: str, value: float) -> Metric:
        family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        return family(name, help_text, value=value)


class ServerMetrics:
    """Every metric `kvmart serve` exports (docs/SERVER.md "Metrics"), in `registry`, which is this object's own.
    `read_*` callbacks give the live values of the queue, the hot tier and the catalogue."""

    def __init__(self, read_active: Callable[[], float], read_waiting: Callable[[], float],
                 read_hot: Callable[[], dict[str, float]], read_documents: Callable[[bool], float],
                 read_forward_passes: Callable[[], float] = lambda: 0.0,
                 read_batches: Callable[[], dict[str, float]] = lambda: {"steps": 0.0, "rows": 0.0}) -> None:
        """`read_documents(full)`: how many documents there are, all of them if `full` (the admin's scrape), else
        the public ones only (/metrics needs no key: private documents are not counted for just anyone)."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter(r, "kvmart_http_requests_total", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"))
        self.request_seconds = Histogram(r, "kvmart_http_request_seconds",
                                         "Time from request to the end of its response, by endpoint.", ("endpoint",))
        self.first_token_seconds = Histogram(r, "kvmart_time_to_first_token_seconds",
                                             "Time from request to the first generated token, by endpoint.",
                                             ("endpoint",))
        self.cache_hits = Counter(r, "kvmart_cache_hits_total",
                                  "Requests whose prompt prefix was reused, by the tier it came from.", ("tier",))
        self.reads_by_tier = Counter(r, "kvmart_reads_by_tier_total",
                                     "Requests that read cached chunks, by the slowest tier any of them came from: "
                                     "hot (the RAM hot tier), else the store tier that answered (ram, disk, redis, "
                                     "s3; store for a store without tiers).", ("tier",))
        self.chunk_reads = Counter(r, "kvmart_chunk_reads_total",
                                   "Cached chunks read for requests, by the tier each came from (as "
                                   "kvmart_reads_by_tier_total).", ("tier",))
        self.cache_misses = Counter(r, "kvmart_cache_misses_total",
                                    "Requests whose prompt matched no stored prefix (computed in full).")
        self.cache_bypass = Counter(r, "kvmart_cache_bypass_total",
                                    "Requests that asked for \"cache\": \"bypass\" (prefix recomputed).")
        self.prompt_tokens = Counter(r, "kvmart_prompt_tokens_total",
                                     "Prompt tokens by source: read from cache or computed.", ("source",))
        self.completion_tokens = Counter(r, "kvmart_completion_tokens_total", "Tokens generated.")
        self.saved_seconds = Counter(r, "kvmart_prefill_seconds_saved_total",
                                     "Estimated prefill seconds not spent thanks to reused caches.")
        self.rejected = Counter(r, "kvmart_rejected_requests_total",
                                "Requests refused because the queue was full (HTTP 429).")
        self.rate_limited = Counter(r, "kvmart_rate_limited_requests_total",
                                    "Requests refused by a per-key rate or concurrency limit (HTTP 429).")
        self.cancelled = Counter(r, "kvmart_cancelled_requests_total",
                                 "Requests whose client went away before the answer ended.")
        self.charges = Counter(r, "kvmart_charges_total", "Metered requests by outcome: charged, cut_off (its client "
                               "hung up: charged for what was sent), replayed (an idempotent retry), payment_required "
                               "(HTTP 402), released (failed).",
                               ("outcome",))
        self.charged_usd = Counter(r, "kvmart_charged_usd_total",
                                   "Dollars charged to agents (monitoring only: the ledger is the record).")
        self.royalty_usd = Counter(r, "kvmart_royalty_usd_total", "Dollars of royalties credited to publishers.")
        self.published = Counter(r, "kvmart_documents_published_total", "POST /v1/documents by outcome: computed, "
                                 "uploaded (verified), already stored, or refused.", ("outcome",))
        r.register(ReadAtScrape(lambda: {"documents": read_documents(_FULL_VIEW.get()), "active": read_active(),
                                         "waiting": read_waiting(), "forward_passes": read_forward_passes()}, (
            ("kvmart_documents", "Documents in the catalogue for the loaded model: the public ones (every one when "
             "scraped with the admin key).", "documents", "gauge"),
            ("kvmart_forward_passes_total", "Forward passes the model has run (prompt chunks, decode steps, "
             "prefills of published documents).", "forward_passes", "counter"),
            ("kvmart_queue_active", "Requests the model worker is running.", "active", "gauge"),
            ("kvmart_queue_waiting", "Requests waiting for the model worker.", "waiting", "gauge"))))
        r.register(ReadAtScrape(read_batches, (
            ("kvmart_decode_batches_total", "Batched decode steps the model worker ran (one forward pass each).",
             "steps", "counter"),
            ("kvmart_decode_batch_rows_total", "Requests those steps advanced by a token, in all (divided by the "
             "batches: the mean batch size).", "rows", "counter"))))
        r.register(ReadAtScrape(read_hot, (
            ("kvmart_hot_hits_total", "Hot tier (RAM) lookups that found the KV.", "hits", "counter"),
            ("kvmart_hot_misses_total", "Hot tier (RAM) lookups that had to load from the store.", "misses", "counter"),
            ("kvmart_hot_evictions_total", "KV caches evicted from the hot tier.", "evictions", "counter"),
            ("kvmart_hot_entries", "KV caches held in the hot tier.", "entries", "gauge"),
            ("kvmart_hot_bytes", "Bytes of KV held in the hot tier.", "bytes", "gauge"),
            ("kvmart_hot_budget_bytes", "The hot tier's byte budget (--ram-cache-bytes).", "budget_bytes", "gauge"))))

    def render(self, accept: str | None = None, full: bool = False) -> tuple[bytes, str]:
        """The registry in the format `accept` (an HTTP Accept header) asks for, and that format's content type;
        `full`: the admin's view (private documents counted)."""
        encode, content_type = choose_encoder(accept or "")
        token = _FULL_VIEW.set(full)
        try:
            return encode(self.registry), content_type
        finally:
            _FULL_VIEW.reset(token)

    def samples(self, full: bool = False) -> Iterable[Metric]:
        """The registry's metric families as collected now (`full`: the admin's view)."""
        token = _FULL_VIEW.set(full)
        try:
            return list(self.registry.collect())
        finally:
            _FULL_VIEW.reset(token)
