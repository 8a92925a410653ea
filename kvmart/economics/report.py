"""What `kvmart cost` shows: an `Economics` as the paper-style table (rows of text), as JSON, and as a plot; and
the named presets of its times.

The times a table prices come from one of three places, and every table says which: the roofline estimate of
`kvmart.economics.model` (the default: analytic, from FLOPs, bytes and the device figures), the paper's measured
times (`--preset paper`: Qwen3-4B fp16 on an M1 Pro, at the two lengths it measured), or times the user measured
and passed. The rows and the JSON are pure; `plot` writes a PNG with matplotlib (the optional `plot` extra),
imported lazily and used through its object API only, so no global backend or pyplot state is touched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path

from kvmart.economics.model import GB, GIB, PAPER_MODEL, PAPER_SECONDS, Economics, analyse

Row = tuple[str, str, str]  # quantity, value, how it is computed
Section = tuple[str, list[Row]]

PRESETS = ("roofline", "paper")
ROOFLINE_NOTE = "analytic: a roofline estimate, not a measurement"
PAPER_NOTE = f"taken from the paper: measured on {PAPER_MODEL} fp16, Apple M1 Pro"


@dataclass(frozen=True)
class Times:
    """Where one table's seconds come from: both None for the roofline, or a measured pair with its source."""

    prefill_seconds: float | None
    reuse_seconds: float | None
    source: str


