"""LEB128 varints of whole numpy arrays (the `kvmart` codec's side block: model frequencies, copied rows).

Seven bits per byte, least significant group first, the top bit set on every byte but a number's last. Vectorized:
a few microseconds for thousands of numbers, where a Python loop would take milliseconds per tensor."""

from __future__ import annotations

import numpy as np

from kvmart.errors import CodecError

MAX_BYTES = 5  # numbers below 2^35; the codec writes none above 2^32


def write(values: np.ndarray) -> bytes:
    """The varints of `values` (non-negative integers below 2^35), back to back."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    sizes = np.ones(v.size, dtype=np.int64)
    for k in range(1, MAX_BYTES):
        sizes += v >= (np.uint64(1) << np.uint64(7 * k))
    if v.size and int(v.max()) >> (7 * MAX_BYTES):
        raise ValueError("varint.write: a number of 2^35 or more")
    out = np.zeros(int(sizes.sum()), dtype=np.uint8)
    starts = np.cumsum(sizes) - sizes
    for k in range(int(sizes.max()) if v.size else 0):
        sel = sizes > k
        group = (v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (sizes[sel] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + k] = (group | more).astype(np.uint8)
    return out.tobytes()


def read(data: bytes | memoryview, count: int, what: str) -> tuple[np.ndarray, int]:
    """The first `count` varints of `data` (int64) and the bytes they take; CodecError if there are fewer, or one
    is longer than MAX_BYTES or written with needless zero groups."""
    b = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)[:count]
    if len(ends) != count:
        raise CodecError(f"corrupt kvmart tensor: its {what} holds {len(ends)} numbers, {count} expected")
    if not count:
        return np.zeros(0, dtype=np.int64), 0
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > MAX_BYTES or ((lengths > 1) & (b[ends] == 0)).any():
        raise CodecError(f"corrupt kvmart tensor: its {what} holds a malformed number")
    values = np.zeros(count, dtype=np.int64)
    for k in range(int(lengths.max())):
        sel = lengths > k
        values[sel] |= (b[starts[sel] + k].astype(np.int64) & 0x7F) << (7 * k)
    return values, int(ends[-1]) + 1
