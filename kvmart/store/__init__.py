"""Stores by URL: `open_store(url)` picks the implementation from the scheme in `SCHEMES`.

    /path/to/dir or file:///path   DiskStore (the embedded default)
    memory://                      MemoryStore (tests, throwaway runs)"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .base import Entry, Store

SCHEMES = ("file", "memory")


def open_store(url: str) -> Store:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "file", url
    if scheme == "file":
        from .disk import DiskStore

        return DiskStore(Path(rest).expanduser())
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore()
    raise ConfigError(f"unknown store scheme {scheme!r} in {url!r}; known schemes: {', '.join(SCHEMES)}")


__all__ = ["Entry", "Store", "open_store", "SCHEMES"]
