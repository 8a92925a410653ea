"""Two real `kvmart serve` nodes (subprocesses, own data dirs and ports) sharing a real Redis server started by
the test: a document published on node A is served from cache on node B without a prefill; both nodes give the
same tokens; Redis going down degrades the nodes (they keep serving) and its restart loses nothing; two nodes
publishing the same document at once store it once; the router keeps a document on one node and fails over."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
from infra_support import KvmartNode, RedisServer, wait_for

from kvmart.cluster.router import create_router
from kvmart.ledger import open_ledger
from kvmart.reuse import core
from kvmart.reuse.samples import sample_text
from kvmart.store import open_shared
from kvmart.store.disk import DiskStore

QUESTION = "Who may change the terms?"
PREFIX = "nodes"


ADMIN_KEY = "kvm_multinode_admin_key_for_tests"


@pytest.fixture(scope="module")
def shared_ledger_url(postgres) -> str:
    """One PostgreSQL database (conftest's server) that every node of the cluster charges into."""
    return postgres.new_database()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, session_dir: Path, tiny_folder: Path, shared_ledger_url: str):
    """Redis (the shared tier), one PostgreSQL ledger, two nodes over both."""
    root = tmp_path_factory.mktemp("cluster")
    redis = RedisServer(root / "redis").start()
    url = f"{redis.url}?prefix={PREFIX}"
    shared = {"ledger_url": shared_ledger_url, "admin_key": ADMIN_KEY}
    nodes = [KvmartNode("a", root, session_dir / "models", url, **shared),
             KvmartNode("b", root, session_dir / "models", url, "--ram-cache-bytes", "0", **shared)]  # B: every read hits a store tier
    failures: list[BaseException] = []

    def start(node: KvmartNode) -> None:
        try:
            node.start()
        except BaseException as e:  # a thread's error is the fixture's: raised below, after everything is stopped
            failures.append(e)

    try:
        threads = [threading.Thread(target=start, args=(n,)) for n in nodes]  # the two load torch side by side
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]
        yield redis, nodes[0], nodes[1]
    finally:  # whatever happened, nothing this fixture started is left running
        for n in nodes:
            n.stop()
        redis.stop()


def document(n: int) -> str:
    return f"Document {n}.\n" + sample_text("mpl-2.0")[: 1500 + 100 * n]


def publish(node: KvmartNode, text: str) -> dict:
    response = node.publish(text)
    assert response.status_code in (200, 201), response.text
    return response.json()


