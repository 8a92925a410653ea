"""An in-process store: artifacts as bytes in a dict. For tests and throwaway runs; gone when the process ends.
Ids are checked as every store checks them (`parse_cache_id`), so a test on it meets what a disk store would."""

from __future__ import annotations

import io
import threading
from typing import BinaryIO

from kvmart.format.keys import parse_cache_id
from kvmart.store.base import Entry, Store, Writer


class MemoryStore(Store):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[str, bytes] = {}
        self._entries: dict[str, Entry] = {}

    def __repr__(self) -> str:
        return "MemoryStore()"

    def put(self, entry: Entry, write: Writer) -> Entry:
        parse_cache_id(entry.cache_id)
        buffer = io.BytesIO()
        written = write(buffer)
        stored = Entry(**{**entry.as_dict(), "artifact_bytes": written})
        with self._lock:
            self._blobs[entry.cache_id] = buffer.getvalue()
            self._entries[entry.cache_id] = stored
        return stored

    def _open(self, cache_id: str) -> tuple[BinaryIO, int] | None:
        parse_cache_id(cache_id)
        with self._lock:
            blob = self._blobs.get(cache_id)
        return None if blob is None else (io.BytesIO(blob), len(blob))

    def entry(self, cache_id: str) -> Entry | None:
        parse_cache_id(cache_id)
        with self._lock:
            return self._entries.get(cache_id)

    def entries(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.created_at, reverse=True)

    def delete(self, cache_id: str) -> bool:
        parse_cache_id(cache_id)
        with self._lock:
            self._entries.pop(cache_id, None)
            return self._blobs.pop(cache_id, None) is not None
