"""``n``, ``logit_bias`` and ``tools`` through a real tritonserver: per-sequence responses with
``sequence_index`` (streamed and not) and one FINAL per request, each sequence equal to the engine in this
process; a dropped n = 3 stream frees every block; bad values are named."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from inflight import SamplingParams

from .triton_helpers import StreamResult, run_streams, wait_for_metric

PROMPT = "Once upon a time"
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def _sequences(result: StreamResult) -> dict[int, list[dict[str, np.ndarray]]]:
    """The responses of each sequence, in arrival order, by their sequence_index."""
    by_index: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
    for outputs in result.outputs:
        (index,) = outputs["sequence_index"].tolist()
        by_index[index].append(outputs)
    return dict(by_index)


def _ids(responses: list[dict[str, np.ndarray]]) -> list[int]:
    return [int(t) for r in responses for t in r["output_ids"].reshape(-1)]


def _text(responses: list[dict[str, np.ndarray]]) -> str:
    return "".join(b"".join(r["text_output"].reshape(-1)).decode() for r in responses)


def test_n3_streamed_and_whole_one_final_each_sequence_as_the_engine(triton_server, greedy_reference) -> None:
    common = {"text_input": PROMPT, "n": 3, "max_tokens": 8, "temperature": 0.0, "return_finish_reason": True,
              "exclude_input_in_output": True, "ignore_eos": True}  # fmt: skip
    results = run_streams(triton_server.url_grpc, {"stream": {**common, "stream": True}, "whole": common})
    # temperature 0: every sequence is the greedy one
    (expected,) = greedy_reference.llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )
    assert expected.finish_reason == "length" and len(expected.token_ids) == 8
    for r in results.values():
        assert not r.errors and r.num_final == 1, r.errors

    streamed = _sequences(results["stream"])
    assert sorted(streamed) == [0, 1, 2]
    for responses in streamed.values():
        assert len(responses) > 1  # streamed token by token (or a few at a time)
        assert _ids(responses) == expected.token_ids and _text(responses) == expected.text
        finishes = [r["finish_reason"].tolist() for r in responses if "finish_reason" in r]
        assert finishes == [[expected.finish_reason.encode()]] and "finish_reason" in responses[-1]

    whole = _sequences(results["whole"])
    assert sorted(whole) == [0, 1, 2] and all(len(responses) == 1 for responses in whole.values())
    for (response,) in whole.values():
        assert _ids([response]) == expected.token_ids and _text([response]) == expected.text


def test_seeded_sequences_equal_the_engines(triton_server, greedy_reference) -> None:
    request = {"text_input": PROMPT, "n": 3, "max_tokens": 6, "temperature": 1.0, "ignore_eos": True,
               "seed": np.array([77], dtype=np.uint64), "exclude_input_in_output": True, "stream": True}  # fmt: skip
    (result,) = run_streams(triton_server.url_grpc, {"seeded": request}).values()
    assert not result.errors and result.num_final == 1
    (expected,) = greedy_reference.llm.generate(
        PROMPT, SamplingParams(n=3, seed=77, temperature=1.0, max_tokens=6, ignore_eos=True)
    )
    served = _sequences(result)
    assert [_ids(served[i]) for i in range(3)] == [o.token_ids for o in expected.outputs]
    assert len({tuple(o.token_ids) for o in expected.outputs}) == 3


def test_logit_bias_changes_the_greedy_choice_as_in_the_engine(triton_server, greedy_reference) -> None:
    first = greedy_reference(PROMPT, 4).token_ids[0]
    bias = {first: -100.0}
    request = {"text_input": PROMPT, "max_tokens": 4, "temperature": 0.0, "exclude_input_in_output": True,
               "logit_bias": json.dumps({str(t): b for t, b in bias.items()})}  # fmt: skip
    (result,) = run_streams(triton_server.url_grpc, {"biased": request}).values()
    assert not result.errors and result.num_final == 1
    (expected,) = greedy_reference.llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=4, logit_bias=bias)
    )
    assert result.token_ids == expected.token_ids and expected.token_ids[0] != first
    assert result.outputs[0]["sequence_index"].tolist() == [0]


def test_tools_reach_the_chat_template(triton_server, smollm2_tokenizer) -> None:
    request = {"messages": json.dumps(CHAT), "tools": json.dumps(TOOLS), "max_tokens": 2, "ignore_eos": True,
               "temperature": 0.0}  # fmt: skip
    (result,) = run_streams(triton_server.url_grpc, {"tools": request}).values()
    assert not result.errors and result.num_final == 1
    text = smollm2_tokenizer.apply_chat_template(
        CHAT, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    prompt_ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert result.token_ids[:-2] == prompt_ids  # the response holds the prompt's ids, then the 2 new ones


def test_dropped_n3_stream_frees_every_block(triton_server) -> None:
    request = {"text_input": PROMPT, "n": 3, "max_tokens": 300, "ignore_eos": True, "stream": True}
    results = run_streams(triton_server.url_grpc, {"long": request}, cancel_after_responses=6)
    assert 6 <= len(results["long"].outputs) < 900
    assert wait_for_metric(triton_server.url_metrics, "inflight_kv_blocks_used", 0.0) == 0.0
    assert wait_for_metric(triton_server.url_metrics, "inflight_num_requests_running", 0.0) == 0.0


BAD = {
    "n-zero": ({"text_input": "hi", "n": 0}, "n must be at least 1, got 0"),
    # the test server's max_queue_size is 64 (max_num_seqs 256)
    "n-too-many": (
        {"text_input": "hi", "n": 65},
        "n must be in [1, 64] (max_num_seqs and max_queue_size), got 65",
    ),
    "bias-json": ({"text_input": "hi", "logit_bias": '{"7": 1'}, "logit_bias is not valid JSON"),
    "bias-vocab": (
        {"text_input": "hi", "logit_bias": '{"49152": 1}'},
        "logit_bias token id 49152 is outside the vocabulary [0, 49152)",
    ),
    "bias-range": (
        {"text_input": "hi", "logit_bias": '{"7": 500}'},
        "logit_bias values must be in [-100, 100]",
    ),
    "tools-json": ({"messages": json.dumps(CHAT), "tools": "[{"}, "tools is not valid JSON"),
    "tools-text": ({"text_input": "hi", "tools": json.dumps(TOOLS)}, "tools is given to the chat template"),
}


@pytest.mark.parametrize(("values", "message"), list(BAD.values()), ids=list(BAD))
def test_bad_values_are_named(triton_server, values: dict, message: str) -> None:
    (r,) = run_streams(triton_server.url_grpc, {"bad": {**values, "max_tokens": 2}}).values()
    assert r.num_final == 1 and len(r.errors) == 1 and not r.outputs, r.errors
    assert message in r.errors[0]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_n1_responses_carry_sequence_index_0(triton_server, stream: bool) -> None:
    request = {"text_input": PROMPT, "max_tokens": 3, "temperature": 0.0, "stream": stream}
    (result,) = run_streams(triton_server.url_grpc, {"one": request}).values()
    assert result.num_final == 1 and result.outputs
    assert all(o["sequence_index"].tolist() == [0] for o in result.outputs)
