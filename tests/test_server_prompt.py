"""Requests -> prompt token ids (kvmart/reuse/prompt.py): a document's stored ids must be an exact prefix."""

from __future__ import annotations

import pytest

from kvmart.errors import RequestError, UnsupportedParameterError
from kvmart.reuse.prompt import (
    DOCUMENTS_TURN,
    ChatMessage,
    ChatPrompt,
    TextPrompt,
    chat_message,
    chat_token_ids,
    lay_out_chat,
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


def test_another_system_prompt_comes_after_the_documents_so_they_stay_a_prefix(model_f32):
    """An agent framework's own system prompt must not cost the document's reuse: the documents come first, as a
    user turn of their own, then the request's messages as the template renders them."""
    default = document_ids(model_f32.tokenize, layout_for(model_f32.tokenizer), DOC)
    messages = (ChatMessage("system", "Other."), ChatMessage("user", QUESTION))
    laid = lay_out_chat(model_f32.tokenize, model_f32.tokenizer, ChatPrompt(messages, ("doc_x",)), [default],
                        document_ids(model_f32.tokenize, layout_for(model_f32.tokenizer), ""))
    assert laid.token_ids[:len(default)] == default and laid.documents == ((0, len(default)),)
    assert laid.layout == DOCUMENTS_TURN
    rest = model_f32.decode(laid.token_ids[len(default):])
    assert rest == "\nsystem\nOther.\nuser\n" + QUESTION + "\nassistant\n"  # special tokens are not decoded
    # segments start at each message's content: the system prompt is a segment of its own, reusable next time
    starts = [a for a, _ in laid.spans()]
    assert model_f32.decode(laid.token_ids[starts[1]:starts[2]]).startswith("Other.")
    assert laid.boundaries[-1] == len(laid.token_ids)


def test_segments_start_at_each_messages_content_so_a_next_turn_shares_them(model_f32):
    first = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    second = first + (ChatMessage("assistant", "Hello!"), ChatMessage("user", QUESTION))
    header = document_ids(model_f32.tokenize, layout_for(model_f32.tokenizer), "")
    a, b = (lay_out_chat(model_f32.tokenize, model_f32.tokenizer, ChatPrompt(m), [], header) for m in (first, second))
    segments = [a.token_ids[s:e] for s, e in a.spans()]
    assert segments == [b.token_ids[s:e] for s, e in b.spans()][:len(segments)]  # every segment of turn 1 reused
    assert b.token_ids[:len(a.token_ids)] == a.token_ids


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


def test_an_explicit_cache_point_cuts_a_message_into_segments_there(model_f32):
    """Anthropic's cache_control on a content block: the content is tokenized in pieces cut at the block's end, and a
    segment ends there, so the chunk ending at the marker is stored whatever follows it."""
    header = document_ids(model_f32.tokenize, layout_for(model_f32.tokenizer), "")
    long_context = "Background: " + "the licence terms. " * 20
    marked = ChatMessage("user", long_context + "\nWhat is this?", (len(long_context),))
    laid = lay_out_chat(model_f32.tokenize, model_f32.tokenizer, ChatPrompt((marked,)), [], header)
    plain = lay_out_chat(model_f32.tokenize, model_f32.tokenizer, ChatPrompt((ChatMessage("user", marked.content),)),
                         [], header)
    cut = next(b for b in laid.boundaries if b not in plain.boundaries)
    assert model_f32.decode(laid.token_ids[:cut]).endswith(long_context)
    other = ChatMessage("user", long_context + "\nSomething else entirely?", (len(long_context),))
    again = lay_out_chat(model_f32.tokenize, model_f32.tokenizer, ChatPrompt((other,)), [], header)
    assert again.token_ids[:cut] == laid.token_ids[:cut] and cut in again.boundaries
