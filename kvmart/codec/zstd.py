"""The `zstd` codec: zstd over a tensor's raw bytes. The general-purpose baseline kvmart's own codec must beat."""

from __future__ import annotations

import torch
import zstandard

from kvmart.codec.raw import byte_view
from kvmart.errors import CodecError

DEFAULT_LEVEL = 3


def compress(data: memoryview | bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


def decompress_into(frame: memoryview | bytes, target: memoryview, what: str) -> None:
    """Decompress one zstd frame that must hold exactly len(target) bytes into `target`; CodecError otherwise
    (checked from the frame header first, so a corrupt size never drives an allocation)."""
    try:
        if zstandard.frame_content_size(frame) != len(target):
            raise CodecError(f"corrupt {what}: its frame does not hold {len(target)} bytes")
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=len(target), allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(f"corrupt {what}: {e}") from e
    if len(data) != len(target):
        raise CodecError(f"corrupt {what}: {len(data)} bytes decompressed, {len(target)} expected")
    target[:] = data


class ZstdCodec:
    name = "zstd"

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict]:
        return compress(byte_view(tensor), self.level), {"level": self.level}

    def decode(self, data: memoryview, params: dict, out: torch.Tensor) -> None:
        if set(params) != {"level"}:
            raise CodecError(f"corrupt zstd tensor: params {params!r}")
        decompress_into(data, byte_view(out), "zstd tensor")
