"""The request pipeline (kvmart/server/pipeline: plan -> load -> execute), driven directly: for every way a prompt
reuses chunks (a named document, a pasted one, a named one after another system prompt, two named documents, a
tenant's own prefix from an earlier request), the cached answer is bit-identical, token for token and logprob for
logprob, to the `bypass` answer that computes every chunk from scratch in the same steps; and what is reused is
exactly what the planner promised."""

from __future__ import annotations

import pytest
import torch
from infra_support import redis_server  # noqa: F401  (a fixture)

from kvmart.config import Settings
from kvmart.errors import ContextOverflowError, UnknownDocumentError
from kvmart.reuse.prompt import ChatMessage, ChatPrompt, TextPrompt
from kvmart.reuse.samples import sample_text
from kvmart.runtime.chat import document_ids, layout_for
from kvmart.server.config import ServerSettings
from kvmart.server.pipeline.engine import Computed, Delta, Finished, PublishJob
from kvmart.server.pipeline.plan import Caller, GenerationRequest, Sampling
from kvmart.server.pipeline.services import build_services

DOC = sample_text("bsd-3-clause")
OTHER = sample_text("mpl-2.0")[:2500]
QUESTION = "Who holds the copyright?"
SYSTEM = "You are a careful legal assistant. Answer in one sentence."
TENANT_A, TENANT_B = Caller(None, None, "salt-a"), Caller(None, None, "salt-b")


@pytest.fixture
def services(model_f32, kvmart_data_dir):
    settings = Settings(data_dir=kvmart_data_dir, model=model_f32.spec)
    return build_services(settings, ServerSettings(), model_f32)


def publish(services, text: str, title: str):
    ids = document_ids(services.model.tokenize, layout_for(services.model.tokenizer), text)
    (published,) = services.engine.publish(PublishJob(ids, title, ""), "raw")
    return services.engine.register(published)


@pytest.fixture
def doc(services):
    return publish(services, DOC, "bsd")


def run(services, prompt, bypass=False, caller=TENANT_A, **sampling):
    """(plan, loaded, deltas, finished) of one request through plan -> load -> execute."""
    plan = services.planner.plan(GenerationRequest(prompt, Sampling(**sampling), bypass), caller)
    loaded = services.loader.load(plan)
    events = [e for e in services.engine.execute(plan, loaded) if not isinstance(e, Computed)]
    assert isinstance(events[-1], Finished) and all(isinstance(e, Delta) for e in events[:-1])
    return plan, loaded, events[:-1], events[-1]


def user(text: str, *documents: str) -> ChatPrompt:
    return ChatPrompt((ChatMessage("user", text),), tuple(documents))


PROMPTS = {
    "named": lambda d: user(QUESTION, d.id),
    "pasted": lambda d: user(DOC + "\n\n" + QUESTION),
    "named-after-system": lambda d: ChatPrompt((ChatMessage("system", SYSTEM), ChatMessage("user", QUESTION)), (d.id,)),
    "raw-ids": lambda d: TextPrompt(token_ids=tuple(d.token_list() + [13, 13])),
}


@pytest.mark.parametrize("kind", PROMPTS)
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, seed=7)])
def test_cached_and_bypass_answers_are_identical_token_for_token(services, doc, kind, sampling):
    prompt = PROMPTS[kind](doc)
    cached = run(services, prompt, max_tokens=16, top_logprobs=5, **sampling)
    fresh = run(services, prompt, bypass=True, max_tokens=16, top_logprobs=5, **sampling)
    plan, loaded = cached[0], cached[1]
    assert plan.documents[0].id == doc.id and loaded.num_tokens == plan.cached_tokens > 0
    assert fresh[0].chunks == plan.chunks and fresh[1].num_tokens == 0  # the same steps, nothing read
    assert cached[2] == fresh[2] and cached[3] == fresh[3]  # texts, token ids, logprobs (floats, exactly)
    assert len(cached[2]) >= 1


def test_a_named_document_is_read_whole_whatever_system_prompt_comes_with_it(services, doc):
    plan, loaded, _, _ = run(services, PROMPTS["named-after-system"](doc), max_tokens=4, temperature=0.0)
    assert plan.laid.layout == "documents-turn" and plan.laid.token_ids[:doc.num_tokens] == doc.token_list()
    assert loaded.num_tokens == doc.num_tokens and loaded.from_store == len(doc.chunks)
    assert [s.document.id for s in plan.sources if s.document] == [doc.id]


def test_a_tenants_own_prefix_is_reused_by_its_next_request_and_never_by_another_tenant(services, doc):
    prompt = PROMPTS["named-after-system"](doc)
    first = run(services, prompt, max_tokens=4, temperature=0.0)
    again = run(services, prompt, max_tokens=4, temperature=0.0)
    other = run(services, prompt, caller=TENANT_B, max_tokens=4, temperature=0.0)
    assert first[1].num_tokens == doc.num_tokens  # the document only: the system prompt is computed
    assert again[1].num_tokens > doc.num_tokens and again[1].from_ram >= 1  # document + system prompt
    own = sum(s.num_tokens for s in again[0].sources if s.document is None)
    assert own == again[1].num_tokens - doc.num_tokens and own > len(services.model.tokenize(SYSTEM))
    assert other[1].num_tokens == doc.num_tokens  # tenant B's keys differ: tenant A's prefix is invisible
    assert again[2] == first[2] == other[2]


