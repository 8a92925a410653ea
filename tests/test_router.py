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


def test_prompt_cache_key_pins_requests_that_name_no_document():
    def key(body: dict, path: str = "/v1/responses") -> str | None:
        return affinity_key("POST", path, json.dumps(body).encode())

    same = key({"input": "first question", "prompt_cache_key": "team-handbook"})
    assert same is not None
    assert same == key({"messages": [], "prompt_cache_key": "team-handbook"}, "/v1/chat/completions")
    assert node_order(same, NODES) == node_order(key({"input": "another", "prompt_cache_key": "team-handbook"}),
                                                 NODES)
    assert same != key({"input": "x", "prompt_cache_key": "other-team"})
    # a named document wins: the node that holds its KV is the one to ask
    assert key({"documents": ["doc_1"], "prompt_cache_key": "team-handbook"}) == "doc_1"
    # a hint spelled like a document id does not land on that document's node by accident
    assert key({"prompt_cache_key": "doc_1"}) != "doc_1"
    for hint in ("", 7, None, ["a"]):
        assert key({"input": "x", "prompt_cache_key": hint}) is None
def test_the_affinity_header_wins_over_the_body():
    """A client's x-kvmart-document header is the key kvmart route hashes (as nginx does): two real upstreams, and
    every request goes to the header's first node, whatever its body names."""
    import threading

    import httpx
    import uvicorn
    from infra_support import wait_for
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from kvmart.cluster.router import AFFINITY_HEADER, create_router

    def serve(app) -> tuple[uvicorn.Server, str]:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        wait_for(lambda: server.started, "a test server to start")
        return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    def upstream(name: str) -> Starlette:
        async def answer(request):
            return JSONResponse({"node": name})

        return Starlette(routes=[Route("/{path:path}", answer, methods=["POST"])])

    (a, url_a), (b, url_b) = serve(upstream("a")), serve(upstream("b"))
    router, router_url = serve(create_router([url_a, url_b]))
    try:
        with httpx.Client(base_url=router_url, timeout=30) as client:
            for i in range(12):
                key, named = f"key-{i}", f"doc_{i % 3}"
                response = client.post("/v1/chat/completions", json={"documents": [named]},
                                       headers={AFFINITY_HEADER: key})
                assert response.headers["x-kvmart-node"] == node_order(key, [url_a, url_b])[0]
            without = client.post("/v1/chat/completions", json={"documents": ["doc_1"]})
            assert without.headers["x-kvmart-node"] == node_order("doc_1", [url_a, url_b])[0]  # the body's key
    finally:
        for server in (a, b, router):
            server.should_exit = True


def test_the_nginx_configuration_in_docs_is_the_one_generated_and_tested():
    """docs/SCALE.md shows `nginx_config` for three nodes verbatim; tests/test_cdn_validation.py runs it."""
    from pathlib import Path

    from kvmart.cluster.nginx import nginx_config

    doc = (Path(__file__).parents[1] / "docs" / "SCALE.md").read_text()
    generated = nginx_config([f"http://10.0.0.{i}:8000" for i in (1, 2, 3)], "80")
    assert f"```nginx\n{generated}```" in doc
