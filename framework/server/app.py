"""The FastAPI application: OpenAI routes over an :class:`~framework.async_engine.AsyncEngine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics``, vLLM's ``POST /tokenize``,
``POST /detokenize`` and ``GET /version`` (:mod:`framework.server.utility_routes`), plus those
plugins register through ``register_routes``. With an API key, the ``/v1`` and plugin routes need ``Authorization:
Bearer <key>`` (compared in constant time); ``/health`` and ``/metrics`` stay open for probes
and scrapers.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from framework.async_engine import (
    AsyncEngine,
    AsyncEngineConfig,
    EngineShutdownError,
    QueueFullError,
    RequestStream,
)
from framework.errors import ConfigError, InvalidRequestError
from framework.outputs import RequestOutput
from framework.sampling_params import SamplingParams
from framework.server.errors import (
    APIError,
    bad_request,
    internal,
    model_not_found,
    overloaded,
    too_large,
    unauthorized,
)
from framework.server.limits import LimitsMiddleware
from framework.server.metrics import ServerMetrics
from framework.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ParamsBuilder,
    chat_messages,
    constraint_fields,
    parse_body,
)
from framework.server.responses import (
    TokenText,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    join_logprobs,
    prompt_logprobs,
    usage,
)
from framework.server.streaming import (
    STREAM_ERRORS,
    chat_events,
    completion_events,
    merge,
    prime,
    stream_error,
)

logger = logging.getLogger("decodekit.server")

_INLINE_TOKENIZE_CHARS = 8192  # longer prompts are tokenized off the event loop


@dataclass(slots=True)
class ServerConfig:
    """Options of ``decodekit serve`` (see docs/server.md)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None  # the id clients send as "model"; default: the spec's model
    max_queue: int = 256  # requests waiting for a place in the batch before 429
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the model's context
    request_timeout: float | None = 600.0
    shutdown_timeout: float = 30.0  # seconds running requests get to finish at shutdown
    retry_after: float = 1.0
    log_level: str = "info"


