"""The prompt layout: how a document and a question become token ids, so the cached ids are always an exact prefix
of a request's ids (docs/FORMAT.md, "Prompt layout").

With a chat template (instruct models, and the built-ins' ChatML), the user turn holds the document, a blank line
and the question:

    [header: template text up to the user's content] [document]  <- cached
    ["\\n\\n" + question] [footer: end of turn + assistant header]  <- computed per request

Each piece is tokenized on its own and the ids concatenated: BPE never merges across a boundary, so the document's
ids do not depend on the question. Models without a template use the plain layout: document, then question."""

from __future__ import annotations

from dataclasses import dataclass

SENTINEL = "\x00KVMART-CONTENT\x00"
BETWEEN = "\n\n"


@dataclass(frozen=True)
class Layout:
    name: str  # "chat" or "plain"
    header: str
    between: str
    footer: str


PLAIN = Layout("plain", "", BETWEEN, "")


def layout_for(tokenizer, system: str | None = None) -> Layout:
    """The chat layout rendered from the tokenizer's template (with an optional system message), else plain."""
    if not getattr(tokenizer, "chat_template", None):
        return PLAIN
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": SENTINEL}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    header, found, footer = rendered.partition(SENTINEL)
    if not found:
        return PLAIN  # a template that rewrites content cannot give a stable prefix
    return Layout("chat", header, BETWEEN, footer)


def document_ids(tokenize, layout: Layout, text: str) -> list[int]:
    """The ids that are cached: the layout's header, then the document."""
    return _ids(tokenize, layout.header) + tokenize(text)


def question_ids(tokenize, layout: Layout, question: str) -> list[int]:
    """The ids computed per request after the cached document: separator + question, then the footer."""
    return tokenize(layout.between + question) + _ids(tokenize, layout.footer)


def _ids(tokenize, text: str) -> list[int]:
    return tokenize(text) if text else []
