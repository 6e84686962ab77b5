"""The gateway's side of Triton: one gRPC channel, a streamed request per generation, the served models.

Decoupled models refuse unary inference, so every generation is one `ModelStreamInfer` stream
(tritonclient.grpc.aio `stream_infer`) carrying one request. The request iterator stays open until the
request's FINAL response arrived, then the stream is closed gracefully; a generation abandoned before its FINAL
(the HTTP client went away) cancels the gRPC call, and Triton cancels the request in the model
(docs/serving.md, "Closing streams", says why only then).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import tritonclient.grpc.aio as grpc_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from inflight.client.grpc_stream import response_outputs

from .errors import OpenAIError, from_triton

# The inputs that make a model one of ours (the llm model's contract); others (`ensemble`) are not served here.
REQUIRED_INPUTS = frozenset({"text_input", "messages", "sampling_parameters"})


class TritonCallError(Exception):
    """A Triton call failed: its message, and the gRPC status name when the call itself failed."""

    def __init__(self, message: str, grpc_code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.grpc_code = message, grpc_code

    def to_openai(self, renames: dict[str, str] | None = None) -> OpenAIError:
        return from_triton(self.message, self.grpc_code, renames)


@dataclass
class ModelInfo:
    """What the gateway reads once from a model's config."""

    name: str
    inputs: frozenset[str]
    created: int
    max_model_len: int | None = None  # None until the config, the checkpoint or an error tells it
    tokenizer: Any = None  # a `tokenizers.Tokenizer` when the checkpoint folder is readable here
    model_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def accepts(self, name: str) -> bool:
        return name in self.inputs


_MAX_MODEL_LEN = re.compile(r"max_model_len (?:is |\()(\d+)")


def _parameter(config: Any, key: str) -> str:
    value = config.parameters.get(key)
    return value.string_value if value is not None else ""


def _context_length(config: Any, model_path: str) -> int | None:
    """The `max_model_len` parameter, else the checkpoint's `max_position_embeddings` when readable here."""
    text = _parameter(config, "max_model_len").strip()
    if text.isdigit():
        return int(text)
    try:
        checkpoint = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = checkpoint.get("max_position_embeddings") or checkpoint.get("text_config", {}).get(
        "max_position_embeddings"
    )
    return int(value) if isinstance(value, int) else None


def _load_tokenizer(config: Any, model_path: str) -> Any:
    """The checkpoint's `tokenizer.json` (for the logprobs' token strings), or None when not readable."""
    folder = _parameter(config, "tokenizer_path") or model_path
    path = Path(folder) / "tokenizer.json"
    if not folder or not path.is_file():
        return None
    from tokenizers import Tokenizer  # NOTE: lazy; the gateway runs without it when Triton is remote

    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 (an unreadable tokenizer only costs the token strings)
        return None


# NOTE: gRPC's default reconnect backoff grows to 120 s: after a Triton restart the channel would stay in
# TRANSIENT_FAILURE (every request a 503) for up to that long. Capped, service returns within a second or two.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
DEFAULT_LIVENESS_S = 5.0


