"""Claim: storing KV as prefix-shared chunks saves most of the bytes when documents share a prefix: many documents
after one long system prompt, and successive versions of a document that change at the end.

Both scenarios are stored twice side by side in one run: as whole-document artifacts (one per document) and as
256-token chunks under chained keys (kvmart/reuse/chunks.py); prints bytes stored each way and the saving.

    python bench/prefix_sharing.py [--model builtin:tiny] [--chunk-tokens 256]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.progress import track

from kvmart.config import load_settings
from kvmart.reuse import core
from kvmart.reuse.chunks import ChunkStore
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
    print(f"| scenario ({args.model}, chunks of {args.chunk_tokens}) | whole artifacts | chunks | saved by sharing |"
          "\n|---|---|---|---|")
    for name, docs in scenarios(model).items():
        with tempfile.TemporaryDirectory() as tmp:
            whole, chunks = DiskStore(Path(tmp) / "whole"), ChunkStore(DiskStore(Path(tmp) / "chunks"), model,
                                                                       args.chunk_tokens)
            whole_bytes = chunk_bytes = shared_bytes = 0
            for ids in track(docs, description=name[:30], transient=True):
                whole_bytes += core.precompute_ids(model, whole, ids).entry.artifact_bytes
                report = chunks.precompute(ids)
                chunk_bytes += report.stored_bytes
                shared_bytes += report.shared_bytes
        print(f"| {name} | {whole_bytes / 1e6:.2f} MB | {chunk_bytes / 1e6:.2f} MB | {shared_bytes / 1e6:.2f} MB "
              f"({shared_bytes / (chunk_bytes + shared_bytes):.0%} of the chunk bytes; "
              f"{1 - chunk_bytes / whole_bytes:.0%} fewer bytes than whole artifacts) |")
    print("\nChunks hold only full chunks: a document's last partial chunk is recomputed by a reader (at most "
          f"{args.chunk_tokens - 1} tokens).")


if __name__ == "__main__":
    main()
