"""Attention of one decode step over many sequences, reading a segment they share once for all of them.

In a decode step each sequence has one query row per head and attends over its whole cache: the pieces of its
prefix, then its new tokens. Many sequences share pieces (a hot document's chunks are the same tensors for every
request about it), and with one row each the step is bound by reading keys and values, not by arithmetic. So the
rows of the sequences that share a run of pieces are multiplied by each piece together, one BLAS call per piece
for a tile of them.

Exactness, as for the linear layers (kvmart/runtime/rows.py): a row's result must not depend on which sequences
share its products. Per sequence, the arithmetic is fixed whatever the batch: each segment's scores q·kᵀ in the
model's dtype, converted to float32 and multiplied by the scale, one softmax in float32 over the whole context, the
probabilities in the model's dtype, then the weighted values summed from zero segment by segment in the cache's
order. The products are where the batch could show: BLAS rounds a row by the number of rows it is given (measured
here, float32: q·kᵀ rows agree from 3 rows up at head size 64 and from 6 up at 128; probabilities times values from
2 up). So every product has at least `tile_rows` rows (a sequence alone: its own rows, zeros in the others), and
the sequences sharing a run of segments are multiplied by them all at once, in one product of as many rows as they
fill, only where that row count was checked to round each row as `tile_rows` rows do: `_agrees` multiplies random
rows by the very segments (same shapes and strides) at both counts and compares bit for bit, once per segment shape,
row count and thread count; where they differ, the sequences take tiles of exactly `tile_rows` rows (a call of
fixed shape, whose rows depend on nothing else). (Prompt pieces use kvmart/runtime/attention.py's kernel, whose
bits stored caches depend on; decode steps' KV is never stored.)"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from kvmart.runtime.kv import Segment, WorkingLayer
from kvmart.runtime.workspace import Workspace

# Query rows per product at least (tile_rows: a whole number of sequences' groups of heads), past the row counts
# that round alike only among themselves (above). A sequence alone pays for the padding rows: measured on
# SmolLM2-135M in float32 at a 3.6k-token context (bench/decode_batch.py --attention-tile), 16 made a sequence alone
# 0.73x as fast as before batching, 8 0.81x, 4 0.88x.
ROW_TILE = 8
# Rows of one product of sequences sharing segments at most (more sequences: several products).
MAX_ROWS = 64

_checked: dict[tuple, bool] = {}  # (segment shapes and strides, dtype, rows, tile rows, threads) -> _agrees' verdict
_checked_lock = threading.Lock()


def tile_rows(group: int) -> int:
    """Rows per tile for `group` query heads per KV head: the most whole groups within ROW_TILE (at least one)."""
    return group * max(1, ROW_TILE // group)


def decode_attention(query: torch.Tensor, layers: Sequence[WorkingLayer], scale: float,
                     workspace: Workspace) -> torch.Tensor:
    """query [B, Hq, 1, D]: one row per sequence, row b attending over `layers[b]` (its pieces, then its new tokens,
    the step's own included). Returns [B, 1, Hq, D] (a new tensor)."""
    batch, num_heads, _, head_dim = query.shape
    kv_heads = layers[0].key_buffer.shape[1]
    group = num_heads // kv_heads
    least = tile_rows(group)
    views = [_views(layer) for layer in layers]
    out = query.new_empty(batch, 1, num_heads, head_dim)
    for users in _tiles(views, max(least, MAX_ROWS) // group):
        tile = [views[b] for b in users]
        rows = max(least, group * len(users))
        if rows == least or _agrees(tile, rows, least, query.dtype, workspace):
            _tile(query, tile, users, rows, scale, workspace, out)
            continue
        per_tile = least // group
        for i in range(0, len(users), per_tile):
            part = users[i:i + per_tile]
            _tile(query, [views[b] for b in part], part, least, scale, workspace, out)
    return out


def _tiles(views: list[list[Segment]], per_tile: int) -> list[list[int]]:
    """The sequences in tiles of at most `per_tile`: those whose first segment is the same tensor together."""
    by_first: dict[tuple[int, ...], list[int]] = {}
    for b, segments in enumerate(views):
        by_first.setdefault(_identity(segments[0][0]), []).append(b)
    return [users[i:i + per_tile] for users in by_first.values() for i in range(0, len(users), per_tile)]


def _agrees(views: list[list[Segment]], rows: int, least: int, dtype: torch.dtype, workspace: Workspace) -> bool:
    """Whether products of `rows` rows by the segments these sequences share round every row as products of `least`
    rows do: checked with random rows against the segments themselves, once per (shapes, strides, dtype, row counts,
    thread count)."""
    shared = views[0][:_shared(views)]
    key = (tuple((k.shape, k.stride(), v.shape, v.stride()) for k, v in shared), dtype, rows, least,
           torch.get_num_threads())
    with _checked_lock:
        verdict = _checked.get(key)
    if verdict is None:
        verdict = _check(shared, rows, least, dtype, workspace)
        with _checked_lock:
            _checked[key] = verdict
    return verdict


def _check(segments: list[Segment], rows: int, least: int, dtype: torch.dtype, workspace: Workspace) -> bool:
    """_agrees' comparison: the scores and the weighted values of random rows, in a product of `rows` rows and of
    `least` (its first rows), by the kernels' own functions."""
    kv_heads, head_dim = segments[0][0].shape[:2]
    lengths = [k.shape[-1] for k, _ in segments]
    g = torch.Generator().manual_seed(rows)
    q = torch.randn(kv_heads, rows, head_dim, generator=g).to(dtype)
    p = torch.rand(kv_heads, rows, sum(lengths), generator=g).to(dtype)
    factor = workspace.scalar(0.125)
    results = []
    for n in (rows, least):
        scores = torch.empty(kv_heads, n, sum(lengths))
        _scores_into(scores, q[:, :n].contiguous(), segments, lengths, factor, workspace)
        acc = torch.zeros(kv_heads, n, head_dim, dtype=dtype)
        _values_into(acc, p[:, :n].contiguous(), segments, lengths, workspace)
        results.append((scores, acc))
    (scores, acc), (few_scores, few_acc) = results
    return torch.equal(scores[:, :least], few_scores) and torch.equal(acc[:, :least], few_acc)


def _views(layer: WorkingLayer) -> list[Segment]:
    """The layer's segments as (keys transposed [Hkv, D, n], values [Hkv, n, D]), the new tokens last."""
    keys, values = layer.new_segment()
    return [*layer.segment_views(), (keys[0].transpose(-1, -2), values[0])]


def _identity(keys_t: torch.Tensor) -> tuple[int, ...]:
    return (keys_t.data_ptr(), *keys_t.shape, *keys_t.stride())


def _shared(views: list[list[Segment]]) -> int:
    """How many leading segments every sequence of a tile has in common (the same tensors)."""
    count = 0
    for segments in zip(*views, strict=False):
        if any(_identity(k) != _identity(segments[0][0]) for k, _ in segments):
            break
        count += 1
    return count


def _tile(query: torch.Tensor, views: list[list[Segment]], users: list[int], rows: int, scale: float,
          workspace: Workspace, out: torch.Tensor) -> None:
    """Attention of the sequences `users` (views[j] is users[j]'s), sharing one tile of `rows` rows: the segments
    they all share multiplied once for all, the others sequence by sequence (each in a tile of its own, of
    tile_rows). Writes out[users]."""
    num_heads, head_dim, dtype = query.shape[1], query.shape[3], query.dtype
    kv_heads = views[0][0][0].shape[0]
    group = num_heads // kv_heads
    least = tile_rows(group)
    factor = workspace.scalar(scale)
    shared = _shared(views)
    lengths = [[k.shape[-1] for k, _ in segments] for segments in views]
    shared_tokens = sum(lengths[0][:shared])

    q_tile = workspace.take("dq", (kv_heads, rows, head_dim), dtype).zero_()
    for j, b in enumerate(users):
        q_tile[:, j * group:(j + 1) * group].copy_(query[b, :, 0].reshape(kv_heads, group, head_dim))
    # scores: the shared columns for the whole tile, then each sequence's own row block over its whole context
    s_tile = workspace.take("ds", (kv_heads, rows, shared_tokens), torch.float32)
    _scores_into(s_tile, q_tile, views[0][:shared], lengths[0][:shared], factor, workspace)
    per_user = []
    for j, segments in enumerate(views):
        context = sum(lengths[j])
        scores = workspace.take(f"dsu{j}", (kv_heads, group, context), torch.float32)
        scores[:, :, :shared_tokens].copy_(s_tile[:, j * group:(j + 1) * group])
        if shared < len(segments):
            own = workspace.take("dqo", (kv_heads, least, head_dim), dtype).zero_()
            own[:, :group].copy_(q_tile[:, j * group:(j + 1) * group])
            own_scores = workspace.take("dso", (kv_heads, least, context - shared_tokens), torch.float32)
            _scores_into(own_scores, own, segments[shared:], lengths[j][shared:], factor, workspace)
            scores[:, :, shared_tokens:].copy_(own_scores[:, :group])
        torch.ops.aten._softmax.out(scores, -1, False, out=scores)  # in place: each row read before written
        per_user.append(scores)
    # weighted values: the shared segments for the tile, from zero; then each sequence's own ones
    p_tile = workspace.take("dp", (kv_heads, rows, shared_tokens), dtype).zero_()
    for j, scores in enumerate(per_user):
        p_tile[:, j * group:(j + 1) * group].copy_(scores[:, :, :shared_tokens])
    acc = workspace.take("dacc", (kv_heads, rows, head_dim), dtype).zero_()
    _values_into(acc, p_tile, views[0][:shared], lengths[0][:shared], workspace)
    for j, (b, segments, scores) in enumerate(zip(users, views, per_user, strict=True)):
        mine = acc[:, j * group:(j + 1) * group]
        if shared < len(segments):
            own_p = workspace.take("dpo", (kv_heads, least, scores.shape[-1] - shared_tokens), dtype).zero_()
            own_p[:, :group].copy_(scores[:, :, shared_tokens:])
            own_acc = workspace.take("dacco", (kv_heads, least, head_dim), dtype).zero_()
            own_acc[:, :group].copy_(mine)
            _values_into(own_acc, own_p, segments[shared:], lengths[j][shared:], workspace)
            mine = own_acc[:, :group]
        out[b, 0].copy_(mine.reshape(num_heads, head_dim))


def _scores_into(target: torch.Tensor, q_tile: torch.Tensor, segments: list[Segment], lengths: list[int],
                 factor: torch.Tensor, workspace: Workspace) -> None:
    """target[:, :, columns of segment i] = float32(q_tile · keys_iᵀ) * factor, one product per segment."""
    start = 0
    for (keys_t, _), n in zip(segments, lengths, strict=True):
        block = torch.bmm(q_tile, keys_t, out=workspace.take("dblock", (*q_tile.shape[:2], n), q_tile.dtype))
        if block.dtype == torch.float32:
            torch.mul(block, factor, out=target[:, :, start:start + n])
        else:  # a bfloat16 product would be rounded to bfloat16 before landing in float32
            target[:, :, start:start + n].copy_(block).mul_(factor)
        start += n


def _values_into(acc: torch.Tensor, probs: torch.Tensor, segments: list[Segment], lengths: list[int],
                 workspace: Workspace) -> None:
    """acc += probs[:, :, columns of segment i] · values_i, segment by segment in order. Each segment's columns are
    copied out first, so every product reads the same layout whatever the context around it (BLAS may round by
    the row stride and alignment it is given)."""
    part = workspace.take("dpart", acc.shape, acc.dtype)
    start = 0
    for (_, values), n in zip(segments, lengths, strict=True):
        columns = workspace.take("dpcols", (*probs.shape[:2], n), probs.dtype).copy_(probs[:, :, start:start + n])
        acc.add_(torch.bmm(columns, values, out=part))
        start += n
