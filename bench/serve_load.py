"""Claim: serving questions about a hosted document from its cached KV cuts time-to-first-token and raises
throughput under concurrent load, compared with prefilling the document for every request.

One run, one server (`kvmart serve` in-process on a loopback port), one published document kept hot. N concurrent
clients each stream one chat completion about it; the same wave is sent with the cache (default) and with
`"cache": "bypass"` (the document prefilled afresh for each request, the same two-step computation), alternating
for --rounds rounds. Prints a markdown table for docs/BENCHMARKS.md.

    python bench/serve_load.py --model builtin:smollm2-135m --sample mpl-2.0 --clients 16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import torch
import uvicorn

from kvmart.app import create_app
from kvmart.config import load_settings
from kvmart.reuse.samples import SAMPLES, sample_text
from kvmart.runtime.model import Model
from kvmart.server import ServerSettings


@dataclass(frozen=True)
class Sample:
    first_token_seconds: float
    seconds: float
    completion_tokens: int
    cached_tokens: int


def start_server(app) -> tuple[uvicorn.Server, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def ask(url: str, body: dict, barrier: threading.Barrier, key: str) -> Sample:
    """One streamed chat completion; time to the first content and to the end."""
    with httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {key}"}) as client:
        barrier.wait()
        start = time.perf_counter()
        first, usage = None, None
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
        seconds = time.perf_counter() - start
    return Sample(first if first is not None else seconds, seconds, usage["completion_tokens"],
                  usage["prompt_tokens_details"]["cached_tokens"])


def wave(url: str, doc_id: str, model: str, clients: int, max_tokens: int, cache: str, key: str
         ) -> tuple[float, list[Sample]]:
    """`clients` requests at once; (wall seconds, samples)."""
    barrier = threading.Barrier(clients)
    bodies = [{"model": model, "documents": [doc_id], "cache": cache, "stream": True, "max_tokens": max_tokens,
               "temperature": 0, "stream_options": {"include_usage": True},
               "messages": [{"role": "user", "content": f"Question {i}: what does this document say about {topic}?"}]}
              for i, topic in zip(range(clients), ["liability", "warranty", "patents", "trademarks"] * clients, strict=False)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = list(pool.map(lambda body: ask(url, body, barrier, key), bodies))
    return time.perf_counter() - start, samples


def agent_key(app) -> str:
    """A funded agent of the app's ledger: requests are metered, as in production."""
    ledger = app.state.services.ledger
    _, key = ledger.create_account("bench-agent", "agent")
    ledger.deposit("bench-agent", Decimal(1000))
    return key


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: KVMART_MODEL or kvmart's default model")
    parser.add_argument("--sample", choices=list(SAMPLES), default="mpl-2.0", help="the hosted document")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients per wave")
    parser.add_argument("--rounds", type=int, default=1, help="waves per mode, alternating cached and bypass")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per answer")
    parser.add_argument("--max-active", type=int, default=4, help="requests the model worker interleaves")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); on a small "
                                                    "shared machine 1 can be many times faster")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = load_settings().with_overrides(model=args.model)
    model = Model.load(settings)
    with tempfile.TemporaryDirectory(dir=settings.data_dir) as tmp:
        store_settings = settings.with_overrides(store=str(Path(tmp) / "store"),
                                                 ledger=f"sqlite:///{Path(tmp) / 'ledger.sqlite'}")
        server_settings = ServerSettings(max_active=args.max_active, max_queue=max(64, args.clients))
        app = create_app(store_settings, server_settings, model)
        key = agent_key(app)
        server, url = start_server(app)
        doc = httpx.post(url + "/v1/documents", json={"text": sample_text(args.sample)}, timeout=600,
                         headers={"Authorization": f"Bearer {app.state.services.ledger.admin_key_issued}"}).json()
        for cache in ("default", "bypass"):  # warm-up: load the artifact into the hot tier, touch every code path
            wave(url, doc["id"], model.spec, 1, args.max_tokens, cache, key)
        results: dict[str, list[tuple[float, list[Sample]]]] = {"default": [], "bypass": []}
        for _ in range(args.rounds):
            for cache in results:
                results[cache].append(wave(url, doc["id"], model.spec, args.clients, args.max_tokens, cache, key))
        server.should_exit = True
    report(args, model, doc, results)


def report(args, model: Model, doc: dict, results: dict) -> None:
    rows = {}
    for cache, waves in results.items():
        samples = [s for _, wave_samples in waves for s in wave_samples]
        wall = sum(seconds for seconds, _ in waves)
        ttft = [s.first_token_seconds for s in samples]
        rows[cache] = dict(ttft_p50=statistics.median(ttft), ttft_p95=percentile(ttft, 0.95),
                           tokens_per_second=sum(s.completion_tokens for s in samples) / wall,
                           requests_per_second=len(samples) / wall, cached=samples[0].cached_tokens)
    print(f"model {model.spec} ({model.dtype_name}), torch threads {torch.get_num_threads()}, document "
          f"sample:{args.sample} ({doc['num_tokens']:,} tokens, prefill {doc['prefill_seconds']:.2f}s), "
          f"{args.clients} concurrent clients x {args.rounds} round(s), {args.max_tokens} tokens per answer, "
          f"max_active {args.max_active}")
    print("| mode | cached tokens / request | TTFT p50 s | TTFT p95 s | completion tokens/s | requests/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for cache, label in (("default", "cached"), ("bypass", "bypass (prefill every request)")):
        r = rows[cache]
        print(f"| {label} | {r['cached']:,} | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | "
              f"{r['tokens_per_second']:.1f} | {r['requests_per_second']:.2f} |")
    c, b = rows["default"], rows["bypass"]
    print(f"ratio (cached vs bypass): TTFT p50 {b['ttft_p50'] / c['ttft_p50']:.1f}x lower, p95 "
          f"{b['ttft_p95'] / c['ttft_p95']:.1f}x lower; throughput "
          f"{c['tokens_per_second'] / b['tokens_per_second']:.1f}x higher")


if __name__ == "__main__":
    main()