def test_two_named_documents_are_both_reused_once_their_combination_was_computed(services, doc):
    second = publish(services, OTHER, "mpl")
    prompt = user(QUESTION, doc.id, second.id)
    first = run(services, prompt, max_tokens=4, temperature=0.0)
    again = run(services, prompt, max_tokens=4, temperature=0.0)
    end = first[0].laid.documents[1][1]
    assert first[1].num_tokens == doc.num_tokens  # the second document after the first: not stored yet
    assert again[1].num_tokens >= end - 255  # the combination is an ordinary prefix-cache entry now
    assert [s.document.id for s in again[0].sources if s.document] == [doc.id, second.id]
    assert first[2] == again[2]


def test_a_deleted_document_is_refused_at_once(services, doc):
    services.store.delete(doc.cache_id)
    with pytest.raises(UnknownDocumentError):
        services.planner.plan(GenerationRequest(PROMPTS["named"](doc), Sampling()), TENANT_A)


def test_a_chunk_lost_from_the_store_is_computed_again_and_the_answer_stays_exact(services, doc):
    reference = run(services, PROMPTS["named"](doc), bypass=True, max_tokens=8, temperature=0.0)
    services.store.delete(doc.chunks[-1][1])
    plan, loaded, deltas, finished = run(services, PROMPTS["named"](doc), max_tokens=8, temperature=0.0)
    assert loaded.num_tokens == doc.num_tokens - doc.chunks[-1][0]  # the lost chunk was computed
    assert (deltas, finished) == (reference[2], reference[3])
    services.engine.close()  # the writer has stored it back
    assert services.store.entry(doc.chunks[-1][1]) is not None


def test_prompt_too_long_says_by_how_much(services, doc):
    limit = services.model.context_tokens
    prompt = PROMPTS["named"](doc)
    prompt_tokens = len(services.planner.plan(GenerationRequest(prompt, Sampling(max_tokens=1)), TENANT_A)
                        .laid.token_ids)
    with pytest.raises(ContextOverflowError) as caught:
        services.planner.plan(GenerationRequest(prompt, Sampling(max_tokens=limit - prompt_tokens + 7)), TENANT_A)
    assert caught.value.over_tokens == 7 and "(7 too many)" in str(caught.value)
    plan, _, _, finished = run(services, prompt, temperature=0.0)  # no max_tokens: the default, clipped
    assert plan.max_new_tokens == min(services.server.default_max_tokens, limit - prompt_tokens)
    assert finished.completion_tokens <= plan.max_new_tokens


def test_chunk_logits_are_what_a_from_scratch_chunked_prefill_gives(services, doc, model_f32):
    """The engine's arithmetic, checked from outside it: the document's stored chunks, continued with the rest of
    the prompt, give the logits of a chunked prefill of the whole prompt computed by the model adapter alone."""
    plan = services.planner.plan(GenerationRequest(PROMPTS["named-after-system"](doc), Sampling(max_tokens=1)),
                                 TENANT_A)
    loaded = services.loader.load(plan)
    rest = [list(c.token_ids) for c in plan.chunks[loaded.num_tokens and len(loaded.kvs):]]
    scratch = model_f32.prefill_pieces([list(c.token_ids) for c in plan.chunks[:-1]])
    reused = loaded.kvs + model_f32.prefill_pieces(rest[:-1], loaded.kvs)
    assert torch.equal(model_f32.continue_from(scratch, rest[-1]).logits,
                       model_f32.continue_from(reused, rest[-1]).logits)


STORES = {
    "disk, raw": lambda tmp, redis: (str(tmp / "store"), "raw"),
    "disk, zstd": lambda tmp, redis: (str(tmp / "store"), "zstd"),
    "disk, kvmart codec": lambda tmp, redis: (str(tmp / "store"), "kvmart"),
    "redis behind a local disk, kvmart codec": lambda tmp, redis: (f"{redis.url}?prefix={tmp.name}", "kvmart"),
}


@pytest.mark.parametrize("kind", STORES)
def test_after_a_trip_through_each_tier_and_codec_answers_stay_bit_exact(model_f32, tmp_path, redis_server, kind):
    """A fresh node (an empty hot tier) reads a document and an agent's prefix another node stored, through the
    store and its codec; its answer equals the bypass answer token for token, logprob for logprob."""
    url, codec = STORES[kind](tmp_path, redis_server)
    base = Settings(data_dir=tmp_path / "a", model=model_f32.spec, store=url, codec=codec)
    writer = build_services(base, ServerSettings(), model_f32)
    document = publish(writer, DOC, "bsd")
    prompt = PROMPTS["named-after-system"](document)
    run(writer, prompt, max_tokens=4, temperature=0.0)
    reader = build_services(base.with_overrides(data_dir=tmp_path / "b"), ServerSettings(), model_f32)
    reader.catalog.refresh()
    cached = run(reader, prompt, max_tokens=12, temperature=0.0, top_logprobs=3)
    fresh = run(reader, prompt, bypass=True, max_tokens=12, temperature=0.0, top_logprobs=3)
    assert cached[1].from_store == len(document.chunks) and cached[1].from_ram == 0
    tier = "redis" if "redis" in kind else "store"  # the tier that answered: Redis (the node's disk is empty)
    assert cached[1].tiers == (tier,) * len(document.chunks) and cached[1].slowest_tier == tier
    assert cached[2] == fresh[2] and cached[3] == fresh[3]
    again = run(reader, prompt, max_tokens=1, temperature=0.0)[1]  # now from the hot tier
    assert set(again.tiers) == {"hot"} and again.slowest_tier == "hot"
