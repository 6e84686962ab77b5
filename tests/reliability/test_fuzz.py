"""Scenario 3: malformed requests (hypothesis) each get INVALID_ARG naming the field, at once (the time of
each answer is recorded: harness.HANG_S)."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.harness import HANG_S, Job, StreamWorker, check_clean, stub_pid

VOCAB = 49152
FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
BAD_FLOAT = {  # values each float option refuses
    "temperature": st.one_of(st.floats(max_value=-1e-6), st.just(float("nan")), st.just(float("inf"))),
    "top_p": st.one_of(st.floats(min_value=1.0001, allow_infinity=False), st.floats(max_value=0.0), st.just(float("nan"))),
    "min_p": st.one_of(st.floats(min_value=1.0001, allow_infinity=False), st.floats(max_value=-1e-6), st.just(float("nan"))),
    "repetition_penalty": st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf"))),
    "presence_penalty": st.one_of(st.floats(min_value=2.0001), st.floats(max_value=-2.0001), st.just(float("nan"))),
    "frequency_penalty": st.one_of(st.floats(min_value=2.0001), st.floats(max_value=-2.0001), st.just(float("nan"))),
}  # fmt: skip
PROMPT = {"text_input": "hi", "max_tokens": 2}


def _f32(x: float) -> np.ndarray:
    with np.errstate(over="ignore"):  # a huge value becomes inf: still out of range
        return np.array([x], dtype=np.float32)


@st.composite
def malformed(draw) -> tuple[dict, str]:
    """(inputs, the field the error must name)."""
    kind = draw(st.sampled_from([
        "float_scalar", "float_json", "int_range", "wrong_dtype", "wrong_shape", "extra_tensor", "no_prompt",
        "two_prompts", "bad_utf8", "bad_json", "json_not_object", "bad_messages", "oov_ids", "huge_max_tokens",
        "unknown_json_key", "json_wrong_type", "empty_prompt", "bad_bool",
    ]))  # fmt: skip
    if kind == "float_scalar":
        name = draw(st.sampled_from(FLOATS))
        return {**PROMPT, name: _f32(draw(BAD_FLOAT[name]))}, name
    if kind == "float_json":
        name = draw(st.sampled_from(FLOATS))
        value = draw(BAD_FLOAT[name])
        text = json.dumps({name: value if value == value else "NaN"})
        return {**PROMPT, "sampling_parameters": text}, name
    if kind == "int_range":
        name, value = draw(st.sampled_from([
            ("max_tokens", st.integers(max_value=0)), ("top_k", st.integers(max_value=-2)),
            ("min_tokens", st.integers(max_value=-1)),
        ]))  # fmt: skip
        v = draw(value.filter(lambda x: x >= -(2**31)))
        return {"text_input": "hi", name: np.array([v], dtype=np.int32)}, name
    if kind == "wrong_dtype":
        name = draw(
            st.sampled_from(["max_tokens", "temperature", "text_input", "stream", "seed", "input_ids"])
        )
        value = draw(st.sampled_from([_f32(1.0), np.array([b"x"], dtype=np.object_), np.array([1], dtype=np.int32),
                                      np.array([1.0])]))  # fmt: skip
        values = (
            {"text_input": "hi"} if name != "text_input" else {"input_ids": np.array([1], dtype=np.int32)}
        )
        if name == "input_ids":
            values = {}
        # a value of the input's own dtype is not malformed: swap it for a string
        if {"max_tokens": np.int32, "temperature": np.float32, "input_ids": np.int32}.get(
            name
        ) == value.dtype.type:
            value = np.array([b"x"], dtype=np.object_)
        if (
            name in ("text_input", "stream", "seed", "input_ids")
            and value.dtype == np.object_
            and name == "text_input"
        ):
            value = _f32(1.0)
        return {**values, name: value}, name
    if kind == "wrong_shape":
        name = draw(st.sampled_from(["max_tokens", "temperature", "stream"]))
        n = draw(st.integers(2, 5))
        value = {"max_tokens": np.ones(n, np.int32), "temperature": np.ones(n, np.float32),
                 "stream": np.ones(n, np.bool_)}[name]  # fmt: skip
        return {**PROMPT, name: value}, name
    if kind == "extra_tensor":
        name = draw(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12).filter(
                lambda s: s not in ("stream", "seed", "stop", "top_k", "top_p", "min_p")
            )
        )
        return {**PROMPT, f"x_{name}": np.array([1], dtype=np.int32)}, f"x_{name}"
    if kind == "no_prompt":
        return {"max_tokens": 2}, "text_input"
    if kind == "two_prompts":
        return {**PROMPT, "input_ids": np.array([1, 2], dtype=np.int32)}, "text_input"
    if kind == "bad_utf8":
        name = draw(st.sampled_from(["text_input", "messages", "sampling_parameters", "stop"]))
        raw = draw(st.binary(min_size=0, max_size=8)) + b"\xff\xfe" + draw(st.binary(max_size=4))
        values = {**PROMPT} if name != "text_input" and name != "messages" else {"max_tokens": 2}
        values[name] = np.array([raw], dtype=np.object_)
        return values, name
    if kind == "bad_json":
        name = draw(st.sampled_from(["sampling_parameters", "messages"]))
        text = draw(st.sampled_from(['{"max_tokens": 4,', "{", "[", '{"a": }', "nul", "{'a': 1}"]))
        values = {**PROMPT} if name == "sampling_parameters" else {"max_tokens": 2}
        values[name] = text
        return values, name
    if kind == "json_not_object":
        return {
            **PROMPT,
            "sampling_parameters": draw(st.sampled_from(["[1]", "3", '"x"', "true"])),
        }, "sampling_parameters"
    if kind == "bad_messages":
        text = draw(
            st.sampled_from(["[]", "{}", '[{"role": "user"}]', '[{"role": 1, "content": "x"}]', "[1, 2]"])
        )
        return {"messages": text, "max_tokens": 2}, "messages"
    if kind == "oov_ids":
        ids = draw(st.lists(st.integers(0, VOCAB - 1), max_size=4))
        bad = draw(st.one_of(st.integers(VOCAB, 2**31 - 1), st.integers(-(2**31), -1)))
        ids.insert(draw(st.integers(0, len(ids))), bad)
        return {"input_ids": np.array(ids, dtype=np.int32), "max_tokens": 2}, "input_ids"
    if kind == "huge_max_tokens":
        value = draw(st.integers(10**4, 10**30))
        if value < 2**31 and draw(st.booleans()):
            return {"text_input": "hi", "max_tokens": np.array([value], dtype=np.int32)}, "max_tokens"
        return {"text_input": "hi", "sampling_parameters": json.dumps({"max_tokens": value})}, "max_tokens"
    if kind == "unknown_json_key":
        key = draw(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=3, max_size=10).filter(
                lambda s: s not in ("seed", "stop", "top_k", "top_p", "min_p", "logprobs", "temperature", "n")
            )
        )
        return {**PROMPT, "sampling_parameters": json.dumps({f"zz{key}": 1})}, f"zz{key}"
    if kind == "json_wrong_type":
        name = draw(st.sampled_from(["max_tokens", "top_k", "seed", "temperature", "ignore_eos", "stop"]))
        value = draw(st.sampled_from([[1], {"a": 1}, "abc"]))
        if name == "stop" and value == "abc":
            value = [1, 2]
        return {"text_input": "hi", "sampling_parameters": json.dumps({name: value})}, name
    if kind == "empty_prompt":
        name = draw(st.sampled_from(["text_input", "input_ids"]))
        value = "" if name == "text_input" else np.zeros(0, dtype=np.int32)
        return {name: value, "max_tokens": 2}, name
    # bad_bool: a string where a flag is expected, inside sampling_parameters
    return {**PROMPT, "sampling_parameters": json.dumps({"ignore_eos": "maybe"})}, "ignore_eos"


def test_fuzzed_requests_get_invalid_arg_naming_the_field(scenario, rel_server, full: bool) -> None:
    stub = stub_pid(rel_server)
    worker = StreamWorker(rel_server.url_grpc)

    @settings(max_examples=1200 if full else 150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=malformed())
    def check(case: tuple[dict, str]) -> None:
        values, field = case
        scenario.requests += 1
        outcome = worker.run(Job(f"fuzz{scenario.requests}", values), timeout_s=HANG_S)
        r = outcome.result
        if not (len(r.errors) == 1 and r.num_final == 1 and not r.outputs):
            scenario.fail(f"{field}: {values!r} -> errors {r.errors} outputs {len(r.outputs)}")
        elif field.lower() not in r.errors[0].lower():
            scenario.fail(f"{field}: the error does not name it: {r.errors[0]!r}")
        else:
            scenario.timed("INVALID_ARG answer", outcome.seconds)

    try:
        check()
    finally:
        worker.close()
    check_clean(scenario, rel_server, stub)
    assert rel_server.model_ready()
    assert scenario.failures == 0, scenario.notes
