"""`kvmart mcp` (kvmart/mcp/), through the MCP SDK's own client against a live `kvmart serve` on loopback: the real
command on stdio (key from KVMART_API_KEY) and on streamable HTTP (each client's own bearer key). Every question is
metered to the caller's key: the balance moves by exactly the charge the tool reports."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from decimal import Decimal

import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from server_support import DEADLINE_SECONDS, LiveServer, wait_until

from kvmart.reuse.samples import sample_text

MODEL = "builtin:tiny"
QUESTION = "Who holds the copyright?"
COMMAND = [sys.executable, "-c", "from kvmart.cli.main import main; main()", "mcp"]
TOOLS = {"search_documents", "document_card", "ask_documents", "check_balance", "list_receipts", "verify_receipt"}


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("serve-mcp")) as server:
        yield server


@pytest.fixture(scope="module")
def doc(live) -> dict:
    response = live.publish(sample_text("bsd-3-clause"), title="BSD licence", source="bsd.txt", licence="priced",
                            cache_read_usd_per_mtok="0.25")
    assert response.status_code == 201, response.text
    return response.json()


def stdio_client(live, key: str | None) -> Client:
    env = {**os.environ, "KVMART_URL": live.url}
    env.pop("KVMART_API_KEY", None)
    if key:
        env["KVMART_API_KEY"] = key
    return Client(StdioServerParameters(command=COMMAND[0], args=COMMAND[1:], env=env),
                  read_timeout_seconds=DEADLINE_SECONDS)


async def call(client: Client, tool: str, **arguments) -> dict:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content == json.loads(result.content[0].text)  # the same object, both ways
    return result.structured_content


async def error_of(client: Client, tool: str, **arguments) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    return result.content[0].text


def balance_usd(live, key: str) -> Decimal:
    return Decimal(live.http.get("/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()["balance_usd"])


def test_stdio_tools_find_read_ask_and_account_for_a_document(live, doc):
    key = live.account("mcp-agent", "agent", usd="5")

    async def session() -> None:
        async with stdio_client(live, key) as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            assert "search_documents" in (client.instructions or "")
            found = await call(client, "search_documents", query="bsd")
            assert [d["id"] for d in found["documents"]] == [doc["id"]]
            assert (await call(client, "search_documents", query="no such title"))["documents"] == []

            card = await call(client, "document_card", document=doc["id"])
            assert (card["num_tokens"], card["publisher"], card["licence"]["kind"]) == (doc["num_tokens"],
                                                                                        "publisher", "priced")
            assert card["price"]["cache_read_usd_per_mtok"] == "0.25"
            assert Decimal(card["price"]["read_once_usd"]) == Decimal("0.25") * doc["num_tokens"] / 1_000_000

            before = balance_usd(live, key)
            answer = await call(client, "ask_documents", question=QUESTION, documents=[doc["id"]], max_tokens=12)
            assert answer["usage"]["cached_tokens"] == doc["num_tokens"] and answer["model"] == MODEL
            charged = Decimal(answer["charge"]["usd"])
            assert charged > 0 and balance_usd(live, key) == before - charged  # metered to this key, exactly
            direct = live.http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12,
                "temperature": 0, "documents": [doc["id"]]}).json()
            assert answer["answer"] == direct["choices"][0]["message"]["content"]

            account = await call(client, "check_balance")
            assert (account["account"], Decimal(account["balance_usd"])) == ("mcp-agent", before - charged)
            receipts = (await call(client, "list_receipts", limit=5))["receipts"]
            assert receipts[0]["receipt"] == answer["charge"]["receipt"]
            assert (await call(client, "verify_receipt", receipt=answer["charge"]["receipt"]))["valid"] is True
            forged = {**answer["charge"]["receipt"], "account": "someone-else"}
            assert (await call(client, "verify_receipt", receipt=forged))["valid"] is False

    asyncio.run(session())


def test_stdio_errors_come_back_as_tool_errors_with_the_servers_message(live, doc):
    broke = live.account("mcp-broke", "agent", usd="0")

    async def session() -> None:
        async with stdio_client(live, broke) as client:
            unknown = await error_of(client, "document_card", document="doc_" + "0" * 24)
            assert "HTTP 404" in unknown and "not found" in unknown
            refused = await error_of(client, "ask_documents", question=QUESTION, documents=[doc["id"]])
            assert "HTTP 402" in refused
        async with stdio_client(live, None) as client:
            assert "no kvmart API key" in await error_of(client, "check_balance")

    asyncio.run(session())
    assert balance_usd(live, broke) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_http_transport_bills_each_client_its_own_key(live, doc):
    port = free_port()
    process = subprocess.Popen([*COMMAND, "--transport", "http", "--port", str(port), "--url", live.url],
                               env={k: v for k, v in os.environ.items() if k != "KVMART_API_KEY"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first, second = live.account("mcp-http-1", "agent"), live.account("mcp-http-2", "agent")

    def client(key: str | None) -> Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        http = httpx2.AsyncClient(headers=headers, timeout=DEADLINE_SECONDS)
        return Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http))

    async def session() -> None:
        async with client(first) as a, client(second) as b:
            assert (await call(a, "check_balance"))["account"] == "mcp-http-1"
            assert (await call(b, "check_balance"))["account"] == "mcp-http-2"
            before = balance_usd(live, second)
            answer = await call(b, "ask_documents", question=QUESTION, documents=[doc["id"]], max_tokens=4)
            assert balance_usd(live, second) == before - Decimal(answer["charge"]["usd"])
        async with client(None) as anonymous:
            assert "no kvmart API key" in await error_of(anonymous, "search_documents")

    try:
        wait_until(lambda: is_listening(port) or process.poll() is not None, "kvmart mcp to listen")
        assert process.poll() is None, process.communicate()
        asyncio.run(session())
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=DEADLINE_SECONDS)
    assert f"http://127.0.0.1:{port}/mcp" in stderr


def test_http_transport_refuses_a_port_in_use(live):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*COMMAND, "--transport", "http", "--port", str(port), "--url", live.url],
                              capture_output=True, text=True, timeout=DEADLINE_SECONDS)
    assert done.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in done.stderr


def test_an_unreachable_server_is_a_clear_tool_error(live):
    async def session() -> None:
        env = {**os.environ, "KVMART_URL": f"http://127.0.0.1:{free_port()}", "KVMART_API_KEY": "kvm_x"}
        params = StdioServerParameters(command=COMMAND[0], args=COMMAND[1:], env=env)
        async with Client(params, read_timeout_seconds=DEADLINE_SECONDS) as client:
            assert "cannot reach the kvmart server" in await error_of(client, "check_balance")

    asyncio.run(session())
    assert httpx.get(live.url + "/healthz").status_code == 200
