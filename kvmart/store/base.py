"""The store interface: where artifacts live, keyed by cache id, with a small metadata entry beside each."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import BinaryIO

from kvmart.errors import StoreError, UnknownCacheError


@dataclass(frozen=True)
class Entry:
    """What the catalogue knows of an artifact without opening it."""

    cache_id: str
    title: str
    source: str
    model: str
    fingerprint: str
    num_tokens: int
    artifact_bytes: int
    prefill_seconds: float
    created_at: float
    kind: str = "document"  # document: a document's index (or its whole KV); chunk: one chunk of a chunk chain
    owner: str = ""  # a chunk's first document (its cache id), whose licence prices automatic reads of it
    kv_bytes: int = 0  # a document's chunks' bytes when it was stored (its own artifact is only an index)

    @property
    def is_document(self) -> bool:
        return self.kind == "document"

    def as_dict(self) -> dict:
        return asdict(self)


Writer = Callable[[BinaryIO], int]


class Store(ABC):
    """A collection of artifacts. Implementations are safe to use from several threads; `put` is atomic: readers
    see either no artifact or the whole one, never a partial write, even if the writer dies midway."""

    @abstractmethod
    def put(self, entry: Entry, write: Writer) -> Entry:
        """Store an artifact by calling `write(f)` on a temporary file, then publishing it under entry.cache_id."""

    @abstractmethod
    def _open(self, cache_id: str) -> tuple[BinaryIO, int] | None:
        """A binary file positioned at 0 and its size, or None if absent."""

    @abstractmethod
    def entry(self, cache_id: str) -> Entry | None:
        """The metadata entry of `cache_id`, or None."""

    @abstractmethod
    def entries(self) -> list[Entry]:
        """Every entry, newest first."""

    @abstractmethod
    def delete(self, cache_id: str) -> bool:
        """Remove an artifact and its entry; True if something was removed."""

    @contextmanager
    def open(self, cache_id: str) -> Iterator[tuple[BinaryIO, int]]:
        """(file, size_bytes) of an artifact; raises UnknownCacheError if absent."""
        with _opened(self._open(cache_id), cache_id) as found:
            yield found

    @contextmanager
    def open_head(self, cache_id: str) -> Iterator[tuple[BinaryIO, int]]:
        """(file, size_bytes) where the file holds at least the artifact's start (its header), for reading a
        manifest without fetching the tensors. A store that is not local overrides `_open_head` to fetch only
        the start; by default the whole artifact is opened. Raises UnknownCacheError if absent."""
        with _opened(self._open_head(cache_id), cache_id) as found:
            yield found

    def _open_head(self, cache_id: str) -> tuple[BinaryIO, int] | None:
        return self._open(cache_id)

    def resolve(self, prefix: str) -> str:
        """The one cache id starting with `prefix` (at least 6 hex chars); UnknownCacheError otherwise."""
        if len(prefix) < 6:
            raise UnknownCacheError(f"cache id {prefix!r} is too short: give at least 6 characters")
        matches = [e.cache_id for e in self.entries() if e.is_document and e.cache_id.startswith(prefix)]
        if len(matches) > 1:
            raise UnknownCacheError(f"cache id {prefix!r} is ambiguous: it matches {len(matches)} artifacts")
        if not matches:
            raise UnknownCacheError(f"no artifact with cache id {prefix!r} in this store (see `kvmart ls`)")
        return matches[0]


@contextmanager
def _opened(opened: tuple[BinaryIO, int] | None, cache_id: str) -> Iterator[tuple[BinaryIO, int]]:
    """An opened (file, size), closed afterwards; UnknownCacheError where nothing was found."""
    if opened is None:
        raise UnknownCacheError(f"no artifact with cache id {cache_id!r} in this store")
    f, size = opened
    try:
        yield f, size
    finally:
        f.close()


def parse_index(raw: bytes | str, tier: str, cache_id: str) -> dict:
    """A shared tier's JSON index of one artifact (its `entry` checked to be an Entry); StoreError if unreadable."""
    try:
        index = json.loads(raw)
        Entry(**index["entry"])
        return index
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{tier} index of {cache_id[:16]} is unreadable: {e}") from e