class ServerState:
    """Everything the routes share: the engine front end, the spec's defaults, metrics."""

    def __init__(self, pipeline: Any, config: ServerConfig):
        self.pipeline = pipeline
        self.config = config
        self.engine = pipeline.engine
        self.tokenizer = pipeline.tokenizer
        if self.tokenizer is None:
            raise ConfigError("the server needs a model with a tokenizer")
        self.metrics = ServerMetrics()
        self.aengine = AsyncEngine(self.engine, AsyncEngineConfig(
            max_queue=config.max_queue, request_timeout=config.request_timeout,
            retry_after=config.retry_after, observers=[self.metrics],
        ))
        self.builder = ParamsBuilder(pipeline.loaded, self.engine.pm)
        spec_model = pipeline.loaded.spec.model
        # a registered name ("demo") as is; a directory by its last component
        self.model_name = config.model_name or (Path(spec_model).name if ("/" in spec_model or "\\" in spec_model) else spec_model)
        self.model_aliases = {self.model_name, spec_model}
        self.token_text = TokenText(self.tokenizer)
        self.created = int(time.time())
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    # ------------------------------------------------------------------ request steps
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_aliases:
            raise model_not_found(model)

    async def tokenize(self, text: str, param: str, add_special_tokens: bool = True) -> dict[str, Any]:
        if not text:
            raise bad_request(f"{param} is empty", param=param)
        encode = self.tokenizer.encode
        try:
            if len(text) <= _INLINE_TOKENIZE_CHARS:
                ids = encode(text, add_special_tokens=add_special_tokens)
            else:
                ids = await asyncio.to_thread(encode, text, add_special_tokens=add_special_tokens)
        except Exception as exc:  # noqa: BLE001 - whatever the tokenizer rejects is bad input
            raise bad_request(f"{param} could not be tokenized: {exc}", param=param) from None
        self.check_length(len(ids), param)
        return {"prompt": text, "prompt_token_ids": ids}

    def check_length(self, n: int, param: str) -> None:
        limit = self.config.max_prompt_tokens
        if limit is not None and n > limit:
            raise too_large(f"{param} has {n} tokens; this server accepts at most {limit}", param=param, code="prompt_too_long")
        if n >= self.engine.max_model_len:
            raise bad_request(
                f"{param} has {n} tokens; the model's context is {self.engine.max_model_len} tokens "
                "(prompt + at least one generated token must fit)", param=param, code="context_length_exceeded")

    async def submit(self, rid: str, prompts: list[Any], params: SamplingParams, param: str,
                     constraint_param: str | None = None) -> list[RequestStream]:
        """Queue one request per prompt (ids ``rid-0``, ``rid-1`` ...); all or none. Errors
        become API errors: 400 naming ``param`` (the prompt), ``processors`` or
        ``constraint_param`` (the request field that asked for the constraint), 429, 503."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                streams.append(await self.aengine.add_request(f"{rid}-{i}", prompt, params))
        except BaseException as exc:
            for s in streams:
                s.abort()
            if isinstance(exc, InvalidRequestError):
                msg = str(exc)
                where = (param if msg.startswith("prompt") else constraint_param if msg.startswith("constraint")
                         else "processors" if msg.startswith("processor ") else None)
                raise bad_request(msg, param=where) from None
            if isinstance(exc, QueueFullError):
                raise overloaded(429, str(exc), exc.retry_after) from None
            if isinstance(exc, EngineShutdownError):
                raise overloaded(503, str(exc), exc.retry_after) from None
            raise
        return streams

    async def collect(self, request: Request, streams: list[RequestStream],
                      error_param: str | None = None) -> list[RequestOutput] | None:
        """Final outputs of every stream; None if the client went away (requests aborted)."""
        return await _until_disconnect(request, asyncio.gather(*(s.result() for s in streams)), streams, error_param)

    async def start_stream(self, request: Request, streams: list[RequestStream],
                           error_param: str | None = None) -> AsyncIterator[tuple[int, RequestOutput]] | None:
        """The merged deltas of ``streams`` once the first one is there, so that an error before
        the first token is an HTTP status, not an event; None if the client went away first.
        Used for constrained requests, whose constraint may fail to compile after admission;
        other streams send their headers at once."""
        return await _until_disconnect(request, prime(merge(streams)), streams, error_param, abort=False)


async def _until_disconnect(request: Request, work: Any, streams: list[RequestStream], error_param: str | None,
                            abort: bool = True) -> Any:
    """Await ``work`` unless the client disconnects first (then None). The streams are aborted
    on the way out when ``abort`` (always when the work failed or the client left)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    ok = False
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            return None
        result = task.result()
        ok = True
        return result
    except STREAM_ERRORS as exc:
        raise stream_error(exc, error_param) from None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        if abort or not ok:
            for s in streams:
                s.abort()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------------------- the app
