"""Anthropic-compatible endpoints: POST /v1/messages, with `stream`, so the official `anthropic` client works
unchanged, and POST /v1/messages/count_tokens (free: the prompt's tokens, documents included, laid out as
/v1/messages lays them out). Documents are named with the extra body field `documents`; `usage` reports
`cache_read_input_tokens` (tokens read from the cache) and `cache_creation_input_tokens` (tokens computed and kept
for later requests; kvmart/server/api/usage.py). Every prompt is cached automatically at each message's content
(docs/SERVER.md); a `cache_control` marker on a content block is honoured as an explicit cache point: the prompt is
cut at the end of that block too, so the chunk ending there is stored and a later prompt that shares everything up to
it reuses it, whatever follows."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from kvmart.errors import KvmartError, UnsupportedParameterError
from kvmart.reuse.catalog import Readable
from kvmart.reuse.prompt import ChatMessage, ChatPrompt, chat_message
from kvmart.server.api.generation import Opened, check_model, open_generation, read_price_cap
from kvmart.server.api.params import AnthropicTemperature, NoClientSalt, TopP
from kvmart.server.api.usage import anthropic_usage
from kvmart.server.auth import caller
from kvmart.server.body import parse, read_json
from kvmart.server.errors import HttpError, http_error
from kvmart.server.pipeline.engine import Finished
from kvmart.server.pipeline.plan import GenerationRequest, Sampling
from kvmart.server.pipeline.runs import Run
from kvmart.server.pipeline.services import Services

router = APIRouter()
ERROR_TYPES = {"invalid_request": "invalid_request_error", "permission": "permission_error",
               "authentication": "authentication_error", "payment": "billing_error",
               "conflict": "invalid_request_error",
               "not_found": "not_found_error", "too_large": "request_too_large", "rate_limit": "rate_limit_error",
               "unavailable": "overloaded_error", "server": "api_error"}


class Block(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["user", "assistant"]
    content: str | list[Block]


class MessagesRequest(NoClientSalt):
    """Unknown fields (metadata, service_tier...) are accepted and ignored (`salt` is refused:
    kvmart/server/api/params.py)."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[Block] | None = None
    temperature: AnthropicTemperature = None
    top_p: TopP = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    tools: list[Any] | None = None
    tool_choice: Any = None
    thinking: Any = None
    documents: list[str] = []
    cache: Literal["default", "bypass"] = "default"
    max_cache_read_usd_per_mtok: str | float | int | None = None  # the most a document not named may cost


class CountTokensRequest(MessagesRequest):
    """The messages request without `max_tokens` (nothing is generated)."""

    max_tokens: int = Field(1, ge=1)


def error_body(error: HttpError) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES[error.kind], "message": error.message}}


def event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, separators=(',', ':'))}\n\n"


def blocks_text(content: str | list[Block]) -> str:
    return blocks_message("user", content).content


def blocks_message(role: str, content: str | list[Block]) -> ChatMessage:
    """A message from text blocks, joined by newlines; a block marked with `cache_control` ends a cache point."""
    if isinstance(content, str):
        return chat_message(role, content)
    for block in content:
        if block.type != "text":
            raise UnsupportedParameterError("messages", f"content blocks of type {block.type!r} (text only)")
    text, breaks = "", []
    for n, block in enumerate(content):
        text += ("\n" if n else "") + (block.text or "")
        if (block.model_extra or {}).get("cache_control") and n < len(content) - 1:
            breaks.append(len(text))
    return ChatMessage(chat_message(role, text).role, text, tuple(breaks))


def messages_request(req: MessagesRequest) -> GenerationRequest:
    if req.tools or req.tool_choice is not None:
        raise UnsupportedParameterError("tools", "tool use is not implemented")
    if req.thinking is not None and (not isinstance(req.thinking, dict) or req.thinking.get("type") != "disabled"):
        raise UnsupportedParameterError("thinking", "extended thinking is not implemented")
    if req.top_k is not None:
        raise UnsupportedParameterError("top_k", "top-k sampling is not implemented (use top_p)")
    system = [blocks_message("system", req.system)] if req.system else []
    messages = tuple(system + [blocks_message(m.role, m.content) for m in req.messages])
    prompt = ChatPrompt(messages, tuple(req.documents), continue_final=req.messages[-1].role == "assistant")
    sampling = Sampling(max_tokens=req.max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=req.top_p or 1.0, stop=tuple(req.stop_sequences or ()))
    return GenerationRequest(prompt, sampling, req.cache == "bypass", read_price_cap(req.max_cache_read_usd_per_mtok))


def stop_reason(finished: Finished) -> str:
    if finished.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn" if finished.finish_reason == "stop" else "max_tokens"


def message_head(services: Services, message_id: str) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": services.model_id}


@router.post("/v1/messages")
async def messages(request: Request):
    opened = await open_generation(request, MessagesRequest, messages_request, "messages")
    if not isinstance(opened, Opened):
        return opened
    req, run = opened.req, opened.run
    message_id = f"msg_{uuid.uuid4().hex}"
    if req.stream:
        return opened.stream(message_stream(run, message_head(opened.services, message_id)))
    text = "".join(d.text for d in await run.collect())
    head = message_head(opened.services, message_id)
    return await opened.answer(lambda: {**head, "content": [{"type": "text", "text": text}],
                                        "stop_reason": stop_reason(run.ended), "stop_sequence": run.ended.stop_sequence,
                                        "usage": anthropic_usage(run.usage)})


async def message_stream(run: Run, head: dict):
    try:
        yield event("message_start", {"message": {**head, "content": [], "stop_reason": None, "stop_sequence": None,
                                                  "usage": anthropic_usage(run.usage)}})
        yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        yield event("ping", {})
        async for d in run.deltas():
            if d.text:
                yield event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": d.text}})
        yield event("content_block_stop", {"index": 0})
        yield event("message_delta", {"delta": {"stop_reason": stop_reason(run.ended),
                                                "stop_sequence": run.ended.stop_sequence},
                                      "usage": anthropic_usage(run.usage)})
        yield event("message_stop", {})
    except KvmartError as e:
        yield event("error", {"error": error_body(http_error(e))["error"]})


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request):
    """{"input_tokens": N}: every token of the prompt, the named documents' included (/v1/messages reports the
    same N split into `input_tokens`, `cache_creation_input_tokens` and `cache_read_input_tokens`). Nothing is
    charged; the caller must be able to read every document it names."""
    services: Services = request.app.state.services
    account = await caller(request)
    req = parse(CountTokensRequest, await read_json(request, services.server.max_body_bytes))
    check_model(services, req.model)
    readable = await run_in_threadpool(services.ledger.readable, account)
    return {"input_tokens": await run_in_threadpool(prompt_tokens, services, messages_request(req), readable)}


def prompt_tokens(services: Services, request: GenerationRequest, readable: Readable) -> int:
    """The prompt's token count, laid out as the planner lays out a generation's prompt (off the model thread: the
    planner tokenizes under its own lock). UnknownDocumentError for a document `readable` does not allow."""
    planner = services.planner
    named = [planner.document(doc_id, readable) for doc_id in request.prompt.documents]
    return len(planner.lay_out(request.prompt, named).token_ids)
