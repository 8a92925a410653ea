"""The ledger behind the HTTP APIs (kvmart/server/auth.py, billing.py, money.py, documents.py): keys (401),
charges in `usage` and GET /v1/usage, 402, idempotent retries, receipts, private documents (404 to other tenants,
their own cache ids, never matched for anyone else), bad prices (400), admin endpoints."""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal

import anthropic
import httpx
import pytest
from server_support import DEADLINE_SECONDS, LiveServer

from kvmart.ledger import Tariff, quote, usd_text
from kvmart.reuse.samples import sample_text

MODEL = "builtin:tiny"
BSD = sample_text("bsd-3-clause")


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("serve-ledger")) as server:
        yield server


def auth(key: str, **extra: str) -> dict:
    return {"Authorization": f"Bearer {key}", **extra}


def chat(documents=(), content: str = "Who holds the copyright?", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            "temperature": 0, "documents": list(documents), **fields}


def usage_of(live, key: str) -> dict:
    response = live.http.get("/v1/usage", headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()


def test_every_api_call_authenticates(live):
    plain = httpx.Client(base_url=live.url, timeout=30)
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/documents"), ("GET", "/v1/documents"),
                         ("GET", "/v1/models"), ("GET", "/v1/usage"), ("POST", "/v1/completions")):
        for headers in ({}, auth("kvm_not-a-key"), {"x-api-key": "wrong"}):
            response = plain.request(method, path, headers=headers, json=chat())
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
    refused = plain.post("/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": []})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert plain.get("/healthz").status_code == 200  # health checks and metrics stay open
    key = live.account("short-lived", "agent")
    assert plain.get("/v1/models", headers=auth(key)).status_code == 200
    live.services.ledger.revoke_keys("short-lived")
    assert "revoked" in plain.get("/v1/models", headers=auth(key)).json()["error"]["message"]


def test_a_read_is_charged_in_usage_and_reported(live):
    pub = live.account("pub-read", "publisher")
    reader = live.account("reader", "agent", usd="1")
    live.verify_owner("pub-read", "https://pub-read.example/")  # a verified owner is paid its royalties at once
    text = "Charged notes.\n\n" + BSD
    published = live.publish(text, key=pub, source="https://pub-read.example/notes.txt").json()
    assert Decimal(published["precompute_charge_usd"]) == Decimal(published["num_tokens"]) / 10**6
    response = live.http.post("/v1/chat/completions", headers=auth(reader), json=chat([published["id"]]))
    usage = response.json()["usage"]
    cached, kv = usage["prompt_tokens_details"]["cached_tokens"], usage["kvmart"]
    assert cached == published["num_tokens"] == kv["tokens"]["cached"]
    expected = quote(Tariff(), cached, usage["prompt_tokens"] - cached, usage["completion_tokens"], True)
    charge = kv["charge"]
    assert charge["usd"] == usd_text(expected.total_nanousd) and charge["royalty_usd"] == usd_text(
        expected.royalty_nanousd)
    assert charge["saved_vs_prefill_usd"] == usd_text(expected.saved_nanousd) and expected.royalty_nanousd > 0
    assert Decimal(charge["provider_usd"]) + Decimal(charge["royalty_usd"]) == Decimal(charge["usd"])
    mine = usage_of(live, reader)
    assert mine["requests"] == 1 and mine["spent_usd"] == charge["usd"]
    [listed] = mine["charges"]  # the per-request charge, with its receipt
    assert listed["usd"] == charge["usd"] and listed["receipt"] == charge["receipt"]
    assert mine["tariff"]["cache_read_fraction"] == "0.1"
    assert Decimal(mine["balance_usd"]) == 1 - Decimal(charge["usd"])
    earned = usage_of(live, pub)
    assert earned["royalties_usd"] == charge["royalty_usd"]
    [doc] = earned["documents"]
    assert doc["reads"] == 1 and doc["document"] == published["id"]
    assert Decimal(earned["balance_usd"]) == 100 - Decimal(published["precompute_charge_usd"]) + Decimal(
        charge["royalty_usd"])
    receipt = charge["receipt"]
    assert live.http.post("/v1/receipts/verify", json=receipt).json()["valid"] is True
    forged = {**receipt, "nanousd": {**receipt["nanousd"], "total": 1}}
    assert live.http.post("/v1/receipts/verify", json=forged).json()["valid"] is False
    assert live.services.ledger.health().is_sound


