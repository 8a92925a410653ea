"""The hot tier: chunks' KV kept in RAM by chained key (kvmart/reuse/chunks.py), least recently used evicted first,
within a byte budget. A hit costs nothing; a miss is a load from the store (read + verify) or a forward pass, after
which the chunk is kept here. Besides published documents' chunks, it holds the automatic prefix cache: chunks
computed while serving a request (a system prompt, a conversation so far), under the requesting tenant's salt.

Sharing one KV between concurrent requests is safe: a KV is immutable and every request builds its own
WorkingCache around the chunks it reads."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from kvmart.runtime.kv import KV


@dataclass(frozen=True)
class HotStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    budget_bytes: int


class HotTier:
    """Thread-safe LRU of chunk KVs by key. A KV larger than the whole budget is never kept."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[str, KV] = OrderedDict()
        self._bytes = self._hits = self._misses = self._evictions = 0

    def get(self, key: str) -> KV | None:
        """The chunk's KV, now the most recently used; None (a miss) if it is not in RAM."""
        with self._lock:
            kv = self._items.get(key)
            if kv is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return kv

    def put(self, key: str, kv: KV) -> bool:
        """Keep `kv` under `key`, evicting the least recently used until it fits; False if it cannot fit at all."""
        size = kv.nbytes
        if size > self.budget_bytes:
            return False
        with self._lock:
            previous = self._items.pop(key, None)
            if previous is not None:
                self._bytes -= previous.nbytes
            while self._bytes + size > self.budget_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._evictions += 1
            self._items[key] = kv
            self._bytes += size
            return True

    def discard(self, key: str) -> None:
        with self._lock:
            kv = self._items.pop(key, None)
            if kv is not None:
                self._bytes -= kv.nbytes

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def stats(self) -> HotStats:
        with self._lock:
            return HotStats(self._hits, self._misses, self._evictions, len(self._items), self._bytes,
                            self.budget_bytes)
