"""kvmart's attention implementation, registered with transformers as "kvmart" and the default.

It attends over a `WorkingCache` in segmented mode: the prefix's pieces (read-only, never copied), then the
request's new tokens. Two kernels, both exact functions of their inputs (no data-dependent paths), so the cached
and uncached runs of the same piece-by-piece computation agree bit for bit:
- prefill from scratch (no prefix, queries = keys): torch's fused SDPA, causal, with grouped-query attention done
  inside the kernel (`enable_gqa`) instead of copying every KV head `n_rep` times (transformers' repeat_kv);
- anything after a prefix, or a decode step: plain grouped matmuls, one per segment. Queries of the heads that share
  a KV head are stacked so each KV head is read once; the scores of every segment are written side by side into one
  float32 matrix and softmaxed together, so the result is one softmax over the whole context, not a merge of partial
  ones; the weighted values are summed segment by segment in a fixed order (the new tokens, then the pieces in
  order). The matrices live in a `Workspace` reused by every layer: scaling and softmax run in place, and nothing
  is concatenated or allocated per layer beyond a few small tensors.

The segmented kernel's arithmetic is the same, operation for operation, as the previous one's (up to c7f52d3, which
built the score matrix with `torch.cat` and allocated at every layer), so caches stored before stay bit-exact with
caches computed now; tests/test_attention.py checks it against that implementation (`reference_attention`) in both
dtypes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kvmart.runtime.decode_attention import decode_attention
from kvmart.runtime.kv import BatchCache, PackedCache, WorkingLayer
from kvmart.runtime.workspace import Workspace

NAME = "kvmart"


def segmented_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                        scaling: float | None = None, dropout: float = 0.0, kvmart_cache=None,
                        kvmart_workspace: Workspace | None = None, **kwargs):
    """query [1, Hq, q, D]; key/value: the new-token segment [1, Hkv, s, D] ending with the q queries' own tokens.
    Returns ([1, q, Hq, D], None), the layout transformers' attention functions return."""
    if kvmart_cache is None:
        raise AssertionError("kvmart attention needs the WorkingCache passed as `kvmart_cache`")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(kvmart_cache, BatchCache):  # a decode step: one row per sequence, each over its own cache
        layers = [cache.working_layers[module.layer_idx] for cache in kvmart_cache.caches]
        workspace = kvmart_workspace if kvmart_workspace is not None else Workspace()
        return decode_attention(query, layers, scale, workspace), None
    if isinstance(kvmart_cache, PackedCache):  # prompt pieces of several sequences, one after another
        parts = []
        for (start, end), cache in zip(kvmart_cache.bounds, kvmart_cache.caches, strict=True):
            layer = cache.working_layers[module.layer_idx]
            keys, values = layer.new_segment()
            parts.append(_piece_attention(query[:, :, start:end], layer, keys, values, scale, kvmart_workspace))
        return torch.cat(parts, dim=1), None
    layer = kvmart_cache.working_layers[module.layer_idx]
    return _piece_attention(query, layer, key, value, scale, kvmart_workspace), None


def _piece_attention(query: torch.Tensor, layer: WorkingLayer, key: torch.Tensor, value: torch.Tensor, scale: float,
                     workspace: Workspace | None) -> torch.Tensor:
    """One prompt piece's attention over its layer (`key`/`value`: its new-token segment, the piece's own tokens
    last): [1, q, Hq, D], a tensor of its own."""
    if not layer.segments and key.shape[-2] == query.shape[-2]:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous()
    out = grouped_attention(query, layer.segments, key, value, scale, workspace, layer.segment_views())
    # a copy of the workspace's output in transformers' layout (a plain `contiguous` may return the view itself)
    return out.transpose(1, 2).clone(memory_format=torch.contiguous_format)