def create_app(pipeline: Any, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app serving ``pipeline`` (a :class:`framework.pipeline.Pipeline`)."""
    config = config or ServerConfig()
    state = ServerState(pipeline, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.aengine.start()
        try:
            yield
        finally:
            await state.aengine.shutdown(config.shutdown_timeout)

    app = FastAPI(title="decodekit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(LimitsMiddleware, max_body_bytes=config.max_body_bytes, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return JSONResponse(internal().body(), status_code=500)

    def auth(request: Request) -> None:
        key = config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise unauthorized()

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.aengine.accepting:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(state.aengine), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "decodekit",
                "max_model_len": state.engine.max_model_len}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(auth)])
    async def get_model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return model_card()

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse_body(await request.body(), CompletionRequest)
        state.check_model(req.model)
        params = state.builder.build(req, chat=False)
        prompts = await _completion_prompts(state, req.prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        cparam = next(iter(constraint_fields(req)), None)
        streams = await state.submit(rid, prompts, params, "prompt", cparam)
        echo = [p["prompt"] if req.echo else "" for p in prompts]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = await state.start_stream(request, streams, cparam) if cparam else merge(streams)
            if events is None:
                return Response(status_code=499)
            return _EventStream(completion_events(state, rid, events, streams, params, echo, include_usage, cparam), streams)
        outs = await state.collect(request, streams, cparam)
        if outs is None:
            return Response(status_code=499)
        k = params.logprobs or 0
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                lp = completion_logprobs(c, state.token_text, k, len(echo[i]))
                if lp is not None and req.echo:
                    lp = join_logprobs(prompt_logprobs(out, state.token_text, k), lp)
                choices.append({"index": i * params.n + c.index, "text": echo[i] + c.text, "logprobs": lp,
                                "finish_reason": finish_reason(c)})
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": state.model_name, "choices": choices, "usage": usage(outs)})

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(request: Request) -> Response:
        req: ChatCompletionRequest = parse_body(await request.body(), ChatCompletionRequest)
        state.check_model(req.model)
        params = state.builder.build(req, chat=True)
        messages = chat_messages(req.messages)
        from framework.chat import render_chat

        try:
            text = render_chat(state.tokenizer, messages)
        except InvalidRequestError as exc:
            raise bad_request(str(exc), param="messages") from None
        prompt = await state.tokenize(text, "messages", add_special_tokens=not state.has_chat_template)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        cparam = next(iter(constraint_fields(req)), None)
        streams = await state.submit(rid, [prompt], params, "messages", cparam)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = await state.start_stream(request, streams, cparam) if cparam else merge(streams)
            if events is None:
                return Response(status_code=499)
            return _EventStream(chat_events(state, rid, events, streams[0], params, include_usage, cparam), streams)
        outs = await state.collect(request, streams, cparam)
        if outs is None:
            return Response(status_code=499)
        k = params.logprobs or 0
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c, state.token_text, k), "finish_reason": finish_reason(c)}
                   for c in outs[0].outputs]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                             "model": state.model_name, "choices": choices, "usage": usage(outs)})

    from framework.server.utility_routes import add_utility_routes

    add_utility_routes(app, state, auth)
    _add_plugin_routes(app, state, auth)
    return app


def _add_plugin_routes(app: FastAPI, state: ServerState, auth: Any) -> None:
    """Routes registered through ``register_routes`` (behind the API key, like ``/v1``)."""
    builtin = {getattr(r, "path", None) for r in app.routes}
    for reg in state.engine.pm.registry("route"):
        router = reg.factory if isinstance(reg.factory, APIRouter) else reg.factory(state)
        if not isinstance(router, APIRouter):
            raise ConfigError(f"route plugin {reg.name!r} ({reg.source}) must give a fastapi.APIRouter, "
                              f"not {type(router).__name__}")
        clash = sorted(p for r in router.routes if (p := getattr(r, "path", None)) in builtin)
        if clash:
            raise ConfigError(f"route plugin {reg.name!r} ({reg.source}) registers {', '.join(clash)}, which is taken")
        app.include_router(router, dependencies=[Depends(auth)])
        builtin |= {getattr(r, "path", None) for r in router.routes}


async def _completion_prompts(state: ServerState, prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [await state.tokenize(prompt, "prompt")]
    if not prompt:
        raise bad_request("prompt is empty", param="prompt")
    if isinstance(prompt[0], str):
        return [await state.tokenize(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    batch = [prompt] if isinstance(prompt[0], int) else prompt
    out = []
    for i, ids in enumerate(batch):
        param = "prompt" if batch is not prompt else f"prompt[{i}]"
        if not ids:
            raise bad_request(f"{param} is empty", param=param)
        state.check_length(len(ids), param)
        vocab = state.engine.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param)
        try:
            text = state.tokenizer.decode(ids, skip_special_tokens=False)
        except Exception as exc:  # noqa: BLE001 - e.g. an id the model has but its tokenizer lacks
            raise bad_request(f"{param} could not be decoded: {exc}", param=param) from None
        out.append({"prompt": text, "prompt_token_ids": list(ids)})
    return out


class _EventStream(StreamingResponse):
    """A Server-Sent Events response that aborts its requests however it ends (a no-op for
    those that finished), even when the client left before the body generator started."""

    def __init__(self, events: AsyncIterator[str], streams: list[RequestStream]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.streams = streams

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self.streams:
                s.abort()
