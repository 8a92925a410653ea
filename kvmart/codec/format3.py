"""Format 3 of the `kvmart` codec (params {"version": 3}): what kvmart writes. Specified in docs/FORMAT.md;
tests/vectors/kvmart_codec_reader.py decodes it from that page alone.

Format 2's split and tables (analysis.py, layout.py), with symbols of at most 10 bits, codewords of at most 11, and
eight interleaved streams instead of four: the decoder (kvmart/codec/csrc/format3_decode.c) keeps eight table
lookups in flight, each in a table of 2^11 16-bit entries that its window shifts by as they are, which is what
takes it past 1.5 GB/s per core (docs/BENCHMARKS.md).

    bytes = header | symbol values | channel codes | side block | byte plane | raw plane | 8 streams
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvmart.codec import layout, varint
from kvmart.codec.analysis import Plan
from kvmart.codec.elements import as_uint, grid
from kvmart.codec.kernels import kernels
from kvmart.errors import CodecError

VERSION = 3
STREAMS = 8
MAX_TABLE_LOG = 11  # five codewords of a stream fit in the decoder's 56-bit window between refills
SYMBOL_BITS = 10  # a decode table entry is value << 6 | length: the decoder shifts its window by the entry itself
# version, shift, zero bits, table_log, codes, symbols, copied rows, side block bytes, bits of each stream
HEADER = struct.Struct("<BBBBHHII8Q")
EMPTY = bytes([VERSION])  # the whole encoding of a tensor with no elements
STATUS = {-1: "its bitstream runs out", -2: "bytes or bits are left over, or its padding is not zero",
          -4: "an invalid code", -5: "a copied row that does not repeat an earlier coded row", -6: "out of memory",
          -9: "header out of range", -10: "its symbol table is not increasing values of the symbol's width",
          -11: "a channel's code is out of range",
          -12: "its side block does not hold the copied rows and one code length per symbol and code",
          -13: "its copied rows are out of range", -14: "truncated: a part is cut short"}


def encode(plan: Plan, table_log: int = MAX_TABLE_LOG) -> bytes:
    """The format-3 bytes of a planned tensor whose codes are at most `table_log` (<= 11) bits long."""
    side = layout.side_block(plan)
    head = HEADER.pack(VERSION, plan.shift, plan.zero_bits, table_log, len(plan.lengths), len(plan.highs),
                       len(plan.copies), len(side), *[0] * STREAMS)  # the streams' lengths: filled in by encode_v3
    data: bytes = kernels().encode_v3(plan.u, plan.itemsize, plan.shift, plan.zero_bits, plan.L, plan.T, plan.D,
                                      plan.sources, plan.lut, len(plan.highs), plan.models, plan.lengths,
                                      len(plan.lengths), table_log, head + layout.tables(plan) + side,
                                      stream_bits(plan))
    return data


def stream_bits(plan: Plan) -> tuple[int, ...] | None:
    """Each stream's length in bits, from the counts: with D a multiple of 8, channel c's elements all go to stream
    c % 8 (so the encoder writes each stream at its place); None otherwise."""
    if plan.D % STREAMS:
        return None
    lengths = np.maximum(plan.lengths.astype(np.int64) - 1, 0)  # a codeword's length (absent symbols: count 0)
    per_channel = (plan.counts * lengths[plan.models]).sum(axis=1)
    return tuple(int(b) for b in per_channel.reshape(-1, STREAMS).sum(axis=0))


def decode(data: memoryview, out: torch.Tensor) -> None:
    """Fill `out` from a format-3 encoding; CodecError if `data` cannot have come from the encoder for a tensor of
    out's dtype and shape. The header's fields are checked here (they bound what the side block may inflate to);
    the compiled decoder checks them again, with the tables, the side block, the planes and the streams."""
    u = as_uint(out)
    if u.size == 0:
        if bytes(data) != EMPTY:
            raise CodecError("corrupt kvmart tensor: an empty tensor's encoding is one version byte")
        return
    if len(data) < HEADER.size:
        raise CodecError(f"truncated kvmart tensor: {len(data)} bytes, a format-3 header takes {HEADER.size}")
    version, shift, zero_bits, table_log, groups, nsym, ncopies, side_bytes = HEADER.unpack_from(data)[:8]
    L, T, D = grid(tuple(out.shape))
    width = 8 * out.element_size()
    if version != VERSION:
        raise CodecError(f"corrupt kvmart tensor: format {version} where its params say {VERSION}")
    if not (width - SYMBOL_BITS <= shift < width and zero_bits <= shift and 1 <= table_log <= MAX_TABLE_LOG
            and 1 <= nsym <= 1 << table_log and 1 <= groups <= 255 and (groups == 1 or groups <= L * D)
            and ncopies < T):
        raise CodecError(f"corrupt kvmart tensor: header out of range (shift {shift}, {zero_bits} zero bits, "
                         f"table_log {table_log}, {nsym} symbols, {groups} codes, {ncopies} copied rows)")
    at = HEADER.size + 2 * nsym + (L * D if groups > 1 else 0)
    if at + side_bytes > len(data):
        raise CodecError(f"truncated kvmart tensor: its tables and side block take {at + side_bytes} bytes, "
                         f"{len(data)} are there")
    side = layout.inflate(data[at:at + side_bytes], 2 * varint.MAX_BYTES * ncopies + groups * nsym)
    status = kernels().decode_v3(data, side, out.element_size(), L, T, D, u)
    if status != 0:
        raise CodecError(f"corrupt kvmart tensor: {STATUS.get(status, f'status {status}')}")