def test_anthropic_and_streaming_usage_carry_the_charge(live):
    doc = live.publish("Streamed notes.\n\n" + BSD).json()
    client = anthropic.Anthropic(base_url=live.url, api_key=live.agent_key, max_retries=0)
    reply = client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Who?"}],
                                   extra_body={"documents": [doc["id"]], "temperature": 0})
    assert reply.usage.cache_read_input_tokens == doc["num_tokens"]
    assert Decimal(reply.usage.model_extra["kvmart"]["charge"]["usd"]) > 0
    with live.http.stream("POST", "/v1/chat/completions",
                          json=chat([doc["id"]], stream=True, stream_options={"include_usage": True})) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line]
    last = json.loads(events[-2])
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == doc["num_tokens"]
    assert live.services.ledger.verify_receipt(last["usage"]["kvmart"]["charge"]["receipt"])


def test_an_agent_without_funds_gets_402_and_pays_nothing(live):
    pauper = live.account("pauper", "agent", usd="0.000001")
    response = live.http.post("/v1/chat/completions", headers=auth(pauper), json=chat())
    assert response.status_code == 402 and response.json()["error"]["code"] == "insufficient_funds"
    messages = live.http.post("/v1/messages", headers=auth(pauper),
                              json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert messages.status_code == 402 and messages.json()["error"]["type"] == "billing_error"
    mine = usage_of(live, pauper)
    assert mine["balance_usd"] == "0.000001000" and mine["requests"] == 0 and mine["held_usd"] == "0.000000000"
    assert live.metrics()['kvmart_charges_total{outcome="payment_required"}'] >= 2


def test_a_retry_with_the_same_idempotency_key_is_charged_once(live):
    retrier = live.account("retrier", "agent", usd="1")
    headers = auth(retrier, **{"Idempotency-Key": "order-42"})
    first = live.http.post("/v1/chat/completions", headers=headers, json=chat())
    again = live.http.post("/v1/chat/completions", headers=headers, json=chat())
    assert first.status_code == again.status_code == 200
    one, two = first.json()["usage"]["kvmart"]["charge"], again.json()["usage"]["kvmart"]["charge"]
    assert one["replayed"] is False and two["replayed"] is True and one["receipt"] == two["receipt"]
    assert again.headers["idempotent-replayed"] == "true"  # the kept answer: same id, same text, nothing computed
    assert again.json()["id"] == first.json()["id"] and again.json()["choices"] == first.json()["choices"]
    streamed = live.http.post("/v1/chat/completions", headers=headers, json=chat(stream=True))
    assert streamed.status_code == 409  # another body (stream: true) under the same key
    mine = usage_of(live, retrier)
    assert mine["requests"] == 1 and mine["spent_usd"] == one["usd"]
    assert live.metrics()['kvmart_charges_total{outcome="replayed"}'] >= 1
    other = live.http.post("/v1/chat/completions", headers=headers, json=chat(content="Something else?"))
    assert other.status_code == 409
    message = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    retried = [live.http.post("/v1/messages", headers=auth(retrier, **{"Idempotency-Key": "msg-7"}), json=message)
               for _ in range(2)]
    assert retried[0].json()["id"] == retried[1].json()["id"]
    assert usage_of(live, retrier)["requests"] == 2


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/messages", "/v1/completions", "/v1/responses"])
def test_a_request_charged_the_instant_before_its_node_fails_is_replayed_not_refused(live, monkeypatch, endpoint):
    """The node fails right after the charge commits, before it answers (here: an error raised after settling; a
    SIGKILL there did the same in tests/test_load.py). The answer was kept in the charge's own transaction, so the
    retry gets it, charged once; before, the retry was refused (409: charged, no answer kept)."""
    agent = live.account(f"unlucky{endpoint.replace('/', '-')}", "agent", usd="1")
    headers = auth(agent, **{"Idempotency-Key": "just-before-the-crash"})
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0}
    body |= {"input": "Hi"} if endpoint == "/v1/responses" else {"prompt": "Hi"} if endpoint == "/v1/completions" \
        else {"messages": [{"role": "user", "content": "Hi"}]}
    settle_reads = live.services.ledger.settle_reads

    def then_fail(*args, **kwargs):
        settle_reads(*args, **kwargs)
        raise RuntimeError("the node failed between charging and answering")

    monkeypatch.setattr(live.services.ledger, "settle_reads", then_fail)
    with contextlib.suppress(httpx.TransportError):  # the connection may drop with the error, as a dying node's does
        assert httpx.post(live.url + endpoint, headers=headers, json=body, timeout=60).status_code >= 500
    monkeypatch.undo()
    again = httpx.post(live.url + endpoint, headers=headers, json=body, timeout=60)
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert usage_of(live, agent)["requests"] == 1


