"""The economics of reuse: pure cost functions, no I/O (docs/ECONOMICS.md).

Counts the work a forward pass does (FLOPs: linear layers and attention's quadratic term, separately), the bytes a
KV cache takes, the seconds both take on a device, and what they cost at named prices: one prefill P, one reuse R,
shipping the artifact to the reader, hosting it; the break-even N* = s/(s-1) with s = P/R; a fleet of N reads; and
the split of one read's tariff between user, provider and publisher. Money is Decimal throughout (never float);
FLOPs, bytes ratios and seconds are floats. Nothing here touches the filesystem: the CLI reads config.json files.

FLOPs count multiply-adds as 2 and cover the projections, the MLP, the attention products (QK^T and AV over the
causal pairs only) and the LM head for the positions whose logits are kept; norms, rotary, softmax and activations
(O(tokens x hidden)) are left out, under 1% at these shapes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from decimal import Decimal

from .builtin import RANDOM_MODELS, SMOLLM2

GB = 10**9  # prices per "GB" are per 10^9 bytes here; GiB (2^30) only where a figure says so
GIB = 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "int8": 1}
SECONDS_PER_HOUR = Decimal(3600)
TOKENS_PER_PRICE_UNIT = 10**6  # API input prices are quoted per 1M tokens


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
@dataclass(frozen=True)
class Prices:
    """Every price and rate the cost model uses. Defaults are the paper's setup, so the default output reproduces
    it; pass others for your hardware and cloud. Money is Decimal; rates are floats."""

    # $ per device-hour. Implied by every dollar figure of the paper (1.5M$ = 80M x 14.71 s x 4.59 $/h / 3600).
    device_usd_per_hour: Decimal = Decimal("4.6")
    # FLOP/s a prefill achieves. Fitted: our Qwen3-4B prefill FLOPs at 3,774 tokens over the paper's 14.71 s
    # (Apple M1 Pro GPU, fp16, PyTorch MPS).
    achieved_flops_per_second: float = 2.15e12
    # Memory bandwidth: a pass reads every weight and the cached KV at least once. Apple's M1 Pro spec: 200 GB/s.
    memory_bytes_per_second: float = 200e9
    # Fixed seconds per forward pass (framework, kernel launches), whatever its length. Not known for the paper's
    # setup: 0. bench/economics.py fits it on a machine (its reuse fit's intercept less the roofline time).
    pass_overhead_seconds: float = 0.0
    # Internet egress, $ per 10^9 bytes: public cloud list price of the first tier (AWS, GCP ~$0.08-0.12), and the
    # rate the paper's $0.049 per 0.54 GB implies.
    egress_usd_per_gb: Decimal = Decimal("0.09")
    # Object storage, $ per 10^9 bytes per month: AWS S3 Standard, first 50 TB, us-east-1.
    storage_usd_per_gb_month: Decimal = Decimal("0.023")
    # API list price of input tokens, $ per 1M. None: "at cost", the document's list price equals the prefill
    # compute it replaces (P), the unit the paper's tariff split is quoted in.
    input_usd_per_mtok: Decimal | None = None
    # Cache reads billed at this fraction of the input price: the paper's 0.1x (also Anthropic's and others'
    # published prompt-cache read discount).
    cache_read_fraction: Decimal = Decimal("0.1")
    # Share of the provider's margin on a read paid to the document's publisher. No published figure: an even
    # split, a placeholder for the ledger's licence terms.
    royalty_share: Decimal = Decimal("0.5")
    # Lossless compression ratio of a shipped artifact (1: raw bytes; the paper's open problem).
    compression_ratio: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if "Decimal" in str(f.type):  # money
                if value is not None and not isinstance(value, Decimal):
                    raise TypeError(f"{f.name} is money: pass a Decimal (never float), got {type(value).__name__}")
                if value is not None and value < 0:
                    raise ValueError(f"{f.name} must not be negative, got {value}")
            elif value < 0 or (value == 0 and f.name != "pass_overhead_seconds"):
                raise ValueError(f"{f.name} must be positive, got {value}")
        if not self.cache_read_fraction <= 1 or not self.royalty_share <= 1:
            raise ValueError("cache_read_fraction and royalty_share are fractions between 0 and 1")


def pass_seconds(shape: ModelShape, flops: Flops, cached_tokens: int, dtype: str, prices: Prices) -> float:
    """Roofline time of one pass: compute-bound (FLOPs / achieved FLOP/s) or memory-bound (the layers' weights, the
    LM head and the cached KV, each read once / bandwidth; embedding lookups read a few rows only), whichever is
    longer, plus the fixed overhead of a pass."""
    read_params = shape.num_layers * shape.linear_params_per_layer + shape.vocab_size * shape.hidden_size
    bytes_read = read_params * DTYPE_BYTES[dtype] + cached_tokens * kv_bytes_per_token(shape, dtype)
    roof = max(flops.total / prices.achieved_flops_per_second, bytes_read / prices.memory_bytes_per_second)
    return prices.pass_overhead_seconds + roof


def compute_cost(seconds: float, prices: Prices) -> Decimal:
    """Dollars of `seconds` of device time."""
    return Decimal(repr(seconds)) * prices.device_usd_per_hour / SECONDS_PER_HOUR


def egress_cost(num_bytes: int, prices: Prices) -> Decimal:
    """Dollars to send `num_bytes` (compressed by the lossless ratio) out of the provider's cloud."""
    return Decimal(num_bytes) / Decimal(repr(prices.compression_ratio)) * prices.egress_usd_per_gb / GB


def storage_cost(num_bytes: int, months: Decimal, prices: Prices) -> Decimal:
    return Decimal(num_bytes) * months * prices.storage_usd_per_gb_month / GB


