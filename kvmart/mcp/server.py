"""The MCP server of `kvmart mcp` (the official SDK's MCPServer), over the tools of tools.py, on stdio or streamable
HTTP. Whose money: over stdio, the API key it was started with (--api-key or KVMART_API_KEY); over HTTP, the key
the MCP client sends (`Authorization: Bearer KEY`, as it would to kvmart itself), else the one it was started
with. Either way the kvmart server meters the call to that key as any API call."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

from kvmart.mcp import tools
from kvmart.mcp.client import Api, ApiError

TRANSPORTS = ("stdio", "http")
INSTRUCTIONS = """kvmart hosts documents whose KV caches were computed once; asking about one reads its cache
instead of re-reading the text, at a fraction of the price. Find a document with search_documents, check its card
(tokens, licence, price, publisher) with document_card, then ask_documents with its id: the answer reports the
tokens read from cache and what the question cost, with a signed receipt. check_balance says what is left;
without funds a question is refused (HTTP 402) and nothing is charged: the operator of the kvmart server credits
an account (`kvmart accounts deposit NAME USD`, or POST /v1/accounts/NAME/deposits with the admin key)."""
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)


def sent_key(headers: Mapping[str, str] | None) -> str | None:
    """The key an HTTP request carries, as kvmart serve reads it: `Authorization: Bearer KEY` or `x-api-key`."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    auth = lower.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else lower.get("x-api-key", "").strip()
    return key or None


def caller_key(ctx: Context, default_key: str | None) -> str:
    """The API key to bill: the MCP client's own (HTTP transport), else the server's; ToolError if neither."""
    key = sent_key(ctx.headers) or default_key
    if not key:
        raise ToolError("no kvmart API key: start `kvmart mcp` with --api-key (or KVMART_API_KEY), or send "
                        "`Authorization: Bearer KEY` to its HTTP endpoint; `kvmart accounts create NAME --role agent` "
                        "makes one")
    return key


def build_server(base_url: str, default_key: str | None = None, model: str | None = None) -> MCPServer:
    """The MCP server for the kvmart server at `base_url`. `model`: the one to ask (default: the server's)."""

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[Api]:
        api = Api(base_url)
        try:
            yield api
        finally:
            await api.close()

    server: MCPServer = MCPServer("kvmart", instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING")

    async def call(ctx: Context, tool: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        api = cast(Api, ctx.request_context.lifespan_context)  # what `lifespan` yields
        try:
            return await tool(api, caller_key(ctx, default_key), *args, **kwargs)
        except ApiError as e:
            raise ToolError(str(e)) from e

    @server.tool(annotations=READ_ONLY, structured_output=True)
    async def search_documents(ctx: Context, query: str = "", limit: int = 20) -> dict[str, Any]:
        """Search the catalogue of hosted documents (title, source or id containing `query`; '' lists all, newest
        first). Each result has its id (doc_...), title, source and token count."""
        return await call(ctx, tools.search, query, limit)

    @server.tool(annotations=READ_ONLY, structured_output=True)
    async def document_card(ctx: Context, document: str) -> dict[str, Any]:
        """A document's card: tokens, artifact bytes, licence (public, priced, private), price (per 1M cached tokens
        and for reading it whole once), publisher."""
        return await call(ctx, tools.card, document)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                             open_world_hint=False), structured_output=True)
    async def ask_documents(ctx: Context, question: str, documents: list[str], max_tokens: int = 256,
                            temperature: float = 0.0) -> dict[str, Any]:
        """Ask a question about one or more documents (ids from search_documents). Served from their hosted KV
        caches and charged to your key: the answer, the tokens read from cache vs computed, and the charge with its
        signed receipt."""
        return await call(ctx, tools.ask, model, question, documents, max_tokens, temperature)

    @server.tool(annotations=READ_ONLY, structured_output=True)
    async def check_balance(ctx: Context) -> dict[str, Any]:
        """Your account: balance, money held for questions in flight, what you spent and saved against
        re-prefilling, royalties earned (publishers)."""
        return await call(ctx, tools.balance)

    @server.tool(annotations=READ_ONLY, structured_output=True)
    async def list_receipts(ctx: Context, limit: int = 10) -> dict[str, Any]:
        """Your latest charges, newest first, each with the signed receipt the ledger issued."""
        return await call(ctx, tools.receipts, limit)

    @server.tool(annotations=READ_ONLY, structured_output=True)
    async def verify_receipt(ctx: Context, receipt: dict) -> dict[str, Any]:
        """Whether a receipt (from ask_documents or list_receipts) is one the server's ledger signed, unchanged."""
        return await call(ctx, tools.verify_receipt, receipt)

    return server


def run(server: MCPServer, transport: str, host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve until stopped: stdio (one client, the process that started this one) or streamable HTTP at
    http://HOST:PORT/mcp."""
    if transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host=host, port=port)
