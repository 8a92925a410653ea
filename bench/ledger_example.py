"""The README's worked example, run for real: a publisher publishes a 3,774-token document, 1,000 agents (each its
own account and key) read it through the OpenAI-compatible API, and the ledger reports what they paid, what the
publisher earned and what they saved against re-prefilling. Also measures the ledger's cost per request: the same
reads metered (an agent: three more ledger transactions, two of them writes) and unmetered (the admin), side by
side.

Everything goes through the real server (create_app, in-process, over httpx's ASGI transport) and a real SQLite
ledger in a temp dir. The default model is builtin:tiny (seeded random weights: its answers are noise, the token
counts and the money are real); the document is cut to exactly --tokens tokens of that model's tokenizer.

    python bench/ledger_example.py --agents 1000 --tokens 3774
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from decimal import Decimal
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from rich.console import Console
from rich.progress import track

from kvmart.app import create_app
from kvmart.config import load_settings
from kvmart.ledger import usd_text
from kvmart.reuse.samples import sample_text
from kvmart.runtime.chat import document_ids, layout_for
from kvmart.runtime.model import Model
from kvmart.server import ServerSettings

console = Console(width=120)
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' notices about its own future
QUESTION = "Who is the license steward?"

SOURCE = "https://publisher.example/the-document.txt"  # the verified owner's URL of the text


def document_of(model: Model, num_tokens: int) -> str:
    """A prefix of the bundled licence texts that is exactly `num_tokens` tokens in the chat layout."""
    text = "\n\n".join(sample_text(n) for n in ("mpl-2.0", "apache-2.0", "gpl-3.0"))
    layout = layout_for(model.tokenizer)
    count = lambda n: len(document_ids(model.tokenize, layout, text[:n]))  # noqa: E731
    low, high = 1, len(text)
    if count(high) < num_tokens:
        raise SystemExit(f"the bundled texts are shorter than {num_tokens} tokens")
    while low < high:  # the shortest prefix with at least num_tokens tokens
        mid = (low + high) // 2
        low, high = (mid + 1, high) if count(mid) < num_tokens else (low, mid)
    for n in range(low, low + 50):  # BPE merges can skip a count: step until exact
        if count(n) == num_tokens:
            return text[:n]
    raise SystemExit(f"no prefix of exactly {num_tokens} tokens")


def read(client: TestClient, key: str, doc_id: str, model: str, max_tokens: int) -> dict:
    body = {"model": model, "documents": [doc_id], "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": QUESTION}]}
    response = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    return response.json()["usage"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=3774, help="document length in the model's tokens")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens each agent's answer may have")
    parser.add_argument("--deposit", default="1.00", help="dollars each agent starts with")
    parser.add_argument("--pairs", type=int, default=200, help="metered and unmetered reads timed, alternating")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings().with_overrides(model=args.model, store=str(Path(tmp) / "store"),
                                                  ledger=f"sqlite:///{Path(tmp) / 'ledger.sqlite'}")
        model = Model.load(settings)
        app = create_app(settings, ServerSettings(), model)
        ledger = app.state.services.ledger
        _, publisher = ledger.create_account("publisher", "publisher")
        ledger.deposit("publisher", Decimal("1.00"))
        # the publisher owns the text: it proved control of its source's origin (POST /v1/claims, docs/LEDGER.md),
        # so its royalties are paid at once rather than held in escrow
        ledger.mark_claim_verified(ledger.new_claim(ledger.account("publisher"), SOURCE))
        agents = []
        for i in track(range(args.agents), description=f"creating {args.agents} funded agents", console=console):
            agents.append(ledger.create_account(f"agent-{i:04d}", "agent")[1])
            ledger.deposit(f"agent-{i:04d}", Decimal(args.deposit))
        text = document_of(model, args.tokens)
        with TestClient(app) as client:
            doc = client.post("/v1/documents", json={"text": text, "title": "the document", "source": SOURCE},
                              headers={"Authorization": f"Bearer {publisher}"}).json()
            for key in track(agents, description="agents reading", console=console):
                read(client, key, doc["id"], model.spec, args.max_tokens)
            rows = report_rows(args, doc, ledger)
            metered, unmetered = timings(client, ledger, doc["id"], model.spec, args)
        console.print(f"model {model.spec}; document {doc['num_tokens']:,} tokens ({doc['id']}); {args.agents:,} "
                      f"agents, one read each, {args.max_tokens} answer tokens at most; tariff: prefill "
                      f"${ledger.tariff.prefill_usd_per_mtok}/1M, cache reads x{ledger.tariff.cache_read_fraction}, "
                      f"output ${ledger.tariff.output_usd_per_mtok}/1M, royalty {ledger.tariff.royalty_share} of reads")
        rows.append(("seconds per read, median: metered (agent) / unmetered (admin)",
                     f"{metered:.4f} / {unmetered:.4f} (+{(metered - unmetered) * 1000:.1f} ms)"))
        width = max(len(r[0]) for r in rows)
        for name, value in rows:
            console.print(f"{name:<{width}}  {value}", highlight=False)


def timings(client: TestClient, ledger, doc_id: str, model: str, args) -> tuple[float, float]:
    """Median seconds of a metered read (an agent: auth, licence, hold, charge) and an unmetered one (the admin:
    auth only), alternating so that both see the same machine."""
    _, agent = ledger.create_account("timer", "agent")
    ledger.deposit("timer", Decimal(10))
    admin = ledger.admin_key_issued
    seconds: dict[str, list[float]] = {agent: [], admin: []}
    for _ in track(range(args.pairs), description="timing metered vs unmetered reads", console=console):
        for key in (agent, admin):
            start = time.perf_counter()
            read(client, key, doc_id, model, args.max_tokens)
            seconds[key].append(time.perf_counter() - start)
    return statistics.median(seconds[agent]), statistics.median(seconds[admin])


def signed_usd(nanousd: int) -> str:
    return ("-$" if nanousd < 0 else "$") + usd_text(abs(nanousd))


def report_rows(args, doc: dict, ledger) -> list[tuple[str, str]]:
    """What the agents paid, what the publisher and the provider earned, what re-prefilling would have cost."""
    balances = {b.name: b.balance_nanousd for b in ledger.balances()}
    deposited = args.agents * int(Decimal(args.deposit) * 10**9)
    agents_paid = deposited - sum(v for k, v in balances.items() if k.startswith("agent-"))
    [document] = [d for d in ledger.documents() if d.cache_id == doc["cache_id"]]
    return [
        ("reads charged", f"{document.reads:,}"),
        ("cached tokens read", f"{document.cached_tokens:,}"),
        ("agents paid, in all", signed_usd(agents_paid)),
        ("  of which cache reads", signed_usd(document.cache_read_nanousd)),
        ("  per read", signed_usd(agents_paid // document.reads)),
        ("re-prefilling the document for every read would have cost",
         signed_usd(document.cache_read_nanousd + document.saved_nanousd)),
        ("agents saved against re-prefilling", signed_usd(document.saved_nanousd)),
        ("publisher: precompute fee, paid once", signed_usd(-document.precompute_nanousd)),
        ("publisher: royalties", signed_usd(document.royalty_nanousd)),
        ("publisher: net", signed_usd(balances["publisher"] - 10**9)),
        ("provider: earned", signed_usd(balances["provider"])),
        ("ledger: entries sum to", signed_usd(ledger.health().entries_sum_nanousd)),
    ]


if __name__ == "__main__":
    main()
