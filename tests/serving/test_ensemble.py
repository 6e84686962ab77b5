"""TensorRT-LLM's `ensemble` model through the real tritonserver, as TensorRT-LLM's own clients drive it.

`client_inputs` builds exactly the tensors that tensorrtllm_backend's
`inflight_batcher_llm/client/end_to_end_grpc_client.py` (`prepare_inputs`) sends for one prompt, and
`batched` stacks them as its `--batch-inputs` does; `infer` sends them on a gRPC stream with the outputs
that client requests. The text must equal what the `llm` model and the in-process engine produce.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from benchmarks.perf.tools import output_length_matches, run_genai_perf
from inflight import SamplingParams

from .triton_helpers import http_post, run_streams

MODEL = "ensemble"
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Hello, my name is",
]
MAX_TOKENS = 12


def client_inputs(
    prompt: str, output_len: int, *, streaming: bool = False, temperature: float = 1.0,
    stop_words: list[str] | None = None, bad_words: list[str] | None = None, return_log_probs: bool = False,
    end_id: int | None = None, pad_id: int | None = None, num_return_sequences: int | None = None,
    exclude_input_in_output: bool = False,
) -> dict[str, np.ndarray]:  # fmt: skip
    """end_to_end_grpc_client.prepare_inputs for one prompt, with that script's defaults (temperature 1.0,
    beam width 1, exclude_input_in_output False): every tensor [1, ...]."""
    inputs = {
        "text_input": np.array([[prompt]]).astype(object),
        "max_tokens": np.ones_like([[prompt]]).astype(np.int32) * output_len,
        "stream": np.array([[streaming]], dtype=bool),
        "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[temperature]], dtype=np.float32),
    }
    if num_return_sequences is not None:
        inputs["num_return_sequences"] = np.array([[num_return_sequences]], dtype=np.int32)
    if bad_words:
        inputs["bad_words"] = np.array([bad_words], dtype=object)
    if stop_words:
        inputs["stop_words"] = np.array([stop_words], dtype=object)
    if return_log_probs:
        inputs["return_log_probs"] = np.array([[True]], dtype=bool)
    if end_id is not None:
        inputs["end_id"] = np.array([[end_id]], dtype=np.int32)
    if pad_id is not None:
        inputs["pad_id"] = np.array([[pad_id]], dtype=np.int32)
    inputs["exclude_input_in_output"] = np.array([[exclude_input_in_output]], dtype=bool)
    return inputs


def batched(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The client's --batch-inputs: each tensor of the rows concatenated along the batch axis."""
    return {key: np.concatenate([row[key] for row in rows], axis=0) for key in rows[0]}


@dataclass
class EnsembleResult:
    """Every response one ensemble request received, and its errors."""

    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    num_final: int = 0

    def texts(self, streaming: bool) -> dict[tuple[int, int], str]:
        """Text by (batch_index, sequence_index), read as the client does: appended deltas when streaming,
        else each response's whole text."""
        texts: dict[tuple[int, int], str] = {}
        for out in self.outputs:
            batch = out.get("batch_index")
            seq = out.get("sequence_index")
            key = (0 if batch is None else int(batch[0][0]), 0 if seq is None else int(seq[0][0]))
            text = out["text_output"][0].decode("utf-8")
            texts[key] = texts.get(key, "") + text if streaming else text
        return texts


