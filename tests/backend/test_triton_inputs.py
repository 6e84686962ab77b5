"""parse_request on fake Triton tensors: every input field, both tensor forms, and the errors naming inputs.

Triton hands BYTES tensors as numpy object arrays of ``bytes`` and numbers as typed arrays of shape [1] (or
[1, 1]); the getter here is a dict's ``get``, so an absent input reads as None, as in the Python backend.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest

from inflight.backend.engine.sampling_params import SamplingParams
from inflight.backend.serving.request import GenerateRequest
from inflight.backend.serving.triton_inputs import FLAG_INPUTS, LIST_INPUTS, SAMPLING_INPUTS, parse_request

PROMPT = {"text_input": np.array([b"Hello"], dtype=object)}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _bytes(*values: str | bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A BYTES tensor as Triton's Python backend hands it: an object array of ``bytes``."""
    items = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape) if shape is not None else array


def _parse(**inputs: np.ndarray) -> GenerateRequest:
    """parse_request over ``inputs`` (a text prompt added unless one is given)."""
    if not {"text_input", "input_ids", "messages"} & set(inputs):
        inputs = {**PROMPT, **inputs}
    return parse_request(inputs.get)


def _flags(request: GenerateRequest) -> dict[str, bool]:
    return {name: getattr(request, name) for name in FLAG_INPUTS}


# --- the prompt ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (1, 1)], ids=["[1]", "[1,1]"])
def test_text_input(shape) -> None:
    request = _parse(text_input=_bytes("Hello, wörld", shape=shape))
    assert request.prompt == "Hello, wörld"
    assert request.params == SamplingParams()
    assert _flags(request) == dict.fromkeys(FLAG_INPUTS, False)  # an absent flag is False


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("shape", [(3,), (1, 3)], ids=["[n]", "[1,n]"])
def test_input_ids(dtype, shape) -> None:
    request = _parse(input_ids=np.array([1, 49151, 7], dtype=dtype).reshape(shape))
    assert request.prompt == [1, 49151, 7]
    assert all(type(t) is int for t in request.prompt)


def test_messages_chat_json() -> None:
    request = _parse(messages=_bytes(json.dumps(CHAT)))
    assert request.prompt == CHAT


@pytest.mark.parametrize(
    ("names", "which"),
    [
        ((), "none"),
        (("text_input", "input_ids"), "text_input and input_ids"),
        (("input_ids", "messages"), "input_ids and messages"),
        (("text_input", "input_ids", "messages"), "text_input and input_ids and messages"),
    ],
)
def test_exactly_one_prompt_input(names, which) -> None:
    given = {
        "text_input": _bytes("Hi"),
        "input_ids": np.array([1, 2], dtype=np.int32),
        "messages": _bytes(json.dumps(CHAT)),
    }
    inputs = {name: given[name] for name in names}
    message = f"exactly one of text_input, input_ids or messages is required, got {which}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_request(inputs.get)


# A bad prompt input -> the start of the error message.
BAD_PROMPTS = {
    "empty-text": (
        {"text_input": _bytes("")},
        "text_input is empty: the prompt must hold at least one token",
    ),
    "empty-ids": ({"input_ids": np.array([], dtype=np.int32)}, "input_ids is empty: the prompt must hold"),
    "empty-ids-[1,0]": ({"input_ids": np.zeros((1, 0), dtype=np.int64)}, "input_ids is empty"),
    "text-not-utf8": ({"text_input": _bytes(b"\xffabc")}, "text_input is not valid UTF-8 (byte 0)"),
    "text-not-bytes": (
        {"text_input": np.array([5], dtype=np.int32)},
        "text_input must be a string, got int32",
    ),
    "two-texts": ({"text_input": _bytes("a", "b")}, "text_input must hold exactly one value, got shape [2]"),
    "messages-not-json": (
        {"messages": _bytes("[{'role': 'user'}]")},
        "messages is not valid JSON: Expecting",
    ),
    "messages-object": ({"messages": _bytes('{"role": "user"}')}, "messages must be a non-empty JSON list"),
    "messages-empty": ({"messages": _bytes("[]")}, "messages must be a non-empty JSON list"),
    "messages-of-strings": (
        {"messages": _bytes('["Hi"]')},
        'messages must be a non-empty JSON list of {"role"',
    ),
    "messages-mixed": (
        {"messages": _bytes('[{"role": "user"}, 3]')},
        "messages must be a non-empty JSON list",
    ),
}