def sse_data(lines) -> list[dict]:
    """The JSON payloads of an SSE stream's `data:` lines ([DONE] left out)."""
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_a_stream_cut_off_by_its_client_is_charged_for_what_was_sent(live):
    """The client reads five tokens of a long answer and hangs up: it pays for its prompt and at least the tokens
    it received, never for tokens not generated, and the rest of its hold is released. A retry with its
    Idempotency-Key is refused (no complete answer was kept), never answered again for free."""
    from server_support import wait_until

    cutter = live.account("cutter", "agent", usd="1")
    headers = auth(cutter, **{"Idempotency-Key": "cut-1"})
    body = chat(max_tokens=3000, temperature=1, seed=7, stream=True)
    received = 0
    with live.http.stream("POST", "/v1/chat/completions", headers=headers, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                received += 1
                if received == 5:
                    break  # hang up
    ledger = live.services.ledger
    wait_until(lambda: ledger.usage(ledger.account("cutter")).requests == 1, "the cut-off request to be charged")
    mine = usage_of(live, cutter)
    [charge] = mine["charges"]
    assert mine["held_usd"] == "0.000000000"  # the unused part of the hold is released
    assert received <= mine["tokens"]["output"] < 3000 and mine["tokens"]["computed"] > 0
    assert Decimal(mine["balance_usd"]) == 1 - Decimal(charge["usd"]) > 0
    retry = live.http.post("/v1/chat/completions", headers=headers, json=body)
    assert retry.status_code == 409 and "no complete answer was kept" in retry.json()["error"]["message"]
    assert usage_of(live, cutter)["requests"] == 1 and ledger.health().is_sound


def test_a_stream_closed_before_its_first_delta_is_settled_not_left_holding(live):
    """A client that hangs up after the stream's opening event, before any delta was asked for (the role chunk is
    sent first): the job is cancelled and the request charged as cut off, for its prompt and nothing generated;
    its hold is gone at once, not renewed for as long as the node runs."""
    import asyncio

    from server_support import wait_until

    from kvmart.reuse.prompt import ChatMessage, ChatPrompt
    from kvmart.server.api.openai import Reply, chat_stream
    from kvmart.server.pipeline.billing import Payer
    from kvmart.server.pipeline.plan import GenerationRequest, Sampling
    from kvmart.server.pipeline.runs import guarded, start_generation

    key = live.account("early", "agent", usd="1")
    services = live.services
    payer = Payer(services.ledger.account("early"), None, "early-hang-up")
    request = GenerationRequest(ChatPrompt((ChatMessage("user", "Who holds the copyright?"),)),
                                Sampling(max_tokens=200, temperature=0.0))

    async def hang_up_after_the_first_event() -> str:
        run = await start_generation(services, request, "chat", payer)
        stream = guarded(run, chat_stream(run, Reply(services, "chatcmpl"), False, False))
        first = await anext(stream)
        await stream.aclose()
        return first

    assert '"role":"assistant"' in asyncio.run(hang_up_after_the_first_event())
    ledger = services.ledger
    wait_until(lambda: ledger.usage(ledger.account("early")).requests == 1, "the abandoned request to be charged")
    mine = usage_of(live, key)
    assert mine["held_usd"] == "0.000000000" and mine["tokens"]["output"] == 0 and mine["tokens"]["computed"] > 0
    assert ledger.health().is_sound


def test_an_idempotent_stream_retry_replays_the_stored_stream(live):
    """Streamed retries with one key at temperature 1: the first is generated and charged; every retry gets the
    very same events as a stream (its charge marked replayed), nothing generated or charged again."""
    streamer = live.account("streamer", "agent", usd="1")
    headers = auth(streamer, **{"Idempotency-Key": "stream-1"})
    body = chat(max_tokens=24, temperature=1, stream=True, stream_options={"include_usage": True})
    answers = []
    for _ in range(3):
        with live.http.stream("POST", "/v1/chat/completions", headers=headers, json=body) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            answers.append((response.headers.get("idempotent-replayed"), list(response.iter_lines())))
    assert [replayed for replayed, _ in answers] == [None, "true", "true"]
    texts = ["".join(c["choices"][0]["delta"].get("content") or "" for c in sse_data(lines) if c["choices"])
             for _, lines in answers]
    assert texts[0] and texts == [texts[0]] * 3
    charges = [sse_data(lines)[-1]["usage"]["kvmart"]["charge"] for _, lines in answers]
    assert [c["replayed"] for c in charges] == [False, True, True]
    assert {c["receipt"]["receipt"] for c in charges} == {charges[0]["receipt"]["receipt"]}
    mine = usage_of(live, streamer)
    assert mine["requests"] == 1 and mine["spent_usd"] == charges[0]["usd"]


def test_a_key_charged_on_one_endpoint_is_refused_on_another(live):
    """The same key and the very same body sent to /v1/messages after /v1/chat/completions: refused (409), never
    answered with the stored chat.completion."""
    other = live.account("endpoint-hopper", "agent", usd="1")
    headers = auth(other, **{"Idempotency-Key": "hop-1"})
    body = chat()  # valid for both APIs
    assert live.http.post("/v1/chat/completions", headers=headers, json=body).status_code == 200
    hopped = live.http.post("/v1/messages", headers=headers, json=body)
    assert hopped.status_code == 409 and hopped.json()["type"] == "error", hopped.text
    assert usage_of(live, other)["requests"] == 1


def test_temperature_0_and_0_0_are_one_request(live):
    agent = live.account("zero-point-zero", "agent", usd="1")
    headers = auth(agent, **{"Idempotency-Key": "zero"})
    first = live.http.post("/v1/chat/completions", headers=headers, json=chat(temperature=0))
    again = live.http.post("/v1/chat/completions", headers=headers,
                           content=json.dumps(chat(temperature=0)).replace('"temperature": 0', '"temperature": 0.0'))
    assert first.status_code == again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true" and again.json()["id"] == first.json()["id"]


def test_private_documents_are_invisible_to_other_tenants(live):
    tenant_a, tenant_b = live.account("tenant-a", "publisher"), live.account("tenant-b", "publisher")
    friend, stranger = live.account("friend", "agent"), live.account("stranger", "agent")
    secret = "Tenant A's private notes.\n\n" + BSD
    mine = live.publish(secret, key=tenant_a, licence="private", readers=["friend"]).json()
    theirs = live.publish(secret, key=tenant_b, licence="private").json()
    public = live.publish(secret).json()
    assert len({mine["cache_id"], theirs["cache_id"], public["cache_id"]}) == 3  # salted per tenant
    assert mine["licence"]["kind"] == "private" and theirs["computed"] is True
    live.http.delete(f"/v1/documents/{public['id']}", headers=auth(live.publisher_key))
    for key in (stranger, tenant_b):
        hidden = live.http.get(f"/v1/documents/{mine['id']}", headers=auth(key))
        missing = live.http.get("/v1/documents/doc_000000000000000000000000", headers=auth(key))
        assert hidden.status_code == missing.status_code == 404  # not 403: its existence is not revealed
        assert hidden.json()["error"]["message"].replace(mine["id"], "X") == \
            missing.json()["error"]["message"].replace("doc_000000000000000000000000", "X")
        named = live.http.post("/v1/chat/completions", headers=auth(key), json=chat([mine["id"]]))
        assert named.status_code == 404
        listed = live.http.get("/v1/documents", params={"limit": 100}, headers=auth(key)).json()["data"]
        assert mine["id"] not in [d["id"] for d in listed]
        assert live.http.delete(f"/v1/documents/{mine['id']}", headers=auth(key)).status_code == 404
    pasted = chat(content=secret + "\n\nWho holds the copyright?")
    leaked = live.http.post("/v1/chat/completions", headers=auth(stranger), json=pasted).json()["usage"]["kvmart"]
    assert leaked["document"] != mine["id"] and leaked["cached_tokens"] == 0
    pasting = live.http.post("/v1/chat/completions", headers=auth(friend), json=pasted).json()["usage"]["kvmart"]
    assert pasting["document"] is None  # a private document is read only when named, even by its readers
    read = live.http.post("/v1/chat/completions", headers=auth(friend), json=chat([mine["id"]]))
    assert read.status_code == 200 and read.json()["usage"]["kvmart"]["cache"] in ("ram", "store")


def test_bad_licences_and_prices_are_400_and_only_publishers_publish(live):
    for fields in ({"royalty_share": "-0.1"}, {"royalty_share": "1.5"}, {"licence": "priced"},
                   {"licence": "priced", "cache_read_usd_per_mtok": "abc"},
                   {"licence": "priced", "cache_read_usd_per_mtok": -2}, {"licence": "free"},
                   {"licence": "private", "readers": ["no-such-account"]}, {"readers": ["agent"]}):
        response = live.publish("Badly priced.\n\n" + BSD, **fields)
        assert response.status_code == 400, (fields, response.text)
    assert live.publish("By an agent.", key=live.agent_key).status_code == 403
    priced = live.publish("Priced notes.\n\n" + BSD, licence="priced", cache_read_usd_per_mtok="0.5",
                          royalty_share=0.75).json()
    assert priced["licence"] == {"kind": "priced", "cache_read_usd_per_mtok": "0.5", "royalty_share": "0.75"}
    charge = live.http.post("/v1/chat/completions", json=chat([priced["id"]])).json()["usage"]["kvmart"]["charge"]
    assert Decimal(charge["cache_read_usd"]) == Decimal(priced["num_tokens"]) * Decimal("0.5") / 10**6
    assert Decimal(charge["royalty_usd"]) == Decimal(charge["cache_read_usd"]) * Decimal("0.75")
    split = next(d for d in usage_of(live, live.publisher_key)["documents"] if d["document"] == priced["id"])
    assert (split["royalty_share"], split["cache_read_usd_per_mtok"], split["reads"]) == ("0.75", "0.5", 1)


def test_the_admin_creates_and_funds_accounts(live):
    admin = live.services.ledger.admin_key_issued
    assert admin
    created = live.http.post("/v1/accounts", headers=auth(admin), json={"name": "via-http", "role": "agent"})
    assert created.status_code == 201
    key = created.json()["api_key"]
    assert live.http.post("/v1/accounts/via-http/deposits", headers=auth(admin), json={"usd": "2.5"}).json()[
        "balance_usd"] == "2.500000000"
    assert usage_of(live, key)["balance_usd"] == "2.500000000"
    assert live.http.post("/v1/accounts/via-http/deposits", headers=auth(admin), json={"usd": "-1"}).status_code == 400
    assert live.http.post("/v1/accounts", headers=auth(key), json={"name": "x", "role": "agent"}).status_code == 403
    again = live.http.post("/v1/accounts", headers=auth(admin), json={"name": "via-http", "role": "agent"})
    assert again.status_code == 400


def test_concurrent_requests_racing_for_one_balance_never_overdraw_it(live):
    from concurrent.futures import ThreadPoolExecutor

    racer = live.account("racer", "agent", usd="0")
    most = quote(Tariff(), 0, 40, 6, False).total_nanousd  # a little above one request's largest charge
    live.services.ledger.deposit("racer", Decimal(3 * most) / 10**9)  # enough for about three at once
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: live.http.post("/v1/chat/completions", headers=auth(racer), json=chat()),
                                  range(8)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 402} and 402 in codes and 200 in codes, codes
    charged = [Decimal(r.json()["usage"]["kvmart"]["charge"]["usd"]) for r in responses if r.status_code == 200]
    mine = usage_of(live, racer)
    assert mine["requests"] == len(charged) and Decimal(mine["spent_usd"]) == sum(charged)
    assert Decimal(mine["balance_usd"]) == Decimal(3 * most) / 10**9 - sum(charged) >= 0
    assert live.services.ledger.health().is_sound