def infer(url: str, inputs: dict[str, np.ndarray], requested: list[str] | None = None,
          cancel_after: int | None = None, timeout_s: float = 120.0) -> EnsembleResult:  # fmt: skip
    """One request on a gRPC stream, with the client's requested outputs; waits for its FINAL response
    (or cancels the stream after `cancel_after` responses)."""
    received = EnsembleResult()
    events: queue.SimpleQueue = queue.SimpleQueue()
    lock = threading.Lock()

    def callback(result: Any, error: Any) -> None:  # tritonclient passes both by keyword
        with lock:
            if error is not None:
                received.errors.append(str(error))
                received.num_final += 1  # the ensemble sends an error only as a request's final response
            else:
                response = result.get_response()
                outputs = {o.name: result.as_numpy(o.name) for o in response.outputs}
                if outputs:
                    received.outputs.append(outputs)
                received.num_final += int(response.parameters["triton_final_response"].bool_param)
        events.put(None)

    tensors = []
    for name, value in inputs.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(name) for name in requested or ["text_output"]]
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=callback)
    try:
        client.async_stream_infer(
            MODEL, tensors, outputs=outputs, request_id="r", enable_empty_final_response=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with lock:
                if received.num_final or (cancel_after is not None and len(received.outputs) >= cancel_after):
                    break
            try:
                events.get(timeout=0.5)
            except queue.Empty:
                pass
        else:
            raise AssertionError(f"no final response in {timeout_s:.0f} s: {received}")
    finally:
        client.stop_stream(cancel_requests=cancel_after is not None)
        client.close()
    return received


def requested_outputs(batch: bool = False, log_probs: bool = False) -> list[str]:
    """The outputs end_to_end_grpc_client.py requests."""
    return ["text_output", *(["cum_log_probs", "output_log_probs"] if log_probs else []),
            *(["batch_index"] if batch else [])]  # fmt: skip


def refused(triton_server, tensors: dict[str, np.ndarray], named: str) -> None:
    """The request gets exactly one response: a final INVALID_ARG error naming `named`."""
    r = infer(triton_server.url_grpc, {**client_inputs("Hello", 4), **tensors})
    assert r.outputs == [] and len(r.errors) == 1, r
    assert named in r.errors[0], r.errors[0]


# --- what the client sends, answered as the engine answers -------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_one_prompt_as_the_client_sends_it_equals_llm_and_the_engine(
    triton_server, greedy_reference, streaming: bool
) -> None:
    prompt = PROMPTS[0]
    # The client's default temperature 1.0 without top_k / top_p is greedy in TensorRT-LLM (top_k 1, top_p 0).
    r = infer(triton_server.url_grpc, client_inputs(prompt, MAX_TOKENS, streaming=streaming))
    assert not r.errors and r.num_final == 1
    expected = greedy_reference(prompt, MAX_TOKENS).text
    # Not streamed and exclude_input_in_output false: the prompt comes first (the client's --check-outputs).
    assert r.texts(streaming) == {(0, 0): expected if streaming else prompt + expected}
    if streaming:
        assert len(r.outputs) > 3, "a stream forwards llm's deltas as they come"
    else:
        assert len(r.outputs) == 1
    llm = run_streams(triton_server.url_grpc, {"a": {
        "text_input": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": streaming,
    }})["a"]  # fmt: skip
    assert not llm.errors and llm.text == "".join(r.texts(streaming).values())


@pytest.mark.parametrize("streaming", [False, True])
def test_a_batch_of_four_answers_each_row_tagged_with_its_batch_index(
    triton_server, greedy_reference, streaming: bool
) -> None:
    inputs = batched([client_inputs(p, MAX_TOKENS, streaming=streaming, exclude_input_in_output=True)
                      for p in PROMPTS])  # fmt: skip
    assert inputs["text_input"].shape == (4, 1)
    r = infer(triton_server.url_grpc, inputs, requested_outputs(batch=True))
    assert not r.errors and r.num_final == 1
    assert r.texts(streaming) == {(i, 0): greedy_reference(p, MAX_TOKENS).text for i, p in enumerate(PROMPTS)}
    if not streaming:
        assert sorted(int(o["batch_index"][0][0]) for o in r.outputs) == [0, 1, 2, 3]


