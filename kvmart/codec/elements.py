"""A tensor's elements as the codecs read them: unsigned integers of the element's width, in a [L, T, D] grid."""

from __future__ import annotations

import math

import numpy as np
import torch

UINTS: dict[int, tuple[torch.dtype, type[np.unsignedinteger]]] = {2: (torch.int16, np.uint16), 4: (torch.int32, np.uint32)}


def grid(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(L, T, D): a tensor read as L blocks of T tokens x D channels (the last two dims; KV: [1, heads, T, D])."""
    d = shape[-1] if len(shape) >= 1 else 1
    t = shape[-2] if len(shape) >= 2 else 1
    return math.prod(shape[:-2]), t, d


def as_uint(tensor: torch.Tensor) -> np.ndarray:
    """The contiguous tensor's elements as unsigned integers of the same width (flat), without a copy."""
    signed, unsigned = UINTS[tensor.element_size()]
    if tensor.numel() == 0:
        return np.zeros(0, dtype=unsigned)
    return tensor.reshape(-1).view(signed).numpy().view(unsigned)
