"""kvmart's own lossless codec for float KV tensors (`kvmart`), format 2: per-channel-cluster Huffman.

Why this shape (measured in docs/BENCHMARKS.md, *Lossless KV compression*): in a float KV tensor only the sign,
the exponent and the top mantissa bits are predictable, and they are predictable per channel (keys have outlier
channels whose exponent and sign hardly vary). So each element u is split at a bit position `shift`:

    symbol = u >> shift        sign, exponent and the top two mantissa bits: entropy-coded
    low    = u & (2^shift - 1) the rest of the mantissa, close to random: stored as it is

Symbols are coded with canonical Huffman codes of at most 11 bits, one code per cluster of channels
(kvmart/codec/clusters.py), in four interleaved streams; decoding is one table lookup per element, in C
(kvmart/codec/_kernels.c, compiled at install). The low part's whole bytes (float32: two) form a byte plane, its
remaining bits follow each code in the stream. A token row that repeats an earlier one exactly (layer 0's values
depend on the token alone) is stored as a reference to it. The bitstream is specified in docs/FORMAT.md;
tests/vectors/kvmart_codec_reader.py decodes it from that spec alone.

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
TABLE_LOG = 11  # the longest code: a decode table of 2^11 entries per model stays in L1
MAX_MODELS = 16
MAX_SYMBOLS = 1 << (TABLE_LOG - 1)
STREAMS = 4
# mantissa bits of each float, and how many of the top ones join the symbol (measured: docs/BENCHMARKS.md)
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
SYMBOL_MANTISSA_BITS = 2
SYMBOL_BITS = 12  # at most: a decode table entry is the symbol's value << 4 | its code length, in 16 bits
# version, shift, zero bits, table_log, codes, symbols, copied rows, side block bytes, bits of each stream
HEADER = struct.Struct("<BBBBHHII4Q")
EMPTY = bytes([VERSION])  # the whole encoding of a tensor with no elements
STATUS = {-1: "its bitstream runs out", -2: "bits are left over in its bitstream", -4: "an invalid code",
          -5: "a copied row that does not repeat an earlier coded row", -6: "out of memory"}


class HuffmanCodec:
    """Format 2 encoder; format 2 and format 1 decoder. Holds only its options: safe to share between threads."""

    name = "kvmart"

    def __init__(self, max_models: int = MAX_MODELS, symbol_mantissa_bits: int = SYMBOL_MANTISSA_BITS,
                 table_log: int = TABLE_LOG) -> None:
        self.max_models, self.symbol_mantissa_bits, self.table_log = max_models, symbol_mantissa_bits, table_log

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict]:
        u = as_uint(tensor)
        params = {"version": VERSION}
        if u.size == 0:
            return EMPTY, params
        itemsize = tensor.element_size()
        L, T, D = grid(tuple(tensor.shape))
        sources = repeated_rows(u, itemsize, L, T, D)
        coded = (sources == np.arange(T)).astype(np.uint8)
        shift, highs, lut = alphabet(u, itemsize, MANTISSA_BITS[tensor.dtype] - self.symbol_mantissa_bits)
        zero_bits = min(shift, trailing_zeros(u))
        hist = np.zeros((L * D, len(highs)), dtype=np.uint32)
        kernels().channel_histogram(u, itemsize, shift, L, T, D, coded, lut, len(highs), hist)
        models = clusters.cluster(exponents(hist, highs, self.symbol_mantissa_bits), self.max_models).astype(np.uint8)
        groups = int(models.max()) + 1
        counts = (np.arange(groups)[:, None] == models[None, :]).astype(np.float64) @ hist  # exact below 2^53
        lengths = np.zeros((groups, len(highs)), dtype=np.uint8)
        kernels().lengths(counts.astype(np.uint32), len(highs), groups, self.table_log, lengths)
        count = int(coded.sum()) * L * D
        planes, raw_bits = split(shift - zero_bits)
        plane, raw = bytearray(count * planes), bytearray(raw_bytes(count, raw_bits) + 8)
        per_stream = ((count // STREAMS + 1) * self.table_log + 7) // 8 + 8  # every code at its longest
        streams = tuple(bytearray(per_stream) for _ in range(STREAMS))
        bits = kernels().encode(u, itemsize, shift, zero_bits, L, T, D, coded, lut, len(highs), models, lengths, groups,
                                self.table_log, plane, raw, streams)
        copies = np.flatnonzero(~coded.astype(bool))
        side = zlib.compress(varint.write(np.diff(copies, prepend=0)) + varint.write(copies - sources[copies])
                             + lengths.tobytes(), 9)
        parts = [HEADER.pack(VERSION, shift, zero_bits, self.table_log, groups, len(highs), len(copies), len(side), *bits),
                 highs.astype("<u2").tobytes(), models.tobytes() if groups > 1 else b"", side, bytes(plane), bytes(raw[:raw_bytes(count, raw_bits)]),
                 *(bytes(s[:(b + 7) // 8]) for s, b in zip(streams, bits, strict=True))]
        return b"".join(parts), params

    def decode(self, data: memoryview, params: dict, out: torch.Tensor) -> None:
        if params == {"version": VERSION}:
            decode(data, out)
        elif set(params) == {"level"}:
            legacy.decode(data, out)
        else:
            raise CodecError(f"corrupt kvmart tensor: params {params!r} (this kvmart decodes format 2, "
                             f"{{'version': 2}}, and format 1, {{'level': N}})")


def exponents(hist: np.ndarray, highs: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Per-channel counts [C, symbols] merged over their lowest `mantissa_bits` (float64): the sign and exponent
    decide which channels belong together, and clustering on ~4x fewer columns is ~4x faster."""
    _, starts = np.unique(highs >> mantissa_bits, return_index=True)
    return np.add.reduceat(hist, starts, axis=1).astype(np.float64)