class TritonBackend:
    """A gRPC connection to one Triton server and the llm-style models it serves.

    `liveness_s` (None: off): a request that got no response for that long asks whether the server is live
    and the model ready; if not, it ends with UNAVAILABLE (a 503) instead of waiting for `stream_timeout_s`.
    Triton 2.51 never ends the requests of a model whose backend stub died (docs/serving.md, "Readiness"); a
    stub watchdog (`python -m inflight.tools.server` runs one) unloads such a model, which this sees.
    """

    def __init__(
        self, url: str, stream_timeout_s: float | None = 600.0, liveness_s: float | None = DEFAULT_LIVENESS_S
    ) -> None:
        for scheme in ("grpc://", "http://", "https://"):
            url = url.removeprefix(scheme)
        self.url, self.stream_timeout_s, self.liveness_s = url, stream_timeout_s, liveness_s
        self._client: grpc_aio.InferenceServerClient | None = None
        self._models: dict[str, ModelInfo] = {}
        self._ids = itertools.count()
        self._prefix = f"gw{os.getpid()}-"
        self._health: dict[str, tuple[float, asyncio.Future]] = {}  # model -> (when, its latest check)

    @property
    def client(self) -> grpc_aio.InferenceServerClient:
        # NOTE: created on first use, inside the server's event loop (grpc.aio binds a channel to its loop).
        if self._client is None:
            self._client = grpc_aio.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def is_live(self) -> bool:
        try:
            return bool(await self.client.is_server_live(client_timeout=2.0))
        except (InferenceServerException, grpc.RpcError):
            return False

    async def unavailability(self, model: str) -> str | None:
        """None when the server is live and `model` ready; otherwise what is wrong."""
        timeout_s = max(2.0, self.liveness_s or 0.0)
        try:
            if not await self.client.is_server_live(client_timeout=timeout_s):
                return f"the Triton server at {self.url} is not live"
            if await self.client.is_model_ready(model, client_timeout=timeout_s):
                return None
        except (InferenceServerException, grpc.RpcError) as err:
            text = err.message() if isinstance(err, InferenceServerException) else str(err)
            return f"the Triton server at {self.url} does not answer its health checks ({text})"
        return f"model '{model}' is not ready (its backend stopped or it was unloaded)"

    async def models(self) -> list[ModelInfo]:
        """The ready models of the repository index that take the llm model's inputs (configs read once)."""
        try:
            index = await self.client.get_model_repository_index(as_json=True, client_timeout=10.0)
        except InferenceServerException as err:
            raise TritonCallError(err.message(), _status(err)) from None
        ready = sorted({m["name"] for m in index.get("models", []) if m.get("state") == "READY"})
        found = []
        for name in ready:
            info = self._models.get(name) or await self._read_model(name)
            if info is not None:
                found.append(info)
        return found

    async def model(self, name: str) -> ModelInfo | None:
        """The model `name` if Triton serves it ready (the index is asked again for a name not seen yet)."""
        if name in self._models:
            return self._models[name]
        return next((m for m in await self.models() if m.name == name), None)

    async def _read_model(self, name: str) -> ModelInfo | None:
        try:
            config = (await self.client.get_model_config(name, client_timeout=10.0)).config
        except InferenceServerException:
            return None  # unloaded between the index and now
        inputs = frozenset(i.name for i in config.input)
        if not REQUIRED_INPUTS <= inputs:
            return None
        model_path = _parameter(config, "model_path")
        info = ModelInfo(
            name=name,
            inputs=inputs,
            created=int(time.time()),
            max_model_len=_context_length(config, model_path),
            tokenizer=await asyncio.to_thread(_load_tokenizer, config, model_path),
            model_path=model_path or None,
        )
        self._models[name] = info
        return info

    def learn_context_length(self, model: ModelInfo, message: str) -> None:
        """An llm-model error that names max_model_len tells the context length when nothing else did."""
        match = _MAX_MODEL_LEN.search(message)
        if match and model.max_model_len is None:
            model.max_model_len = int(match.group(1))

    async def generate(
        self, model: str, inputs: list[InferInput]
    ) -> AsyncIterator[tuple[dict[str, Any], bool]]:
        """Send one request; yield (outputs as flat lists, is FINAL) per response until the FINAL one.

        TritonCallError for an error response or a failed call. Closing the generator before the FINAL
        response cancels the request on the server.
        """
        done = asyncio.Event()
        request_id = f"{self._prefix}{next(self._ids)}"

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": model,
                "inputs": inputs,
                "request_id": request_id,
                "parameters": {"triton_enable_empty_final_response": True},
            }
            await (
                done.wait()
            )  # NOTE: half-closing earlier is fine for Triton, but this keeps the call's end ours

        try:
            call = self.client.stream_infer(requests(), stream_timeout=self.stream_timeout_s)
        except InferenceServerException as err:
            raise TritonCallError(err.message(), _status(err)) from None
        finished = False
        try:
            async for result, error in self._guarded(call, model):
                if error is not None:
                    finished = True
                    raise TritonCallError(error.message(), _status(error))
                outputs, final = response_outputs(result)
                finished = final
                yield outputs, final
                if final:
                    return
            finished = True
            raise TritonCallError("the model server closed the stream before the request's final response")
        except grpc.RpcError as err:
            finished = True
            code = err.code().name if hasattr(err, "code") and err.code() is not None else None
            details = err.details() if hasattr(err, "details") else str(err)
            raise TritonCallError(details or str(err), code) from None
        finally:
            done.set()
            if not finished:
                call.cancel()

    async def _shared_check(self, model: str) -> str | None:
        """`unavailability(model)`, one check shared by every request that asks within half a second."""
        entry = self._health.get(model)
        if entry is None or time.monotonic() - entry[0] > 0.5:
            entry = (time.monotonic(), asyncio.ensure_future(self.unavailability(model)))
            self._health[model] = entry
        return await asyncio.shield(entry[1])

    async def _guarded(self, call: Any, model: str) -> AsyncIterator[tuple[Any, Any]]:
        """The call's (result, error) pairs; while none arrives for `liveness_s`, the server's liveness and
        the model's readiness are checked, and a failed check ends the request (TritonCallError UNAVAILABLE).
        A ready model is never second-guessed: a request waiting in a long queue stays."""
        if self.liveness_s is None:
            async for item in call:
                yield item
            return
        iterator = call.__aiter__()
        while True:
            # NOTE: the read is a task awaited with a timeout that never cancels it: cancelling a read of a
            # gRPC stream ends the call.
            read = asyncio.ensure_future(iterator.__anext__())
            try:
                while not (await asyncio.wait({read}, timeout=self.liveness_s))[0]:
                    problem = await self._shared_check(model)
                    if problem is not None:
                        raise TritonCallError(f"{problem}; the request was not completed", "UNAVAILABLE")
                item = read.result()
            except StopAsyncIteration:
                return
            finally:
                if not read.done():
                    read.cancel()
            yield item


def _status(err: InferenceServerException) -> str | None:
    status = err.status()
    return status.removeprefix("StatusCode.") if status else None
