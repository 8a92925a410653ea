"""Anthropic-compatible endpoint: POST /v1/messages, with `stream`, so the official `anthropic` client works
unchanged. Documents are named with the extra body field `documents`; `usage` reports `cache_read_input_tokens`
(tokens read from a stored cache) and `cache_creation_input_tokens` (always 0: answering never writes a cache;
documents are published with POST /v1/documents). `cache_control` markers are accepted and ignored."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from kvmart.errors import KvmartError, UnsupportedParameterError
from kvmart.reuse.prompt import ChatMessage, ChatPrompt, chat_message
from kvmart.server.api.openai import SSE_HEADERS, check_model
from kvmart.server.api.params import AnthropicTemperature, NoClientSalt, TopP
from kvmart.server.api.usage import anthropic_usage
from kvmart.server.auth import caller, idempotency_key, request_hash
from kvmart.server.body import parse, read_json
from kvmart.server.errors import HttpError, http_error
from kvmart.server.pipeline.billing import Payer, kept_stream, remember_response, replayed_response
from kvmart.server.pipeline.engine import Finished, GenerationRequest, Sampling
from kvmart.server.pipeline.runs import Run, start_generation
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


def error_body(error: HttpError) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES[error.kind], "message": error.message}}


def event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, separators=(',', ':'))}\n\n"


def blocks_text(content: str | list[Block]) -> str:
    if isinstance(content, str):
        return content
    for block in content:
        if block.type != "text":
            raise UnsupportedParameterError("messages", f"content blocks of type {block.type!r} (text only)")
    return "\n".join(block.text or "" for block in content)


def messages_request(req: MessagesRequest) -> GenerationRequest:
    if req.tools or req.tool_choice is not None:
        raise UnsupportedParameterError("tools", "tool use is not implemented")
    if req.thinking is not None and (not isinstance(req.thinking, dict) or req.thinking.get("type") != "disabled"):
        raise UnsupportedParameterError("thinking", "extended thinking is not implemented")
    if req.top_k is not None:
        raise UnsupportedParameterError("top_k", "top-k sampling is not implemented (use top_p)")
    system = [ChatMessage("system", blocks_text(req.system))] if req.system else []
    messages = tuple(system + [chat_message(m.role, blocks_text(m.content)) for m in req.messages])
    prompt = ChatPrompt(messages, tuple(req.documents), continue_final=req.messages[-1].role == "assistant")
    sampling = Sampling(max_tokens=req.max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=req.top_p or 1.0, stop=tuple(req.stop_sequences or ()))
    return GenerationRequest(prompt, sampling, req.cache == "bypass")


def stop_reason(finished: Finished) -> str:
    if finished.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn" if finished.finish_reason == "stop" else "max_tokens"


def message_head(services: Services, message_id: str) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": services.model_id}


@router.post("/v1/messages")
async def messages(request: Request):
    services: Services = request.app.state.services
    account = await caller(request)
    body = await read_json(request, services.server.max_body_bytes)
    req = parse(MessagesRequest, body)
    check_model(services, req.model)
    payer = Payer(account, idempotency_key(request), request_hash("/v1/messages", body))
    if replay := await replayed_response(services, payer):
        return replay
    run = await start_generation(services, messages_request(req), "messages", payer)
    message_id = f"msg_{uuid.uuid4().hex}"
    if req.stream:
        events = message_stream(run, message_head(services, message_id))
        return StreamingResponse(kept_stream(services, payer, run.bill, events), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    text = "".join(d.text for d in await run.collect())
    answer = {**message_head(services, message_id), "content": [{"type": "text", "text": text}],
              "stop_reason": stop_reason(run.finished), "stop_sequence": run.finished.stop_sequence,
              "usage": anthropic_usage(run.usage)}
    await remember_response(services, payer, run.bill, answer)
    return JSONResponse(answer)


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
        yield event("message_delta", {"delta": {"stop_reason": stop_reason(run.finished),
                                                "stop_sequence": run.finished.stop_sequence},
                                      "usage": anthropic_usage(run.usage)})
        yield event("message_stop", {})
    except KvmartError as e:
        yield event("error", {"error": error_body(http_error(e))["error"]})
