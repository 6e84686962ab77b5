"""Fuzzed OpenAI request bodies (hypothesis) and the check that every answer is OpenAI's error shape or a valid
completion, as the official `openai` package's types read it. Used by the reliability suite's gateway fuzz.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

from hypothesis import strategies as st
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

MODEL = "llm"
# Statuses a fuzzed body may get: a completion, a user's mistake, an unknown model. Never a 500 / 503.
ALLOWED_STATUSES = (200, 400, 404)
# NOTE: prompt token ids stay below the fault-injection markers of the reliability servers (49000..49002);
# ids past the vocabulary (49152) are drawn separately.
_TOKEN_IDS = st.one_of(st.integers(-2, 48000), st.integers(49152, 60000))


def request_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """Bodies around the valid ones: a valid chat or completions body with up to 3 fields set to values of
    the right and the wrong types, in and out of range, or unknown fields."""
    junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=5),
                     st.lists(st.integers(-1, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))  # fmt: skip
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "bot"]),
         "content": st.one_of(st.text(max_size=20), junk)}
    )  # fmt: skip
    fields = {
        "model": st.one_of(st.just(MODEL), junk), "messages": st.one_of(st.lists(message, max_size=3), junk),
        "prompt": st.one_of(st.text(max_size=20), st.lists(_TOKEN_IDS, max_size=4), st.lists(st.text(max_size=8), max_size=3), junk),
        "max_tokens": st.one_of(st.integers(-2, 3), st.integers(257, 10**6), junk),  # 257+: past the context
        "max_completion_tokens": st.one_of(st.integers(-1, 3), junk),
        "temperature": st.one_of(st.floats(-1, 3), junk), "top_p": st.one_of(st.floats(-0.5, 1.5), junk),
        "n": st.one_of(st.integers(-1, 3), st.integers(129, 1000), junk),
        "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2), junk),
        "seed": st.one_of(st.integers(-5, 2**64), junk), "logprobs": st.one_of(st.integers(-1, 25), junk),
        "top_logprobs": st.one_of(st.integers(-1, 25), junk), "echo": junk, "stream": st.booleans(),
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
        "logit_bias": st.one_of(st.dictionaries(st.sampled_from(["1", "-1", "x", "99999999"]), st.floats(-200, 200), max_size=2), junk),
        "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])}), junk),
        "presence_penalty": st.one_of(st.floats(-3, 3), junk), "frequency_penalty": st.one_of(st.floats(-3, 3), junk),
        "top_k": st.one_of(st.integers(-3, 5), junk), "min_p": st.one_of(st.floats(-0.5, 1.5), junk),
        "repetition_penalty": st.one_of(st.floats(-1, 3), junk), "min_tokens": st.one_of(st.integers(-1, 3), junk),
        "tools": st.one_of(st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]), junk),
        "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required", "x"]), junk),
        "suffix": junk, "best_of": st.one_of(st.integers(-1, 3), junk), "user": junk, "unknown_field": junk,
    }  # fmt: skip
    base = st.sampled_from([{"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
                            {"model": MODEL, "prompt": "Hi"}])  # fmt: skip
    changed = st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys})
    )
    return st.tuples(base, changed).map(lambda pair: {**pair[0], **pair[1]})


def path_of(body: dict[str, Any]) -> str:
    """The endpoint a fuzzed body goes to: completions when it has a prompt and no messages."""
    return "/v1/completions" if "prompt" in body and "messages" not in body else "/v1/chat/completions"


def post_raw(host: str, path: str, body: bytes, headers: dict[str, str], timeout_s: float = 120.0) -> tuple[int, dict[str, str], str]:  # fmt: skip
    """(status, lower-cased headers, body text) of one POST over a fresh connection."""
    connection = http.client.HTTPConnection(host, timeout=timeout_s)
    try:
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        text = response.read().decode("utf-8", errors="replace")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, text
    finally:
        connection.close()


def error_problem(payload: Any) -> str | None:
    """None when `payload` is exactly OpenAI's error shape; otherwise what is wrong with it."""
    if not isinstance(payload, dict) or set(payload) != {"error"}:
        return f"not an error object: {str(payload)[:300]}"
    error = payload["error"]
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"error fields {sorted(error) if isinstance(error, dict) else error!r}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return f"error message/type: {error!r}"
    return None


def answer_problem(path: str, status: int, headers: dict[str, str], text: str, stream: bool) -> str | None:
    """None when the answer is OpenAI's error shape (with Retry-After for 429 / 503) or a valid completion
    (the `openai` package's types validate every object; a stream ends with `data: [DONE]`)."""
    if status != 200:
        try:
            problem = error_problem(json.loads(text))
        except ValueError:
            return f"{status} with a body that is not JSON: {text[:300]!r}"
        if problem is None and status in (429, 503) and not headers.get("retry-after", "").isdigit():
            problem = f"{status} without Retry-After"
        return problem
    chat = path.endswith("/chat/completions")
    try:
        if not stream:
            (ChatCompletion if chat else Completion).model_validate_json(text)
            return None
        events = text.split("\n\n")
        if events[-2:] != ["data: [DONE]", ""] or not all(e.startswith("data: ") for e in events[:-1]):
            return f"malformed SSE: {text[-300:]!r}"
        for event in events[:-2]:
            payload = json.loads(event.removeprefix("data: "))
            if "error" in payload:
                return f"error inside a 200 stream: {payload}"
            if not chat:  # NOTE: `Completion` types finish_reason without None, which a stream's chunks send
                payload["choices"] = [
                    {**c, "finish_reason": c.get("finish_reason") or "stop"} for c in payload["choices"]
                ]
            (ChatCompletionChunk if chat else Completion).model_validate(payload)
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        return f"not a valid completion: {err!s:.400}"
    return None
