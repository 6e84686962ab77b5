"""FP8 weights and an FP8 KV cache through a real tritonserver, on the default SmolLM2 (CPU: FP8 emulated).

The served model takes ``quantization=fp8`` and ``kv_cache_dtype=fp8`` as config parameters; its greedy
tokens and prompt log-probabilities must be the in-process engine's with the same options (which the engine
tests check against HF transformers fake-quantized), and its KV metrics must count the FP8 cache's blocks.

NOTE: one request at a time on both sides. The CPU's fp32 GEMMs sum in an order that depends on the row count,
and under W8A8 a last-bit difference can flip an activation's E4M3 rounding (1/16 of it), which greedy
decoding can amplify into another token: batched differently, FP8 outputs may differ after a few tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from inflight import LLM, SamplingParams
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.model_runner import kv_cache_bytes_per_block
from inflight.tools.model_repository import DEFAULT_MODEL_REPOSITORY, write_model_repository
from inflight.tools.server import TritonServer

from .conftest import SERVER_PARAMETERS
from .triton_helpers import run_streams, settled_metrics

FP8 = {"quantization": "fp8", "kv_cache_dtype": "fp8"}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


@pytest.fixture(scope="module")
def fp8_server(smollm2_path: Path, tmp_path_factory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("fp8-server")
    parameters = {"model_path": str(smollm2_path), **SERVER_PARAMETERS, **FP8}
    repo = write_model_repository(DEFAULT_MODEL_REPOSITORY, work / "model_repository", parameters=parameters)
    server = TritonServer.start(
        repo, log_path=work / "tritonserver.log", extra_args=["--exit-timeout-secs=15"]
    )
    try:
        server.wait_ready(300)
        yield server
    finally:
        server.stop()


def test_fp8_served_matches_the_fp8_engine(fp8_server, smollm2_path) -> None:
    llm = LLM(str(smollm2_path), max_model_len=int(SERVER_PARAMETERS["max_model_len"]),
              kv_cache_memory_bytes=int(SERVER_PARAMETERS["kv_cache_memory_bytes"]), **FP8)  # fmt: skip
    params = SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=1)
    expected = [llm.generate([p], params)[0] for p in PROMPTS]
    for i, (prompt, out) in enumerate(zip(PROMPTS, expected, strict=True)):
        request = {
            "text_input": prompt,
            "max_tokens": 12,
            "temperature": 0.0,
            "stream": True,
            "prompt_logprobs": 1,
        }
        got = run_streams(fp8_server.url_grpc, {f"p{i}": request})[f"p{i}"]
        assert not got.errors and got.num_final == 1
        assert got.text == out.text and len(got.token_ids) == 12
        served = json.loads(got.outputs[0]["prompt_logprobs"][0])
        assert [e["logprob"] for e in served[1:]] == pytest.approx(
            [e.logprob for e in out.prompt_logprobs[1:]], abs=1e-4
        )
    # the FP8 engine is not the full-precision one: some prompt logprob differs
    full = LLM(str(smollm2_path), max_model_len=1024, kv_cache_memory_bytes=64 << 20)
    (dense,) = full.generate(PROMPTS[:1], SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert [e.logprob for e in dense.prompt_logprobs[1:]] != pytest.approx(
        [e.logprob for e in expected[0].prompt_logprobs[1:]], abs=1e-4
    )


def test_fp8_kv_blocks_in_the_metrics(fp8_server, smollm2_path) -> None:
    """One byte an element: the blocks of the budget at the FP8 sizing (the null block is not usable), twice a
    bf16 cache's (the GPU default) and four times an fp32 cache's (the CPU default)."""
    cfg = ModelConfig.from_pretrained(smollm2_path)
    budget = int(SERVER_PARAMETERS["kv_cache_memory_bytes"])
    per_block = {dtype: kv_cache_bytes_per_block(cfg, 16, dtype, cfg.num_kv_heads)
                 for dtype in (torch.float8_e4m3fn, torch.bfloat16, torch.float32)}  # fmt: skip
    total = settled_metrics(fp8_server.url_metrics)["inflight_kv_blocks_total"]
    assert total == budget // per_block[torch.float8_e4m3fn] - 1
    assert total >= 2 * (budget // per_block[torch.bfloat16] - 1)
    assert total >= 4 * (budget // per_block[torch.float32] - 1)
