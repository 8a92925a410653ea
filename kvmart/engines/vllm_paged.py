"""Moving KV between kvmart's layout (per layer, [1, kv_heads, tokens, head_dim] keys and values: docs/FORMAT.md)
and vLLM's paged KV buffers (per layer, blocks of `block_size` token slots). Pure torch, no vLLM import: the
connector (engines/vllm_connector.py) calls these on vLLM's buffers, the tests on plain tensors."""

from __future__ import annotations

import torch

from kvmart.errors import KvmartError


def paged_views(kv_cache: torch.Tensor, block_size: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer's paged buffer, each as a [num_blocks, kv_heads, block_size, head_dim] view.

    vLLM's logical per-layer shape is [num_blocks, kv_heads, block_size, 2 * head_dim]. The CPU backend reads each
    (block, head) run as block_size keys then block_size values; the GPU backends (flash attention, triton) split
    the last axis, keys first (vllm/v1/attention/backends/cpu_attn.py, flash_attn.py)."""
    num_blocks, heads, tokens, content = kv_cache.shape
    if tokens != block_size:
        raise KvmartError(f"vLLM's kernel block size {tokens} differs from its block size {block_size}: start vLLM "
                          f"with a block size its {backend} kernels take whole (e.g. {tokens})")
    if backend == "CPU_ATTN":
        halves = kv_cache.view(num_blocks, heads, 2 * tokens, content // 2)
        return halves[:, :, :tokens], halves[:, :, tokens:]
    return kv_cache[..., :content // 2], kv_cache[..., content // 2:]


def scatter(blocks: torch.Tensor, source: torch.Tensor, start: int, end: int, block_ids: list[int],
            block_size: int) -> None:
    """Write positions [start, end) of `source` ([1, kv_heads, tokens, head_dim]) into whole blocks."""
    heads, dim = source.shape[1], source.shape[3]
    chunk = source[0, :, start:end].reshape(heads, len(block_ids), block_size, dim).transpose(0, 1)
    index = torch.tensor(block_ids, dtype=torch.long, device=blocks.device)
    blocks.index_copy_(0, index, chunk.to(blocks.device, blocks.dtype))


def gather(blocks: torch.Tensor, block_ids: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    """Positions [0, num_tokens) held in `block_ids`, as [1, kv_heads, num_tokens, head_dim] on the CPU."""
    index = torch.tensor(block_ids[:-(-num_tokens // block_size)], dtype=torch.long, device=blocks.device)
    picked = blocks.index_select(0, index)  # [n, heads, block_size, dim]
    heads, dim = picked.shape[1], picked.shape[3]
    return picked.transpose(0, 1).reshape(heads, -1, dim)[:, :num_tokens].unsqueeze(0).contiguous().cpu()
