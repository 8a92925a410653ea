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

    def clone(self) -> "KV":
        """A copy of its own (contiguous), holding no reference to the tensors it was made from."""
        return KV(tuple(t.clone(memory_format=torch.contiguous_format) for t in self.keys),
                  tuple(t.clone(memory_format=torch.contiguous_format) for t in self.values))

    @staticmethod
    def concat(parts: "list[KV]") -> "KV":
        """The KVs of consecutive token runs joined along the token axis (the part itself if there is one)."""
        if len(parts) == 1:
            return parts[0]
        layers = range(parts[0].num_layers)
        return KV(tuple(torch.cat([p.keys[i] for p in parts], dim=-2) for i in layers),
                  tuple(torch.cat([p.values[i] for p in parts], dim=-2) for i in layers))

    @property
    def kv_heads(self) -> int:
        return self.keys[0].shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys[0].shape[3]

    def equal(self, other: "KV") -> bool:
        """Bit-for-bit equality of every tensor."""
        return self.num_layers == other.num_layers and all(
            torch.equal(a, b) for a, b in zip((*self.keys, *self.values), (*other.keys, *other.values), strict=True)
        )


# A cached prefix: the KVs of consecutive pieces, in order (empty: nothing cached).
Prefix = tuple[KV, ...]


def as_prefix(kv: "KV | Prefix | None") -> Prefix:
    """`kv` as a prefix: one KV is a one-piece prefix, None an empty one."""
    if kv is None:
        return ()
    return (kv,) if isinstance(kv, KV) else tuple(kv)


def prefix_tokens(prefix: Prefix) -> int:
    return sum(kv.num_tokens for kv in prefix)


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


Segment = tuple[torch.Tensor, torch.Tensor]  # one piece's keys and values in one layer: [1, kv_heads, n, head_dim]


