"""The MCP tools, as plain async functions over the HTTP API (`Api`) and the caller's key: what each sends and the
result it gives back (JSON objects; money as exact decimal strings, as the API writes it). server.py registers
them with their descriptions; nothing here knows MCP."""

from __future__ import annotations

from kvmart.mcp.client import Api

MAX_RESULTS = 100  # the API's largest page of GET /v1/documents


def _listing(doc: dict) -> dict:
    return {k: doc.get(k) for k in ("id", "title", "source", "num_tokens", "model", "created_at")}


async def search(api: Api, key: str, query: str = "", limit: int = 20) -> dict:
    """The documents the key may read whose title, source or id contains `query` (all of them for ''), newest
    first, at most `limit`: the server searches (GET /v1/documents?q=), one page."""
    limit = max(1, min(limit, MAX_RESULTS))
    params: dict[str, str | int] = {"limit": limit}
    if query:
        params["q"] = query
    page = await api.call(key, "GET", "/v1/documents", params=params)
    return {"query": query, "documents": [_listing(d) for d in page["data"]], "more": page["has_more"]}


async def card(api: Api, key: str, document: str) -> dict:
    """A document's card: tokens, artifact size, licence, price, publisher, who is paid for reads."""
    doc = await api.call(key, "GET", f"/v1/documents/{document}")
    return {k: doc.get(k) for k in ("id", "title", "source", "model", "num_tokens", "artifact_bytes",
                                    "prefill_seconds", "created_at", "licence", "publisher", "price", "ownership")}


async def ask(api: Api, key: str, model: str | None, question: str, documents: list[str], max_tokens: int = 256,
              temperature: float = 0.0) -> dict:
    """Ask `question` about `documents` (read from their hosted caches, charged to the key): the answer, the
    tokens read from cache vs computed, and the charge with its signed receipt."""
    served = model or (await api.call(key, "GET", "/v1/models"))["data"][0]["id"]
    body = {"model": served, "messages": [{"role": "user", "content": question}], "documents": documents,
            "max_tokens": max_tokens, "temperature": temperature}
    reply = await api.call(key, "POST", "/v1/chat/completions", json=body)
    usage, choice = reply["usage"], reply["choices"][0]
    kv = usage["kvmart"]
    return {"answer": choice["message"]["content"], "finish_reason": choice["finish_reason"], "model": served,
            "usage": {"prompt_tokens": usage["prompt_tokens"], "cached_tokens": kv["cached_tokens"],
                      "computed_tokens": kv["computed_tokens"], "output_tokens": usage["completion_tokens"],
                      "cache": kv["cache"], "prefill_seconds_saved": kv["prefill_seconds_saved"]},
            "charge": kv["charge"]}


async def balance(api: Api, key: str) -> dict:
    """The key's account: balance, money held for requests in flight, spending, savings, royalties."""
    u = await api.call(key, "GET", "/v1/usage", params={"limit": 0})
    return {k: u[k] for k in ("account", "role", "balance_usd", "held_usd", "requests", "tokens", "spent_usd",
                              "saved_vs_prefill_usd", "royalties_usd")}


async def receipts(api: Api, key: str, limit: int = 10) -> dict:
    """The key's latest `limit` charges, newest first, each with its signed receipt."""
    u = await api.call(key, "GET", "/v1/usage", params={"limit": max(0, min(limit, MAX_RESULTS))})
    return {"account": u["account"], "receipts": u["charges"]}


async def verify_receipt(api: Api, key: str, receipt: dict) -> dict:
    """Whether `receipt` is one the server's ledger signed, unchanged."""
    return {"valid": (await api.call(key, "POST", "/v1/receipts/verify", json=receipt))["valid"]}
