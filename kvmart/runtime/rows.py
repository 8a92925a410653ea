"""Row-tiled linear layers for decode steps: why decoding many sequences at once changes no bit of any of them.

A decode step of B sequences multiplies a [B, hidden] matrix by each weight matrix. BLAS picks its method by the
number of rows (one row: a matrix-vector product; a few rows; many) and the methods round differently, so a
sequence's row multiplied alone and in a batch can differ in the last bit. Measured here (MKL, AVX-512): float32
rows agree among 2-15 rows and among 16 and more, but 1, 2-15 and 16+ differ from each other; bfloat16 rows agree
from 1 to 32 rows and differ past that. So during a decode step every linear layer multiplies fixed tiles of
`tile` rows (the last one padded with zeros), one BLAS call per tile: each row is computed by a call of the same
shape whatever the batch, alone included. This relies only on a row's result, in a call of fixed shape, not
depending on the other rows nor on its place among them; tests/test_batch.py checks that for the linear shapes
of the built-in models in both dtypes.

Prompt pieces (prefill, continue_from) are never tiled: their KV is stored and must stay what earlier releases
computed. Only decode steps, whose KV is never stored, take this path."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# Rows per BLAS call in a decode step, by dtype (bench/decode_batch.py --tile measures the choice). float32: 2, the
# smallest tile past the one-row method; a 2-row product costs what a 1-row one does (both read the weights once),
# so a sequence alone decodes as fast as before, and 16 sequences read the weights 8 times instead of 16 (tiles of
# 16, MKL's many-row method, read them once but make a sequence alone 1.7x slower on SmolLM2-135M). bfloat16: 16,
# within the 1-32 rows that agree, where the cost hardly grows with the rows.
ROW_TILES = {torch.float32: 2, torch.bfloat16: 16}


class RowTiling(threading.local):
    """The tile size in force on this thread: None outside decode steps. One per model; a thread's setting is its
    own, so a decode step on one thread never tiles a prefill on another."""

    tile: int | None = None

    @contextmanager
    def rows(self, tile: int) -> Iterator[None]:
        """Tile every linear layer of the model by `tile` rows while inside."""
        before, self.tile = self.tile, tile
        try:
            yield
        finally:
            self.tile = before


class TiledLinear(nn.Linear):
    """An nn.Linear that multiplies in tiles of `tiling.tile` rows while a decode step is in force, and exactly as
    nn.Linear otherwise. Made by `install` from the model's own nn.Linear modules (same parameters, no copy)."""

    tiling: RowTiling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tile = self.tiling.tile
        if tile is None:
            return F.linear(x, self.weight, self.bias)
        return tiled_linear(x, self.weight, self.bias, tile)


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
    """F.linear(x, weight, bias), computed one `tile`-row BLAS call at a time (rows padded with zeros)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    padded = -(-rows // tile) * tile
    if padded != rows:
        flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
    out = torch.cat([F.linear(flat[i:i + tile], weight, bias) for i in range(0, padded, tile)])
    return out[:rows].reshape(*x.shape[:-1], weight.shape[0])


def install(module: nn.Module, tiling: RowTiling) -> int:
    """Turn every nn.Linear inside `module` into a TiledLinear driven by `tiling`. Returns how many. Idempotent."""
    count = 0
    for child in module.modules():
        if isinstance(child, nn.Linear):
            child.__class__ = TiledLinear
            object.__setattr__(child, "tiling", tiling)  # a plain attribute, not a submodule or parameter
            count += 1
    return count
