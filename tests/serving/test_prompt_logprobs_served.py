"""Prompt log-probabilities through a real tritonserver: the optional ``prompt_logprobs`` output, once per
request (a stream's first response), equal to what the engine gives in this process."""

from __future__ import annotations

import json

import pytest

from inflight import SamplingParams

from .triton_helpers import run_streams

PROMPT = "The capital of France is"


def _expected(greedy_reference, k: int) -> list:
    (out,) = greedy_reference.llm.generate(
        PROMPT, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=k)
    )
    return [
        None
        if lp is None
        else {"token_id": lp.token_id, "logprob": lp.logprob, "top": {str(t): v for t, v in lp.top}}
        for lp in out.prompt_logprobs
    ]


def _assert_close(got: list, expected: list) -> None:
    assert len(got) == len(expected) and got[0] is None
    for g, e in zip(got[1:], expected[1:], strict=True):
        assert g["token_id"] == e["token_id"]
        assert g["logprob"] == pytest.approx(e["logprob"], abs=1e-4)
        assert list(g["top"]) == list(e["top"])
        assert list(g["top"].values()) == pytest.approx(list(e["top"].values()), abs=1e-4)


def test_prompt_logprobs_output_streamed_and_whole(triton_server, greedy_reference) -> None:
    common = {"text_input": PROMPT, "max_tokens": 4, "temperature": 0.0}
    results = run_streams(triton_server.url_grpc, {
        "stream": {**common, "stream": True, "prompt_logprobs": 2},
        "whole": {**common, "sampling_parameters": json.dumps({"prompt_logprobs": 0})},
        "none": {**common, "stream": True},
    })  # fmt: skip
    assert all(not r.errors and r.num_final == 1 for r in results.values())

    stream = results["stream"]
    assert len(stream.outputs) > 1
    carrying = [i for i, o in enumerate(stream.outputs) if "prompt_logprobs" in o]
    assert carrying == [0], "sent once, with the first response"
    _assert_close(json.loads(stream.outputs[0]["prompt_logprobs"][0]), _expected(greedy_reference, 2))

    (whole,) = results["whole"].outputs
    got = json.loads(whole["prompt_logprobs"][0])
    _assert_close(got, _expected(greedy_reference, 0))
    assert all(entry["top"] == {} for entry in got[1:])

    assert all("prompt_logprobs" not in o for o in results["none"].outputs)
