"""An independent decoder of the `kvmart` codec's formats 3 and 2, written from docs/FORMAT.md (*The kvmart codec*)
alone: numpy and the standard library, no kvmart import. Slow (it walks the streams bit by bit): for test vectors.

    decode(params, dtype, shape, blob) -> numpy array (uint16 for bfloat16/float16, uint32 for float32) of shape
    `shape` holding the tensor's raw bits; ValueError for anything the specification does not allow.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

# version -> (header, streams, widest symbol, longest codeword)
FORMATS = {3: (struct.Struct("<BBBBHHII8Q"), 8, 10, 11), 2: (struct.Struct("<BBBBHHII4Q"), 4, 12, 12)}
WIDTHS = {"bfloat16": (16, np.uint16), "float16": (16, np.uint16), "float32": (32, np.uint32)}


CODEC = "kvmart"  # reader.py plugs this module in for tensors stored with codec "kvmart"


def decode(data: bytes, params: dict, dtype: str, shape: tuple[int, ...]) -> bytes:
    """What reader.py asks of a codec reader: the decoded tensor's little-endian bytes."""
    return decode_array(params, dtype, tuple(shape), bytes(data)).astype(WIDTHS[dtype][1]().dtype.newbyteorder("<"),
                                                                        copy=False).tobytes()


def decode_array(params: dict, dtype: str, shape: tuple, blob: bytes) -> np.ndarray:
    """The tensor as unsigned integers of its dtype's width (uint16 for bfloat16/float16, uint32 for float32)."""
    if set(params) != {"version"} or params["version"] not in FORMATS or isinstance(params["version"], bool):
        raise ValueError(f"not format 3 or 2: params {params!r}")
    version = params["version"]
    header, streams_count, symbol_bits, longest = FORMATS[version]
    width, kind = WIDTHS[dtype]
    shape = tuple(shape)
    D = shape[-1] if len(shape) >= 1 else 1
    T = shape[-2] if len(shape) >= 2 else 1
    L = math.prod(shape[:-2])
    if math.prod(shape) == 0:
        if blob != bytes([version]):
            raise ValueError("an empty tensor is the single byte of its version")
        return np.zeros(shape, dtype=kind)
    stored_version, shift, zero_bits, table_log, codes, nsym, copies, side_bytes, *bits = header.unpack_from(blob)
    if stored_version != version or not (width - symbol_bits <= shift < width and zero_bits <= shift
                                         and 1 <= table_log <= longest and 1 <= nsym <= 2 ** table_log
                                         and 1 <= codes <= 255 and copies < T):
        raise ValueError("header out of range")
    at = header.size
    highs = list(struct.unpack_from(f"<{nsym}H", blob, at))
    if any(b <= a for a, b in zip(highs, highs[1:], strict=False)) or highs[-1] >> (width - shift):
        raise ValueError("symbol values: strictly increasing, of the symbol's width")
    at += 2 * nsym
    if codes > 1:
        channel_code = list(blob[at:at + L * D])
        at += L * D
    else:
        channel_code = [0] * (L * D)
    side = zlib.decompress(blob[at:at + side_bytes])
    at += side_bytes
    numbers, used = read_varints(side, 2 * copies)
    lengths = side[used:]
    if len(lengths) != codes * nsym:
        raise ValueError("side block: one code length per symbol and code")
    sources = list(range(T))
    row = 0
    for gap, back in zip(numbers[:copies], numbers[copies:], strict=True):
        row += gap
        sources[row] = row - back
        if gap < 1 or back < 1 or back > row or row >= T:
            raise ValueError("copied row out of range")
    low_bits = shift - zero_bits
    plane_bytes = min(2, low_bits // 8)
    raw_bits = low_bits - 8 * plane_bytes
    count = sum(1 for t in range(T) if sources[t] == t) * L * D
    plane = blob[at:at + count * plane_bytes]
    at += count * plane_bytes
    raw_len = (count * raw_bits + 7) // 8
    raw = int.from_bytes(blob[at:at + raw_len], "little")
    at += raw_len
    streams = []
    for b in bits:
        n = (b + 7) // 8
        streams.append(Bits(blob[at:at + n], b))
        at += n
    if at != len(blob):
        raise ValueError("bytes left over")
    tables = [canonical(lengths[m * nsym:(m + 1) * nsym], table_log) for m in range(codes)]
    out = np.zeros((L, T, D), dtype=np.uint64)
    k = 0
    for l in range(L):
        for t in range(T):
            if sources[t] != t:
                out[l, t] = out[l, sources[t]]
                continue
            for d in range(D):
                symbol = streams[k % streams_count].symbol(tables[channel_code[l * D + d]])
                low = (raw >> (k * raw_bits)) & ((1 << raw_bits) - 1)
                low = (low << (8 * plane_bytes)) | int.from_bytes(plane[k * plane_bytes:(k + 1) * plane_bytes], "little")
                out[l, t, d] = (highs[symbol] << shift) | (low << zero_bits)
                k += 1
    if any(s.position != s.length for s in streams):
        raise ValueError("a stream is not read to its last bit")
    return out.astype(kind).reshape(shape)


def read_varints(data: bytes, count: int) -> tuple[list[int], int]:
    values, at = [], 0
    for _ in range(count):
        value, shift = 0, 0
        while True:
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(value)
    return values, at


def canonical(lengths: bytes, table_log: int) -> dict[tuple[int, int], int]:
    """(length, code) -> symbol of one canonical Huffman code (lengths: 0 absent, else 1 + the code's length)."""
    present = [(n - 1, s) for s, n in enumerate(lengths) if n]
    if sum(2 ** (table_log - n) for n, _ in present) != 2 ** table_log or any(n > table_log for n, _ in present):
        raise ValueError("an incomplete or too long code")
    table, code, previous = {}, 0, None
    for n, s in sorted(present):
        if previous is not None:
            code = (code + 1) << (n - previous)
        elif n:
            code = 0
        table[(n, code)] = s
        previous = n
    return table


class Bits:
    """A stream read MSB first."""

    def __init__(self, data: bytes, length: int) -> None:
        self.value, self.length, self.position = int.from_bytes(data, "big"), length, 0
        self.total = 8 * len(data)

    def bit(self) -> int:
        if self.position >= self.length:
            raise ValueError("a stream runs out")
        self.position += 1
        return (self.value >> (self.total - self.position)) & 1

    def symbol(self, table: dict[tuple[int, int], int]) -> int:
        code, n = 0, 0
        while (n, code) not in table:
            code, n = (code << 1) | self.bit(), n + 1
        return table[(n, code)]