def test_stop_words_as_the_client_sends_them_end_the_text_after_the_word(
    triton_server, greedy_reference
) -> None:
    full = greedy_reference(PROMPTS[0], 32).text
    word = full.split()[1]  # a word the greedy answer reaches after its first
    assert word in full
    expected = full[: full.index(word) + len(word)]  # TensorRT-LLM keeps the stop word in the output
    for streaming in (False, True):
        inputs = batched([client_inputs(PROMPTS[0], 32, streaming=streaming, exclude_input_in_output=True,
                                        stop_words=[word, "never-generated"]) for _ in range(2)])  # fmt: skip
        assert inputs["stop_words"].shape == (2, 2)
        r = infer(triton_server.url_grpc, inputs, requested_outputs(batch=True))
        assert not r.errors and r.num_final == 1
        assert r.texts(streaming) == {(0, 0): expected, (1, 0): expected}


def test_bad_words_as_the_client_sends_them_equal_the_engines_bad_words(
    triton_server, greedy_reference
) -> None:
    free = greedy_reference(PROMPTS[0], MAX_TOKENS).text
    banned = " " + free.split()[0].strip(".,")  # " Paris": tokenized as sent, as TensorRT-LLM does
    (expected,) = greedy_reference.llm.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, bad_words=[banned])
    )
    assert expected.text != free, "the banned word must change the greedy answer"
    r = infer(triton_server.url_grpc, client_inputs(
        PROMPTS[0], MAX_TOKENS, bad_words=[banned], exclude_input_in_output=True))  # fmt: skip
    assert not r.errors and r.texts(False) == {(0, 0): expected.text}


def test_end_id_ends_the_sequence_at_that_token(triton_server, greedy_reference) -> None:
    free = greedy_reference(PROMPTS[0], MAX_TOKENS)
    end_id = free.token_ids[2]
    (expected,) = greedy_reference.llm.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[end_id])
    )
    assert len(expected.token_ids) <= 3 and len(expected.text) < len(free.text)
    r = infer(triton_server.url_grpc, client_inputs(
        PROMPTS[0], MAX_TOKENS, end_id=end_id, pad_id=0, exclude_input_in_output=True))  # fmt: skip
    assert not r.errors and r.texts(False) == {(0, 0): expected.text}


def test_return_log_probs_gives_trtllm_shapes_and_the_engines_values(triton_server, greedy_reference) -> None:
    (expected,) = greedy_reference.llm.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0)
    )
    values = [lp.logprob for lp in expected.logprobs]
    r = infer(triton_server.url_grpc,
              client_inputs(PROMPTS[0], MAX_TOKENS, return_log_probs=True, exclude_input_in_output=True),
              requested_outputs(log_probs=True))  # fmt: skip
    assert not r.errors and len(r.outputs) == 1
    out = r.outputs[0]
    assert out["cum_log_probs"].shape == (1, 1) and out["output_log_probs"].shape == (1, 1, len(values))
    np.testing.assert_allclose(out["output_log_probs"][0, 0], values, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["cum_log_probs"][0, 0], sum(values), rtol=0, atol=1e-4)

    streamed = infer(triton_server.url_grpc, client_inputs(
        PROMPTS[0], MAX_TOKENS, streaming=True, return_log_probs=True, exclude_input_in_output=True),
        requested_outputs(log_probs=True))  # fmt: skip
    deltas = np.concatenate([o["output_log_probs"][0, 0] for o in streamed.outputs])
    np.testing.assert_allclose(deltas, values, rtol=0, atol=1e-5)
    # Each response's cum_log_probs is the sum so far (TensorRT-LLM streams it that way too).
    np.testing.assert_allclose(streamed.outputs[-1]["cum_log_probs"][0, 0], sum(values), rtol=0, atol=1e-4)


def test_num_return_sequences_are_tagged_with_sequence_index_and_equal_the_engines(
    triton_server, greedy_reference
) -> None:
    # top_p turns sampling on (TensorRT-LLM's rule); random_seed makes the three sequences reproducible.
    rows = client_inputs(PROMPTS[3], 6, num_return_sequences=3, exclude_input_in_output=True)
    rows |= {"top_p": np.array([[1.0]], np.float32), "random_seed": np.array([[77]], np.uint64)}
    (expected,) = greedy_reference.llm.generate(
        PROMPTS[3], SamplingParams(n=3, seed=77, temperature=1.0, top_p=1.0, max_tokens=6)
    )
    wanted = {(0, i): out.text for i, out in enumerate(expected.outputs)}
    assert len(set(wanted.values())) > 1, "seeded sampling should give different sequences"
    for streaming in (False, True):
        inputs = {**rows, "stream": np.array([[streaming]])}
        r = infer(triton_server.url_grpc, inputs, ["text_output", "sequence_index"])
        assert not r.errors and r.num_final == 1
        assert r.texts(streaming) == wanted


