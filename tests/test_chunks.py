"""Prefix-shared chunk caches: the exactness they rest on, the chained keys, sharing between documents with a
common prefix (bytes saved), reuse of exactly the matching leading chunks, integrity, and tenant salts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kvmart.format.keys import check_chunk_tokens, chunk_keys
from kvmart.reuse.chunks import ChunkStore, chunked_prefill
from kvmart.runtime.kv import KV
from kvmart.store.disk import DiskStore
from kvmart.store.memory import MemoryStore

CHUNK = 64


def ids(seed: int, n: int, vocab: int = 2000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


def assert_kv_equal(a: KV, b: KV) -> None:
    assert a.num_layers == b.num_layers
    for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values), strict=True):
        assert x.shape == y.shape and torch.equal(x, y)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_chunk_depends_only_on_its_prefix(load_tiny, dtype, record_agreement):
    """What sharing rests on: the first k chunks of a longer document's chunked prefill are bit-identical to the
    chunked prefill of those k chunks alone. (Slices of a single whole-document prefill are not always: recorded.)"""
    model = load_tiny(dtype)
    tokens = ids(3, 5 * CHUNK)
    whole = chunked_prefill(model, tokens, CHUNK)
    for k in range(1, 5):
        assert_kv_equal(whole.slice(0, k * CHUNK), chunked_prefill(model, tokens[:k * CHUNK], CHUNK))
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


def test_two_documents_with_a_common_prefix_share_chunks(model_f32, tmp_path: Path):
    store = ChunkStore(DiskStore(tmp_path / "chunks"), model_f32, CHUNK)
    system = ids(7, 2 * CHUNK)  # a common system prompt: two chunks
    doc_a, doc_b = system + ids(8, 130), system + ids(9, 100)
    first = store.precompute(doc_a, title="a")
    second = store.precompute(doc_b, title="b")
    assert (first.chunks, first.new_chunks, first.shared_bytes, first.tail_tokens) == (4, 4, 0, 2)
    assert (second.chunks, second.new_chunks) == (3, 1)
    per_chunk = first.stored_bytes // 4
    assert second.shared_bytes == 2 * per_chunk and second.stored_bytes == per_chunk  # two chunks not written
    assert len(store.store.entries()) == 5
    again = store.precompute(doc_a)
    assert (again.new_chunks, again.shared_bytes) == (0, first.stored_bytes)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_prompt_reuses_exactly_its_matching_chunks_bit_exactly(load_tiny, dtype):
    model = load_tiny(dtype)
    store = ChunkStore(MemoryStore(), model, CHUNK)
    document = ids(11, 4 * CHUNK + 10)
    store.precompute(document)
    prompt = document[:2 * CHUNK + 30] + ids(12, 20)  # agrees with the document for 2 chunks and 30 tokens
    hit = store.longest_prefix(prompt)
    assert (hit.chunks, hit.num_tokens) == (2, 2 * CHUNK)
    reused = model.continue_from(hit.kv, prompt[hit.num_tokens:], all_logits=True)
    scratch = chunked_prefill(model, prompt[:hit.num_tokens], CHUNK)  # the same steps from nothing
    fresh = model.continue_from(scratch, prompt[hit.num_tokens:], all_logits=True)
    assert torch.equal(reused.logits, fresh.logits)
    assert_kv_equal(reused.kv, fresh.kv)
    assert store.longest_prefix(ids(13, 3 * CHUNK)).chunks == 0


def test_a_missing_or_corrupt_chunk_ends_the_reused_run(model_f32):
    backing = MemoryStore()
    store = ChunkStore(backing, model_f32, CHUNK)
    document = ids(21, 4 * CHUNK)
    store.precompute(document)
    keys = store.keys(document)
    backing.delete(keys[2])
    assert store.longest_prefix(document).chunks == 2  # chunk 3 exists but cannot be used without chunk 2
    blob = bytearray(backing._blobs[keys[1]])
    blob[-1] ^= 1
    backing._blobs[keys[1]] = bytes(blob)
    assert store.longest_prefix(document).chunks == 1  # a bit flip is refused, never used, and dropped
    assert store.precompute(document).new_chunks == 2  # the missing and the corrupt chunk are recomputed
    assert store.longest_prefix(document).chunks == 4


def test_tenant_salts_keep_private_chunks_apart(model_f32):
    store = ChunkStore(MemoryStore(), model_f32, CHUNK)
    document = ids(31, 2 * CHUNK)
    store.precompute(document, salt="account-1")
    assert store.longest_prefix(document, salt="account-1").chunks == 2
    assert store.longest_prefix(document, salt="account-2").chunks == 0
    assert store.longest_prefix(document).chunks == 0


def test_chunks_are_shared_across_nodes_through_redis(model_f32, tmp_path: Path, tmp_path_factory):
    """Two nodes' tiered stores (own disks) over one real redis-server: node B stores a document that shares two
    chunks with node A's, writes only its new chunk, and reuses A's chunks fetched from Redis, bit-exactly."""
    from infra_support import RedisServer

    from kvmart.store import open_store

    redis = RedisServer(tmp_path_factory.mktemp("redis-chunks")).start()
    try:
        url = f"{redis.url}?prefix=chunks"
        node_a = ChunkStore(open_store(url, local_dir=tmp_path / "a"), model_f32, CHUNK)
        node_b = ChunkStore(open_store(url, local_dir=tmp_path / "b"), model_f32, CHUNK)
        system = ids(41, 2 * CHUNK)
        first = node_a.precompute(system + ids(42, CHUNK))
        second = node_b.precompute(system + ids(43, CHUNK))
        assert (first.new_chunks, second.new_chunks) == (3, 1)
        assert second.shared_bytes == 2 * (first.stored_bytes // 3)
        assert len(redis.client().keys("chunks:index:*")) == 4
        prompt = system + ids(44, 10)
        hit = node_b.longest_prefix(prompt)
        assert hit.chunks == 2
        assert_kv_equal(hit.kv, chunked_prefill(model_f32, system, CHUNK))
    finally:
        redis.stop()
