"""Requests -> prompt token ids, laid out documents first, and cut into segments at the points where a later prompt
may continue differently (kvmart/reuse/chunks.py stores and reuses prompts in chunks within these segments).

Chat messages are rendered with the model's chat template, with a sentinel in place of each message's content;
the template's own text and each content are then tokenized as separate pieces and the ids concatenated, as
`kvmart.runtime.chat` does. So a single user turn holding a document and a question gives exactly
`chat.document_ids(...) + chat.question_ids(...)`, the ids `kvmart ask` computes.

Named documents come first, in the order named, whatever the request's own system prompt is, so a publisher's
precomputed chunks apply whatever system prompt an agent's framework sends:
- where the template text before the first user message's content is the first document's own header (no system
  message, or the very system prompt the document was published with), the documents open that message, each
  followed by a blank line, then its content: the layout `kvmart ask` uses;
- otherwise the documents are a user turn of their own, before the request's messages (its system prompt
  included), rendered as the template renders such a turn.
Documents' ids come from the catalogue (the stored index), not from re-tokenizing text. A completion prompt is the
document's stored ids verbatim, then the prompt.

Segment boundaries: the end of each document, and the start of each message's content; so a conversation's next
turn, which repeats the previous prompt and adds to it, shares every segment of it."""

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
DOCUMENTS_FIRST = "documents-first"  # the documents open the first user message (the layout kvmart ask uses)
DOCUMENTS_TURN = "documents-turn"  # the documents are a user turn of their own, before the request's messages


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str
    breaks: tuple[int, ...] = ()  # explicit cache points inside the content (character offsets), as Anthropic's
    # cache_control marks them: the content is tokenized in pieces cut there, and a segment ends at each

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


@dataclass(frozen=True)
class Laid:
    """A prompt laid out: its token ids, where each document's block lies ([start, end), in the order named; the
    first starts at 0) and the segment boundaries after the documents (positions, increasing, the last one the
    prompt's end). `layout` says how documents were placed (DOCUMENTS_FIRST, DOCUMENTS_TURN; '' without any)."""

    token_ids: list[int]
    documents: tuple[tuple[int, int], ...] = ()
    boundaries: tuple[int, ...] = ()
    layout: str = ""

    @property
    def documents_end(self) -> int:
        return self.documents[-1][1] if self.documents else 0

    def spans(self) -> list[tuple[int, int]]:
        """[start, end) of every segment after the documents, in order."""
        cuts = [self.documents_end, *[b for b in self.boundaries if b > self.documents_end]]
        return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


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
        except Exception as e:  # noqa: BLE001  (jinja raises its own errors, e.g. "system role not supported")
            raise RequestError(f"the model's chat template refused these messages: {e}", "messages") from e
        pieces = SENTINEL_PATTERN.split(rendered)
        parts: list[str | int] = [int(p) if i % 2 else p for i, p in enumerate(pieces)]
        if [p for p in parts if isinstance(p, int)] == list(range(len(prompt.messages))):
            return parts
    parts = []
    for i in range(len(prompt.messages)):
        parts += [BETWEEN, i] if i else [i]
    return parts


def lay_out_chat(tokenize: Tokenize, tokenizer, prompt: ChatPrompt, documents: Sequence[Sequence[int]],
                 header_ids: Sequence[int]) -> Laid:
    """A chat prompt laid out documents first (see the module's docstring). `documents`: their stored ids;
    `header_ids`: the ids a document published with the default layout starts with."""
    if not prompt.messages:
        raise RequestError("messages must not be empty", "messages")
    if documents and not any(m.role == "user" for m in prompt.messages):
        raise RequestError("documents go into the first user message, and there is none", "messages")
    laid = _in_first_user_message(tokenize, tokenizer, prompt, documents, header_ids)
    return laid if laid is not None else _as_own_turn(tokenize, tokenizer, prompt, documents, header_ids)


def chat_token_ids(tokenize: Tokenize, tokenizer, prompt: ChatPrompt, documents: Sequence[Sequence[int]],
                   header_ids: Sequence[int]) -> list[int]:
    """The token ids of `lay_out_chat`."""
    return lay_out_chat(tokenize, tokenizer, prompt, documents, header_ids).token_ids


