"""The model's input/output contract (model_repository/llm/config.pbtxt), independent of the protocol."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .types import Delta

# Sampling options sent as the model's scalar inputs (shape [1]), with their Triton data types.
SCALAR_INPUTS = {
    "max_tokens": "INT32",
    "min_tokens": "INT32",
    "top_k": "INT32",
    "temperature": "FP32",
    "top_p": "FP32",
    "min_p": "FP32",
    "repetition_penalty": "FP32",
    "presence_penalty": "FP32",
    "frequency_penalty": "FP32",
    "seed": "UINT64",
    "ignore_eos": "BOOL",
    "exclude_input_in_output": "BOOL",
}
# Options sent as string lists (shape [n]).
LIST_INPUTS = ("stop", "bad_words")
# Options with no input of their own: they travel in the `sampling_parameters` JSON.
JSON_OPTIONS = ("logprobs", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output")
SAMPLING_OPTIONS = (*SCALAR_INPUTS, *LIST_INPUTS, *JSON_OPTIONS)
# Optional outputs, asked for by `return_<name>` flags; output_ids and text_output always come.
RETURN_FLAGS = ("finish_reason", "num_input_tokens", "num_output_tokens", "cumulative_logprob")


@dataclass(frozen=True)
class RequestInput:
    """One input tensor: a name, its Triton data type, its values, and whether it is a [1] scalar."""

    name: str
    datatype: str  # BYTES, INT32, UINT64, FP32, BOOL
    values: list[Any]
    scalar: bool = True


def build_inputs(
    prompt: str | None,
    messages: Sequence[Mapping[str, str]] | None,
    input_ids: Sequence[int] | None,
    stream: bool,
    sampling: Mapping[str, Any],
) -> list[RequestInput]:
    """The input tensors for one request; ValueError for no prompt, two prompts or an unknown option.

    `sampling` holds SAMPLING_OPTIONS (None values are left out) and optionally `sampling_parameters`, a
    dict merged into the JSON input as it is.
    """
    given = [
        name
        for name, value in (("prompt", prompt), ("messages", messages), ("input_ids", input_ids))
        if value
    ]
    if len(given) != 1:
        raise ValueError(f"give exactly one non-empty prompt, messages or input_ids (got {given or 'none'})")
    unknown = sorted(set(sampling) - set(SAMPLING_OPTIONS) - {"sampling_parameters"})
    if unknown:
        raise ValueError(f"unknown sampling option {unknown[0]!r}; known: {', '.join(SAMPLING_OPTIONS)}")
    if prompt:
        inputs = [RequestInput("text_input", "BYTES", [prompt])]
    elif messages:
        inputs = [RequestInput("messages", "BYTES", [json.dumps(list(map(dict, messages)))])]
    else:
        inputs = [RequestInput("input_ids", "INT32", [int(i) for i in input_ids or ()], scalar=False)]
    inputs.append(RequestInput("stream", "BOOL", [stream]))
    options = {"exclude_input_in_output": True, **{k: v for k, v in sampling.items() if v is not None}}
    json_params = dict(options.pop("sampling_parameters", None) or {})
    for name, datatype in SCALAR_INPUTS.items():
        if name in options:
            inputs.append(RequestInput(name, datatype, [_coerce(name, datatype, options[name])]))
    for name in LIST_INPUTS:
        if name in options:
            values = [options[name]] if isinstance(options[name], str) else list(options[name])
            inputs.append(RequestInput(name, "BYTES", values, scalar=False))
    json_params.update({name: options[name] for name in JSON_OPTIONS if name in options})
    if json_params:
        inputs.append(RequestInput("sampling_parameters", "BYTES", [json.dumps(json_params)]))
    flags = [*RETURN_FLAGS, *(["logprobs"] if "logprobs" in json_params else [])]
    inputs.extend(RequestInput(f"return_{name}", "BOOL", [True]) for name in flags)
    return inputs


# The values each scalar type can carry (the tensor could not even be encoded otherwise).
_INT_RANGES = {"INT32": (-(2**31), 2**31 - 1), "UINT64": (0, 2**64 - 1)}


def _coerce(name: str, datatype: str, value: Any) -> Any:
    """A Python value of the input's type (so JSON writes FP32 as 1.0, not 1); ValueError naming `name`."""
    if datatype == "BOOL":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if datatype == "FP32":
        return float(value)
    low, high = _INT_RANGES[datatype]
    if not float(value).is_integer() or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _first(values: list[Any] | None) -> Any:
    return values[0] if values else None


def _parse_logprobs(values: list[Any]) -> list[Any]:
    """The per-token entries: each element is a JSON list of per-token objects (or one object)."""
    entries: list[Any] = []
    for value in values:
        try:
            parsed = json.loads(_text(value))
        except ValueError:
            parsed = _text(value)
        entries.extend(parsed if isinstance(parsed, list) else [parsed])
    return entries


def delta_from_outputs(outputs: Mapping[str, list[Any] | None], finished: bool) -> Delta:
    """A Delta from one response's output tensors, each a flat list (None or missing when not sent)."""
    finish = _first(outputs.get("finish_reason"))
    finish_reason = _text(finish) if finish not in (None, b"", "") else None
    cumulative = _first(outputs.get("cumulative_logprob"))
    num_in, num_out = _first(outputs.get("num_input_tokens")), _first(outputs.get("num_output_tokens"))
    logprobs = outputs.get("logprobs")
    return Delta(
        text="".join(_text(t) for t in outputs.get("text_output") or ()),
        token_ids=[int(t) for t in outputs.get("output_ids") or ()],
        finished=finished,
        finish_reason=finish_reason,
        num_input_tokens=int(num_in) if num_in is not None else None,
        num_output_tokens=int(num_out) if num_out is not None else None,
        cumulative_logprob=float(cumulative) if cumulative is not None else None,
        logprobs=_parse_logprobs(logprobs) if logprobs is not None else None,
    )
