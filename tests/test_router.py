"""The router's placement: rendezvous hashing (deterministic, balanced, minimal movement when a node goes) and the
affinity key of each kind of request. Proxying through real nodes is in tests/test_multinode.py."""

from __future__ import annotations

import json
from collections import Counter

from kvmart.cluster.router import affinity_key, node_order

NODES = [f"http://10.0.0.{i}:8000" for i in range(1, 5)]


def test_order_is_deterministic_and_complete():
    assert node_order("doc_abc", NODES) == node_order("doc_abc", list(reversed(NODES)))
    assert sorted(node_order("doc_abc", NODES)) == sorted(NODES)


def test_documents_spread_over_nodes():
    homes = Counter(node_order(f"doc_{i}", NODES)[0] for i in range(2000))
    assert set(homes) == set(NODES) and all(300 < n < 700 for n in homes.values())  # ~500 each


def test_removing_a_node_moves_only_its_documents():
    gone = NODES[2]
    for i in range(500):
        before = node_order(f"doc_{i}", NODES)
        after = node_order(f"doc_{i}", [n for n in NODES if n != gone])
        assert after == [n for n in before if n != gone]  # the fallback order is the same order


def test_no_key_rotates():
    assert [node_order(None, NODES, k)[0] for k in range(5)] == NODES + NODES[:1]


def test_affinity_keys():
    chat = json.dumps({"messages": [], "documents": ["doc_1", "doc_2"]}).encode()
    assert affinity_key("POST", "/v1/chat/completions", chat) == "doc_1"
    assert affinity_key("POST", "/v1/messages", chat) == "doc_1"
    assert affinity_key("GET", "/v1/documents/doc_9", b"") == "doc_9"
    publish = affinity_key("POST", "/v1/documents", json.dumps({"text": "hello"}).encode())
    assert publish == affinity_key("POST", "/v1/documents", json.dumps({"text": "hello", "title": "t"}).encode())
    assert publish != affinity_key("POST", "/v1/documents", json.dumps({"text": "other"}).encode())
    for body in (b"", b"not json", b"[1, 2]", json.dumps({"documents": []}).encode(),
                 json.dumps({"documents": [3]}).encode()):
        assert affinity_key("POST", "/v1/chat/completions", body) is None
