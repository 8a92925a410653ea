"""The Anthropic-compatible endpoint (kvmart/server/api/anthropic.py), through the official `anthropic` client."""

from __future__ import annotations

import anthropic
import openai
import pytest
from server_support import LiveServer

from kvmart.reuse.samples import sample_text

MODEL = "builtin:tiny"
DOC = sample_text("bsd-3-clause")
QUESTION = "Who holds the copyright?"


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("serve-anthropic")) as server:
        yield server


@pytest.fixture(scope="module")
def doc(live) -> dict:
    return live.publish(DOC, title="bsd").json()


@pytest.fixture(scope="module")
def client(live) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live.url, api_key=live.agent_key, max_retries=0)


def message(client, doc_id: str | None, **extra):
    body = {"temperature": 0, **{k: extra.pop(k) for k in ("cache", "temperature") if k in extra}}
    if doc_id:
        body["documents"] = [doc_id]
    return client.messages.create(model=MODEL, max_tokens=extra.pop("max_tokens", 16),
                                  messages=extra.pop("messages", [{"role": "user", "content": QUESTION}]),
                                  extra_body=body, **extra)


def test_messages_report_cache_reads_as_anthropic_does(client, doc, live):
    reply = message(client, doc["id"])
    usage = reply.usage
    kv = usage.model_extra["kvmart"]
    assert kv["documents"] == [{"id": doc["id"], "cache_id": doc["cache_id"], "cached_tokens": doc["num_tokens"]}]
    assert usage.cache_read_input_tokens >= doc["num_tokens"]  # the document, and this agent's own prefix if cached
    assert usage.cache_creation_input_tokens == kv["cache_creation_tokens"]  # computed, and kept for next time
    assert usage.input_tokens + usage.cache_creation_input_tokens == kv["computed_tokens"] > 0
    assert reply.type == "message" and reply.role == "assistant" and reply.model == MODEL
    assert reply.stop_reason in ("end_turn", "max_tokens")
    # the same prompt as the OpenAI chat endpoint builds: the same answer
    chat = openai.OpenAI(base_url=live.url + "/v1", api_key=live.agent_key, max_retries=0).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0,
        extra_body={"documents": [doc["id"]]})
    assert reply.content[0].text == chat.choices[0].message.content
    total = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    assert total == chat.usage.prompt_tokens


def test_cached_and_bypass_messages_are_identical(client, doc):
    cached, fresh = message(client, doc["id"], max_tokens=24), message(client, doc["id"], max_tokens=24,
                                                                          cache="bypass")
    assert fresh.usage.cache_read_input_tokens == fresh.usage.cache_creation_input_tokens == 0  # read, kept: nothing
    u = cached.usage
    assert fresh.usage.input_tokens == u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    assert cached.content[0].text == fresh.content[0].text


def test_streaming_messages(client, doc):
    whole = message(client, doc["id"], max_tokens=20)
    with client.messages.stream(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": QUESTION}],
                                extra_body={"documents": [doc["id"]], "temperature": 0}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.usage.cache_read_input_tokens >= doc["num_tokens"]
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.stop_reason == whole.stop_reason


def test_system_prompt_stop_sequences_and_assistant_prefill(client, doc):
    full = message(client, doc["id"], system="Answer from the document.", max_tokens=24).content[0].text
    stop = next((full[i:i + 2] for i in range(2, len(full) - 2) if full[i:i + 2].strip()), None)
    assert stop, full
    stopped = message(client, doc["id"], system="Answer from the document.", max_tokens=24, stop_sequences=[stop])
    assert stopped.content[0].text == full[:full.index(stop)]
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", stop)
    prefilled = message(client, doc["id"], messages=[{"role": "user", "content": QUESTION},
                                                     {"role": "assistant", "content": "The copyright"}])
    assert prefilled.usage.cache_read_input_tokens >= doc["num_tokens"]


def test_errors_in_anthropics_format(client, live):
    with pytest.raises(anthropic.NotFoundError) as caught:
        message(client, "doc_000000000000000000000000")
    assert caught.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError, match="top_k"):
        client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}],
                               extra_body={"top_k": 5})
    response = live.http.post("/v1/messages", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == "invalid_request_error"
    missing = live.http.post("/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 400 and "max_tokens" in missing.json()["error"]["message"]


def test_count_tokens_counts_the_prompt_messages_would_read(client, doc):
    messages = [{"role": "user", "content": QUESTION}]
    counted = client.messages.count_tokens(model=MODEL, messages=messages, extra_body={"documents": [doc["id"]]})
    reply = message(client, doc["id"], max_tokens=2)
    u = reply.usage  # the same prompt split into computed (and kept), and read from the cache
    assert counted.input_tokens == u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens
    assert u.cache_read_input_tokens > 0
    alone = client.messages.count_tokens(model=MODEL, messages=messages)
    plain = message(client, None, max_tokens=1, messages=messages).usage
    assert alone.input_tokens == (plain.input_tokens + plain.cache_creation_input_tokens
                                  + plain.cache_read_input_tokens) < counted.input_tokens
    with_system = client.messages.count_tokens(model=MODEL, messages=messages, system="Be brief.")
    assert with_system.input_tokens > alone.input_tokens


def test_count_tokens_is_free_and_refuses_unknown_documents(client, live):
    before = live.http.get("/v1/usage").json()
    client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
    after = live.http.get("/v1/usage").json()
    assert (after["requests"], after["balance_usd"]) == (before["requests"], before["balance_usd"])
    with pytest.raises(anthropic.NotFoundError, match="not found"):
        client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                     extra_body={"documents": ["doc_" + "0" * 24]})
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=live.url, api_key="kvm_wrong", max_retries=0).messages.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}])