def test_a_server_killed_mid_request_leaves_balanced_books_and_its_restart_releases_the_hold(tiny_folder,
                                                                                            kvmart_data_dir):
    """SIGKILL mid-answer: nothing is charged and the books balance; the request's hold still reserves its money
    and its Idempotency-Key (its node might be alive), until the node starts again: then it releases its own
    holds at once, and the key is served (not an hour of 409s and money kept off the balance)."""
    import signal

    from node_support import Node

    from kvmart.ledger import open_ledger

    ledger = open_ledger("", kvmart_data_dir, environ={})
    _, key = ledger.create_account("victim", "agent")
    ledger.deposit("victim", Decimal(1))
    node = Node()
    headers = auth(key, **{"Idempotency-Key": "killed-1"})
    try:
        body = chat(max_tokens=3000, stream=True)
        with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=DEADLINE_SECONDS) as response:
            assert response.status_code == 200 and next(response.iter_lines()).startswith("data: ")
            node.process.send_signal(signal.SIGKILL)  # mid-answer: held, never charged
    except httpx.TransportError:
        pass  # the stream broke as the server died
    node.kill()
    victim = ledger.usage(ledger.account("victim"))
    assert victim.requests == 0 and victim.balance_nanousd == 10**9 and victim.held_nanousd > 0
    assert ledger.health().is_sound
    restarted = Node(port=node.port)  # the same node (same host, port and data directory) comes back
    assert ledger.usage(ledger.account("victim")).held_nanousd == 0  # released as it started
    retried = httpx.post(restarted.url + "/v1/chat/completions", json=chat(max_tokens=4), headers=headers,
                         timeout=DEADLINE_SECONDS)
    assert retried.status_code == 200, retried.text  # the key is free: no 409 "still running"
    restarted.kill()
    assert ledger.usage(ledger.account("victim")).requests == 1 and ledger.health().is_sound
    ledger.close()
