"""The ledger under load, on SQLite and a real PostgreSQL: thousands of seeded, concurrent requests (holds,
charges, releases, idempotent retries, agents running out of money) never create or lose money; a process killed
mid-transaction leaves the books balanced."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import func, select

from kvmart.errors import IdempotencyConflictError, InsufficientFundsError
from kvmart.ledger import Terms, open_ledger
from kvmart.ledger.schema import charges, holds

NUM_REQUESTS = 3000
NUM_AGENTS = 12
THREADS = 8
SEED = 20260512
DOCS = ("a" * 64, "b" * 64, "c" * 64, None)  # public, priced, private, no document


@dataclass(frozen=True)
class Request:
    agent: str
    cache_id: str | None
    cached: int
    computed: int
    max_output: int
    output: int
    key: str | None  # idempotency key
    finishes: bool  # False: the client goes away, the hold is released


def plan(rng: random.Random) -> list[Request]:
    requests = []
    for i in range(NUM_REQUESTS):
        agent = f"agent{rng.randrange(NUM_AGENTS)}"
        if requests and rng.random() < 0.15:  # a retry: same agent, same request, same key
            earlier = rng.choice(requests)
            if earlier.key is not None:
                requests.append(earlier)
                continue
        doc = rng.choice(DOCS)
        cached = rng.randrange(1, 4000) if doc else 0
        max_output = rng.randrange(1, 256)
        requests.append(Request(agent, doc, cached, rng.randrange(1, 300), max_output, rng.randrange(0, max_output + 1),
                                f"k{i}" if rng.random() < 0.5 else None, rng.random() < 0.9))
    return requests


LOCK = threading.Lock()


def count(outcomes: Counter, what: str) -> None:
    with LOCK:
        outcomes[what] += 1


def serve(ledger, accounts, licences, outcomes: Counter, charged: dict, req: Request) -> None:
    account = accounts[req.agent]
    licence = licences.get(req.cache_id)
    most = ledger.quote(licence, req.cached, req.computed, req.max_output)
    try:
        held = ledger.open_hold(account, most.total_nanousd, req.key, hashlib.sha256(repr(req).encode()).hexdigest())
    except InsufficientFundsError:
        count(outcomes, "402")
        return
    except IdempotencyConflictError as e:  # a key charged already (the server replays its kept answer) or running
        count(outcomes, "already charged" if "already charged" in str(e) else "409")
        return
    if not req.finishes:
        ledger.release(held)
        count(outcomes, "released")
        return
    charge = ledger.settle(held, ledger.quote(licence, req.cached, req.computed, req.output), licence, req.cache_id)
    with LOCK:
        charged[req.agent].append(charge.quote.total_nanousd)
        outcomes["charged"] += 1


def test_thousands_of_concurrent_charges_never_create_or_lose_money(ledger_url, tmp_path, record_agreement):
    rng = random.Random(SEED)
    ledger = open_ledger(ledger_url, tmp_path, environ={})
    publisher, _ = ledger.create_account("pub", "publisher")
    ledger.deposit("pub", Decimal(1))
    ledger.publish(DOCS[0], publisher, Terms(), "", 4000)
    ledger.publish(DOCS[1], publisher, Terms("priced", cache_read_usd_per_mtok=Decimal("0.7")), "", 4000)
    ledger.publish(DOCS[2], publisher, Terms("private"), "s", 4000)
    deposits = {}
    for i in range(NUM_AGENTS):
        ledger.create_account(f"agent{i}", "agent")
        deposits[f"agent{i}"] = Decimal(("0.002", "0.05", "1", "1")[i % 4])  # the poor ones run dry: 402s
        ledger.deposit(f"agent{i}", deposits[f"agent{i}"])
    accounts = {a.name: a for a in ledger.accounts()}
    licences = {d: ledger.licence(d) for d in DOCS if d}
    outcomes, charged = Counter(), defaultdict(list)
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda r: serve(ledger, accounts, licences, outcomes, charged, r), plan(rng)))

    health = ledger.health()
    assert health.entries_sum_nanousd == 0 and health.is_sound, health
    for name, paid in deposits.items():  # each agent's balance is its deposit less exactly what it was charged
        assert ledger.account(name).balance_nanousd == int(paid * 10**9) - sum(charged[name]) >= 0
    total_in = sum(int(d * 10**9) for d in deposits.values()) + 10**9
    assert sum(b.balance_nanousd for b in ledger.balances() if b.role != "external") == total_in
    keyed = ledger.run(lambda conn: conn.execute(select(charges.c.idempotency_key, func.count())
                                                 .where(charges.c.idempotency_key.is_not(None))
                                                 .group_by(charges.c.idempotency_key)).all())
    assert keyed and all(count == 1 for _, count in keyed)  # every key charged at most once
    assert ledger.run(lambda conn: conn.execute(select(func.count()).select_from(holds)).scalar_one()) == 0
    record_agreement(f"ledger stress on {ledger_url.partition(':')[0]}: {dict(sorted(outcomes.items()))} "
                     f"of {NUM_REQUESTS} requests, {THREADS} threads; entries sum to 0")
    assert outcomes["charged"] > NUM_REQUESTS // 3 and outcomes["402"] > 0 and outcomes["already charged"] > 0, outcomes
    ledger.close()


CHARGING_LOOP = """
import sys
from decimal import Decimal
from pathlib import Path
from kvmart.ledger import open_ledger
ledger = open_ledger(sys.argv[1], Path(sys.argv[2]), environ={})
agent = ledger.account("spender")
print("ready", flush=True)
used = ledger.quote(None, 10, 10, 10)
while True:
    hold = ledger.open_hold(agent, used.total_nanousd, None, "0" * 64)
    ledger.settle(hold, used, None, None)
"""


def test_a_process_killed_mid_transaction_leaves_the_books_balanced(ledger_url, tmp_path):
    ledger = open_ledger(ledger_url, tmp_path, environ={})
    ledger.create_account("spender", "agent")
    ledger.deposit("spender", Decimal(100))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", CHARGING_LOOP, ledger_url, str(tmp_path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
        end = time.monotonic() + 30
        while ledger.usage(ledger.account("spender")).requests < 50 and time.monotonic() < end:
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    requests = ledger.usage(ledger.account("spender")).requests
    assert requests >= 50
    assert ledger.health().is_sound  # no half-written transaction
    spent = ledger.usage(ledger.account("spender")).spent_nanousd
    assert ledger.account("spender").balance_nanousd == 100 * 10**9 - spent
    ledger.run(lambda conn: conn.execute(holds.delete()))  # what release_stale does an hour later
    assert ledger.health().is_sound
    ledger.close()
