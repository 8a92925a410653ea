"""Tariffs: what a request and a publication cost, in Decimal dollars, and the integer amounts the ledger posts.

The ledger keeps money as whole nano-dollars (1e-9 USD, `*_nanousd` integers): a cache read of one token at the
default tariff is 100 nano-dollars, so nothing rounds to zero, and sums are exact. Prices are Decimal, never float.

Per request (`quote`): computed prompt tokens at the prefill price, cached prompt tokens at the cache-read price
(`cache_read_fraction` x prefill, or a priced document's own price), generated tokens at the output price. The
publisher of the document read earns `royalty_share` of the cache-read part; the provider keeps the rest. Each
part is rounded half-even to a nano-dollar and the provider's part is the total less the royalty, so the three
legs of a charge always sum to exactly zero."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from kvmart.errors import TariffError

NANO_PER_USD = 10**9
TOKENS_PER_MTOK = 10**6


@dataclass(frozen=True)
class Tariff:
    """Prices in USD per 1M tokens, and fractions. Defaults (each overridable by KVMART_<FIELD> in `ENV`):

    - prefill_usd_per_mtok = 1.00: computed input tokens; a round list price between small-model APIs
      (~$0.15) and mid-size ones (~$3).
    - cache_read_fraction = 0.1: cached tokens at 0.1x the prefill price (the paper's tariff; Anthropic's and
      others' published cache-read discount).
    - output_usd_per_mtok = 4.00: generated tokens; 4x input, the usual ratio of API price lists.
    - royalty_share = 0.4: the publisher's share of each cache-read charge; at the paper's 3,774 tokens the
      provider's reuse cost is ~0.02 of the 0.1 read price, so 0.4 of the read is half the margin.
    - precompute_usd_per_mtok = 1.00: the publisher's one-time charge for prefilling a published document (the
      prefill price: the publisher pays list once, agents read at 0.1x thereafter).
    - cache_read_usd_per_mtok = None: a priced document's own cache-read price, replacing the fraction.
    """

    prefill_usd_per_mtok: Decimal = Decimal("1.00")
    cache_read_fraction: Decimal = Decimal("0.1")
    output_usd_per_mtok: Decimal = Decimal("4.00")
    royalty_share: Decimal = Decimal("0.4")
    precompute_usd_per_mtok: Decimal = Decimal("1.00")
    cache_read_usd_per_mtok: Decimal | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "cache_read_usd_per_mtok":
                continue
            if not isinstance(value, Decimal) or not value.is_finite():
                raise TariffError(f"{f.name} must be a finite Decimal (never float), got {value!r}")
            if value < 0:
                raise TariffError(f"{f.name} must not be negative, got {value}")
        for name in ("cache_read_fraction", "royalty_share"):
            if getattr(self, name) > 1:
                raise TariffError(f"{name} is a fraction between 0 and 1, got {getattr(self, name)}")

    @property
    def read_usd_per_mtok(self) -> Decimal:
        """The price of one million cached tokens."""
        if self.cache_read_usd_per_mtok is not None:
            return self.cache_read_usd_per_mtok
        return self.prefill_usd_per_mtok * self.cache_read_fraction

    def with_overrides(self, **overrides: Decimal | None) -> "Tariff":
        """A copy with every non-None override applied (a document's licence terms)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Quote:
    """One request's charge, every amount in nano-dollars. total = computed + cache_read + output;
    provider = total - royalty."""

    cached_tokens: int
    computed_tokens: int
    output_tokens: int
    computed_nanousd: int
    cache_read_nanousd: int
    output_nanousd: int
    royalty_nanousd: int
    saved_nanousd: int  # what the cached tokens would have cost at the prefill price, less what they cost

    @property
    def total_nanousd(self) -> int:
        return self.computed_nanousd + self.cache_read_nanousd + self.output_nanousd

    @property
    def provider_nanousd(self) -> int:
        return self.total_nanousd - self.royalty_nanousd

    def __add__(self, other: "Quote") -> "Quote":
        """Two parts of one request's charge (reads from two documents, say) as one."""
        return Quote(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Quote)))


