"""OpenAI's Responses API: POST /v1/responses, with `stream`, which the OpenAI Agents SDK and newer clients call.
Documents are named as with chat, with the extra body field `documents` (and `"cache": "bypass"`); `usage` reports
the whole prompt as `input_tokens` and the part read from a stored cache as `input_tokens_details.cached_tokens`,
beside kvmart's own block. `prompt_cache_key` is accepted (kvmart route routes on it) and echoed.

Responses are not stored (`store` is answered `false`): a conversation is sent whole in `input`, so
`previous_response_id` and `conversation` are refused, as are tools, reasoning, background runs and non-text
output: HTTP 400 naming the parameter, never silently ignored (docs/SERVER.md).

The module reads in three parts: the request (parsed and checked into a GenerationRequest), the shapes (the
Response object and the stream's events, built from what was generated), and the route, which alone drives
generation (open_generation and Run, as the chat route does: kvmart/server/api/generation.py)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from kvmart.errors import KvmartError, RequestError, UnsupportedParameterError
from kvmart.reuse.prompt import ChatMessage, ChatPrompt, chat_message
from kvmart.server.api.generation import Opened, open_generation, read_price_cap
from kvmart.server.api.openai import chat_logprobs
from kvmart.server.api.params import NoClientSalt, OpenAITemperature, Seed, TopP
from kvmart.server.api.usage import responses_usage
from kvmart.server.errors import http_error
from kvmart.server.pipeline.engine import Delta
from kvmart.server.pipeline.plan import GenerationRequest, Sampling
from kvmart.server.pipeline.runs import Run
from kvmart.server.pipeline.usage import Usage

router = APIRouter()
LOGPROBS = "message.output_text.logprobs"  # the `include` value asking for the answer's logprobs
TEXT_PARTS = ("input_text", "output_text", "text")


# -- the request ------------------------------------------------------------------------------------------------
class InputPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class InputItem(BaseModel):
    """A message of `input` (the `type` may be left out, as the Agents SDK does); other item types are refused."""

    model_config = ConfigDict(extra="allow")
    type: str = "message"
    role: str | None = None
    content: str | list[InputPart] | None = None


class ResponsesRequest(NoClientSalt):
    """Unknown fields (service_tier, safety_identifier...) are accepted and ignored (`salt` is refused:
    kvmart/server/api/params.py)."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: OpenAITemperature = None
    top_p: TopP = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    seed: Seed = None  # kvmart: sampling seed, as with chat
    stream: bool | None = False
    include: list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    store: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    documents: list[str] = []
    cache: Literal["default", "bypass"] = "default"
    max_cache_read_usd_per_mtok: str | float | int | None = None  # the most a document not named may cost

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS in (self.include or [])


def check_request(req: ResponsesRequest) -> None:
    """Refuse what would change the answer, or what the client would count on, and is not implemented."""
    if req.previous_response_id is not None or req.conversation is not None:
        raise UnsupportedParameterError("previous_response_id" if req.previous_response_id else "conversation",
                                        "responses are not stored; send the whole conversation in `input`")
    if req.background:
        raise UnsupportedParameterError("background", "background responses are not implemented")
    if req.prompt is not None:
        raise UnsupportedParameterError("prompt", "stored prompt templates are not implemented")
    if req.tools or req.tool_choice not in (None, "none", "auto"):
        raise UnsupportedParameterError("tools", "tool calling is not implemented")
    fmt = (req.text or {}).get("format") or {}
    if fmt.get("type", "text") != "text":
        raise UnsupportedParameterError("text.format", "only text output")
    if req.reasoning and any(v is not None for v in req.reasoning.values()):
        raise UnsupportedParameterError("reasoning", "the model does not reason; send no reasoning settings")


def part_text(part: InputPart) -> str:
    if part.type not in TEXT_PARTS:
        raise UnsupportedParameterError("input", f"content of type {part.type!r} (text only)")
    return part.text or ""


def item_message(item: InputItem) -> ChatMessage:
    if item.type != "message" or item.role is None:
        raise UnsupportedParameterError("input", f"input items of type {item.type!r} (messages only: tool calls "
                                                 "and reasoning items are not implemented)")
    content = item.content
    if isinstance(content, list):
        return chat_message(item.role, "\n".join(part_text(p) for p in content))
    return chat_message(item.role, content or "")


def input_messages(req: ResponsesRequest) -> tuple[ChatMessage, ...]:
    """`instructions` as a system message, then `input` (a string is one user message)."""
    system = [ChatMessage("system", req.instructions)] if req.instructions else []
    items = [ChatMessage("user", req.input)] if isinstance(req.input, str) else [item_message(i) for i in req.input]
    if not items:
        raise RequestError("input must not be empty", "input")
    return tuple(system + items)


