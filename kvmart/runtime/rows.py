"""How the linear layers multiply: one route whose rows round alike however many there are and on any number of
threads, so that prompt pieces computed on any node, and decode steps batched with any others, get the same bits.

BLAS picks its method by the number of rows of a product and by how it splits the work between threads, and the
methods round differently. Measured here with MKL's sgemm (AVX-512, what nn.Linear calls on the CPU): in float32 a
row multiplied among 1, 2-15 and 16+ rows rounds three ways; on two threads past 57-257 rows (by shape) in yet
another way; and a 256-token chunk of the Qwen3-0.6B shape prefilled on one thread and on two gets different KV.
bfloat16 rows agree from 1 to 32 rows and differ past that.

Two routes:
- **packed** (float32, where it holds: the default): oneDNN's matrix product over the weights reordered once into
  its blocked layout (`torch.ops.mkldnn`, the route torch's own compiler takes for frozen CPU models). Its reduction
  order is fixed by the blocked weights, so a row rounds alike in any call of 2 rows or more (one row takes a vector
  route: a lone row is padded to 2) and on any number of threads. Every forward pass takes it: a prompt piece of
  any length (in calls of at most `MAX_ROWS` rows), and a decode step, whose rows of every sequence go through each
  weight in one call (16 sequences read each weight once). That agreement is a property of the library on this CPU,
  not a promise, so it is checked before a model uses it (`PackedRows.check`): random rows through one weight of
  every shape in calls of `CHECKED_ROWS` rows, compared bit for bit with the same rows in a call of MAX_ROWS, on the
  thread count in force and on one thread; at load, and again for each new thread count. A model whose check
  fails at load takes the other route; one whose check fails later refuses to compute (InconsistentKernelError)
  rather than compute other bits. The route, with the instruction set its kernels were picked for, is a component
  of the model fingerprint (`linear`, e.g. "onednn-packed avx512"), so caches computed by the other route or on
  another kind of CPU are never taken for this one's. The reordered copies hold as much memory as the linear weights
  themselves.
- **sgemm** (bfloat16, and float32 where the check fails or oneDNN is missing; what kvmart did before): prompt
  pieces through nn.Linear as they are (their caches are bit-exact only between nodes with the same thread count,
  see above), and decode steps in fixed tiles of `ROW_TILES` rows (the last one padded with zeros), one BLAS call
  per tile, so each row is computed by a call of the same shape whatever the batch, alone included.
  tests/test_batch.py checks both routes for the linear shapes of the built-in models."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from kvmart.errors import InconsistentKernelError

log = logging.getLogger("kvmart.runtime")

PACKED = "onednn-packed"  # the packed route's name (the sgemm route has no fingerprint component)


def fingerprint_component() -> str:
    """The packed route's fingerprint component: its name and the instruction set torch dispatches to here (oneDNN
    picks its kernels by it, and kernels for other instruction sets may round differently: a cache made on another
    kind of CPU is another model's, never taken for this one's), e.g. "onednn-packed avx512"."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return f"{PACKED} {capability.lower()}"

# Rows per BLAS call in a decode step on the sgemm route, by dtype (bench/decode_batch.py --route sgemm --tile
# measures the choice). float32: 2, the smallest tile past the one-row method (a 2-row product costs what a 1-row one
# does); 16 sequences then read the weights 8 times. bfloat16: 16, within the 1-32 rows that agree, where the cost
# hardly grows with the rows.
ROW_TILES = {torch.float32: 2, torch.bfloat16: 16}

