"""Claim: the default check of an uploaded artifact (chunk 0 plus the fewest chunks that meet the stated bound,
kvmart/reuse/upload.py) costs less than recomputing every chunk once a document has enough chunks for a sample to
meet the bound, and what it costs against the provider's own prefill of the document.

Measured side by side in one run, per document length and chunk size: the provider's whole prefill, verify_upload
of every chunk (percent 100), and verify_upload by the bound (the default); wall and CPU seconds, min/median/max of
--repeats, and the ratio of medians to the whole prefill. Also printed: how many chunks the bound checks, and the
escape probability of a forgery of 10% of the chunks and of one chunk.

    python bench/upload_verify.py [--model builtin:tiny] [--tokens 1024 4000] [--chunk-tokens 256 64] [--repeats 5]
                                  [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.progress import track

from kvmart.config import load_settings
from kvmart.reuse.samples import SAMPLES, sample_text
from kvmart.reuse.upload import chunk_spans, compute_upload, plan, verify_upload
from kvmart.runtime.model import Model


def timed(run: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of each repeat."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4000])
    parser.add_argument("--chunk-tokens", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Model.load(load_settings().with_overrides(model=args.model))
    text = "".join(sample_text(name) for name in SAMPLES)
    rng = random.Random(0)
    print(f"| {args.model} | chunks (checked by the bound) | escape: 10% forged / 1 chunk | whole prefill s | "
          "verify all s | verify by bound s | all / prefill | bound / prefill | bound CPU / prefill CPU |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for num_tokens in args.tokens:
        ids = model.tokenize(text)[:num_tokens]
        for chunk in args.chunk_tokens:
            data = compute_upload(model, ids, chunk)
            checked = plan(len(chunk_spans(len(ids), chunk)), None)
            cases = {"prefill": lambda i=ids: model.prefill(i),
                     "all": lambda c=chunk, d=data, i=ids: verify_upload(model, d, i, c, 100, rng),
                     "bound": lambda c=chunk, d=data, i=ids: verify_upload(model, d, i, c, None, rng)}
            measured = {name: timed(run, args.repeats) for name, run in track(
                cases.items(), description=f"{len(ids):,} tokens, chunks of {chunk}", transient=True,
                console=Console(stderr=True))}
            wall = {name: statistics.median(m[0]) for name, m in measured.items()}
            cpu = {name: statistics.median(m[1]) for name, m in measured.items()}
            print(f"| {len(ids):,} tokens, chunks of {chunk} | {checked.num_chunks} ({checked.checked_chunks}) | "
                  f"{checked.forgery_escape:.2g} / {checked.single_chunk_escape:.2g} | "
                  f"{spread(measured['prefill'][0])} | {spread(measured['all'][0])} | {spread(measured['bound'][0])} | "
                  f"{wall['all'] / wall['prefill']:.2f}x | {wall['bound'] / wall['prefill']:.2f}x | "
                  f"{cpu['bound'] / cpu['prefill']:.2f}x |")


if __name__ == "__main__":
    main()
