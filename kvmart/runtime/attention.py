"""kvmart's attention implementation, registered with transformers as "kvmart" and the default.

It attends over a `WorkingCache` in segmented mode: the prefix's pieces (read-only, never copied), then the
request's new tokens. Two kernels, both exact functions of their inputs (no data-dependent paths), so the cached
and uncached runs of the same piece-by-piece computation agree bit for bit:
- prefill from scratch (no prefix, queries = keys): torch's fused SDPA, causal, with grouped-query attention done
  inside the kernel (`enable_gqa`) instead of copying every KV head `n_rep` times (transformers' repeat_kv);
- anything after a prefix, or a decode step: plain grouped matmuls, one per segment. Queries of the heads that share
  a KV head are stacked so each KV head is read once; scores over all segments are concatenated (a few MB) and
  softmaxed in float32 together, so the result is one softmax over the whole context, not a merge of partial ones;
  the weighted values are summed segment by segment in a fixed order (the new tokens, then the pieces in order)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

NAME = "kvmart"


def segmented_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                        scaling: float | None = None, dropout: float = 0.0, kvmart_cache=None, **kwargs):
    """query [1, Hq, q, D]; key/value: the new-token segment [1, Hkv, s, D] ending with the q queries' own tokens.
    Returns ([1, q, Hq, D], None), the layout transformers' attention functions return."""
    if kvmart_cache is None:
        raise AssertionError("kvmart attention needs the WorkingCache passed as `kvmart_cache`")
    layer = kvmart_cache.working_layers[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if not layer.segments and key.shape[-2] == query.shape[-2]:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
    else:
        out = grouped_attention(query, layer.segments, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


def grouped_attention(query: torch.Tensor, segments: Sequence[tuple[torch.Tensor, torch.Tensor]], key: torch.Tensor,
                      value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q queries over [*segments, new segment]. Returns [1, Hq, q, D]."""
    _, num_heads, q_len, head_dim = query.shape
    kv_heads, seg_len = key.shape[1], key.shape[-2]
    group = num_heads // kv_heads
    q = query.reshape(1, kv_heads, group * q_len, head_dim)  # heads sharing a KV head, stacked
    new_scores = torch.matmul(q, key.transpose(-1, -2))
    causal = torch.ones(q_len, seg_len, dtype=torch.bool).tril(seg_len - q_len)  # query i sees segment j <= i
    new_scores.masked_fill_(~causal.repeat(group, 1), float("-inf"))
    scores = [torch.matmul(q, k.transpose(-1, -2)) for k, _ in segments] + [new_scores]
    probs = torch.softmax(torch.cat(scores, dim=-1).float() * scale, dim=-1).to(query.dtype)
    out = torch.matmul(probs[..., -seg_len:], value)
    start = 0
    for k, v in segments:
        end = start + k.shape[-2]
        out += torch.matmul(probs[..., start:end], v)
        start = end
    return out.reshape(1, num_heads, q_len, head_dim)


def register() -> None:
    """Make "kvmart" a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segmented_attention)
