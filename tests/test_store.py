"""The store contract, run over every store tier, plus what only the disk store promises (durability across
re-opening, atomic puts that leave nothing behind, stale temp cleanup) and `open_store`'s scheme table."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from kvmart.errors import ConfigError, UnknownCacheError
from kvmart.store import SCHEMES, Entry, open_store
from kvmart.store.disk import STALE_TEMP_SECONDS, DiskStore
from kvmart.store.memory import MemoryStore


def cid(prefix: str) -> str:
    """A 64-hex-char cache id starting with `prefix`."""
    return (prefix + "0123456789abcdef" * 4)[:64]


def entry(cache_id: str, created_at: float = 1000.0, title: str = "doc") -> Entry:
    return Entry(cache_id=cache_id, title=title, source=f"/docs/{title}.txt", model="builtin:tiny",
                 fingerprint="f" * 64, num_tokens=3, artifact_bytes=0, prefill_seconds=0.5, created_at=created_at)


def writer(payload: bytes):
    return lambda f: f.write(payload)


def read_back(store, cache_id: str) -> bytes:
    with store.open(cache_id) as (f, size):
        data = f.read()
    assert size == len(data)
    return data


@pytest.fixture(params=["disk", "memory"])
def store(request, tmp_path: Path):
    return DiskStore(tmp_path / "store") if request.param == "disk" else MemoryStore()


# -- the contract, every tier ------------------------------------------------------------------------------------
def test_put_then_open_entry_entries(store):
    a = cid("aa11")
    stored = store.put(entry(a), writer(b"artifact bytes"))
    assert stored.artifact_bytes == len(b"artifact bytes")  # what was written, not what the caller guessed
    assert stored.title == "doc" and stored.cache_id == a
    assert read_back(store, a) == b"artifact bytes"
    assert store.entry(a) == stored
    assert store.entries() == [stored]


def test_absent_ids(store):
    assert store.entry(cid("beef")) is None
    assert store.entries() == []
    assert store.delete(cid("beef")) is False
    with pytest.raises(UnknownCacheError, match="no artifact with cache id"), store.open(cid("beef")):
        pass


def test_entries_newest_first(store):
    for i, created in enumerate([20.0, 30.0, 10.0]):
        store.put(entry(cid(f"c{i}"), created_at=created, title=f"t{i}"), writer(b"x"))
    assert [e.title for e in store.entries()] == ["t1", "t0", "t2"]


def test_put_again_replaces(store):
    a = cid("aa22")
    store.put(entry(a, title="old"), writer(b"old"))
    store.put(entry(a, title="new"), writer(b"newer"))
    assert read_back(store, a) == b"newer"
    assert [e.title for e in store.entries()] == ["new"]
    assert store.entry(a).artifact_bytes == 5


def test_delete(store):
    a, b = cid("aa33"), cid("bb33")
    store.put(entry(a), writer(b"a"))
    store.put(entry(b), writer(b"b"))
    assert store.delete(a) is True
    assert store.delete(a) is False
    assert store.entry(a) is None and [e.cache_id for e in store.entries()] == [b]
    with pytest.raises(UnknownCacheError), store.open(a):
        pass
    assert read_back(store, b) == b"b"


def test_resolve_prefixes(store):
    a, b, c = cid("abcdef01"), cid("abcdef02"), cid("123456ff")
    for x in (a, b, c):
        store.put(entry(x), writer(b"x"))
    assert store.resolve(a) == a
    assert store.resolve("abcdef01") == a
    assert store.resolve("123456") == c
    with pytest.raises(UnknownCacheError, match="ambiguous: it matches 2 artifacts"):
        store.resolve("abcdef0")
    with pytest.raises(UnknownCacheError, match="too short: give at least 6 characters"):
        store.resolve("12345")
    with pytest.raises(UnknownCacheError, match="too short"):
        store.resolve("")
    with pytest.raises(UnknownCacheError, match="no artifact with cache id '999999'"):
        store.resolve("999999")


def test_writer_that_raises_leaves_nothing_visible(store):
    a = cid("dead01")

    def failing(f) -> int:
        f.write(b"half an artifact")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        store.put(entry(a), failing)
    assert store.entry(a) is None and store.entries() == []
    with pytest.raises(UnknownCacheError), store.open(a):
        pass
    if isinstance(store, DiskStore):
        assert list((store.root / "tmp").iterdir()) == []
        assert not any(p.is_file() for p in (store.root / "objects").rglob("*"))


def test_failed_put_keeps_the_previous_artifact(store):
    a = cid("dead02")
    store.put(entry(a, title="good"), writer(b"good"))

    def failing(f) -> int:
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.put(entry(a, title="bad"), failing)
    assert read_back(store, a) == b"good" and store.entry(a).title == "good"


# -- disk only ---------------------------------------------------------------------------------------------------
def test_disk_store_survives_reopening(tmp_path: Path):
    a = cid("face01")
    stored = DiskStore(tmp_path / "s").put(entry(a), writer(b"persisted"))
    again = DiskStore(tmp_path / "s")
    assert again.entry(a) == stored
    assert again.entries() == [stored]
    assert read_back(again, a) == b"persisted"
    assert again.resolve("face01") == a


def test_stale_temp_files_are_cleaned_on_open(tmp_path: Path):
    DiskStore(tmp_path / "s")
    tmp = tmp_path / "s" / "tmp"
    stale, fresh = tmp / "abc.kvm.tmp", tmp / "def.kvm.tmp"
    stale.write_bytes(b"left by a dead writer")
    fresh.write_bytes(b"being written right now")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    DiskStore(tmp_path / "s")
    assert not stale.exists()
    assert fresh.exists()


def test_disk_layout_has_no_temp_files_after_put(tmp_path: Path):
    store = DiskStore(tmp_path / "s")
    a = cid("ab9999")
    store.put(entry(a), writer(b"x" * 1000))
    assert list((tmp_path / "s" / "tmp").iterdir()) == []
    assert (tmp_path / "s" / "objects" / "ab" / f"{a}.kvm").stat().st_size == 1000


# -- open_store --------------------------------------------------------------------------------------------------
def test_open_store_by_scheme(tmp_path: Path):
    assert isinstance(open_store("memory://"), MemoryStore)
    plain = open_store(str(tmp_path / "plain"))
    assert isinstance(plain, DiskStore) and plain.root == tmp_path / "plain"
    url = open_store(f"file://{tmp_path / 'url'}")
    assert isinstance(url, DiskStore) and url.root == tmp_path / "url"
    assert (tmp_path / "url" / "objects").is_dir()


def test_open_store_unknown_scheme_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        open_store("ftp://host/prefix")  # (s3:// and redis:// are shared tiers now: tests/test_store_tiers.py)
    message = str(e.value)
    assert "'ftp'" in message
    assert all(scheme in message for scheme in SCHEMES) and "file" in message and "memory" in message


# -- ids are parsed before any path is built; unreadable entries are quarantined, never a failed listing ----------
@pytest.mark.parametrize("bad", ["../../escape", "/etc/passwd", "ab/../../cd", "0" * 63, "0" * 65, "A" * 64,
                                 "0" * 63 + "\0", "", "doc_0123"])
def test_no_store_builds_a_path_or_key_from_a_non_id(store, tmp_path: Path, bad: str):
    from kvmart.errors import InvalidIdError

    for call in (lambda: store.put(entry(bad), writer(b"x")), lambda: store.entry(bad), lambda: store._open(bad),
                 lambda: store.delete(bad)):
        with pytest.raises(InvalidIdError, match="is not a cache id"):
            call()
    assert [p.name for p in tmp_path.iterdir()] in ([], ["store"])  # nothing written beside the store...
    assert not any(tmp_path.parent.glob("*escape*")) and not Path("/etc/passwd.kvm").exists()  # ...or above it
    assert store.entries() == []


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[]", b'{"cache_id": 1}', b"",
                                     b'"a string"', "wrong types", "unknown kind"])
def test_an_unreadable_entry_file_is_quarantined_and_never_fails_a_listing(tmp_path: Path, caplog, content):
    store = DiskStore(tmp_path / "store")
    good, bad = cid("aa"), cid("bb")
    store.put(entry(good), writer(b"good"))
    store.put(entry(bad), writer(b"bad"))
    path = store.root / "entries" / f"{bad}.json"
    if content == "wrong types":  # valid JSON, every field there, one of the wrong type
        content = json.dumps({**entry(bad).as_dict(), "num_tokens": "3"}).encode()
    if content == "unknown kind":
        content = json.dumps({**entry(bad).as_dict(), "kind": "../../x"}).encode()
    path.write_bytes(content)
    (store.root / "entries" / "not-an-id.json").write_text(json.dumps(entry(good).as_dict()))
    assert [e.cache_id for e in store.entries()] == [good]  # listed without the bad ones, no error
    assert store.entry(bad) is None
    assert not path.exists() and not (store.root / "entries" / "not-an-id.json").exists()
    quarantined = sorted(p.name.split(".json")[0] for p in (store.root / "quarantine").iterdir())
    assert quarantined == [bad, "not-an-id"]
    assert "unreadable" in caplog.text and "quarantine" in caplog.text


def test_an_entry_file_written_before_format_3_is_read_not_quarantined(tmp_path: Path):
    """Entries of kvmart 0.1 have no kind, owner or kv_bytes: they are documents stored whole, still readable."""
    store = DiskStore(tmp_path / "store")
    old = cid("cc")
    store.put(entry(old), writer(b"old"))
    before = {k: v for k, v in entry(old).as_dict().items() if k not in ("kind", "owner", "kv_bytes")}
    (store.root / "entries" / f"{old}.json").write_text(json.dumps(before))
    assert store.entry(old) == entry(old) and store.entry(old).is_document
    assert [e.cache_id for e in store.entries()] == [old]
    assert not (store.root / "quarantine").exists() or not any((store.root / "quarantine").iterdir())


def test_an_entry_file_describing_another_artifact_is_quarantined(tmp_path: Path):
    store = DiskStore(tmp_path / "store")
    a, b = cid("aa"), cid("bb")
    store.put(entry(a), writer(b"a"))
    store.put(entry(b), writer(b"b"))
    (store.root / "entries" / f"{b}.json").write_text(json.dumps(entry(a).as_dict()))  # b's file says it is a
    assert [e.cache_id for e in store.entries()] == [a]
    assert store.entry(b) is None
