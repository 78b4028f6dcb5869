"""The OpenAI-compatible HTTP API over the engine (FastAPI).

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events, or not), GET
/v1/models, GET /health (503 while the model loads, then 200 with the engine's load), and for debugging a
template: POST /tokenize, /detokenize and /v1/chat/template (the rendered prompt of a `messages` list).

What clients can rely on, as OpenAI does it (llama.cpp's and vLLM's servers are tested the same way):

- a stream is `data: {chunk}` events sharing one `id`, the role in the first delta, `finish_reason` in
  exactly one chunk, then a usage chunk (`choices: []`) when `stream_options.include_usage`, then
  `data: [DONE]`; an error after the stream started is one `data: {"error": ...}` event, then `[DONE]`;
- `usage` counts tokens exactly: the prompt's ids and every token generated (the stop token included);
- every error is `{"error": {"message", "type", "param", "code"}}` with 400 for a bad request (never
  FastAPI's 422), 401 without the API key, 404 for an unknown model, 429 with Retry-After when the queue
  is full, 503 while loading; nothing a client sends gives a 500.

Sampling defaults follow OpenAI's (temperature 1, top_p 1) unless the model folder's generation_config.json
sets its own. Fields OpenAI has and this server does not (tools, logprobs, penalties other than
`repetition_penalty`, n > 1) are refused with a 400 naming them rather than silently ignored.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.engine import Engine, EngineBusy, SamplingParams
from serve.prompt import PromptBuilder, PromptError

MAX_STOP_STRINGS = 16


@dataclass
class ServerState:
    """What the routes serve: filled in once the model has loaded (`ready`), or the reason it failed."""

    model_name: str
    engine: Engine | None = None
    prompts: PromptBuilder | None = None
    defaults: dict[str, float] = field(default_factory=dict)  # the folder's generation_config sampling values
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.prompts is not None


class APIError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- request bodies ---------------------------------------------------------------------------------------


class Body(BaseModel):
    # Unknown fields are ignored, as OpenAI's API does for fields it has and a client library sends anyway.
    model_config = ConfigDict(extra="ignore")


class ContentPart(Body):
    type: str
    text: str | None = None


class ChatMessage(Body):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(Body):
    include_usage: bool = False


class SamplingBody(Body):
    """Fields shared by both completion routes."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None


