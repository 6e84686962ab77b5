"""parse_request's ``n``, ``logit_bias`` and ``tools`` inputs, and the ``sequence_index`` output tensor."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from inflight.backend.engine.outputs import RequestOutput
from inflight.backend.serving.responses import build_outputs

from .test_triton_inputs import CHAT, _bytes, _parse

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_n_as_input_or_in_sampling_parameters() -> None:
    assert _parse(n=np.array([3], dtype=np.int32)).params.n == 3
    assert _parse(sampling_parameters=_bytes(json.dumps({"n": "2"}))).params.n == 2
    assert _parse().params.n == 1
    with pytest.raises(ValueError, match=r"^n must be at least 1, got 0$"):
        _parse(n=np.array([0], dtype=np.int32))


def test_logit_bias_input_and_json_key() -> None:
    bias = {"7": 100, "42": -3.5}
    assert _parse(logit_bias=_bytes(json.dumps(bias))).params.logit_bias == {7: 100.0, 42: -3.5}
    nested = _parse(sampling_parameters=_bytes(json.dumps({"logit_bias": bias})))
    assert nested.params.logit_bias == {7: 100.0, 42: -3.5}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"7": 1', "logit_bias is not valid JSON: Expecting ',' delimiter at position 7"),
        ("[1, 2]", "logit_bias must be a JSON object of token id -> bias, got list"),
        ('{"7": 101}', "logit_bias values must be in [-100, 100], got 101 for token 7"),
        ('{"-3": 1}', "logit_bias keys must be token ids (integers >= 0), got '-3'"),
    ],
)
def test_bad_logit_bias_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _parse(logit_bias=_bytes(text))


def test_tools_with_messages() -> None:
    request = _parse(messages=_bytes(json.dumps(CHAT)), tools=_bytes(json.dumps(TOOLS)))
    assert request.tools == TOOLS and request.prompt == CHAT
    assert _parse(messages=_bytes(json.dumps(CHAT))).tools is None


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"tools": "[{"},
            "tools is not valid JSON: Expecting property name enclosed in double quotes at position 2",
        ),
        ({"tools": '{"type": "function"}'}, "tools must be a JSON list of tool objects, got dict"),
        ({"tools": '["get_weather"]'}, "tools[0] must be a JSON object (an OpenAI tool), got str"),
    ],
)
def test_bad_tools_are_named(inputs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _parse(messages=_bytes(json.dumps(CHAT)), **{k: _bytes(v) for k, v in inputs.items()})


def test_tools_need_messages() -> None:
    with pytest.raises(
        ValueError, match=r"^tools is given to the chat template: send the prompt as messages$"
    ):
        _parse(tools=_bytes(json.dumps(TOOLS)))


def test_every_response_carries_its_sequence_index() -> None:
    request = _parse(return_finish_reason=np.array([True]))
    for index in (0, 2):
        out = RequestOutput("r", [7], "x", False, "length", 2, 1, index=index)
        tensors = build_outputs(request, "x", [7], [], out, 2, 1)
        assert tensors["sequence_index"].dtype == np.uint32 and tensors["sequence_index"].tolist() == [index]
        assert tensors["finish_reason"].tolist() == [b"length"]  # the sequence's, on its last response
    running = RequestOutput("r", [7], "x", False, None, 2, 1, index=1)
    assert "finish_reason" not in build_outputs(request, "x", [7], [], running, 2, 1)
