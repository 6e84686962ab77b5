"""Structured output and tools through the gateway and the official `openai` package, against a real Triton
server: json_schema / json_object outputs that validate, `beta.chat.completions.parse` with a pydantic model,
tool_choice required / named, and a tool round-trip (the call, then the tool's result back in the chat).

These need the llm model's `guided_json` and `tools` inputs (issue 21's engine part)."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, Field

from .conftest import API_KEY, MODEL, Gateway

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Capital(BaseModel):
    # NOTE: bounded strings: a 135M model may otherwise write one string until max_tokens
    country: str = Field(max_length=24)
    capital: str = Field(max_length=24)


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=API_KEY, max_retries=0, timeout=300)


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                       "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }  # fmt: skip
    result = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=120,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                               "strict": True}},
    )  # fmt: skip
    value = json.loads(result.choices[0].message.content)
    assert set(value) == {"name", "age", "tags"} and isinstance(value["age"], int)
    assert len(value["name"]) <= 12 and set(value["tags"]) <= {"a", "b"}


def test_json_object_output_is_an_object(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=60, temperature=0, response_format={"type": "json_object"}
    )
    assert result.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(result.choices[0].message.content), dict)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.beta.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "The capital of France, as JSON."}],
        response_format=Capital, max_tokens=80, temperature=0,
    )  # fmt: skip
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Capital) and completion.choices[0].finish_reason == "stop"
    assert Capital.model_validate_json(completion.choices[0].message.content) == parsed


def test_a_schema_that_does_not_compile_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strin"}}},
        )  # fmt: skip
    assert err.value.param == "response_format"


def test_tool_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls[:1]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("C", "F")
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "unit": "C"})},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=20, temperature=0
    )
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    assert second.choices[0].finish_reason in ("stop", "length")


def test_named_tool_choice_streams_one_call(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    )  # fmt: skip
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert set(json.loads(calls[0].function.arguments)) == {"city", "unit"}
    assert sum(c.choices[0].finish_reason is not None for c in chunks if c.choices) == 1
