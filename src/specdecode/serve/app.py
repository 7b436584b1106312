"""The FastAPI app: OpenAI-compatible routes over an :class:`~specdecode.serve.engine.Engine`.

Routes find the engine on ``app.state.engine``; :func:`create_app` leaves it to the caller to put
it there (the CLI builds one before serving, each Ray replica builds its own), so the same app
serves both ways.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specdecode.errors import SpecDecodeError
from specdecode.serve.engine import Engine
from specdecode.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseShape,
    error_response,
    finish_reason,
    usage,
)
from specdecode.serve.scheduler import Event, Failed, Finished, Job, QueueFullError, ShuttingDownError, Started, Text

MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 128}
DISCONNECT_POLL_S = 0.5
API_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")


class LimitBody:
    """Refuse request bodies over ``limit`` bytes with 413, whether or not they declare a length."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body exceeds {self.limit} bytes", code="body_too_large")
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class CountResponses:
    """Counts every response by route, served method and status (errors included)."""

    def __init__(self, app: ASGIApp, engine_of: Callable[[], Engine | None]) -> None:
        self.app, self.engine_of = app, engine_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            engine = self.engine_of()
            if engine is not None:
                method = scope.get("state", {}).get("method", "none")
                # unknown paths share one label: a client must not grow the metrics without bound
                route = scope["path"] if scope["path"] in API_ROUTES else "other"
                engine.metrics.requests.labels(route, method, str(status)).inc()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """OpenAI-style message and ``param`` (the top-level field) for pydantic's first complaint."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return "could not parse the JSON body", None
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = str(loc[0]) if loc else None
    message = {"missing": "missing required parameter", "extra_forbidden": "unknown parameter"}.get(
        first.get("type", ""), first.get("msg", "invalid request"))
    return (f"invalid value for {param!r}: {message}" if param else message), param


def _error_for(exc: Exception) -> JSONResponse:
    """The response for an exception the request caused (or a bug: 500)."""
    if isinstance(exc, SpecDecodeError):
        return error_response(400, str(exc))
    if isinstance(exc, QueueFullError):
        return error_response(429, str(exc), type_="rate_limit_error", code="server_busy")
    if isinstance(exc, ShuttingDownError):
        return error_response(503, str(exc), type_="server_error", code="shutting_down")
    return error_response(500, "internal error", type_="server_error")


def create_app(max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine = getattr(app.state, "engine", None)
        if engine is not None:
            engine.scheduler.close()

    app = FastAPI(title="specdecode", lifespan=lifespan)
    app.add_middleware(CountResponses, engine_of=lambda: getattr(app.state, "engine", None))
    app.add_middleware(LimitBody, limit=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, f"Invalid URL ({request.method} {request.url.path})", code="not_found")
        if exc.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}")
        if exc.status_code == 400:  # FastAPI could not even decode the body
            return error_response(400, "could not parse the request body: send UTF-8 JSON")
        return error_response(exc.status_code, str(exc.detail))

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        return _error_for(exc)

    for refusal in (SpecDecodeError, QueueFullError, ShuttingDownError):
        app.add_exception_handler(refusal, refused)
    app.add_exception_handler(Exception, refused)  # a bug: 500 with an OpenAI-shaped body

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        engine: Engine = request.app.state.engine
        alive = engine.scheduler.alive()
        return JSONResponse({"status": "ok" if alive else "worker_dead"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        engine: Engine = request.app.state.engine
        return {"object": "list", "data": [{"id": engine.config.model_id, "object": "model", "created": 0,
                                            "owned_by": "specdecode", "methods": engine.method_names}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _serve(request, body, body.prompt, body.max_tokens or DEFAULT_MAX_TOKENS["completions"])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS["chat"]
        return await _serve(request, body, messages, max_tokens)

    return app


async def _serve(request: Request, body: CompletionRequest | ChatCompletionRequest, prompt: Any,
                 max_tokens: int) -> Response:
    """Queue one generation and answer with its stream or its full result."""
    engine: Engine = request.app.state.engine
    if body.model != engine.config.model_id:
        return error_response(404, f"model {body.model!r} does not exist; this server serves "
                                   f"{engine.config.model_id!r}", param="model", code="model_not_found")
    spec = body.speculative
    options = spec.options() if spec else {}
    method = engine.choose_method(spec.method if spec else None, options)
    request.state.method = method
    settings = dict(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                    top_p=body.top_p, seed=body.seed, stop=tuple(body.stop or ()))
    loop, events = asyncio.get_running_loop(), asyncio.Queue[Event]()

    def deliver(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    job = Job(method, engine.starter(method, options, prompt, settings), deliver, engine.config.request_timeout)
    engine.scheduler.submit(job)
    try:
        first = await events.get()
    except BaseException:
        job.cancel()
        raise
    if isinstance(first, Failed):
        return _error_for(first.error)
    assert isinstance(first, Started)
    shape = ResponseShape(chat=isinstance(body, ChatCompletionRequest), model=body.model)
    if body.stream:
        # the background task also drops the job when the client left before the stream began
        return StreamingResponse(_stream(job, events, shape, first.prompt_tokens, body.include_usage()),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(job.cancel))
    return await _collect(request, job, events, shape, first.prompt_tokens)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(job: Job, events: asyncio.Queue[Event], shape: ResponseShape, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them; statistics ride on the chunk with finish_reason.
    Starlette cancels this generator when the client disconnects: ``finally`` drops the job."""
    try:
        if shape.chat:
            yield _sse(shape.chunk("", first=True))
        while True:
            event = await events.get()
            if isinstance(event, Text):
                yield _sse(shape.chunk(event.text))
            elif isinstance(event, Finished):
                last = shape.chunk(None if shape.chat else "", finish_reason(event.stop_reason))
                yield _sse({**last, "speculative_stats": event.stats})
                if include_usage:
                    yield _sse(shape.usage_chunk(usage(prompt_tokens, event.completion_tokens)))
                yield "data: [DONE]\n\n"
                return
            elif isinstance(event, Failed):
                failure = _error_for(event.error)
                yield _sse(json.loads(failure.body))
                return
    finally:
        job.cancel()


async def _collect(request: Request, job: Job, events: asyncio.Queue[Event], shape: ResponseShape,
                   prompt_tokens: int) -> Response:
    """Wait for the full result, dropping the job if the client goes away meanwhile."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nginx's "client closed request": nobody reads it
                continue
            if isinstance(event, Finished):
                return JSONResponse(shape.full(event.text, finish_reason(event.stop_reason),
                                               usage(prompt_tokens, event.completion_tokens), event.stats))
            if isinstance(event, Failed):
                return _error_for(event.error)
    finally:
        job.cancel()
