"""Rejected candidate, kept for bench/codec.py: kvmart 0.1's codec (format 1), with its numba encoder and decoder.
kvmart itself now only decodes format 1, in C (kvmart/codec/legacy.py). Needs numba (`pip install 'kvmart[bench]'`).

kvmart 0.1's lossless codec for float KV tensors (`kvmart`).

Why it beats zstd on raw bytes: in a float tensor only the exponent is predictable; sign and low mantissa bits are
close to random. General-purpose compressors see interleaved bytes and can model neither. This codec:

1. rotates each element left by one bit, so that the exponent fills the top byte exactly (bfloat16 and float32:
   8 exponent bits; float16: 5 exponent bits and the top 3 of the mantissa) and the sign is the lowest bit;
2. forms one 9-bit symbol per element, exponent byte and sign, read channel-major (one row per channel: per layer,
   head and head_dim index), because a channel's exponents and signs follow one distribution (keys have outlier
   channels, whose sign hardly varies) while different channels' differ;
3. clusters the channels by their symbol histograms (a few k-means steps on code length) and codes each row with
   its cluster's static model by rANS (kvmart/codec/rans.py), within ~0.1% of the clusters' entropy;
4. stores the lower byte planes (the sign bit cleared: it is in the symbol) as zstd where that is smaller (its
   Huffman codes the 7 remaining bits of the lowest plane in 7; float32 holding upcast bfloat16: zeros), else raw.

Layout of the encoded bytes (little-endian), for a tensor read as [L, T, D] (tokens x channels, C = L*D channels):

    u16 K | C bytes: cluster of each channel (only if K > 1)
          | K models: u16 n, n x u16 symbols (increasing, < 512), n x u16 frequencies (summing to 2^12)
          | u32 rANS bytes | (itemsize-1) x (u8 mode 0 raw / 1 zstd, u32 length) | rANS stream | lower planes
"""

from __future__ import annotations

import math
import struct

import codec_rans_coder as rans  # noqa: I001  (bench/ is on the path when bench/codec.py runs)
import numpy as np
import torch
from numba import njit

from kvmart.codec.zstd import compress, decompress_into
from kvmart.errors import CodecError

DEFAULT_LEVEL = 3
MAX_GROUPS = 16
GROUP_OVERHEAD_BYTES = 40  # a model: its symbols and frequencies, roughly
MIN_SYMBOLS_PER_GROUP = 4096
KMEANS_STEPS = 8
UINTS = {2: (torch.int16, np.uint16), 4: (torch.int32, np.uint32)}


