"""The document catalogue and prefix matching (kvmart/reuse/catalog.py), and the hot tier (kvmart/server/pipeline/hot.py)."""

from __future__ import annotations

import time

import pytest
import torch
from infra_support import redis_server  # noqa: F401  (a fixture)

from kvmart.errors import UnknownDocumentError
from kvmart.reuse import core
from kvmart.reuse.catalog import Catalog, common_prefix_tokens, document_id
from kvmart.reuse.samples import sample_text
from kvmart.runtime.kv import KV
from kvmart.server.pipeline.hot import HotTier
from kvmart.store import open_store


@pytest.mark.parametrize("a, b, expected", [([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2), ([1, 2], [2, 1], 0),
                                            ([], [1], 0), ([1, 2, 3, 4], [1, 2, 9, 4], 2)])
def test_common_prefix_tokens(a, b, expected):
    assert common_prefix_tokens(torch.tensor(a, dtype=torch.int64), torch.tensor(b, dtype=torch.int64)) == expected


@pytest.fixture
def store(kvmart_data_dir):
    return open_store(str(kvmart_data_dir / "store"))


def test_catalogue_sees_what_the_cli_stored_and_forgets_what_it_removed(model_f32, store):
    catalog = Catalog(store, model_f32.fingerprint.digest)
    stored = core.precompute(model_f32, store, sample_text("bsd-3-clause")).entry
    doc_id = document_id(stored.cache_id)
    assert doc_id == "doc_" + stored.cache_id[:24]
    with pytest.raises(UnknownDocumentError):  # a request never makes the catalogue look: its refresh does
        catalog.get(doc_id)
    catalog.refresh()
    found = catalog.get(doc_id)
    assert found.token_list() == core.load(model_f32, store, stored.cache_id).token_ids
    assert [n for n, _ in found.chunks] == [256] * (found.num_tokens // 256) + [found.num_tokens % 256]
    store.delete(stored.cache_id)
    assert not catalog.still_stored(found)  # a deletion is seen at the document's next use
    with pytest.raises(UnknownDocumentError, match=doc_id):
        catalog.get(doc_id)


def test_the_refresher_picks_up_documents_on_its_own(model_f32, store):
    catalog = Catalog(store, model_f32.fingerprint.digest)
    catalog.start_refresher(0.05)
    try:
        stored = core.precompute(model_f32, store, sample_text("bsd-3-clause")).entry
        for _ in range(600):  # waits on the catalogue itself (a deadline against a hang, not a timing)
            if catalog.documents():
                break
            time.sleep(0.05)
        assert [d.cache_id for d in catalog.documents()] == [stored.cache_id]
    finally:
        catalog.stop_refresher()


def test_a_pasted_document_is_found_by_its_first_chunk_in_whole_chunks(model_f32, store):
    from kvmart.format.keys import chain_key

    stored = core.precompute(model_f32, store, sample_text("bsd-3-clause")).entry
    catalog = Catalog(store, model_f32.fingerprint.digest)
    catalog.refresh()
    (document,) = catalog.documents()
    ids = document.token_list()
    keys = {n: chain_key("", model_f32.fingerprint.digest, "", ids[:n]) for n in catalog.first_chunk_lengths()}
    assert catalog.pasted_at_start(ids + [7, 8], keys) == [(document, len(ids))]
    cut = ids[:300] + [7, 8]  # the first chunk whole, the second not
    assert catalog.pasted_at_start(cut, keys) == [(document, 256)]
    assert catalog.pasted_at_start([7, 8] + ids, keys) == []
    assert document.cache_id == stored.cache_id


def test_other_models_artifacts_are_not_listed(model_f32, store):
    core.precompute(model_f32, store, sample_text("bsd-3-clause"))
    catalog = Catalog(store, "another-fingerprint")
    catalog.refresh()
    assert catalog.documents() == []


def test_longest_prefix_prefers_the_longest_match_then_the_shorter_document(model_f32, store):
    short = core.precompute_ids(model_f32, store, [1, 2, 3, 4]).entry
    long = core.precompute_ids(model_f32, store, [1, 2, 3, 4, 5, 6]).entry
    other = core.precompute_ids(model_f32, store, [1, 2, 7, 8]).entry
    catalog = Catalog(store, model_f32.fingerprint.digest)
    catalog.refresh()
    assert catalog.longest_prefix([1, 2, 3, 4, 5, 9], 1).document.cache_id == long.cache_id
    best = catalog.longest_prefix([1, 2, 3, 4, 9], 1)
    assert (best.document.cache_id, best.num_tokens) == (short.cache_id, 4)  # tie at 4: the shorter document
    assert catalog.longest_prefix([1, 2, 7], 1).document.cache_id == other.cache_id
    assert catalog.longest_prefix([1, 2, 7], 4) is None  # below the minimum
    assert catalog.longest_prefix([9, 9], 1) is None


# -- over a Redis shared tier: what a refresh costs ----------------------------------------------------------------
def redis_calls(server) -> dict[str, int]:
    """Commands Redis answered since the last reset (INFO commandstats), by name, without this check's own; the
    reset starts the next count."""
    client = server.client()
    found = {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}
    client.config_resetstat()
    return {k: v for k, v in found.items() if k not in ("info", "config|resetstat", "hello", "client|setinfo")}


@pytest.fixture
def redis_pair(redis_server, tmp_path):
    """A writer talking to Redis directly (as the CLI or another node does) and a node's tiered store over it."""
    url = f"{redis_server.url}?prefix=catalog{tmp_path.name[-12:]}"
    return open_store(url), open_store(url, local_dir=tmp_path / "node")


def test_a_refresh_reads_only_the_documents_that_changed(model_f32, redis_server, redis_pair):
    writer, node = redis_pair
    first = core.precompute(model_f32, writer, sample_text("bsd-3-clause")).entry
    catalog = Catalog(node, model_f32.fingerprint.digest)
    catalog.refresh()  # the first look lists everything
    assert [d.cache_id for d in catalog.documents()] == [first.cache_id]
    catalog.refresh()  # (Redis has the change-log script from here on)
    redis_calls(redis_server)
    catalog.refresh()  # nothing changed: one small script call (it reads the change counter), no index read
    assert redis_calls(redis_server) == {"evalsha": 1, "get": 1}
    second = core.precompute(model_f32, writer, sample_text("mpl-2.0")[:3000]).entry
    redis_calls(redis_server)
    catalog.refresh()  # one new document: the script (counter, changes), its entry, its index read once, kept
    assert redis_calls(redis_server) == {"evalsha": 1, "get": 1 + 1 + 1, "zrangebyscore": 1, "mget": 1}
    assert {d.cache_id for d in catalog.documents()} == {first.cache_id, second.cache_id}
    assert node.tiers[0].store.entry(second.cache_id) is not None
    assert catalog.still_stored(catalog.get(document_id(second.cache_id)))
    assert redis_calls(redis_server) == {}  # `still_stored`, once per request, is answered by the node's disk


def test_a_document_removed_elsewhere_leaves_the_catalogue_at_the_next_refresh(model_f32, redis_server, tmp_path):
    store = open_store(f"{redis_server.url}?prefix=removed{tmp_path.name[-12:]}")
    stored = core.precompute(model_f32, store, sample_text("bsd-3-clause")).entry
    catalog = Catalog(store, model_f32.fingerprint.digest)
    catalog.refresh()
    core.remove(store, stored.cache_id)
    catalog.refresh()
    assert catalog.documents() == []


def test_a_catalogue_that_cannot_follow_the_change_log_lists_everything(model_f32, redis_server, redis_pair):
    writer, node = redis_pair
    catalog = Catalog(node, model_f32.fingerprint.digest)
    catalog.refresh()
    kept = core.precompute(model_f32, writer, sample_text("bsd-3-clause")).entry
    redis_server.client().delete(f"{writer.config.prefix}:changes")  # the log lost (trimmed, or flushed)
    redis_calls(redis_server)
    catalog.refresh()
    assert "smembers" in redis_calls(redis_server)  # it listed the store
    assert [d.cache_id for d in catalog.documents()] == [kept.cache_id]


def kv_of(num_bytes: int) -> KV:
    tensor = torch.zeros(num_bytes // 8, dtype=torch.float32)  # keys + values: num_bytes in all
    return KV((tensor,), (tensor.clone(),))


def test_hot_tier_evicts_the_least_recently_used_within_its_budget():
    hot = HotTier(budget_bytes=1000)
    for name in "abc":
        assert hot.put(name, kv_of(400))
    assert "a" not in hot and "b" in hot and "c" in hot  # 3 x 400 > 1000: a went first
    assert hot.get("b") is not None  # b is now the most recently used
    hot.put("d", kv_of(400))
    assert "c" not in hot and "b" in hot and "d" in hot
    assert hot.get("a") is None
    stats = hot.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries, stats.bytes) == (1, 1, 2, 2, 800)


def test_hot_tier_never_keeps_what_cannot_fit_and_can_be_disabled():
    hot = HotTier(budget_bytes=1000)
    assert not hot.put("huge", kv_of(1008))
    assert hot.stats().entries == 0
    disabled = HotTier(budget_bytes=0)
    assert not disabled.put("a", kv_of(8))
    hot.put("a", kv_of(400))
    hot.discard("a")
    assert hot.stats().bytes == 0 and "a" not in hot


def test_a_document_gone_between_listing_and_reading_fails_no_refresh(model_f32):
    """The store lists an entry whose artifact is gone by the time the catalogue reads its head (deleted by another
    node meanwhile): the refresh skips it (logged) and keeps the others; a listing never fails for it."""
    from kvmart.store import Entry
    from kvmart.store.memory import MemoryStore

    kept = core.precompute(model_f32, MemoryStore(), sample_text("bsd-3-clause")).entry
    gone = Entry(cache_id="ab" * 32, title="gone", source="", model=model_f32.spec,
                 fingerprint=model_f32.fingerprint.digest, num_tokens=3, artifact_bytes=10, prefill_seconds=0.1,
                 created_at=time.time())

    class Vanishing(MemoryStore):
        def entries(self) -> list[Entry]:
            return [*super().entries(), gone]

    store = Vanishing()
    core.precompute(model_f32, store, sample_text("bsd-3-clause"))
    catalog = Catalog(store, model_f32.fingerprint.digest)
    catalog.refresh()
    assert [d.cache_id for d in catalog.documents()] == [kept.cache_id]
