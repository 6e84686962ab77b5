"""POST /v1/completions: OpenAI's (legacy) completions API over the llm model's `text_input` / `input_ids`.

A list of prompts is one Triton request per prompt; choice `i` of prompt `p` is `p * n + i`. `echo` puts the
prompt's text first (with `logprobs`, also its tokens' log-probabilities, from the `prompt_logprobs` input;
the first token has none, as OpenAI's).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response

from .common import SSE_DONE, Context, Usage, finish_reason, new_id, now, sse, sse_response
from .errors import invalid
from .generation import Generation, SequenceUpdate, TritonRequest, start_generation, with_first
from .logprobs import CompletionLogprobs, TokenText, first_prompt_token_text
from .request_mapping import check_max_tokens, extra_inputs, plan_requests, sampling_options
from .schemas import CompletionRequest
from .triton import ModelInfo


def _prompts(req: CompletionRequest, model: ModelInfo) -> tuple[list[dict[str, Any]], list[str]]:
    """(build_inputs keyword arguments per prompt, each prompt's text for `echo`)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [{"prompt": prompt}], [prompt]
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt], list(prompt)  # type: ignore[misc]
    id_lists = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
    texts = [
        model.tokenizer.decode(ids, skip_special_tokens=False) if model.tokenizer else "" for ids in id_lists
    ]
    return [{"input_ids": ids} for ids in id_lists], texts  # type: ignore[union-attr]


def plan_completion(model: ModelInfo, req: CompletionRequest) -> tuple[list[TritonRequest], list[str]]:
    """The Triton requests of a completions request, and the prompts' texts; 400 for what cannot be done."""
    if req.suffix:
        raise invalid("suffix", "suffix is not supported")
    if req.best_of is not None and req.best_of != req.n:
        raise invalid(
            "best_of", f"best_of must equal n ({req.n}): this server returns every sequence it samples"
        )
    check_max_tokens(model, req.max_tokens, "max_tokens")
    prompts, texts = _prompts(req, model)
    sampling = sampling_options(req, req.max_tokens, req.logprobs)
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    extra = extra_inputs(model, req, req.n, prompt_logprobs=prompt_logprobs)
    return plan_requests(model, req, prompts, sampling, extra), texts


@dataclass
class CompletionChoice:
    index: int
    prompt_index: int
    parts: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs | None = None
    started: bool = False
    finished: bool = False


class _State:
    """The choices of one request and the prompt logprobs each prompt's requests sent."""

    def __init__(self, req: CompletionRequest, texts: list[str], text_of: TokenText) -> None:
        self.req, self.texts = req, texts
        self.choices = [CompletionChoice(i, i // req.n) for i in range(len(texts) * req.n)]
        for choice in self.choices:
            if req.logprobs is not None:
                choice.logprobs = CompletionLogprobs(text_of, req.logprobs)
        self.prompt_entries: dict[int, list[Any]] = {}
        self.text_of = text_of
        self.usage = Usage()

    def add(self, update: SequenceUpdate) -> tuple[CompletionChoice, str, dict[str, Any] | None]:
        """Fold an update into its choice; (choice, the text it adds, the logprobs it adds in OpenAI's shape)."""
        self.usage.add(update.prompt_index, update.num_input_tokens, update.num_output_tokens)
        if update.prompt_logprobs is not None:
            self.prompt_entries[update.prompt_index] = update.prompt_logprobs
        choice = self.choices[update.choice]
        text = update.text
        start = len(choice.logprobs.tokens) if choice.logprobs is not None else 0
        if not choice.started:
            choice.started = True
            if self.req.echo:
                prompt = self.texts[choice.prompt_index]
                text = prompt + text
                entries = self.prompt_entries.get(choice.prompt_index)
                if choice.logprobs is not None and entries is not None:
                    choice.logprobs.add(entries, first_prompt_token_text(prompt, entries, self.text_of))
                elif choice.logprobs is not None:
                    choice.logprobs.offset += len(prompt)
        logprobs = None
        if choice.logprobs is not None:
            choice.logprobs.add(update.logprobs or [])
            logprobs = choice.logprobs.since(start)
        choice.parts.append(text)
        return choice, text, logprobs


async def create(ctx: Context, req: CompletionRequest, arrival: float) -> Response:
    """Answer one completions request (JSON, or SSE when `stream`)."""
    model = await ctx.model(req.model)
    requests, texts = plan_completion(model, req)
    generation = Generation(ctx.backend, model, requests, req.max_tokens, "max_tokens")
    first, updates = await start_generation(generation)
    if first is not None:
        ctx.metrics.ttft.labels("/v1/completions").observe(time.monotonic() - arrival)
    state = _State(req, texts, TokenText(model.tokenizer))
    if req.stream:
        return sse_response(ctx, _stream(state, first, updates))
    return JSONResponse(await _collect(state, first, updates))


async def _collect(
    state: _State, first: SequenceUpdate | None, updates: AsyncIterator[SequenceUpdate]
) -> dict[str, Any]:
    reasons: dict[int, str | None] = {}
    async with aclosing(updates):
        async for update in with_first(first, updates):
            state.add(update)
            if update.finish_reason is not None:
                reasons[update.choice] = update.finish_reason
    choices = []
    for choice in state.choices:
        text = "".join(choice.parts)
        if not choice.started and state.req.echo:
            text = state.texts[choice.prompt_index]
        choices.append(
            {
                "index": choice.index,
                "text": text,
                "logprobs": choice.logprobs.whole() if choice.logprobs is not None else None,
                "finish_reason": finish_reason(reasons.get(choice.index)),
            }
        )
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": state.req.model,
        "system_fingerprint": None, "choices": choices, "usage": state.usage.as_dict(),
    }  # fmt: skip


async def _stream(
    state: _State, first: SequenceUpdate | None, updates: AsyncIterator[SequenceUpdate]
) -> AsyncIterator[str]:
    req = state.req
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base: dict[str, Any] = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": req.model,
                            "system_fingerprint": None}  # fmt: skip
    if include_usage:
        base["usage"] = None

    def chunk(index: int, text: str, logprobs: Any, reason: str | None) -> str:
        return sse(
            {
                **base,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}],
            }
        )

    async with aclosing(updates):
        async for update in with_first(first, updates):
            choice, text, logprobs = state.add(update)
            reason = None
            if update.finish_reason is not None:
                choice.finished, reason = True, finish_reason(update.finish_reason)
            if text or update.token_ids or reason is not None:
                yield chunk(choice.index, text, logprobs, reason)
    for choice in state.choices:
        if not choice.finished:
            text = state.texts[choice.prompt_index] if req.echo and not choice.started else ""
            yield chunk(
                choice.index,
                text,
                choice.logprobs.whole() if choice.logprobs is not None and not choice.started else None,
                "stop",
            )
    if include_usage:
        yield sse({**base, "choices": [], "usage": state.usage.as_dict()})
    yield SSE_DONE
