"""Model shapes and the work a forward pass does: what a decoder-only transformer's cost depends on (layers, heads,
widths), FLOPs of a pass (linear layers and attention's quadratic term, separately) and the bytes its KV takes. Pure
functions, no I/O. The economics (kvmart/economics/model.py) prices them; the store's placement (store/policy.py)
weighs artifacts by the prefill they spare.

FLOPs count multiply-adds as 2 and cover the projections, the MLP, the attention products (QK^T and AV over the
causal pairs only) and the LM head for the positions whose logits are kept; norms, rotary, softmax and activations
(O(tokens x hidden)) are left out, under 1% at these shapes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvmart.runtime.builtin import RANDOM_MODELS, SMOLLM2

GB = 10**9  # prices per "GB" are per 10^9 bytes here; GiB (2^30) only where a figure says so
GIB = 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "int8": 1}


@dataclass(frozen=True)
class ModelShape:
    """What the cost of a decoder-only transformer depends on (a Llama/Qwen3-style block: GQA attention, SwiGLU)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    is_tied: bool  # the LM head shares the embedding matrix: fewer weight bytes, the same FLOPs

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{self.name}: {name} must be positive, got {value}")

    @property
    def linear_params_per_layer(self) -> int:
        attention = 2 * self.hidden_size * self.num_heads * self.head_dim  # q_proj, o_proj
        attention += 2 * self.hidden_size * self.num_kv_heads * self.head_dim  # k_proj, v_proj
        return attention + 3 * self.hidden_size * self.intermediate_size  # gate, up, down

    @property
    def num_params(self) -> int:
        """Weights (norms left out): layers + embedding + LM head unless tied."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.is_tied else 2)
        return self.num_layers * self.linear_params_per_layer + embeddings


# Published config.json values of each model on its Hugging Face model page.
SHAPES: dict[str, ModelShape] = {s.name.lower(): s for s in (
    ModelShape("Qwen3-0.6B", 28, 1024, 16, 8, 128, 3072, 151_936, True),
    ModelShape("Qwen3-4B", 36, 2560, 32, 8, 128, 9728, 151_936, True),
    ModelShape("Qwen3-8B", 36, 4096, 32, 8, 128, 12_288, 151_936, False),
    ModelShape("Llama-3.1-8B", 32, 4096, 32, 8, 128, 14_336, 128_256, False),
    ModelShape("SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 49_152, True),
)}


def shape_from_config(config: dict, name: str) -> ModelShape:
    """A shape from a Hugging Face config.json's contents (KeyError names a missing field)."""
    heads = config["num_attention_heads"]
    return ModelShape(
        name=name, num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"],
        is_tied=bool(config.get("tie_word_embeddings", False)),
    )


def lookup_shape(spec: str) -> ModelShape | None:
    """A shape by name (case-insensitive), `builtin:NAME` (a seeded built-in's own shape, or `NAME-shape` for a
    table entry), or an org-prefixed Hub id such as `Qwen/Qwen3-4B`; None if the name is unknown."""
    name = spec.removeprefix("builtin:").split("/")[-1].lower()
    if spec.startswith("builtin:") and name in RANDOM_MODELS:
        s = RANDOM_MODELS[name]
        return ModelShape(f"builtin:{name}", s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim,
                          s.intermediate_size, s.vocab_size, False)  # built-ins are untied (see builtin.py)
    if name == SMOLLM2:
        name = "smollm2-135m"
    return SHAPES.get(name.removesuffix("-shape"))


def known_shapes() -> list[str]:
    return [s.name for s in SHAPES.values()] + [f"builtin:{n}" for n in RANDOM_MODELS] + [f"builtin:{SMOLLM2}"]


# -- work and bytes --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flops:
    """One forward pass's FLOPs: linear layers (incl. LM head) and attention (QK^T + AV), kept apart."""

    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention


def attention_pairs(new_tokens: int, cached_tokens: int) -> int:
    """(query, key) pairs a causal pass computes: each new token i sees the cache and new tokens 0..i."""
    return new_tokens * cached_tokens + new_tokens * (new_tokens + 1) // 2


def forward_flops(shape: ModelShape, new_tokens: int, cached_tokens: int = 0, logits_tokens: int = 1) -> Flops:
    """FLOPs of one pass over `new_tokens` after `cached_tokens` already in the KV, logits for the last
    `logits_tokens` positions (1: a server's prefill; 0: only build the KV)."""
    linear = 2.0 * new_tokens * shape.num_layers * shape.linear_params_per_layer
    linear += 2.0 * min(logits_tokens, new_tokens) * shape.hidden_size * shape.vocab_size
    per_pair = 4.0 * shape.num_layers * shape.num_heads * shape.head_dim  # 2 for q.k, 2 for p.v, per head
    return Flops(linear, per_pair * attention_pairs(new_tokens, cached_tokens))


def prefill_flops(shape: ModelShape, num_tokens: int) -> Flops:
    """A prefill of `num_tokens` from nothing."""
    return forward_flops(shape, num_tokens)


def reuse_flops(shape: ModelShape, cached_tokens: int, new_tokens: int) -> Flops:
    """`new_tokens` (the question) attending to a reused KV of `cached_tokens`."""
    return forward_flops(shape, new_tokens, cached_tokens)


def kv_bytes_per_token(shape: ModelShape, dtype: str = "bfloat16") -> int:
    """Keys + values of every layer for one token: 2 x layers x kv_heads x head_dim x bytes."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * DTYPE_BYTES[dtype]


def artifact_bytes(shape: ModelShape, num_tokens: int, dtype: str = "bfloat16", header_bytes: int = 0) -> int:
    """An artifact's size: its tensors plus a header (kvmart's holds the token ids: see bench/economics.py)."""
    return num_tokens * kv_bytes_per_token(shape, dtype) + header_bytes


def weight_bytes(shape: ModelShape, dtype: str = "bfloat16") -> int:
    return shape.num_params * DTYPE_BYTES[dtype]


# -- prices ----------------------------------------------------------------------------------------------------
