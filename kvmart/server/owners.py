"""Who may delete a document: the API key that first published it. Until accounts exist (the ledger), a caller is
known only by the sha256 of the key it sends (`Authorization: Bearer ...` or `x-api-key`); the key itself is
never stored. Records live in one JSON file in the data dir, so they survive restarts."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from starlette.datastructures import Headers


def caller_key_hash(headers: Headers) -> str | None:
    """sha256 of the caller's API key, or None for an anonymous caller."""
    auth = headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "").strip()
    return hashlib.sha256(key.encode()).hexdigest() if key else None


class Owners:
    """cache id -> publisher's key hash. Thread-safe; writes are atomic (temp file + rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._owners: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

    def owner(self, cache_id: str) -> str | None:
        with self._lock:
            return self._owners.get(cache_id)

    def claim(self, cache_id: str, key_hash: str | None) -> None:
        """Record `key_hash` as the owner of `cache_id` unless it already has one (the first publisher keeps it)."""
        if key_hash is None:
            return
        with self._lock:
            if cache_id not in self._owners:
                self._owners[cache_id] = key_hash
                self._save()

    def forget(self, cache_id: str) -> None:
        with self._lock:
            if self._owners.pop(cache_id, None) is not None:
                self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".json.tmp", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self._owners, f, sort_keys=True)
        os.replace(tmp, self.path)
