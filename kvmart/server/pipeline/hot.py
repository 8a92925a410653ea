"""The hot tier: decoded KV caches kept in RAM, least recently used evicted first, within a byte budget. A hit
costs nothing; a miss is a load from the store (read + verify), after which the KV is kept here.

Sharing one KV between concurrent requests is safe: a KV is immutable and every request builds its own
WorkingCache around it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from kvmart.reuse.core import Loaded


@dataclass(frozen=True)
class HotStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    budget_bytes: int


class HotTier:
    """Thread-safe LRU of `Loaded` documents by cache id. A KV larger than the whole budget is never kept."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[str, Loaded] = OrderedDict()
        self._bytes = self._hits = self._misses = self._evictions = 0

    def get(self, cache_id: str) -> Loaded | None:
        """The loaded document, now the most recently used; None (a miss) if it is not in RAM."""
        with self._lock:
            loaded = self._items.get(cache_id)
            if loaded is None:
                self._misses += 1
                return None
            self._items.move_to_end(cache_id)
            self._hits += 1
            return loaded

    def put(self, loaded: Loaded) -> bool:
        """Keep `loaded`, evicting the least recently used until it fits; False if it cannot fit at all."""
        size = loaded.kv.nbytes
        if size > self.budget_bytes:
            return False
        with self._lock:
            previous = self._items.pop(loaded.entry.cache_id, None)
            if previous is not None:
                self._bytes -= previous.kv.nbytes
            while self._bytes + size > self.budget_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.kv.nbytes
                self._evictions += 1
            self._items[loaded.entry.cache_id] = loaded
            self._bytes += size
            return True

    def discard(self, cache_id: str) -> None:
        with self._lock:
            loaded = self._items.pop(cache_id, None)
            if loaded is not None:
                self._bytes -= loaded.kv.nbytes

    def __contains__(self, cache_id: str) -> bool:
        with self._lock:
            return cache_id in self._items

    def stats(self) -> HotStats:
        with self._lock:
            return HotStats(self._hits, self._misses, self._evictions, len(self._items), self._bytes,
                            self.budget_bytes)