def preset_times(preset: str, model: str, document_tokens: int, prefill_seconds: float | None,
                 reuse_seconds: float | None) -> Times:
    """The times `kvmart cost` prices. `roofline` (default): the analytic estimate unless the user passed measured
    times; `paper`: the paper's measured times for its model at a length it measured (ValueError otherwise: the
    paper has no other measurement, and mixing its times with another model's shape would mean nothing)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if (prefill_seconds is None) != (reuse_seconds is None):
        raise ValueError("give both measured times (prefill and reuse) or neither")
    if preset == "paper":
        if prefill_seconds is not None:
            raise ValueError("--preset paper uses the paper's measured times: leave out --prefill/--reuse-seconds")
        if model.lower().removeprefix("builtin:").removesuffix("-shape") != PAPER_MODEL.lower():
            raise ValueError(f"--preset paper prices the paper's model, {PAPER_MODEL} (got --model {model})")
        if document_tokens not in PAPER_SECONDS:
            raise ValueError(f"the paper measured documents of {' and '.join(map(str, PAPER_SECONDS))} tokens "
                             f"only (got --tokens {document_tokens})")
        prefill, reuse = PAPER_SECONDS[document_tokens]
        return Times(prefill, reuse, PAPER_NOTE)
    if prefill_seconds is not None:
        return Times(prefill_seconds, reuse_seconds, "measured: the times you passed")
    return Times(None, None, ROOFLINE_NOTE)


def usd(amount: Decimal) -> str:
    """Dollars to three significant figures, millions as M: $1.52M, $4,321, $0.0190, $0.000181."""
    sign, amount = ("-" if amount < 0 else ""), abs(amount)
    if amount >= 10**6:
        return f"{sign}${amount / 10**6:,.2f}M"
    if amount >= 1000:
        return f"{sign}${amount:,.0f}"
    if amount == 0:
        return "$0"
    places = max(2, 2 - amount.adjusted())
    return f"{sign}${amount:.{places}f}"


def sci(x: float) -> str:
    return f"{x:.3g}"


def sections(e: Economics, times_source: str | None = None) -> list[Section]:
    """The table `kvmart cost` prints, section by section; `times_source` says where measured times came from."""
    p, r = e.prefill_flops, e.reuse_flops
    overhead = f"{e.prices.pass_overhead_seconds:.3g} s + " if e.prices.pass_overhead_seconds else ""
    how = (times_source or "measured (given)") if e.is_measured else (
        f"{ROOFLINE_NOTE}: {overhead}max(FLOPs / {e.prices.achieved_flops_per_second:.3g} FLOP/s, bytes read / "
        f"{e.prices.memory_bytes_per_second / GB:.3g} GB/s)")
    n_star = e.break_even_reads
    compute = [
        ("prefill FLOPs", f"{sci(p.total)} (linear {sci(p.linear)} + attention {sci(p.attention)})",
         f"document + question, {e.document_tokens + e.question_tokens:,} tokens from nothing"),
        ("reuse FLOPs", f"{sci(r.total)} (linear {sci(r.linear)} + attention {sci(r.attention)})",
         f"{e.question_tokens} question tokens attending to {e.document_tokens:,} cached"),
        ("FLOP ratio", f"{e.flop_ratio:.1f}x", "prefill / reuse"),
        ("prefill / reuse seconds", f"{e.prefill_seconds:.3g} s / {e.reuse_seconds:.3g} s", how),
        ("speedup s", f"{e.speedup:.1f}x", "P / R"),
        ("prefill P / reuse R", f"{usd(e.prefill_usd)} / {usd(e.reuse_usd)}",
         f"seconds x ${e.prices.device_usd_per_hour}/device-hour"),
        ("break-even reads N*", f"{n_star:.3f}" if n_star else "never", "s / (s - 1)"),
    ]
    ratio = e.shipping_break_even_ratio
    artifact = [
        ("KV bytes per token", f"{e.kv_bytes_per_token:,} B",
         f"2 x {e.shape.num_layers} layers x {e.shape.num_kv_heads} KV heads x {e.shape.head_dim} x {e.dtype}"),
        ("artifact", f"{e.artifact_bytes:,} B = {e.artifact_bytes / GB:.3f} GB = {e.artifact_bytes / GIB:.3f} GiB",
         "tokens x bytes per token"),
        ("egress per load", f"{usd(e.egress_usd)} = {e.egress_usd / e.prefill_usd:.2f}x P",
         f"${e.prices.egress_usd_per_gb}/GB, lossless ratio {e.prices.compression_ratio:g}"),
        ("shipping beats re-prefill", f"if lossless ratio > {ratio:.2f}" if ratio else "never",
         "egress x bytes / (P - R)"),
        ("hosting per month", usd(e.storage_usd_per_month), f"${e.prices.storage_usd_per_gb_month}/GB-month"),
    ]
    fleet = [
        ("re-prefill every read", usd(e.fleet_prefill_usd), "N x P"),
        ("reuse, hosted by the provider", usd(e.fleet_reuse_usd), "P + N x R"),
        ("reuse, artifact shipped to readers", usd(e.fleet_shipping_usd), "P + N x (R + egress)"),
        ("saving of hosted reuse", f"{e.fleet_prefill_usd / e.fleet_reuse_usd:.1f}x" if e.fleet_reuse_usd else "-",
         "re-prefill / hosted reuse"),
    ]
    t, unit = e.tariff, (e.tariff.list_price or Decimal(1))
    units = lambda x: f"{x / unit:.3f} of list"  # noqa: E731
    listed = "at cost: list price = P" if e.prices.input_usd_per_mtok is None else (
        f"${e.prices.input_usd_per_mtok} per 1M input tokens")
    tariff = [
        ("list price of the document", usd(t.list_price), listed),
        ("user pays (cache read)", f"{usd(t.user_pays)} ({units(t.user_pays)})",
         f"{e.prices.cache_read_fraction} x list: the user saves {1 - e.prices.cache_read_fraction}"),
        ("provider cost", f"{usd(t.provider_cost)} ({units(t.provider_cost)})", "R"),
        ("margin", f"{usd(t.margin)} ({units(t.margin)})", "user pays - provider cost"),
        ("publisher royalty", usd(t.royalty), f"{e.prices.royalty_share} x margin"),
        ("provider keeps", usd(t.provider_keeps), "margin - royalty"),
    ]
    return [("compute, per read", compute), ("the artifact", artifact), (f"{e.reads:,} reads", fleet),
            ("tariff, per read", tariff)]


def title(e: Economics, times_source: str | None = None) -> str:
    times = (times_source or "measured") if e.is_measured else "roofline estimate"
    return (f"{e.shape.name} · {e.dtype} · {e.document_tokens:,}-token document + {e.question_tokens}-token "
            f"question · {e.reads:,} reads · times: {times.split(':')[0]}")


def as_json(e: Economics, times_source: str | None = None) -> dict:
    """Machine-readable: money as decimal strings (exact), everything else as numbers."""
    money = lambda x: str(x)  # noqa: E731
    prices = {k: (money(v) if isinstance(v, Decimal) else v) for k, v in asdict(e.prices).items()}
    return {
        "model": asdict(e.shape), "dtype": e.dtype, "document_tokens": e.document_tokens,
        "question_tokens": e.question_tokens, "reads": e.reads, "prices": prices,
        "flops": {"prefill": {"linear": e.prefill_flops.linear, "attention": e.prefill_flops.attention},
                  "reuse": {"linear": e.reuse_flops.linear, "attention": e.reuse_flops.attention},
                  "ratio": e.flop_ratio},
        "seconds": {"prefill": e.prefill_seconds, "reuse": e.reuse_seconds, "is_measured": e.is_measured,
                    "source": (times_source or "measured") if e.is_measured else ROOFLINE_NOTE},
        "speedup": e.speedup, "break_even_reads": e.break_even_reads,
        "bytes": {"kv_per_token": e.kv_bytes_per_token, "artifact": e.artifact_bytes},
        "usd": {"prefill": money(e.prefill_usd), "reuse": money(e.reuse_usd), "egress_per_load": money(e.egress_usd),
                "storage_per_month": money(e.storage_usd_per_month)},
        "shipping_break_even_ratio": e.shipping_break_even_ratio,
        "fleet_usd": {"prefill": money(e.fleet_prefill_usd), "reuse_hosted": money(e.fleet_reuse_usd),
                      "reuse_shipped": money(e.fleet_shipping_usd)},
        "tariff_usd": {k: money(v) for k, v in asdict(e.tariff).items()},
    }


MeasuredPoint = tuple[int, float, str]  # document tokens, measured speedup, label


def paper_points(e: Economics) -> list[MeasuredPoint]:
    """The paper's measured speedups, when `e` is about its model."""
    if e.shape.name != PAPER_MODEL:
        return []
    return [(n, p / r, "paper (Qwen3-4B, M1 Pro)") for n, (p, r) in PAPER_SECONDS.items()]


