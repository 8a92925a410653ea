"""Exactness, measured: the two claims kvmart makes about a stored artifact, checked on real model outputs.

1. Bit-exact: continuing from the stored chunks gives the same logits, KV and greedy tokens, bit for bit, as a
   from-scratch run that prefills the document in the same chunks and then the question (what a prefix cache does).
2. Against single-pass prefill of document + question: the matrix shapes differ, so float rounding may differ.
   Reported as greedy token agreement and the largest logit difference; never asserted away."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmart.reuse.core import Loaded
from kvmart.runtime.model import Generation, Model


@dataclass(frozen=True)
class VerifyReport:
    cache_id: str
    dtype: str
    document_tokens: int
    question_tokens: int
    reloaded_equals_fresh: bool  # the stored KV is bit-identical to a fresh prefill
    bit_exact_logits: bool  # question logits: artifact vs two-step from scratch
    bit_exact_kv: bool
    bit_exact_generation: bool  # greedy tokens and every step's logits
    greedy_tokens: int  # tokens compared against single-pass prefill
    greedy_matching: int  # leading tokens identical before the first divergence
    max_logit_diff: float  # largest |logit| difference over the matching steps

    @property
    def bit_exact(self) -> bool:
        return self.reloaded_equals_fresh and self.bit_exact_logits and self.bit_exact_kv and self.bit_exact_generation


def verify(model: Model, loaded: Loaded, question_token_ids: list[int], num_tokens: int = 24) -> VerifyReport:
    doc = loaded.token_ids
    fresh = model.prefill_pieces(pieces_of(loaded))
    reused_step = model.continue_from(loaded.prefix, question_token_ids, all_logits=True)
    fresh_step = model.continue_from(fresh, question_token_ids, all_logits=True)
    # compare a fixed number of tokens, as the paper does: an end-of-turn token does not end the comparison
    reused_gen = model.generate(loaded.prefix, question_token_ids, num_tokens, stop_at_eos=False)
    fresh_gen = model.generate(fresh, question_token_ids, num_tokens, stop_at_eos=False)
    single_gen = model.generate(None, doc + question_token_ids, num_tokens, stop_at_eos=False)
    matching = leading_matches(reused_gen.token_ids, single_gen.token_ids)
    return VerifyReport(
        cache_id=loaded.entry.cache_id, dtype=model.dtype_name, document_tokens=len(doc),
        question_tokens=len(question_token_ids),
        reloaded_equals_fresh=len(fresh) == len(loaded.prefix) and all(
            a.equal(b) for a, b in zip(loaded.prefix, fresh, strict=True)),
        bit_exact_logits=torch.equal(reused_step.logits, fresh_step.logits),
        bit_exact_kv=reused_step.kv.equal(fresh_step.kv),
        bit_exact_generation=generations_equal(reused_gen, fresh_gen),
        greedy_tokens=min(len(reused_gen.token_ids), len(single_gen.token_ids)), greedy_matching=matching,
        max_logit_diff=max_logit_diff(reused_gen, single_gen, max(matching, 1)),
    )


def pieces_of(loaded: Loaded) -> list[list[int]]:
    """The document's token ids cut where its chunks are."""
    pieces, start = [], 0
    for kv in loaded.prefix:
        pieces.append(loaded.token_ids[start:start + kv.num_tokens])
        start += kv.num_tokens
    return pieces


def leading_matches(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def generations_equal(a: Generation, b: Generation) -> bool:
    return a.token_ids == b.token_ids and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))


def max_logit_diff(a: Generation, b: Generation, steps: int) -> float:
    """Largest absolute logit difference over the first `steps` steps (after a divergence the inputs differ)."""
    return max((float((x - y).abs().max()) for x, y in zip(a.logits[:steps], b.logits[:steps], strict=False)), default=0.0)
