"""Load and fault injection on loopback against a real `kvmart serve` (builtin:tiny), with a bounded asyncio
client: 64 agents, each with its own key, ask about a published document for KVMART_LOAD_SECONDS (default 20;
docs/SECURITY.md reports a 60 s run), while one greedy key goes over its concurrency limit. Zero errors but the
greedy key's deliberate 429s; every answer charged exactly once. Then the node is killed (SIGKILL) and restarted
mid-load: clients see connection errors, retry with the same Idempotency-Key, and the books balance with no
answer charged twice."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from decimal import Decimal

import httpx
import pytest
from node_support import Node

from kvmart.ledger import open_ledger
from kvmart.reuse.samples import sample_text

pytestmark = pytest.mark.load
AGENTS = int(os.environ.get("KVMART_LOAD_AGENTS", "64"))
LOAD_SECONDS = float(os.environ.get("KVMART_LOAD_SECONDS", "20"))
GREEDY_CONCURRENCY = 8
KEEPALIVE_SECONDS = 1.0  # below uvicorn's 5 s, so the client never reuses a connection the server is closing
LIMITS = {"KVMART_MAX_CONCURRENT_PER_KEY": "4", "KVMART_RATE_LIMIT_PER_MINUTE": "6000",
          "KVMART_RATE_LIMIT_BURST": "600", "KVMART_MAX_QUEUE": "256"}


def ask_body(doc_id: str, n: int) -> dict:
    return {"model": "builtin:tiny", "documents": [doc_id], "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": f"Question {n}: who may redistribute it?"}]}


def setup_ledger(data_dir, agents: int):
    ledger = open_ledger("", data_dir, environ={})
    _, publisher = ledger.create_account("publisher", "publisher")
    ledger.deposit("publisher", Decimal(10))
    keys = {}
    for i in range(agents):
        _, keys[f"agent-{i}"] = ledger.create_account(f"agent-{i}", "agent")
        ledger.deposit(f"agent-{i}", Decimal(100))
    return ledger, publisher, keys


def publish(url: str, key: str) -> str:
    response = httpx.post(url + "/v1/documents", json={"text": sample_text("bsd-3-clause")},
                          headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 201, response.text
    return response.json()["id"]


async def agent(client: httpx.AsyncClient, key: str, doc_id: str, until: float, statuses: Counter,
                latencies: list[float]) -> None:
    n = 0
    while time.monotonic() < until:
        n += 1
        began = time.perf_counter()
        response = await client.post("/v1/chat/completions", json=ask_body(doc_id, n),
                                     headers={"Authorization": f"Bearer {key}"})
        statuses[response.status_code] += 1
        if response.status_code == 200:
            latencies.append(time.perf_counter() - began)
        elif response.status_code == 429:
            await asyncio.sleep(float(response.headers.get("retry-after", "1")) / 10)


async def run_load(url: str, keys: dict[str, str], greedy: str, doc_id: str, seconds: float):
    until = time.monotonic() + seconds
    honest = {name: Counter() for name in keys}
    greedy_statuses: Counter = Counter()
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=AGENTS + GREEDY_CONCURRENCY + 8, keepalive_expiry=KEEPALIVE_SECONDS)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        tasks = [agent(client, key, doc_id, until, honest[name], latencies) for name, key in keys.items()]
        tasks += [agent(client, greedy, doc_id, until, greedy_statuses, []) for _ in range(GREEDY_CONCURRENCY)]
        await asyncio.gather(*tasks)
    return honest, greedy_statuses, latencies


def test_64_agents_hold_with_no_errors_but_deliberate_429s(kvmart_data_dir):
    ledger, publisher, keys = setup_ledger(kvmart_data_dir, AGENTS + 1)
    greedy = keys.pop(f"agent-{AGENTS}")
    node = Node(**LIMITS)
    try:
        doc_id = publish(node.url, publisher)
        began = time.perf_counter()
        honest, greedy_statuses, latencies = asyncio.run(run_load(node.url, keys, greedy, doc_id, LOAD_SECONDS))
        elapsed = time.perf_counter() - began
    finally:
        node.kill()
    total = sum((c for c in honest.values()), Counter())
    assert set(total) == {200}, f"honest agents saw errors: {dict(total)}"
    assert set(greedy_statuses) <= {200, 429} and greedy_statuses[429] > 0, dict(greedy_statuses)
    for name, statuses in honest.items():  # nothing lost, nothing charged twice
        assert ledger.usage(ledger.account(name)).requests == statuses[200]
    assert ledger.usage(ledger.account(f"agent-{AGENTS}")).requests == greedy_statuses[200]
    assert ledger.health().is_sound
    latencies.sort()
    print(f"\nload: {AGENTS} agents x {LOAD_SECONDS:.0f} s: {total[200]} answers ({total[200] / elapsed:.1f}/s), "
          f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f}"
          f" ms; greedy key: {greedy_statuses[200]} answered, {greedy_statuses[429]} deliberate 429s")
    ledger.close()


async def retrying_agent(url: str, key: str, doc_id: str, prefix: str, until: float, outcomes: dict) -> None:
    """Logical requests, each retried with its Idempotency-Key until answered (or refused with a 409 left by a
    hold of the killed node, see docs/SECURITY.md)."""
    n = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while time.monotonic() < until:
            n += 1
            idem = f"{prefix}-{n}"
            for _ in range(200):
                try:
                    response = await client.post("/v1/chat/completions", json=ask_body(doc_id, n),
                                                 headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem})
                except httpx.TransportError:
                    outcomes["transport_errors"] += 1
                    await asyncio.sleep(0.2)
                    continue
                if response.status_code in (429, 503):
                    await asyncio.sleep(0.2)
                    continue
                outcomes[response.status_code] += 1
                if response.status_code == 200:
                    outcomes.setdefault("answered", set()).add(idem)
                break


def test_a_node_killed_and_restarted_mid_load_loses_nothing(kvmart_data_dir):
    agents = 16
    ledger, publisher, keys = setup_ledger(kvmart_data_dir, agents)
    node = Node()
    port = node.port
    outcomes = {name: Counter() for name in keys}

    async def scenario() -> None:
        nonlocal node
        doc_id = await asyncio.to_thread(publish, node.url, publisher)
        until = time.monotonic() + 12
        clients = [asyncio.create_task(retrying_agent(node.url, key, doc_id, name, until, outcomes[name]))
                   for name, key in keys.items()]
        await asyncio.sleep(3)
        node.kill()  # mid-load: requests in flight die with it
        node = await asyncio.to_thread(Node, port)
        await asyncio.sleep(3)
        await asyncio.gather(*clients)

    try:
        asyncio.run(scenario())
    finally:
        node.kill()
    transport_errors = sum(o["transport_errors"] for o in outcomes.values())
    assert transport_errors > 0, "the kill was not felt: the test did not test anything"
    for name, o in outcomes.items():
        assert set(o) <= {"transport_errors", "answered", 200, 409}, dict(o)
        charged = ledger.usage(ledger.account(name)).requests
        assert charged == len(o.get("answered", ())), (name, charged, o)  # each answer charged once, none lost
    assert ledger.health().is_sound
    answered = sum(len(o.get("answered", ())) for o in outcomes.values())
    stuck = sum(o[409] for o in outcomes.values())
    print(f"\nfault: {agents} agents, 1 SIGKILL + restart: {answered} answers, {transport_errors} connection errors "
          f"retried, {stuck} keys held by the dead node (409), books balanced")
    ledger.close()


def test_redis_killed_and_restarted_mid_load_costs_no_request(kvmart_data_dir, tmp_path):
    from infra_support import RedisServer, wait_for

    agents = 16
    redis = RedisServer(tmp_path / "redis").start()
    try:  # Redis is stopped whatever happens next (the node too: conftest's sweep kills every Node)
        ledger, publisher, keys = setup_ledger(kvmart_data_dir, agents)
        node = Node(KVMART_STORE=f"{redis.url}?prefix=load", KVMART_RAM_CACHE_BYTES="0")  # every read: a store tier
    except BaseException:
        redis.stop()
        raise
    statuses = {name: Counter() for name in keys}

    def health() -> dict:
        return httpx.get(node.url + "/healthz", timeout=5).json()

    async def scenario() -> None:
        doc_id = await asyncio.to_thread(publish, node.url, publisher)
        until = time.monotonic() + 10
        limits = httpx.Limits(keepalive_expiry=KEEPALIVE_SECONDS)
        async with httpx.AsyncClient(base_url=node.url, timeout=60, limits=limits) as client:
            tasks = [asyncio.create_task(agent(client, key, doc_id, until, statuses[name], []))
                     for name, key in keys.items()]
            await asyncio.sleep(2)
            redis.process.kill()  # SIGKILL: no flush, connections reset mid-read
            redis.process.wait()
            await asyncio.to_thread(wait_for, lambda: health()["status"] == "degraded", "the node to degrade")
            await asyncio.sleep(2)
            await asyncio.to_thread(redis.start)
            await asyncio.to_thread(wait_for, lambda: health()["status"] == "ok", "the node to see Redis again")
            await asyncio.gather(*tasks)

    try:
        asyncio.run(scenario())
    finally:
        node.kill()
        redis.stop()
    total = sum((c for c in statuses.values()), Counter())
    assert set(total) == {200}, f"requests failed while Redis was down: {dict(total)}"
    for name, s in statuses.items():
        assert ledger.usage(ledger.account(name)).requests == s[200]
    assert ledger.health().is_sound
    print(f"\nredis fault: {agents} agents, Redis SIGKILLed and restarted: {total[200]} answers, no error")
    ledger.close()