def generation_request(req: ResponsesRequest) -> GenerationRequest:
    messages = input_messages(req)
    sampling = Sampling(max_tokens=req.max_output_tokens,
                        temperature=1.0 if req.temperature is None else req.temperature, top_p=req.top_p or 1.0,
                        seed=req.seed, top_logprobs=(req.top_logprobs or 0) if req.wants_logprobs else None)
    prompt = ChatPrompt(messages, tuple(req.documents), continue_final=messages[-1].role == "assistant")
    return GenerationRequest(prompt, sampling, req.cache == "bypass", read_price_cap(req.max_cache_read_usd_per_mtok))


# -- the shapes ---------------------------------------------------------------------------------------------------
@dataclass
class Reply:
    """One response's identity and settings as echoed back, and the text generated so far."""

    model: str
    req: ResponsesRequest
    id: str = field(default_factory=lambda: "resp_" + uuid.uuid4().hex)
    message_id: str = field(default_factory=lambda: "msg_" + uuid.uuid4().hex)
    created_at: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)

    def add(self, delta: Delta) -> list[dict]:
        """Take a delta in; its logprob entries (empty unless asked for)."""
        self.text += delta.text
        entries = chat_logprobs([delta])["content"] if self.req.wants_logprobs else []
        self.logprobs += entries
        return entries

    def message(self, status: str) -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [self.output_text()] if status != "in_progress" else []}

    def response(self, status: str, usage: Usage | None = None) -> dict:
        """The Response object: `in_progress` (no output yet), `completed`, or `incomplete` (max_output_tokens)."""
        r = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "model": self.model,
            "output": [self.message(status)] if status != "in_progress" else [],
            "parallel_tool_calls": r.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "text": {"format": {"type": "text"}}, "tool_choice": r.tool_choice or "auto", "tools": [],
            "top_p": r.top_p or 1.0, "top_logprobs": r.top_logprobs, "truncation": r.truncation or "disabled",
            "usage": responses_usage(usage) if usage is not None else None, "user": r.user,
            "metadata": r.metadata or {}, "prompt_cache_key": r.prompt_cache_key,
        }

    def output_text(self) -> dict:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": self.logprobs}


class Events:
    """The stream's server-sent events, numbered in order, in the shapes the official client parses."""

    def __init__(self, reply: Reply) -> None:
        self.reply, self.sequence = reply, 0

    def __call__(self, kind: str, **data: object) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"

    def opening(self) -> list[str]:
        r, where = self.reply, {"output_index": 0, "item_id": self.reply.message_id, "content_index": 0}
        return [self("response.created", response=r.response("in_progress")),
                self("response.in_progress", response=r.response("in_progress")),
                self("response.output_item.added", output_index=0, item=r.message("in_progress")),
                self("response.content_part.added", **where,
                     part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def delta(self, text: str, logprobs: list[dict]) -> str:
        where = {"output_index": 0, "item_id": self.reply.message_id, "content_index": 0}
        return self("response.output_text.delta", **where, delta=text, logprobs=logprobs)

    def closing(self, status: str, usage: Usage) -> list[str]:
        r, where = self.reply, {"output_index": 0, "item_id": self.reply.message_id, "content_index": 0}
        return [self("response.output_text.done", **where, text=r.text, logprobs=r.logprobs),
                self("response.content_part.done", **where, part=r.output_text()),
                self("response.output_item.done", output_index=0, item=r.message(status)),
                self(f"response.{status}", response=r.response(status, usage))]

    def error(self, error: KvmartError) -> str:
        http = http_error(error)
        return self("error", code=http.code or http.kind, message=http.message, param=http.param)


# -- the route: the only part that drives generation ----------------------------------------------------------
@router.post("/v1/responses")
async def create_response(request: Request):
    opened = await open_generation(request, ResponsesRequest, checked_request, "responses")
    if not isinstance(opened, Opened):
        return opened  # an idempotent retry's stored answer (a stream replays as a stream)
    req, run = opened.req, opened.run
    reply = Reply(opened.services.model_id, req)
    if req.stream:
        return opened.stream(response_stream(run, reply))  # kept for retries, settled however early it is cut off
    for delta in await run.collect():
        reply.add(delta)
    return await opened.answer(lambda: reply.response(status_of(run), run.usage))


def checked_request(req: ResponsesRequest) -> GenerationRequest:
    check_request(req)
    return generation_request(req)


def status_of(run: Run) -> str:
    """`completed`, or `incomplete` when max_output_tokens ended it (call once its deltas are consumed)."""
    return "incomplete" if run.ended.finish_reason == "length" else "completed"


async def response_stream(run: Run, reply: Reply) -> AsyncGenerator[str, None]:
    events = Events(reply)
    try:
        for event in events.opening():
            yield event
        async for d in run.deltas():
            entries = reply.add(d)
            if d.text or entries:
                yield events.delta(d.text, entries)
        for event in events.closing(status_of(run), run.usage):
            yield event
    except KvmartError as e:
        yield events.error(e)
