"""Claim: decoding many sequences in one forward pass (continuous batching, kvmart/runtime/rows.py) multiplies
decode throughput, at no cost in exactness, and costs a sequence decoded alone little.

Measured side by side in one run, interleaved: B sequences, each after a cached context of --context tokens (random
KV in 256-token chunks: the arithmetic does not depend on the values; --documents contexts shared among them, as
requests about a hot document share its chunks) and a 20-token question, take decode steps
  batched : `Model.step` over all B at once (all rows through each linear layer at once on the packed route, in
            fixed tiles on the sgemm route; attention per sequence, shared chunks read once for all);
  one-row : each sequence in its own forward pass over its own cache, its row multiplied alone, exactly as the
            server decoded before batching (Model._forward, the prompt kernel's attention, untiled linears).
Prints, per B, CPU ms per generated token (median [min-max] over --repeats steps; one torch thread recommended)
and the ratio. Also checks on the way that batched and alone decoding give the same tokens.

    python bench/decode_batch.py --model builtin:smollm2-135m --batch 1,4,16 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvmart.config import load_settings
from kvmart.runtime import decode_attention, rows
from kvmart.runtime.kv import KV
from kvmart.runtime.model import Decoder, Model


def random_prefix(model: Model, num_tokens: int, seed: int) -> tuple[KV, ...]:
    g = torch.Generator().manual_seed(seed)

    def layer(n: int) -> torch.Tensor:
        return torch.randn(1, model.kv_heads, n, model.head_dim, generator=g).to(model.dtype)

    sizes = [min(256, num_tokens - start) for start in range(0, num_tokens, 256)]
    return tuple(KV(tuple(layer(n) for _ in range(model.num_layers)), tuple(layer(n) for _ in range(model.num_layers)))
                 for n in sizes)


def cpu_ms_per_token(model: Model, decoders: list[Decoder], batched: bool) -> float:
    start = time.process_time()
    if batched:
        model.step(decoders)
    else:  # the decode step before batching: Model._forward on the sequence's own cache, rows multiplied untiled
        for d in decoders:
            if not d.done:
                d.advance(model._forward(d.cache, [d.token], logits_to_keep=1)[-1])
    return (time.process_time() - start) * 1e3 / len(decoders)


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=3584, help="cached tokens before each sequence's question")
    parser.add_argument("--batch", default="1,4,16", help="sequences decoded together (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="decode steps timed per setting")
    parser.add_argument("--documents", type=int, default=1, help="distinct cached contexts the sequences share "
                                                                  "(1: every sequence asks about one hot document)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--route", choices=("packed", "sgemm"), default="packed",
                        help="how the linear layers multiply (kvmart/runtime/rows.py): packed (oneDNN, a decode step's "
                             "rows at once; kvmart's default in float32 where its check passes) or sgemm (decode steps "
                             "in fixed tiles)")
    parser.add_argument("--tile", type=int, help="rows per BLAS call on the sgemm route (default: kvmart's, "
                                                 "kvmart/runtime/rows.py ROW_TILES)")
    parser.add_argument("--attention-tile", type=int, help="query rows per product in a batched step's attention "
                                                           "(default: kvmart/runtime/decode_attention.py ROW_TILE)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Model.load(load_settings().with_overrides(model=args.model, dtype=args.dtype))
    if args.route == "sgemm":
        model.use_sgemm()
    if args.tile:
        rows.ROW_TILES[model.dtype] = args.tile
    if args.attention_tile:
        decode_attention.ROW_TILE = args.attention_tile
    sizes = [int(b) for b in args.batch.split(",")]
    prefixes = [random_prefix(model, args.context, seed) for seed in range(args.documents)]  # shared, as a hot
    question = list(range(100, 120))                                                       # document's chunks are
    print(f"model {args.model} ({args.dtype}), torch threads {torch.get_num_threads()}, {args.context:,} cached "
          f"tokens per sequence in {args.documents} shared context(s), linear route {model.linear_route} (tile {rows.ROW_TILES[model.dtype]}), CPU "
          f"ms per generated token, median [min-max] of {args.repeats} steps")
    print("| sequences | batched | one row per pass | ratio |")
    print("|---:|---:|---:|---:|")
    for b in sizes:
        steps = args.repeats + 2
        decoders = {mode: [model.begin(prefixes[i % len(prefixes)], question, steps + 1, stop_at_eos=False)
                           for i in range(b)] for mode in ("batched", "one-row")}
        times: dict[str, list[float]] = {"batched": [], "one-row": []}
        for i in range(steps):
            for mode in times:
                t = cpu_ms_per_token(model, decoders[mode], mode == "batched")
                if i >= 2:  # warm-up: workspace, first touch
                    times[mode].append(t)
        ratio = statistics.median(times["one-row"]) / statistics.median(times["batched"])
        print(f"| {b} | {spread(times['batched'])} | {spread(times['one-row'])} | {ratio:.2f}x |", flush=True)
        alone = model.generate(prefixes[0], question, steps + 1, stop_at_eos=False).token_ids
        assert decoders["batched"][0].token_ids == alone, "batched decoding diverged from decoding alone"


if __name__ == "__main__":
    main()