def cached_tokens(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def tier(node: KvmartNode, name: str) -> dict:
    return next(t for t in node.health()["store"]["tiers"] if t["name"] == name)


def test_published_on_a_served_from_cache_on_b(cluster):
    redis, a, b = cluster
    doc = publish(a, document(1))
    assert doc["computed"] is True
    on_a, on_b = a.ask(doc["id"], QUESTION), b.ask(doc["id"], QUESTION)
    assert cached_tokens(on_b) == doc["num_tokens"] == cached_tokens(on_a)  # B reused it: no prefill
    assert on_b["choices"][0]["message"]["content"] == on_a["choices"][0]["message"]["content"]
    assert tier(b, "redis")["hits"] >= 1 and tier(b, "disk")["fills"] >= 1  # fetched once, now on B's disk
    assert b.health()["status"] == "ok"
    stored = redis.client().keys(f"{PREFIX}:index:*")
    assert f"{PREFIX}:index:{doc['cache_id']}".encode() in stored


def test_two_nodes_publishing_at_once_store_once(cluster):
    redis, a, b = cluster
    text, results = document(2), []
    threads = [threading.Thread(target=lambda n=n: results.append(publish(n, text))) for n in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0]["id"] == results[1]["id"]
    cache_id = results[0]["cache_id"]
    index_keys = redis.client().keys(f"{PREFIX}:index:{cache_id}")
    nonces = {k.split(b":")[3] for k in redis.client().keys(f"{PREFIX}:chunk:{cache_id}:*")}
    assert len(index_keys) == 1 and len(nonces) == 1  # one published copy; a losing writer removed its chunks


def test_redis_down_nodes_keep_serving_and_recover_after_restart(cluster):
    redis, a, b = cluster
    kept = publish(a, document(3))
    b.ask(kept["id"], QUESTION)  # now on B's disk too
    redis.stop()
    wait_for(lambda: a.health()["status"] == "degraded", "node A to report degraded")
    assert cached_tokens(b.ask(kept["id"], QUESTION)) == kept["num_tokens"]  # from B's local disk
    during = publish(a, document(4))  # prefilled and stored locally while Redis is down
    assert during["computed"] is True and a.health()["store"]["pending_pushes"] >= 1
    redis.start()  # same port, same data directory: the append-only file is replayed
    wait_for(lambda: a.health()["status"] == "ok", "node A to see Redis again")
    wait_for(lambda: b.health()["status"] == "ok", "node B to see Redis again")
    shared = open_shared(f"{redis.url}?prefix={PREFIX}")
    ids = {e.cache_id for e in shared.entries()}
    assert kept["cache_id"] in ids  # survived the restart
    assert during["cache_id"] in ids  # pushed by A once Redis came back
    assert cached_tokens(b.ask(during["id"], QUESTION)) == during["num_tokens"]  # B: from Redis, no prefill


def test_a_chunk_lost_from_redis_is_recomputed_not_served_partially(cluster):
    """B knows the document but holds no copy of its last chunk (its RAM tier is off, its disk copy was evicted) and
    the shared copy is gone too: B computes that chunk again (the same KV), answers exactly as A does, and stores
    it back."""
    redis, a, b = cluster
    doc = publish(a, document(5))
    b.ask(doc["id"], QUESTION)
    shared = open_shared(f"{redis.url}?prefix={PREFIX}")
    last = core.chunk_keys_of(shared, doc["cache_id"])[-1]
    DiskStore(b.data_dir / "store").delete(last)
    shared.delete(last)
    recomputed = b.ask(doc["id"], QUESTION)
    assert 0 < cached_tokens(recomputed) < doc["num_tokens"]  # every chunk but the lost one read
    same = a.ask(doc["id"], QUESTION)
    assert recomputed["choices"][0]["message"]["content"] == same["choices"][0]["message"]["content"]
    wait_for(lambda: shared.entry(last) is not None, "node B to store the chunk back")
    assert cached_tokens(b.ask(doc["id"], QUESTION)) == doc["num_tokens"]  # stored back


def test_one_ledger_across_nodes_charges_each_read_once(cluster, shared_ledger_url: str, tmp_path: Path):
    """An agent reads a document published on A from both nodes: the shared PostgreSQL ledger holds both charges,
    the publisher's royalties and the agent's balance agree, and the ledger balances."""
    from decimal import Decimal

    redis, a, b = cluster
    ledger = open_ledger(shared_ledger_url, tmp_path, environ={"KVMART_ADMIN_KEY": ADMIN_KEY})
    _, publisher_key = ledger.create_account("multinode-publisher", "publisher")
    _, agent_key = ledger.create_account("multinode-agent", "agent")
    ledger.deposit("multinode-agent", Decimal("5"))
    ledger.deposit("multinode-publisher", Decimal("1"))
    # a verified owner is paid its royalties at once (an unverified one's wait in escrow: docs/LEDGER.md)
    ledger.mark_claim_verified(ledger.new_claim(ledger.account("multinode-publisher"), "https://multinode.example/"))
    response = a.http.post("/v1/documents", json={"text": document(7), "source": "https://multinode.example/d"},
                           headers={"Authorization": f"Bearer {publisher_key}"})
    assert response.status_code in (200, 201), response.text
    doc = response.json()
    answers = [node.ask(doc["id"], QUESTION, key=agent_key) for node in (a, b, b)]
    assert [cached_tokens(x) for x in answers] == [doc["num_tokens"]] * 3
    charges = [x["usage"]["kvmart"]["charge"] for x in answers]
    charged = [round(Decimal(c["usd"]) * 10**9) for c in charges]
    agent = ledger.usage(ledger.account("multinode-agent"))
    assert agent.requests == 3 and agent.spent_nanousd == sum(charged) > 0
    assert agent.balance_nanousd == 5 * 10**9 - sum(charged)
    assert ledger.usage(ledger.account("multinode-publisher")).royalties_nanousd == sum(
        round(Decimal(c["royalty_usd"]) * 10**9) for c in charges) > 0
    assert len({c["receipt"]["receipt"] for c in charges}) == 3 and all(ledger.verify_receipt(c["receipt"]) for c in charges)
    assert ledger.health().is_sound


def test_the_router_keeps_a_document_on_one_node_and_fails_over(cluster):
    redis, a, b = cluster
    doc = publish(a, document(6))
    app = create_router([a.url, b.url])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the router to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    body = {"model": "builtin:tiny", "messages": [{"role": "user", "content": QUESTION}], "documents": [doc["id"]],
            "temperature": 0, "max_tokens": 4}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=a._auth(None)) as client:
        chosen = {client.post("/v1/chat/completions", json=body).headers["x-kvmart-node"] for _ in range(3)}
        assert len(chosen) == 1  # affinity: the same node every time
        other = a if chosen == {b.url} else b
        home = b if other is a else a
        home.process.kill()  # the home node is gone
        home.process.wait()
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200 and response.headers["x-kvmart-node"] == other.url
        assert cached_tokens(response.json()) == doc["num_tokens"]
    server.should_exit = True
    thread.join(30)

