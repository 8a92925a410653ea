"""`kvmart serve`: provider-side hosting of KV caches behind OpenAI- and Anthropic-compatible HTTP APIs
(docs/SERVER.md). Agents send questions; the document's KV never leaves the provider."""

from .app import create_app, serve
from .config import ServerSettings, load_server_settings

__all__ = ["create_app", "serve", "ServerSettings", "load_server_settings"]
