"""The shared tiers and the tiered store: the store contract over a real Redis server and over moto's standalone
S3-compatible server (labelled: moto, not AWS), atomic and once-only publishing, integrity of what comes back
(missing or corrupt chunks are absent, never partial), TTLs, and the tiered store's fill, write-through,
budgets and degraded mode around a shared tier that goes down and comes back."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from infra_support import BUCKET, RedisServer, fake_aws_credentials, moto_s3, redis_server  # noqa: F401 (fixtures)

from kvmart.errors import ConfigError, StoreUnavailableError, UnknownCacheError
from kvmart.store import Entry, Store, open_shared, open_store
from kvmart.store.base import Changes
from kvmart.store.disk import DiskStore
from kvmart.store.memory import MemoryStore
from kvmart.store.policy import Placement
from kvmart.store.tiered import Tier, TieredStore


def cid(prefix: str) -> str:
    return (prefix + "0123456789abcdef" * 4)[:64]


def entry(cache_id: str, created_at: float = 1000.0, title: str = "doc", model: str = "builtin:tiny") -> Entry:
    return Entry(cache_id=cache_id, title=title, source="", model=model, fingerprint="f" * 64, num_tokens=3,
                 artifact_bytes=0, prefill_seconds=0.5, created_at=created_at)


def writer(payload: bytes):
    return lambda f: f.write(payload)


def read_back(store: Store, cache_id: str) -> bytes:
    with store.open(cache_id) as (f, size):
        data = f.read()
    assert size == len(data)
    return data


_counter = iter(range(10**6))


def fresh_prefix() -> str:
    return f"t{next(_counter)}"


def redis_store(server: RedisServer, **options: str) -> Store:
    query = "&".join(f"{k}={v}" for k, v in {"prefix": fresh_prefix(), **options}.items())
    return open_shared(f"{server.url}?{query}")


@pytest.fixture(params=["redis", "s3 (moto server)"])
def shared(request):
    """A fresh, empty namespace on a shared tier."""
    if request.param == "redis":
        return redis_store(request.getfixturevalue("redis_server"), chunk_bytes="7")
    server = request.getfixturevalue("moto_s3")
    return open_shared(f"s3://{BUCKET}/{fresh_prefix()}?endpoint={server.endpoint}")


# -- the contract, on each shared tier -----------------------------------------------------------------------------
def test_put_open_entries_delete(shared):
    a, b = cid("aa11"), cid("bb22")
    stored = shared.put(entry(a, 1000.0), writer(b"artifact bytes, several chunks long"))
    shared.put(entry(b, 2000.0, "second"), writer(b"b"))
    assert stored.artifact_bytes == len(b"artifact bytes, several chunks long")
    assert read_back(shared, a) == b"artifact bytes, several chunks long"
    assert shared.entry(a) == stored
    assert [e.cache_id for e in shared.entries()] == [b, a]  # newest first
    assert shared.resolve(a[:8]) == a
    assert shared.delete(a) is True and shared.delete(a) is False
    assert shared.entry(a) is None and [e.cache_id for e in shared.entries()] == [b]
    with pytest.raises(UnknownCacheError), shared.open(a):
        pass


def test_a_failed_write_publishes_nothing(shared):
    def dies(f):
        f.write(b"half an artifact")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        shared.put(entry(cid("dead")), dies)
    assert shared.entry(cid("dead")) is None and shared.entries() == []


def test_two_publishers_store_once(shared):
    """The first index wins; the second publisher gets the first's entry and its bytes are not kept."""
    first = shared.put(entry(cid("cc33"), 1.0, "first"), writer(b"first copy"))
    second = shared.put(entry(cid("cc33"), 2.0, "second"), writer(b"second copy"))
    assert second == first and read_back(shared, cid("cc33")) == b"first copy"


def test_concurrent_publishers_store_once(redis_server):
    store = redis_store(redis_server, chunk_bytes="4")
    barrier, results = threading.Barrier(4), []

    def publish(n: int) -> None:
        barrier.wait()
        results.append(store.put(entry(cid("dd44"), float(n), f"writer {n}"), writer(f"copy {n}".encode())))

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.title for r in results}) == 1  # every writer was told the same winner
    winner = results[0].title.removeprefix("writer ")
    assert read_back(store, cid("dd44")) == f"copy {winner}".encode()
    chunk_keys = redis_server.client().keys(f"{store.config.prefix}:chunk:*")
    assert len(chunk_keys) == 2  # one artifact's chunks (6 bytes in 4-byte chunks); the losers' were deleted


