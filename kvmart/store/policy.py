"""Placement: which artifacts a bounded tier keeps. Cost-aware eviction, pinning and TTL classes.

An artifact's value per byte of tier is the prefill it spares each time it is read, times how often it is read:

    score = recompute FLOPs saved per byte  x  recent popularity

FLOPs come from `kvmart.runtime.shapes` (the model's shape, linear and quadratic attention terms), so a long document,
whose prefill grows faster than its KV, is worth more per byte than a short one read as often. Popularity is an
exponentially decayed read count (half-life `half_life_seconds`) plus one, so a new artifact is not evicted
before it had a chance to be read. The lowest scores go first; pinned artifacts never go.

TTL classes, like the commercial prompt caches: `5m` and `1h` expire an artifact that was not read for that long
(each read restarts the clock); `pinned` (paid hot documents) never expires and is never evicted."""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmart.errors import ConfigError
from kvmart.runtime.shapes import lookup_shape, prefill_flops
from kvmart.store.base import Entry

TTL_CLASSES: dict[str, int] = {"5m": 300, "1h": 3600, "pinned": 0}  # seconds; 0: never expires
DEFAULT_TTL_CLASS = "1h"


def ttl_seconds(ttl_class: str) -> int:
    if ttl_class not in TTL_CLASSES:
        raise ConfigError(f"unknown TTL class {ttl_class!r}; known: {', '.join(TTL_CLASSES)}")
    return TTL_CLASSES[ttl_class]


@functools.lru_cache(maxsize=1 << 16)
def flops_per_byte(entry: Entry) -> float:
    """Prefill FLOPs an artifact spares per byte it occupies (its model's shape if known, else tokens per byte)."""
    size = max(entry.artifact_bytes, 1)
    shape = lookup_shape(entry.model)
    if shape is None:
        return entry.num_tokens / size
    return prefill_flops(shape, max(entry.num_tokens, 1)).total / size


@dataclass
class _Usage:
    reads: float  # decayed count, as of `at`
    at: float
    last_read: float
    ttl_class: str


class Placement:
    """Thread-safe. Records reads, pins and TTL classes by cache id, and picks eviction victims."""

    def __init__(self, half_life_seconds: float = 3600.0, default_ttl_class: str = DEFAULT_TTL_CLASS,
                 clock: Callable[[], float] = time.time) -> None:
        ttl_seconds(default_ttl_class)
        self.half_life_seconds, self.default_ttl_class, self.clock = half_life_seconds, default_ttl_class, clock
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}

    def _get(self, cache_id: str, now: float) -> _Usage:
        usage = self._usage.get(cache_id)
        if usage is None:
            usage = self._usage[cache_id] = _Usage(0.0, now, now, self.default_ttl_class)
        return usage

    def _decayed(self, usage: _Usage, now: float) -> float:
        return usage.reads * math.exp(-math.log(2) * max(0.0, now - usage.at) / self.half_life_seconds)

    def touch(self, cache_id: str) -> None:
        """Record one read (restarts its TTL clock)."""
        now = self.clock()
        with self._lock:
            usage = self._get(cache_id, now)
            usage.reads, usage.at, usage.last_read = self._decayed(usage, now) + 1.0, now, now

    def set_ttl_class(self, cache_id: str, ttl_class: str) -> None:
        """`5m`, `1h` or `pinned`."""
        ttl_seconds(ttl_class)
        with self._lock:
            self._get(cache_id, self.clock()).ttl_class = ttl_class

    def ttl_class(self, cache_id: str) -> str:
        with self._lock:
            usage = self._usage.get(cache_id)
            return usage.ttl_class if usage else self.default_ttl_class

    def is_pinned(self, cache_id: str) -> bool:
        return self.ttl_class(cache_id) == "pinned"

    def popularity(self, cache_id: str) -> float:
        now = self.clock()
        with self._lock:
            usage = self._usage.get(cache_id)
            return 1.0 + (self._decayed(usage, now) if usage else 0.0)

    def score(self, entry: Entry) -> float:
        """Higher is kept longer; infinite when pinned."""
        if self.is_pinned(entry.cache_id):
            return math.inf
        return flops_per_byte(entry) * self.popularity(entry.cache_id)

    def is_expired(self, entry: Entry) -> bool:
        """Not read within its TTL class (counted from its creation if never read here)."""
        ttl = TTL_CLASSES[self.ttl_class(entry.cache_id)]
        if ttl == 0:
            return False
        with self._lock:
            usage = self._usage.get(entry.cache_id)
            last = max(usage.last_read if usage else 0.0, entry.created_at)
        return self.clock() - last > ttl

    def victims(self, entries: list[Entry], free_bytes: int) -> list[Entry] | None:
        """The lowest-scoring unpinned entries whose bytes add up to at least `free_bytes`; None if even evicting
        every unpinned entry would not free that much (then nothing should be evicted)."""
        if free_bytes <= 0:
            return []
        chosen, freed = [], 0
        for entry in sorted(entries, key=lambda e: (self.score(e), e.created_at)):
            if freed >= free_bytes or self.is_pinned(entry.cache_id):
                break
            chosen.append(entry)
            freed += entry.artifact_bytes
        return chosen if freed >= free_bytes else None
