"""The linear layers in decode steps: why decoding many sequences at once changes no bit of any of them, and how
all their rows still go through each weight matrix in one product.

A decode step of B sequences multiplies a [B, hidden] matrix by each weight matrix. BLAS picks its method by the
number of rows and the methods round differently, so a sequence's row multiplied alone and in a batch can differ in
the last bit. Measured here with MKL's sgemm (AVX-512): float32 rows agree among 2-15 rows and among 16 and more,
but 1, 2-15 and 16+ differ from each other; bfloat16 rows agree from 1 to 32 rows and differ past that.

Two routes, both giving a row the same bits whatever the batch:
- **packed** (float32, the default where it holds): oneDNN's matrix product over the weights reordered once into
  its blocked layout (`torch.ops.mkldnn`, the route torch's own compiler takes for frozen CPU models). Its rows
  agree from 2 rows to many (its reduction order is fixed by the blocked weights, not by the number of rows; one
  row takes a vector route), so every decode step multiplies all its rows in one call per `MAX_ROWS` (a lone row
  padded to 2): 16 sequences read each weight once, and a sequence alone costs what it did. That agreement is a
  property of the library on this CPU, not a promise, so it is checked before it is used: on the first decode step
  under each thread count, `PackedRows.verify` multiplies random rows through one weight of every shape in calls of
  2 to MAX_ROWS rows and compares them bit for bit; if any differ, this model decodes by the fixed tiles below (and
  says so in its log). The reordered copies hold as much memory as the linear weights themselves (made at the
  first decode step; a model that only prefills never makes them).
- **fixed tiles** (bfloat16, and float32 where the check fails or oneDNN is missing): every linear layer multiplies
  fixed tiles of `tile` rows (the last one padded with zeros), one BLAS call per tile, so each row is computed by a
  call of the same shape whatever the batch, alone included. This relies only on a row's result, in a call of fixed
  shape, not depending on the other rows nor on its place among them; tests/test_batch.py checks that for the
  linear shapes of the built-in models in both dtypes.

Prompt pieces (prefill, continue_from) take neither route: their KV is stored and must stay what earlier releases
computed (plain nn.Linear, MKL's sgemm). Only decode steps, whose KV is never stored, do. A decode step's bits
therefore differ from a release that decoded by another route, as any kernel change would; within a release, alone
and batched agree (tests/test_batch.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("kvmart.runtime")

# Rows per BLAS call in a decode step on the fixed-tile route, by dtype (bench/decode_batch.py --route tiles --tile
# measures the choice). float32: 2, the smallest tile past the one-row method (a 2-row product costs what a 1-row one
# does); 16 sequences then read the weights 8 times. bfloat16: 16, within the 1-32 rows that agree, where the cost
# hardly grows with the rows.
ROW_TILES = {torch.float32: 2, torch.bfloat16: 16}

# The packed route: rows per oneDNN call at most (a larger batch takes several calls, none of one row), the row
# counts the check multiplies, and the batch-size hint the weights are reordered for (fixed: the layout must not
# change between calls).
MAX_ROWS = 64
CHECKED_ROWS = (2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, MAX_ROWS)
REORDER_HINT = 16


def packed_available() -> bool:
    """Whether this torch has oneDNN's reordered-weight matrix product."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (ops is not None and torch.backends.mkldnn.is_available()
                and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def row_calls(rows: int, max_rows: int = MAX_ROWS) -> list[tuple[int, int]]:
    """(start, stop) of the calls that multiply `rows` rows on the packed route: at most `max_rows` each and never one
    row alone (a lone row is padded to 2; a last call of one row takes a row from the call before it)."""
    if rows <= 1:
        return [(0, rows)]
    bounds = list(range(0, rows, max_rows)) + [rows]
    if bounds[-1] - bounds[-2] == 1:
        bounds[-2] -= 1
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class PackedRows:
    """The packed route of one model: its weights reordered for oneDNN (made once, on first use) and, per thread
    count, whether the check found every row count agreeing. Thread-safe."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._lock = threading.RLock()  # the check reorders weights under it
        self._packed: dict[int, torch.Tensor] = {}  # id(weight) -> reordered copy
        self._verified: dict[int, bool] = {}  # torch thread count -> the check's verdict

    def usable(self, dtype: torch.dtype) -> bool:
        """True when decode steps of this model may take the packed route now (float32, oneDNN present, checked
        under the current thread count: the first call runs the check)."""
        if dtype != torch.float32 or not packed_available():
            return False
        threads = torch.get_num_threads()
        with self._lock:
            if threads not in self._verified:
                self._verified[threads] = self._check()
            return self._verified[threads]

    def weight(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` reordered for oneDNN (the same copy every time)."""
        packed = self._packed.get(id(weight))
        if packed is None:
            with self._lock:
                packed = self._packed.get(id(weight))
                if packed is None:
                    packed = self._packed[id(weight)] = torch.ops.mkldnn._reorder_linear_weight(weight, REORDER_HINT)
        return packed

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, weight, bias) with all rows in as few calls as `row_calls` allows; a row gets the same bits in
        any of them."""
        flat = x.reshape(-1, x.shape[-1])
        packed, rows = self.weight(weight), flat.shape[0]
        if rows == 1:
            flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
        parts = [_packed_product(flat[a:b], packed, bias) for a, b in row_calls(flat.shape[0])]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out[:rows].reshape(*x.shape[:-1], weight.shape[0])

    @torch.inference_mode()
    def _check(self) -> bool:
        """Multiply random rows through one weight of every shape in calls of each CHECKED_ROWS count and compare
        each row with the same row in a MAX_ROWS call. False (and a warning) at the first difference."""
        seen: set[tuple[int, ...]] = set()
        g = torch.Generator().manual_seed(0)
        for module in self._model.modules():
            if not isinstance(module, nn.Linear) or module.weight.dtype != torch.float32:
                continue
            shape = tuple(module.weight.shape)
            if shape in seen:
                continue
            seen.add(shape)
            packed = self.weight(module.weight)
            x = torch.randn(MAX_ROWS, shape[1], generator=g)
            whole = _packed_product(x, packed, module.bias)
            for rows in CHECKED_ROWS:
                if not torch.equal(_packed_product(x[:rows], packed, module.bias), whole[:rows]):
                    log.warning("oneDNN's packed product rounds a row differently in a call of %d rows than of %d "
                                "(weight %s, %d threads): decode steps multiply fixed tiles instead", rows, MAX_ROWS,
                                shape, torch.get_num_threads())
                    return False
        return True


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class RowTiling(threading.local):
    """How this thread's linear layers multiply now: `tile` None outside decode steps (plain nn.Linear); inside, the
    fixed tile for the dtype, and `packed` when the packed route is in force. One per model; a thread's setting is
    its own, so a decode step on one thread never changes a prefill on another."""

    tile: int | None = None
    packed: PackedRows | None = None

    @contextmanager
    def rows(self, tile: int, packed: PackedRows | None = None) -> Iterator[None]:
        """Every linear layer of the model multiplies by the packed route (when given) or by `tile`-row tiles while
        inside."""
        before = self.tile, self.packed
        self.tile, self.packed = tile, packed
        try:
            yield
        finally:
            self.tile, self.packed = before


class TiledLinear(nn.Linear):
    """An nn.Linear that multiplies by the decode-step route in force (packed, or tiles of `tiling.tile` rows), and
    exactly as nn.Linear otherwise. Made by `install` from the model's own nn.Linear modules (same parameters, no
    copy)."""

    tiling: RowTiling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tile, packed = self.tiling.tile, self.tiling.packed
        if tile is None:
            return F.linear(x, self.weight, self.bias)
        if packed is not None:
            return packed.linear(x, self.weight, self.bias)
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