def _in_first_user_message(tokenize: Tokenize, tokenizer, prompt: ChatPrompt, documents: Sequence[Sequence[int]],
                           header_ids: Sequence[int]) -> Laid | None:
    """The documents at the start of the first user message, its content after a blank line; None where the
    template text before that message is not the first document's own header (then it would not be a prefix)."""
    first_user = next((i for i, m in enumerate(prompt.messages) if m.role == "user"), None)
    ids: list[int] = []
    spans: tuple[tuple[int, int], ...] = ()
    boundaries = []
    for part in render_parts(tokenizer, prompt):
        if isinstance(part, str):
            ids += _ids(tokenize, part)
            continue
        message = prompt.messages[part]
        if part == first_user and documents:
            if list(documents[0][:len(ids)]) != ids:
                return None
            ids, spans = documents_block(tokenize, documents, header_ids)
            if message.content:  # after the documents and a blank line
                message = ChatMessage(message.role, BETWEEN + message.content,
                                      tuple(b + len(BETWEEN) for b in message.breaks))
        boundaries.append(len(ids))
        ids += _content_ids(tokenize, message, len(ids), boundaries)
    boundaries.append(len(ids))
    return Laid(ids, spans, _after(boundaries, spans), DOCUMENTS_FIRST if documents else "")


def _as_own_turn(tokenize: Tokenize, tokenizer, prompt: ChatPrompt, documents: Sequence[Sequence[int]],
                 header_ids: Sequence[int]) -> Laid:
    """The documents as a user turn of their own before every message of the request (its system prompt
    included), rendered as the template renders such a turn, with the first document's stored ids (its own
    header, the publisher's system prompt if it was published with one) in place of the turn's header."""
    turn = ChatPrompt((ChatMessage("user", ""), *prompt.messages), continue_final=prompt.continue_final)
    ids: list[int] = []
    spans: tuple[tuple[int, int], ...] = ()
    boundaries = []
    for part in render_parts(tokenizer, turn):
        if isinstance(part, str):
            ids += _ids(tokenize, part)
        elif part == 0:
            ids, spans = documents_block(tokenize, documents, header_ids)
        else:
            boundaries.append(len(ids))
            ids += _content_ids(tokenize, turn.messages[part], len(ids), boundaries)
    boundaries.append(len(ids))
    return Laid(ids, spans, _after(boundaries, spans), DOCUMENTS_TURN)


def _content_ids(tokenize: Tokenize, message: ChatMessage, start: int, boundaries: list[int]) -> list[int]:
    """A message's content ids; with explicit cache points, tokenized in pieces cut there, each piece's end added
    to `boundaries` (positions counted from `start`)."""
    ids: list[int] = []
    cuts = [0, *sorted(b for b in set(message.breaks) if 0 < b < len(message.content)), len(message.content)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        ids += _ids(tokenize, message.content[a:b])
        if b < len(message.content):
            boundaries.append(start + len(ids))
    return ids


def documents_block(tokenize: Tokenize, documents: Sequence[Sequence[int]], header_ids: Sequence[int]
                    ) -> tuple[list[int], tuple[tuple[int, int], ...]]:
    """The documents' ids and where each lies: the first one's stored ids whole (its header included), each next
    one's text after a blank line (its header dropped: it is not at the start of anything)."""
    block: list[int] = []
    spans = []
    for n, doc in enumerate(documents):
        start = len(block)
        block += list(doc) if n == 0 else tokenize(BETWEEN) + text_ids(doc, [list(header_ids)])
        spans.append((start, len(block)))
    return block, tuple(spans)


def text_ids(document: Sequence[int], headers: list[list[int]]) -> list[int]:
    """A document's ids without the first of `headers` they start with (the layout's header), else all."""
    ids = list(document)
    for header in headers:
        if header and ids[:len(header)] == header:
            return ids[len(header):]
    return ids


def _after(boundaries: list[int], spans: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """The boundaries after the documents' end, increasing, without repeats."""
    start = spans[-1][1] if spans else 0
    return tuple(sorted({b for b in boundaries if b > start}))


def lay_out_text(tokenize: Tokenize, prompt: TextPrompt, documents: Sequence[Sequence[int]], vocab_size: int
                 ) -> Laid:
    """A completion prompt: the document's stored ids verbatim (at most one document), then the prompt."""
    if len(documents) > 1:
        raise UnsupportedParameterError("documents", "a completion reads at most one document; use chat "
                                        "completions to read several")
    if prompt.token_ids is not None:
        bad = [t for t in prompt.token_ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
    ids = list(documents[0]) if documents else []
    spans = ((0, len(ids)),) if documents else ()
    ids += list(prompt.token_ids) if prompt.token_ids is not None else _ids(tokenize, prompt.text)
    if not ids:
        raise RequestError("the prompt is empty", "prompt")
    return Laid(ids, spans, (len(ids),), DOCUMENTS_FIRST if documents else "")


def text_token_ids(tokenize: Tokenize, prompt: TextPrompt, documents: Sequence[Sequence[int]],
                   vocab_size: int) -> list[int]:
    """The token ids of `lay_out_text`."""
    return lay_out_text(tokenize, prompt, documents, vocab_size).token_ids


def _ids(tokenize: Tokenize, text: str) -> list[int]:
    return tokenize(text) if text else []