@pytest.mark.parametrize(("inputs", "message"), list(BAD_PROMPTS.values()), ids=list(BAD_PROMPTS))
def test_bad_prompt_is_named(inputs, message) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        parse_request(inputs.get)


def test_messages_json_error_gives_the_position() -> None:
    text = '[{"role": "user", "content": "Hi"}'
    with pytest.raises(ValueError) as caught:
        _parse(messages=_bytes(text))
    assert str(caught.value) == f"messages is not valid JSON: Expecting ',' delimiter at position {len(text)}"


# --- scalar sampling inputs -----------------------------------------------------------------------------

# input name -> (SamplingParams field, Triton's numpy dtype for it, the value as a string, the field's value).
# Floats are exact in float32, so the typed form lands on the very same number.
SAMPLING_CASES = {
    "max_tokens": ("max_tokens", np.int32, "7", 7),
    "temperature": ("temperature", np.float32, "0.5", 0.5),
    "top_k": ("top_k", np.int32, "5", 5),
    "top_p": ("top_p", np.float32, "0.75", 0.75),
    "min_p": ("min_p", np.float32, "0.25", 0.25),
    "seed": ("seed", np.uint64, "123", 123),
    "random_seed": ("seed", np.uint64, "123", 123),  # TensorRT-LLM's name
    "repetition_penalty": ("repetition_penalty", np.float32, "1.5", 1.5),
    "presence_penalty": ("presence_penalty", np.float32, "0.5", 0.5),
    "frequency_penalty": ("frequency_penalty", np.float32, "-1.5", -1.5),
    "min_tokens": ("min_tokens", np.int32, "3", 3),
    "min_length": ("min_tokens", np.int32, "3", 3),  # TensorRT-LLM's name
    "ignore_eos": ("ignore_eos", np.bool_, "true", True),
    "prompt_logprobs": ("prompt_logprobs", np.int32, "3", 3),
    "n": ("n", np.int32, "3", 3),
}


def test_every_sampling_input_has_a_case() -> None:
    assert set(SAMPLING_CASES) == set(SAMPLING_INPUTS)


def _only(field: str, value: Any) -> SamplingParams:
    """The defaults with one field changed: nothing else may move."""
    return SamplingParams(**{field: value})


@pytest.mark.parametrize("name", SAMPLING_INPUTS)
@pytest.mark.parametrize("shape", [(1,), (1, 1)], ids=["[1]", "[1,1]"])
def test_sampling_input_typed(name: str, shape) -> None:
    field, dtype, _, expected = SAMPLING_CASES[name]
    params = _parse(**{name: np.array([expected], dtype=dtype).reshape(shape)}).params
    assert params == _only(field, expected)
    assert type(getattr(params, field)) is type(expected)


