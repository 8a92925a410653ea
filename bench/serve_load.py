"""Claim: serving questions about a hosted document from its cached KV cuts time-to-first-token and raises
throughput under concurrent load, compared with prefilling the document for every request; and continuous
batching (decode steps of every active request in one forward pass) keeps time-to-first-token and throughput up
as clients grow, compared with the same server decoding one request per forward pass.

One run, one server (`kvmart serve` in-process on a loopback port), one published document kept hot. Waves of N
concurrent clients each stream one chat completion about it, for every setting asked for, interleaved round by
round: the cache (default) or `"cache": "bypass"` (the document prefilled afresh for each request, the same
chunked computation), and the worker batching (--max-active requests) or not (--unbatched-max-active requests,
one forward pass each, the previous server's way). Each wave records the clients' time to first token, its wall
time and the CPU time of this process (server and clients are threads of it) and of its child processes (vLLM's). Prints markdown tables for
docs/BENCHMARKS.md: per setting, medians over every request, and min/median/max over the rounds.

With `--engine vllm` the server drives vLLM's async engine (kvmart's KV connector loads the document; vLLM's own
prefix cache keeps it in RAM after the first request); batching `on` hands every admitted request to vLLM at once
(--max-active), `off` one at a time (--unbatched-max-active, default 1 here: one request per vLLM call, the server
before issue 27 part 3, though its tokens now stream). Run it in the venv of scripts/install-vllm.sh, with vLLM's
CPU settings in the environment (VLLM_CPU_KVCACHE_SPACE, OMP_NUM_THREADS, VLLM_CPU_OMP_THREADS_BIND).

    python bench/serve_load.py --model builtin:smollm2-135m --clients 1,4,16 --rounds 3 --threads 1
    python bench/serve_load.py --model builtin:smollm2-135m --clients 4 --modes cached,bypass --batching on
    .venv-vllm/bin/python bench/serve_load.py --engine vllm --model builtin:smollm2-135m --clients 1,4,16
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


def start_server(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


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


@dataclass(frozen=True)
class Wave:
    wall_seconds: float
    cpu_seconds: float
    samples: list[Sample]

    @property
    def ttft_p50(self) -> float:
        return statistics.median(s.first_token_seconds for s in self.samples)

    @property
    def tokens_per_second(self) -> float:
        return sum(s.completion_tokens for s in self.samples) / self.wall_seconds


def wave(url: str, doc_id: str, model: str, clients: int, max_tokens: int, cache: str, key: str) -> Wave:
    """`clients` requests at once."""
    barrier = threading.Barrier(clients)
    bodies = [{"model": model, "documents": [doc_id], "cache": cache, "stream": True, "max_tokens": max_tokens,
               "temperature": 0, "stream_options": {"include_usage": True},
               "messages": [{"role": "user", "content": f"Question {i}: what does this document say about {topic}?"}]}
              for i, topic in zip(range(clients), ["liability", "warranty", "patents", "trademarks"] * clients, strict=False)]
    start, cpu = time.perf_counter(), cpu_seconds()
    with ThreadPoolExecutor(clients) as pool:
        samples = list(pool.map(lambda body: ask(url, body, barrier, key), bodies))
    return Wave(time.perf_counter() - start, cpu_seconds() - cpu, samples)


def cpu_seconds() -> float:
    """CPU time of this process (server and clients are its threads) and of its live child processes (vLLM's
    engine core and worker), user and system; without psutil, this process's only."""
    try:
        import psutil
    except ImportError:
        return time.process_time()
    children = psutil.Process().children(recursive=True)
    total = time.process_time()
    for child in children:
        try:
            times = child.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        total += times.user + times.system
    return total


def agent_key(app) -> str:
    """A funded agent of the app's ledger: requests are metered, as in production."""
    ledger = app.state.services.ledger
    _, key = ledger.create_account("bench-agent", "agent")
    ledger.deposit("bench-agent", Decimal(1000))
    return key


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


