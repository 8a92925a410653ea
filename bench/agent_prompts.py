"""Claim: with the chunked prefix cache, agent traffic (framework system prompts, named documents, follow-ups,
pasted text) is served mostly from cache, and looking a prompt's chunks up costs the same whatever the catalogue's
size.

One run, one server (`kvmart serve` in-process on a loopback port, the real SmolLM2 by default). A publisher
publishes the documents (the bundled licences and documents generated from their paragraphs); several agents, each
with its framework's system prompt, then send a workload shaped like agent traffic: one- and two-document requests,
multi-turn follow-ups (the conversation so far, plus a new question), and prompts that paste a document's text
without naming it. Reported:
1. the share of prompt tokens served from cache after a warm-up pass (every request sent once before measuring);
2. time to first token with the cache and with `"cache": "bypass"` (the same chunks computed afresh), side by side
   on the same requests, min/median/max, with the process's CPU time beside the wall time;
3. the planner's lookup time for one prompt against catalogues of 1k, 10k and 100k synthetic documents.

    python bench/agent_prompts.py                       # SmolLM2, about 10 minutes on 2 cores
    python bench/agent_prompts.py --model builtin:tiny  # quick
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import torch
from serve_load import start_server  # bench/ is on the path when a bench script runs

from kvmart.app import create_app
from kvmart.config import load_settings
from kvmart.reuse.catalog import Document
from kvmart.reuse.prompt import ChatMessage, ChatPrompt
from kvmart.reuse.samples import SAMPLES, sample_text
from kvmart.runtime.model import Model
from kvmart.server import ServerSettings
from kvmart.server.pipeline.plan import Caller, GenerationRequest, Sampling
from kvmart.store import Entry

SYSTEM_PROMPTS = {  # the shapes of what agent frameworks send before the user's words
    "langchain": "You are a helpful assistant. Answer the user's questions using the documents provided. If you "
                 "do not know the answer, say that you don't know. Keep the answer concise.",
    "agents-sdk": "You are an agent. Think step by step about the user's request, use the information in the "
                  "conversation, and reply with a short, precise answer. Do not make things up.",
    "claude-code": "You are an assistant that answers questions about licences and software terms. Quote the "
                   "relevant clause where you can. Be brief: one or two sentences.",
    "llm-cli": "Answer in plain English, in at most two sentences.",
}
QUESTIONS = ["What does this document allow?", "Who holds the rights here?", "What must a redistributor do?",
             "Is there a warranty?", "Summarise the key obligation.", "What happens if I break the terms?"]


@dataclass(frozen=True)
class Result:
    prompt_tokens: int
    cached_tokens: int
    first_token_seconds: float


def documents(count: int, seed: int = 7) -> list[tuple[str, str]]:
    """The bundled licences and documents generated from their paragraphs (each 600-1,200 words)."""
    paragraphs = [p for name in SAMPLES for p in sample_text(name).split("\n\n") if len(p.split()) > 12]
    rng = random.Random(seed)
    docs = [(name, sample_text(name)[:6000]) for name in SAMPLES]
    while len(docs) < count:
        picked = rng.sample(paragraphs, rng.randint(5, 9))
        docs.append((f"generated-{len(docs)}", "\n\n".join(picked)[:6000]))
    return docs


def workload(ids: list[str], texts: dict[str, str], agents: list[str], rng: random.Random) -> list[tuple[str, dict]]:
    """(agent, request body) pairs: one- and two-document requests, follow-ups, pasted text."""
    requests = []
    for n in range(len(ids) * 2):
        agent = agents[n % len(agents)]
        system = {"role": "system", "content": SYSTEM_PROMPTS[agent]}
        kind = n % 4
        if kind == 0:  # one named document
            body = {"messages": [system, {"role": "user", "content": rng.choice(QUESTIONS)}],
                    "documents": [ids[n % len(ids)]]}
        elif kind == 1:  # two named documents
            body = {"messages": [system, {"role": "user", "content": rng.choice(QUESTIONS)}],
                    "documents": [ids[n % len(ids)], ids[(n + 1) % len(ids)]]}
        elif kind == 2:  # a follow-up: the conversation so far, then a new question
            body = {"messages": [system, {"role": "user", "content": QUESTIONS[0]},
                                 {"role": "assistant", "content": "It allows use, copying and redistribution."},
                                 {"role": "user", "content": rng.choice(QUESTIONS[1:])}],
                    "documents": [ids[(n // 4) % len(ids)]]}
        else:  # pasted text, no document named (a client that knows nothing of kvmart)
            doc = ids[(n // 4) % len(ids)]
            body = {"messages": [{"role": "user", "content": texts[doc] + "\n\n" + rng.choice(QUESTIONS)}]}
        requests.append((agent, body))
    return requests


def send(url: str, key: str, model: str, body: dict, cache: str) -> Result:
    payload = {"model": model, "max_tokens": 4, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}, "cache": cache, **body}
    with httpx.Client(base_url=url, timeout=1800, headers={"Authorization": f"Bearer {key}"}) as client:
        start, first, usage = time.perf_counter(), None, None
        with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if first is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
                usage = event.get("usage") or usage
    assert usage is not None
    return Result(usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"],
                  first if first is not None else time.perf_counter() - start)


def lookup_seconds(services, sizes: list[int], repeats: int) -> dict[int, list[float]]:
    """Planning one named-document prompt against catalogues grown to each size with synthetic documents."""
    catalog, model = services.catalog, services.model
    real = catalog.documents()[0]
    prompt = ChatPrompt((ChatMessage("system", SYSTEM_PROMPTS["llm-cli"]), ChatMessage("user", QUESTIONS[0])),
                        (real.id,))
    caller = Caller(None, None, "bench-tenant")
    rng, added, found = random.Random(1), 0, {}
    for size in sizes:
        while added < size:
            ids = torch.tensor([rng.randrange(10, model.vocab_size) for _ in range(64)])
            cid = f"{rng.getrandbits(256):064x}"
            entry = Entry(cid, "synthetic", "", model.spec, model.fingerprint.digest, 64, 0, 0.0, time.time())
            catalog.insert(Document(entry, ids, ((64, f"{rng.getrandbits(256):064x}"),)))
            added += 1
        request = GenerationRequest(prompt, Sampling(max_tokens=1))
        services.planner.plan(request, caller)  # warm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            services.planner.plan(request, caller)
            times.append(time.perf_counter() - start)
        found[size] = times
    return found


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: KVMART_MODEL or kvmart's default model (SmolLM2-135M)")
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--compare", type=int, default=8, help="requests timed with and without the cache")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings().with_overrides(model=args.model)
    model = Model.load(settings)
    with tempfile.TemporaryDirectory(dir=settings.data_dir) as tmp:
        app = create_app(settings.with_overrides(store=str(Path(tmp) / "store"),
                                                 ledger=f"sqlite:///{Path(tmp) / 'ledger.sqlite'}"),
                         ServerSettings(rate_limit_per_minute=0, max_concurrent_per_key=0, max_queue=256), model)
        services = app.state.services
        _, publisher = services.ledger.create_account("publisher", "publisher")
        services.ledger.deposit("publisher", Decimal(1000))
        keys = {}
        for agent in SYSTEM_PROMPTS:
            _, keys[agent] = services.ledger.create_account(agent, "agent")
            services.ledger.deposit(agent, Decimal(1000))
        server, url = start_server(app)
        texts, ids = {}, []
        began = time.perf_counter()
        for title, text in documents(args.documents):
            doc = httpx.post(url + "/v1/documents", json={"text": text, "title": title}, timeout=1800,
                             headers={"Authorization": f"Bearer {publisher}"}).json()
            ids.append(doc["id"])
            texts[doc["id"]] = text
        publish_seconds = time.perf_counter() - began
        requests = workload(ids, texts, list(SYSTEM_PROMPTS), random.Random(3))
        for agent, body in requests:  # warm-up: every request once
            send(url, keys[agent], model.spec, body, "default")
        cpu, wall = time.process_time(), time.perf_counter()
        measured = [send(url, keys[agent], model.spec, body, "default") for agent, body in requests]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        compare = requests[:args.compare]
        cached = [send(url, keys[a], model.spec, b, "default").first_token_seconds for a, b in compare]
        bypass = [send(url, keys[a], model.spec, b, "bypass").first_token_seconds for a, b in compare]
        lookups = lookup_seconds(services, [1_000, 10_000, 100_000], 20)
        server.should_exit = True
    share = sum(r.cached_tokens for r in measured) / sum(r.prompt_tokens for r in measured)
    print(f"model {model.spec} ({model.dtype_name}), {len(ids)} documents published in {publish_seconds:.0f} s, "
          f"{len(requests)} requests (x2: warm-up, measured), torch threads {args.threads}")
    print(f"\nprompt tokens served from cache after warm-up: {share:.1%} "
          f"({sum(r.cached_tokens for r in measured):,} of {sum(r.prompt_tokens for r in measured):,}); "
          f"measured pass: wall {wall:.1f} s, process CPU {cpu:.1f} s")
    by_kind: dict[int, list[Result]] = {}
    for n, r in enumerate(measured):
        by_kind.setdefault(n % 4, []).append(r)
    for kind, name in enumerate(("one named document", "two named documents", "follow-up turn", "pasted text")):
        rs = by_kind[kind]
        print(f"  {name:20} {sum(r.cached_tokens for r in rs) / sum(r.prompt_tokens for r in rs):.1%}")
    print(f"\ntime to first token, s (min / median / max over {len(compare)} requests, each sent both ways):")
    print(f"| cache | TTFT | \n|---|---|\n| default | {spread(cached)} |\n| bypass | {spread(bypass)} |")
    ratios = [b / c for b, c in zip(bypass, cached, strict=True)]
    print(f"bypass / cached, per request: {spread(ratios)}")
    print("\nplanning one prompt (lookup of its chunks), ms (min / median / max of 20):")
    for size, times in lookups.items():
        print(f"  {size:>7,} documents: {spread([t * 1000 for t in times])}")


if __name__ == "__main__":
    main()