@pytest.mark.parametrize("name", SAMPLING_INPUTS)
def test_sampling_input_as_bytes_string(name: str) -> None:
    field, _, text, expected = SAMPLING_CASES[name]
    params = _parse(**{name: _bytes(text)}).params
    assert params == _only(field, expected)
    assert type(getattr(params, field)) is type(expected)
    # numpy's fixed-width bytes array (dtype S) reads the same
    assert _parse(**{name: np.array([text.encode()])}).params == _only(field, expected)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", np.array([0.5, 0.7], dtype=np.float32)),
        ("max_tokens", np.array([[4, 5]], dtype=np.int32)),
        ("seed", np.array([], dtype=np.uint64)),
        ("ignore_eos", _bytes("true", "false")),
        ("stream", np.array([True, False])),
    ],
)
def test_scalar_with_several_values_is_rejected(name: str, value: np.ndarray) -> None:
    message = f"{name} must hold exactly one value, got shape {list(value.shape)}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _parse(**{name: value})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("temperature", _bytes("hot"), "temperature must be a number, got str 'hot'"),
        ("max_tokens", _bytes("2.5"), "max_tokens must be an integer, got float 2.5"),
        ("top_p", np.array([0.0], dtype=np.float32), "top_p must be in (0, 1], got 0.0"),
        ("max_tokens", np.array([True]), "max_tokens must be an integer, got bool True"),
    ],
)
def test_bad_sampling_value_is_named(name: str, value: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _parse(**{name: value})


# --- list inputs ----------------------------------------------------------------------------------------

LIST_FIELDS = {"stop": "stop", "stop_words": "stop", "bad_words": "bad_words"}


def test_every_list_input_has_a_field() -> None:
    assert set(LIST_FIELDS) == set(LIST_INPUTS)


@pytest.mark.parametrize("name", LIST_INPUTS)
@pytest.mark.parametrize(
    ("words", "shape"),
    [(["END"], None), (["\n\n", "café", "The end"], None), (["a b", "c"], (1, 2))],
    ids=["one", "several", "several-[1,n]"],
)
def test_list_input(name: str, words: list[str], shape) -> None:
    params = _parse(**{name: _bytes(*words, shape=shape)}).params
    assert params == _only(LIST_FIELDS[name], words)


@pytest.mark.parametrize("name", LIST_INPUTS)
def test_list_input_invalid_utf8_is_named(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} is not valid UTF-8 \(byte 2\)$"):
        _parse(**{name: _bytes("ok", b"ab\xc3(")})


def test_stop_and_its_alias_together_are_rejected() -> None:
    with pytest.raises(ValueError, match="'stop' given twice"):
        _parse(stop=_bytes("a"), stop_words=_bytes("b"))


# --- flags ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLAG_INPUTS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.array([True]), True),
        (np.array([[False]]), False),
        (_bytes("true"), True),
        (_bytes("false"), False),
        (_bytes("1"), True),
        (_bytes("0"), False),
        (_bytes("TRUE"), True),
        (_bytes("False"), False),
    ],
    ids=["bool-true", "bool-false", "true", "false", "1", "0", "TRUE", "False"],
)
def test_flag(name: str, value: np.ndarray, expected: bool) -> None:
    request = _parse(**{name: value})
    assert _flags(request) == {**dict.fromkeys(FLAG_INPUTS, False), name: expected}
    assert type(getattr(request, name)) is bool


