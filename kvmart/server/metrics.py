"""Observability: counters, gauges and histograms rendered in the Prometheus text format (version 0.0.4), with no
client library. `ServerMetrics` names everything kvmart serve exports; values read from other objects at scrape
time (queue depth, the hot tier) are gauges and counters with a callback."""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Callable
from typing import TypeVar

Labels = tuple[tuple[str, str], ...]
_FULL_VIEW = contextvars.ContextVar("kvmart_metrics_full_view", default=False)  # this scrape is the admin's
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped, strict=True)) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self._lock = threading.Lock()

    def lines(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"] + self.samples()

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(Metric):
    """A monotonically increasing value per label set; or, with `read`, a value read at scrape time."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, read: Callable[[], float] | None = None) -> None:
        super().__init__(name, help_text)
        self._values: dict[Labels, float] = {}
        self._read = read

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> list[str]:
        if self._read is not None:
            return [f"{self.name} {_number(self._read())}"]
        with self._lock:
            return [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self._values.items())]


class Gauge(Counter):
    """A value that goes up and down: set from a callback at scrape time."""

    kind = "gauge"


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = SECONDS_BUCKETS) -> None:
        super().__init__(name, help_text)
        self.buckets = (*buckets, math.inf)
        self._series: dict[Labels, list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
            series[-2] += value
            series[-1] += 1

    def samples(self) -> list[str]:
        out = []
        with self._lock:
            for key, series in sorted(self._series.items()):
                for bound, count in zip(self.buckets, series, strict=False):
                    out.append(f"{self.name}_bucket{_labels(key, (('le', _number(bound)),))} {_number(count)}")
                out.append(f"{self.name}_sum{_labels(key)} {_number(series[-2])}")
                out.append(f"{self.name}_count{_labels(key)} {_number(series[-1])}")
        return out


M = TypeVar("M", bound=Metric)


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.lines()) + "\n"


class ServerMetrics:
    """Every metric `kvmart serve` exports. `read_*` callbacks give the live values of the queue and hot tier."""

    def __init__(self, read_active: Callable[[], float], read_waiting: Callable[[], float],
                 read_hot: Callable[[], dict[str, float]], read_documents: Callable[[bool], float]) -> None:
        """`read_documents(full)`: how many documents there are, all of them if `full` (the admin's scrape), else
        the public ones only (/metrics needs no key: private documents are not counted for just anyone)."""
        r = self.registry = Registry()
        self.requests = r.add(Counter("kvmart_http_requests_total", "HTTP requests by endpoint and status code."))
        self.request_seconds = r.add(Histogram("kvmart_http_request_seconds",
                                               "Time from request to the end of its response, by endpoint."))
        self.first_token_seconds = r.add(Histogram("kvmart_time_to_first_token_seconds",
                                                   "Time from request to the first generated token, by endpoint."))
        self.cache_hits = r.add(Counter("kvmart_cache_hits_total",
                                        "Requests whose prompt prefix was reused, by the tier it came from."))
        self.cache_misses = r.add(Counter("kvmart_cache_misses_total",
                                          "Requests whose prompt matched no stored prefix (computed in full)."))
        self.cache_bypass = r.add(Counter("kvmart_cache_bypass_total",
                                          "Requests that asked for \"cache\": \"bypass\" (prefix recomputed)."))
        self.prompt_tokens = r.add(Counter("kvmart_prompt_tokens_total",
                                           "Prompt tokens by source: read from cache or computed."))
        self.completion_tokens = r.add(Counter("kvmart_completion_tokens_total", "Tokens generated."))
        self.saved_seconds = r.add(Counter("kvmart_prefill_seconds_saved_total",
                                           "Estimated prefill seconds not spent thanks to reused caches."))
        self.rejected = r.add(Counter("kvmart_rejected_requests_total",
                                      "Requests refused because the queue was full (HTTP 429)."))
        self.rate_limited = r.add(Counter("kvmart_rate_limited_requests_total",
                                          "Requests refused by a per-key rate or concurrency limit (HTTP 429)."))
        self.cancelled = r.add(Counter("kvmart_cancelled_requests_total",
                                       "Requests whose client went away before the answer ended."))
        self.charges = r.add(Counter("kvmart_charges_total", "Metered requests by outcome: charged, replayed (an "
                                     "idempotent retry), payment_required (HTTP 402), released (failed or cancelled)."))
        self.charged_usd = r.add(Counter("kvmart_charged_usd_total",
                                         "Dollars charged to agents (monitoring only: the ledger is the record)."))
        self.royalty_usd = r.add(Counter("kvmart_royalty_usd_total", "Dollars of royalties credited to publishers."))
        self.published = r.add(Counter("kvmart_documents_published_total",
                                       "POST /v1/documents by outcome: computed, uploaded (verified), already stored, or refused."))
        r.add(Gauge("kvmart_documents", "Documents in the catalogue for the loaded model: the public ones (every one "
                    "when scraped with the admin key).", lambda: read_documents(_FULL_VIEW.get())))
        r.add(Gauge("kvmart_queue_active", "Requests the model worker is running.", read_active))
        r.add(Gauge("kvmart_queue_waiting", "Requests waiting for the model worker.", read_waiting))
        for key, kind, help_text in (("hits", Counter, "Hot tier (RAM) lookups that found the KV."),
                                     ("misses", Counter, "Hot tier (RAM) lookups that had to load from the store."),
                                     ("evictions", Counter, "KV caches evicted from the hot tier."),
                                     ("entries", Gauge, "KV caches held in the hot tier."),
                                     ("bytes", Gauge, "Bytes of KV held in the hot tier."),
                                     ("budget_bytes", Gauge, "The hot tier's byte budget (--ram-cache-bytes).")):
            suffix = "_total" if kind is Counter else ""
            r.add(kind(f"kvmart_hot_{key}{suffix}", help_text, lambda key=key: read_hot()[key]))

    def render(self, full: bool = False) -> str:
        """The exposition text; `full`: the admin's view (private documents counted)."""
        token = _FULL_VIEW.set(full)
        try:
            return self.registry.render()
        finally:
            _FULL_VIEW.reset(token)