class WorkingLayer(CacheLayerMixin):
    """One layer: the read-only segments of the prefix (segmented mode), and buffers for new tokens written in place
    by `update`."""

    is_sliding = False
    is_compileable = False

    def __init__(self, segments: tuple[Segment, ...], keys: torch.Tensor, values: torch.Tensor, copied_tokens: int,
                 segmented: bool) -> None:
        """`copied_tokens`: prefix tokens already in the buffers (contiguous mode); new tokens are written after."""
        super().__init__()
        self.segments, self.segmented = segments, segmented
        self.key_buffer, self.value_buffer = keys, values  # typed: the mixin declares keys/values Optional
        self.keys, self.values = keys, values  # what transformers' code reads
        self.copied_tokens = self.length = copied_tokens
        self.prefix_tokens = sum(k.shape[-2] for k, _ in segments)  # referenced (segmented mode), not copied
        self.is_initialized = True
        self._segment_views: tuple[Segment, ...] | None = None

    def segment_views(self) -> tuple[Segment, ...]:
        """Each segment as (keys transposed [kv_heads, head_dim, n], values [kv_heads, n, head_dim]): what the
        attention kernel multiplies by, made once per layer instead of at every decode step."""
        if self._segment_views is None:
            self._segment_views = tuple((k[0].transpose(-1, -2), v[0]) for k, v in self.segments)
        return self._segment_views

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a WorkingLayer is created initialized")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens; return the new-token segment (segmented) or everything so far (contiguous)."""
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            raise AssertionError(f"working cache capacity {self.key_buffer.shape[-2]} exceeded ({end})")
        self.key_buffer[:, :, self.length:end].copy_(key_states)
        self.value_buffer[:, :, self.length:end].copy_(value_states)
        self.length = end
        return self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.length + self.prefix_tokens

    def get_max_length(self) -> int:
        return self.key_buffer.shape[-2] + self.prefix_tokens

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything so far as two tensors (a copy when segmented and a prefix exists)."""
        k, v = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]
        if self.segments:
            return (torch.cat([s[0] for s in self.segments] + [k], dim=-2),
                    torch.cat([s[1] for s in self.segments] + [v], dim=-2))
        return k, v

    def new_segment(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens written so far in segmented mode (views of the buffers): what `update` returned last."""
        return self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]

    def new_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens written by `update` (after the prefix, in contiguous mode): views of the buffers."""
        return self.key_buffer[:, :, self.copied_tokens:self.length], self.value_buffer[:, :, self.copied_tokens:self.length]


class WorkingCache(Cache):
    """The cache of one request. Not thread-safe: one request owns it. The KVs it was built from are never written."""

    def __init__(self, layers: list[WorkingLayer]) -> None:
        super().__init__(layers=layers)  # type: ignore[arg-type]  # WorkingLayer is a CacheLayerMixin
        self.working_layers = layers

    @classmethod
    def build(cls, prefix: Prefix, num_layers: int, kv_heads: int, head_dim: int, new_tokens: int,
              dtype: torch.dtype, segmented: bool) -> "WorkingCache":
        """Room for `new_tokens` after `prefix`: its pieces referenced when segmented, copied into the buffers
        otherwise."""
        cached = prefix_tokens(prefix)
        capacity = new_tokens if segmented else cached + new_tokens
        shape = (1, kv_heads, capacity, head_dim)
        layers = []
        for i in range(num_layers):
            keys, values = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
            segments = tuple((kv.keys[i], kv.values[i]) for kv in prefix)
            if not segmented:
                start = 0
                for k, v in segments:
                    end = start + k.shape[-2]
                    keys[:, :, start:end].copy_(k)
                    values[:, :, start:end].copy_(v)
                    start = end
                segments = ()
            layers.append(WorkingLayer(segments, keys, values, 0 if segmented else cached, segmented))
        return cls(layers)

    @property
    def num_tokens(self) -> int:
        return self.working_layers[0].get_seq_length()

    def to_kv(self) -> KV:
        """Everything so far as one KV (a copy of the prefix's pieces, when there are any)."""
        pairs = [layer.keys_values() for layer in self.working_layers]
        return KV(tuple(k for k, _ in pairs), tuple(v for _, v in pairs))

    def new_kv(self) -> KV:
        """The tokens this cache's forward passes added, as one KV of views into its buffers (no copy)."""
        pairs = [layer.new_keys_values() for layer in self.working_layers]
        return KV(tuple(k for k, _ in pairs), tuple(v for _, v in pairs))


class SharedLayer(CacheLayerMixin):
    """One layer of a cache that several sequences' WorkingLayers stand behind: `parts[i]` picks, from each update's
    keys and values, what the i-th sequence's layer gets (its row of a decode step, or its tokens of a packed
    prompt pass)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, rows: list[WorkingLayer], parts: list[tuple[slice, ...]]) -> None:
        super().__init__()
        self.rows, self.parts = rows, parts
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a SharedLayer is created initialized")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write each sequence's part into its own layer. Returns the inputs: the sequences' caches differ in length,
        so kvmart's attention reads each one's segments from its own layer, not from the return value."""
        for part, layer in zip(self.parts, self.rows, strict=True):
            layer.update(key_states[part], value_states[part])
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return max(layer.get_seq_length() for layer in self.rows)

    def get_max_length(self) -> int:
        return max(layer.get_max_length() for layer in self.rows)


class SharedCache(Cache):
    """Several sequences' WorkingCaches (segmented mode) behind one transformers Cache, `parts[i]` of every update
    belonging to `caches[i]`. Not thread-safe; the caches stay their owners'."""

    def __init__(self, caches: list[WorkingCache], parts: list[tuple[slice, ...]]) -> None:
        if not caches or len(parts) != len(caches) or not all(
                layer.segmented for c in caches for layer in c.working_layers):
            raise AssertionError(f"a {type(self).__name__} needs at least one cache, one part per cache, all caches "
                                 f"in segmented mode")
        layers = [SharedLayer([c.working_layers[i] for c in caches], parts)
                  for i in range(len(caches[0].working_layers))]
        super().__init__(layers=layers)  # type: ignore[arg-type]  # SharedLayer is a CacheLayerMixin
        self.caches = caches


class BatchCache(SharedCache):
    """For a forward pass that feeds one row per sequence (a decode step): row b belongs to `caches[b]`."""

    def __init__(self, caches: list[WorkingCache]) -> None:
        super().__init__(caches, [(slice(b, b + 1),) for b in range(len(caches))])


class PackedCache(SharedCache):
    """For a forward pass that feeds several sequences' prompt pieces one after another along the token axis:
    tokens [start, end) of `bounds[i]` belong to `caches[i]`."""

    def __init__(self, caches: list[WorkingCache], bounds: list[tuple[int, int]]) -> None:
        super().__init__(caches, [(slice(None), slice(None), slice(start, end)) for start, end in bounds])
        self.bounds = bounds
