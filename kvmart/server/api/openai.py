"""OpenAI-compatible endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET
/v1/models. Requests may name documents to read with the extra body field `documents` and force a from-scratch
prefill with `"cache": "bypass"`. Parameters kvmart cannot honour are refused with HTTP 400 naming them, never
silently ignored when they would change the answer (docs/SERVER.md lists them)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from kvmart.errors import KvmartError, RequestError, UnsupportedParameterError
from kvmart.reuse.prompt import ChatPrompt, TextPrompt, chat_message
from kvmart.server.api.generation import Opened, check_model, open_generation, read_price_cap
from kvmart.server.api.params import NoClientSalt, OpenAITemperature, Seed, TopP
from kvmart.server.api.usage import openai_usage
from kvmart.server.auth import caller
from kvmart.server.errors import HttpError, http_error
from kvmart.server.pipeline.engine import Delta, TokenLogprob
from kvmart.server.pipeline.plan import GenerationRequest, Sampling
from kvmart.server.pipeline.runs import Run
from kvmart.server.pipeline.services import Services

router = APIRouter()
ERROR_TYPES = {"invalid_request": "invalid_request_error", "permission": "permission_error",
               "authentication": "authentication_error", "payment": "insufficient_quota",
               "conflict": "invalid_request_error",
               "not_found": "invalid_request_error", "too_large": "invalid_request_error",
               "rate_limit": "rate_limit_error", "unavailable": "server_error", "server": "server_error"}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class Common(NoClientSalt):
    """Fields shared by chat and text completions. Unknown fields are accepted and ignored (`salt` is refused:
    kvmart/server/api/params.py)."""

    model_config = ConfigDict(extra="allow")
    model: str
    temperature: OpenAITemperature = None
    top_p: TopP = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    documents: list[str] = []
    cache: Literal["default", "bypass"] = "default"
    max_cache_read_usd_per_mtok: str | float | int | None = None  # the most a document not named may cost


class ChatCompletionRequest(Common):
    messages: list[Message]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None


class CompletionRequest(Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


def error_body(error: HttpError) -> dict:
    return {"error": {"message": error.message, "type": ERROR_TYPES[error.kind], "param": error.param,
                      "code": error.code}}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def check_common(req: Common) -> None:
    """Refuse what would change the answer and is not implemented."""
    if req.n not in (None, 1):
        raise UnsupportedParameterError("n", "one choice per request (n=1)")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise UnsupportedParameterError(name, "penalties are not implemented (send 0 or omit it)")
    if req.logit_bias:
        raise UnsupportedParameterError("logit_bias", "logit biases are not implemented")


def check_chat(req: ChatCompletionRequest) -> None:
    check_common(req)
    if req.tools or req.functions or req.tool_choice not in (None, "none"):
        raise UnsupportedParameterError("tools", "tool and function calling are not implemented")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise UnsupportedParameterError("response_format", "only text responses")
    if req.audio is not None or req.prediction is not None or (req.modalities or ["text"]) != ["text"]:
        raise UnsupportedParameterError("modalities", "text only")
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")


def content_text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type != "text":
            raise UnsupportedParameterError("messages", f"content of type {part.type!r} (text only)")
    return "\n".join(part.text or "" for part in content)


def stops(stop: str | list[str] | None) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


def sampling(req: Common, max_tokens: int | None, top_logprobs: int | None) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=req.top_p or 1.0, seed=req.seed, stop=stops(req.stop), top_logprobs=top_logprobs)


def chat_request(req: ChatCompletionRequest) -> GenerationRequest:
    messages = tuple(chat_message(m.role, content_text(m.content)) for m in req.messages)
    top = (req.top_logprobs or 0) if req.logprobs else None
    check_chat(req)
    return GenerationRequest(ChatPrompt(messages, tuple(req.documents)),
                             sampling(req, req.max_completion_tokens or req.max_tokens, top), req.cache == "bypass",
                             read_price_cap(req.max_cache_read_usd_per_mtok))


def completion_request(req: CompletionRequest) -> GenerationRequest:
    check_common(req)
    if req.echo or req.suffix or (req.best_of or 1) > 1:
        raise UnsupportedParameterError("echo" if req.echo else "suffix" if req.suffix else "best_of",
                                        "not implemented")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise UnsupportedParameterError("prompt", "one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        text = TextPrompt(text=prompt)
    else:
        ids = tuple(t for t in prompt if isinstance(t, int) and not isinstance(t, bool))
        if len(ids) != len(prompt):
            raise RequestError("prompt must be a string or a list of token ids", "prompt")
        text = TextPrompt(token_ids=ids)
    text = TextPrompt(text.text, text.token_ids, tuple(req.documents))
    return GenerationRequest(text, sampling(req, req.max_tokens, req.logprobs), req.cache == "bypass",
                             read_price_cap(req.max_cache_read_usd_per_mtok))


def _token_entry(t: TokenLogprob) -> dict:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
            "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, _, lp in t.top]}


def chat_logprobs(deltas: list[Delta]) -> dict:
    return {"content": [_token_entry(d.logprob) for d in deltas if d.logprob is not None], "refusal": None}


def completion_logprobs(deltas: list[Delta], start_offset: int = 0) -> dict:
    tokens, offsets, offset = [], [], start_offset
    for d in deltas:
        if d.logprob is not None:
            tokens.append(d.logprob)
            offsets.append(offset)
        offset += len(d.text)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{s: lp for s, _, lp in t.top} for t in tokens], "text_offset": offsets}


class Reply:
    """Identity of one response: id, creation time, model, fingerprint."""

    def __init__(self, services: Services, prefix: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = services.model_id
        self.fingerprint = "kvmart-" + services.model.fingerprint.digest[:12]

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    opened = await open_generation(request, ChatCompletionRequest, chat_request, "chat")
    if not isinstance(opened, Opened):
        return opened
    req, run = opened.req, opened.run
    reply = Reply(opened.services, "chatcmpl")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return opened.stream(chat_stream(run, reply, include_usage, bool(req.logprobs)))
    deltas = await run.collect()
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(d.text for d in deltas),
                                      "refusal": None},
              "logprobs": chat_logprobs(deltas) if req.logprobs else None,
              "finish_reason": run.ended.finish_reason}
    return await opened.answer(lambda: {**reply.head("chat.completion"), "choices": [choice],
                                         "usage": openai_usage(run.usage)})


async def chat_stream(run: Run, reply: Reply, include_usage: bool, logprobs: bool):
    head = reply.head("chat.completion.chunk")

    def chunk(delta: dict, finish_reason: str | None = None, lp: dict | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        return sse({**head, "choices": [choice]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for d in run.deltas():
            if d.text or (logprobs and d.logprob is not None):
                yield chunk({"content": d.text}, lp=chat_logprobs([d]) if logprobs else None)
        yield chunk({}, run.ended.finish_reason)
        if include_usage:
            yield sse({**head, "choices": [], "usage": openai_usage(run.usage)})
    except KvmartError as e:
        yield sse(error_body(http_error(e)))
    yield sse("[DONE]")


@router.post("/v1/completions")
async def completions(request: Request):
    opened = await open_generation(request, CompletionRequest, completion_request, "completions")
    if not isinstance(opened, Opened):
        return opened
    req, run = opened.req, opened.run
    reply = Reply(opened.services, "cmpl")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return opened.stream(completion_stream(run, reply, include_usage, req.logprobs is not None))
    deltas = await run.collect()
    choice = {"index": 0, "text": "".join(d.text for d in deltas),
              "logprobs": completion_logprobs(deltas) if req.logprobs is not None else None,
              "finish_reason": run.ended.finish_reason}
    return await opened.answer(lambda: {**reply.head("text_completion"), "choices": [choice],
                                         "usage": openai_usage(run.usage)})


async def completion_stream(run: Run, reply: Reply, include_usage: bool, logprobs: bool):
    head = reply.head("text_completion")
    offset = 0
    try:
        async for d in run.deltas():
            if d.text or (logprobs and d.logprob is not None):
                lp = completion_logprobs([d], offset) if logprobs else None
                yield sse({**head, "choices": [{"index": 0, "text": d.text, "logprobs": lp, "finish_reason": None}]})
            offset += len(d.text)
        yield sse({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                        "finish_reason": run.ended.finish_reason}]})
        if include_usage:
            yield sse({**head, "choices": [], "usage": openai_usage(run.usage)})
    except KvmartError as e:
        yield sse(error_body(http_error(e)))
    yield sse("[DONE]")


def model_card(services: Services) -> dict:
    return {"id": services.model_id, "object": "model", "created": int(services.model.folder.stat().st_mtime),
            "owned_by": "kvmart", "context_window": services.model.context_tokens}


@router.get("/v1/models")
async def list_models(request: Request):
    services: Services = request.app.state.services
    await caller(request)
    return {"object": "list", "data": [model_card(services)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    services: Services = request.app.state.services
    await caller(request)
    check_model(services, model_id)
    return model_card(services)
