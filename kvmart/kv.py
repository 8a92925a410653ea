"""The KV cache in memory: `KV`, an immutable per-layer record of a token prefix's keys and values, and
`WorkingCache`, the preallocated transformers `Cache` a forward pass appends to.

Why preallocate: transformers' DynamicCache concatenates the whole cache onto itself at every layer of every step,
copying hundreds of MB per token for a long document. A WorkingCache copies the reused prefix once into buffers
sized for the whole request and writes new keys and values in place."""

from __future__ import annotations

from dataclasses import dataclass

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
        """Named tensors in a fixed order: layer 0 keys, layer 0 values, layer 1 keys..."""
        named: dict[str, torch.Tensor] = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            named[f"layers.{i}.keys"] = k
            named[f"layers.{i}.values"] = v
        return named

    def equal(self, other: "KV") -> bool:
        """Bit-for-bit equality of every tensor."""
        return self.num_layers == other.num_layers and all(
            torch.equal(a, b) for a, b in zip((*self.keys, *self.values), (*other.keys, *other.values))
        )


class PreallocatedLayer(CacheLayerMixin):
    """One layer's keys and values in buffers of fixed capacity; `update` writes in place and returns views."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.keys, self.values, self.length = keys, values, length
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a PreallocatedLayer is created initialized")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            raise AssertionError(f"working cache capacity {self.keys.shape[-2]} exceeded ({end})")
        self.keys[:, :, self.length:end].copy_(key_states)
        self.values[:, :, self.length:end].copy_(value_states)
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


class WorkingCache(Cache):
    """The cache of one request: a copy of the reused prefix plus room for `capacity` tokens in all.

    Not thread-safe; one request owns it. Reading it out with `to_kv` gives views, valid until the next update."""

    def __init__(self, layers: list[PreallocatedLayer]) -> None:
        super().__init__(layers=layers)

    @classmethod
    def allocate(cls, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype) -> "WorkingCache":
        shape = (1, kv_heads, capacity, head_dim)
        return cls([PreallocatedLayer(torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype), 0)
                    for _ in range(num_layers)])

    @classmethod
    def from_kv(cls, kv: KV | None, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                dtype: torch.dtype) -> "WorkingCache":
        """A cache holding a copy of `kv` (never aliased: the KV stays untouched) with room for `capacity` tokens."""
        cache = cls.allocate(num_layers, kv_heads, head_dim, capacity, dtype)
        if kv is not None:
            cache.load_prefix(kv)
        return cache

    def load_prefix(self, kv: KV) -> None:
        n = kv.num_tokens
        for layer, k, v in zip(self.layers, kv.keys, kv.values):
            layer.keys[:, :, :n].copy_(k)
            layer.values[:, :, :n].copy_(v)
            layer.length = n

    @property
    def num_tokens(self) -> int:
        return self.layers[0].length

    def to_kv(self) -> KV:
        n = self.num_tokens
        return KV(tuple(l.keys[:, :, :n] for l in self.layers), tuple(l.values[:, :, :n] for l in self.layers))
