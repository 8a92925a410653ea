"""Requests -> prompt token ids, laid out so that a published document's stored ids are an exact prefix.

Chat messages are rendered with the model's chat template, with a sentinel in place of each message's content;
the template's own text and each content are then tokenized as separate pieces and the ids concatenated, as
`kvmart.runtime.chat` does. So a single user turn holding a document and a question gives exactly
`chat.document_ids(...) + chat.question_ids(...)`, the ids `kvmart ask` computes.

Named documents go at the start of the first user message, each followed by a blank line; their ids come from
the catalogue (the artifact's manifest), not from re-tokenizing text. A completion prompt is the document's
stored ids verbatim, then the prompt."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmart.errors import RequestError, UnsupportedParameterError
from kvmart.runtime.chat import BETWEEN

Tokenize = Callable[[str], list[int]]
SENTINEL = "\x00KVMART-MESSAGE-{}\x00"
SENTINEL_PATTERN = re.compile("\x00KVMART-MESSAGE-([0-9]+)\x00")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[ChatMessage, ...]
    documents: tuple[str, ...] = ()  # document ids
    continue_final: bool = False  # continue the last (assistant) message instead of starting a new turn


@dataclass(frozen=True)
class TextPrompt:
    text: str = ""
    token_ids: tuple[int, ...] | None = None  # given instead of text
    documents: tuple[str, ...] = ()


Prompt = ChatPrompt | TextPrompt


def chat_message(role: str, content: str) -> ChatMessage:
    """A message with an OpenAI or Anthropic role name; RequestError for roles kvmart cannot render."""
    if role not in ROLES:
        raise UnsupportedParameterError("messages", f"role {role!r} (tool calls are not supported)")
    return ChatMessage(ROLES[role], content)


def render_parts(tokenizer, prompt: ChatPrompt) -> list[str | int]:
    """The template's text pieces (str) and message indices (int) in prompt order. Without a chat template, or
    with one that rewrites content, messages are separated by blank lines (kvmart.runtime.chat's plain layout)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": m.role, "content": SENTINEL.format(i)} for i, m in enumerate(prompt.messages)]
        try:
            rendered = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=not prompt.continue_final,
                continue_final_message=prompt.continue_final)
        except Exception as e:  # jinja raises its own errors (e.g. "system role not supported")
            raise RequestError(f"the model's chat template refused these messages: {e}", "messages") from e
        pieces = SENTINEL_PATTERN.split(rendered)
        parts: list[str | int] = [int(p) if i % 2 else p for i, p in enumerate(pieces)]
        if [p for p in parts if isinstance(p, int)] == list(range(len(prompt.messages))):
            return parts
    parts = []
    for i in range(len(prompt.messages)):
        parts += [BETWEEN, i] if i else [i]
    return parts


def chat_token_ids(tokenize: Tokenize, tokenizer, prompt: ChatPrompt, documents: Sequence[Sequence[int]],
                   header_ids: Sequence[int]) -> list[int]:
    """Token ids of a chat prompt, `documents` (their stored ids) placed at the start of the first user
    message. `header_ids`: the ids a document published with the default layout starts with."""
    if not prompt.messages:
        raise RequestError("messages must not be empty", "messages")
    first_user = next((i for i, m in enumerate(prompt.messages) if m.role == "user"), None)
    if documents and first_user is None:
        raise RequestError("documents go into the first user message, and there is none", "messages")
    ids: list[int] = []
    for part in render_parts(tokenizer, prompt):
        if isinstance(part, str):
            ids += _ids(tokenize, part)
        elif part == first_user and documents:
            ids += documents_block(tokenize, documents, ids, header_ids)
            ids += _ids(tokenize, BETWEEN + prompt.messages[part].content if prompt.messages[part].content else "")
        else:
            ids += _ids(tokenize, prompt.messages[part].content)
    return ids


def documents_block(tokenize: Tokenize, documents: Sequence[Sequence[int]], before: Sequence[int],
                    header_ids: Sequence[int]) -> list[int]:
    """The documents' text ids, separated by blank lines. A document whose stored ids start with everything
    before it in this prompt (`before`) contributes only the rest, so the prompt starts with its exact ids."""
    block: list[int] = []
    for n, doc in enumerate(documents):
        if n:
            block += tokenize(BETWEEN)
        block += text_ids(doc, [list(before), list(header_ids)] if n == 0 else [list(header_ids)])
    return block


def text_ids(document: Sequence[int], headers: list[list[int]]) -> list[int]:
    """A document's ids without the first of `headers` they start with (the layout's header), else all."""
    ids = list(document)
    for header in headers:
        if header and ids[:len(header)] == header:
            return ids[len(header):]
    return ids


def text_token_ids(tokenize: Tokenize, prompt: TextPrompt, documents: Sequence[Sequence[int]],
                   vocab_size: int) -> list[int]:
    """A completion prompt: the document's stored ids verbatim (at most one document), then the prompt."""
    if len(documents) > 1:
        raise UnsupportedParameterError("documents", "a completion reads at most one document; use chat "
                                        "completions to read several")
    if prompt.token_ids is not None:
        bad = [t for t in prompt.token_ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
    ids = list(documents[0]) if documents else []
    ids += list(prompt.token_ids) if prompt.token_ids is not None else _ids(tokenize, prompt.text)
    if not ids:
        raise RequestError("the prompt is empty", "prompt")
    return ids


def _ids(tokenize: Tokenize, text: str) -> list[int]:
    return tokenize(text) if text else []
