"""Claim: storing documents as chunk chains saves most of the bytes and of the prefill when documents share a
prefix: many documents after one long preamble, and successive versions of a document that change at the end.

Each scenario's documents are stored as chunk chains in one store (kvmart/reuse/chunks.py: chunks under chained keys,
shared between documents); prints the bytes stored and the tokens computed, against what storing each document's KV
on its own (whole artifacts, no sharing) would take.

    python bench/prefix_sharing.py [--model builtin:tiny] [--chunk-tokens 256]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.progress import track

from kvmart.config import load_settings
from kvmart.reuse import core
from kvmart.reuse.samples import SAMPLES, sample_text
from kvmart.runtime.model import Model
from kvmart.store.disk import DiskStore


def scenarios(model: Model) -> dict[str, list[list[int]]]:
    corpus = model.tokenize("".join(sample_text(name) for name in SAMPLES))
    system = corpus[:1024]  # a 1,024-token system prompt shared by every document
    documents = [system + corpus[2000 + 300 * i:2000 + 300 * i + 600] for i in range(10)]
    base = corpus[:2048]  # a 2,048-token document, then 5 versions, each rewriting its last 200 tokens
    versions = [base[:-200] + corpus[4000 + 200 * v:4000 + 200 * (v + 1)] for v in range(5)]
    return {"10 documents after a 1,024-token system prompt": documents,
            "5 versions of a 2,048-token document, last 200 tokens changed": versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    args = parser.parse_args()
    model = Model.load(load_settings().with_overrides(model=args.model))
    rows = [f"| scenario ({args.model}, chunks of {args.chunk_tokens}) | each document on its own | chunk chains | "
            "saved by sharing |", "|---|---|---|---|"]
    for name, docs in scenarios(model).items():
        with tempfile.TemporaryDirectory() as tmp:
            store = DiskStore(Path(tmp) / "store")
            whole_bytes = sum(len(ids) * model.kv_bytes_per_token for ids in docs)
            computed = 0
            for ids in track(docs, description=name[:30], transient=True):
                computed += core.precompute_ids(model, store, ids, chunk_tokens=args.chunk_tokens).computed_tokens
            stored = sum(e.artifact_bytes for e in store.entries())
        total = sum(len(ids) for ids in docs)
        rows.append(f"| {name} | {whole_bytes / 1e6:.2f} MB | {stored / 1e6:.2f} MB | "
                    f"{1 - stored / whole_bytes:.0%} fewer bytes; {computed:,} of {total:,} tokens computed |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
