"""POST /v1/chat/completions: OpenAI's chat API over the llm model's `messages` input.

Streamed, each choice's first chunk carries `role`, and exactly one chunk per choice carries its
`finish_reason`; with `stream_options.include_usage` a last chunk with no choices carries `usage`. Tool calls:
`tool_choice` required / named constrain the output (`guided_json`, `tool_calls.py`), `auto` output is parsed
for calls (a streamed choice's text is held while it may still become a call).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response

from . import tool_calls
from .common import SSE_DONE, Context, Usage, finish_reason, new_id, now, sse, sse_response
from .errors import invalid
from .generation import Generation, SequenceUpdate, TritonRequest, start_generation, with_first
from .logprobs import TokenText, chat_logprobs
from .request_mapping import check_max_tokens, extra_inputs, plan_requests, require_input, sampling_options
from .schemas import ChatCompletionRequest, ChatMessage
from .triton import ModelInfo


@dataclass
class ChatPlan:
    requests: list[TritonRequest]
    max_tokens: int | None
    max_tokens_param: str
    tool_mode: str  # none, auto, required, named
    tool_names: set[str]
    named: str | None
    top_logprobs: int | None  # None: no logprobs
    renames: dict[str, str]


def _message_json(message: ChatMessage) -> dict[str, Any]:
    """A message as the chat template reads it: string content, `developer` as `system`, tool fields kept."""
    out: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        "content": message.text(),
    }
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            try:
                arguments: Any = json.loads(call.function.arguments)
            except ValueError:
                arguments = call.function.arguments
            calls.append(
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": arguments},
                }
            )
        out["tool_calls"] = calls
    return out


def _guided(
    model: ModelInfo, req: ChatCompletionRequest
) -> tuple[str, set[str], str | None, str | None, str]:
    """(tool mode, tool names, named tool, guided_json text or None, the param a schema error names)."""
    tools = req.tools or []
    names = {t.function.name for t in tools}
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise invalid("tool_choice", "tool_choice needs tools: give `tools` or leave tool_choice out")
    schema: dict[str, Any] | None = None
    named = None
    if isinstance(choice, str):
        mode = choice
        if mode == "required":
            schema = tool_calls.required_schema([t.model_dump(exclude_none=True) for t in tools])
    else:
        mode, named = "named", choice.function.name
        tool = next((t for t in tools if t.function.name == named), None)
        if tool is None:
            raise invalid("tool_choice", f"tool_choice names function {named!r}, which is not in tools")
        schema = tool_calls.named_schema(tool.function.parameters)
    param = "tool_choice"
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if schema is not None:
            raise invalid(
                "response_format",
                "response_format cannot be combined with tool_choice required or a named tool",
            )
        param = "response_format"
        if fmt.type == "json_object":
            schema = tool_calls.ANY_OBJECT
        else:
            if fmt.json_schema is None:
                raise invalid(
                    "response_format.json_schema", "response_format json_schema needs a json_schema object"
                )
            schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else tool_calls.ANY_OBJECT
    guided = None
    if schema is not None:
        require_input(model, "guided_json", param, "structured output (guided decoding)")
        guided = json.dumps(schema)
    return mode, names, named, guided, param


def plan_chat(model: ModelInfo, req: ChatCompletionRequest) -> ChatPlan:
    """The Triton requests of a chat request; 400 naming the field for what the model cannot do."""
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    check_max_tokens(model, max_tokens, max_param)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs", "top_logprobs needs logprobs set to true")
    k = (req.top_logprobs or 0) if req.logprobs else None
    mode, names, named, guided, schema_param = _guided(model, req)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and mode != "none" else None
    sampling = sampling_options(req, max_tokens, k)
    extra = extra_inputs(model, req, req.n, guided_json=guided, tools=tools)
    messages = [_message_json(m) for m in req.messages]
    requests = plan_requests(model, req, [{"messages": messages}], sampling, extra)
    renames = {"max_tokens": max_param, "guided_json": schema_param, "logprobs": "top_logprobs"}
    return ChatPlan(requests, max_tokens, max_param, mode, names, named, k, renames)


@dataclass
class ChatChoice:
    """One choice's text so far and how much of it a stream has sent."""

    index: int
    text: str = ""
    entries: list[Any] = field(default_factory=list)
    sent_chars: int = 0
    sent_entries: int = 0
    role_sent: bool = False
    finished: bool = False

    def unsent_logprobs(self, plan: ChatPlan, text_of: TokenText) -> dict[str, Any] | None:
        if plan.top_logprobs is None:
            return None
        content = chat_logprobs(self.entries[self.sent_entries :], plan.top_logprobs, text_of)
        self.sent_entries = len(self.entries)
        return {"content": content, "refusal": None}


