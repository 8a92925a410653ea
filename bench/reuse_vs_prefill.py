"""Claim: reusing a stored KV artifact is far cheaper than prefilling the document again, and the gap widens with
length (the paper: 8.6x at 255 tokens, 49.7x at 3,774 on Qwen3-4B fp16, Apple M1 Pro).

Measured side by side in one run, interleaved repeat by repeat, both sides configured as a server runs them (logits
computed only for the last position):
  prefill : one forward pass over document + question, from nothing;
  reuse   : load the artifact from the disk store (read + verify checksums) + one forward pass over the question.
"hot" has the KV already in RAM (the server's hot tier; what the paper measured, disk I/O left out); "warm" has the
artifact in the OS page cache; "cold" evicts it first (every reference to the previous load released, fsync,
posix_fadvise DONTNEED: the kernel keeps pages a live mapping holds) and reports the fraction of its pages still
resident (mincore), so a cold read that was not cold shows.

Every figure is printed as median [min-max] over the repeats, wall clock and CPU time (this process's) side by side:
on a shared machine wall time moves with the neighbours, CPU time much less. Ratios are taken per repeat (each
prefill against the reuse measured right after it), then summarised the same way. `--kernels current,previous`
also times the hot reuse with the previous attention kernel (kvmart/runtime/attention.py `reference_attention`, the
same bits, slower), interleaved. `--synthetic 1024,...,16384` times only the hot reuse over random KV of those
lengths (no prefill: at 16k it would take many minutes), with the CPU cost of each 1k tokens added since the row
before: flat if the cost per cached token does not grow with the context.

    python bench/reuse_vs_prefill.py --model builtin:qwen3-0.6b-shape --lengths 256,1024,2048,3774 --threads 1
    python bench/reuse_vs_prefill.py --lengths 3774 --repeats 5 --threads 1 --kernels current,previous
    python bench/reuse_vs_prefill.py --synthetic 1024,2048,4096,8192,16384 --threads 1 --kernels current,previous
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvmart.config import load_settings
from kvmart.economics.model import PAPER_SECONDS as PAPER  # prefill, reuse s (Qwen3-4B fp16, M1 Pro, KV in memory)
from kvmart.reuse import core
from kvmart.reuse.samples import SAMPLES, sample_text
from kvmart.runtime import attention
from kvmart.runtime.kv import KV
from kvmart.runtime.model import Model
from kvmart.runtime.shapes import prefill_flops, reuse_flops, shape_from_config
from kvmart.store import open_store

Timing = tuple[float, float]  # wall seconds, CPU seconds


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


def timed(fn: Callable[[], object]) -> tuple[Timing, object]:
    """(wall, CPU) seconds of one call, and its result. CPU time is the whole process's (torch's threads too)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), result


@contextmanager
def kernel(name: str) -> Iterator[None]:
    """Run kvmart's attention with the `current` kernel or the `previous` one (the same bits, slower)."""
    if name == "current":
        yield
        return
    if name != "previous":
        raise SystemExit(f"unknown kernel {name!r}: current or previous")
    current = attention.grouped_attention
    attention.grouped_attention = lambda q, segments, k, v, scale, workspace=None, views=None: (
        attention.reference_attention(q, segments, k, v, scale))
    try:
        yield
    finally:
        attention.grouped_attention = current


def measure(model: Model, store, doc: list[int], question: list[int], repeats: int, kernels: list[str]
            ) -> dict[str, list[Timing]]:
    cid = core.precompute_ids(model, store, doc, title="bench").entry.cache_id
    paths = [store.object_path(key) for key in core.chunk_keys_of(store, cid)]  # the document's chunks
    rows: dict[str, list[Timing]] = {name: [] for name in ("prefill", "warm_load", "warm_compute", "cold_load",
                                                           "cold_compute", *(f"hot_{k}" for k in kernels))}
    resident: list[float] = []
    for _ in range(repeats):
        rows["prefill"].append(timed(lambda: model.continue_from(None, doc + question))[0])
        for mode in ("warm", "cold"):
            if mode == "cold":
                resident.append(statistics.mean(evict(path) for path in paths))
            else:
                for path in paths:
                    path.read_bytes()  # make sure it is in the page cache
            load, loaded = timed(lambda: core.load(model, store, cid))
            compute, step = timed(lambda kv=loaded.prefix: model.continue_from(kv, question))
            rows[f"{mode}_load"].append(load)
            rows[f"{mode}_compute"].append(compute)
            if mode == "warm":
                for name in kernels:
                    with kernel(name):
                        rows[f"hot_{name}"].append(timed(lambda kv=loaded.prefix: model.continue_from(kv, question))[0])
            del loaded, step  # the step's cache maps the artifact: while it lives, its pages cannot be evicted
    store.delete(cid)
    rows["warm"] = [add(a, b) for a, b in zip(rows["warm_load"], rows["warm_compute"], strict=True)]
    rows["cold"] = [add(a, b) for a, b in zip(rows["cold_load"], rows["cold_compute"], strict=True)]
    rows["cold_resident"] = [(r, r) for r in resident]
    return rows