# The packed route: rows per oneDNN call at most (more rows take several calls, none of one row; the output layer's
# calls, which only decode steps make with more than one row, are capped lower to keep its check short), the row
# counts the check multiplies, and the batch-size hint the weights are reordered for (fixed: the layout must not
# change between calls).
MAX_ROWS = 256
OUTPUT_MAX_ROWS = 64
CHECKED_ROWS = (2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, MAX_ROWS)
OUTPUT_CHECKED_ROWS = (2, 3, 15, 16, 17, 33, OUTPUT_MAX_ROWS)
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
    """The packed route of one model: its weights reordered for oneDNN, and per thread count the check's verdict.
    Thread-safe."""

    def __init__(self, model: nn.Module, output: nn.Module | None) -> None:
        self._model, self._output = model, output
        self._lock = threading.RLock()  # the check reorders weights under it
        self._packed: dict[int, torch.Tensor] = {}  # id(weight) -> reordered copy
        self._verified: dict[int, bool] = {}  # torch thread count -> the check's verdict

    def check(self) -> bool:
        """Whether rows round alike on this route under the current thread count (checked once per count)."""
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

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               max_rows: int = MAX_ROWS) -> torch.Tensor:
        """F.linear(x, weight, bias) in calls of at most `max_rows` rows (`row_calls`); a row gets the same bits in
        any of them. InconsistentKernelError where the check fails under the current thread count."""
        if not self.check():
            raise InconsistentKernelError(
                f"oneDNN's packed product does not round rows alike under {torch.get_num_threads()} threads, and "
                f"this model's caches were computed by it: run it with the thread count it was loaded with")
        flat = x.reshape(-1, x.shape[-1])
        packed, rows = self.weight(weight), flat.shape[0]
        if rows == 1:
            flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
        parts = [_packed_product(flat[a:b], packed, bias) for a, b in row_calls(flat.shape[0], max_rows)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out[:rows].reshape(*x.shape[:-1], weight.shape[0])

    def _check(self) -> bool:
        """Random rows through one weight of every shape in calls of each checked count, each row compared with the
        same row in a call of the most rows, and with it on one thread. False (and a warning) at the first
        difference."""
        linears = float32_linears(self._model)
        for module in linears:
            output = module is self._output
            counts, whole = (OUTPUT_CHECKED_ROWS, OUTPUT_MAX_ROWS) if output else (CHECKED_ROWS, MAX_ROWS)
            differs = first_difference(module, lambda x, m: _packed_product(x, self.weight(m.weight), m.bias),
                                       counts, whole)
            if differs is not None:
                log.warning("oneDNN's packed product rounds a row differently %s (weight %s, %d threads): this model "
                            "multiplies by BLAS's sgemm instead", differs, tuple(module.weight.shape),
                            torch.get_num_threads())
                return False
        return True


def float32_linears(model: nn.Module) -> list[nn.Linear]:
    """One float32 nn.Linear of each weight shape in `model`."""
    found: dict[tuple[int, ...], nn.Linear] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32:
            found.setdefault(tuple(module.weight.shape), module)
    return list(found.values())


@torch.inference_mode()
def first_difference(module: nn.Linear, product: Callable[[torch.Tensor, nn.Linear], torch.Tensor],
                     counts: tuple[int, ...], whole: int) -> str | None:
    """How the rows of `product(x, module)` first differ: in a call of one of `counts` rows from the same rows in a
    call of `whole` rows, or those on one thread from these; None when all agree."""
    g = torch.Generator().manual_seed(sum(module.weight.shape))
    x = torch.randn(whole, module.weight.shape[1], generator=g)
    reference = product(x, module)
    for rows in counts:
        if not torch.equal(product(x[:rows], module), reference[:rows]):
            return f"in a call of {rows} rows than of {whole}"
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
        try:
            alone = product(x, module)
        finally:
            torch.set_num_threads(threads)
        if not torch.equal(alone, reference):
            return f"on {threads} threads than on one"
    return None


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class RowTiling(threading.local):
    """How this model's linear layers multiply: `packed` (one for every thread, set by `choose`: the packed route,
    or None for sgemm) and, per thread, `tile`: None outside decode steps, the sgemm route's tile inside one. One per
    model; a thread's tile is its own, so a decode step on one thread never changes a prefill on another."""

    tile: int | None = None

    def __init__(self, route: Route) -> None:
        self.route = route  # threading.local runs __init__ again on every thread, with the same `route`

    @property
    def packed(self) -> PackedRows | None:
        return self.route.packed

    @contextmanager
    def rows(self, tile: int) -> Iterator[None]:
        """The sgemm route multiplies decode steps' rows in tiles of `tile` rows while inside."""
        before, self.tile = self.tile, tile
        try:
            yield
        finally:
            self.tile = before


class Route:
    """A model's route, shared by all its threads: `packed` or None (sgemm)."""

    packed: PackedRows | None = None


class TiledLinear(nn.Linear):
    """An nn.Linear that multiplies by its model's route: packed (every pass), or sgemm (as nn.Linear, and in tiles
    of `tiling.tile` rows in decode steps). Made by `install` from the model's own nn.Linear modules (same parameters,
    no copy)."""

    tiling: RowTiling
    max_rows: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.tiling.packed
        if packed is not None:
            return packed.linear(x, self.weight, self.bias, self.max_rows)
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


def install(module: nn.Module, tiling: RowTiling, output: nn.Module | None = None) -> int:
    """Turn every nn.Linear inside `module` into a TiledLinear driven by `tiling` (`output`, the output layer, with
    OUTPUT_MAX_ROWS rows per packed call). Returns how many. Idempotent."""
    count = 0
    for child in module.modules():
        if isinstance(child, nn.Linear):
            child.__class__ = TiledLinear
            object.__setattr__(child, "tiling", tiling)  # a plain attribute, not a submodule or parameter
            object.__setattr__(child, "max_rows", OUTPUT_MAX_ROWS if child is output else MAX_ROWS)
            count += 1
    return count


def choose(model: nn.Module, dtype: torch.dtype, output: nn.Module | None) -> PackedRows | None:
    """The packed route for `model` where it holds (float32, oneDNN present, the check passing under the current
    thread count), else None (sgemm)."""
    if dtype != torch.float32 or not packed_available():
        return None
    packed = PackedRows(model, output)
    return packed if packed.check() else None
