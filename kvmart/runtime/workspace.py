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
MAX_VIEWS = 512


class Workspace:
    """Named scratch buffers, grown on demand. Not thread-safe: one thread owns it."""

    def __init__(self, keep_bytes: int = KEEP_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self._buffers: dict[str, torch.Tensor] = {}
        # views handed out, by (name, shape, dtype): a decode step takes the same few shapes thousands of times, and
        # making a view costs more than the small matrix product it feeds
        self._views: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        self._scalars: dict[float, torch.Tensor] = {}
        self.grown = 0  # how many times a buffer was (re)allocated: tests check the hot path stops allocating

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape` and `dtype` over buffer `name` (contents undefined). Invalidates the
        tensor the previous `take(name, ...)` returned."""
        view = self._views.get((name, shape, dtype))
        if view is not None:
            return view
        num_bytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < num_bytes:
            buffer = self._buffers[name] = large_buffer(max(num_bytes, 1))  # page-aligned: a fresh mapping
            self._views = {key: v for key, v in self._views.items() if key[0] != name}  # views of the old one
            self.grown += 1
        if len(self._views) > MAX_VIEWS:  # shapes that grow with the context would pile up
            self._views.clear()
        view = self._views[name, shape, dtype] = buffer[:num_bytes].view(dtype).view(shape)
        return view

    def scalar(self, value: float) -> torch.Tensor:
        """`value` as a 0-dim float32 tensor, made once: an operation given it multiplies exactly as by the Python
        float (which torch rounds to float32 too) without wrapping a new tensor at every call."""
        tensor = self._scalars.get(value)
        if tensor is None:
            tensor = self._scalars[value] = torch.tensor(value, dtype=torch.float32)
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def trim(self) -> None:
        """Release the buffers larger than `keep_bytes` (called after each forward pass)."""
        for name in [n for n, b in self._buffers.items() if b.numel() > self.keep_bytes]:
            del self._buffers[name]
            self._views = {key: v for key, v in self._views.items() if key[0] != name}
