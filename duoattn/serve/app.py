"""The FastAPI application: OpenAI's endpoints, server-sent events, OpenAI-style errors, health and metrics."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import COMPLETION_DEFAULT_MAX_TOKENS, APIError, Engine, Piece
from .schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
    Usage,
)

DONE = "data: [DONE]\n\n"


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           type: str | None = None) -> JSONResponse:
    err = APIError(status, message, param, code, type)
    body = ErrorBody(error=ErrorDetail(message=err.message, type=err.type, param=err.param, code=err.code))
    return JSONResponse(body.model_dump(), status_code=status)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _param(loc: tuple) -> str | None:
    """The field of a validation error: ``("body", "messages", 0, "content")`` -> ``"messages[0].content"``.

    pydantic adds the tried alternative of a union to the location (``("stop", "list[str]", 0)``); the path ends
    before it.
    """
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or any(c in part for c in "[(-")):
            break
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        return _error(400, f"malformed JSON body: {reason}", code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    if param is None:
        return _error(400, "the request body must be a JSON object with the endpoint's fields")
    # A union reports one error per alternative: name them all (a few), for the same field.
    messages = list(dict.fromkeys(e.get("msg", "invalid value") for e in errors
                                  if _param(tuple(e.get("loc", ()))) == param))[:3]
    return _error(400, f"{param}: {'; or '.join(messages)}", param=param)


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def _first(pieces: AsyncIterator[Piece]) -> tuple[Piece, AsyncIterator[Piece]]:
    """The first piece (so that refusals before any token are HTTP errors, not broken streams), and the rest."""
    try:
        return await anext(pieces), pieces
    except StopAsyncIteration:  # the client left before the first token: nobody reads this answer
        raise APIError(499, "the client disconnected before the first token", code="client_disconnected") from None


async def _stream_events(first: Piece, rest: AsyncIterator[Piece], chunk: Callable[[Piece], list[BaseModel]],
                         usage: Callable[[Piece], BaseModel] | None) -> AsyncIterator[str]:
    """SSE lines for every piece, an OpenAI error object if generation fails mid-stream, then ``[DONE]``."""
    last = first
    try:
        for model in chunk(first):
            yield _sse(model)
        if first.finish_reason is None:
            async for piece in rest:
                last = piece
                for model in chunk(piece):
                    yield _sse(model)
        if usage is not None:
            yield _sse(usage(last))
    except APIError as err:
        detail = ErrorDetail(message=err.message, type=err.type, param=err.param, code=err.code)
        yield _sse(ErrorBody(error=detail))
    finally:
        await rest.aclose()  # a client that went away ends the generation (and frees its memory) now
    yield DONE


async def _collect(first: Piece, rest: AsyncIterator[Piece]) -> Piece:
    """All pieces joined into one."""
    texts, last = [first.text], first
    try:
        if first.finish_reason is None:
            async for piece in rest:
                texts.append(piece.text)
                last = piece
    finally:
        await rest.aclose()  # ends a generation stopped by a stop sequence now, not when collected
    return Piece("".join(texts), last.finish_reason, last.tokens)


def build_app(engine: Engine) -> FastAPI:
    """The application serving ``engine``; its worker thread runs while the application does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.scheduler.start()
        try:
            yield
        finally:
            engine.scheduler.stop()

    app = FastAPI(title="duoattn", lifespan=lifespan)
    app.state.engine = engine
    metrics = engine.metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.code, exc.type)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")  # the route's path, not the URL: labels stay few
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        pool = engine.pool
        body = {"status": "ok" if engine.scheduler.alive else "worker stopped", "model": engine.served_name,
                "running": pool.running, "waiting": pool.waiting, "kv_bytes_in_use": pool.in_use,
                "kv_bytes_capacity": pool.capacity}
        return JSONResponse(body, status_code=200 if engine.scheduler.alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=engine.served_name, created=engine.created)])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine.check_model(body.model)
        prompt = engine.completion_prompt(body)
        params = engine.sampling(body, len(prompt), body.max_tokens, "prompt", COMPLETION_DEFAULT_MAX_TOKENS)
        first, rest = await _first(engine.generate(request, prompt, params, body.stops()))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def completion(text: str, reason: str | None, usage: Usage | None = None) -> Completion:
            choice = CompletionChoice(text=text, finish_reason=reason)
            return Completion(id=rid, created=created, model=engine.served_name, choices=[choice], usage=usage)

        if not body.stream:
            done = await _collect(first, rest)
            return JSONResponse(completion(done.text, done.finish_reason,
                                           _usage(len(prompt), done.tokens)).model_dump())
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        usage = (lambda p: Completion(id=rid, created=created, model=engine.served_name, choices=[],
                                      usage=_usage(len(prompt), p.tokens))) if include_usage else None
        events = _stream_events(first, rest, lambda p: [completion(p.text, p.finish_reason)], usage)
        return StreamingResponse(events, media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine.check_model(body.model)
        prompt = engine.chat_prompt(body)
        params = engine.sampling(body, len(prompt), body.token_limit(), "messages", engine.config.default_max_tokens)
        first, rest = await _first(engine.generate(request, prompt, params, body.stops()))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if not body.stream:
            done = await _collect(first, rest)
            choice = ChatChoice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)
            reply = ChatCompletion(id=rid, created=created, model=engine.served_name, choices=[choice],
                                   usage=_usage(len(prompt), done.tokens))
            return JSONResponse(reply.model_dump())

        def chunk(delta: ChatDelta, reason: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=engine.served_name,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=reason)])

        sent_role = False

        def chunks(piece: Piece) -> list[BaseModel]:
            nonlocal sent_role
            out: list[BaseModel] = []
            if not sent_role:  # OpenAI's first chunk names the role
                out.append(chunk(ChatDelta(role="assistant", content="")))
                sent_role = True
            if piece.text:
                out.append(chunk(ChatDelta(content=piece.text)))
            if piece.finish_reason is not None:
                out.append(chunk(ChatDelta(), piece.finish_reason))
            return out

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        usage = (lambda p: ChatCompletionChunk(id=rid, created=created, model=engine.served_name, choices=[],
                                               usage=_usage(len(prompt), p.tokens))) if include_usage else None
        return StreamingResponse(_stream_events(first, rest, chunks, usage), media_type="text/event-stream")

    return app
