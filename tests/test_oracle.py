"""An oracle that shares no code with kvmart's forward path: stock transformers, its own eager attention and its own
DynamicCache, on the same weights. The bit-exact tests compare kvmart with kvmart (cached against from scratch, the
same code on both sides); a bug on both sides would pass them. Here kvmart's logits, chunk after chunk, must agree
with stock transformers' forward over the same tokens within a stated tolerance (different kernels round
differently, so equality is not expected): float32, |difference| <= 1e-3 + 1e-3 x |logit|, over every position."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvmart.reuse.samples import sample_text
from kvmart.runtime.chat import document_ids, layout_for

ATOL = RTOL = 1e-3
CHUNK = 64


@pytest.fixture(scope="module")
def stock(tiny_folder):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def prompt(model_f32) -> list[int]:
    doc = document_ids(model_f32.tokenize, layout_for(model_f32.tokenizer), sample_text("bsd-3-clause"))
    return doc[:3 * CHUNK + 17] + model_f32.tokenize("\n\nWho holds the copyright?")


def stock_logits(stock, ids: list[int], chunk_tokens: int | None) -> torch.Tensor:
    """Stock transformers' logits of every position: one pass, or chunk by chunk with its own DynamicCache."""
    with torch.inference_mode():
        if chunk_tokens is None:
            return stock(input_ids=torch.tensor([ids])).logits[0].float()
        cache, out = DynamicCache(), []
        for start in range(0, len(ids), chunk_tokens):
            piece = ids[start:start + chunk_tokens]
            result = stock(input_ids=torch.tensor([piece]), use_cache=True, **{cache_keyword(stock): cache},
                           position_ids=torch.arange(start, start + len(piece)).unsqueeze(0))
            out.append(result.logits[0].float())
        return torch.cat(out)


def cache_keyword(stock) -> str:
    """transformers 5.2x renamed the forward's `past_key_values` to `cache` (the old name warns, then goes)."""
    return "cache" if "cache" in inspect.signature(stock.forward).parameters else "past_key_values"


def kvmart_logits(model, ids: list[int], chunk_tokens: int) -> torch.Tensor:
    """kvmart's logits of every position, computed chunk by chunk as the server computes a prompt."""
    prefix, out = (), []
    for start in range(0, len(ids), chunk_tokens):
        step = model.continue_from(prefix, ids[start:start + chunk_tokens], all_logits=True)
        out.append(step.logits)
        prefix += (step.new_kv,)
    return torch.cat(out)


@pytest.mark.parametrize("stock_chunks", [None, CHUNK], ids=["stock-single-pass", "stock-same-chunks"])
def test_kvmart_agrees_with_stock_transformers(model_f32, stock, prompt, stock_chunks):
    ours = kvmart_logits(model_f32, prompt, CHUNK)
    theirs = stock_logits(stock, prompt, stock_chunks)
    assert ours.shape == theirs.shape == (len(prompt), model_f32.vocab_size)
    worst = float(((ours - theirs).abs() - RTOL * theirs.abs()).max())
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=RTOL), f"worst excess over tolerance {worst:.3g}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_the_oracle_can_tell(model_f32, stock, prompt):
    """A control: kvmart's logits with one token changed early in the prompt are outside the tolerance."""
    other = list(prompt)
    other[5] = (other[5] + 1) % model_f32.vocab_size
    assert not torch.allclose(kvmart_logits(model_f32, other, CHUNK), stock_logits(stock, prompt, None),
                              atol=ATOL, rtol=RTOL)