@pytest.mark.parametrize("name", FLAG_INPUTS)
def test_flag_invalid_string_is_named(name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be true or false, got 'yes'$"):
        _parse(**{name: _bytes("yes")})


@pytest.mark.parametrize("flag", ["return_logprobs", "return_cumulative_logprob"])
def test_logprob_flags_ask_for_the_sampled_tokens_logprob(flag: str) -> None:
    assert _parse(**{flag: np.array([True])}).params.logprobs == 0
    assert _parse(**{flag: np.array([False])}).params.logprobs is None
    explicit = _parse(**{flag: np.array([True]), "sampling_parameters": _bytes('{"logprobs": 3}')})
    assert explicit.params == _only("logprobs", 3)
    as_string = _parse(**{flag: _bytes("true"), "sampling_parameters": _bytes('{"logprobs": "2"}')})
    assert as_string.params.logprobs == 2
    null = _parse(**{flag: np.array([True]), "sampling_parameters": _bytes('{"logprobs": null}')})
    assert null.params.logprobs == 0


def test_no_logprob_flag_leaves_logprobs_unset() -> None:
    assert _parse(stream=np.array([True])).params.logprobs is None
    assert _parse(sampling_parameters=_bytes('{"logprobs": 4}')).params.logprobs == 4


def test_prompt_logprobs_as_input_or_in_sampling_parameters() -> None:
    """prompt_logprobs asks for the prompt's logprobs alone: the sampled tokens' logprobs stay off."""
    assert _parse(sampling_parameters=_bytes('{"prompt_logprobs": 2}')).params == _only("prompt_logprobs", 2)
    assert _parse(sampling_parameters=_bytes('{"prompt_logprobs": "0"}')).params.prompt_logprobs == 0
    assert _parse(prompt_logprobs=np.array([5], dtype=np.int32)).params == _only("prompt_logprobs", 5)
    assert _parse().params.prompt_logprobs is None
    for raw, message in [
        ('{"prompt_logprobs": 21}', "prompt_logprobs must be in [0, 20], got 21"),
        ('{"prompt_logprobs": -1}', "prompt_logprobs must be in [0, 20], got -1"),
        ('{"prompt_logprobs": 1.5}', "prompt_logprobs must be an integer, got float 1.5"),
        ('{"prompt_logprobs": "many"}', "prompt_logprobs must be an integer, got str 'many'"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            _parse(sampling_parameters=_bytes(raw))


def test_prompt_logprobs_output_is_a_json_list_once_given() -> None:
    from inflight.backend.engine.outputs import RequestOutput, TokenLogprob
    from inflight.backend.serving.responses import build_outputs

    request = _parse(prompt_logprobs=np.array([1], dtype=np.int32))
    out = RequestOutput("r", [7], "x", False, None, 2, 1)
    entries = [None, TokenLogprob(9, -0.5, ((9, -0.5),))]
    tensors = build_outputs(request, "x", [7], [], out, 2, 1, entries)
    assert json.loads(tensors["prompt_logprobs"][0]) == [
        None,
        {"token_id": 9, "logprob": -0.5, "top": {"9": -0.5}},
    ]
    assert "prompt_logprobs" not in build_outputs(request, "x", [7], [], out, 2, 1)  # the later responses


# --- sampling_parameters JSON ---------------------------------------------------------------------------


def test_sampling_parameters_json_with_numbers_as_strings() -> None:
    text = json.dumps(
        {
            "max_tokens": "12",
            "temperature": "0.5",
            "top_k": 40,
            "seed": "99",
            "ignore_eos": "true",
            "stop": ["x", "y"],
            "min_length": "2",
            "n": "1",
        }
    )
    params = _parse(sampling_parameters=_bytes(text)).params
    expected = SamplingParams(
        max_tokens=12, temperature=0.5, top_k=40, seed=99, ignore_eos=True, stop=["x", "y"], min_tokens=2
    )
    assert params == expected


@pytest.mark.parametrize("text", ["", "   "], ids=["empty", "blank"])
def test_empty_sampling_parameters_means_defaults(text: str) -> None:
    assert _parse(sampling_parameters=_bytes(text)).params == SamplingParams()


def test_invalid_sampling_parameters_json_names_the_position() -> None:
    text = '{"max_tokens": 12,}'
    message = (
        "sampling_parameters is not valid JSON: Expecting property name enclosed in double quotes "
        f"at position {text.index('}')}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _parse(sampling_parameters=_bytes(text))


@pytest.mark.parametrize(("text", "kind"), [("[1, 2]", "list"), ('"x"', "str"), ("3", "int")])
def test_sampling_parameters_must_be_an_object(text: str, kind: str) -> None:
    message = f"sampling_parameters must be a JSON object, got {kind}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _parse(sampling_parameters=_bytes(text))


def test_sampling_parameters_unknown_key_and_bad_utf8_are_named() -> None:
    with pytest.raises(ValueError, match="^unknown sampling parameter 'bogus'"):
        _parse(sampling_parameters=_bytes('{"bogus": 1}'))
    with pytest.raises(ValueError, match=r"^sampling_parameters is not valid UTF-8 \(byte 1\)$"):
        _parse(sampling_parameters=_bytes(b"{\xff}"))


def test_scalar_input_overrides_the_json() -> None:
    text = json.dumps({"temperature": 0.9, "max_tokens": 5, "stop": ["a"], "top_k": "3"})
    request = _parse(
        sampling_parameters=_bytes(text),
        temperature=np.array([0.25], dtype=np.float32),
        top_k=_bytes("8"),
        stop=_bytes("b", "c"),
    )
    assert request.params == SamplingParams(temperature=0.25, max_tokens=5, stop=["b", "c"], top_k=8)
