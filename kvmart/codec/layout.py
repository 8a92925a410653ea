"""The parts of the `kvmart` codec's bytes that formats 2 and 3 share (docs/FORMAT.md): the tables after the header
(symbol values, each channel's code), the side block (copied rows, code lengths: one zlib stream), and a reader
that refuses a short read. Writing is the encoder's; every read check raises CodecError saying what is wrong."""

from __future__ import annotations

import zlib

import numpy as np

from kvmart.codec import varint
from kvmart.codec.analysis import Plan
from kvmart.errors import CodecError

SIDE_LEVEL = 6  # zlib's level for the side block: a few KB of code lengths, where 9 costs time and saves bytes


def tables(plan: Plan) -> bytes:
    """The symbol values (A x u16), then each channel's code (L*D x u8) when there is more than one code."""
    groups = len(plan.lengths)
    return plan.highs.astype("<u2").tobytes() + (plan.models.tobytes() if groups > 1 else b"")


def side_block(plan: Plan) -> bytes:
    """zlib of: the copied rows' gaps and distances (varints), then every code's lengths (K x A bytes)."""
    copies = plan.copies
    return zlib.compress(varint.write(np.diff(copies, prepend=0)) + varint.write(copies - plan.sources[copies])
                         + plan.lengths.tobytes(), SIDE_LEVEL)


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


def read_tables(reader: Reader, nsym: int, groups: int, channels: int, width: int,
                shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(symbol values [A] uint16, each channel's code [L*D] uint8), checked: values strictly increasing and of the
    symbol's width, codes < K."""
    highs = np.frombuffer(reader.take(2 * nsym, "symbol table"), dtype="<u2").astype(np.uint16)
    if (np.diff(highs.astype(np.int64)) <= 0).any() or int(highs[-1]) >> (width - shift):
        raise CodecError("corrupt kvmart tensor: its symbol table is not increasing values of the symbol's width")
    models = (np.frombuffer(reader.take(channels, "channel codes"), dtype=np.uint8) if groups > 1
              else np.zeros(channels, dtype=np.uint8))
    if models.size and int(models.max()) >= groups:
        raise CodecError("corrupt kvmart tensor: a channel's code is out of range")
    return highs, models


def read_side(block: memoryview, ncopies: int, groups: int, nsym: int, T: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(sources [T] uint32 or None when no row is copied, code lengths [K * A] uint8) of a side block."""
    side = inflate(block, 2 * varint.MAX_BYTES * ncopies + groups * nsym)
    numbers, used = varint.read(side, 2 * ncopies, "side block")
    if len(side) - used != groups * nsym:
        raise CodecError("corrupt kvmart tensor: its side block does not hold one code length per symbol and code")
    return _sources(numbers[:ncopies], numbers[ncopies:], T), np.frombuffer(side, dtype=np.uint8, offset=used)


def inflate(block: memoryview, limit: int) -> bytes:
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
