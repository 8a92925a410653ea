"""The Redis shared tier: artifacts split into size-limited chunk keys under an index, published atomically.

    PREFIX:chunk:<cache_id>:<nonce>:<i>   bytes i*chunk_bytes .. (i+1)*chunk_bytes of the artifact
    PREFIX:index:<cache_id>               JSON: the entry, size, chunk size, nonce, xxh3-128 of every chunk
    PREFIX:catalog                        a set of cache ids (lazily pruned of ids whose index is gone)
    PREFIX:generation                     how many times a document was stored or removed (a counter)
    PREFIX:changes                        a sorted set of "<n>:<cache_id>" by n: the last CHANGES_KEPT of those

A put writes every chunk under a fresh nonce, then the index with SET NX: readers see no index (absent) or a
complete artifact, never a partial one, and when two nodes publish the same cache id at once the first index wins
and the loser deletes its chunks, so the artifact is stored once. Publishing a document's index also counts a
change, in the same script: a node's catalogue asks for the changes since the last one it saw (`changes`: one
small reply when nothing changed) instead of listing every entry, and lists everything only when it has fallen
more than CHANGES_KEPT behind, when the counter went back (a Redis that lost its data), or under a TTL (an index
that expires leaves no change behind). A read checks every chunk against the index's
checksums; a chunk missing (evicted, expired, lost in a restart without persistence) or corrupt makes the whole
artifact absent (and its index is dropped so it can be republished): it is recomputed, never served partially.

TTLs (`ttl_seconds`, 0 = none: pinned) apply to the index and chunks alike and are refreshed on every read, as
the commercial prompt caches refresh theirs. Every connection failure is a StoreUnavailableError. When a cluster
signing key is set, every index is signed for its id, and an index or artifact (or head) without this cluster's
signature for the id asked for raises ArtifactError (kvmart/format/signing.py). Every id is checked before a key is
built from it (`parse_cache_id`); an index that is malformed (unparseable, fields of the wrong type, another id's
entry) is logged and dropped, as a broken chunk is: the artifact reads as absent and is recomputed, never a 500."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, cast

import xxhash

from kvmart.errors import ArtifactError, StoreError, StoreUnavailableError
from kvmart.format.artifact import check_fetched
from kvmart.format.keys import parse_cache_id
from kvmart.format.signing import cluster_key, sign_index
from kvmart.store.base import Changes, Entry, Store, Writer, parse_index, parse_listed_id

log = logging.getLogger("kvmart.store")
DEFAULT_CHUNK_BYTES = 8 << 20  # well under Redis' 512 MB value limit; small enough to stream in pieces
FETCH_BATCH = 16  # chunks per MGET: bounds one reply's size
INDEX_FIELDS: dict[str, type] = {"size": int, "chunk_bytes": int, "nonce": str, "chunks": list}
CHANGES_KEPT = 10_000  # document changes kept for catalogues that fell behind (beyond: they list everything)

# Publish an index (SET NX), add it to the catalogue set and, for a document, count the change: one atomic step,
# so no reader sees a document whose change is missing. KEYS: index, catalog, generation, changes; ARGV: the
# index's JSON, cache id, TTL seconds (0: none), "1" for a document, CHANGES_KEPT. Returns 1 if published, 0 if
# another writer's index was there first.
PUBLISH_SCRIPT = """
local ok
if tonumber(ARGV[3]) > 0 then ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3])
else ok = redis.call('SET', KEYS[1], ARGV[1], 'NX') end
if not ok then return 0 end
redis.call('SADD', KEYS[2], ARGV[2])
if ARGV[4] == '1' then  -- a document
  local n = redis.call('INCR', KEYS[3])
  redis.call('ZADD', KEYS[4], n, n .. ':' .. ARGV[2])
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[5]) - 1)
end
return 1
"""
# Count a document's removal. KEYS: generation, changes; ARGV: cache id, CHANGES_KEPT.
CHANGED_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], n, n .. ':' .. ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[2]) - 1)
return n
"""
# The changes after ARGV[1] (at most ARGV[2] of them): {generation} when there are none, else {generation, members}.
# KEYS: generation, changes.
CHANGES_SCRIPT = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n <= tonumber(ARGV[1]) then return {n} end
return {n, redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])}
"""


@dataclass(frozen=True)
class RedisConfig:
    """Where and how: `redis://[user:pass@]host:port/db?prefix=kvmart&chunk_bytes=8MiB&ttl_seconds=3600`."""

    url: str
    prefix: str = "kvmart"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ttl_seconds: int = 0
    timeout_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1 or self.ttl_seconds < 0 or self.timeout_seconds <= 0:
            raise StoreError(f"redis store: chunk_bytes must be >= 1, ttl_seconds >= 0, timeout > 0 ({self})")


class RedisStore(Store):
    def __init__(self, config: RedisConfig) -> None:
        import redis

        self.config = config
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._client = redis.Redis.from_url(config.url, socket_timeout=config.timeout_seconds,
                                            socket_connect_timeout=config.timeout_seconds)
        self._publish = self._client.register_script(PUBLISH_SCRIPT)
        self._changed = self._client.register_script(CHANGED_SCRIPT)
        self._changes = self._client.register_script(CHANGES_SCRIPT)

    def __repr__(self) -> str:
        return f"RedisStore({self.config.url!r}, prefix={self.config.prefix!r})"

    def _key(self, *parts: str) -> str:
        return ":".join((self.config.prefix, *parts))

    @contextmanager
    def _reach(self) -> Iterator[None]:
        """Translate connection failures into StoreUnavailableError."""
        try:
            yield
        except self._errors as e:
            raise StoreUnavailableError(f"redis at {self.config.url} is unreachable: {e}") from e

    def ping(self) -> None:
        """StoreUnavailableError unless the server answers."""
        with self._reach():
            self._client.ping()

    def put(self, entry: Entry, write: Writer) -> Entry:
        parse_cache_id(entry.cache_id)
        buffer = io.BytesIO()
        size = write(buffer)
        data = buffer.getbuffer()
        step, nonce, ttl = self.config.chunk_bytes, secrets.token_hex(8), self.config.ttl_seconds or None
        chunk_keys = [self._key("chunk", entry.cache_id, nonce, str(i)) for i in range(max(1, -(-size // step)))]
        stored = Entry(**{**entry.as_dict(), "artifact_bytes": size})
        index = {"entry": stored.as_dict(), "size": size, "chunk_bytes": step, "nonce": nonce,
                 "chunks": [xxhash.xxh3_128_hexdigest(data[i * step:(i + 1) * step]) for i in range(len(chunk_keys))]}
        signing_key = cluster_key()
        if signing_key is not None:
            index["signature"] = sign_index(signing_key, entry.cache_id, index)
        with self._reach():
            pipe = self._client.pipeline(transaction=False)
            for i, key in enumerate(chunk_keys):
                pipe.set(key, bytes(data[i * step:(i + 1) * step]), ex=ttl)
            pipe.execute()
            keys = [self._key("index", entry.cache_id), self._key("catalog"), *self._change_keys()]
            args: list[str | int] = [json.dumps(index), entry.cache_id, ttl or 0, int(entry.is_document), CHANGES_KEPT]
            if self._publish(keys=keys, args=args):
                return stored
            self._client.delete(*chunk_keys)  # another writer published it first: keep theirs
        existing = self.entry(entry.cache_id)
        return existing if existing is not None else stored

    def _index(self, cache_id: str) -> dict | None:
        """The index of `cache_id`, None if it is absent or malformed (then dropped); ArtifactError if it is not
        signed with the cluster's key for this id (left alone: a node with a wrong key must not delete good ones)."""
        with self._reach():
            raw = self._client.get(self._key("index", parse_cache_id(cache_id)))
        if raw is None:
            return None
        try:
            index = parse_index(raw, "redis", cache_id, INDEX_FIELDS)
        except StoreError as e:
            self._drop_broken(cache_id, None, -1, f"its index is malformed ({e})")
            return None
        if (not index["chunks"] or not all(isinstance(c, str) for c in index["chunks"]) or index["size"] < 0
                or not re.fullmatch("[0-9a-f]{16}", index["nonce"])):
            self._drop_broken(cache_id, index, -1, "its index lists no valid chunks")
            return None
        return index

    def _open(self, cache_id: str) -> tuple[BinaryIO, int] | None:
        index = self._index(cache_id)
        return None if index is None else self._read(cache_id, index)

    def _open_entry(self, cache_id: str) -> tuple[Entry, BinaryIO, int] | None:
        """The artifact and its entry from one read of the index."""
        index = self._index(cache_id)
        opened = self._read(cache_id, index) if index is not None else None
        return None if index is None or opened is None else (Entry(**index["entry"]), *opened)

    def _read(self, cache_id: str, index: dict) -> tuple[BinaryIO, int] | None:
        """The artifact's bytes under `index`, every chunk checked; None (and the index dropped) if one is gone."""
        keys = [self._key("chunk", cache_id, index["nonce"], str(i)) for i in range(len(index["chunks"]))]
        data = bytearray()
        with self._reach():
            for start in range(0, len(keys), FETCH_BATCH):
                blobs = cast(list[bytes | None], self._client.mget(keys[start:start + FETCH_BATCH]))
                for i, blob in enumerate(blobs, start):
                    if blob is None or xxhash.xxh3_128_hexdigest(blob) != index["chunks"][i]:
                        self._drop_broken(cache_id, index, i, "missing" if blob is None else "corrupt")
                        return None
                    data += blob
            self._refresh_ttl(cache_id, keys)
        if len(data) != index["size"]:
            self._drop_broken(cache_id, index, -1, f"{len(data)} bytes instead of {index['size']}")
            return None
        check_fetched(data, len(data), cache_id)
        return io.BytesIO(data), len(data)

    def _open_head(self, cache_id: str) -> tuple[BinaryIO, int] | None:
        """The first chunk (checked), which holds the header unless the header is larger than a chunk."""
        index = self._index(cache_id)
        if index is None:
            return None
        with self._reach():
            blob = cast(bytes | None, self._client.get(self._key("chunk", cache_id, index["nonce"], "0")))
        if blob is None or xxhash.xxh3_128_hexdigest(blob) != index["chunks"][0]:
            return self._read(cache_id, index)  # let the full read find and report the damage
        if len(blob) < 8 or 8 + struct.unpack("<Q", blob[:8])[0] > len(blob):
            return self._read(cache_id, index)  # a header longer than a chunk
        check_fetched(blob, index["size"], cache_id)
        return io.BytesIO(blob), index["size"]

    def _drop_broken(self, cache_id: str, index: dict | None, chunk: int, why: str) -> None:
        where = f"chunk {chunk}" if chunk >= 0 else "artifact"
        log.warning("redis artifact %s: %s %s; treated as absent (it will be recomputed)", cache_id[:16], where, why)
        with self._reach():
            self._client.delete(self._key("index", cache_id))
            self._client.srem(self._key("catalog"), cache_id)
            self._count_removal(cache_id, index)

    def _change_keys(self) -> list[str]:
        return [self._key("generation"), self._key("changes")]

    def _count_removal(self, cache_id: str, index: dict | None) -> None:
        """Count a removed document as a change (a chunk is no catalogue's business; an index too malformed to
        say what it was is counted, so that catalogues look again)."""
        entry = index.get("entry") if isinstance(index, dict) else None
        if not isinstance(entry, dict) or entry.get("kind", "document") == "document":
            self._changed(keys=self._change_keys(), args=[cache_id, CHANGES_KEPT])

    def changes(self, cursor: str) -> Changes:
        """The documents stored or removed after `cursor` (a count of changes), in one small script call. Unknown
        (None) for a new cursor, one the log no longer reaches back to, one beyond the counter (the data was
        lost), or under a TTL (expired documents leave no change behind)."""
        with self._reach():
            if not cursor.isdigit():
                return Changes(str(int(self._client.get(self._key("generation")) or 0)), None)
            since = int(cursor)
            reply = self._changes(keys=self._change_keys(), args=[since, CHANGES_KEPT])
        now = int(reply[0])
        if now == since and not self.config.ttl_seconds:
            return Changes(cursor, ())
        members = [m.decode() if isinstance(m, bytes) else str(m) for m in (reply[1] if len(reply) > 1 else [])]
        numbers = [int(m.split(":", 1)[0]) for m in members]
        if now < since or numbers != list(range(since + 1, now + 1)) or self.config.ttl_seconds:
            return Changes(str(now), None)
        return Changes(str(now), tuple(m.split(":", 1)[1] for m in members))

    def _refresh_ttl(self, cache_id: str, chunk_keys: list[str]) -> None:
        if self.config.ttl_seconds:
            pipe = self._client.pipeline(transaction=False)
            for key in (self._key("index", cache_id), *chunk_keys):
                pipe.expire(key, self.config.ttl_seconds)
            pipe.execute()

    def entry(self, cache_id: str) -> Entry | None:
        """The entry, or None if absent, malformed or (with a cluster key) not signed for this id (logged)."""
        try:
            index = self._index(cache_id)
        except ArtifactError as e:
            log.warning("%s", e)
            return None
        return None if index is None else Entry(**index["entry"])

    def entries(self) -> list[Entry]:
        """Every readable entry; members of the catalogue that are not cache ids, and indexes that are malformed
        or not signed with the cluster's key, are skipped and logged."""
        with self._reach():
            members = [m.decode(errors="replace")
                       for m in cast(set[bytes], self._client.smembers(self._key("catalog")))]
        ids = []
        for member in sorted(members):
            if parse_listed_id(member, "redis") is None:
                log.warning("redis catalogue lists %r, which is not a cache id; skipped", member[:80])
            else:
                ids.append(member)
        with self._reach():
            raws = self._client.mget([self._key("index", c) for c in ids]) if ids else []
            gone = [c for c, raw in zip(ids, raws, strict=True) if raw is None]
            if gone:  # expired or evicted: prune the set
                self._client.srem(self._key("catalog"), *gone)
        found = []
        for cache_id, raw in zip(ids, raws, strict=True):
            if raw is not None:
                try:
                    found.append(Entry(**parse_index(raw, "redis", cache_id, INDEX_FIELDS)["entry"]))
                except (StoreError, ArtifactError) as e:
                    log.warning("%s; skipped", e)
        return sorted(found, key=lambda e: e.created_at, reverse=True)

    def delete(self, cache_id: str) -> bool:
        try:
            index = self._index(cache_id)
        except ArtifactError:  # not signed by this cluster: asked to delete it, the index goes (its chunks expire)
            with self._reach():
                self._client.srem(self._key("catalog"), cache_id)
                return bool(self._client.delete(self._key("index", cache_id)))
        with self._reach():
            self._client.srem(self._key("catalog"), cache_id)
            if index is None:
                return False
            keys = [self._key("chunk", cache_id, index["nonce"], str(i)) for i in range(len(index["chunks"]))]
            removed = bool(self._client.delete(self._key("index", cache_id), *keys))
            if removed:
                self._count_removal(cache_id, index)
            return removed

    def set_ttl(self, cache_id: str, ttl_seconds: int) -> bool:
        """Give an artifact a TTL (0: pinned, no expiry); False if it is absent."""
        try:
            index = self._index(cache_id)
        except ArtifactError:
            return False
        if index is None:
            return False
        keys = [self._key("index", cache_id)]
        keys += [self._key("chunk", cache_id, index["nonce"], str(i)) for i in range(len(index["chunks"]))]
        with self._reach():
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.expire(key, ttl_seconds) if ttl_seconds else pipe.persist(key)
            pipe.execute()
        return True
