"""The economics of reuse: pure cost functions, no I/O (docs/ECONOMICS.md).

Counts the work a forward pass does (FLOPs: linear layers and attention's quadratic term, separately), the bytes a
KV cache takes, the seconds both take on a device, and what they cost at named prices: one prefill P, one reuse R,
shipping the artifact to the reader, hosting it; the break-even N* = s/(s-1) with s = P/R; a fleet of N reads; and
the split of one read's tariff between user, provider and publisher. Money is Decimal throughout (never float);
FLOPs, bytes ratios and seconds are floats. Nothing here touches the filesystem: the CLI reads config.json files.

Shapes, FLOPs and KV bytes come from kvmart/runtime/shapes.py (re-exported here: the cost model's vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from decimal import Decimal

from kvmart.runtime.shapes import (  # noqa: F401  (re-exported: the cost model's vocabulary)
    DTYPE_BYTES,
    GB,
    GIB,
    SHAPES,
    Flops,
    ModelShape,
    artifact_bytes,
    attention_pairs,
    forward_flops,
    known_shapes,
    kv_bytes_per_token,
    lookup_shape,
    prefill_flops,
    reuse_flops,
    shape_from_config,
    weight_bytes,
)

SECONDS_PER_HOUR = Decimal(3600)
TOKENS_PER_PRICE_UNIT = 10**6  # API input prices are quoted per 1M tokens


@dataclass(frozen=True)
class Prices:
    """Every price and rate the cost model uses. Defaults are the paper's setup (its device price, and device
    figures fitted to or taken from its hardware); the times they give are a roofline estimate, not the paper's
    measurements (those are `PAPER_SECONDS`, `kvmart cost --preset paper`). Pass others for your hardware and
    cloud. Money is Decimal; rates are floats."""

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