Setting = tuple[int, str, str]  # clients, cache mode, batching


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: KVMART_MODEL or kvmart's default model")
    parser.add_argument("--sample", choices=list(SAMPLES), default="mpl-2.0", help="the hosted document")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients per wave (comma-separated)")
    parser.add_argument("--modes", default="cached", help="cached, bypass (comma-separated)")
    parser.add_argument("--batching", default="on,off",
                        help="on, off, prompts (comma-separated; prompts: on, and concurrent requests' prompt chunks "
                             "packed into shared forward passes, the server's --batch-prompts)")
    parser.add_argument("--rounds", type=int, default=3, help="waves per setting, interleaved")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per answer")
    parser.add_argument("--max-active", type=int, default=64, help="requests the batching worker keeps active")
    parser.add_argument("--unbatched-max-active", type=int,
                        help="requests the worker interleaves with batching off (default: the previous server's, 4 "
                             "with the transformers engine, 1 with vllm)")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); on a small "
                                                    "shared machine 1 can be many times faster")
    args = parser.parse_args()
    if args.unbatched_max_active is None:
        args.unbatched_max_active = 1 if args.engine == "vllm" else 4
    if args.threads:
        torch.set_num_threads(args.threads)
    settings_list: list[Setting] = [(int(c), m, b) for c in args.clients.split(",") for m in args.modes.split(",")
                                    for b in args.batching.split(",")]

    settings = load_settings().with_overrides(model=args.model)
    model = Model.load(settings) if args.engine == "transformers" else None  # vllm: the server starts it
    with tempfile.TemporaryDirectory(dir=settings.data_dir) as tmp:
        store_settings = settings.with_overrides(store=str(Path(tmp) / "store"),
                                                 ledger=f"sqlite:///{Path(tmp) / 'ledger.sqlite'}")
        most = max(c for c, _, _ in settings_list)
        server_settings = ServerSettings(max_active=args.max_active, max_queue=max(64, most),
                                         max_concurrent_per_key=0, rate_limit_per_minute=0, engine=args.engine)
        app = create_app(store_settings, server_settings, model)
        engine = app.state.services.model  # the Model, or the VllmEngine
        label = f"{engine.spec} ({settings.dtype}, engine {args.engine})"
        key = agent_key(app)
        server, thread, url = start_server(app)
        worker = app.state.services.worker
        doc = httpx.post(url + "/v1/documents", json={"text": sample_text(args.sample)}, timeout=600,
                         headers={"Authorization": f"Bearer {app.state.services.ledger.admin_key_issued}"}).json()
        for cache in {"default" if m == "cached" else "bypass" for _, m, _ in settings_list}:  # warm-up
            wave(url, doc["id"], engine.spec, 1, args.max_tokens, cache, key)
        results: dict[Setting, list[Wave]] = {s: [] for s in settings_list}
        for _ in range(args.rounds):
            for clients, mode, batching in settings_list:
                worker.batching = batching != "off"
                if args.engine == "transformers":
                    app.state.services.engine.batch_prompts = batching == "prompts"
                worker.max_active = args.max_active if worker.batching else args.unbatched_max_active
                cache = "default" if mode == "cached" else "bypass"
                results[clients, mode, batching].append(wave(url, doc["id"], engine.spec, clients, args.max_tokens,
                                                             cache, key))
        server.should_exit = True
        thread.join()  # the app's shutdown closes the engine (vLLM's processes)
    report(args, label, doc, results)


def spread(values: list[float], digits: int) -> str:
    """median [min-max]"""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def report(args, label: str, doc: dict, results: dict[Setting, list[Wave]]) -> None:
    print(f"model {label}, torch threads {torch.get_num_threads()}, document "
          f"sample:{args.sample} ({doc['num_tokens']:,} tokens, prefill {doc['prefill_seconds']:.2f}s), "
          f"{args.rounds} round(s), {args.max_tokens} tokens per answer; batching on: max_active "
          f"{args.max_active}, off: max_active {args.unbatched_max_active}, "
          f"{'requests handed to vLLM one by one' if args.engine == 'vllm' else 'one forward pass per request step'}")
    print("| clients | mode | batching | cached tokens / request | TTFT p50 s | TTFT p95 s | TTFT p50 s per round "
          "| completion tokens/s per round | CPU s per wave | wall s per wave |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (clients, mode, batching), waves in results.items():
        ttft = [s.first_token_seconds for w in waves for s in w.samples]
        print(f"| {clients} | {mode} | {batching} | {waves[0].samples[0].cached_tokens:,} | "
              f"{statistics.median(ttft):.3f} | {percentile(ttft, 0.95):.3f} | "
              f"{spread([w.ttft_p50 for w in waves], 3)} | {spread([w.tokens_per_second for w in waves], 1)} | "
              f"{spread([w.cpu_seconds for w in waves], 2)} | {spread([w.wall_seconds for w in waves], 2)} |")
    print("ratios, per round then median [min-max]:")
    for (clients, mode, batching), waves in results.items():
        if batching != "off" and (clients, mode, "off") in results:
            off = results[clients, mode, "off"]
            print(f"  {clients} clients, {mode}: batching {batching} vs off: TTFT p50 "
                  f"{spread([o.ttft_p50 / w.ttft_p50 for w, o in zip(waves, off, strict=True)], 1)}x lower, "
                  f"tokens/s {spread([w.tokens_per_second / o.tokens_per_second for w, o in zip(waves, off, strict=True)], 1)}x higher")
        if mode == "cached" and (clients, "bypass", batching) in results:
            by = results[clients, "bypass", batching]
            print(f"  {clients} clients, batching {batching}: cached vs bypass: TTFT p50 "
                  f"{spread([b.ttft_p50 / w.ttft_p50 for w, b in zip(waves, by, strict=True)], 1)}x lower, "
                  f"tokens/s {spread([w.tokens_per_second / b.tokens_per_second for w, b in zip(waves, by, strict=True)], 1)}x higher")
    fewest = min(c for c, _, _ in results)
    for (clients, mode, batching), waves in results.items():
        base = results.get((fewest, mode, batching))
        if clients != fewest and base:
            print(f"  {mode}, batching {batching}: TTFT p50 at {clients} clients is "
                  f"{statistics.median(w.ttft_p50 for w in waves) / statistics.median(w.ttft_p50 for w in base):.1f}x "
                  f"that at {fewest}")


if __name__ == "__main__":
    main()
