"""Tiers behind the one store interface: per-node RAM and disk in front of a shared tier (Redis or S3).

    read:   the fastest tier holding the artifact answers; a hit on a slower tier fills the faster ones, and what
            comes from a shared tier encoded (the `kvmart` codec) is decoded once and kept raw on the local tiers,
            so that every later load on this node maps it in place (kvmart/format/transcode.py: same cache id,
            same decoded-tensor checksums)
    write:  through to the shared tier first (it decides who published first: stored once), then the local tiers,
            decoded (raw) as a fetched artifact is kept
    budget: a local tier with a byte budget evicts by `Placement` score (cost-aware, pins kept) to make room

Whatever a shared tier returns was checked by it against the checksums in its index, and every artifact is checked
again in full (manifest, fingerprint, tensor checksums) by `artifact.read_artifact` before use.

A shared tier that cannot be reached (StoreUnavailableError) makes the store *degraded*, not failed: reads and
writes go on with the local tiers (a miss is a miss: the caller prefills), the shared tier is skipped until
`retry_seconds` have passed, and artifacts written meanwhile are pushed to it once it answers again."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO, TypeVar

from kvmart.errors import ArtifactError, StoreUnavailableError
from kvmart.store.base import Changes, Entry, Store, Writer
from kvmart.store.policy import Placement

log = logging.getLogger("kvmart.store")
T = TypeVar("T")


@dataclass
class Tier:
    """One level. `budget_bytes` 0: unbounded. `is_shared`: reached over the network, may be down."""

    name: str
    store: Store
    budget_bytes: int = 0
    is_shared: bool = False
    hits: int = 0
    fills: int = 0
    evictions: int = 0
    errors: int = 0
    retry_at: float = 0.0  # while > now: known down, skipped
    is_down: bool = False

    def stats(self) -> dict:
        return {"name": self.name, "healthy": not self.is_down, "hits": self.hits, "fills": self.fills,
                "evictions": self.evictions, "errors": self.errors, "budget_bytes": self.budget_bytes}


class TieredStore(Store):
    """Thread-safe (each tier is; counters are updated under a lock)."""

    def __init__(self, tiers: list[Tier], placement: Placement | None = None, retry_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert tiers, "a tiered store needs at least one tier"
        self.tiers, self.placement = tiers, placement or Placement()
        self.retry_seconds, self.clock = retry_seconds, clock
        self.misses = 0
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # cache ids written while the shared tier was down

    def __repr__(self) -> str:
        return "TieredStore(" + " -> ".join(f"{t.name}={t.store!r}" for t in self.tiers) + ")"

    # -- reaching a tier -----------------------------------------------------------------------------------------
    def _call(self, tier: Tier, action: Callable[[], T]) -> T:
        """Run `action` on `tier`; a shared tier known to be down fails fast until its retry time."""
        if tier.is_shared and tier.is_down and self.clock() < tier.retry_at:
            raise StoreUnavailableError(f"{tier.name} tier is down (retrying in {tier.retry_at - self.clock():.1f} s)")
        try:
            result = action()
        except StoreUnavailableError as e:
            with self._lock:
                tier.errors += 1
                if not tier.is_down:
                    log.warning("%s tier unreachable, serving from local tiers: %s", tier.name, e)
                tier.is_down, tier.retry_at = True, self.clock() + self.retry_seconds
            raise
        if tier.is_down:
            self._recovered(tier)
        return result

    def _recovered(self, tier: Tier) -> None:
        """The shared tier answers again: push what was written while it was down."""
        with self._lock:
            tier.is_down = False
            pending, self._pending = self._pending, set()
        log.warning("%s tier is back; pushing %d artifacts written meanwhile", tier.name, len(pending))
        for cache_id in pending:
            found = self._local_copy(cache_id)
            if found is not None:
                entry, data = found
                try:
                    tier.store.put(entry, _writer(data))
                except StoreUnavailableError:
                    with self._lock:
                        self._pending.add(cache_id)

    def _try(self, tier: Tier, action: Callable[[], T], default: T) -> T:
        """`action` on `tier`, or `default` if the tier is unreachable (shared tiers only)."""
        if not tier.is_shared:
            return action()
        try:
            return self._call(tier, action)
        except StoreUnavailableError:
            return default

    def health(self) -> dict:
        """{"degraded": bool, "tiers": [...]}. Pings each shared tier (a known-down one only once its retry time
        has come), so a load balancer polling /healthz sees an outage and the recovery without any traffic."""
        for tier in self.tiers:
            ping = getattr(tier.store, "ping", None)
            if tier.is_shared and ping is not None:
                self._try(tier, ping, None)
        return {"degraded": any(t.is_down for t in self.tiers), "tiers": [t.stats() for t in self.tiers],
                "misses": self.misses, "pending_pushes": len(self._pending)}

    # -- the store interface -------------------------------------------------------------------------------------
    def put(self, entry: Entry, write: Writer) -> Entry:
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        stored = Entry(**{**entry.as_dict(), "artifact_bytes": len(data)})
        pushed = False
        for tier in self.tiers:
            if tier.is_shared:
                try:
                    stored = self._call(tier, partial(tier.store.put, stored, _writer(data)))
                    pushed = True
                except StoreUnavailableError:
                    with self._lock:
                        self._pending.add(entry.cache_id)
        # this node's own copy raw, as a fetched one is kept (read: decoded once); one still to be pushed stays as
        # written, since the push sends the local copy
        local, local_entry = data, stored
        if pushed:
            local = _decoded(data)
            local_entry = Entry(**{**stored.as_dict(), "artifact_bytes": len(local)})
        for tier in self.tiers:
            if not tier.is_shared:
                self._put_local(tier, local_entry, local)
        return stored

    def _put_local(self, tier: Tier, entry: Entry, data: bytes) -> bool:
        """Store in a local tier, evicting by placement score to stay within its budget; False if it cannot fit."""
        if tier.budget_bytes:
            if len(data) > tier.budget_bytes:
                return False
            held = [e for e in tier.store.entries() if e.cache_id != entry.cache_id]
            overflow = sum(e.artifact_bytes for e in held) + len(data) - tier.budget_bytes
            victims = self.placement.victims(held, overflow)
            if victims is None:
                return False  # only pinned artifacts are left to evict
            for victim in victims:
                tier.store.delete(victim.cache_id)
            with self._lock:
                tier.evictions += len(victims)
        tier.store.put(entry, _writer(data))
        return True

    def _open(self, cache_id: str) -> tuple[BinaryIO, int] | None:
        located = self._open_located(cache_id)
        return None if located is None else located[:2]

    def _open_located(self, cache_id: str) -> tuple[BinaryIO, int, str] | None:
        for i, tier in enumerate(self.tiers):
            if i == 0:
                opened = self._try(tier, partial(tier.store._open, cache_id), None)
                if opened is not None:
                    self._hit(tier, cache_id)
                    return (*opened, tier.name)
                continue
            # with its entry, from one read of the tier's index where it keeps one (Redis, S3): the faster tiers
            # are filled with both
            found = self._try(tier, partial(tier.store._open_entry, cache_id), None)
            if found is None:
                continue
            self._hit(tier, cache_id)
            entry, f, size = found
            with f:
                data = f.read()
            if tier.is_shared:
                data = _decoded(data)
                entry = Entry(**{**entry.as_dict(), "artifact_bytes": len(data)})
            for faster in self.tiers[:i]:
                if not faster.is_shared and self._put_local(faster, entry, data):
                    with self._lock:
                        faster.fills += 1
            return io.BytesIO(data), len(data), tier.name
        with self._lock:
            self.misses += 1
        return None

    def _hit(self, tier: Tier, cache_id: str) -> None:
        self.placement.touch(cache_id)
        with self._lock:
            tier.hits += 1

    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def changes(self, cursor: str) -> Changes:
        """The shared tier's changes (what other nodes publish or remove goes through it; the local tiers change
        only by this node's own hand). No shared tier, or more than one: unknown (list everything). The shared tier
        unreachable: no news (what is known is kept until it answers again), or unknown if nothing is known yet."""
        shared = [t for t in self.tiers if t.is_shared]
        if len(shared) != 1:
            return Changes("", None)
        try:
            changes = self._call(shared[0], partial(shared[0].store.changes, cursor))
            for cache_id in dict.fromkeys(changes.cache_ids or ()):
                self._drop_if_removed(shared[0], cache_id)
        except StoreUnavailableError:
            return Changes(cursor, () if cursor else None)
        return changes

    def _drop_if_removed(self, shared: Tier, cache_id: str) -> None:
        """A document the shared tier's change log names: if this node's tiers hold it but the shared tier no longer
        does (another node deleted it), drop this node's copies, so that this node stops answering for it too. One
        written here while the shared tier was down (still to be pushed) is kept."""
        local = [t for t in self.tiers if not t.is_shared and t.store.entry(cache_id) is not None]
        with self._lock:
            pending = cache_id in self._pending
        if not local or pending or self._call(shared, partial(shared.store.entry, cache_id)) is not None:
            return
        for tier in local:
            tier.store.delete(cache_id)
        log.info("document %s was deleted on another node: dropped from this node's %s", cache_id[:16],
                 ", ".join(t.name for t in local))

    def _open_head(self, cache_id: str) -> tuple[BinaryIO, int] | None:
        """The artifact's start from the fastest tier that has it; nothing is filled (a node that learns of a
        document reads its header, not its tensors)."""
        for tier in self.tiers:
            opened = self._try(tier, partial(tier.store._open_head, cache_id), None)
            if opened is not None:
                return opened
        return None

    def _local_copy(self, cache_id: str) -> tuple[Entry, bytes] | None:
        for tier in self.tiers:
            if not tier.is_shared:
                entry, opened = tier.store.entry(cache_id), tier.store._open(cache_id)
                if entry is not None and opened is not None:
                    f, _ = opened
                    with f:
                        return entry, f.read()
        return None

    def entry(self, cache_id: str) -> Entry | None:
        for tier in self.tiers:
            found = self._try(tier, partial(tier.store.entry, cache_id), None)
            if found is not None:
                return found
        return None

    def entries(self) -> list[Entry]:
        merged: dict[str, Entry] = {}
        for tier in reversed(self.tiers):  # the faster tier's entry wins
            empty: list[Entry] = []
            for e in self._try(tier, tier.store.entries, empty):
                merged[e.cache_id] = e
        return sorted(merged.values(), key=lambda e: e.created_at, reverse=True)

    def delete(self, cache_id: str) -> bool:
        """From every tier; StoreUnavailableError if the shared tier cannot be reached (nothing pretends)."""
        removed = False
        for tier in sorted(self.tiers, key=lambda t: not t.is_shared):  # shared first: a failure removes nothing
            removed = (self._call(tier, partial(tier.store.delete, cache_id)) if tier.is_shared
                       else tier.store.delete(cache_id)) or removed
        with self._lock:
            self._pending.discard(cache_id)
        return removed

    # -- placement ------------------------------------------------------------------------------------------------
    def set_ttl_class(self, cache_id: str, ttl_class: str) -> None:
        """`5m`, `1h` or `pinned`, here and on shared tiers that keep TTLs (Redis)."""
        from kvmart.store.policy import ttl_seconds

        self.placement.set_ttl_class(cache_id, ttl_class)
        for tier in self.tiers:
            set_ttl = getattr(tier.store, "set_ttl", None)
            if tier.is_shared and set_ttl is not None:
                self._call(tier, partial(set_ttl, cache_id, ttl_seconds(ttl_class)))

    def sweep(self) -> int:
        """Drop expired artifacts from the local tiers (a shared tier expires its own); returns how many."""
        dropped = 0
        for tier in self.tiers:
            if not tier.is_shared:
                for entry in tier.store.entries():
                    if self.placement.is_expired(entry) and tier.store.delete(entry.cache_id):
                        dropped += 1
        return dropped


def _writer(data: bytes) -> Writer:
    return lambda f: f.write(data)


def _decoded(data: bytes) -> bytes:
    """`data` with every encoded tensor decoded (the same artifact, stored raw); `data` itself if nothing is encoded,
    or if it is no valid artifact (the reader then refuses it, saying why)."""
    from kvmart.format.artifact import read_manifest
    from kvmart.format.transcode import transcode

    try:
        manifest, _ = read_manifest(io.BytesIO(data), len(data))
        if all(record.codec == "raw" for record in manifest.tensors.values()):
            return data
        decoded = io.BytesIO()
        transcode(data, "raw").write(decoded)
    except ArtifactError as e:
        log.warning("kept a fetched artifact as it came, it could not be decoded: %s", e)
        return data
    return decoded.getvalue()