def test_redis_missing_chunk_is_absent_not_partial(redis_server):
    store = redis_store(redis_server, chunk_bytes="4")
    store.put(entry(cid("ee55")), writer(b"0123456789ab"))
    client = redis_server.client()
    client.delete(sorted(client.keys(f"{store.config.prefix}:chunk:*"))[1])
    assert store._open(cid("ee55")) is None
    assert store.entry(cid("ee55")) is None  # the broken index is dropped, so the artifact can be republished
    store.put(entry(cid("ee55")), writer(b"0123456789ab"))
    assert read_back(store, cid("ee55")) == b"0123456789ab"


def test_redis_corrupt_chunk_is_absent(redis_server):
    store = redis_store(redis_server, chunk_bytes="4")
    store.put(entry(cid("ff66")), writer(b"0123456789ab"))
    client = redis_server.client()
    key = sorted(client.keys(f"{store.config.prefix}:chunk:*"))[0]
    client.set(key, b"XXXX")  # same length, other bytes
    assert store._open(cid("ff66")) is None


def test_s3_corrupt_object_is_absent(moto_s3):
    import boto3

    store = open_shared(f"s3://{BUCKET}/{fresh_prefix()}?endpoint={moto_s3.endpoint}")
    store.put(entry(cid("ab12")), writer(b"0123456789ab"))
    client = boto3.client("s3", endpoint_url=moto_s3.endpoint, region_name="us-east-1")
    obj = next(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=store.config.prefix)["Contents"]
               if o["Key"].endswith(".kvm"))
    client.put_object(Bucket=BUCKET, Key=obj, Body=b"0123456789aX")
    assert store._open(cid("ab12")) is None and store.entry(cid("ab12")) is None


def test_redis_ttl_and_pinning(redis_server):
    store = redis_store(redis_server, ttl="5m")
    store.put(entry(cid("a1")), writer(b"x" * 10))
    client = redis_server.client()
    keys = client.keys(f"{store.config.prefix}:index:*") + client.keys(f"{store.config.prefix}:chunk:*")
    assert keys and all(0 < client.ttl(k) <= 300 for k in keys)
    assert store.set_ttl(cid("a1"), 0) is True  # pinned
    assert all(client.ttl(k) == -1 for k in keys)
    assert store.set_ttl(cid("b2"), 0) is False


def calls(server: RedisServer) -> dict[str, int]:
    """Commands Redis has answered since the last reset, by name (INFO commandstats)."""
    return {name.removeprefix("cmdstat_"): stats["calls"]
            for name, stats in server.client().info("commandstats").items()}


def test_redis_change_log_names_each_document_stored_or_removed_once(redis_server):
    store = redis_store(redis_server)
    start = store.changes("")
    assert start.cache_ids is None  # a new cursor: list everything once
    a, b, piece = cid("c1"), cid("c2"), cid("c3")
    store.put(entry(a), writer(b"a"))
    store.put(replace(entry(piece), kind="chunk"), writer(b"a chunk"))  # a chunk is no catalogue's business
    store.put(entry(a), writer(b"a again"))  # already stored: nothing changes
    store.put(entry(b), writer(b"b"))
    seen = store.changes(start.cursor)
    assert seen.cache_ids == (a, b)
    assert store.changes(seen.cursor) == replace(seen, cache_ids=())
    store.delete(a)
    assert store.changes(seen.cursor).cache_ids == (a,)


def test_redis_change_log_asks_for_a_listing_when_it_cannot_tell(redis_server, monkeypatch):
    import kvmart.store.redis as redis_tier

    monkeypatch.setattr(redis_tier, "CHANGES_KEPT", 2)
    store = redis_store(redis_server)
    cursor = store.changes("").cursor
    for n in range(4):
        store.put(entry(cid(f"d{n}")), writer(b"x"))
    assert store.changes(cursor).cache_ids is None  # trimmed past the cursor: 4 changes, 2 kept
    late = store.changes(store.changes(cursor).cursor)
    assert late.cache_ids == ()
    redis_server.client().delete(f"{store.config.prefix}:generation")  # the counter went back (data lost)
    assert store.changes(late.cursor).cache_ids is None
    ttl = redis_store(redis_server, ttl="5m")
    assert ttl.changes(ttl.changes("").cursor).cache_ids is None  # an index may expire without a change