def plot(e: Economics, path: Path, measured: Sequence[MeasuredPoint] = ()) -> None:
    """Two panels: speedup vs document length (analytic FLOP ratio and roofline time ratio, measured points), and
    cost vs number of reads (re-prefill, hosted reuse, shipped reuse)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    top = max(8 * e.document_tokens, 8192, *(n for n, _, _ in measured))
    lengths = sorted({int(64 * 2 ** (i / 4)) for i in range(64) if 64 * 2 ** (i / 4) <= top})
    curves = [analyse(e.shape, n, e.question_tokens, 1, e.prices, e.dtype) for n in lengths]
    left.plot(lengths, [c.flop_ratio for c in curves], label="analytic: FLOP ratio")
    left.plot(lengths, [c.speedup for c in curves], "--", label="analytic: roofline time ratio")
    for label in dict.fromkeys(lbl for _, _, lbl in measured):
        pts = [(n, s) for n, s, lbl in measured if lbl == label]
        left.plot(*zip(*pts, strict=True), "o", label=label)
    left.set(xscale="log", yscale="log", xlabel="document tokens", ylabel="prefill / reuse",
             title=f"{e.shape.name}: savings vs length (q = {e.question_tokens})")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    reads = [10 ** (i / 8) for i in range(0, 8 * max(1, len(str(max(e.reads, 10)))) + 1)]
    for label, fn in (("re-prefill every read: N·P", lambda n: n * e.prefill_usd),
                      ("reuse hosted: P + N·R", lambda n: e.prefill_usd + n * e.reuse_usd),
                      ("reuse shipped: P + N·(R + egress)",
                       lambda n: e.prefill_usd + n * (e.reuse_usd + e.egress_usd))):
        right.plot(reads, [float(fn(Decimal(repr(n)))) for n in reads], label=label)
    if e.break_even_reads:
        right.axvline(e.break_even_reads, color="grey", lw=0.8, ls=":", label=f"N* = {e.break_even_reads:.2f}")
    times = "measured" if e.is_measured else "analytic"
    right.set(xscale="log", yscale="log", xlabel="reads N", ylabel="US$",
              title=f"{e.document_tokens:,} tokens, {times} times, ${e.prices.device_usd_per_hour}/h")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    fig.savefig(path)


def measured_points(bench: dict) -> list[MeasuredPoint]:
    """Points from a `bench/economics.py --json` result."""
    label = f"measured ({bench['model'].removeprefix('builtin:')}, {bench['machine'].split(',')[0]})"
    return [(row["tokens"], row["prefill_seconds"] / row["reuse_seconds"], label) for row in bench["rows"]]