def grid(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(L, T, D): a tensor read as L blocks of T tokens x D channels."""
    d = shape[-1] if len(shape) >= 1 else 1
    t = shape[-2] if len(shape) >= 2 else 1
    return math.prod(shape[:-2]), t, d


def as_uint(tensor: torch.Tensor) -> np.ndarray:
    """The contiguous tensor's elements as unsigned integers of the same width, without a copy."""
    signed, unsigned = UINTS[tensor.element_size()]
    if tensor.numel() == 0:
        return np.zeros(0, dtype=unsigned)
    return tensor.reshape(-1).view(signed).numpy().view(unsigned)


def rotate_left(u: np.ndarray) -> np.ndarray:
    bits = u.dtype.itemsize * 8
    return (u << u.dtype.type(1)) | (u >> u.dtype.type(bits - 1))


@njit(cache=True, nogil=True)
def _merge_top(u, tiles, L, T, D, shift):  # pragma: no cover - compiled
    """Put each element's exponent and sign back from its symbol in `tiles` [L, blocks, D, TILE] and rotate it right
    by one bit: one pass over the tensor instead of numpy's transpose, interleave and shifts. Tiled so that both
    the symbols read (one TILE x D tile) and the elements written stay within a few pages."""
    low = ((1 << shift) - 1) & ~1
    top_bit = shift + 7
    for l in range(L):
        for b in range(tiles.shape[1]):
            for tt in range(min(rans.TILE, T - b * rans.TILE)):
                t = b * rans.TILE + tt
                base = (l * T + t) * D
                for d in range(D):
                    symbol = np.int64(tiles[l, b, d, tt])
                    v = (np.int64(u[base + d]) & low) | ((symbol >> 1) << shift) | (symbol & 1)
                    u[base + d] = (v >> 1) | ((v & 1) << top_bit)


@njit(cache=True, nogil=True)
def _merge_low_top(u, tiles, low, L, T, D):  # pragma: no cover - compiled
    """_merge_top for 2-byte elements, taking the low byte from its plane `low` [L*T*D] directly (no interleave)."""
    for l in range(L):
        for b in range(tiles.shape[1]):
            for tt in range(min(rans.TILE, T - b * rans.TILE)):
                t = b * rans.TILE + tt
                base = (l * T + t) * D
                for d in range(D):
                    symbol = np.int64(tiles[l, b, d, tt])
                    v = (np.int64(low[base + d]) & 0xFE) | ((symbol >> 1) << 8) | (symbol & 1)
                    u[base + d] = (v >> 1) | ((v & 1) << 15)


def channel_histograms(top: np.ndarray) -> np.ndarray:
    """[C, ALPHABET] counts of each symbol in each channel's row of `top` [C, T] (float64: exact below 2^53)."""
    return _histograms(top, rans.ALPHABET).astype(np.float64)


@njit(cache=True, nogil=True)
def _histograms(top, size):  # pragma: no cover - compiled
    counts = np.zeros((top.shape[0], size), dtype=np.int64)
    for c in range(top.shape[0]):
        for t in range(top.shape[1]):
            counts[c, top[c, t]] += 1
    return counts


def code_bits(hist: np.ndarray, labels: np.ndarray, groups: int) -> tuple[np.ndarray, float]:
    """(cost [C, groups] in bits of coding each channel with each group's distribution, total bits as assigned)."""
    counts = (labels[None, :] == np.arange(groups)[:, None]).astype(np.float64) @ hist
    probs = (counts + 1e-3) / (counts + 1e-3).sum(axis=1, keepdims=True)
    cost = -hist @ np.log2(probs).T
    return cost, float(cost[np.arange(len(labels)), labels].sum())


def kmeans(hist: np.ndarray, groups: int) -> tuple[np.ndarray, float]:
    """Channels clustered into `groups` by the code length of their histograms; (labels, estimated bits)."""
    mean = (hist @ np.arange(hist.shape[1])) / np.maximum(hist.sum(axis=1), 1)
    labels = np.minimum((np.argsort(np.argsort(mean, kind="stable")) * groups) // len(mean), groups - 1)
    cost, bits = code_bits(hist, labels, groups)
    for _ in range(KMEANS_STEPS):
        new = cost.argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        cost, bits = code_bits(hist, labels, groups)
    return labels, bits


def cluster(top: np.ndarray, max_groups: int = MAX_GROUPS, hist: np.ndarray | None = None) -> np.ndarray:
    """The cluster of each channel (row of `top`), the number of clusters chosen by estimated coded size."""
    channels, tokens = top.shape
    limit = min(max_groups, channels, max(1, channels * tokens // MIN_SYMBOLS_PER_GROUP))
    hist = channel_histograms(top) if hist is None else hist
    best = np.zeros(channels, dtype=np.int64)
    best_bytes = code_bits(hist, best, 1)[1] / 8 + GROUP_OVERHEAD_BYTES
    groups = 2
    while groups <= limit:
        labels, bits = kmeans(hist, groups)
        used = len(np.unique(labels))
        if bits / 8 + used * GROUP_OVERHEAD_BYTES < best_bytes:
            best, best_bytes = np.unique(labels, return_inverse=True)[1], bits / 8 + used * GROUP_OVERHEAD_BYTES
        groups *= 2
    return best


class PlanesCodec:
    name = "kvmart"

    def __init__(self, level: int = DEFAULT_LEVEL, max_groups: int = MAX_GROUPS) -> None:
        self.level, self.max_groups = level, max_groups

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict]:
        size = tensor.element_size()
        L, T, D = grid(tuple(tensor.shape))
        rotated = rotate_left(as_uint(tensor))
        planes = rotated.view(np.uint8).reshape(L, T, D, size)
        top = symbols(planes[..., size - 1], planes[..., 0] & 1)
        hist = channel_histograms(top)
        labels = cluster(top, self.max_groups, hist) if top.size else np.zeros(L * D, dtype=np.int64)
        groups = int(labels.max()) + 1 if labels.size else 1
        freq = np.stack([rans.quantize(hist[labels == g].sum(axis=0).astype(np.int64))
                         for g in range(groups)]) if top.size else rans.quantize(np.ones(1, np.int64))[None]
        stream = rans.encode(top, labels, freq) if top.size else b""
        head = [struct.pack("<H", groups)]
        if groups > 1:
            head.append(labels.astype(np.uint8).tobytes())
        head += [_model_bytes(f) for f in freq]
        head.append(struct.pack("<I", len(stream)))
        planes[..., 0] &= 0xFE  # the sign is in the symbol
        lower = [self._lower_plane(np.ascontiguousarray(planes[..., k])) for k in range(size - 1)]
        head += [struct.pack("<BI", mode, len(data)) for mode, data in lower]
        return b"".join([*head, stream, *(data for _, data in lower)]), {"level": self.level}

    def _lower_plane(self, plane: np.ndarray) -> tuple[int, bytes]:
        raw = plane.tobytes()
        packed = compress(raw, self.level)
        return (1, packed) if len(packed) < 0.97 * len(raw) else (0, raw)

    def decode(self, data: memoryview, params: dict, out: torch.Tensor) -> None:
        if set(params) != {"level"}:
            raise CodecError(f"corrupt kvmart tensor: params {params!r}")
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
        planes = [self._read_lower(reader.take(length), mode, u.size) for mode, length in lower]
        if reader.remaining:
            raise CodecError(f"corrupt kvmart tensor: {reader.remaining} bytes left over")
        if not u.size:
            if stream_bytes:
                raise CodecError("corrupt kvmart tensor: an exponent stream for an empty tensor")
            return
        tiles = np.empty((L, -(-T // rans.TILE), D, rans.TILE), dtype=np.uint16)
        rans.decode(stream, labels, freq, tiles, T)
        if size == 2:
            _merge_low_top(u, tiles, planes[0], L, T, D)
            return
        interleaved = u.view(np.uint8).reshape(L, T, D, size)
        for k, plane in enumerate(planes):
            interleaved[..., k] = plane.reshape(L, T, D)
        _merge_top(u, tiles, L, T, D, 8 * size - 8)

    @staticmethod
    def _read_lower(data: memoryview, mode: int, count: int) -> np.ndarray:
        if mode == 0 and len(data) == count:
            return np.frombuffer(data, dtype=np.uint8)
        if mode != 1:
            raise CodecError(f"corrupt kvmart tensor: plane mode {mode} with {len(data)} bytes for {count}")
        plane = np.empty(count, dtype=np.uint8)
        decompress_into(data, memoryview(plane), "kvmart tensor mantissa plane")
        return plane


def symbols(top: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """The 9-bit symbols [C, T] (exponent byte << 1 | sign), channel-major, of planes [L, T, D]."""
    L, T, D = top.shape
    joined = (top.astype(np.uint16) << 1) | sign
    return np.ascontiguousarray(joined.transpose(0, 2, 1)).reshape(L * D, T)


def _model_bytes(freq: np.ndarray) -> bytes:
    used = np.nonzero(freq)[0]
    return struct.pack("<H", len(used)) + used.astype("<u2").tobytes() + freq[used].astype("<u2").tobytes()


def _read_model(reader: "Reader") -> np.ndarray:
    """One cluster's frequencies [ALPHABET]; CodecError unless they are a valid rANS model."""
    (n,) = reader.unpack("<H")
    if not 1 <= n <= rans.ALPHABET:
        raise CodecError(f"corrupt kvmart tensor: a model of {n} symbols")
    used = np.frombuffer(reader.take(2 * n), dtype="<u2").astype(np.int64)
    counts = np.frombuffer(reader.take(2 * n), dtype="<u2").astype(np.int64)
    if ((np.diff(used) <= 0).any() or used[-1] >= rans.ALPHABET or (counts == 0).any()
            or counts.sum() != rans.PROB_SCALE):
        raise CodecError("corrupt kvmart tensor: an invalid exponent model")
    freq = np.zeros(rans.ALPHABET, dtype=np.int64)
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
