"""The KV cache in memory: `KV`, an immutable per-layer record of a token prefix's keys and values, and
`WorkingCache`, the transformers `Cache` one request's forward passes append to.

Why not DynamicCache: it concatenates the whole cache onto itself at every layer of every step, copying hundreds
of MB per token for a long document. A WorkingCache preallocates room for the request's new tokens and writes them
in place. It has two modes:
- segmented (kvmart attention): the reused prefix is *referenced*, never copied; `kvmart.runtime.attention` attends over
  the prefix and the new tokens as two segments. Loading a stored document costs no copy beyond reading it.
- contiguous (transformers' sdpa / eager attention): the prefix is copied once into the buffers, and `update`
  returns views of everything so far, as those implementations expect."""

from __future__ import annotations

import mmap
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass(frozen=True)
class KV:
    """Keys and values of `num_tokens` tokens: per layer, tensors of shape [1, kv_heads, num_tokens, head_dim].

    Immutable by contract: nothing in kvmart writes into these tensors once a KV exists, so one KV may back any
    number of concurrent requests."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        assert len(self.keys) == len(self.values) and self.keys, "a KV needs at least one layer"

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors in the artifact order: layer 0 keys, layer 0 values, layer 1 keys..."""
        named: dict[str, torch.Tensor] = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            named[f"layers.{i}.keys"] = k
            named[f"layers.{i}.values"] = v
        return named

    def slice(self, start: int, end: int) -> "KV":
        """Positions [start, end) as a new KV (contiguous copies), or this KV itself when that is all of it."""
        if start == 0 and end == self.num_tokens:
            return self
        return KV(tuple(t[:, :, start:end].contiguous() for t in self.keys),
                  tuple(t[:, :, start:end].contiguous() for t in self.values))

    @staticmethod
    def concat(parts: "list[KV]") -> "KV":
        """The KVs of consecutive token runs joined along the token axis (the part itself if there is one)."""
        if len(parts) == 1:
            return parts[0]
        layers = range(parts[0].num_layers)
        return KV(tuple(torch.cat([p.keys[i] for p in parts], dim=-2) for i in layers),
                  tuple(torch.cat([p.values[i] for p in parts], dim=-2) for i in layers))

    def equal(self, other: "KV") -> bool:
        """Bit-for-bit equality of every tensor."""
        return self.num_layers == other.num_layers and all(
            torch.equal(a, b) for a, b in zip((*self.keys, *self.values), (*other.keys, *other.values), strict=True)
        )


def large_buffer(num_bytes: int) -> torch.Tensor:
    """A zero-copy uint8 tensor over fresh anonymous memory advised to use transparent huge pages.

    Why: first-touch page faults on 4 KiB pages cost more than the copy itself (here, filling 865 MB took 0.5 s
    with 4 KiB pages and 0.13 s with huge pages), and loading an artifact touches every page once. The mapping is
    freed when the last tensor viewing it is."""
    if num_bytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    region = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)


def mapped_file(f: BinaryIO, size_bytes: int) -> torch.Tensor | None:
    """A read-only uint8 tensor over the whole of an open regular file (a private, pre-populated memory map), or
    None where `f` is not a mappable file.

    Why: an artifact in the OS page cache is then used in place, with no allocation and no copy (865 MB mapped in
    1 ms here, against 0.13-1.1 s to fault in fresh memory and copy into it). Writing into the tensor is a crash
    (the pages are read-only), which the KV's immutability contract already forbids; the store replaces files by
    rename, never in place, so a mapped artifact cannot change under a reader."""
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    if size_bytes == 0 or not hasattr(mmap, "MAP_POPULATE"):
        return None
    try:
        region = mmap.mmap(fd, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(region, dtype=torch.uint8)


class WorkingLayer(CacheLayerMixin):
    """One layer: an optional read-only prefix, and buffers for new tokens written in place by `update`."""

    is_sliding = False
    is_compileable = False

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None, keys: torch.Tensor, values: torch.Tensor,
                 length: int, segmented: bool) -> None:
        super().__init__()
        self.prefix, self.keys, self.values, self.length, self.segmented = prefix, keys, values, length, segmented
        self.is_initialized = True

    @property
    def prefix_tokens(self) -> int:
        return self.prefix[0].shape[-2] if self.prefix is not None else 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a WorkingLayer is created initialized")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens; return the new-token segment (segmented) or everything so far (contiguous)."""
        end = self.length + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            raise AssertionError(f"working cache capacity {self.keys.shape[-2]} exceeded ({end})")
        self.keys[:, :, self.length:end].copy_(key_states)
        self.values[:, :, self.length:end].copy_(value_states)
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.length + (self.prefix_tokens if self.segmented else 0)

    def get_max_length(self) -> int:
        return self.keys.shape[-2] + (self.prefix_tokens if self.segmented else 0)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything so far as two tensors (a copy when segmented and a prefix exists)."""
        k, v = self.keys[:, :, :self.length], self.values[:, :, :self.length]
        if self.segmented and self.prefix is not None:
            return torch.cat([self.prefix[0], k], dim=-2), torch.cat([self.prefix[1], v], dim=-2)
        return k, v


class WorkingCache(Cache):
    """The cache of one request. Not thread-safe: one request owns it. The KV it was built from is never written."""

    def __init__(self, layers: list[WorkingLayer]) -> None:
        super().__init__(layers=layers)

    @classmethod
    def build(cls, kv: KV | None, num_layers: int, kv_heads: int, head_dim: int, new_tokens: int,
              dtype: torch.dtype, segmented: bool) -> "WorkingCache":
        """Room for `new_tokens` after `kv`: referenced when segmented, copied into the buffers otherwise."""
        prefix_tokens = kv.num_tokens if kv is not None else 0
        capacity = new_tokens if segmented else prefix_tokens + new_tokens
        shape = (1, kv_heads, capacity, head_dim)
        layers = []
        for i in range(num_layers):
            keys, values = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
            prefix = (kv.keys[i], kv.values[i]) if kv is not None else None
            if prefix is not None and not segmented:
                keys[:, :, :prefix_tokens].copy_(prefix[0])
                values[:, :, :prefix_tokens].copy_(prefix[1])
                prefix = None
            length = 0 if segmented else prefix_tokens
            layers.append(WorkingLayer(prefix, keys, values, length, segmented))
        return cls(layers)

    @property
    def num_tokens(self) -> int:
        return self.layers[0].get_seq_length()

    def to_kv(self) -> KV:
        pairs = [layer.keys_values() for layer in self.layers]
        return KV(tuple(k for k, _ in pairs), tuple(v for _, v in pairs))
