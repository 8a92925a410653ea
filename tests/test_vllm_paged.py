"""Moving KV between kvmart's [1, kv_heads, tokens, head_dim] layout and vLLM's paged buffers (engines/vllm_paged.py):
round trips are bit-exact, writes land in the named blocks only and in place, and each backend's layout is the
one its kernels read. Plain tensors: no vLLM needed (the connector's end-to-end tests are tests/test_vllm.py)."""

from __future__ import annotations

import pytest
import torch

from kvmart.engines.vllm_paged import gather, paged_views, scatter
from kvmart.errors import KvmartError

BLOCKS, HEADS, BLOCK, DIM = 9, 2, 4, 8


def buffer(seed: int = 0) -> torch.Tensor:
    """One layer's paged buffer as vLLM allocates it: [num_blocks, kv_heads, block_size, 2 * head_dim]."""
    return torch.randn(BLOCKS, HEADS, BLOCK, 2 * DIM, generator=torch.Generator().manual_seed(seed))


def kv(tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, HEADS, tokens, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["CPU_ATTN", "FLASH_ATTN"])
def test_views_share_the_buffer(backend):
    cache = buffer()
    keys, values = paged_views(cache, BLOCK, backend)
    assert keys.shape == values.shape == (BLOCKS, HEADS, BLOCK, DIM)
    keys[3, 1, 2].fill_(7.0)
    values[3, 1, 2].fill_(-7.0)
    assert (cache == 7.0).sum() == DIM and (cache == -7.0).sum() == DIM  # written in place, nowhere else


def test_cpu_layout_is_keys_then_values_per_block_and_head():
    """vllm/v1/attention/backends/cpu_attn.py reads kv_cache.view(blocks, heads, 2 * block, -1).chunk(2, dim=2)."""
    cache = buffer()
    keys, values = paged_views(cache, BLOCK, "CPU_ATTN")
    kernel_keys, kernel_values = cache.view(BLOCKS, HEADS, 2 * BLOCK, DIM).chunk(2, dim=2)
    assert torch.equal(keys, kernel_keys) and torch.equal(values, kernel_values)


def test_gpu_layout_splits_the_last_axis():
    """vllm/v1/attention/backends/flash_attn.py: kv_cache.transpose(1, 2).split(head_size, dim=-1)."""
    cache = buffer()
    keys, values = paged_views(cache, BLOCK, "FLASH_ATTN")
    assert torch.equal(keys, cache[..., :DIM]) and torch.equal(values, cache[..., DIM:])


@pytest.mark.parametrize("backend", ["CPU_ATTN", "FLASH_ATTN"])
def test_scatter_then_gather_is_bit_exact_and_touches_only_its_blocks(backend):
    cache = buffer()
    before = cache.clone()
    keys, _ = paged_views(cache, BLOCK, backend)
    source, block_ids = kv(3 * BLOCK), [5, 2, 7]
    scatter(keys, source, 0, 3 * BLOCK, block_ids, BLOCK)
    assert torch.equal(gather(keys, block_ids, 3 * BLOCK, BLOCK), source)
    untouched = [b for b in range(BLOCKS) if b not in block_ids]
    assert torch.equal(cache[untouched], before[untouched])
    assert not torch.equal(cache[block_ids], before[block_ids])


def test_scatter_from_the_middle_leaves_earlier_blocks_alone():
    """Blocks vLLM's own prefix cache already holds (positions before `start`) are shared: never written."""
    cache = buffer()
    keys, _ = paged_views(cache, BLOCK, "CPU_ATTN")
    source = kv(3 * BLOCK)
    prefix_block = keys[4].clone()
    scatter(keys, source, BLOCK, 3 * BLOCK, [1, 6], BLOCK)
    assert torch.equal(keys[4], prefix_block)
    assert torch.equal(gather(keys, [4, 1, 6], 3 * BLOCK, BLOCK)[:, :, BLOCK:], source[:, :, BLOCK:])


def test_gather_cuts_a_partial_last_block():
    keys, _ = paged_views(buffer(), BLOCK, "CPU_ATTN")
    source = kv(2 * BLOCK)
    scatter(keys, source, 0, 2 * BLOCK, [3, 8], BLOCK)
    got = gather(keys, [3, 8, 0], BLOCK + 3, BLOCK)  # a prompt of 7 tokens: one whole block and 3 slots
    assert got.shape == (1, HEADS, BLOCK + 3, DIM) and got.is_contiguous()
    assert torch.equal(got, source[:, :, :BLOCK + 3])


def test_a_kernel_block_size_other_than_vllms_is_refused():
    with pytest.raises(KvmartError, match="kernel block size"):
        paged_views(buffer(), 2 * BLOCK, "CPU_ATTN")
