"""What the completions and chat endpoints share: the app's context, usage counting, SSE framing."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from .errors import OpenAIError
from .metrics import GatewayMetrics
from .triton import ModelInfo, TritonBackend, TritonCallError

OPENAI_FINISH_REASONS = ("stop", "length")


@dataclass
class Context:
    """What every handler needs: the Triton connection and the metrics."""

    backend: TritonBackend
    metrics: GatewayMetrics

    async def model(self, name: str) -> ModelInfo:
        """The served model `name`; 404 when Triton serves no such model (503 when Triton is down)."""
        try:
            info = await self.backend.model(name)
        except TritonCallError as err:
            raise err.to_openai() from None
        if info is None:
            raise OpenAIError(
                404, f"The model {name!r} does not exist", param="model", code="model_not_found"
            )
        return info


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def finish_reason(engine_reason: str | None) -> str:
    """OpenAI's finish_reason for the llm model's (an abort or anything else reads as `stop`)."""
    return engine_reason if engine_reason in OPENAI_FINISH_REASONS else "stop"


class Usage:
    """Token counts from the num_input_tokens / num_output_tokens outputs: each prompt counted once."""

    def __init__(self) -> None:
        self.prompt_tokens_by_prompt: dict[int, int] = {}
        self.completion_tokens = 0

    def add(self, prompt_index: int, num_input_tokens: int | None, num_output_tokens: int) -> None:
        if num_input_tokens is not None:
            self.prompt_tokens_by_prompt[prompt_index] = num_input_tokens
        self.completion_tokens += num_output_tokens

    def as_dict(self) -> dict[str, int]:
        prompt = sum(self.prompt_tokens_by_prompt.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_response(ctx: Context, events: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response of `events`, counted in the open-streams gauge; an error after the stream started
    is sent as a `data: {"error": ...}` event (the status is already out), then `[DONE]`."""

    async def body() -> AsyncIterator[str]:
        ctx.metrics.open_streams.inc()
        try:
            async for event in events:
                yield event
        except OpenAIError as err:
            yield sse(err.body())
            yield SSE_DONE
        finally:
            ctx.metrics.open_streams.dec()
            await events.aclose()  # type: ignore[attr-defined]  # NOTE: cancels the Triton requests if still running

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
