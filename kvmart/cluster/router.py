"""`kvmart route`: a small cache-affinity router in front of several `kvmart serve` nodes.

Requests about the same document go to the same node first, so its RAM and disk tiers stay hot; if that node
cannot be reached (or answers 503), the next node in the document's order takes it: every node can serve every
document from the shared tier. The order is rendezvous (highest-random-weight) hashing: each node scores
sha256(key + node) and nodes are tried best first, so adding or removing a node only moves the documents that
scored it highest (consistent hashing without a ring).

The affinity key: the client's `x-kvmart-document` header when it sends one (AFFINITY_HEADER: what a proxy such as
nginx hashes without reading the body, kvmart/cluster/nginx.py); else the first of the body's `documents`; else
OpenAI's `prompt_cache_key` (the client's own name for requests that share a prefix: they meet on one node, whose
RAM tier then holds it); for a publish, the text (the same text lands on the same node, so two publishes of it race
on one node, not two); the id in /v1/documents/{id}; otherwise none (requests are spread round-robin). The nginx
setup is in docs/SCALE.md."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("kvmart.cluster.router")
HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}
RETRY_STATUSES = {502, 503, 504}
AFFINITY_HEADER = "x-kvmart-document"  # a request's affinity key, set by the client (see the module docstring)


def node_order(key: str | None, nodes: list[str], spread: int = 0) -> list[str]:
    """Nodes in the order to try for `key`: rendezvous hashing; without a key, rotated by `spread`."""
    if key is None:
        k = spread % len(nodes)
        return nodes[k:] + nodes[:k]
    return sorted(nodes, key=lambda n: hashlib.sha256(f"{key}\0{n}".encode()).digest(), reverse=True)


def affinity_key(method: str, path: str, body: bytes) -> str | None:
    """What pins a request to a node (see the module docstring); None for anything else."""
    if path.startswith("/v1/documents/"):
        return path.removeprefix("/v1/documents/")
    if method != "POST" or not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if path == "/v1/documents" and isinstance(data.get("text"), str):
        return "text:" + hashlib.sha256(data["text"].encode()).hexdigest()
    documents = data.get("documents")
    if isinstance(documents, list) and documents and isinstance(documents[0], str):
        return documents[0]
    hint = data.get("prompt_cache_key")
    if isinstance(hint, str) and hint:
        return "prompt_cache_key:" + hint  # never equal to a document id: the two keys' orders stay apart
    return None


def create_router(nodes: list[str], timeout_seconds: float = 600.0) -> Starlette:
    """The router app over `nodes` (base URLs such as http://10.0.0.1:8000)."""
    if not nodes:
        raise ValueError("the router needs at least one node")
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_seconds, connect=2.0))
    counter = itertools.count()

    async def forward(request: Request):
        body = await request.body()
        key = request.headers.get(AFFINITY_HEADER) or affinity_key(request.method, request.url.path, body)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        last_error = "no node answered"
        order = node_order(key, nodes, next(counter))
        for node in order:
            url = node.rstrip("/") + request.url.path + (f"?{request.url.query}" if request.url.query else "")
            try:
                upstream = await client.send(client.build_request(request.method, url, content=body,
                                                                  headers=headers), stream=True)
            except httpx.TransportError as e:
                last_error = f"{node}: {type(e).__name__}"
                log.warning("node %s unreachable (%s); trying the next", node, e)
                continue
            if upstream.status_code in RETRY_STATUSES and node != order[-1]:
                await upstream.aclose()
                last_error = f"{node}: HTTP {upstream.status_code}"
                continue
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            out_headers["x-kvmart-node"] = node
            return StreamingResponse(_relay(upstream), status_code=upstream.status_code, headers=out_headers,
                                     background=BackgroundTask(upstream.aclose))
        return JSONResponse({"error": {"type": "server_error", "message": f"no kvmart node available ({last_error})"}},
                            status_code=503)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await client.aclose()

    methods = ["GET", "POST", "DELETE", "PUT", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    async for chunk in upstream.aiter_raw():
        yield chunk
