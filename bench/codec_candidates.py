"""Candidates that kvmart's codec format 3 was chosen over, measured side by side by bench/codec.py (issue 32;
format 2, kvmart 0.2's, is measured there too: HuffmanCodec(version=2)).

    format 1        kvmart 0.1's codec: exponent and sign per channel cluster, rANS (numba encoder, bench/
                    codec_rans.py; decoded by kvmart's C port of its decoder, kvmart/codec/legacy.py)
    zstd planes     pure numpy + zstandard: the exponent byte plane channel-major with channels sorted by mean
                    exponent (zstd's Huffman literals adapt per block), the other byte planes zstd-1, as zipnn does
                    with its own Huffman

Two more were measured once and are recorded in docs/BENCHMARKS.md, not here: constriction's categorical ANS (the
issue's own probe) and a C tANS coder (four interleaved states, commit bf890ea of the codec branch).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import torch
import zstandard

from kvmart.codec import legacy
from kvmart.codec.elements import as_uint, grid

Pair = tuple[Callable[[torch.Tensor], bytes], Callable[[bytes, torch.Tensor], None]]


def candidates() -> dict[str, Pair | str]:
    return {"candidate: format 1 (rANS per channel cluster, kvmart 0.1)": format_1(),
            "candidate: zstd Huffman over channel-sorted exponent planes (numpy + zstandard)": zstd_planes()}


def format_1() -> Pair | str:
    try:
        import codec_rans
    except ImportError:
        return "not installed (numba)"
    coder = codec_rans.PlanesCodec()
    return (lambda t: coder.encode(t)[0], lambda data, out: legacy.decode(memoryview(data), out))


def _rotate(u: np.ndarray, left: bool) -> np.ndarray:
    bits = u.dtype.itemsize * 8
    a, b = (1, bits - 1) if left else (bits - 1, 1)
    return (u << u.dtype.type(a)) | (u >> u.dtype.type(b))


def zstd_planes() -> Pair:
    exponents = zstandard.ZstdCompressor(level=3)
    others = zstandard.ZstdCompressor(level=1)

    def encode(t: torch.Tensor) -> bytes:
        size = t.element_size()
        L, T, D = grid(tuple(t.shape))
        planes = _rotate(as_uint(t.contiguous()), left=True).view(np.uint8).reshape(L, T, D, size)
        top = np.ascontiguousarray(planes[..., size - 1].transpose(0, 2, 1)).reshape(L * D, T)
        order = np.argsort(top.mean(axis=1), kind="stable").astype(np.uint32)
        parts = [exponents.compress(top[order].tobytes())]
        parts += [others.compress(np.ascontiguousarray(planes[..., k]).tobytes()) for k in range(size - 1)]
        head = struct.pack(f"<{len(parts)}I", *map(len, parts)) + order.tobytes()
        return head + b"".join(parts)

    def decode(data: bytes, out: torch.Tensor) -> None:
        size = out.element_size()
        L, T, D = grid(tuple(out.shape))
        lengths = struct.unpack_from(f"<{size}I", data)
        at = 4 * size
        order = np.frombuffer(data, dtype=np.uint32, count=L * D, offset=at)
        at += 4 * L * D
        inflate = zstandard.ZstdDecompressor()
        blobs = []
        for n in lengths:
            blobs.append(inflate.decompress(data[at:at + n]))
            at += n
        top = np.empty((L * D, T), dtype=np.uint8)
        top[order] = np.frombuffer(blobs[0], dtype=np.uint8).reshape(L * D, T)
        planes = np.empty((L, T, D, size), dtype=np.uint8)
        planes[..., size - 1] = top.reshape(L, D, T).transpose(0, 2, 1)
        for k in range(size - 1):
            planes[..., k] = np.frombuffer(blobs[k + 1], dtype=np.uint8).reshape(L, T, D)
        u = as_uint(out)
        u[:] = _rotate(planes.view(u.dtype).reshape(-1), left=False)

    return encode, decode