class ChatCompletionBody(SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeBody(Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeBody(Body):
    model: str | None = None
    tokens: list[int]


class TemplateBody(Body):
    model: str | None = None
    messages: list[ChatMessage]


# ---- checks -----------------------------------------------------------------------------------------------


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Plain {"role", "content"} dicts; content parts must be text."""
    if not messages:
        raise APIError(400, "'messages' must contain at least one message", param="messages")
    plain = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            kinds = sorted({part.type for part in content if part.type != "text"})
            if kinds:
                raise APIError(
                    400, f"messages[{index}]: only text content is supported, not {kinds}", param="messages"
                )
            content = "".join(part.text or "" for part in content)
        plain.append({"role": message.role, "content": content or ""})
    return plain


def unsupported(body: SamplingBody) -> None:
    """Refuse fields this server does not implement instead of ignoring them."""
    if body.n not in (None, 1):
        raise APIError(
            400, f"n must be 1 (this server returns one choice per request), got {body.n}", param="n"
        )
    checks = [
        ("presence_penalty", body.presence_penalty not in (None, 0)),
        ("frequency_penalty", body.frequency_penalty not in (None, 0)),
        ("logprobs", body.logprobs not in (None, False, 0)),
        ("logit_bias", bool(body.logit_bias)),
    ]
    if isinstance(body, ChatCompletionBody):
        response_type = (body.response_format or {}).get("type", "text")
        checks += [
            ("tools", bool(body.tools)),
            ("top_logprobs", body.top_logprobs not in (None, 0)),
            ("response_format", response_type != "text"),
        ]
    if isinstance(body, CompletionBody):
        checks += [
            ("echo", body.echo),
            ("suffix", bool(body.suffix)),
            ("best_of", body.best_of not in (None, 1)),
        ]
    for name, used in checks:
        if used:
            hint = " (use repetition_penalty)" if name.endswith("_penalty") else ""
            raise APIError(400, f"'{name}' is not supported by this server{hint}", param=name)


def sampling_params(
    body: SamplingBody, defaults: dict[str, float], prompt_tokens: int, context: int
) -> SamplingParams:
    """The engine's settings from a request body, every range checked with a message that names the field."""
    unsupported(body)
    temperature = body.temperature if body.temperature is not None else defaults.get("temperature", 1.0)
    top_p = body.top_p if body.top_p is not None else defaults.get("top_p", 1.0)
    top_k = body.top_k if body.top_k is not None else int(defaults.get("top_k", 0))
    penalty = (
        body.repetition_penalty
        if body.repetition_penalty is not None
        else defaults.get("repetition_penalty", 1.0)
    )
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", param="temperature")
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if top_k < -1:
        raise APIError(400, f"top_k must be -1 or 0 (off) or a positive number, got {top_k}", param="top_k")
    if not 0 < penalty <= 10:
        raise APIError(
            400, f"repetition_penalty must be in (0, 10], got {penalty}", param="repetition_penalty"
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionBody) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    param = (
        "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    )
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{param} must be at least 1, got {max_tokens}", param=param)
    room = context - prompt_tokens
    if max_tokens is None and room < 1:
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens; the prompt has {prompt_tokens}, "
            "which leaves no room for a reply",
            param="messages" if isinstance(body, ChatCompletionBody) else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > room:
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens; the prompt has {prompt_tokens} "
            f"and {param} asks for {max_tokens}",
            param=param,
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else room,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        repetition_penalty=penalty,
        stop=stop,
        seed=None if body.seed is None else body.seed % 2**63,  # any integer a client sends is a valid seed
        ignore_eos=body.ignore_eos,
    )


# ---- the app ----------------------------------------------------------------------------------------------


def build_api(state: ServerState, api_key: str | None = None) -> FastAPI:
    """The API routes on a new FastAPI app; the UI is mounted on it afterwards (serve/app.py).

    One function because the routes are small closures over `state` and the key; the work they share
    (checks, encoding, responses) is in the functions around it."""
    app = FastAPI(title="Open-Llama chat server", docs_url="/docs", redoc_url=None)
    install_error_handlers(app)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes as long whatever the first difference: the key cannot be guessed byte by byte.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def ready(model: str | None = None) -> tuple[Engine, PromptBuilder]:
        if state.load_error is not None:
            raise APIError(503, f"the model failed to load: {state.load_error}", type="server_error")
        if not state.ready:
            raise APIError(
                503,
                "the model is still loading",
                type="server_error",
                code="model_loading",
                headers={"Retry-After": "5"},
            )
        if model is not None and model != state.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{state.model_name}'",
                param="model",
                code="model_not_found",
            )
        return state.engine, state.prompts

    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok", "model": state.model_name, **state.engine.stats()})

    @app.get("/v1/models", dependencies=guarded)
    async def list_models() -> dict[str, Any]:
        ready()
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model:path}", dependencies=guarded)
    async def get_model(model: str) -> dict[str, Any]:
        ready(model)
        return model_card(state)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        engine, prompts = ready(body.model)
        messages = chat_messages(body.messages)
        _, ids = await encode(prompts.encode_chat, messages)
        params = sampling_params(body, state.defaults, len(ids), engine.context_length)
        reply = Reply("chat.completion", "chatcmpl", state.model_name, include_usage=_usage(body))
        return await respond(engine, ids, params, reply, body.stream, request)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionBody, request: Request) -> Response:
        engine, prompts = ready(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await encode(prompts.encode_text, prompt, param="prompt")
        else:  # token ids, given by the client on purpose
            bad = [i for i in prompt if not 0 <= i < engine.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"token ids outside the vocabulary [0, {engine.vocab_size}): {bad[:5]}",
                    param="prompt",
                )
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        params = sampling_params(body, state.defaults, len(ids), engine.context_length)
        reply = Reply("text_completion", "cmpl", state.model_name, include_usage=_usage(body))
        return await respond(engine, ids, params, reply, body.stream, request)

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeBody) -> dict[str, Any]:
        engine, prompts = ready(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either 'prompt' (raw text) or 'messages' (a chat)", param="prompt")
        if body.messages is not None:
            _, ids = await encode(prompts.encode_chat, chat_messages(body.messages))
        else:
            ids = await encode(
                prompts.encode_text, body.prompt, param="prompt", add_special_tokens=body.add_special_tokens
            )
        result: dict[str, Any] = {"count": len(ids), "max_model_len": engine.context_length, "tokens": ids}
        if body.return_token_strs:
            result["token_strs"] = prompts.pieces(ids)
        return result

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeBody) -> dict[str, Any]:
        engine, prompts = ready(body.model)
        bad = [i for i in body.tokens if not 0 <= i < engine.vocab_size]
        if bad:
            raise APIError(
                400, f"token ids outside the vocabulary [0, {engine.vocab_size}): {bad[:5]}", param="tokens"
            )
        return {"prompt": prompts.decode(body.tokens)}

    @app.post("/v1/chat/template", dependencies=guarded)
    async def chat_template(body: TemplateBody) -> dict[str, Any]:
        _, prompts = ready(body.model)
        text, ids = await encode(prompts.encode_chat, chat_messages(body.messages))
        return {"prompt": text, "tokens": ids, "count": len(ids), "token_strs": prompts.pieces(ids)}

    return app


