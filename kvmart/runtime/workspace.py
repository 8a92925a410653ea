"""Scratch memory for attention: buffers reused by every layer of every forward pass one thread runs.

Why: attention after a long prefix needs a score matrix of [heads, queries, context] floats (8 MB for 32 queries
after 3.8k tokens on Qwen3-0.6B's shape, 33 MB at 16k). Allocated afresh in each layer, such a block lies past
glibc's mmap threshold, so every layer paid a fresh mapping and a page fault per 4 KiB touched, and the softmax and
scaling that wrote into new tensors paid it again: more time than the arithmetic. A workspace is grown once and
then reused, so the hot path allocates nothing large.

Contract: a workspace belongs to one thread (the model keeps one per thread, kvmart/runtime/model.py); a tensor it
hands out is valid until the next `take` of the same name, so a caller uses it within one attention call and never
returns it. Contents are garbage on hand-out: callers write before they read."""

from __future__ import annotations

import math

import torch

from kvmart.runtime.kv import large_buffer

# Buffers up to this size stay between forward passes; a larger one (a long chunk after a very long prefix) lives
# for one forward pass only, so a rare request does not pin hundreds of MB for the life of the process.
KEEP_BYTES = 256 << 20


class Workspace:
    """Named scratch buffers, grown on demand. Not thread-safe: one thread owns it."""

    def __init__(self, keep_bytes: int = KEEP_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self._buffers: dict[str, torch.Tensor] = {}
        self.grown = 0  # how many times a buffer was (re)allocated: tests check the hot path stops allocating

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape` and `dtype` over buffer `name` (contents undefined). Invalidates the
        tensor the previous `take(name, ...)` returned."""
        num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < num_bytes:
            buffer = self._buffers[name] = large_buffer(max(num_bytes, 1))  # page-aligned: a fresh mapping
            self.grown += 1
        return buffer[:num_bytes].view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def trim(self) -> None:
        """Release the buffers larger than `keep_bytes` (called after each forward pass)."""
        for name in [n for n, b in self._buffers.items() if b.numel() > self.keep_bytes]:
            del self._buffers[name]
