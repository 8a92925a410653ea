"""The OpenAI-compatible endpoints (kvmart/server/api/openai.py), through the official `openai` client against a real
server on a loopback port."""

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
    with LiveServer(model_f32, tmp_path_factory.mktemp("serve-openai")) as server:
        yield server


@pytest.fixture(scope="module")
def doc(live) -> dict:
    response = live.publish(DOC, title="bsd")
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=live.agent_key, max_retries=0)


def ask(client, doc_id: str | None, question: str = QUESTION, **extra):
    body = {k: extra.pop(k) for k in ("cache",) if k in extra}
    if doc_id:
        body["documents"] = [doc_id]
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          max_tokens=extra.pop("max_tokens", 16), extra_body=body, **extra)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")


def test_chat_with_a_document_reports_its_tokens_as_cached(client, doc):
    response = ask(client, doc["id"], temperature=0)
    usage = response.usage
    assert usage.prompt_tokens_details.cached_tokens == doc["num_tokens"]
    kv = usage.model_extra["kvmart"]
    assert kv["cached_tokens"] == doc["num_tokens"] and kv["document"] == doc["id"]
    assert kv["computed_tokens"] == usage.prompt_tokens - doc["num_tokens"] > 0
    assert kv["cache"] in ("ram", "store") and kv["prefill_seconds_saved"] >= 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert response.choices[0].finish_reason in ("stop", "length") and response.model == MODEL
    assert ask(client, doc["id"], temperature=0).usage.model_extra["kvmart"]["cache"] == "ram"


def test_no_hit_reports_zero_cached_tokens_never_null(client, doc):
    usage = ask(client, None, "Something unrelated entirely.", temperature=0).usage
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.model_extra["kvmart"]["cache"] == "none"


def test_cached_and_bypass_answers_are_identical_with_their_logprobs(client, doc):
    cached = ask(client, doc["id"], temperature=0, logprobs=True, top_logprobs=5, max_tokens=24)
    fresh = ask(client, doc["id"], temperature=0, logprobs=True, top_logprobs=5, max_tokens=24, cache="bypass")
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.usage.model_extra["kvmart"]["cache"] == "bypass"
    assert cached.usage.prompt_tokens == fresh.usage.prompt_tokens
    assert cached.choices[0].message.content == fresh.choices[0].message.content
    lp_cached, lp_fresh = cached.choices[0].logprobs.content, fresh.choices[0].logprobs.content
    assert len(lp_cached) == cached.usage.completion_tokens - (cached.choices[0].finish_reason == "stop")
    assert [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs]) for t in lp_cached] == \
           [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs]) for t in lp_fresh]
    assert all(len(t.top_logprobs) == 5 for t in lp_cached)


def test_completions_cached_and_bypass_identical(client, doc):
    def complete(cache: str):
        return client.completions.create(model=MODEL, prompt="\n\nThe licence says", max_tokens=12, temperature=0,
                                         logprobs=3, extra_body={"documents": [doc["id"]], "cache": cache})

    cached, fresh = complete("default"), complete("bypass")
    assert cached.usage.prompt_tokens_details.cached_tokens == doc["num_tokens"]
    assert cached.choices[0].text == fresh.choices[0].text
    assert cached.choices[0].logprobs.token_logprobs == fresh.choices[0].logprobs.token_logprobs
    assert cached.choices[0].logprobs.top_logprobs == fresh.choices[0].logprobs.top_logprobs


def test_streaming_chat_matches_the_whole_answer_and_reports_usage(client, doc):
    whole = ask(client, doc["id"], temperature=0, max_tokens=20)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"documents": [doc["id"]]})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.prompt_tokens_details.cached_tokens == doc["num_tokens"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_completion_matches_the_whole_completion(client, doc):
    args = dict(model=MODEL, prompt="\n\nIn short,", max_tokens=15, temperature=0,
                extra_body={"documents": [doc["id"]]})
    whole = client.completions.create(**args)
    text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **args) if c.choices)
    assert text == whole.choices[0].text


def test_pasting_a_documents_text_reuses_its_cache_automatically(client, doc):
    pasted = ask(client, None, DOC + "\n\n" + QUESTION, temperature=0, max_tokens=12)
    kv = pasted.usage.model_extra["kvmart"]
    assert kv["document"] == doc["id"]
    assert 16 <= pasted.usage.prompt_tokens_details.cached_tokens <= doc["num_tokens"]
    fresh = ask(client, None, DOC + "\n\n" + QUESTION, temperature=0, max_tokens=12, cache="bypass")
    assert fresh.choices[0].message.content == pasted.choices[0].message.content


def test_stop_sequences_end_the_answer_before_them(client, doc):
    full = ask(client, doc["id"], temperature=0, max_tokens=24).choices[0].message.content
    stop = next((full[i:i + 3] for i in range(2, len(full) - 3) if full[i:i + 3].strip()), None)
    assert stop, f"the answer is too short to pick a stop sequence: {full!r}"
    stopped = ask(client, doc["id"], temperature=0, max_tokens=24, stop=[stop])
    assert stopped.choices[0].message.content == full[:full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_is_reproducible_and_cache_independent(client, doc):
    runs = [ask(client, doc["id"], temperature=1.0, seed=11, max_tokens=12, cache=c).choices[0].message.content
            for c in ("default", "default", "bypass")]
    assert runs[0] == runs[1] == runs[2]


def test_unsupported_parameters_are_refused_naming_them(client, doc):
    with pytest.raises(openai.BadRequestError, match="n is not supported") as caught:
        ask(client, doc["id"], n=2)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError, match="tool"):
        ask(client, doc["id"], tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
