"""Claim: verifying an uploaded artifact costs about one prefill when every chunk is recomputed, and proportionally
less with a sample (chunk 0 always), so a provider can trade verification work for detection probability.

Measured side by side in one run, on one document: the provider's own whole prefill, the publisher's chunked
prefill (what it uploads), and verify_upload at 100%, 25% and 10% of the chunks (median of --repeats).

    python bench/upload_verify.py [--model builtin:tiny] [--tokens 2048] [--chunk-tokens 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from rich.progress import track

from kvmart.config import load_settings
from kvmart.reuse.samples import SAMPLES, sample_text
from kvmart.reuse.upload import compute_upload, verify_upload
from kvmart.runtime.model import Model


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = Model.load(load_settings().with_overrides(model=args.model))
    ids = model.tokenize("".join(sample_text(name) for name in SAMPLES))[:args.tokens]
    data = compute_upload(model, ids, args.chunk_tokens)
    rng = random.Random(0)
    cases: dict[str, Callable[[], object]] = {
        "provider's whole prefill": lambda: model.prefill(ids),
        "publisher's chunked prefill + artifact": lambda: compute_upload(model, ids, args.chunk_tokens),
    }
    for percent in (100, 25, 10):
        cases[f"verify {percent}% of chunks"] = (
            lambda p=percent: verify_upload(model, data, ids, args.chunk_tokens, p, rng))
    seconds = {name: median_seconds(run, args.repeats) for name, run in track(cases.items(), transient=True)}
    base = seconds["provider's whole prefill"]
    print(f"| {args.model}, {len(ids):,} tokens, chunks of {args.chunk_tokens} | seconds | vs whole prefill |\n"
          "|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.3f} | {s / base:.2f}x |")


if __name__ == "__main__":
    main()
