"""The prefix cache as agents meet it (issue "Every prompt reuses what was computed before"), through a real
`kvmart serve` and the official clients: documents named beside a framework's system prompt, agents' own prefixes,
several documents, and the billing rules an agent can trust. Each test here failed on the server that matched only
"a prompt that begins with exactly one whole published document"."""

from __future__ import annotations

from decimal import Decimal

import anthropic
import openai
import pytest
from server_support import LiveServer

from kvmart.reuse.samples import sample_text

DOC = sample_text("bsd-3-clause")
LONGER = sample_text("apache-2.0")[:3000]
QUESTION = "Who holds the copyright?"
SYSTEM = "You are a helpful assistant inside an agent framework. Use the tools you have. Be concise and exact."


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("prefix-cache")) as server:
        yield server


@pytest.fixture(scope="module")
def doc(live):
    response = live.publish(DOC, title="bsd")
    assert response.status_code in (200, 201), response.text
    return response.json()


def openai_client(live, key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key or live.agent_key, max_retries=0)


def anthropic_client(live, key=None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live.url, api_key=key or live.agent_key, max_retries=0)


def forward_passes(live) -> int:
    return int(live.metrics().get("kvmart_forward_passes_total", 0))


def test_openai_client_with_a_system_prompt_reads_the_document_then_the_system_prompt_too(live, doc):
    client = openai_client(live, live.account("openai-agent", "agent"))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    args = dict(model=live.services.model_id, messages=messages, max_tokens=8, temperature=0,
                extra_body={"documents": [doc["id"]]})
    first = client.chat.completions.create(**args)
    second = client.chat.completions.create(**args)
    assert first.usage.prompt_tokens_details.cached_tokens == doc["num_tokens"]
    cached = second.usage.prompt_tokens_details.cached_tokens
    system_tokens = len(live.services.model.tokenize(SYSTEM))
    assert doc["num_tokens"] + system_tokens < cached < second.usage.prompt_tokens  # document + system prompt
    kv = second.usage.model_extra["kvmart"]
    assert kv["layout"] == "documents-turn" and kv["document"] == doc["id"]
    assert kv["own_cached_tokens"] == cached - doc["num_tokens"]
    assert first.choices[0].message.content == second.choices[0].message.content


def test_anthropic_client_with_a_system_block_reports_cache_creation_and_reads(live, doc):
    client = anthropic_client(live, live.account("anthropic-agent", "agent"))
    args = dict(model=live.services.model_id, max_tokens=8, system=SYSTEM,
                messages=[{"role": "user", "content": QUESTION}],
                extra_body={"documents": [doc["id"]], "temperature": 0})  # this client version takes no temperature
    first = client.messages.create(**args)
    second = client.messages.create(**args)
    assert first.usage.cache_read_input_tokens == doc["num_tokens"]
    assert first.usage.cache_creation_input_tokens > len(live.services.model.tokenize(SYSTEM))
    assert second.usage.cache_read_input_tokens > doc["num_tokens"]
    total = lambda u: u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens  # noqa: E731
    assert total(first.usage) == total(second.usage)


def test_two_named_documents_pay_both_publishers(live, doc):
    other_publisher = live.account("other-publisher", "publisher")
    second = live.publish(LONGER, key=other_publisher, title="apache").json()
    agent = live.account("two-docs", "agent")
    client = openai_client(live, agent)
    args = dict(model=live.services.model_id, messages=[{"role": "user", "content": QUESTION}], max_tokens=4,
                temperature=0, extra_body={"documents": [doc["id"], second["id"]]})
    client.chat.completions.create(**args)
    again = client.chat.completions.create(**args)
    kv = again.usage.model_extra["kvmart"]
    assert [d["id"] for d in kv["documents"]] == [doc["id"], second["id"]]
    assert kv["documents"][1]["cached_tokens"] > 0
    documents = kv["charge"]["receipt"]["documents"]
    assert [d["cache_id"] for d in documents] == [doc["cache_id"], second["cache_id"]]
    assert all(d["royalty_nanousd"] > 0 for d in documents)
    assert live.services.ledger.health().is_sound


