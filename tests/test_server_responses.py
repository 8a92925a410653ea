"""OpenAI's Responses API (kvmart/server/api/responses.py), through the official `openai` client against a real server
on a loopback port: plain and streamed responses, the stream helper's events, cached tokens, logprobs, the
`incomplete` status, idempotent retries and the parameters refused. The Agents SDK's turn is in
tests/test_agents_sdk.py."""

from __future__ import annotations

import openai
import pytest
from server_support import LiveServer

from kvmart.reuse.samples import sample_text

MODEL = "builtin:tiny"
DOC = sample_text("bsd-3-clause")
QUESTION = "Who holds the copyright?"


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("serve-responses")) as server:
        yield server


@pytest.fixture(scope="module")
def doc(live) -> dict:
    response = live.publish(DOC, title="bsd")
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=live.agent_key, max_retries=0)


def respond(client, doc_id: str | None, question: str = QUESTION, **extra):
    body = {k: extra.pop(k) for k in ("cache",) if k in extra}
    if doc_id:
        body["documents"] = [doc_id]
    return client.responses.create(model=MODEL, input=question, max_output_tokens=extra.pop("max_output_tokens", 16),
                                   temperature=0, extra_body=body, **extra)


def chat_answer(client, doc_id: str, question: str = QUESTION, max_tokens: int = 16):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          max_tokens=max_tokens, temperature=0, extra_body={"documents": [doc_id]})


def test_a_response_reads_the_document_from_cache_and_answers_as_chat_does(client, doc):
    response = respond(client, doc["id"])
    usage = response.usage
    assert usage.input_tokens_details.cached_tokens == doc["num_tokens"]
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    kv = usage.model_extra["kvmart"]
    assert kv["document"] == doc["id"] and kv["computed_tokens"] == usage.input_tokens - doc["num_tokens"] > 0
    assert kv["charge"]["usd"] and kv["charge"]["receipt"]
    chat = chat_answer(client, doc["id"])
    assert response.output_text == chat.choices[0].message.content  # the same prompt, the same greedy tokens
    assert usage.input_tokens == chat.usage.prompt_tokens
    assert response.id.startswith("resp_") and response.model == MODEL and response.object == "response"
    assert response.output[0].type == "message" and response.output[0].role == "assistant"


def test_a_response_cut_by_max_output_tokens_is_incomplete(client, doc):
    response = respond(client, doc["id"], max_output_tokens=3)
    assert response.usage.output_tokens == 3
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


def test_instructions_are_the_system_message_a_document_can_be_published_after(live, client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]
    steered = live.publish(DOC, title="bsd, brief", system="Answer briefly.").json()

    def ask(doc_id: str, instructions: str | None):
        return client.responses.create(model=MODEL, input=items, instructions=instructions, max_output_tokens=4,
                                       temperature=0, extra_body={"documents": [doc_id]})

    with_system = ask(steered["id"], "Answer briefly.")
    assert with_system.instructions == "Answer briefly."
    assert with_system.usage.input_tokens_details.cached_tokens == steered["num_tokens"]
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0, extra_body={"documents": [steered["id"]]},
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}])
    assert with_system.output_text == chat.choices[0].message.content
    assert with_system.usage.input_tokens == chat.usage.prompt_tokens
    # without that system prompt the document is a user turn of its own (docs/SERVER.md, "Layout"), and is still
    # read from its stored chunks rather than prefilled again
    plain = ask(steered["id"], None).usage
    assert plain.model_extra["kvmart"]["layout"] == "documents-turn"
    assert with_system.usage.model_extra["kvmart"]["layout"] == "documents-first"
    assert 0 < plain.input_tokens_details.cached_tokens <= steered["num_tokens"]


def test_streamed_events_build_the_same_response(client, doc):
    whole = respond(client, doc["id"], max_output_tokens=12)
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0,
                                 extra_body={"documents": [doc["id"]]}) as stream:
        kinds, pieces, snapshot = [], [], None
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                pieces.append(event.delta)
                snapshot = event.snapshot  # the text the helper accumulated from the events so far
            final = getattr(event, "response", None)  # the terminal event carries the whole response
    # (get_final_response() wants `response.completed`: the tiny model's noise never ends a turn, so these are
    # `incomplete`; tests/test_agents_sdk.py has completed ones from the real model)
    assert snapshot == whole.output_text
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert "".join(pieces) == final.output_text == whole.output_text
    assert final.usage.input_tokens_details.cached_tokens == doc["num_tokens"]
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_raw_stream_numbers_its_events_in_order(client, doc):
    events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=6, temperature=0,
                                          stream=True, extra_body={"documents": [doc["id"]]}))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1


def test_logprobs_come_when_included_and_match_chat(client, doc):
    response = respond(client, doc["id"], max_output_tokens=6, include=["message.output_text.logprobs"],
                       top_logprobs=3)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                                          extra_body={"documents": [doc["id"]]})
    got = response.output[0].content[0].logprobs
    want = chat.choices[0].logprobs.content
    assert [(t.token, t.logprob, [x.token for x in t.top_logprobs]) for t in got] == \
           [(t.token, t.logprob, [x.token for x in t.top_logprobs]) for t in want]
    assert all(len(t.top_logprobs) == 3 for t in got)
    assert not respond(client, doc["id"], max_output_tokens=6).output[0].content[0].logprobs


def test_an_idempotent_retry_is_charged_once(live, client, doc):
    before = live.http.get("/v1/usage").json()["requests"]
    first = respond(client, doc["id"], max_output_tokens=4, extra_headers={"Idempotency-Key": "resp-retry-1"})
    again = respond(client, doc["id"], max_output_tokens=4, extra_headers={"Idempotency-Key": "resp-retry-1"})
    assert again.id == first.id and again.output_text == first.output_text
    assert again.usage.model_extra["kvmart"]["charge"]["replayed"] is True
    assert live.http.get("/v1/usage").json()["requests"] == before + 1


def test_prompt_cache_key_is_accepted_and_echoed(client, doc):
    response = respond(client, doc["id"], max_output_tokens=2, prompt_cache_key="handbook-team")
    assert response.prompt_cache_key == "handbook-team"


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]}, "tools"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"text": {"format": {"type": "json_object"}}}, "text.format"),
])
def test_what_cannot_be_honoured_is_refused_naming_it(client, doc, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        respond(client, doc["id"], max_output_tokens=2, **extra)
    assert caught.value.param == param and caught.value.code == "unsupported_parameter"


def test_non_message_items_and_images_are_refused(client):
    for item in ({"type": "function_call_output", "call_id": "c", "output": "4"},
                 {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}):
        with pytest.raises(openai.BadRequestError, match="not supported") as caught:
            client.responses.create(model=MODEL, input=[item], max_output_tokens=2)
        assert caught.value.param == "input"


def test_unknown_documents_and_models_are_404(client):
    with pytest.raises(openai.NotFoundError, match="document"):
        respond(client, "doc_" + "0" * 24)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.responses.create(model="gpt-5", input="hi")
