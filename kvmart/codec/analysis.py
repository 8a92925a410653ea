"""What the `kvmart` codec's encoder decides about a tensor before it writes any bits (formats 2 and 3 share it).

Why this shape (measured in docs/BENCHMARKS.md, *Lossless KV compression*): in a float KV tensor only the sign,
the exponent and the top mantissa bits are predictable, and they are predictable per channel (keys have outlier
channels whose exponent and sign hardly vary). So each element u is split at a bit position `shift`:

    symbol = u >> shift        sign, exponent and the top mantissa bits: entropy-coded, one code per channel cluster
    low    = u & (2^shift - 1) the rest of the mantissa, close to random: stored as it is

and a token row that repeats an earlier one bit for bit (layer 0's values depend on the token alone) is stored as a
reference to it. One compiled pass over the elements (kvmart/codec/csrc/stats.c; two where counting every value per
channel would take more memory than the tensor) finds the repeated rows, the alphabet and the per-channel counts;
clustering (clusters.py) and code lengths are a few small array operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvmart.codec import clusters
from kvmart.codec.elements import as_uint, grid
from kvmart.codec.kernels import kernels

MAX_SYMBOLS = 1024  # distinct symbol values at most: an alphabet this size keeps every code within 11 bits' reach
# mantissa bits of each float, and how many of the top ones join the symbol (measured: docs/BENCHMARKS.md)
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
SYMBOL_MANTISSA_BITS = 2
MAX_MODELS = 16


@dataclass(frozen=True)
class Plan:
    """A tensor read as [L, T, D] and what its encoding will be made of.

    u: its elements as unsigned integers (flat, no copy); sources [T] (uint32): t for a row coded in full, else the
    earlier coded row it repeats; shift, zero_bits: the split (the lowest zero_bits bits are zero in every element
    and not stored); highs [A] (uint16): the symbol values in use, increasing; lut [2^(W - shift)] (uint16): value
    -> symbol index (0xFFFF: not in use); models [L*D] (uint8): each channel's code; lengths [K, A] (uint8): each
    code's lengths (0: absent, else 1 + the codeword's length); counts [L*D, A] (uint32): each channel's count of
    each symbol over the coded rows."""

    u: np.ndarray
    itemsize: int
    L: int
    T: int
    D: int
    sources: np.ndarray
    shift: int
    zero_bits: int
    highs: np.ndarray
    lut: np.ndarray
    models: np.ndarray
    lengths: np.ndarray
    counts: np.ndarray

    @property
    def copies(self) -> np.ndarray:
        """The copied rows, increasing (int64)."""
        return np.flatnonzero(self.sources != np.arange(self.T, dtype=np.uint32))

    @property
    def coded(self) -> int:
        """How many elements are coded (the rows that are not copies)."""
        return (self.T - len(self.copies)) * self.L * self.D


def plan(tensor: torch.Tensor, symbol_bits: int, max_models: int = MAX_MODELS,
         symbol_mantissa_bits: int = SYMBOL_MANTISSA_BITS, table_log: int = 11, per_channel: bool | None = None) -> Plan:
    """The plan of a contiguous, non-empty float32, bfloat16 or float16 tensor (not modified), whose symbols have at
    most `symbol_bits` bits (the format's limit: a symbol takes fewer of the top mantissa bits where it must; a
    negative `symbol_mantissa_bits` stops the symbol above the mantissa). per_channel: count each channel's values
    in the first pass (None: where that takes no more memory than the tensor), else in a second pass."""
    u = as_uint(tensor)
    L, T, D = grid(tuple(tensor.shape))
    width = 8 * tensor.element_size()
    shift = max(MANTISSA_BITS[tensor.dtype] - symbol_mantissa_bits, width - symbol_bits)
    sources = np.empty(T, dtype=np.uint32)
    counted = _count(u, (L, T, D), shift, sources, per_channel)
    shift, highs, ored = counted.shift, counted.highs, counted.ored
    lut = np.full(1 << (width - shift), 0xFFFF, dtype=np.uint16)
    lut[highs] = np.arange(len(highs), dtype=np.uint16)
    zero_bits = min(shift, (ored & -ored).bit_length() - 1 if ored else width)
    counts = counted.counts
    if counts is None:
        counts = np.zeros((L * D, len(highs)), dtype=np.uint32)
        kernels().channel_histogram(u, u.itemsize, shift, L, T, D, sources, lut, len(highs), counts)
    mantissa = max(0, MANTISSA_BITS[tensor.dtype] - shift)
    models = clusters.cluster(exponents(counts, highs, mantissa), max_models).astype(np.uint8)
    groups = int(models.max()) + 1
    per_code = (np.arange(groups)[:, None] == models[None, :]).astype(np.float64) @ counts  # exact below 2^53
    lengths = np.zeros((groups, len(highs)), dtype=np.uint8)
    kernels().lengths(np.minimum(per_code, 2**32 - 1).astype(np.uint32), len(highs), groups, table_log, lengths)
    return Plan(u, u.itemsize, L, T, D, sources, shift, zero_bits, highs.astype(np.uint16), lut, models, lengths,
                counts)


@dataclass(frozen=True)
class _Counted:
    shift: int  # raised where more than MAX_SYMBOLS values occur
    highs: np.ndarray  # the values in use (int64), increasing
    ored: int  # every element or-ed
    counts: np.ndarray | None  # [L*D, A] uint32, or None: a second pass counts them


def _count(u: np.ndarray, grid_: tuple[int, int, int], shift: int, sources: np.ndarray,
           per_channel: bool | None) -> _Counted:
    """The scan: repeated rows into `sources`, the values in use, and per-channel counts where they fit."""
    L, T, D = grid_
    channels, bins = L * D, 1 << (8 * u.itemsize - shift)
    if per_channel if per_channel is not None else channels * (bins + 16) * 4 <= max(u.nbytes, 1 << 20):
        stride = bins + 16  # not a power of two: channels' counts of one value do not share a cache set
        by_channel = np.zeros((channels, stride), dtype=np.uint32)
        ored = kernels().scan(u, u.itemsize, shift, L, T, D, sources, by_channel, stride)
        by_channel = by_channel[:, :bins]
        hist = by_channel.sum(axis=0, dtype=np.uint64)
        while np.count_nonzero(hist) > MAX_SYMBOLS:  # arbitrary bit patterns: fewer, coarser symbols
            by_channel = by_channel.reshape(channels, -1, 2).sum(axis=2, dtype=np.uint32)
            hist, shift = hist.reshape(-1, 2).sum(axis=1), shift + 1
        highs = np.flatnonzero(hist)
        return _Counted(shift, highs, ored, np.ascontiguousarray(by_channel[:, highs]))
    hist = np.zeros(bins, dtype=np.uint32)  # a whole-tensor histogram first; a second pass counts each channel's
    ored = kernels().scan(u, u.itemsize, shift, L, T, D, sources, hist, 0)
    while np.count_nonzero(hist) > MAX_SYMBOLS:
        hist, shift = hist.reshape(-1, 2).sum(axis=1, dtype=np.uint64).astype(np.uint32), shift + 1
    return _Counted(shift, np.flatnonzero(hist), ored, None)


def exponents(hist: np.ndarray, highs: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Per-channel counts [C, symbols] merged over their lowest `mantissa_bits` (float64): the sign and exponent
    decide which channels belong together, and clustering on ~4x fewer columns is ~4x faster."""
    _, starts = np.unique(highs >> mantissa_bits, return_index=True)
    return np.add.reduceat(hist, starts, axis=1).astype(np.float64)


def split(low_bits: int) -> tuple[int, int]:
    """(bytes per element in the byte plane, bits per element in the raw plane) of a `low_bits`-bit low part."""
    planes = min(2, low_bits // 8)
    return planes, low_bits - 8 * planes


def raw_bytes(count: int, raw_bits: int) -> int:
    """Bytes of the raw plane: `raw_bits` bits of each of `count` coded elements, packed."""
    return (count * raw_bits + 7) // 8
