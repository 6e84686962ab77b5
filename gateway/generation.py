"""One OpenAI request as one or more Triton requests, their responses merged into per-choice updates.

A completions request with a list of prompts, or `n` > 1 for a model without the `n` input, is several
Triton requests; each covers the choices `choice_offset ..` (with the `n` input, its responses say which
through `sequence_index`). `Generation` starts them together, merges their responses in arrival order, and
cancels whatever still runs when it is closed early (the HTTP client went away) or one of them fails.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tritonclient.grpc import InferInput

from .errors import OpenAIError, invalid
from .triton import ModelInfo, TritonBackend, TritonCallError


@dataclass
class TritonRequest:
    """One Triton request of an OpenAI request: its inputs, its first choice and its prompt's index."""

    inputs: list[InferInput]
    choice_offset: int
    prompt_index: int
    prompt_text: str | None = None


@dataclass
class SequenceUpdate:
    """One Triton response, as the new part of one choice."""

    choice: int
    prompt_index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any] | None] | None
    prompt_logprobs: list[dict[str, Any] | None] | None
    finish_reason: str | None  # set on the choice's last update
    num_input_tokens: int | None
    num_output_tokens: int


async def start_generation(
    generation: Generation,
) -> tuple[SequenceUpdate | None, AsyncIterator[SequenceUpdate]]:
    """Start ``generation`` and await its first update (None: it ended without one), then the rest.

    NOTE: an error before any output raises here, so it is still an HTTP status (the generation closed)."""
    generation.start()
    updates = generation.updates()
    try:
        first = await anext(updates, None)
    except BaseException:
        await generation.close()
        raise
    return first, updates


async def with_first(
    first: SequenceUpdate | None, updates: AsyncIterator[SequenceUpdate]
) -> AsyncIterator[SequenceUpdate]:
    """``first`` (the update already awaited to learn the prompt's length, if any), then the rest."""
    if first is None:
        return
    yield first
    async for update in updates:
        yield update


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _json_entries(values: list[Any] | None) -> list[Any] | None:
    if values is None:
        return None
    entries: list[Any] = []
    for value in values:
        parsed = json.loads(_text(value))
        entries.extend(parsed if isinstance(parsed, list) else [parsed])
    return entries


def to_update(outputs: dict[str, Any], request: TritonRequest) -> SequenceUpdate:
    """A `SequenceUpdate` from one response's outputs (flat lists, see `TritonBackend.generate`)."""
    finish = (outputs.get("finish_reason") or [None])[0]
    finish_reason = _text(finish) if finish not in (None, b"", "") else None
    num_in = (outputs.get("num_input_tokens") or [None])[0]
    ids = [int(t) for t in outputs.get("output_ids") or ()]
    num_out = (outputs.get("num_output_tokens") or [None])[0]
    sequence = (outputs.get("sequence_index") or [0])[0]
    return SequenceUpdate(
        choice=request.choice_offset + int(sequence),
        prompt_index=request.prompt_index,
        text="".join(_text(t) for t in outputs.get("text_output") or ()),
        token_ids=ids,
        logprobs=_json_entries(outputs.get("logprobs")),
        prompt_logprobs=_json_entries(outputs.get("prompt_logprobs")),
        finish_reason=finish_reason,
        num_input_tokens=int(num_in) if num_in is not None else None,
        num_output_tokens=int(num_out) if num_out is not None else len(ids),
    )


@dataclass
class Generation:
    """The Triton requests of one OpenAI request, merged: `start()`, then iterate `updates()`.

    `max_tokens` (what the client asked for, None: up to the context) is checked against the context length
    when a prompt's token count arrives: prompt + max_tokens past it is a 400 naming `max_tokens_param`.
    """

    backend: TritonBackend
    model: ModelInfo
    requests: list[TritonRequest]
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    renames: dict[str, str] = field(default_factory=dict)
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _checked_prompts: set[int] = field(default_factory=set)
    _open: int = 0

    def start(self) -> None:
        self._open = len(self.requests)
        self._tasks = [asyncio.create_task(self._pump(r)) for r in self.requests]

    async def _pump(self, request: TritonRequest) -> None:
        try:
            async for outputs, _final in self.backend.generate(self.model.name, request.inputs):
                if outputs:
                    await self._queue.put(to_update(outputs, request))
            await self._queue.put(None)
        except TritonCallError as err:
            self.backend.learn_context_length(self.model, err.message)
            await self._queue.put(err.to_openai(self.renames))
        except Exception as err:  # noqa: BLE001 (a malformed output, a transport fault: never a hung request)
            await self._queue.put(
                OpenAIError(500, f"the model server's answer failed: {err!r}", "server_error")
            )

    async def updates(self) -> AsyncIterator[SequenceUpdate]:
        """The merged updates; an error of any request raises (`OpenAIError`) and cancels the others."""
        try:
            while self._open:
                item = await self._queue.get()
                if item is None:
                    self._open -= 1
                    continue
                if isinstance(item, OpenAIError):
                    raise item
                self._check_context(item)
                yield item
        finally:
            await self.close()

    def _check_context(self, update: SequenceUpdate) -> None:
        if update.prompt_index in self._checked_prompts or update.num_input_tokens is None:
            return
        self._checked_prompts.add(update.prompt_index)
        limit = self.model.max_model_len
        if (
            self.max_tokens is not None
            and limit is not None
            and update.num_input_tokens + self.max_tokens > limit
        ):
            raise invalid(
                self.max_tokens_param,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{update.num_input_tokens + self.max_tokens} tokens ({update.num_input_tokens} in the "
                f"prompt, {self.max_tokens} in the completion). Please reduce the prompt or "
                f"{self.max_tokens_param}.",
            )

    async def close(self) -> None:
        """Cancel every Triton request still running (each cancels its gRPC call) and wait for them."""
        running = [t for t in self._tasks if not t.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
