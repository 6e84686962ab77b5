"""Reads a Triton request's input tensors into a validated ``GenerateRequest``.

Accepts what clients of the vLLM and TensorRT-LLM Triton backends send: the prompt as ``text_input``,
``input_ids`` or ``messages`` (chat JSON, with ``tools`` for the chat template), sampling options as scalar
inputs (``n`` included) and/or a ``sampling_parameters`` JSON object (numbers may be strings), ``logit_bias``
(a JSON object), and the ``return_*`` flags.
Anything malformed raises ``ValueError`` naming the input; the caller answers INVALID_ARG.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from inflight.backend.engine.prompts import Prompt
from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.serving.request import GenerateRequest

# Scalar inputs that are sampling options (TensorRT-LLM spellings are mapped by SamplingParams.from_dict).
SAMPLING_INPUTS = (
    "max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "random_seed", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "min_tokens", "min_length", "ignore_eos", "prompt_logprobs",
    "n",
)  # fmt: skip
LIST_INPUTS = ("stop", "stop_words", "bad_words")
# Structured output (one of them): a JSON schema's text, a regex, the choices (SamplingParams.guided_decoding).
GUIDED_INPUTS = ("guided_json", "guided_regex", "guided_choice")
FLAG_INPUTS = (
    "stream", "exclude_input_in_output", "return_finish_reason", "return_cumulative_logprob",
    "return_logprobs", "return_num_input_tokens", "return_num_output_tokens",
)  # fmt: skip
PROMPT_INPUTS = ("text_input", "input_ids", "messages")
# JSON texts: a sampling option ({"<token id>": bias}) and the chat template's tools ([{"type": "function", ...}]).
JSON_INPUTS = ("logit_bias", "tools")

GetInput = Callable[[str], "np.ndarray | None"]


def parse_request(get: GetInput) -> GenerateRequest:
    """Build a request from ``get(name) -> numpy array or None`` (one call per declared input); its
    live state stays unset until ``EngineService.submit``."""
    prompt = _prompt(get)
    flags = {name: _bool(name, get(name)) for name in FLAG_INPUTS}
    options: dict[str, Any] = {}
    raw = get("sampling_parameters")
    if raw is not None:
        text = _string("sampling_parameters", raw)
        try:
            parsed = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"sampling_parameters is not valid JSON: {exc.msg} at position {exc.pos}"
            ) from None
        if not isinstance(parsed, dict):
            raise ValueError(f"sampling_parameters must be a JSON object, got {type(parsed).__name__}")
        options.update(parsed)
    for name in SAMPLING_INPUTS:
        value = get(name)
        if value is not None:
            options[name] = _scalar(name, value)
    for name in LIST_INPUTS:
        value = get(name)
        if value is not None:
            options[name] = [decode_string(name, v) for v in np.asarray(value).reshape(-1)]
    if (raw := get("logit_bias")) is not None:
        options["logit_bias"] = _json("logit_bias", raw, dict, "object of token id -> bias")
    for name in GUIDED_INPUTS:
        if (value := get(name)) is not None:
            items = [decode_string(name, v) for v in np.asarray(value).reshape(-1)]
            options[name] = items if name == "guided_choice" else _string(name, value)
    if (flags["return_logprobs"] or flags["return_cumulative_logprob"]) and options.get("logprobs") is None:
        options["logprobs"] = 0  # the sampled token's own log-probability
    params = SamplingParams.from_dict(options)
    tools = _tools(get("tools"), prompt)
    return GenerateRequest(
        prompt=prompt, params=params, tools=tools, **{k: bool(v) for k, v in flags.items()}
    )


def _json(name: str, value: np.ndarray, kind: type, what: str) -> Any:
    text = _string(name, value)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(parsed, kind):
        raise ValueError(f"{name} must be a JSON {what}, got {type(parsed).__name__}")
    return parsed


def _tools(value: np.ndarray | None, prompt: Prompt) -> list[dict[str, Any]] | None:
    """The ``tools`` input: a JSON list of OpenAI tool objects, for a ``messages`` prompt only."""
    if value is None:
        return None
    tools = _json("tools", value, list, "list of tool objects")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] must be a JSON object (an OpenAI tool), got {type(tool).__name__}")
    if isinstance(prompt, str) or not prompt or not isinstance(prompt[0], dict):
        raise ValueError("tools is given to the chat template: send the prompt as messages")
    return tools


def _prompt(get: GetInput) -> Prompt:
    given = {name: get(name) for name in PROMPT_INPUTS}
    present = [name for name, value in given.items() if value is not None]
    if len(present) != 1:
        which = "none" if not present else " and ".join(present)
        raise ValueError(f"exactly one of text_input, input_ids or messages is required, got {which}")
    name = present[0]
    value = given[name]
    if name == "input_ids":
        ids = np.asarray(value).reshape(-1)
        if ids.size == 0:
            raise ValueError("input_ids is empty: the prompt must hold at least one token")
        return [int(t) for t in ids]
    text = _string(name, value)
    if name == "text_input":
        if not text:
            raise ValueError("text_input is empty: the prompt must hold at least one token")
        return text
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"messages is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError('messages must be a non-empty JSON list of {"role": ..., "content": ...} objects')
    return messages


def _one(name: str, value: np.ndarray) -> Any:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"{name} must hold exactly one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def decode_string(name: str, item: Any) -> str:
    """A BYTES tensor element (or a str) as text; errors name ``name``."""
    if isinstance(item, bytes | np.bytes_):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} is not valid UTF-8 (byte {exc.start})") from None
    if isinstance(item, str):
        return item
    raise ValueError(f"{name} must be a string, got {type(item).__name__}")


def _string(name: str, value: np.ndarray) -> str:
    return decode_string(name, _one(name, value))


def _scalar(name: str, value: np.ndarray) -> Any:
    item = _one(name, value)
    if isinstance(item, bytes | np.bytes_ | str):
        return decode_string(name, item)  # SamplingParams.from_dict converts numeric strings
    return item.item() if isinstance(item, np.generic) else item


def _bool(name: str, value: np.ndarray | None) -> bool:
    if value is None:
        return False
    item = _scalar(name, value)
    if isinstance(item, str):
        if item.lower() in ("true", "1"):
            return True
        if item.lower() in ("false", "0"):
            return False
        raise ValueError(f"{name} must be true or false, got {item!r}")
    return bool(item)
