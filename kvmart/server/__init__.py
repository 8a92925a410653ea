"""`kvmart serve`'s HTTP API: provider-side hosting of KV caches behind OpenAI- and Anthropic-compatible HTTP APIs
(docs/SERVER.md). Agents send questions; the document's KV never leaves the provider.

    api/        the HTTP faces: OpenAI, Anthropic, documents, accounts and usage
    pipeline/   one request's way: plan, hold, load, generate, settle (engine, worker, runs, billing, hot tier)
    app.py      the API app (kvmart/app.py composes it with the web page)"""

from kvmart.server.config import ServerSettings, load_server_settings

__all__ = ["ServerSettings", "load_server_settings"]
