"""The engine (kvmart/server/pipeline/engine.py), driven directly: the cached and the bypass paths compute bit-identical
logits, for a named document and for an automatic (partial) prefix match."""

from __future__ import annotations

import pytest
import torch

from kvmart.config import Settings
from kvmart.errors import ContextOverflowError
from kvmart.reuse.prompt import ChatMessage, ChatPrompt, TextPrompt
from kvmart.reuse.samples import sample_text
from kvmart.server.config import ServerSettings
from kvmart.server.pipeline.engine import Delta, Finished, GenerationRequest, Sampling, Started
from kvmart.server.pipeline.services import build_services

DOC = sample_text("bsd-3-clause")
QUESTION = "Who holds the copyright?"


@pytest.fixture
def services(model_f32, kvmart_data_dir):
    settings = Settings(data_dir=kvmart_data_dir, model=model_f32.spec)
    return build_services(settings, ServerSettings(min_prefix_tokens=16), model_f32)


@pytest.fixture
def doc(services):
    (published,) = services.engine.publish(DOC, "bsd", "", None)
    return published.document


def generate(services, prompt: ChatPrompt, bypass: bool, **sampling) -> tuple[Started, list[Delta], Finished]:
    events = list(services.engine.generate(GenerationRequest(prompt, Sampling(**sampling), bypass)))
    return events[0], events[1:-1], events[-1]


# "pasted": a client that knows nothing of kvmart pastes the document's text; it matches the stored ids but for the
# last token or so (BPE merges across the paste's end). "partial": a prompt sharing only the document's first 233
# tokens. A prefill of just those 233 tokens rounds differently from the document's prefill (measured below; not
# at multiples of 8 here), so bypass must prefill the whole document and slice it, as the cached path does.
PARTIAL_TOKENS = 233
PROMPTS = {
    "named": lambda doc, model: ChatPrompt((ChatMessage("user", QUESTION),), (doc.id,)),
    "pasted": lambda doc, model: ChatPrompt((ChatMessage("user", DOC + "\n\n" + QUESTION),)),
    "partial": lambda doc, model: TextPrompt(
        token_ids=tuple(doc.token_list()[:PARTIAL_TOKENS] + model.tokenize("\n\n" + QUESTION))),
}
MATCHES = {"named": lambda k, doc: k == doc.num_tokens,
           "pasted": lambda k, doc: doc.num_tokens - 4 <= k <= doc.num_tokens,
           "partial": lambda k, doc: k == PARTIAL_TOKENS}


@pytest.mark.parametrize("kind", PROMPTS)
def test_store_ram_and_bypass_give_bit_identical_logits(services, doc, model_f32, kind):
    engine, prompt = services.engine, PROMPTS[kind](doc, model_f32)
    named = [doc] if prompt.documents else []
    ids = engine.prompt_ids(prompt, named)
    match = engine.match(ids, named)
    assert match.document == doc and MATCHES[kind](match.num_tokens, doc), match.num_tokens
    paths = [engine.acquire(match, bypass) for bypass in (False, False, True)]
    assert [reuse.tier for _, reuse in paths] == ["store", "ram", "bypass"]
    assert [reuse.cached_tokens for _, reuse in paths] == [match.num_tokens, match.num_tokens, 0]
    rest = ids[match.num_tokens:]
    logits = [model_f32.continue_from(kv, rest, all_logits=True).logits for kv, _ in paths]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


@pytest.mark.parametrize("kind", PROMPTS)
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, seed=7)])
def test_cached_and_bypass_answers_are_identical_token_for_token(services, doc, model_f32, kind, sampling):
    prompt = PROMPTS[kind](doc, model_f32)
    cached = generate(services, prompt, False, max_tokens=24, top_logprobs=5, **sampling)
    fresh = generate(services, prompt, True, max_tokens=24, top_logprobs=5, **sampling)
    assert cached[0].reuse.cached_tokens == cached[0].reuse.prefix_tokens > 0
    assert fresh[0].reuse.cached_tokens == 0 and fresh[0].reuse.prefix_tokens == cached[0].reuse.prefix_tokens
    assert cached[1] == fresh[1] and cached[2] == fresh[2]  # texts, token ids, logprobs (floats, exactly)
    assert len(cached[1]) >= 1


def test_a_slice_of_a_longer_prefill_is_what_bypass_computes(services, doc, model_f32, record_agreement):
    k = PARTIAL_TOKENS
    sliced = model_f32.prefill(doc.token_list()).slice(0, k)
    assert sliced.num_tokens == k and all(t.is_contiguous() for t in sliced.keys)
    alone = model_f32.prefill(doc.token_list()[:k])
    record_agreement(f"server: KV[:{k}] of a {doc.num_tokens}-token prefill == a {k}-token prefill, bit for bit: "
                     f"{sliced.equal(alone)} (why bypass prefills the whole matched document)")


def test_prompt_too_long_says_by_how_much(services, doc):
    limit = services.model.context_tokens
    prompt = PROMPTS["named"](doc, services.model)
    prompt_tokens = len(services.engine.prompt_ids(prompt, [doc]))
    with pytest.raises(ContextOverflowError) as caught:
        generate(services, prompt, False, max_tokens=limit - prompt_tokens + 7)
    assert caught.value.over_tokens == 7 and "(7 too many)" in str(caught.value)
    started, _, finished = generate(services, prompt, False, temperature=0.0)  # no max_tokens: the default, clipped
    assert started.max_new_tokens == min(services.server.default_max_tokens, limit - prompt_tokens)
    assert finished.completion_tokens <= started.max_new_tokens