def whole(amount: Decimal) -> int:
    """Rounded half-even to an integer."""
    return int(amount.to_integral_value(rounding=ROUND_HALF_EVEN))


def to_nanousd(usd: Decimal) -> int:
    """Dollars -> whole nano-dollars, rounded half-even."""
    return whole(usd * NANO_PER_USD)


def usd_text(nanousd: int) -> str:
    """Nano-dollars as an exact decimal string of dollars ('0.000377400')."""
    return f"{Decimal(nanousd).scaleb(-9):.9f}"


def token_cost(num_tokens: int, usd_per_mtok: Decimal) -> int:
    return to_nanousd(Decimal(num_tokens) * usd_per_mtok / TOKENS_PER_MTOK)


def quote(tariff: Tariff, cached_tokens: int, computed_tokens: int, output_tokens: int,
          has_publisher: bool) -> Quote:
    """The charge of one request. The royalty goes to the document's publisher; without one (a document
    precomputed by the operator's CLI) there is no royalty and the provider keeps the whole read."""
    for name, n in (("cached_tokens", cached_tokens), ("computed_tokens", computed_tokens),
                    ("output_tokens", output_tokens)):
        if n < 0:
            raise TariffError(f"{name} must not be negative, got {n}")
    read = token_cost(cached_tokens, tariff.read_usd_per_mtok)
    royalty = whole(Decimal(read) * tariff.royalty_share) if has_publisher else 0
    saved = max(0, token_cost(cached_tokens, tariff.prefill_usd_per_mtok) - read)
    return Quote(cached_tokens, computed_tokens, output_tokens,
                 computed_nanousd=token_cost(computed_tokens, tariff.prefill_usd_per_mtok),
                 cache_read_nanousd=read, output_nanousd=token_cost(output_tokens, tariff.output_usd_per_mtok),
                 royalty_nanousd=royalty, saved_nanousd=saved)


def precompute_cost(tariff: Tariff, num_tokens: int) -> int:
    """The publisher's one-time charge for prefilling a document of `num_tokens`, in nano-dollars."""
    return token_cost(num_tokens, tariff.precompute_usd_per_mtok)


MAX_USD = Decimal(10**6)  # the largest amount or price read from outside: a deposit, a per-1M-token price
_DECIMAL_TEXT = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_money(value: object, name: str, max_value: Decimal = MAX_USD) -> Decimal:
    """A price, fraction or amount from a request body, option or variable: a string of ASCII digits with at most
    one point (an exponent allowed), or a JSON number; finite, not negative, at most `max_value` (beyond, the
    ledger's integers could overflow). TariffError (HTTP 400) otherwise: "1_000", "١٠" and " 1 000" are refused,
    whatever Python's Decimal would make of them. A JSON number is read through its decimal text, never used as
    a float."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise TariffError(f"{name} must be a number or a numeric string, got {value!r}", name)
    text = value.strip() if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, str) and not _DECIMAL_TEXT.fullmatch(text):
        raise TariffError(f"{name} must be a plain decimal number such as 12.50 (ASCII digits, at most one point), "
                          f"got {value!r}", name)
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise TariffError(f"{name} must be a number, got {value!r}", name) from None
    if not number.is_finite() or number < 0:
        raise TariffError(f"{name} must be a finite, non-negative number, got {value!r}", name)
    if number > max_value:
        raise TariffError(f"{name} must be at most {max_value:,}, got {value!r}", name)
    return number


# field name -> environment variable
ENV = {f.name: "KVMART_" + f.name.upper() for f in fields(Tariff) if f.name != "cache_read_usd_per_mtok"}


def load_tariff(environ: dict[str, str] | None = None) -> Tariff:
    """The default tariff, with any KVMART_PREFILL_USD_PER_MTOK, KVMART_CACHE_READ_FRACTION,
    KVMART_OUTPUT_USD_PER_MTOK, KVMART_ROYALTY_SHARE, KVMART_PRECOMPUTE_USD_PER_MTOK set in the environment."""
    env = os.environ if environ is None else environ
    return Tariff(**{name: parse_money(env[var], var) for name, var in ENV.items() if env.get(var)})
