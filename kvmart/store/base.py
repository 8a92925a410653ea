"""The store interface: where artifacts live, keyed by cache id, with a small metadata entry beside each."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from typing import BinaryIO

from kvmart.errors import InvalidIdError, StoreError, UnknownCacheError
from kvmart.format.keys import parse_cache_id
from kvmart.format.signing import check_index, cluster_key


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

    @classmethod
    def parse(cls, data: object, cache_id: str) -> "Entry":
        """The entry `data` (read from a file or a shared tier) describes, which must be that of `cache_id`;
        StoreError saying what is wrong (a field missing, of the wrong type, or another artifact's id)."""
        if not isinstance(data, dict):
            raise StoreError(f"the entry of {cache_id[:16]} is a JSON {type(data).__name__}, not an object")
        if not REQUIRED_FIELDS <= set(data) <= set(ENTRY_TYPES):
            raise StoreError(f"the entry of {cache_id[:16]} has fields {sorted(data)}, expected "
                             f"{sorted(REQUIRED_FIELDS)} and any of {sorted(set(ENTRY_TYPES) - REQUIRED_FIELDS)}")
        wrong = [k for k, kinds in ENTRY_TYPES.items()
                 if k in data and (isinstance(data[k], bool) or not isinstance(data[k], kinds))]
        if wrong:
            raise StoreError(f"the entry of {cache_id[:16]} has fields of the wrong type: {', '.join(wrong)}")
        if data.get("kind", "document") not in ENTRY_KINDS:
            raise StoreError(f"the entry of {cache_id[:16]} is of kind {str(data['kind'])[:20]!r}, not one of "
                             f"{', '.join(ENTRY_KINDS)}")
        if data["cache_id"] != cache_id:
            raise StoreError(f"the entry stored as {cache_id[:16]} describes another artifact "
                             f"({str(data['cache_id'])[:16]!r})")
        return cls(**data)


_KINDS: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float)}
ENTRY_TYPES: dict[str, type | tuple[type, ...]] = {f.name: _KINDS[str(f.type)] for f in fields(Entry)}
# entries written before format 3 have no kind, owner or kv_bytes (their defaults apply): they stay readable
REQUIRED_FIELDS = frozenset(f.name for f in fields(Entry) if f.default is MISSING)
ENTRY_KINDS = ("document", "chunk")


Writer = Callable[[BinaryIO], int]
STORE_TIER = "store"  # the tier name a store without tiers reports (`Store.tier_names`)


@dataclass(frozen=True)
class Changes:
    """The documents stored or removed since a cursor (`Store.changes`). `cache_ids` None: the store cannot tell
    (it keeps no change log, the log was trimmed past the cursor, or the cursor is new): list everything once."""

    cursor: str  # where the next look starts: pass it back to `changes`
    cache_ids: tuple[str, ...] | None


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

    def _open_entry(self, cache_id: str) -> tuple[Entry, BinaryIO, int] | None:
        """The artifact (as `_open`) and its entry, for a caller that keeps a copy (a tiered store filling a faster
        tier). Two lookups by default; a store that keeps the entry in the artifact's index (Redis, S3) reads that
        index once."""
        entry = self.entry(cache_id)
        opened = self._open(cache_id) if entry is not None else None
        return None if entry is None or opened is None else (entry, *opened)

    def _open_located(self, cache_id: str) -> tuple[BinaryIO, int, str] | None:
        """The artifact (as `_open`) and the name of the tier that answered (one of `tier_names`)."""
        opened = self._open(cache_id)
        return None if opened is None else (*opened, STORE_TIER)

    def tier_names(self) -> tuple[str, ...]:
        """The names of this store's tiers, fastest first (`_open_located` answers one of them)."""
        return (STORE_TIER,)

    def changes(self, cursor: str) -> Changes:
        """The documents (entries of kind `document`) stored or removed since `cursor` ('': none yet), so that a
        catalogue learns what changed without listing every entry. Thread-safe. A store without a change log
        answers `cache_ids` None every time: its callers list everything (`entries`)."""
        return Changes("", None)

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


def parse_index(raw: bytes | str, tier: str, cache_id: str, fields_of: dict[str, type]) -> dict:
    """A shared tier's JSON index of one artifact: its `entry` an Entry of exactly `cache_id`, each other field of
    the type `fields_of` gives. StoreError if it is malformed (anyone's node would find it so); ArtifactError if
    a cluster signing key is set and the index is not signed with it for this id (kvmart/format/signing.py), so
    that an index copied from another id, or written by someone without the key, is never believed."""
    try:
        index = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{tier} index of {cache_id[:16]} is not JSON: {e}") from e
    if not isinstance(index, dict) or set(index) - {"signature"} != {"entry", *fields_of}:
        raise StoreError(f"{tier} index of {cache_id[:16]} does not have the fields of an index")
    wrong = [k for k, kind in fields_of.items() if isinstance(index[k], bool) or not isinstance(index[k], kind)]
    if wrong:
        raise StoreError(f"{tier} index of {cache_id[:16]} has fields of the wrong type: {', '.join(wrong)}")
    Entry.parse(index["entry"], cache_id)
    key = cluster_key()
    if key is not None:
        check_index(key, cache_id, {k: v for k, v in index.items() if k != "signature"}, index.get("signature"))
    return index


def parse_listed_id(value: str, tier: str) -> str | None:
    """An id a shared tier lists (a catalogue member, an object name), or None (logged by the caller's logger)
    when it is not a cache id: skipped, never used to build a key."""
    try:
        return parse_cache_id(value, f"{tier} listing's id")
    except InvalidIdError:
        return None

