"""Claim: reuse is 9-50x cheaper than prefill and the gap widens with length; the artifact is 2 x layers x kv_heads x
head_dim x dtype bytes per token. Measured here, beside the analytic model of kvmart/economics/model.py.

For each length, interleaved and timed the way bench/reuse_vs_prefill.py times them (its `measure`, reused):
  prefill : one pass over document + question from nothing;
  reuse   : the question on top of the KV, (a) compute only, the KV in memory (the paper's setup) and (b) plus loading
            the artifact from the disk store, warm (page cache) and cold (evicted).
Then: least squares of prefill seconds t = a*L + b*L^2 (+ a fixed overhead given 3+ lengths) and of reuse compute t = c + d*L; the measured ratio beside
the analytic FLOP ratio; the achieved FLOP/s; the artifact's size on disk beside the formula. Prints markdown for
docs/ECONOMICS.md and, with --json, a file `kvmart cost --measured FILE --plot out.png` draws.

    python bench/economics.py --model builtin:qwen3-0.6b-shape --lengths 256,512,1024 --threads 1 \
        --json docs/economics-measured-qwen3-0.6b-shape.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from reuse_vs_prefill import PAPER, corpus_ids, measure, timed

from kvmart.config import load_settings
from kvmart.economics.model import (
    Prices,
    artifact_bytes,
    lookup_shape,
    pass_seconds,
    prefill_flops,
    reuse_flops,
    shape_from_config,
)
from kvmart.reuse import core
from kvmart.runtime.model import Model
from kvmart.store import open_store


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"


def copy_bandwidth(num_bytes: int = 256 << 20) -> float:
    """Bytes/s of a large tensor copy (read + write), best of 3: the memory roof of this machine."""
    src = torch.empty(num_bytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = min(timed(lambda: dst.copy_(src))[0] for _ in range(3))
    return 2 * num_bytes / best


def least_squares(xs: list[float], ys: list[float], columns) -> list[float]:
    """Coefficients of y = sum(coef_i * column_i(x)) minimising the squared error."""
    a = np.array([[f(x) for f in columns] for x in xs], dtype=float)
    return [float(c) for c in np.linalg.lstsq(a, np.array(ys, dtype=float), rcond=None)[0]]


def run_length(model: Model, store, shape, ids: list[int], n: int, q: int, repeats: int) -> dict:
    doc, question = ids[:n], ids[n:n + q]
    pre = core.precompute_ids(model, store, doc, title="bench-economics")
    on_disk = sum(store.object_path(key).stat().st_size for key in core.chunk_keys_of(store, pre.entry.cache_id))
    m = measure(model, store, doc, question, repeats)  # finds the artifact stored above; deletes it at the end
    p_flops, r_flops = prefill_flops(shape, n + q), reuse_flops(shape, n, q)
    return {"tokens": n, "question_tokens": q, "prefill_seconds": m["prefill"], "reuse_seconds": m["warm_compute"],
            "warm_load_seconds": m["warm_load"], "cold_load_seconds": m["cold_load"],
            "cold_compute_seconds": m["cold_compute"], "prefill_flops": p_flops.total,
            "prefill_attention_flops": p_flops.attention, "reuse_flops": r_flops.total,
            "artifact_bytes": on_disk, "kv_bytes": artifact_bytes(shape, n, model.dtype_name)}


def report(rows: list[dict], name: str) -> dict:
    lengths = [r["tokens"] + r["question_tokens"] for r in rows]
    columns = [lambda x: x, lambda x: x * x] + ([lambda x: 1.0] if len(rows) >= 3 else [])  # fixed overhead: 3+ points
    a, b, *overhead = least_squares(lengths, [r["prefill_seconds"] for r in rows], columns)
    c0 = overhead[0] if overhead else 0.0
    c, d = least_squares([r["tokens"] for r in rows], [r["reuse_seconds"] for r in rows], [lambda x: 1.0, lambda x: x])
    print(f"\n{name}: prefill t = {c0:.3e} + {a:.3e}*L + {b:.3e}*L^2 s; reuse (compute, KV in memory) t = {c:.3e} + {d:.3e}*L s")
    print("| document tokens | prefill s | reuse s (KV in memory) | measured ratio | analytic FLOP ratio | "
          "+ warm load s | ratio incl. warm load | + cold load s | achieved GFLOP/s | L² share fitted / analytic | "
          "artifact bytes (formula + header) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r, total in zip(rows, lengths, strict=False):
        fitted = b * total * total / (a * total + b * total * total)
        analytic = r["prefill_attention_flops"] / r["prefill_flops"]
        warm = r["reuse_seconds"] + r["warm_load_seconds"]
        print(f"| {r['tokens']:,} | {r['prefill_seconds']:.3f} | {r['reuse_seconds']:.4f} | "
              f"{r['prefill_seconds'] / r['reuse_seconds']:.1f}x | {r['prefill_flops'] / r['reuse_flops']:.1f}x | "
              f"{r['warm_load_seconds']:.4f} | {r['prefill_seconds'] / warm:.1f}x | {r['cold_load_seconds']:.4f} | "
              f"{r['prefill_flops'] / r['prefill_seconds'] / 1e9:.1f} | {fitted:.1%} / {analytic:.1%} | "
              f"{r['artifact_bytes']:,} ({r['kv_bytes']:,} + {r['artifact_bytes'] - r['kv_bytes']:,}) |", flush=True)
    return {"prefill_fit": {"overhead_seconds": c0, "a_seconds_per_token": a, "b_seconds_per_token2": b},
            "reuse_fit": {"c_seconds": c, "d_seconds_per_token": d}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:qwen3-0.6b-shape")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", default="kvmart")
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (1 resists a CPU shared with other work; "
                                                    "default: torch's own choice)")
    parser.add_argument("--json", type=Path, help="Write the measurements here (for `kvmart cost --measured`).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = load_settings().with_overrides(model=args.model, dtype=args.dtype, attention=args.attention)
    model = Model.load(settings)
    shape = lookup_shape(args.model) or shape_from_config(model.hf_model.config.to_dict(), args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    ids = corpus_ids(model, max(lengths) + args.question_tokens)
    load_before, bandwidth = os.getloadavg()[0], copy_bandwidth()
    print(f"model {args.model} ({args.dtype}, attention {args.attention}) on {machine()}; question "
          f"{args.question_tokens} tokens; median of {args.repeats}; load average {load_before:.2f}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory(dir=settings.data_dir) as tmp:
        store = open_store(tmp)
        rows = [run_length(model, store, shape, ids, n, args.question_tokens, args.repeats) for n in lengths]
    fits = report(rows, args.model)
    flops = max(r["prefill_flops"] / r["prefill_seconds"] for r in rows)
    print(f"load average after: {os.getloadavg()[0]:.2f} (above ~0.5 before or after: the CPU was shared; re-run idle)")
    roof = Prices(achieved_flops_per_second=flops, memory_bytes_per_second=bandwidth)
    question = reuse_flops(shape, 0, args.question_tokens)
    overhead = max(0.0, fits["reuse_fit"]["c_seconds"] - pass_seconds(shape, question, 0, args.dtype, roof))
    print(f"analytic curves for this machine: kvmart cost --model {args.model} --dtype {args.dtype} "
          f"--flops {flops:.3g} --bandwidth {bandwidth / 1e9:.1f} --overhead {overhead:.3g}")
    print("paper (Qwen3-4B fp16, M1 Pro, KV in memory): " + ", ".join(
        f"{n} tokens {p:.2f}s vs {r:.3f}s = {p / r:.1f}x" for n, (p, r) in PAPER.items()))
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "dtype": args.dtype, "attention": args.attention, "machine": machine(),
            "torch": torch.__version__, "load_average": [load_before, os.getloadavg()[0]],
            "copy_bytes_per_second": bandwidth, "achieved_flops_per_second": flops,
            "pass_overhead_seconds": overhead, **fits, "rows": rows,
        }, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
