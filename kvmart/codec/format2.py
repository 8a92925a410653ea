"""Format 2 of the `kvmart` codec (params {"version": 2}, kvmart 0.2): decoded, so that its artifacts still load;
written only when asked for (`HuffmanCodec(version=2)`: comparisons in bench/codec.py, and tests). docs/FORMAT.md
specifies it; format 3 differs in its header and in having eight streams instead of four.

    bytes = header | symbol values | channel codes | side block | byte plane | raw plane | 4 streams
"""

from __future__ import annotations

import struct

import torch

from kvmart.codec import layout
from kvmart.codec.analysis import Plan, raw_bytes, split
from kvmart.codec.elements import as_uint, grid
from kvmart.codec.kernels import kernels
from kvmart.errors import CodecError

VERSION = 2
STREAMS = 4
MAX_TABLE_LOG = 12
SYMBOL_BITS = 12
# version, shift, zero bits, table_log, codes, symbols, copied rows, side block bytes, bits of each stream
HEADER = struct.Struct("<BBBBHHII4Q")
EMPTY = bytes([VERSION])  # the whole encoding of a tensor with no elements
STATUS = {-1: "its bitstream runs out", -2: "bits are left over in its bitstream", -4: "an invalid code",
          -5: "a copied row that does not repeat an earlier coded row", -6: "out of memory"}


def encode(plan: Plan, table_log: int = 11) -> bytes:
    """The format-2 bytes of a planned tensor whose codes are at most `table_log` (<= 12) bits long."""
    count = plan.coded
    planes, raw_bits = split(plan.shift - plan.zero_bits)
    plane, raw = bytearray(count * planes), bytearray(raw_bytes(count, raw_bits) + 8)
    per_stream = ((count // STREAMS + 1) * table_log + 7) // 8 + 8  # every code at its longest
    streams = tuple(bytearray(per_stream) for _ in range(STREAMS))
    bits = kernels().encode_v2(plan.u, plan.itemsize, plan.shift, plan.zero_bits, plan.L, plan.T, plan.D,
                               plan.sources, plan.lut, len(plan.highs), plan.models, plan.lengths, len(plan.lengths),
                               table_log, plane, raw, streams)
    side = layout.side_block(plan)
    parts = [HEADER.pack(VERSION, plan.shift, plan.zero_bits, table_log, len(plan.lengths), len(plan.highs),
                         len(plan.copies), len(side), *bits),
             layout.tables(plan), side, bytes(plane), bytes(raw[:raw_bytes(count, raw_bits)]),
             *(bytes(s[:(b + 7) // 8]) for s, b in zip(streams, bits, strict=True))]
    return b"".join(parts)


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
        raise CodecError(f"truncated kvmart tensor: {len(data)} bytes, a format-2 header takes {HEADER.size}")
    version, shift, zero_bits, table_log, groups, nsym, ncopies, side_bytes, *bits = HEADER.unpack_from(data)
    L, T, D = grid(tuple(out.shape))
    width = 8 * itemsize
    if version != VERSION:
        raise CodecError(f"corrupt kvmart tensor: format {version} where its params say {VERSION}")
    if not (width - 12 <= shift < width and zero_bits <= shift and 1 <= table_log <= MAX_TABLE_LOG
            and 1 <= nsym <= 1 << table_log and groups >= 1 and (groups == 1 or groups <= L * D) and ncopies < T):
        raise CodecError(f"corrupt kvmart tensor: header out of range (shift {shift}, {zero_bits} zero bits, "
                         f"table_log {table_log}, {nsym} symbols, {groups} codes, {ncopies} copied rows)")
    reader = layout.Reader(data, HEADER.size)
    highs, models = layout.read_tables(reader, nsym, groups, L * D, width, shift)
    sources, lengths = layout.read_side(reader.take(side_bytes, "side block"), ncopies, groups, nsym, T)
    planes, raw_bits = split(shift - zero_bits)
    count = (T - ncopies) * L * D
    plane = reader.take(count * planes, "byte plane")
    raw = reader.take(raw_bytes(count, raw_bits), "raw plane")
    streams = reader.take(sum((b + 7) // 8 for b in bits), "streams")
    if reader.remaining:
        raise CodecError(f"corrupt kvmart tensor: {reader.remaining} bytes left over")
    status = kernels().decode_v2(streams, tuple(bits), itemsize, shift, zero_bits, L, T, D, sources, highs, nsym,
                                 models, lengths, groups, table_log, plane, raw, u)
    if status != 0:
        raise CodecError(f"corrupt kvmart tensor: {STATUS.get(status, f'status {status}')}")