def test_a_tiered_read_from_redis_reads_the_index_once(redis_server, tmp_path: Path):
    """The artifact and the entry the faster tiers are filled with come from one read of Redis' index."""
    shared = redis_store(redis_server)
    shared.put(entry(cid("e1")), writer(b"an artifact"))
    tiered = TieredStore([Tier("disk", DiskStore(tmp_path / "disk")), Tier("redis", shared, is_shared=True)])
    redis_server.client().config_resetstat()
    assert read_back(tiered, cid("e1")) == b"an artifact"
    assert {k: v for k, v in calls(redis_server).items() if k in ("get", "mget")} == {"get": 1, "mget": 1}
    assert tiered.tiers[0].store.entry(cid("e1")) == shared.entry(cid("e1"))  # kept with its entry
    f, _, tier = tiered._open_located(cid("e1"))
    f.close()
    assert tier == "disk" and tiered.tier_names() == ("disk", "redis")


def test_a_document_deleted_on_one_node_leaves_every_nodes_local_tiers_when_the_change_log_names_it(
        redis_server, tmp_path: Path):
    """Node B holds a copy of A's document on its RAM and disk; A deletes it. Once B's catalogue reads the change log
    that names it, B's tiers no longer answer for it (they answered for it as long as B lived, before); a document
    the log names that is still stored, or written while the shared tier was down, is kept."""
    shared = redis_store(redis_server)
    node_a, node_b = tiered(tmp_path / "a", shared, 1 << 20), tiered(tmp_path / "b", shared, 1 << 20)
    gone, kept = cid("f1"), cid("f2")
    cursor = node_b.changes("").cursor
    for c in (gone, kept):
        node_a.put(entry(c), writer(b"a document"))
        assert read_back(node_b, c) == b"a document"  # B's RAM and disk hold it now
    assert node_a.delete(gone)
    assert node_b.entry(gone) is not None  # B's tiers still answer, until its catalogue reads the change log
    seen = node_b.changes(cursor)
    assert seen.cache_ids == (gone, kept, gone)
    assert node_b.entry(gone) is None and all(t.store.entry(gone) is None for t in node_b.tiers)
    assert read_back(node_b, kept) == b"a document" and node_b.tiers[0].store.entry(kept) is not None


def test_unreachable_shared_tiers_are_store_unavailable():
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        open_shared("redis://127.0.0.1:1/0").entries()
    s3 = open_shared(f"s3://{BUCKET}/x?endpoint=http://127.0.0.1:1")
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        s3.entries()
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        s3.put(entry(cid("a1")), writer(b"x"))