def raw_bytes(count: int, raw_bits: int) -> int:
    """Bytes of the raw plane: `raw_bits` bits of each of `count` coded elements, packed."""
    return (count * raw_bits + 7) // 8


def split(low_bits: int) -> tuple[int, int]:
    """(bytes per element in the byte plane, bits per element in the raw plane) of a `low_bits`-bit low part."""
    planes = min(2, low_bits // 8)
    return planes, low_bits - 8 * planes


def trailing_zeros(u: np.ndarray) -> int:
    """How many of the lowest bits are zero in every element (float32 holding bfloat16 values: 16); the width of
    the elements if all are zero."""
    ored = int(np.bitwise_or.reduce(u)) if u.size else 0
    return (ored & -ored).bit_length() - 1 if ored else 8 * u.itemsize


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
    alphabet fits in MAX_SYMBOLS (arbitrary bit patterns) and a symbol in SYMBOL_BITS."""
    bits = 8 * itemsize
    shift = max(shift, bits - SYMBOL_BITS)
    hist = np.zeros(1 << (bits - shift), dtype=np.uint32)
    kernels().histogram(u, itemsize, shift, hist)
    while np.count_nonzero(hist) > MAX_SYMBOLS:
        hist = hist.reshape(-1, 2).sum(axis=1, dtype=np.uint64).astype(np.uint32)
        shift += 1
    highs = np.flatnonzero(hist).astype(np.uint16)
    lut = np.full(hist.size, 0xFFFF, dtype=np.uint16)
    lut[highs] = np.arange(len(highs), dtype=np.uint16)
    return shift, highs, lut


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
    version, shift, zero_bits, table_log, groups, nsym, ncopies, side_bytes, *bits = HEADER.unpack_from(data)
    L, T, D = grid(tuple(out.shape))
    width = 8 * itemsize
    if version != VERSION:
        raise CodecError(f"kvmart tensor format {version} is not supported by this kvmart (it decodes 2)")
    if not (width - SYMBOL_BITS <= shift < width and zero_bits <= shift and 1 <= table_log <= 12 and 1 <= nsym <= 1 << table_log
            and groups >= 1 and (groups == 1 or groups <= L * D) and ncopies < T):
        raise CodecError(f"corrupt kvmart tensor: header out of range (shift {shift}, {zero_bits} zero bits, "
                         f"table_log {table_log}, "
                         f"{nsym} symbols, {groups} codes, {ncopies} copied rows)")
    reader = Reader(data, HEADER.size)
    highs = np.frombuffer(reader.take(2 * nsym, "symbol table"), dtype="<u2").astype(np.uint16)
    if (np.diff(highs.astype(np.int64)) <= 0).any() or int(highs[-1]) >> (width - shift):
        raise CodecError("corrupt kvmart tensor: its symbol table is not increasing values of the symbol's width")
    models = (np.frombuffer(reader.take(L * D, "channel codes"), dtype=np.uint8) if groups > 1
              else np.zeros(L * D, dtype=np.uint8))
    if models.size and int(models.max()) >= groups:
        raise CodecError("corrupt kvmart tensor: a channel's code is out of range")
    side = _inflate(reader.take(side_bytes, "side block"), 2 * varint.MAX_BYTES * ncopies + groups * nsym)
    numbers, used = varint.read(side, 2 * ncopies, "side block")
    if len(side) - used != groups * nsym:
        raise CodecError("corrupt kvmart tensor: its side block does not hold one code length per symbol and code")
    sources = _sources(numbers[:ncopies], numbers[ncopies:], T)
    lengths = np.frombuffer(side, dtype=np.uint8, offset=used)
    planes, raw_bits = split(shift - zero_bits)
    count = (T - ncopies) * L * D
    plane = reader.take(count * planes, "byte plane")
    raw = reader.take(raw_bytes(count, raw_bits), "raw plane")
    streams = reader.take(sum((b + 7) // 8 for b in bits), "streams")
    if reader.remaining:
        raise CodecError(f"corrupt kvmart tensor: {reader.remaining} bytes left over")
    status = kernels().decode(streams, tuple(bits), itemsize, shift, zero_bits, L, T, D, sources, highs, nsym, models,
                              lengths, groups, table_log, plane, raw, u)
    if status != 0:
        raise CodecError(f"corrupt kvmart tensor: {STATUS.get(status, f'status {status}')}")


class Reader:
    """Sequential reads from encoded bytes; CodecError (never a short read) past the end."""

    def __init__(self, data: memoryview, offset: int = 0) -> None:
        self.data, self.offset = data, offset

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise CodecError(f"truncated kvmart tensor: its {what} is cut short ({n} bytes, {self.remaining} left)")
        self.offset += n
        return self.data[self.offset - n:self.offset]


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
    """sources [T] (uint32) from the copied rows' gaps (t_i - t_(i-1), t_(-1) = 0) and distances (t_i - source);
    None when no row is copied."""
    if not gaps.size:
        return None
    rows = np.cumsum(gaps)
    if (gaps < 1).any() or rows[-1] >= T or (back < 1).any() or (back > rows).any():
        raise CodecError("corrupt kvmart tensor: its copied rows are out of range")
    sources = np.arange(T, dtype=np.uint32)
    sources[rows] = (rows - back).astype(np.uint32)
    return sources
