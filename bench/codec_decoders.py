"""Claim: format 3's decoder design (eight interleaved streams, 16-bit table entries (value << 6) + length, the
raw bits merged two rows later in a vector pass, GCC's SLP vectorizer kept off the row loop) is the fastest of the
designs tried, on real KV, side by side in one run (docs/BENCHMARKS.md, *Why format 3 looks as it does*).

Builds bench/codec_decoders.c with the machine's C compiler (twice: as kvmart builds it, and with GCC's SLP
vectorizer on) and decodes bfloat16 KV prefilled by SmolLM2-135M-Instruct with each design: kvmart's analysis
picks the split, the channel clusters and the codes; every design decodes the same symbols (checked bit for bit
against the tensor). MB/s of decoded tensor per CPU second, one thread, min / median / max of --repeats rounds, the
designs interleaved within each round. x86-64 with BMI2 and AVX2 only.

    python bench/codec_decoders.py --tokens 3774 --repeats 9
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kvmart.codec import analysis
from kvmart.codec.elements import as_uint, grid

HERE = Path(__file__).parent
DESIGNS = {  # name -> (function, streams, table kind, library)
    "**format 3**: 8 streams, 16-bit entries (value << 6, length below), merge 2 rows later": ("streams8", 8, 0, "kvmart"),
    "4 streams (format 2's count)": ("streams4", 4, 0, "kvmart"),
    "16 streams": ("streams16", 16, 0, "kvmart"),
    "8 streams, 16-bit entries (value << 4, length below: a mask before each shift)": ("streams8_masked", 8, 1, "kvmart"),
    "8 streams, 32-bit entries (tables twice the size)": ("streams8_u32", 8, 2, "kvmart"),
    "8 streams, raw bits merged in the loop (PDEP, 64-bit words)": ("streams8_inline", 8, 0, "kvmart"),
    "8 streams, built with GCC's SLP vectorizer on": ("streams8", 8, 0, "slp"),
}
P = ctypes.c_void_p


def build(folder: Path) -> dict[str, ctypes.CDLL]:
    libraries = {}
    for name, flags in (("kvmart", ["-fno-tree-slp-vectorize"]), ("slp", [])):
        out = folder / f"decoders_{name}.so"
        subprocess.run(["cc", "-O3", "-shared", "-fPIC", *flags, "-o", str(out), str(HERE / "codec_decoders.c")],
                       check=True)
        libraries[name] = ctypes.CDLL(str(out))
    return libraries


def kv(tokens: int) -> list[torch.Tensor]:
    sys.path.insert(0, str(HERE))
    from codec import corpus_ids

    from kvmart.config import load_settings
    from kvmart.runtime.model import Model

    model = Model.load(load_settings().with_overrides(model="builtin:smollm2-135m", dtype="bfloat16"))
    cache = model.prefill(corpus_ids(model, tokens, "mpl-2.0"))
    return [t.contiguous() for t in cache.keys + cache.values]


def prepare(lib: ctypes.CDLL, tensors: list[torch.Tensor], streams: int, kind: int) -> list[tuple]:
    cases = []
    for t in tensors:
        plan = analysis.plan(t, 10)  # format 3's split: 10-bit symbols, 6 raw bits for bfloat16
        assert plan.shift == 6 and plan.zero_bits == 0
        L, T, D = grid(tuple(t.shape))
        n, nsym, groups = L * T * D, len(plan.highs), len(plan.lengths)
        cap = (n // streams + 8) * 11 // 8 + 64
        data, raw = np.zeros(streams * cap, np.uint8), np.zeros(n * 6 // 8 + 64, np.uint8)
        lengths = np.ascontiguousarray(plan.lengths)
        lib.encode(P(as_uint(t).ctypes.data), ctypes.c_size_t(L), ctypes.c_size_t(T), ctypes.c_size_t(D),
                   P(plan.models.ctypes.data), P(lengths.ctypes.data), nsym, groups, P(plan.lut.ctypes.data),
                   streams, P(data.ctypes.data), ctypes.c_size_t(cap), P(raw.ctypes.data))
        tables = np.zeros(groups << 11, np.uint32 if kind == 2 else np.uint16)
        lib.build_tables(P(lengths.ctypes.data), P(plan.highs.ctypes.data), nsym, groups, kind, P(tables.ctypes.data))
        cases.append((data, cap, L, T, D, tables, plan.models, raw, np.empty(n, np.uint16), as_uint(t)))
    return cases


def run(fn, cases: list[tuple]) -> float:
    start = time.process_time()
    for data, cap, L, T, D, tables, models, raw, out, _ in cases:
        fn(P(data.ctypes.data), ctypes.c_size_t(cap), ctypes.c_size_t(L), ctypes.c_size_t(T), ctypes.c_size_t(D),
           P(tables.ctypes.data), P(models.ctypes.data), P(raw.ctypes.data), P(out.ctypes.data))
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3774)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    tensors = kv(args.tokens)
    megabytes = sum(t.numel() * t.element_size() for t in tensors) / 1e6
    with tempfile.TemporaryDirectory() as folder:
        libraries = build(Path(folder))
        designs = {}
        for name, (function, streams, kind, library) in DESIGNS.items():
            lib = libraries[library]
            cases = prepare(lib, tensors, streams, kind)
            run(getattr(lib, function), cases)
            assert all(np.array_equal(out, u) for *_, out, u in cases), f"{name} decoded other numbers"
            designs[name] = (getattr(lib, function), cases, [])
        for _ in range(args.repeats):
            for fn, cases, speeds in designs.values():
                speeds.append(megabytes / run(fn, cases))
    print(f"{len(tensors)} tensors, {megabytes:.1f} MB of bfloat16 KV; decode MB/s per CPU second, min / median / max "
          f"of {args.repeats} rounds")
    print("| design | decode MB/s | vs format 3 (medians) |\n|---|---:|---:|")
    base = statistics.median(next(iter(designs.values()))[2])
    for name, (_, _, speeds) in designs.items():
        median = statistics.median(speeds)
        print(f"| {name} | {min(speeds):.0f} / {median:.0f} / {max(speeds):.0f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