def test_store_urls(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown store option 'colour'"):
        open_shared("redis://127.0.0.1:1/0?colour=blue")
    with pytest.raises(ConfigError, match="TTL class"):
        open_shared("redis://127.0.0.1:1/0?ttl=forever")
    with pytest.raises(ConfigError, match="known schemes"):
        open_store("ftp://x")
    tiered = open_store("redis://127.0.0.1:1/0?ram_bytes=1MiB&disk_bytes=2MiB", local_dir=tmp_path / "local")
    assert isinstance(tiered, TieredStore)
    assert [(t.name, t.budget_bytes, t.is_shared) for t in tiered.tiers] == [
        ("ram", 2**20, False), ("disk", 2 * 2**20, False), ("redis", 0, True)]


# -- the tiered store ----------------------------------------------------------------------------------------------
class Flaky(MemoryStore):
    """A shared tier that can be switched off."""

    is_down = False

    def _check(self) -> None:
        if self.is_down:
            raise StoreUnavailableError("switched off")

    def put(self, e, w):
        self._check()
        return super().put(e, w)

    def _open(self, c):
        self._check()
        return super()._open(c)

    def entry(self, c):
        self._check()
        return super().entry(c)

    def entries(self):
        self._check()
        return super().entries()

    def delete(self, c):
        self._check()
        return super().delete(c)

    def ping(self):
        self._check()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tiered(tmp_path: Path, shared: Store, ram_bytes: int = 0, clock=None) -> TieredStore:
    tiers = [Tier("ram", MemoryStore(), ram_bytes)] if ram_bytes else []
    tiers += [Tier("disk", DiskStore(tmp_path / "disk")), Tier("shared", shared, is_shared=True)]
    return TieredStore(tiers, retry_seconds=5.0, clock=clock or Clock())


def test_write_through_and_fill_on_miss(tmp_path: Path):
    shared = MemoryStore()
    node_a, node_b = tiered(tmp_path / "a", shared, 100), tiered(tmp_path / "b", shared, 100)
    node_a.put(entry(cid("a1")), writer(b"payload"))
    assert shared.entry(cid("a1")) is not None  # written through
    assert read_back(node_b, cid("a1")) == b"payload"  # node B: miss in RAM and disk, hit on the shared tier
    assert [t.hits for t in node_b.tiers] == [0, 0, 1]
    assert [t.fills for t in node_b.tiers] == [1, 1, 0]
    assert read_back(node_b, cid("a1")) == b"payload"
    assert [t.hits for t in node_b.tiers] == [1, 0, 1]  # now from RAM
    assert node_b.tiers[1].store.entry(cid("a1")) is not None  # and on B's disk


def test_degraded_while_shared_is_down_then_recovers(tmp_path: Path):
    shared, clock = Flaky(), Clock()
    node = tiered(tmp_path, shared, clock=clock)
    node.put(entry(cid("a1")), writer(b"before"))
    shared.is_down = True
    assert read_back(node, cid("a1")) == b"before"  # from the local disk
    node.put(entry(cid("b2")), writer(b"during"))  # the write succeeds locally
    assert node.health()["degraded"] is True and node.health()["pending_pushes"] == 1
    assert {e.cache_id for e in node.entries()} == {cid("a1"), cid("b2")}
    shared.is_down = False
    assert node.health()["degraded"] is True  # not retried before its time: no request waits on a dead tier
    clock.now = 10.0
    health = node.health()
    assert health["degraded"] is False and health["pending_pushes"] == 0
    assert read_back(shared, cid("b2")) == b"during"  # pushed once it came back


def test_the_shared_tiers_change_log_while_it_is_down_is_no_news(tmp_path: Path):
    class Logged(Flaky):
        def changes(self, cursor):
            self._check()
            return Changes("7", (cid("a1"),))

    shared = Logged()
    node = tiered(tmp_path, shared)
    assert node.changes("3") == Changes("7", (cid("a1"),))  # the shared tier's log: others publish through it
    shared.is_down = True
    assert node.changes("3") == Changes("3", ())  # keep what is known until it answers again
    assert node.changes("") == Changes("", None)  # nothing known yet: list what the local tiers hold
    assert tiered(tmp_path / "no log", MemoryStore()).changes("3").cache_ids is None  # a store without a log


def test_delete_refuses_to_pretend_when_shared_is_down(tmp_path: Path):
    shared = Flaky()
    node = tiered(tmp_path, shared)
    node.put(entry(cid("a1")), writer(b"x"))
    shared.is_down = True
    with pytest.raises(StoreUnavailableError):
        node.delete(cid("a1"))
    assert node.entry(cid("a1")) is not None  # nothing removed anywhere: the delete can be retried whole


def test_ram_budget_evicts_by_cost_aware_score(tmp_path: Path):
    """The RAM tier holds two 40-byte artifacts; the third evicts the one spared least prefill per byte x reads."""
    placement = Placement()
    tiers = [Tier("ram", MemoryStore(), 100), Tier("disk", DiskStore(tmp_path / "d"))]
    node = TieredStore(tiers, placement)
    short = Entry(**{**entry(cid("a1")).as_dict(), "num_tokens": 100, "model": "Qwen3-0.6B"})
    long = Entry(**{**entry(cid("b2")).as_dict(), "num_tokens": 4000, "model": "Qwen3-0.6B"})
    node.put(short, writer(b"s" * 40))
    node.put(long, writer(b"l" * 40))
    node.put(entry(cid("c3")), writer(b"c" * 40))
    ram = {e.cache_id for e in tiers[0].store.entries()}
    assert cid("a1") not in ram and cid("b2") in ram  # same bytes, same reads: the longer prefill is kept
    assert tiers[0].evictions == 1 and tiers[1].store.entry(cid("a1")) is not None  # still on disk


def test_pinned_artifacts_are_never_evicted(tmp_path: Path):
    placement = Placement()
    tiers = [Tier("ram", MemoryStore(), 100), Tier("disk", DiskStore(tmp_path / "d"))]
    node = TieredStore(tiers, placement)
    node.put(entry(cid("a1")), writer(b"a" * 60))
    node.set_ttl_class(cid("a1"), "pinned")
    node.put(entry(cid("b2")), writer(b"b" * 60))  # does not fit beside the pinned one: RAM keeps the pin
    assert {e.cache_id for e in tiers[0].store.entries()} == {cid("a1")}
    assert read_back(node, cid("b2")) == b"b" * 60  # served from disk


def test_the_ttl_sweep(tmp_path: Path):
    clock = Clock()
    clock.now = 1000.0
    node = TieredStore([Tier("disk", DiskStore(tmp_path / "d"))], Placement(clock=clock))
    node.put(entry(cid("a1"), created_at=1000.0), writer(b"a"))
    node.put(entry(cid("b2"), created_at=1000.0), writer(b"b"))
    node.set_ttl_class(cid("a1"), "5m")
    clock.now = 1000.0 + 301
    assert node.sweep() == 1  # a1 unread for over 5 minutes; b2 is in the default 1 h class
    assert node.entry(cid("a1")) is None and node.entry(cid("b2")) is not None


def test_redis_open_head_fetches_only_the_first_chunk(redis_server):
    import struct

    store = redis_store(redis_server, chunk_bytes="16")
    artifact = struct.pack("<Q", 4) + b"head" + b"tensors " * 20
    store.put(entry(cid("a1")), writer(artifact))
    with store.open_head(cid("a1")) as (f, size):
        assert f.read() == artifact[:16] and size == len(artifact)  # the header, and the whole size
    long_header = struct.pack("<Q", 40) + b"h" * 40 + b"tensors"
    store.put(entry(cid("b2")), writer(long_header))
    with store.open_head(cid("b2")) as (f, size):
        assert f.read() == long_header  # a header longer than a chunk: the whole artifact


def test_the_cli_over_a_redis_store(redis_server, tiny_folder, monkeypatch, tmp_path: Path):
    """precompute, ls, ask and pin with --store redis://: the CLI talks to the shared tier directly."""
    import re
    import sys

    from click.testing import CliRunner

    from kvmart.cli.main import cli

    monkeypatch.setattr(sys, "argv", ["kvmart"])
    url = f"{redis_server.url}?prefix={fresh_prefix()}&ttl=1h"
    doc = tmp_path / "doc.txt"
    doc.write_text("The licence steward is the Mozilla Foundation.\n" * 20, encoding="utf-8")
    run = lambda *a: CliRunner().invoke(cli, [*a, "--store", url, "--model", "builtin:tiny"],  # noqa: E731
                                        catch_exceptions=False)
    made = run("precompute", str(doc))
    assert made.exit_code == 0, made.output
    cache_id = re.search(r"cache_id  ([0-9a-f]{64})", made.output).group(1)
    assert cache_id[:16] in run("ls").output
    asked = run("ask", cache_id[:12], "Who is the steward?", "--max-tokens", "2")
    assert asked.exit_code == 0, asked.output
    client, prefix = redis_server.client(), url.split("prefix=")[1].split("&")[0]
    assert 0 < client.ttl(f"{prefix}:index:{cache_id}") <= 3600
    assert run("pin", cache_id[:12]).exit_code == 0
    assert client.ttl(f"{prefix}:index:{cache_id}") == -1  # pinned: no expiry


# -- whatever a shared tier holds, its ids are parsed, never trusted as names; a malformed index is skipped -------
def plant_raw_index(shared: Store, listed_id: str, index: object) -> None:
    """Write an index (and list its id) straight into a shared tier, as anyone with access to it could."""
    body = json.dumps(index).encode()
    if hasattr(shared, "_client") and shared.__class__.__name__ == "RedisStore":
        shared._client.set(shared._key("index", listed_id), body)
        shared._client.sadd(shared._key("catalog"), listed_id)
    else:
        shared._client.put_object(Bucket=shared.config.bucket, Key=shared._key("entries", f"{listed_id}.json"),
                                  Body=body)


def test_ids_from_a_shared_tier_are_never_paths_and_malformed_indexes_are_skipped(shared, tmp_path: Path, caplog):
    good = cid("aa")
    shared.put(entry(good), writer(b"the good one"))
    good_index = (json.loads(shared._client.get(shared._key("index", good))) if hasattr(shared._client, "mget")
                  else json.loads(shared._client.get_object(Bucket=shared.config.bucket,
                                                            Key=shared._key("entries", f"{good}.json"))["Body"].read()))
    evil = "../../../../escape"
    plant_raw_index(shared, evil, {**good_index, "entry": {**entry(good).as_dict(), "cache_id": evil}})
    plant_raw_index(shared, cid("bb"), {**good_index, "entry": {**entry(cid("bb")).as_dict(), "cache_id": evil}})
    plant_raw_index(shared, cid("cc"), {**good_index, "entry": {**entry(cid("cc")).as_dict(), "num_tokens": "3"}})
    plant_raw_index(shared, cid("dd"), ["not", "an", "index"])
    node = TieredStore([Tier("disk", DiskStore(tmp_path / "node" / "store")), Tier("shared", shared, is_shared=True)])
    assert [e.cache_id for e in node.entries()] == [good]  # listed, the malformed ones skipped: no error
    for bad in (cid("bb"), cid("cc"), cid("dd")):
        assert node.entry(bad) is None
        with pytest.raises(UnknownCacheError):
            read_back(node, bad)
    assert read_back(node, good) == b"the good one"
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {f"node/store/entries/{good}.json", f"node/store/objects/aa/{good}.kvm"}
    assert not list(tmp_path.parent.rglob("escape*"))
    assert "skipped" in caplog.text or "absent" in caplog.text


def test_a_malformed_shared_index_makes_the_engine_recompute_never_fail(model_f32, kvmart_data_dir, redis_server,
                                                                         tmp_path: Path):
    """A chunk's index in Redis is replaced by one with a field of the wrong type and the node lost its own copy: a
    request that reads the document gets that chunk recomputed (its answer what a from-scratch run gives), not an
    error. The same damage to the document's own index makes it absent: a clean 404, never a 500."""
    import dataclasses

    from kvmart.config import Settings
    from kvmart.errors import UnknownDocumentError
    from kvmart.reuse.prompt import ChatMessage, ChatPrompt
    from kvmart.runtime.chat import document_ids, layout_for
    from kvmart.server.config import ServerSettings
    from kvmart.server.pipeline.engine import Computed, PublishJob
    from kvmart.server.pipeline.plan import Caller, GenerationRequest, Sampling
    from kvmart.server.pipeline.services import build_services

    url = f"{redis_server.url}?prefix={fresh_prefix()}"
    store = TieredStore([Tier("disk", DiskStore(tmp_path / "node")), Tier("redis", open_shared(url), is_shared=True)])
    services = build_services(Settings(data_dir=kvmart_data_dir, model=model_f32.spec),
                              ServerSettings(ram_cache_bytes=0), model_f32, store=store)
    ids = document_ids(model_f32.tokenize, layout_for(model_f32.tokenizer),
                       "A document whose shared index will be broken.")
    (published,) = services.engine.publish(PublishJob(ids, "doc", ""), "raw")
    doc = services.engine.register(published)
    shared = store.tiers[1].store

    def break_index(cache_id: str) -> None:
        index = json.loads(shared._client.get(shared._key("index", cache_id)))
        shared._client.set(shared._key("index", cache_id),
                           json.dumps({**index, "entry": {**index["entry"], "num_tokens": "many"}}))
        store.tiers[0].store.delete(cache_id)

    ((_, key),) = doc.chunks
    break_index(key)
    request = GenerationRequest(ChatPrompt((ChatMessage("user", "Q?"),), (doc.id,)),
                                Sampling(max_tokens=4, temperature=0.0))

    def answer(bypass: bool) -> list:
        plan = services.planner.plan(dataclasses.replace(request, bypass=bypass), Caller(None, None, "s"))
        loaded = services.loader.load(plan)
        return [loaded.num_tokens] + [e for e in services.engine.execute(plan, loaded) if not isinstance(e, Computed)]

    cached, fresh = answer(False), answer(True)
    assert cached[0] == 0 and cached[1:] == fresh[1:]  # the chunk read as absent and was computed again
    break_index(doc.cache_id)
    with pytest.raises(UnknownDocumentError):
        services.planner.plan(request, Caller(None, None, "s"))
    services.engine.close()
