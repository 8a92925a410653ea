"""kvmart's own lossless codec for float KV tensors (`kvmart`), format 2: per-channel-cluster tANS.

Why this shape (measured in docs/BENCHMARKS.md, *Lossless KV compression*): in a float KV tensor only the sign,
the exponent and the top mantissa bits are predictable, and they are predictable per channel (keys have outlier
channels whose exponent and sign hardly vary). So each element is split at a bit position `shift`:

    symbol = u >> shift      sign, exponent and the top few mantissa bits: entropy-coded
    low    = u & (2^shift-1) the rest of the mantissa, close to random: stored as raw bits

Symbols are coded by tANS (the table-driven ANS of zstd's FSE) with one model per cluster of channels
(kvmart/codec/clusters.py), four interleaved states and a single bitstream; decoding is one table lookup and one
unaligned read per element, in C (kvmart/codec/_tans.c, compiled at install). A token row that repeats an earlier
one exactly (layer 0's values depend on the token alone) is stored as a reference to it. The bitstream is
specified in docs/FORMAT.md; tests/vectors/kvmart_codec_reader.py decodes it from that spec alone.

Params: {"version": 2}. Format 1 ({"level": n}, kvmart 0.1's rANS codec) is still decoded (legacy.py).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from kvmart.codec import clusters, legacy, varint
from kvmart.codec.elements import as_uint, grid
from kvmart.codec.kernels import kernels
from kvmart.errors import CodecError

VERSION = 2
TABLE_LOG = 11
MAX_MODELS = 16
MAX_SYMBOLS = 1 << (TABLE_LOG - 1)  # a model keeps at least two states per symbol on average
STATES = 4
# mantissa bits of each width's float, and how many of the top ones join the symbol (measured: docs/BENCHMARKS.md)
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
SYMBOL_MANTISSA_BITS = 2
HEADER = struct.Struct("<BBBBHQ4HII")  # version, shift, table_log, models, symbols, nbits, states, copies, side
EMPTY = bytes([VERSION])  # the whole encoding of a tensor with no elements
STATUS = {-1: "its bitstream runs out", -2: "bits are left over in its bitstream",
          -3: "its tANS states do not end where the encoder started", -4: "an invalid model",
          -5: "a copied row that does not repeat an earlier coded row", -6: "out of memory"}


class TansCodec:
    """Format 2 encoder, format 1 and 2 decoder. Holds only its options: safe to share between threads."""

    name = "kvmart"

    def __init__(self, max_models: int = MAX_MODELS, symbol_mantissa_bits: int = SYMBOL_MANTISSA_BITS) -> None:
        self.max_models, self.symbol_mantissa_bits = max_models, symbol_mantissa_bits

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict]:
        u = as_uint(tensor)
        if u.size == 0:
            return EMPTY, {"version": VERSION}
        itemsize = tensor.element_size()
        L, T, D = grid(tuple(tensor.shape))
        sources = repeated_rows(u, itemsize, L, T, D)
        coded = (sources == np.arange(T)).astype(np.uint8)
        shift, highs, lut = alphabet(u, itemsize, MANTISSA_BITS[tensor.dtype] - self.symbol_mantissa_bits)
        hist = np.zeros((L * D, len(highs)), dtype=np.uint32)
        kernels().channel_histogram(u, itemsize, shift, L, T, D, coded, lut, len(highs), hist)
        models = clusters.cluster(hist.astype(np.float64), self.max_models)
        groups = int(models.max()) + 1
        counts = np.zeros((groups, len(highs)), dtype=np.int64)
        np.add.at(counts, models, hist.astype(np.int64))
        freqs = normalize(counts, TABLE_LOG)
        count = int(coded.sum()) * L * D
        out = bytearray(max(8, (count * (shift + TABLE_LOG) + 7) // 8 + 8))
        nbits, states = kernels().encode(u, itemsize, shift, L, T, D, coded, lut, len(highs),
                                         models.astype(np.uint8), freqs, groups, TABLE_LOG, out)
        copies = np.flatnonzero(sources != np.arange(T))
        side = zlib.compress(varint.write(np.diff(copies, prepend=0)) + varint.write(copies - sources[copies])
                             + varint.write(freqs.reshape(-1)), 9)
        head = HEADER.pack(VERSION, shift, TABLE_LOG, groups, len(highs), nbits, *states, len(copies), len(side))
        parts = [head, highs.astype("<u2").tobytes(), models.astype(np.uint8).tobytes() if groups > 1 else b"", side,
                 bytes(out[:stream_bytes(nbits)])]
        return b"".join(parts), {"version": VERSION}

    def decode(self, data: memoryview, params: dict, out: torch.Tensor) -> None:
        if params == {"version": VERSION}:
            decode(data, out)
        elif set(params) == {"level"}:
            legacy.decode(data, out)
        else:
            raise CodecError(f"corrupt kvmart tensor: params {params!r} (this kvmart decodes format 2, "
                             f"{{'version': 2}}, and format 1, {{'level': N}})")


def repeated_rows(u: np.ndarray, itemsize: int, L: int, T: int, D: int) -> np.ndarray:
    """sources [T] (uint32): t for a token row coded in full, else the first earlier row it repeats bit for bit (a
    token row: all L blocks' D elements at token t). Rows are matched by a 64-bit hash, then compared in full."""
    rows = np.arange(T, dtype=np.uint32)
    if T < 2 or D == 0:
        return rows
    hashes = np.empty(T, dtype=np.uint64)
    kernels().row_hashes(u, itemsize, L, T, D, hashes)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    candidate = first[inverse.reshape(-1)].astype(np.uint32)
    repeats = np.flatnonzero(candidate != rows)
    if repeats.size:
        blocks = u.reshape(L, T, D)
        same = (blocks[:, repeats, :] == blocks[:, candidate[repeats], :]).all(axis=(0, 2))
        rows[repeats[same]] = candidate[repeats[same]]
    return rows


def alphabet(u: np.ndarray, itemsize: int, shift: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(shift, high values in use, lut high -> symbol): the symbol is u >> shift, the shift raised until the
    alphabet fits in MAX_SYMBOLS (arbitrary bit patterns) and the symbol in 16 bits."""
    bits = 8 * itemsize
    shift = max(shift, bits - 16)
    hist = np.zeros(1 << (bits - shift), dtype=np.uint32)
    kernels().histogram(u, itemsize, shift, hist)
    while np.count_nonzero(hist) > MAX_SYMBOLS:
        hist = hist.reshape(-1, 2).sum(axis=1, dtype=np.uint64).astype(np.uint32)
        shift += 1
    highs = np.flatnonzero(hist).astype(np.uint16)
    lut = np.full(hist.size, 0xFFFF, dtype=np.uint16)
    lut[highs] = np.arange(len(highs), dtype=np.uint16)
    return shift, highs, lut


def normalize(counts: np.ndarray, table_log: int) -> np.ndarray:
    """Frequencies [K, A] (uint16) summing to 2^table_log per model, at least 1 for every symbol that occurs,
    close to proportional to `counts` (largest remainders first; where symbols raised to 1 overshoot, taken from
    the symbols where one count less costs least)."""
    size = 1 << table_log
    scaled = counts * (size / np.maximum(counts.sum(axis=1, keepdims=True), 1))
    freqs = np.where(counts > 0, np.maximum(1, np.floor(scaled)), 0).astype(np.int64)
    for k in range(len(freqs)):
        diff = size - int(freqs[k].sum())
        if diff > 0:
            freqs[k, np.argsort(freqs[k] - scaled[k], kind="stable")[:diff]] += 1
        while diff < 0:
            f = freqs[k]
            loss = np.where(f > 1, counts[k] * np.log2(np.maximum(f, 2) / np.maximum(f - 1, 1)), np.inf)
            take = np.argsort(loss, kind="stable")[:min(-diff, int((f > 1).sum()))]
            f[take] -= 1
            diff += len(take)
    return freqs.astype(np.uint16)


def stream_bytes(nbits: int) -> int:
    """A stream of `nbits` is stored in max(8, ceil(nbits / 8)) bytes (a decoder reads 8 bytes at a time)."""
    return max(8, (nbits + 7) // 8)


def decode(data: memoryview, out: torch.Tensor) -> None:
    """Fill `out` from a format-2 encoding; CodecError if `data` cannot have come from the encoder for a tensor of
    out's dtype and shape."""
    u = as_uint(out)
    itemsize = out.element_size()
    if u.size == 0:
        if bytes(data) != EMPTY:
            raise CodecError("corrupt kvmart tensor: an empty tensor's encoding is one version byte")
        return
    if len(data) < HEADER.size:
        raise CodecError(f"truncated kvmart tensor: {len(data)} bytes, a header takes {HEADER.size}")
    version, shift, table_log, groups, nsym, nbits, s0, s1, s2, s3, ncopies, side_bytes = HEADER.unpack_from(data)
    L, T, D = grid(tuple(out.shape))
    bits = 8 * itemsize
    if version != VERSION:
        raise CodecError(f"kvmart tensor format {version} is not supported by this kvmart (it decodes 2)")
    if not (bits - 16 <= shift < bits and 5 <= table_log <= 12 and 1 <= nsym <= 1 << table_log and groups >= 1
            and ncopies < T and (groups == 1 or groups <= L * D)):
        raise CodecError(f"corrupt kvmart tensor: header out of range (shift {shift}, table_log {table_log}, "
                         f"{nsym} symbols, {groups} models, {ncopies} copied rows)")
    offset = HEADER.size
    highs = _take(data, offset, 2 * nsym, "symbol table")
    highs_u16 = np.frombuffer(highs, dtype="<u2")
    offset += 2 * nsym
    if (np.diff(highs_u16.astype(np.int64)) <= 0).any() or int(highs_u16[-1]) >> (bits - shift):
        raise CodecError("corrupt kvmart tensor: its symbol table is not increasing values of the symbol's width")
    if groups > 1:
        models = np.frombuffer(_take(data, offset, L * D, "channel models"), dtype=np.uint8)
        offset += L * D
        if int(models.max()) >= groups:
            raise CodecError("corrupt kvmart tensor: a channel's model is out of range")
    else:
        models = np.zeros(L * D, dtype=np.uint8)
    side = _inflate(_take(data, offset, side_bytes, "side block"), 5 * (2 * ncopies + groups * nsym))
    offset += side_bytes
    numbers = varint.read(side, 2 * ncopies + groups * nsym, "side block")
    sources = _sources(numbers[:ncopies], numbers[ncopies:2 * ncopies], T)
    freqs = numbers[2 * ncopies:]
    if (freqs >= 1 << table_log).any() or (freqs.reshape(groups, nsym).sum(axis=1) != 1 << table_log).any():
        raise CodecError("corrupt kvmart tensor: a model's frequencies do not sum to its table size")
    stream = data[offset:]
    if len(stream) != stream_bytes(nbits):
        raise CodecError(f"corrupt kvmart tensor: {len(stream)} stream bytes for {nbits} bits")
    status = kernels().decode(stream, nbits, (s0, s1, s2, s3), itemsize, shift, L, T, D, sources,
                              np.ascontiguousarray(highs_u16, dtype=np.uint16), nsym, models,
                              freqs.astype(np.uint16), groups, table_log, u)
    if status != 0:
        raise CodecError(f"corrupt kvmart tensor: {STATUS.get(status, f'status {status}')}")


def _take(data: memoryview, offset: int, n: int, what: str) -> memoryview:
    if offset + n > len(data):
        raise CodecError(f"truncated kvmart tensor: its {what} is cut short")
    return data[offset:offset + n]


def _inflate(block: memoryview, limit: int) -> bytes:
    """The side block's zlib stream, at most `limit` bytes once inflated (a corrupt one cannot drive memory)."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(block, limit + 1)
    except zlib.error as e:
        raise CodecError(f"corrupt kvmart tensor: its side block does not inflate ({e})") from e
    if len(raw) > limit or not inflater.eof or inflater.unused_data:
        raise CodecError("corrupt kvmart tensor: its side block is not one zlib stream of the expected size")
    return raw


def _sources(gaps: np.ndarray, back: np.ndarray, T: int) -> np.ndarray | None:
    """sources [T] (uint32) from the copied rows' gaps (t_i - t_{i-1}, t_{-1} = 0) and distances (t_i - source_i);
    None when no row is copied."""
    if not gaps.size:
        return None
    rows = np.cumsum(gaps)
    if (gaps < 1).any() or rows[-1] >= T or (back < 1).any() or (back > rows).any():
        raise CodecError("corrupt kvmart tensor: its copied rows are out of range")
    sources = np.arange(T, dtype=np.uint32)
    sources[rows] = (rows - back).astype(np.uint32)
    return sources