def model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "open-llama",
        "max_model_len": state.engine.context_length,
    }


def _usage(body: SamplingBody) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def encode(function, *args, param: str = "messages", **kwargs):
    """Render/tokenize off the event loop (a long prompt must not stall other streams); bad text is a 400."""
    try:
        return await run_in_threadpool(function, *args, **kwargs)
    except PromptError as exc:
        raise APIError(400, str(exc), param=param) from None


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; request validation errors are 400 (not 422) naming the field."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        if error.get("type") == "json_invalid":
            message, param = (
                f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')}",
                None,
            )
        elif not location and error.get("type") == "model_attributes_type":
            message, param = "the request body must be a JSON object", None
        else:
            param = location[0] if location else None
            message = f"invalid '{'.'.join(location)}': {error.get('msg', 'invalid value')}"
            if error.get("type") == "missing":
                message = f"'{'.'.join(location)}' is required"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


# ---- responses ------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """The fixed parts of one response: its kind, id, timestamp and model."""

    kind: str  # "chat.completion" or "text_completion"
    prefix: str
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = f"{self.prefix}-{secrets.token_hex(12)}"
        self.created = int(time.time())

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def envelope(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def choice(self, text: str | None, finish_reason: str | None, *, role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def respond(
    engine: Engine, ids: list[int], params: SamplingParams, reply: Reply, stream: bool, request: Request
) -> Response:
    try:
        events = engine.stream(ids, params)
    except EngineBusy as exc:
        raise APIError(
            429,
            f"the server is busy ({exc}); retry shortly",
            type="rate_limit_error",
            code="server_busy",
            headers={"Retry-After": "1"},
        ) from None
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    if stream:
        return StreamingResponse(
            sse(events, reply), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    collect = asyncio.ensure_future(_collect(events))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        events.cancel()  # frees the slot when the client left; a no-op once the reply is complete
        gone.cancel()
    if not collect.done():
        collect.cancel()
        return Response(status_code=499)  # nobody is listening
    text, last = collect.result()
    if last.error:
        raise APIError(500, last.error, type="server_error")
    if reply.chat:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": last.finish_reason}
    else:
        choice = reply.choice(text, last.finish_reason)
    body = reply.envelope(reply.kind, [choice], usage=usage(last.prompt_tokens, last.completion_tokens))
    return Response(orjson.dumps(body), media_type="application/json")


async def _collect(events) -> tuple[str, Any]:
    parts, last = [], None
    async for event in events:
        parts.append(event.text)
        last = event
    return "".join(parts), last


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def sse(events, reply: Reply) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's order (see the module docstring). Cancelled when the client leaves."""
    kind = "chat.completion.chunk" if reply.chat else "text_completion"
    extra = {"usage": None} if reply.include_usage else {}
    try:
        if reply.chat:
            yield _event(reply.envelope(kind, [reply.choice(None, None, role=True)], **extra))
        async for first in events:
            # A client reading slower than the engine writes gets what has piled up in one chunk.
            batch = [first, *events.pending()]
            text, event = "".join(e.text for e in batch), batch[-1]  # only the last can end the reply
            if text:
                yield _event(reply.envelope(kind, [reply.choice(text, None)], **extra))
            if event.error:
                yield _event(APIError(500, event.error, type="server_error").body())
                break
            if event.finish_reason:
                yield _event(reply.envelope(kind, [reply.choice(None, event.finish_reason)], **extra))
                if reply.include_usage:
                    counts = usage(event.prompt_tokens, event.completion_tokens)
                    yield _event(reply.envelope(kind, [], usage=counts))
        yield b"data: [DONE]\n\n"
    finally:
        events.cancel()
