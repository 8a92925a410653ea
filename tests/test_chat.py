"""The prompt layout: the cached document ids are an exact prefix of every request's ids, and together they spell
the model's own chat template; tokenizers without a usable template fall back to the plain layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmart.reuse.samples import sample_text
from kvmart.runtime.chat import BETWEEN, PLAIN, document_ids, layout_for, question_ids

DOCS = [
    "A short document.",
    "Ends with a newline\n",
    "  leading spaces, trailing spaces  ",
    "Unicode: naïve café — 東京 🚀",
    "<|im_end|> looks like a special token",
]
QUESTIONS = ["What is it?", "  spaced question ", "Zwei Fragen?\nSecond line."]


@pytest.fixture
def tokenizer(tiny_folder: Path):
    """A fresh tokenizer instance per test: the tests modify it, and the session Model's must stay intact."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_folder))


def encode(tokenizer):
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))


def test_tiny_model_uses_the_chat_layout(model_f32):
    layout = layout_for(model_f32.tokenizer)
    assert layout.name == "chat"
    assert layout.header == "<|im_start|>user\n"
    assert layout.footer == "<|im_end|>\n<|im_start|>assistant\n"
    assert layout.between == BETWEEN == "\n\n"


@pytest.mark.parametrize("question", QUESTIONS)
@pytest.mark.parametrize("doc", DOCS + ["sample:bsd-3-clause"])
def test_document_ids_are_a_prefix_of_the_request(model_f32, doc, question):
    text = sample_text(doc.removeprefix("sample:")) if doc.startswith("sample:") else doc
    layout = layout_for(model_f32.tokenizer)
    doc_ids = document_ids(model_f32.tokenize, layout, text)
    q_ids = question_ids(model_f32.tokenize, layout, question)
    request = doc_ids + q_ids
    assert request[:len(doc_ids)] == doc_ids
    # the cached ids do not depend on the question
    assert document_ids(model_f32.tokenize, layout, text) == doc_ids
    # and together the pieces spell exactly what the model's own chat template renders
    rendered = model_f32.tokenizer.apply_chat_template(
        [{"role": "user", "content": text + BETWEEN + question}], tokenize=False, add_generation_prompt=True)
    assert model_f32.tokenizer.decode(request, skip_special_tokens=False) == rendered


def test_header_and_footer_are_special_tokens(model_f32):
    layout = layout_for(model_f32.tokenizer)
    doc_ids = document_ids(model_f32.tokenize, layout, "x")
    q_ids = question_ids(model_f32.tokenize, layout, "y")
    im_start = model_f32.tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = model_f32.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert doc_ids[0] == im_start
    assert im_end in q_ids and q_ids.count(im_start) == 1


def test_system_message_goes_in_the_header(model_f32):
    layout = layout_for(model_f32.tokenizer, system="You answer from the document.")
    assert layout.name == "chat"
    assert layout.header == "<|im_start|>system\nYou answer from the document.<|im_end|>\n<|im_start|>user\n"
    assert layout.footer == "<|im_end|>\n<|im_start|>assistant\n"


def test_plain_layout_without_a_chat_template(tokenizer):
    tokenizer.chat_template = None
    layout = layout_for(tokenizer)
    assert layout == PLAIN and layout.name == "plain"
    tok = encode(tokenizer)
    assert document_ids(tok, layout, "The document.") == tok("The document.")
    assert question_ids(tok, layout, "Why?") == tok("\n\nWhy?")


def test_plain_layout_when_the_template_rewrites_content(tokenizer):
    """A template that transforms the content cannot give a stable cached prefix."""
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | lower }}{% endfor %}"
    assert layout_for(tokenizer) == PLAIN