def grouped_attention(query: torch.Tensor, segments: Sequence[tuple[torch.Tensor, torch.Tensor]], key: torch.Tensor,
                      value: torch.Tensor, scale: float, workspace: Workspace | None = None,
                      views: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Causal attention of q queries over [*segments, new segment]. Returns [1, Hq, q, D], a view into `workspace`
    (valid until its next use; a fresh workspace when None). `views`: the segments as (keys transposed, values)
    without their leading 1 (WorkingLayer.segment_views), when the caller keeps them.

    The arithmetic: each segment's scores q·kᵀ in the model's dtype, the new segment's future positions set to -inf,
    all scores converted to float32 and multiplied by `scale` (block by block, while each is in cache), one softmax
    in float32 over the whole context, the probabilities back to the model's dtype, then the new segment's weighted
    values plus each piece's, in order."""
    workspace = workspace if workspace is not None else Workspace()
    _, num_heads, q_len, head_dim = query.shape
    kv_heads, seg_len = key.shape[1], key.shape[-2]
    group, dtype = num_heads // kv_heads, query.dtype
    rows = group * q_len
    context = seg_len + sum(k.shape[-2] for k, _ in segments)
    q = query.reshape(kv_heads, rows, head_dim)  # heads sharing a KV head, stacked
    scores = workspace.take("scores", (kv_heads, rows, context), torch.float32)
    views = [*(views if views is not None else [(k[0].transpose(-1, -2), v[0]) for k, v in segments]),
             (key[0].transpose(-1, -2), value[0])]
    spans = _spans(segments) + [(context - seg_len, context)]
    factor = workspace.scalar(scale)
    for (keys_t, _), (start, end) in zip(views, spans, strict=True):
        # into a contiguous block first: a strided `out` makes bmm take another BLAS route (per-batch gemm instead
        # of the batched one), which for a single query row rounds differently from the route taken before
        block = torch.bmm(q, keys_t, out=workspace.take("block", (kv_heads, rows, end - start), dtype))
        if end == context and q_len > 1:  # one query sees every new token; more see only those up to their own
            block.masked_fill_(_future(q_len, seg_len, group), float("-inf"))
        _scale_into(scores[:, :, start:end], block, factor)
    torch.ops.aten._softmax.out(scores, -1, False, out=scores)  # in place: the kernel reads each row before writing it
    probs = scores if dtype == torch.float32 else workspace.take("probs", scores.shape, dtype).copy_(scores)
    out = workspace.take("out", (kv_heads, rows, head_dim), dtype)
    torch.bmm(probs[:, :, context - seg_len:], views[-1][1], out=out)
    if segments:
        part = workspace.take("part", (kv_heads, rows, head_dim), dtype)
        for (_, v), (start, end) in zip(views[:-1], spans[:-1], strict=True):
            out.add_(torch.bmm(probs[:, :, start:end], v, out=part))
    return out.view(1, num_heads, q_len, head_dim)


def reference_attention(query: torch.Tensor, segments: Sequence[tuple[torch.Tensor, torch.Tensor]], key: torch.Tensor,
                        value: torch.Tensor, scale: float) -> torch.Tensor:
    """The arithmetic `grouped_attention` must reproduce bit for bit: the previous kernel (81d1c4a to c7f52d3),
    verbatim. Never edit it: caches stored by earlier releases were computed with it. Slow (it allocates and
    concatenates at every layer); used by tests/test_attention.py and `bench/reuse_vs_prefill.py --kernels`."""
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


def _scale_into(target: torch.Tensor, block: torch.Tensor, scale: torch.Tensor) -> None:
    """target (float32) = float32(block) * scale (a 0-dim float32 tensor), rounded as converting first and then
    multiplying rounds."""
    if block.dtype == torch.float32:
        torch.mul(block, scale, out=target)
    else:  # a bfloat16 product would be rounded to bfloat16 before landing in float32
        target.copy_(block).mul_(scale)


def _spans(segments: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[int, int]]:
    """Each segment's [start, end) in the context."""
    spans, start = [], 0
    for k, _ in segments:
        spans.append((start, start + k.shape[-2]))
        start += k.shape[-2]
    return spans


def _future(q_len: int, seg_len: int, group: int) -> torch.Tensor:
    """[group * q_len, seg_len] bool: True where a query (the last q_len of the segment's tokens, for each head of a
    group) would see a later token."""
    visible = torch.ones(q_len, seg_len, dtype=torch.bool).tril(seg_len - q_len)  # query i sees segment j <= i
    return ~visible.repeat(group, 1)


def register() -> None:
    """Make "kvmart" a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segmented_attention)
