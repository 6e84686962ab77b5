"""The gateway without a server: OpenAI fields -> the llm model's Triton inputs, and scripted Triton responses
(a fake stream) -> OpenAI answers (n choices by sequence_index, tool calls, guided decoding, errors).

The same paths run against the real server in test_openai_api / test_http_semantics / test_structured_output;
here each mapping is pinned exactly, whatever the engine can do yet.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from inflight.gateway import chat, completions
from inflight.gateway.common import Context
from inflight.gateway.errors import OpenAIError, from_triton
from inflight.gateway.metrics import GatewayMetrics
from inflight.gateway.schemas import ChatCompletionRequest, CompletionRequest
from inflight.gateway.tool_calls import parse_auto, required_schema
from inflight.gateway.triton import ModelInfo, TritonCallError

LLM_INPUTS = frozenset(
    {"text_input", "input_ids", "messages", "sampling_parameters", "max_tokens", "temperature", "seed", "stop",
     "n", "logit_bias", "tools", "guided_json", "prompt_logprobs", "return_finish_reason", "stream"}
)  # fmt: skip
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip


def values(tensor: Any) -> list[Any]:
    """An InferInput's values (strings decoded)."""
    raw = tensor._raw_content
    if tensor.datatype() == "BYTES":
        return [v.decode() for v in deserialize_bytes_tensor(raw)]
    return np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype())).tolist()


def response(text: str, finish: str | None = None, sequence: int = 0, num_in: int = 9) -> dict[str, Any]:
    """One scripted response's outputs, as `TritonBackend.generate` yields them (flat lists)."""
    outputs: dict[str, Any] = {"text_output": [text.encode()], "output_ids": [1] * max(1, len(text.split())),
                               "num_input_tokens": [num_in], "num_output_tokens": [max(1, len(text.split()))],
                               "sequence_index": [sequence]}  # fmt: skip
    if finish:
        outputs["finish_reason"] = [finish.encode()]
    return outputs


class FakeBackend:
    """Records each request's inputs and answers with a script (or raises a scripted TritonCallError)."""

    def __init__(
        self, script: list[dict[str, Any]] | TritonCallError, inputs: frozenset[str] = LLM_INPUTS
    ) -> None:
        self.script, self.sent = script, []
        self.info = ModelInfo("llm", inputs, created=0, max_model_len=64)

    async def model(self, name: str) -> ModelInfo | None:
        return self.info if name == "llm" else None

    def learn_context_length(self, model: ModelInfo, message: str) -> None:
        pass

    async def generate(self, model: str, inputs: list[Any]) -> AsyncIterator[tuple[dict[str, Any], bool]]:
        self.sent.append({t.name(): values(t) for t in inputs})
        if isinstance(self.script, TritonCallError):
            raise self.script
        for i, outputs in enumerate(self.script):
            yield outputs, i == len(self.script) - 1


def run_chat(backend: FakeBackend, body: dict[str, Any]) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        ctx = Context(backend, GatewayMetrics())  # type: ignore[arg-type]
        request = ChatCompletionRequest.model_validate_json(json.dumps({"model": "llm", **body}))
        try:
            answer = await chat.create(ctx, request, 0.0)
        except OpenAIError as err:
            return err.status, err.body()
        if body.get("stream"):
            text = "".join([part async for part in answer.body_iterator])
            events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
            return answer.status_code, [json.loads(e) for e in events[:-1]] + [events[-1]]
        return answer.status_code, json.loads(answer.body)

    return asyncio.run(go())


def test_chat_fields_become_the_llm_models_inputs() -> None:
    backend = FakeBackend([response("Hi", "stop")])
    status, _ = run_chat(backend, {
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                     {"role": "user", "content": "Hi"}],
        "temperature": 0.5, "seed": 3, "stop": "END", "n": 2, "logit_bias": {"42": -100},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    })  # fmt: skip
    assert status == 200
    (sent,) = backend.sent
    assert json.loads(sent["messages"][0]) == [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}]  # fmt: skip
    assert sent["temperature"] == [0.5] and sent["seed"] == [3] and sent["stop"] == ["END"]
    assert sent["n"] == [2] and json.loads(sent["logit_bias"][0]) == {"42": -100.0}
    assert json.loads(sent["guided_json"][0]) == {"type": "object"}
    # no max_tokens: "up to the context" (null in the JSON), not the llm model's default of 16
    assert "max_tokens" not in sent and json.loads(sent["sampling_parameters"][0]) == {"max_tokens": None}
    assert sent["stream"] == [True] and sent["return_finish_reason"] == [True]