def break_even_reads(speedup: float) -> float | None:
    """N* = s/(s-1): reads after which prefill-once-and-reuse beats re-prefilling; None when reuse is no faster."""
    return speedup / (speedup - 1) if speedup > 1 else None


def to_micro_usd(amount: Decimal) -> int:
    """Whole micro-dollars (half-up), for a ledger that keeps integers."""
    return int((amount * 10**6).quantize(Decimal(1), rounding="ROUND_HALF_UP"))


# -- one document's economics ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tariff:
    """One read's money: the user pays `user_pays` (instead of `list_price` for a fresh prefill); the provider
    spends `provider_cost` (the reuse compute); the margin is split between publisher royalty and provider."""

    list_price: Decimal
    user_pays: Decimal
    provider_cost: Decimal
    margin: Decimal
    royalty: Decimal
    provider_keeps: Decimal


def tariff_split(prefill_usd: Decimal, reuse_usd: Decimal, document_tokens: int, prices: Prices) -> Tariff:
    if prices.input_usd_per_mtok is None:
        list_price = prefill_usd
    else:
        list_price = prices.input_usd_per_mtok * document_tokens / TOKENS_PER_PRICE_UNIT
    user_pays = list_price * prices.cache_read_fraction
    margin = user_pays - reuse_usd
    royalty = margin * prices.royalty_share if margin > 0 else Decimal(0)
    return Tariff(list_price, user_pays, reuse_usd, margin, royalty, margin - royalty)


@dataclass(frozen=True)
class Economics:
    """Everything `kvmart cost` reports for one document read `reads` times. Times are analytic unless given."""

    shape: ModelShape
    dtype: str
    document_tokens: int
    question_tokens: int
    reads: int
    prices: Prices
    prefill_flops: Flops  # document + question from nothing
    reuse_flops: Flops  # question on top of the cached document
    prefill_seconds: float
    reuse_seconds: float
    is_measured: bool
    kv_bytes_per_token: int
    artifact_bytes: int
    prefill_usd: Decimal
    reuse_usd: Decimal
    egress_usd: Decimal
    storage_usd_per_month: Decimal
    tariff: Tariff

    @property
    def flop_ratio(self) -> float:
        return self.prefill_flops.total / self.reuse_flops.total

    @property
    def speedup(self) -> float:
        return self.prefill_seconds / self.reuse_seconds

    @property
    def break_even_reads(self) -> float | None:
        return break_even_reads(self.speedup)

    @property
    def fleet_prefill_usd(self) -> Decimal:
        """Every read re-prefills."""
        return self.reads * self.prefill_usd

    @property
    def fleet_reuse_usd(self) -> Decimal:
        """One prefill, then every read reuses the KV beside the provider's accelerators."""
        return self.prefill_usd + self.reads * self.reuse_usd

    @property
    def fleet_shipping_usd(self) -> Decimal:
        """One prefill, then every reader downloads the artifact and reuses it on its own device."""
        return self.prefill_usd + self.reads * (self.reuse_usd + self.egress_usd)

    @property
    def shipping_break_even_ratio(self) -> float | None:
        """Lossless compression ratio rho above which shipping beats re-prefilling: egress x bytes / (P - R)."""
        saved = self.prefill_usd - self.reuse_usd
        raw_egress = self.egress_usd * Decimal(repr(self.prices.compression_ratio))
        return float(raw_egress / saved) if saved > 0 else None


def analyse(shape: ModelShape, document_tokens: int, question_tokens: int = 32, reads: int = 1,
            prices: Prices = Prices(), dtype: str = "bfloat16", prefill_seconds: float | None = None,
            reuse_seconds: float | None = None, header_bytes: int = 0) -> Economics:
    """The economics of one document. Pass measured `prefill_seconds`/`reuse_seconds` (both or neither) to price
    measured times instead of the roofline estimate."""
    if document_tokens <= 0 or question_tokens <= 0 or reads < 0:
        raise ValueError("document and question need at least one token, and reads cannot be negative")
    if (prefill_seconds is None) != (reuse_seconds is None):
        raise ValueError("give both measured times (prefill and reuse) or neither")
    prefill = prefill_flops(shape, document_tokens + question_tokens)
    reuse = reuse_flops(shape, document_tokens, question_tokens)
    is_measured = prefill_seconds is not None
    if prefill_seconds is None or reuse_seconds is None:
        prefill_seconds = pass_seconds(shape, prefill, 0, dtype, prices)
        reuse_seconds = pass_seconds(shape, reuse, document_tokens, dtype, prices)
    size = artifact_bytes(shape, document_tokens, dtype, header_bytes)
    p_usd, r_usd = compute_cost(prefill_seconds, prices), compute_cost(reuse_seconds, prices)
    return Economics(
        shape=shape, dtype=dtype, document_tokens=document_tokens, question_tokens=question_tokens, reads=reads,
        prices=prices, prefill_flops=prefill, reuse_flops=reuse, prefill_seconds=prefill_seconds,
        reuse_seconds=reuse_seconds, is_measured=is_measured, kv_bytes_per_token=kv_bytes_per_token(shape, dtype),
        artifact_bytes=size, prefill_usd=p_usd, reuse_usd=r_usd, egress_usd=egress_cost(size, prices),
        storage_usd_per_month=storage_cost(size, Decimal(1), prices),
        tariff=tariff_split(p_usd, r_usd, document_tokens, prices),
    )


# The paper's measured seconds (prefill, reuse) per document length: Qwen3-4B fp16, Apple M1 Pro, KV in memory.
PAPER_MODEL = "Qwen3-4B"
PAPER_SECONDS: dict[int, tuple[float, float]] = {255: (0.67, 0.078), 3774: (14.71, 0.296)}
