"""The FastAPI app: routes, API keys, the body limit, and every error in OpenAI's shape."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import chat, completions
from .common import Context
from .errors import OpenAIError
from .metrics import GatewayMetrics, MetricsMiddleware
from .schemas import ChatCompletionRequest, CompletionRequest, parse_body
from .triton import DEFAULT_LIVENESS_S, TritonBackend, TritonCallError

logger = logging.getLogger("inflight.gateway")

DEFAULT_MAX_BODY_BYTES = 8 << 20
OPEN_PATHS = ("/health",)  # answered without an API key


class ApiKeyMiddleware:
    """Pure ASGI: without `Authorization: Bearer <one of the keys>` every path but /health answers 401."""

    def __init__(self, app: Any, api_keys: Sequence[str]) -> None:
        self.app, self.keys = app, [k.encode() for k in api_keys]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and any(secrets.compare_digest(token.strip(), k) for k in self.keys):
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided." if token else "Missing API key: send `Authorization: Bearer <key>`."
        )
        error = OpenAIError(401, message, "invalid_request_error", code="invalid_api_key")
        await error.response()(scope, receive, send)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body; 413 when it is (or declares itself) larger than `max_bytes`.

    NOTE: a body up to 4x the limit is read to its end (and dropped) before the 413: answering while the
    client still sends makes it see a reset connection instead of the answer.
    """
    too_large = OpenAIError(
        413,
        f"the request body is larger than this server's limit of {max_bytes} bytes",
        code="request_too_large",
    )
    drain_limit = 4 * max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > drain_limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > drain_limit:
            raise too_large
        if size <= max_bytes:
            chunks.append(chunk)
    if size > max_bytes:
        raise too_large
    return b"".join(chunks)


# What the metrics count for a request whose client went away before its answer (nginx's code).
CLIENT_CLOSED_REQUEST = 499


async def _client_gone(request: Request) -> None:
    """Returns once the HTTP client has disconnected (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_gone(request: Request, answer: Awaitable[Response]) -> Response:
    """`answer`, cancelled (with its Triton requests, which frees their KV blocks) when the HTTP client
    disconnects first: a non-streamed request, or a streamed one before its first token."""
    task = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client went away (or this handler is being cancelled)
            task.cancel()
        await asyncio.gather(gone, return_exceptions=True)
    try:
        return await task
    except asyncio.CancelledError:
        pass
    # NOTE: nobody reads this answer; it only labels the request in the metrics.
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def create_app(
    triton_url: str, api_keys: Sequence[str] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    stream_timeout_s: float | None = 600.0, liveness_s: float | None = DEFAULT_LIVENESS_S,
) -> FastAPI:  # fmt: skip
    """The gateway in front of the Triton server at `triton_url` (gRPC, host:port)."""
    backend = TritonBackend(triton_url, stream_timeout_s, liveness_s)
    metrics = GatewayMetrics()
    ctx = Context(backend, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        await backend.close()

    app = FastAPI(
        title="inflight OpenAI-compatible gateway", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.ctx = ctx

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError) -> Response:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
        code = "not_found" if err.status_code == 404 else None
        return OpenAIError(err.status_code, str(err.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> Response:
        logger.exception("unexpected error answering %s", request.url.path)
        return OpenAIError(500, f"internal error: {type(err).__name__}: {err}", "server_error").response()

    @app.get("/health")
    async def health() -> Response:
        if await backend.is_live():
            return JSONResponse({"status": "ok"})
        return OpenAIError(
            503, "the Triton server is not reachable", "server_error", retry_after_s=1
        ).response()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models() -> Response:
        try:
            models = await backend.models()
        except TritonCallError as err:
            raise err.to_openai() from None
        data = [{"id": m.name, "object": "model", "created": m.created, "owned_by": "inflight",
                 "max_model_len": m.max_model_len} for m in models]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> Response:
        model = await ctx.model(name)
        return JSONResponse({"id": model.name, "object": "model", "created": model.created, "owned_by": "inflight",
                             "max_model_len": model.max_model_len})  # fmt: skip

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        arrival = request.scope.get("state", {}).get("arrival", time.monotonic())
        body = parse_body(CompletionRequest, await read_body(request, max_body_bytes))
        return await unless_client_gone(request, completions.create(ctx, body, arrival))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        arrival = request.scope.get("state", {}).get("arrival", time.monotonic())
        body = parse_body(ChatCompletionRequest, await read_body(request, max_body_bytes))
        return await unless_client_gone(request, chat.create(ctx, body, arrival))

    app.add_middleware(ApiKeyMiddleware, api_keys=list(api_keys))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
