"""Claim: reusing a stored KV artifact is far cheaper than prefilling the document again, and the gap widens with
length (the paper: 8.6x at 255 tokens, 49.7x at 3,774 on Qwen3-4B fp16, Apple M1 Pro).

Measured side by side in one run, interleaved, both sides configured as a server runs them (logits computed only
for the last position):
  prefill : one forward pass over document + question, from nothing;
  reuse   : load the artifact from the disk store (read + verify checksums) + one forward pass over the question.
"hot" has the KV already in RAM (the server's hot tier; what the paper measured, disk I/O left out); "warm" has the
artifact in the OS page cache; "cold" evicts it first (every reference to the previous load released, fsync,
posix_fadvise DONTNEED: the kernel keeps pages a live mapping holds) and reports the fraction of its pages still
resident (mincore), so a cold read that was not cold shows. Prints a markdown table for docs/BENCHMARKS.md.

    python bench/reuse_vs_prefill.py --model builtin:qwen3-0.6b-shape --lengths 256,1024,2048,3774
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import mmap
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvmart.config import load_settings
from kvmart.economics.model import PAPER_SECONDS as PAPER  # prefill, reuse s (Qwen3-4B fp16, M1 Pro, KV in memory)
from kvmart.reuse import core
from kvmart.reuse.samples import SAMPLES, sample_text
from kvmart.runtime.model import Model
from kvmart.store import open_store


def corpus_ids(model: Model, needed: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < needed:
        ids += model.tokenize("".join(sample_text(name) for name in SAMPLES))
    return ids


def evict(path: Path) -> float:
    """Drop the file from the page cache; returns the fraction still resident (pages mapped by a live tensor cannot
    be dropped, so every reference to a previous load must be gone first)."""
    gc.collect()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


def resident_fraction(path: Path) -> float:
    """Fraction of the file's pages in the page cache (mincore(2) over a fresh mapping)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    vec = ctypes.create_string_buffer(pages)
    try:
        if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
    finally:
        libc.munmap(ctypes.c_void_p(addr), size)
    return sum(b & 1 for b in vec.raw) / pages


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(model: Model, store, doc: list[int], question: list[int], repeats: int) -> dict[str, float]:
    cid = core.precompute_ids(model, store, doc, title="bench").entry.cache_id
    paths = [store.object_path(key) for key in core.chunk_keys_of(store, cid)]  # the document's chunks
    rows: dict[str, list[float]] = {"prefill": [], "hot": [], "warm_load": [], "warm_compute": [], "cold_load": [],
                                    "cold_compute": [], "cold_resident": []}
    for _ in range(repeats):
        rows["prefill"].append(timed(lambda: model.continue_from(None, doc + question))[0])
        for mode in ("warm", "cold"):
            if mode == "cold":
                rows["cold_resident"].append(statistics.mean(evict(path) for path in paths))
            else:
                for path in paths:
                    path.read_bytes()  # make sure it is in the page cache
            load_s, loaded = timed(lambda: core.load(model, store, cid))
            compute_s, step = timed(lambda kv=loaded.prefix: model.continue_from(kv, question))
            rows[f"{mode}_load"].append(load_s)
            rows[f"{mode}_compute"].append(compute_s)
            if mode == "warm":
                rows["hot"].append(timed(lambda kv=loaded.prefix: model.continue_from(kv, question))[0])
            del loaded, step  # the step's cache maps the artifact: while it lives, its pages cannot be evicted
    store.delete(cid)
    return {k: statistics.median(v) for k, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:qwen3-0.6b-shape")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", default="kvmart")
    parser.add_argument("--lengths", default="256,1024,2048,3774")
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = load_settings().with_overrides(model=args.model, dtype=args.dtype, attention=args.attention)
    model = Model.load(settings)
    lengths = [int(x) for x in args.lengths.split(",")]
    ids = corpus_ids(model, max(lengths) + args.question_tokens)
    print(f"model {args.model} ({args.dtype}, attention {args.attention}), torch threads {torch.get_num_threads()}, "
          f"question {args.question_tokens} tokens, median of {args.repeats}")
    print("| document tokens | KV MB | prefill s | reuse hot s | ratio hot | reuse warm s (load + compute) | ratio warm "
          "| reuse cold s (load + compute) | ratio cold | resident before cold load |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=settings.data_dir) as tmp:
        store = open_store(tmp)
        for n in lengths:
            m = measure(model, store, ids[:n], ids[n:n + args.question_tokens], args.repeats)
            warm, cold = m["warm_load"] + m["warm_compute"], m["cold_load"] + m["cold_compute"]
            print(f"| {n:,} | {n * model.kv_bytes_per_token / 1e6:.0f} | {m['prefill']:.2f} | {m['hot']:.3f} | "
                  f"{m['prefill'] / m['hot']:.1f}x | {warm:.3f} "
                  f"({m['warm_load']:.3f} + {m['warm_compute']:.3f}) | {m['prefill'] / warm:.1f}x | {cold:.3f} "
                  f"({m['cold_load']:.3f} + {m['cold_compute']:.3f}) | {m['prefill'] / cold:.1f}x | "
                  f"{m['cold_resident']:.0%} |", flush=True)
    print("paper (Qwen3-4B fp16, M1 Pro, KV in memory): " + ", ".join(
        f"{n} tokens {p:.2f}s vs {r:.3f}s = {p / r:.1f}x" for n, (p, r) in PAPER.items()))


if __name__ == "__main__":
    main()
