"""The Triton model through a real tritonserver: streaming, concurrency, cancellation, errors, metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from inflight import LLM, SamplingParams

from .triton_helpers import (
    http_post,
    is_model_ready,
    metrics,
    run_streams,
    settled_metrics,
    sse_events,
    wait_for_metric,
)

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def direct(greedy_reference) -> LLM:
    """The same checkpoint, engine-direct in this process: the reference for what the server must say."""
    return greedy_reference.llm


def _greedy(direct: LLM, prompt, max_tokens: int):
    (out,) = direct.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0))
    return out


def test_streamed_chat_answers_paris_and_matches_engine_and_http(triton_server, direct: LLM) -> None:
    expected = _greedy(direct, CHAT, 32)
    results = run_streams(triton_server.url_grpc, {"chat": {
        "messages": json.dumps(CHAT), "stream": True, "max_tokens": 32, "temperature": 0.0,
        "return_finish_reason": True, "return_num_input_tokens": True,
    }})  # fmt: skip
    r = results["chat"]
    assert not r.errors and r.num_final == 1
    assert "Paris" in r.text
    assert r.text == expected.text and r.token_ids == expected.token_ids
    assert len(r.outputs) > 3, "a stream must deliver tokens one response at a time"
    assert all(len(o["output_ids"]) for o in r.outputs), "every response carries the tokens it streams"
    assert r.outputs[-1]["finish_reason"][0].decode() == "stop"
    assert int(r.outputs[0]["num_input_tokens"][0]) == expected.num_input_tokens

    body = {"messages": json.dumps(CHAT), "max_tokens": 32, "temperature": 0, "exclude_input_in_output": True}
    status, text = http_post(triton_server.url_http, "/v2/models/llm/generate", body)
    assert status == 200 and json.loads(text)["text_output"] == expected.text
    status, text = http_post(
        triton_server.url_http, "/v2/models/llm/generate_stream", {**body, "stream": True}
    )
    assert status == 200
    events = sse_events(text)
    assert len(events) > 3 and "".join(e["text_output"] for e in events) == expected.text
    # Without exclude_input_in_output a non-streamed answer starts with the prompt text (vLLM backend style).
    status, text = http_post(
        triton_server.url_http,
        "/v2/models/llm/generate",
        {"text_input": "The capital of France is", "max_tokens": 8, "temperature": 0},
    )
    plain = _greedy(direct, "The capital of France is", 8)
    assert status == 200 and json.loads(text)["text_output"] == "The capital of France is" + plain.text


def test_sixteen_concurrent_streams_each_correct_with_one_final(triton_server, direct: LLM) -> None:
    prompts = [
        f"Count from {i} to {i + 9}:" if i % 2 else f"Write {i + 1} words about the sea." for i in range(16)
    ]
    lengths = [4 + 3 * i for i in range(16)]
    requests = {
        f"r{i}": {"text_input": p, "stream": True, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
                  "return_num_output_tokens": True}
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    }  # fmt: skip
    results = run_streams(triton_server.url_grpc, requests)
    expected = direct.generate(
        prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    )
    for i, exp in enumerate(expected):
        r = results[f"r{i}"]
        assert not r.errors, r.errors
        assert r.num_final == 1
        assert r.token_ids == exp.token_ids and r.text == exp.text
        assert sum(int(o["num_output_tokens"][0]) for o in r.outputs) == lengths[i]


def test_cancelled_stream_stops_and_frees_its_blocks(triton_server) -> None:
    before = settled_metrics(triton_server.url_metrics)
    request = {"text_input": "Tell me a very long story about dragons.", "stream": True, "max_tokens": 400,
               "ignore_eos": True, "temperature": 0.0}  # fmt: skip
    results = run_streams(triton_server.url_grpc, {"long": request}, cancel_after_responses=3)
    assert 3 <= len(results["long"].outputs) < 400
    key = 'inflight_requests_total{finish_reason="abort"}'
    assert (
        wait_for_metric(triton_server.url_metrics, key, before.get(key, 0.0) + 1) == before.get(key, 0.0) + 1
    )
    # After the abort is counted (the gauges are pushed after the counters, or in a later push).
    assert wait_for_metric(triton_server.url_metrics, "inflight_kv_blocks_used", 0.0) == 0.0
    assert wait_for_metric(triton_server.url_metrics, "inflight_num_requests_running", 0.0) == 0.0
    assert is_model_ready(triton_server.url_http)


BAD_INPUTS = [
    ({"max_tokens": 4}, "text_input"),  # no prompt at all
    ({"text_input": "hi", "max_tokens": np.array([4.0], dtype=np.float32)}, "max_tokens"),  # wrong datatype
    ({"text_input": "hi", "max_tokens": -3}, "max_tokens"),
    ({"text_input": "hi", "temperature": float("nan")}, "temperature"),
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": 4, "bogus": 1}'}, "bogus"),
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": 4,'}, "sampling_parameters"),
    ({"text_input": ""}, "text_input"),
    ({"text_input": b"caf\xc3"}, "UTF-8"),
    ({"text_input": "word " * 1500}, "max_model_len"),
    ({"input_ids": np.array([1, 99999999], dtype=np.int32)}, "vocabulary"),
]


@pytest.mark.parametrize(("values", "named"), BAD_INPUTS, ids=[n for _, n in BAD_INPUTS])
def test_bad_input_is_invalid_arg_naming_the_field(triton_server, values, named: str) -> None:
    results = run_streams(triton_server.url_grpc, {"bad": values}, timeout_s=30)
    r = results["bad"]
    assert r.num_final == 1 and len(r.errors) == 1, (r.errors, r.outputs)
    assert named in r.errors[0]
    assert is_model_ready(triton_server.url_http)


def test_bad_input_over_http_is_400(triton_server) -> None:
    status, text = http_post(
        triton_server.url_http, "/v2/models/llm/generate", {"text_input": "hi", "top_p": 1.5}
    )
    assert status == 400 and "top_p" in json.loads(text)["error"]
    status, _ = http_post(
        triton_server.url_http, "/v2/models/llm/generate", {"text_input": "hi", "max_tokens": 2}
    )
    assert status == 200


def test_metric_counters_match_what_the_client_counted(triton_server) -> None:
    before = settled_metrics(triton_server.url_metrics)
    requests = {
        f"m{i}": {"text_input": f"Say something about number {i}.", "stream": bool(i % 2),
                  "max_tokens": 3 + i, "temperature": 0.0, "ignore_eos": i < 3,
                  "return_num_input_tokens": True, "return_num_output_tokens": True,
                  "return_finish_reason": True}
        for i in range(6)
    }  # fmt: skip
    results = run_streams(triton_server.url_grpc, requests)
    prompt_tokens = sum(int(r.outputs[0]["num_input_tokens"][0]) for r in results.values())
    output_tokens = sum(int(o["num_output_tokens"][0]) for r in results.values() for o in r.outputs)
    reasons = [r.outputs[-1]["finish_reason"][0].decode() for r in results.values()]
    # NOTE: the metrics reach the endpoint up to metrics.METRICS_FLUSH_INTERVAL_S late, all of one
    # flush at once; the running gauge may read 0 before these requests' counts arrive.
    count = "inflight_e2e_request_latency_seconds_count"
    expected = before.get(count, 0.0) + len(requests)
    assert wait_for_metric(triton_server.url_metrics, count, expected) == expected
    after = metrics(triton_server.url_metrics)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("inflight_prompt_tokens_total") == prompt_tokens
    assert delta("inflight_generation_tokens_total") == output_tokens
    for reason in ("stop", "length"):
        assert delta(f'inflight_requests_total{{finish_reason="{reason}"}}') == reasons.count(reason)
    assert delta("inflight_time_to_first_token_seconds_count") == len(requests)
    assert delta("inflight_e2e_request_latency_seconds_count") == len(requests)
    assert delta("inflight_request_generation_tokens_sum") == output_tokens
    assert after["inflight_kv_blocks_used"] == 0.0
    assert after["inflight_kv_blocks_total"] > 0


def test_memory_figures_are_published(triton_server, smollm2_path) -> None:
    """The load's memory figures (issue 22): weights as the checkpoint's tensors in the engine's fp32, the KV
    cache as the server's 256 MiB budget in whole blocks, and the longest sequence the cache and the context
    length allow."""
    from safetensors import safe_open

    config = json.loads((smollm2_path / "config.json").read_text())
    numel = 0
    for file in smollm2_path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            numel += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    now = settled_metrics(triton_server.url_metrics)
    rank = '{rank="0"}'
    assert now[f"inflight_memory_weights_bytes{rank}"] == 4 * numel  # fp32 on CPU, embeddings tied
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    block_bytes = 2 * config["num_hidden_layers"] * 16 * config["num_key_value_heads"] * head_dim * 4
    blocks = now["inflight_kv_blocks_total"]
    assert blocks == (256 << 20) // block_bytes - 1  # the null block left out
    assert now[f"inflight_memory_kv_cache_bytes{rank}"] == (blocks + 1) * block_bytes
    assert now[f"inflight_kv_cache_capacity_tokens{rank}"] == blocks * 16
    assert now[f"inflight_max_sequence_tokens{rank}"] == min(1024, blocks * 16)  # max_model_len 1024
    assert now[f"inflight_memory_activation_peak_bytes{rank}"] == 0  # not measured on CPU