def test_json_object_and_tool_choices_send_their_schemas() -> None:
    backend = FakeBackend([response("{}", "stop")])
    run_chat(backend, {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"},
                       "max_completion_tokens": 5})  # fmt: skip
    run_chat(
        backend,
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER], "tool_choice": "required"},
    )
    run_chat(backend, {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
                       "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})  # fmt: skip
    run_chat(backend, {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]})
    json_object, required, named, auto = backend.sent
    assert json.loads(json_object["guided_json"][0]) == {"type": "object"} and json_object["max_tokens"] == [
        5
    ]
    assert json.loads(required["guided_json"][0]) == required_schema([WEATHER])
    assert json.loads(named["guided_json"][0]) == WEATHER["function"]["parameters"]
    assert "guided_json" not in auto and json.loads(auto["tools"][0]) == [WEATHER]


def test_echo_with_logprobs_asks_for_prompt_logprobs() -> None:
    backend = FakeBackend([response(" Paris", "length")])

    async def go() -> dict[str, Any]:
        ctx = Context(backend, GatewayMetrics())  # type: ignore[arg-type]
        request = CompletionRequest(model="llm", prompt="The capital is", echo=True, logprobs=2, max_tokens=1)
        return json.loads((await completions.create(ctx, request, 0.0)).body)

    body = asyncio.run(go())
    (sent,) = backend.sent
    assert sent["prompt_logprobs"] == [2] and json.loads(sent["sampling_parameters"][0])["logprobs"] == 2
    assert body["choices"][0]["text"] == "The capital is Paris"


def test_n_choices_come_by_sequence_index_each_with_one_finish() -> None:
    script = [response("A", sequence=1), response("B", sequence=0), response("a", "length", sequence=1),
              response("b", "stop", sequence=0)]  # fmt: skip
    status, body = run_chat(FakeBackend(script), {"messages": [{"role": "user", "content": "x"}], "n": 2})
    assert status == 200
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "Bb", "stop"), (1, "Aa", "length")]  # fmt: skip
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    status, events = run_chat(FakeBackend(script), {"messages": [{"role": "user", "content": "x"}], "n": 2,
                                                    "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
    assert (
        events[-1] == "[DONE]"
        and events[-2]["choices"] == []
        and events[-2]["usage"]["completion_tokens"] == 4
    )
    chunks = [e["choices"][0] for e in events[:-2]]
    for index in (0, 1):
        mine = [c for c in chunks if c["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["finish_reason"] for c in mine].count(None) == len(mine) - 1 and mine[-1]["finish_reason"]


@pytest.mark.parametrize(
    "text",
    ['{"name": "get_weather", "parameters": {"city": "Paris"}}',
     '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris"}}',
     'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'],
)  # fmt: skip
def test_auto_tool_calls_are_parsed_streamed_or_not(text: str) -> None:
    script = [response(text[:10]), response(text[10:], "stop")]
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]}
    _, whole = run_chat(FakeBackend(script), body)
    (choice,) = whole["choices"]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["id"].startswith("call_") and call["type"] == "function"
    _, events = run_chat(FakeBackend(script), {**body, "stream": True})
    deltas = [e["choices"][0] for e in events[:-1]]
    assert [d["finish_reason"] for d in deltas] == [None] * (len(deltas) - 1) + ["tool_calls"]
    assert deltas[-1]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert deltas[-1]["delta"]["tool_calls"][0]["index"] == 0


def test_text_that_is_no_tool_call_stays_content() -> None:
    assert parse_auto('{"name": "unknown_tool", "parameters": {}}', {"get_weather"}) == (
        '{"name": "unknown_tool", "parameters": {}}', [])  # fmt: skip
    _, whole = run_chat(FakeBackend([response("It is sunny.", "stop")]),
                        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]})  # fmt: skip
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny.", "refusal": None}
    assert whole["choices"][0]["finish_reason"] == "stop"


def test_required_and_named_outputs_become_calls() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}
    required = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    _, whole = run_chat(FakeBackend([response(required, "stop")]), {**body, "tool_choice": "required"})
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    assert whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    named = {"type": "function", "function": {"name": "get_weather"}}
    _, whole = run_chat(FakeBackend([response('{"city": "Rome"}', "stop")]), {**body, "tool_choice": named})
    assert whole["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                          "arguments": '{"city": "Rome"}'}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param"),
    [({"tool_choice": "required"}, "tool_choice"),
     ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
     ({"top_logprobs": 2}, "top_logprobs"), ({"max_tokens": 65}, "max_tokens"),
     ({"max_completion_tokens": 65}, "max_completion_tokens")],
)  # fmt: skip
def test_impossible_combinations_are_400(body: dict[str, Any], param: str) -> None:
    status, answer = run_chat(FakeBackend([]), {"messages": [{"role": "user", "content": "x"}], **body})
    assert status == 400 and answer["error"]["param"] == param


def test_a_model_without_an_input_refuses_the_field_by_name() -> None:
    backend = FakeBackend([], inputs=LLM_INPUTS - {"guided_json", "logit_bias"})
    status, answer = run_chat(backend, {"messages": [{"role": "user", "content": "x"}],
                                        "response_format": {"type": "json_object"}})  # fmt: skip
    assert status == 400 and answer["error"]["param"] == "response_format"
    status, answer = run_chat(
        backend, {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 2}}
    )
    assert status == 400 and answer["error"]["param"] == "logit_bias"


@pytest.mark.parametrize(
    ("message", "code", "status", "param"),
    [("waiting queue is full (max_queue_size=64)", None, 429, None),
     ("the model is shutting down", None, 503, None),
     ("failed to connect to all addresses", "UNAVAILABLE", 503, None),
     ("guided_json: the schema does not compile: unknown type 'strin'", None, 400, "response_format"),
     ("max_tokens is 900, more than max_model_len (512) can ever hold", None, 400, "max_tokens"),
     ("messages: prompt has 600 tokens, but max_model_len is 512", None, 400, "messages"),
     ("engine step failed: RuntimeError", None, 500, None)],
)  # fmt: skip
def test_triton_errors_map_to_openai_statuses(
    message: str, code: str | None, status: int, param: str | None
) -> None:
    error = from_triton(message, code)
    assert (error.status, error.param) == (status, param)
    assert (error.retry_after_s is not None) == (status in (429, 503))
    status_seen, answer = run_chat(FakeBackend(TritonCallError(message, code)),
                                   {"messages": [{"role": "user", "content": "x"}]})  # fmt: skip
    assert status_seen == status and answer["error"]["message"].endswith(message)
