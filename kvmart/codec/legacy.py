"""Format 1 of the `kvmart` codec (kvmart 0.1, params {"level": N}): decode only, so that artifacts written
before format 2 still load. New tensors are written in format 3 (format3.py); re-encoding an old artifact is
loading it and storing it again (`kvmart precompute` of the same document recomputes nothing it can load).

Format 1 (docs/FORMAT.md, *Format 1*): each element rotated left by one bit; a 9-bit symbol (exponent byte, sign)
per element, channel-major, rANS-coded with one model per channel cluster (4 interleaved 32-bit states, 16-bit
words, frequencies summing to 2^12); the lower byte planes, the sign bit cleared, raw or zstd. Layout, little-endian:

    u16 K | C x u8 cluster of each channel (only if K > 1)
          | K models: u16 n, n x u16 symbols (increasing, < 512), n x u16 frequencies (summing to 2^12)
          | u32 rANS bytes | (itemsize-1) x (u8 mode 0 raw / 1 zstd, u32 length) | rANS stream | lower planes
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvmart.codec.elements import as_uint, grid
from kvmart.codec.kernels import kernels
from kvmart.codec.zstd import decompress_into
from kvmart.errors import CodecError

ALPHABET = 512
PROB_SCALE = 1 << 12
STATE_LOW = 1 << 16
STATUS = {-1: "its rANS stream runs out", -2: "words are left over in its rANS stream",
          -3: "its rANS states do not end where the encoder started", -4: "an invalid model", -6: "out of memory"}


def decode(data: memoryview, out: torch.Tensor) -> None:
    """Fill `out` from a format-1 encoding; CodecError if it cannot have come from format 1's encoder."""
    size = out.element_size()
    L, T, D = grid(tuple(out.shape))
    reader = Reader(data)
    groups = reader.unpack("<H")[0]
    if not 1 <= groups <= 256 or (groups > 1 and groups > L * D):
        raise CodecError(f"corrupt kvmart tensor: {groups} channel clusters for {L * D} channels")
    labels = np.frombuffer(reader.take(L * D), dtype=np.uint8) if groups > 1 else np.zeros(L * D, np.uint8)
    if labels.size and int(labels.max()) >= groups:
        raise CodecError("corrupt kvmart tensor: channel clusters out of range")
    freq = np.stack([_read_model(reader) for _ in range(groups)])
    stream_bytes = reader.unpack("<I")[0]
    lower = [reader.unpack("<BI") for _ in range(size - 1)]
    stream = reader.take(stream_bytes)
    u = as_uint(out)
    planes = [_read_lower(reader.take(length), mode, u.size) for mode, length in lower]
    if reader.remaining:
        raise CodecError(f"corrupt kvmart tensor: {reader.remaining} bytes left over")
    if not u.size:
        if stream_bytes:
            raise CodecError("corrupt kvmart tensor: an exponent stream for an empty tensor")
        return
    if len(stream) < 16 or len(stream) % 2:
        raise CodecError("corrupt kvmart tensor: its rANS stream is cut short")
    states = struct.unpack("<4I", stream[:16])
    if min(states) < STATE_LOW:
        raise CodecError("corrupt kvmart tensor: rANS states out of range")
    low = planes[0] if size == 2 else np.ascontiguousarray(np.stack(planes, axis=-1))
    status = kernels().decode_v1(stream[16:], states, np.ascontiguousarray(labels), freq, groups, size, L, T, D,
                                 low, u)
    if status != 0:
        raise CodecError(f"corrupt kvmart tensor: {STATUS.get(status, f'status {status}')}")


def _read_lower(data: memoryview, mode: int, count: int) -> np.ndarray:
    if mode == 0 and len(data) == count:
        return np.frombuffer(data, dtype=np.uint8)
    if mode != 1:
        raise CodecError(f"corrupt kvmart tensor: plane mode {mode} with {len(data)} bytes for {count}")
    plane = np.empty(count, dtype=np.uint8)
    decompress_into(data, plane.data, "kvmart tensor mantissa plane")
    return plane


def _read_model(reader: Reader) -> np.ndarray:
    """One cluster's frequencies [ALPHABET] (uint16); CodecError unless they are a valid rANS model."""
    (n,) = reader.unpack("<H")
    if not 1 <= n <= ALPHABET:
        raise CodecError(f"corrupt kvmart tensor: a model of {n} symbols")
    used = np.frombuffer(reader.take(2 * n), dtype="<u2").astype(np.int64)
    counts = np.frombuffer(reader.take(2 * n), dtype="<u2").astype(np.int64)
    if (np.diff(used) <= 0).any() or used[-1] >= ALPHABET or (counts == 0).any() or counts.sum() != PROB_SCALE:
        raise CodecError("corrupt kvmart tensor: an invalid exponent model")
    freq = np.zeros(ALPHABET, dtype=np.uint16)
    freq[used] = counts
    return freq


class Reader:
    """Sequential reads from encoded bytes; CodecError (not IndexError, not a short read) past the end."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.offset = data, 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise CodecError(f"truncated kvmart tensor: {n} bytes wanted, {self.remaining} left")
        self.offset += n
        return self.data[self.offset - n:self.offset]

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))