def add(a: Timing, b: Timing) -> Timing:
    return a[0] + b[0], a[1] + b[1]


def spread(values: list[float], digits: int = 3, unit: str = "") -> str:
    """median [min-max]"""
    return (f"{statistics.median(values):.{digits}f}{unit} [{min(values):.{digits}f}-"
            f"{max(values):.{digits}f}{unit}]")


def seconds(timings: list[Timing], digits: int = 3) -> str:
    """wall median [min-max], CPU median"""
    return f"{spread([w for w, _ in timings], digits)} ({statistics.median(c for _, c in timings):.{digits}f})"


def ratios(prefill: list[Timing], reuse: list[Timing]) -> str:
    """Per-repeat prefill/reuse, wall median [min-max], CPU median."""
    wall = [p[0] / r[0] for p, r in zip(prefill, reuse, strict=True)]
    cpu = [p[1] / r[1] for p, r in zip(prefill, reuse, strict=True)]
    return f"{spread(wall, 1, 'x')} ({statistics.median(cpu):.1f}x)"


def report_lengths(model: Model, store, ids: list[int], args, kernels: list[str]) -> None:
    shape = shape_from_config(model.hf_model.config.to_dict(), model.spec)
    print(f"model {args.model} ({args.dtype}, attention {args.attention}, linear route {model.linear_route}), torch "
          f"threads {torch.get_num_threads()}, question {args.question_tokens} tokens, {args.repeats} repeats; seconds and ratios: wall median "
          f"[min-max] (CPU median)")
    hot = " | ".join(f"reuse hot s ({k}) | ratio hot ({k})" for k in kernels)
    print(f"| document tokens | KV MB | prefill s | {hot} | reuse warm s | ratio warm | reuse cold s | ratio cold "
          "| resident before cold load |")
    print("|---:|---:|---:|" + "---:|---:|" * len(kernels) + "---:|---:|---:|---:|---:|")
    flops = []
    for n in [int(x) for x in args.lengths.split(",")]:
        m = measure(model, store, ids[:n], ids[n:n + args.question_tokens], args.repeats, kernels)
        hot = " | ".join(f"{seconds(m[f'hot_{k}'])} | {ratios(m['prefill'], m[f'hot_{k}'])}" for k in kernels)
        print(f"| {n:,} | {n * model.kv_bytes_per_token / 1e6:.0f} | {seconds(m['prefill'], 2)} | {hot} | "
              f"{seconds(m['warm'])} | {ratios(m['prefill'], m['warm'])} | {seconds(m['cold'])} | "
              f"{ratios(m['prefill'], m['cold'])} | {statistics.median(r for r, _ in m['cold_resident']):.0%} |",
              flush=True)
        p, r = prefill_flops(shape, n + args.question_tokens), reuse_flops(shape, n, args.question_tokens)
        cpu_p = statistics.median(c for _, c in m["prefill"])
        cpu_r = statistics.median(c for _, c in m[f"hot_{kernels[0]}"])
        flops.append(f"{n:,} tokens: FLOP ratio {p.total / r.total:.1f}x; prefill {p.total / cpu_p / 1e9:.0f} "
                     f"GFLOP/s, hot reuse ({kernels[0]}) {r.total / cpu_r / 1e9:.0f} GFLOP/s of CPU time")
    print("\n".join(flops))
    print("paper (Qwen3-4B fp16, M1 Pro, KV in memory): " + ", ".join(
        f"{n} tokens {p:.2f}s vs {r:.3f}s = {p / r:.1f}x" for n, (p, r) in PAPER.items()))


