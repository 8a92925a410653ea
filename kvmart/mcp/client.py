"""A small async client of a kvmart server's HTTP API, for the MCP tools. It sends the caller's API key with every
request and turns an error answer into `ApiError` carrying the server's own message and status (the server's
messages already say what to do: publish the document, deposit funds, wait for the rate limit)."""

from __future__ import annotations

from typing import Any

import httpx

from kvmart.errors import KvmartError

TIMEOUT_SECONDS = 600.0  # a question queued behind others on a busy node may take minutes; the connect is quick
USER_AGENT = "kvmart-mcp"


class ApiError(KvmartError):
    """The kvmart server refused or failed a request (`status`, its message), or could not be reached (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message if not status else f"HTTP {status}: {message}")
        self.status = status


class Api:
    """One kvmart server. Thread-safe as httpx.AsyncClient is; `close()` when done."""

    def __init__(self, base_url: str, timeout_seconds: float = TIMEOUT_SECONDS) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.base_url, headers={"user-agent": USER_AGENT},
                                      timeout=httpx.Timeout(timeout_seconds, connect=10.0))

    async def close(self) -> None:
        await self.http.aclose()

    async def call(self, key: str, method: str, path: str, **kwargs: Any) -> dict:
        """The JSON answer of `method path` sent with `key`; ApiError for an error status or no answer."""
        try:
            response = await self.http.request(method, path, headers={"authorization": f"Bearer {key}"}, **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(0, f"cannot reach the kvmart server at {self.base_url} ({type(e).__name__}: {e}); "
                              "is `kvmart serve` running there? (--url or KVMART_URL)") from e
        if response.status_code >= 400:
            raise ApiError(response.status_code, error_message(response))
        return response.json()


def error_message(response: httpx.Response) -> str:
    """The message of an OpenAI- or Anthropic-style error body, else the body's text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return response.text.strip()
