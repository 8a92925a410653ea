"""Claim: on vLLM, serving a long document's KV from kvmart's store (through kvmart's KV connector) cuts the time
to first token against vLLM prefilling the document from scratch.

One vLLM engine, one run, measured side by side and interleaved. vLLM's own prefix cache is off, so every request
is either truly from scratch or truly from the store:
  scratch : prompt = document + question, nothing loaded (kvmart's connector told to skip it), max_tokens=1;
  store   : the same prompt; the connector reads the document's artifact from kvmart's store (verified) and copies
            it into vLLM's paged KV buffers, vLLM computes only the question.
TTFT is the wall time of a one-token generate call. The first tokens must agree. Runs unchanged on a GPU (CUDA
vLLM installed): the engine, the connector and this script are device-agnostic.

    .venv-vllm/bin/python bench/vllm_reuse.py --model builtin:smollm2-135m --tokens 3700 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from kvmart.config import load_settings
from kvmart.engines.vllm import VllmEngine, VllmOptions
from kvmart.reuse.samples import SAMPLES, sample_text
from kvmart.runtime.chat import document_ids, layout_for, question_ids


def document(engine: VllmEngine, tokens: int) -> list[int]:
    """The chat layout's header and the bundled texts, cut to `tokens` token ids."""
    layout = layout_for(engine.tokenizer)
    text = "\n\n".join(sample_text(name) for name in SAMPLES)
    ids = document_ids(engine.tokenize, layout, text)
    while len(ids) < tokens:
        ids += ids
    return ids[:tokens]


def ttft(engine: VllmEngine, prompt: list[int], bypass: bool) -> tuple[float, int, int]:
    start = time.perf_counter()
    done = engine.complete(prompt, 1, bypass=bypass)
    return time.perf_counter() - start, done.token_ids[0], done.cached_tokens


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on the CPU backend (ignored on GPUs)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=3700, help="document tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-size", type=int, help="vLLM's KV block size (default: vLLM's; the CPU kernels "
                        "take multiples of 32). Documents are reused in whole blocks")
    parser.add_argument("--data-dir", help="default: a temporary store beside the usual models folder")
    args = parser.parse_args()

    base = load_settings()
    with tempfile.TemporaryDirectory(prefix="kvmart-vllm-bench-") as tmp:
        settings = base.with_overrides(model=args.model, dtype=args.dtype, data_dir=args.data_dir or tmp)
        if not args.data_dir:  # reuse the converted models, keep the bench's store throwaway
            (Path(tmp) / "models").symlink_to(base.models_dir, target_is_directory=True)
        engine = VllmEngine.open(settings, VllmOptions(block_size=args.block_size, prefix_caching=False,
                                                        max_model_len=args.tokens + 64))
        try:
            run(engine, args)
        finally:
            engine.close()


def run(engine: VllmEngine, args) -> None:
    doc = document(engine, args.tokens)
    question = question_ids(engine.tokenize, layout_for(engine.tokenizer), "What is this document about?")
    published = engine.publish(doc, title="bench")
    prompt = doc + question
    ttft(engine, prompt, True), ttft(engine, prompt, False)  # warm up both paths (allocations, page cache)
    scratch, store, first_tokens, cached = [], [], set(), set()
    for _ in range(args.repeats):
        seconds, token, _ = ttft(engine, prompt, True)
        scratch.append(seconds)
        first_tokens.add(token)
        seconds, token, hit = ttft(engine, prompt, False)
        store.append(seconds)
        first_tokens.add(token)
        cached.add(hit)
    s, r = statistics.median(scratch), statistics.median(store)
    import vllm

    print(f"vLLM {vllm.__version__}, {engine.spec} {args.dtype}, block size {engine.block_size}; document "
          f"{len(doc):,} tokens (artifact {published.entry.artifact_bytes / 1e6:.1f} MB, published in "
          f"{published.seconds:.2f} s), question {len(question)} tokens, median of {args.repeats}")
    print("| prompt tokens | cached tokens | TTFT from scratch (s) | TTFT from kvmart's store (s) | ratio |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {len(prompt):,} | {', '.join(map(str, sorted(cached)))} | {s:.3f} | {r:.3f} | {s / r:.1f}x |")
    print("first tokens agree" if len(first_tokens) == 1 else f"FIRST TOKENS DIFFER: {sorted(first_tokens)}")


if __name__ == "__main__":  # vLLM spawns worker processes: they must not run this again
    main()