def _final_message(
    choice: ChatChoice, plan: ChatPlan, engine_reason: str | None
) -> tuple[str | None, list, str]:
    """(content, tool calls, finish_reason) of a finished choice; with calls in a stream, `content` is the
    part of the text not sent yet that came before them."""
    calls: list[tool_calls.ParsedCall] | None = None
    content: str | None = choice.text
    if plan.tool_mode == "auto":
        content, calls = tool_calls.parse_auto(choice.text[choice.sent_chars :], plan.tool_names)
    elif plan.tool_mode == "required":
        calls = tool_calls.parse_required(choice.text, plan.tool_names)
    elif plan.tool_mode == "named" and plan.named is not None:
        calls = tool_calls.parse_named(choice.text, plan.named)
    if calls:
        reason = "stop" if plan.tool_mode == "named" else "tool_calls"
        return (content if plan.tool_mode == "auto" else None), calls, reason
    return choice.text, [], finish_reason(engine_reason)


def _streamable_end(choice: ChatChoice, plan: ChatPlan) -> int:
    """How much of the choice's text a stream may send now: text that is, or may still become, a tool call
    is held back until the choice finishes."""
    if plan.tool_mode in ("required", "named"):
        return choice.sent_chars
    if plan.tool_mode != "auto":
        return len(choice.text)
    if choice.sent_chars == 0 and tool_calls.may_become_call(choice.text):
        return 0
    return max(choice.sent_chars, tool_calls.text_before_call(choice.text))


async def create(ctx: Context, req: ChatCompletionRequest, arrival: float) -> Response:
    """Answer one chat request (JSON, or SSE when `stream`)."""
    model = await ctx.model(req.model)
    plan = plan_chat(model, req)
    generation = Generation(
        ctx.backend, model, plan.requests, plan.max_tokens, plan.max_tokens_param, plan.renames
    )
    first, updates = await start_generation(generation)
    if first is not None:
        ctx.metrics.ttft.labels("/v1/chat/completions").observe(time.monotonic() - arrival)
    text_of = TokenText(model.tokenizer)
    if req.stream:
        return sse_response(ctx, _stream(req, plan, text_of, first, updates))
    return JSONResponse(await _collect(req, plan, text_of, first, updates))


async def _collect(
    req: ChatCompletionRequest, plan: ChatPlan, text_of: TokenText, first: SequenceUpdate | None,
    updates: AsyncIterator[SequenceUpdate],
) -> dict[str, Any]:  # fmt: skip
    choices = {i: ChatChoice(i) for i in range(req.n)}
    reasons: dict[int, str | None] = {}
    usage = Usage()
    async with aclosing(updates):
        async for update in with_first(first, updates):
            choice = choices[update.choice]
            choice.text += update.text
            choice.entries += update.logprobs or []
            usage.add(update.prompt_index, update.num_input_tokens, update.num_output_tokens)
            if update.finish_reason is not None:
                reasons[update.choice] = update.finish_reason
    out = []
    for i, choice in choices.items():
        content, calls, reason = _final_message(choice, plan, reasons.get(i))
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = tool_calls.openai_calls(calls)
        out.append(
            {
                "index": i,
                "message": message,
                "logprobs": choice.unsent_logprobs(plan, text_of),
                "finish_reason": reason,
            }
        )
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": req.model,
        "system_fingerprint": None, "choices": out, "usage": usage.as_dict(),
    }  # fmt: skip


async def _stream(
    req: ChatCompletionRequest, plan: ChatPlan, text_of: TokenText, first: SequenceUpdate | None,
    updates: AsyncIterator[SequenceUpdate],
) -> AsyncIterator[str]:  # fmt: skip
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": req.model,
            "system_fingerprint": None}  # fmt: skip
    if include_usage:
        base["usage"] = None
    choices = {i: ChatChoice(i) for i in range(req.n)}
    usage = Usage()

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, reason: str | None = None) -> str:
        return sse(
            {
                **base,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
            }
        )

    def finish(choice: ChatChoice, engine_reason: str | None) -> str:
        choice.finished = True
        content, calls, reason = _final_message(choice, plan, engine_reason)
        delta: dict[str, Any] = {}
        if calls:
            if content:
                delta["content"] = content
            delta["tool_calls"] = tool_calls.openai_calls(calls, with_index=True)
        elif choice.text[choice.sent_chars :]:
            delta["content"] = choice.text[choice.sent_chars :]
        choice.sent_chars = len(choice.text)
        return chunk(choice.index, delta, choice.unsent_logprobs(plan, text_of), reason)

    async with aclosing(updates):
        async for update in with_first(first, updates):
            choice = choices[update.choice]
            usage.add(update.prompt_index, update.num_input_tokens, update.num_output_tokens)
            if not choice.role_sent:
                choice.role_sent = True
                yield chunk(choice.index, {"role": "assistant", "content": ""})
            choice.text += update.text
            choice.entries += update.logprobs or []
            if update.finish_reason is not None:
                yield finish(choice, update.finish_reason)
            else:
                end = _streamable_end(choice, plan)
                tokens_only = end == len(choice.text) and choice.sent_entries < len(choice.entries)
                if end > choice.sent_chars or tokens_only:
                    delta = {"content": choice.text[choice.sent_chars : end]}
                    choice.sent_chars = end
                    yield chunk(choice.index, delta, choice.unsent_logprobs(plan, text_of))
    for choice in choices.values():
        if not choice.role_sent:
            choice.role_sent = True
            yield chunk(choice.index, {"role": "assistant", "content": ""})
        if not choice.finished:
            yield finish(choice, None)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage.as_dict()})
    yield SSE_DONE