def random_prefix(model: Model, num_tokens: int, chunk_tokens: int, seed: int = 0) -> tuple[KV, ...]:
    """Random KV of `num_tokens` in chunks, as a chunk chain is stored (the last one shorter if need be; the arithmetic
    timed does not depend on the values). Every chunk has tensors of its own, so the cache is read from memory, as
    a real one is."""
    g = torch.Generator().manual_seed(seed)

    def layer(n: int) -> torch.Tensor:
        return torch.randn(1, model.kv_heads, n, model.head_dim, generator=g).to(model.dtype)

    sizes = [min(chunk_tokens, num_tokens - start) for start in range(0, num_tokens, chunk_tokens)]
    return tuple(KV(tuple(layer(n) for _ in range(model.num_layers)), tuple(layer(n) for _ in range(model.num_layers)))
                 for n in sizes)


def report_synthetic(model: Model, args, kernels: list[str]) -> None:
    question = list(range(100, 100 + args.question_tokens))
    print(f"model {args.model} ({args.dtype}), torch threads {torch.get_num_threads()}, hot reuse of a "
          f"{args.question_tokens}-token question over random KV in {args.chunk_tokens}-token chunks, "
          f"{args.repeats} repeats, kernels interleaved; wall median [min-max] (CPU median)")
    print("| cached tokens | " + " | ".join(f"reuse s ({k}) | CPU ms per 1k tokens added ({k})" for k in kernels)
          + " |")
    print("|---:|" + "---:|---:|" * len(kernels))
    previous: dict[str, tuple[int, float]] = {}
    for n in [int(x) for x in args.synthetic.split(",")]:
        prefix = random_prefix(model, n, args.chunk_tokens)
        rows: dict[str, list[Timing]] = {k: [] for k in kernels}
        for name in kernels:  # warm-up: workspace, first touch
            with kernel(name):
                model.continue_from(prefix, question)
        for _ in range(args.repeats):
            for name in kernels:
                with kernel(name):
                    rows[name].append(timed(lambda kv=prefix: model.continue_from(kv, question))[0])
        cpu = {k: statistics.median(c for _, c in rows[k]) for k in kernels}
        cells = " | ".join(f"{seconds(rows[k])} | {marginal(previous.get(k), n, cpu[k])}" for k in kernels)
        previous = {k: (n, cpu[k]) for k in kernels}
        print(f"| {n:,} | {cells} |", flush=True)
        del prefix  # before the next, larger one is made


def marginal(before: tuple[int, float] | None, num_tokens: int, cpu_seconds: float) -> str:
    """CPU ms per 1k cached tokens added since the row before: flat when the cost per token does not grow."""
    if before is None:
        return "-"
    return f"{(cpu_seconds - before[1]) / (num_tokens - before[0]) * 1e6:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:qwen3-0.6b-shape")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", default="kvmart")
    parser.add_argument("--lengths", default="256,1024,2048,3774")
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--kernels", default="current",
                        help="attention kernels to time the hot reuse with: current, previous (comma-separated)")
    parser.add_argument("--synthetic", help="cached lengths to time hot reuse over random KV (no prefill)")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="chunk size of the random KV (--synthetic)")
    parser.add_argument("--route", choices=("model", "sgemm"), default="model",
                        help="the linear layers' route (kvmart/runtime/rows.py): the model's own (oneDNN's packed "
                             "product in float32 where its check passes) or sgemm, the route before it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = args.kernels.split(",")
    settings = load_settings().with_overrides(model=args.model, dtype=args.dtype, attention=args.attention)
    model = Model.load(settings)
    if args.route == "sgemm":
        model.use_sgemm()
    if args.synthetic:
        report_synthetic(model, args, kernels)
        return
    ids = corpus_ids(model, max(int(x) for x in args.lengths.split(",")) + args.question_tokens)
    with tempfile.TemporaryDirectory(dir=settings.data_dir) as tmp:
        report_lengths(model, open_store(tmp), ids, args, kernels)


if __name__ == "__main__":
    main()