def test_a_named_document_wins_over_a_longer_priced_copy_of_its_text(live, doc):
    """A publisher who republishes document X's text plus a few words, priced high, is not matched (nor paid) for
    requests that name X."""
    squatter = live.account("squatter", "publisher")
    copy = live.publish(DOC + "\nAppendix: see also.", key=squatter, licence="priced",
                        cache_read_usd_per_mtok="50").json()
    assert copy["id"] != doc["id"]
    agent = live.account("careful-agent", "agent")
    reply = openai_client(live, agent).chat.completions.create(
        model=live.services.model_id, messages=[{"role": "user", "content": QUESTION}], max_tokens=4,
        temperature=0, extra_body={"documents": [doc["id"]]})
    kv = reply.usage.model_extra["kvmart"]
    assert kv["document"] == doc["id"] and [d["id"] for d in kv["documents"]] == [doc["id"]]
    assert Decimal(kv["charge"]["royalty_usd"]) < Decimal("0.0001")  # the default tariff's royalty, not $50/M
    assert live.services.ledger.usage(live.services.ledger.account("squatter")).royalties_nanousd == 0


def test_pasting_text_is_never_billed_at_a_priced_documents_price_unless_agreed(live):
    text = sample_text("gpl-3.0")[:2000]
    priced = live.account("priced-publisher", "publisher")
    published = live.publish(text, key=priced, licence="priced", cache_read_usd_per_mtok="20").json()
    client = openai_client(live, live.account("paster", "agent"))
    args = dict(model=live.services.model_id, messages=[{"role": "user", "content": text + "\n\nSummarise."}],
                max_tokens=4, temperature=0)
    plain = client.chat.completions.create(**args).usage.model_extra["kvmart"]
    assert plain["document"] is None and Decimal(plain["charge"]["royalty_usd"]) == 0  # computed, not matched
    agreed = client.chat.completions.create(**args, extra_body={"max_cache_read_usd_per_mtok": "25"})
    kv = agreed.usage.model_extra["kvmart"]
    assert kv["document"] == published["id"] and Decimal(kv["charge"]["royalty_usd"]) > 0


def test_republishing_under_other_terms_gives_a_new_id(live):
    text = sample_text("bsd-3-clause").replace("Regents", "Trustees")
    first = live.publish(text, licence="priced", cache_read_usd_per_mtok="1").json()
    deleted = live.http.delete(f"/v1/documents/{first['id']}", headers={"Authorization": f"Bearer {live.publisher_key}"})
    assert deleted.status_code == 200, deleted.text
    again = live.publish(text, licence="priced", cache_read_usd_per_mtok="3").json()
    assert again["id"] != first["id"] and again["licence"]["cache_read_usd_per_mtok"] == "3"
    gone = live.http.post("/v1/chat/completions", json={
        "model": live.services.model_id, "messages": [{"role": "user", "content": "hi"}], "documents": [first["id"]]})
    assert gone.status_code == 404


def test_a_key_without_funds_never_causes_a_forward_pass(live, doc):
    broke_agent = live.account("broke-agent", "agent", usd="0")
    broke_publisher = live.account("broke-publisher", "publisher", usd="0")
    before, stored = forward_passes(live), len(live.services.store.entries())
    for extra in ({"cache": "bypass"}, {}):
        refused = live.http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {broke_agent}"}, json={
            "model": live.services.model_id, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4,
            "documents": [doc["id"]], **extra})
        assert refused.status_code == 402, refused.text
    unpaid = live.publish(sample_text("mpl-2.0")[:1500], key=broke_publisher)
    assert unpaid.status_code == 402, unpaid.text
    assert forward_passes(live) == before
    assert len(live.services.store.entries()) == stored  # nothing computed, so nothing stored
    assert live.services.ledger.health().is_sound


def test_an_anthropic_cache_control_marker_is_a_cache_point(live):
    """A block marked with cache_control ends a chunk: a later prompt sharing everything up to the marker reads it
    all from cache, although what follows the marker differs."""
    client = anthropic_client(live, live.account("cache-control-agent", "agent"))
    context = "Context for this session: " + sample_text("mpl-2.0")[:1200]

    def ask(question: str):
        blocks = [{"type": "text", "text": context, "cache_control": {"type": "ephemeral"}},
                  {"type": "text", "text": question}]
        return client.messages.create(model=live.services.model_id, max_tokens=4,
                                      messages=[{"role": "user", "content": blocks}], extra_body={"temperature": 0})

    first, second = ask("What is this?"), ask("Name one obligation.")
    through_marker = len(live.services.model.tokenize(context))
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens >= through_marker  # the template header + the marked block
