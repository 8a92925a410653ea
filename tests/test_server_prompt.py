"""Requests -> prompt token ids (kvmart/reuse/prompt.py): a document's stored ids must be an exact prefix."""

from __future__ import annotations

import pytest

from kvmart.errors import RequestError, UnsupportedParameterError
from kvmart.reuse.prompt import (
    ChatMessage,
    ChatPrompt,
    TextPrompt,
    chat_message,
    chat_token_ids,
    render_parts,
    text_token_ids,
)
from kvmart.reuse.samples import sample_text
from kvmart.runtime.chat import BETWEEN, document_ids, layout_for, question_ids

DOC = sample_text("bsd-3-clause")
QUESTION = "Who holds the copyright?"


def ids_of(model, prompt: ChatPrompt, documents=()) -> list[int]:
    header = document_ids(model.tokenize, layout_for(model.tokenizer), "")
    return chat_token_ids(model.tokenize, model.tokenizer, prompt, [list(d) for d in documents], header)


def test_single_turn_with_a_document_is_exactly_what_kvmart_ask_computes(model_f32):
    layout = layout_for(model_f32.tokenizer)
    doc = document_ids(model_f32.tokenize, layout, DOC)
    ids = ids_of(model_f32, ChatPrompt((ChatMessage("user", QUESTION),), ("doc_x",)), [doc])
    assert ids == doc + question_ids(model_f32.tokenize, layout, QUESTION)


def test_without_documents_the_ids_decode_to_the_rendered_template(model_f32):
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!"),
                ChatMessage("user", QUESTION))
    rendered = model_f32.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                       tokenize=False, add_generation_prompt=True)
    assert model_f32.decode(ids_of(model_f32, ChatPrompt(messages))) == rendered.replace("<|im_start|>", "").replace(
        "<|im_end|>", "")  # special tokens are skipped when decoding


def test_continue_final_leaves_the_assistant_turn_open(model_f32):
    prompt = ChatPrompt((ChatMessage("user", QUESTION), ChatMessage("assistant", "The copyright")),
                        continue_final=True)
    parts = render_parts(model_f32.tokenizer, prompt)
    assert parts[-1] == 1 or parts[-1] == ""  # nothing (no end-of-turn) after the assistant's content
    assert ids_of(model_f32, prompt)[-len(model_f32.tokenize("The copyright")):] == model_f32.tokenize("The copyright")


def test_a_document_published_with_the_requests_system_prompt_stays_a_prefix(model_f32):
    layout = layout_for(model_f32.tokenizer, "You answer from the document.")
    doc = document_ids(model_f32.tokenize, layout, DOC)
    prompt = ChatPrompt((ChatMessage("system", "You answer from the document."), ChatMessage("user", QUESTION)),
                        ("doc_x",))
    assert ids_of(model_f32, prompt, [doc]) == doc + question_ids(model_f32.tokenize, layout, QUESTION)


def test_another_system_prompt_still_reads_the_document_text(model_f32):
    default = document_ids(model_f32.tokenize, layout_for(model_f32.tokenizer), DOC)
    header = document_ids(model_f32.tokenize, layout_for(model_f32.tokenizer), "")
    prompt = ChatPrompt((ChatMessage("system", "Other."), ChatMessage("user", QUESTION)), ("doc_x",))
    ids = ids_of(model_f32, prompt, [default])
    text_ids = default[len(header):]
    assert ids[:len(default)] != default  # no longer a prefix: the system turn comes first
    start = next(i for i in range(len(ids)) if ids[i:i + len(text_ids)] == text_ids)
    assert model_f32.decode(ids[:start]).endswith("Other.\nuser\n")


def test_several_documents_are_separated_by_blank_lines(model_f32):
    layout = layout_for(model_f32.tokenizer)
    a, b = (document_ids(model_f32.tokenize, layout, sample_text(n)) for n in ("bsd-3-clause", "apache-2.0"))
    ids = ids_of(model_f32, ChatPrompt((ChatMessage("user", QUESTION),), ("a", "b")), [a, b])
    header = len(document_ids(model_f32.tokenize, layout, ""))
    assert ids == a + model_f32.tokenize(BETWEEN) + b[header:] + question_ids(model_f32.tokenize, layout, QUESTION)


def test_documents_need_a_user_message(model_f32):
    with pytest.raises(RequestError, match="first user message"):
        ids_of(model_f32, ChatPrompt((ChatMessage("system", "x"),), ("doc_x",)), [[1, 2, 3]])
    with pytest.raises(RequestError, match="empty"):
        ids_of(model_f32, ChatPrompt(()))


def test_roles():
    assert chat_message("developer", "x") == ChatMessage("system", "x")
    with pytest.raises(UnsupportedParameterError, match="tool"):
        chat_message("tool", "{}")


def test_completion_prompt_is_the_document_ids_then_the_prompt(model_f32):
    doc = [5, 6, 7]
    vocab = model_f32.hf_model.config.vocab_size
    assert text_token_ids(model_f32.tokenize, TextPrompt("Hello"), [doc], vocab) == doc + model_f32.tokenize("Hello")
    assert text_token_ids(model_f32.tokenize, TextPrompt(token_ids=(9, 10)), [doc], vocab) == [5, 6, 7, 9, 10]
    with pytest.raises(UnsupportedParameterError, match="at most one document"):
        text_token_ids(model_f32.tokenize, TextPrompt("x"), [doc, doc], vocab)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        text_token_ids(model_f32.tokenize, TextPrompt(token_ids=(vocab,)), [], vocab)
    with pytest.raises(RequestError, match="empty"):
        text_token_ids(model_f32.tokenize, TextPrompt(""), [], vocab)
