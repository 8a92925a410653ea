"""Chunk chains (kvmart/reuse/chunks.py): the exactness they rest on, the chained keys, sharing between documents
with a common prefix (chunks stored once), reuse of exactly the matching leading chunks, integrity, tenant salts,
and sharing between nodes through a real Redis."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kvmart.format.keys import check_chunk_tokens, chunk_keys
from kvmart.reuse import core
from kvmart.reuse.chunks import ChunkStore, Segment, chain, chunks_of, cut
from kvmart.runtime.kv import KV
from kvmart.store.disk import DiskStore
from kvmart.store.memory import MemoryStore

CHUNK = 64


def ids(seed: int, n: int, vocab: int = 2000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


def pieces(tokens: list[int], size: int = CHUNK) -> list[list[int]]:
    return [tokens[s:s + size] for s in range(0, len(tokens), size)]


def assert_kv_equal(a: KV, b: KV) -> None:
    assert a.num_layers == b.num_layers
    for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values), strict=True):
        assert x.shape == y.shape and torch.equal(x, y)


def chunk_entries(store) -> list:
    return [e for e in store.entries() if e.kind == "chunk"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_chunk_depends_only_on_its_prefix(load_tiny, dtype, record_agreement):
    """What sharing rests on: the first k chunks of a longer sequence's chunked prefill are bit-identical to the
    chunked prefill of those k chunks alone. (Slices of a single whole-document prefill are not always: recorded.)"""
    model = load_tiny(dtype)
    tokens = ids(3, 5 * CHUNK)
    whole = model.prefill_pieces(pieces(tokens))
    for k in range(1, 5):
        alone = model.prefill_pieces(pieces(tokens[:k * CHUNK]))
        for a, b in zip(whole[:k], alone, strict=True):
            assert_kv_equal(a, b)
    single = model.prefill(tokens)
    same = [k for k in (8, 64, 256) if single.slice(0, k).equal(model.prefill(tokens[:k]))]
    record_agreement(f"chunks {dtype}: a slice of one whole prefill equals the prefix's prefill at k in {same} "
                     "of (8, 64, 256); chunked prefill is equal at every chunk boundary")


def test_chunk_keys_chain_the_prefix():
    a, b = ids(1, 200), ids(1, 200)
    b[150] += 1  # differs in the third chunk
    ka, kb = chunk_keys("fp", a, CHUNK), chunk_keys("fp", b, CHUNK)
    assert len(ka) == 3  # full chunks only: 200 // 64
    assert ka[:2] == kb[:2] and ka[2] != kb[2]
    c = ids(2, 64) + a[64:]  # the same second chunk after another first: another key (it saw other tokens)
    assert chunk_keys("fp", c, CHUNK)[1] != ka[1]
    assert chunk_keys("other model", a, CHUNK)[0] != ka[0]
    assert chunk_keys("fp", a, CHUNK, salt="tenant-1")[0] != ka[0]
    with pytest.raises(ValueError, match="multiple of 8"):
        check_chunk_tokens(100)


def test_segments_are_cut_from_their_own_start_and_keyed_under_their_own_salts():
    first, second = Segment(tuple(ids(4, 150)), ""), Segment(tuple(ids(5, 70)), "tenant")
    assert [len(p) for p, _ in cut([first, second], CHUNK)] == [64, 64, 22, 64, 6]
    chunks = chunks_of("fp", [first, second], CHUNK)
    assert [(c.start, c.end, c.salt) for c in chunks] == [(0, 64, ""), (64, 128, ""), (128, 150, ""),
                                                          (150, 214, "tenant"), (214, 220, "tenant")]
    assert [c.key for c in chunks[:3]] == [c.key for c in chunks_of("fp", [first], CHUNK)]  # a prefix's keys
    other_tenant = chunks_of("fp", [first, Segment(second.token_ids, "other")], CHUNK)
    assert other_tenant[3].key != chunks[3].key and other_tenant[2].key == chunks[2].key
    assert chain("fp", [(c.token_ids, c.salt) for c in chunks[3:]], chunks[2].key, 150) == chunks[3:]


def test_two_documents_with_a_common_prefix_share_chunks(model_f32, tmp_path: Path):
    store = DiskStore(tmp_path / "store")
    system = ids(7, 2 * CHUNK)  # a common system prompt: two chunks
    first = core.precompute_ids(model_f32, store, system + ids(8, 130), "a", chunk_tokens=CHUNK)
    assert first.is_new and first.computed_tokens == 2 * CHUNK + 130 and len(chunk_entries(store)) == 5
    second = core.precompute_ids(model_f32, store, system + ids(9, 100), "b", chunk_tokens=CHUNK)
    assert second.is_new and second.computed_tokens == 100  # the two shared chunks were read, not computed
    assert len(chunk_entries(store)) == 7  # two more chunks (64 + 36 tokens), the shared two stored once
    again = core.precompute_ids(model_f32, store, system + ids(8, 130), "a", chunk_tokens=CHUNK)
    assert not again.is_new and again.computed_tokens == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_prompt_reuses_exactly_its_matching_chunks_bit_exactly(load_tiny, dtype):
    model = load_tiny(dtype)
    store = MemoryStore()
    chunk_store = ChunkStore(store, model.fingerprint)
    document = ids(11, 4 * CHUNK + 10)
    core.precompute_ids(model, store, document, chunk_tokens=CHUNK)
    prompt = document[:2 * CHUNK + 30] + ids(12, 20)  # agrees with the document for 2 chunks and 30 tokens
    chunks = chunks_of(model.fingerprint.digest, [Segment(tuple(prompt))], CHUNK)
    reused = chunk_store.read_run(chunks)
    assert len(reused) == 2
    rest = prompt[2 * CHUNK:]
    from_cache = model.continue_from(tuple(reused), rest, all_logits=True)
    scratch = model.prefill_pieces(pieces(prompt[:2 * CHUNK]))  # the same steps from nothing
    fresh = model.continue_from(scratch, rest, all_logits=True)
    assert torch.equal(from_cache.logits, fresh.logits)
    assert_kv_equal(from_cache.kv, fresh.kv)
    assert chunk_store.read_run(chunks_of(model.fingerprint.digest, [Segment(tuple(ids(13, 3 * CHUNK)))],
                                          CHUNK)) == []


def test_a_missing_or_corrupt_chunk_ends_the_reused_run(model_f32):
    store = MemoryStore()
    chunk_store = ChunkStore(store, model_f32.fingerprint)
    document = ids(21, 4 * CHUNK)
    core.precompute_ids(model_f32, store, document, chunk_tokens=CHUNK)
    chunks = core.document_chunks(model_f32, document, chunk_tokens=CHUNK)
    store.delete(chunks[2].key)
    assert len(chunk_store.read_run(chunks)) == 2  # chunk 3 exists but cannot be used without chunk 2
    blob = bytearray(store._blobs[chunks[1].key])
    blob[-1] ^= 1
    store._blobs[chunks[1].key] = bytes(blob)
    assert len(chunk_store.read_run(chunks)) == 1  # a bit flip is refused, never used, and dropped
    assert store.entry(chunks[1].key) is None
    with pytest.raises(Exception, match="missing from the store"):
        core.load(model_f32, store, core.precompute_ids(model_f32, store, document, chunk_tokens=CHUNK).entry.cache_id)


def test_a_chunk_stored_under_another_key_is_refused(model_f32):
    store = MemoryStore()
    chunk_store = ChunkStore(store, model_f32.fingerprint)
    a, b = chunks_of(model_f32.fingerprint.digest, [Segment(tuple(ids(51, CHUNK)))], CHUNK)[0], \
        chunks_of(model_f32.fingerprint.digest, [Segment(tuple(ids(52, CHUNK)))], CHUNK)[0]
    chunk_store.put(a, model_f32.prefill(list(a.token_ids)))
    store._blobs[b.key], store._entries[b.key] = store._blobs[a.key], store._entries[a.key]  # a forged copy
    assert chunk_store.read(b) is None


def test_tenant_salts_keep_private_chunks_apart(model_f32):
    store = MemoryStore()
    chunk_store = ChunkStore(store, model_f32.fingerprint)
    document = ids(31, 2 * CHUNK)
    core.precompute_ids(model_f32, store, document, salt="account-1", chunk_tokens=CHUNK)

    def reusable(salt: str) -> int:
        return len(chunk_store.read_run(chunks_of(model_f32.fingerprint.digest, [Segment(tuple(document), salt)],
                                                  CHUNK)))

    assert (reusable("account-1"), reusable("account-2"), reusable("")) == (2, 0, 0)


def test_chunks_are_shared_across_nodes_through_redis(model_f32, tmp_path: Path, tmp_path_factory):
    """Two nodes' tiered stores (own disks) over one real redis-server: node B stores a document that shares two
    chunks with node A's, computes only its new chunk, and reuses A's chunks fetched from Redis, bit-exactly."""
    from infra_support import RedisServer

    from kvmart.store import open_store

    redis = RedisServer(tmp_path_factory.mktemp("redis-chunks")).start()
    try:
        url = f"{redis.url}?prefix=chunks"
        node_a, node_b = (open_store(url, local_dir=tmp_path / n) for n in ("a", "b"))
        system = ids(41, 2 * CHUNK)
        first = core.precompute_ids(model_f32, node_a, system + ids(42, CHUNK), chunk_tokens=CHUNK)
        second = core.precompute_ids(model_f32, node_b, system + ids(43, CHUNK), chunk_tokens=CHUNK)
        assert (first.computed_tokens, second.computed_tokens) == (3 * CHUNK, CHUNK)
        assert len(redis.client().keys("chunks:index:*")) == 4 + 2  # four chunks, two document indexes
        prompt = system + ids(44, 10)
        found = ChunkStore(node_b, model_f32.fingerprint).read_run(
            chunks_of(model_f32.fingerprint.digest, [Segment(tuple(prompt))], CHUNK))
        assert len(found) == 2
        for got, want in zip(found, model_f32.prefill_pieces(pieces(system)), strict=True):
            assert_kv_equal(got, want)
    finally:
        redis.stop()
