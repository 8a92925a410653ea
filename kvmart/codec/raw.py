"""The `raw` codec: a tensor's bytes as they are in memory (little-endian, C order)."""

from __future__ import annotations

import torch

from kvmart.errors import CodecError


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as bytes, without a copy (bfloat16 included, which numpy lacks)."""
    if tensor.numel() == 0:  # an empty tensor may have stride 0, which cannot be viewed as bytes
        return memoryview(bytearray())
    return tensor.reshape(-1).view(torch.uint8).numpy().data


class RawCodec:
    name = "raw"

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict]:
        return bytes(byte_view(tensor)), {}

    def decode(self, data: memoryview, params: dict, out: torch.Tensor) -> None:
        target = byte_view(out)
        if params or len(data) != len(target):
            raise CodecError(f"corrupt raw tensor: {len(data)} bytes for a tensor of {len(target)}")
        target[:] = data