SCHEMA = {
    "type": "object",
    "properties": {"capital": {"type": "string", "enum": ["Paris", "Lyon", "Nice"]}},
    "required": ["capital"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("guide_type", "guide", "llm_input"),
    [
        ("json_schema", json.dumps(SCHEMA), "guided_json"),
        ("regex", "(yes|no), because [a-z]+", "guided_regex"),
        ("json", None, "guided_json"),
    ],  # fmt: skip
)
def test_guided_decoding_as_the_client_sends_it_equals_llms_guided_inputs(
    triton_server, guide_type: str, guide: str | None, llm_input: str
) -> None:
    prompt = "Answer in JSON: what is the capital of France?"
    inputs = client_inputs(prompt, 40, exclude_input_in_output=True)
    inputs["guided_decoding_guide_type"] = np.array([[guide_type]]).astype(object)
    if guide is not None:
        inputs["guided_decoding_guide"] = np.array([[guide]]).astype(object)
    r = infer(triton_server.url_grpc, inputs)
    assert not r.errors and r.num_final == 1, r.errors
    text = r.texts(False)[(0, 0)]
    if guide_type == "json_schema":
        assert json.loads(text) in ({"capital": c} for c in SCHEMA["properties"]["capital"]["enum"])
    elif guide_type == "regex":
        assert re.fullmatch(guide, text), text
    else:  # TensorRT-LLM's "json": any JSON value
        json.loads(text)
    llm = run_streams(triton_server.url_grpc, {"a": {
        "text_input": prompt, "max_tokens": 40, "temperature": 0.0, "exclude_input_in_output": True,
        llm_input: guide if guide is not None else "{}",
    }})["a"]  # fmt: skip
    assert not llm.errors and llm.text == text


def test_tritons_generate_endpoint_answers_and_refuses_with_http_400(triton_server, greedy_reference) -> None:
    url, path = triton_server.url_http, f"/v2/models/{MODEL}/generate"
    status, body = http_post(url, path, {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS})
    assert status == 200, body
    assert json.loads(body)["text_output"] == PROMPTS[0] + greedy_reference(PROMPTS[0], MAX_TOKENS).text
    status, body = http_post(url, path, {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS, "beam_width": 2})
    assert status == 400 and json.loads(body)["error"].startswith("beam_width must be 1"), body
    # llm's own INVALID_ARG (a prompt past max_model_len) keeps its kind through the ensemble.
    status, body = http_post(url, path, {"text_input": "hello " * 1500, "max_tokens": MAX_TOKENS})
    assert status == 400 and "max_model_len" in json.loads(body)["error"], body


# --- refusals: what the engine cannot do is named, never ignored --------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "named"),
    [
        ({"beam_width": np.array([[2]], np.int32)}, "beam_width"),
        ({"return_context_logits": np.array([[True]])}, "return_context_logits"),
        ({"return_generation_logits": np.array([[True]])}, "return_generation_logits"),
        ({"return_perf_metrics": np.array([[True]])}, "return_perf_metrics"),
        ({"length_penalty": np.array([[0.8]], np.float32)}, "length_penalty"),
        (
            {
                "prompt_embedding_table": np.ones((1, 2, 4), np.float16),
                "prompt_vocab_size": np.array([[2]], np.int32),
            },
            "prompt_embedding_table",
        ),  # fmt: skip
        ({"lora_task_id": np.array([[7]], np.uint64)}, "lora_task_id"),
        (
            {"lora_weights": np.ones((1, 2, 8), np.float16), "lora_config": np.zeros((1, 2, 3), np.int32)},
            "lora_weights",
        ),  # fmt: skip
        (
            {
                "embedding_bias_words": np.array([["Paris"]], object),
                "embedding_bias_weights": np.array([[1.5]], np.float32),
            },
            "embedding_bias_words",
        ),  # fmt: skip
        ({"decoder_text_input": np.array([["Bonjour"]], object)}, "decoder_text_input"),
        (
            {
                "guided_decoding_guide_type": np.array([["ebnf_grammar"]], object),
                "guided_decoding_guide": np.array([['root ::= "a"']], object),
            },
            "guided_decoding_guide_type",
        ),  # fmt: skip
        (
            {
                "guided_decoding_guide_type": np.array([["json_schema"]], object),
                "guided_decoding_guide": np.array([["{not json"]], object),
            },
            "guided_decoding_guide",
        ),  # fmt: skip
        ({"guided_decoding_guide_type": np.array([["regex"]], object)}, "guided_decoding_guide"),
        ({"max_tokens": np.array([[0]], np.int32)}, "max_tokens"),
        ({"min_length": np.array([[9]], np.int32)}, "min_length"),
        ({"num_return_sequences": np.array([[0]], np.int32)}, "num_return_sequences"),
        ({"top_p": np.array([[1.5]], np.float32)}, "top_p"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_what_the_engine_cannot_do_is_refused_naming_the_tensor(triton_server, tensors, named) -> None:
    refused(triton_server, tensors, named)


def test_one_bad_row_refuses_the_whole_batch_before_any_row_runs(triton_server) -> None:
    rows = [client_inputs(p, 4) for p in PROMPTS[:3]]
    rows[1]["beam_width"] = np.array([[4]], np.int32)
    r = infer(triton_server.url_grpc, batched(rows), requested_outputs(batch=True))
    assert r.outputs == [] and len(r.errors) == 1 and "beam_width" in r.errors[0]


def test_a_row_that_fails_in_llm_ends_the_request_with_its_error_after_the_other_rows(
    triton_server, greedy_reference
) -> None:
    too_long = "hello " * 1500  # past max_model_len 1024: llm refuses this row only
    inputs = batched([client_inputs(PROMPTS[0], 6, exclude_input_in_output=True),
                      client_inputs(too_long, 6, exclude_input_in_output=True)])  # fmt: skip
    r = infer(triton_server.url_grpc, inputs, requested_outputs(batch=True))
    assert r.texts(False) == {(0, 0): greedy_reference(PROMPTS[0], 6).text}
    assert len(r.errors) == 1 and r.errors[0].count("batch_index 1:") == 1, r.errors


def test_a_cancelled_stream_leaves_the_server_serving(triton_server, greedy_reference) -> None:
    r = infer(triton_server.url_grpc, client_inputs(PROMPTS[1], 64, streaming=True), cancel_after=2)
    # The only error is the client's own note of its cancellation; the model's final response (CANCELLED)
    # goes to a stream that is gone (tests/backend/test_trtllm_ensemble.py checks it with a double).
    assert len(r.outputs) >= 2 and all("Locally cancelled" in e for e in r.errors), r.errors
    again = infer(triton_server.url_grpc, client_inputs(PROMPTS[0], MAX_TOKENS, exclude_input_in_output=True))
    assert not again.errors and again.texts(False) == {(0, 0): greedy_reference(PROMPTS[0], MAX_TOKENS).text}


# --- NVIDIA's benchmark client ---------------------------------------------------------------------------


def test_genai_perf_tensorrtllm_mode_against_the_ensemble(
    triton_server, smollm2_path: Path, tmp_path: Path
) -> None:
    done, stats = run_genai_perf(
        "tensorrtllm", triton_server.url_grpc, smollm2_path, tmp_path / "artifacts", output_tokens=6,
        input_tokens=24, request_count=3, concurrency=2, model=MODEL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert stats["request_count"]["avg"] == 3
    assert output_length_matches(stats, 6), stats["output_sequence_length"]
    assert stats["time_to_first_token"]["avg"] > 0
