"""Tensor parallelism through a real tritonserver on CPU (gloo): three TP models served at once.

- ``llm``: the default SmolLM2-135M (9 query heads, 3 KV heads) at TP = 3, fp32, with a KV cache small enough
  that a concurrent batch is preempted;
- ``tiny_tp2`` / ``tiny_tp4``: a tiny Llama (4 query heads, 2 KV heads) at TP = 2, and at TP = 4 (fewer KV
  heads than ranks: each KV head replicated on two ranks).

Each must give the greedy tokens of the same checkpoint at TP = 1 in this process (``inflight.LLM``, itself
token-exact with HF transformers), streamed, under preemption, and after a cancelled request (whose KV
blocks are freed).
"""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inflight import LLM, SamplingParams
from inflight.tools.model_repository import DEFAULT_MODEL_REPOSITORY, set_parameters
from inflight.tools.server import TritonServer

from ..conftest import copy_tokenizer
from ..engine.tiny_models import build_tiny_checkpoint
from .triton_helpers import run_streams, serve_repository, settled_metrics, worker_pids

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]
# SmolLM2 at TP 3 holds 1 KV head of 64 per rank: 30 layers x K, V x 16 tokens x 64 x 4 bytes = 240 KiB a block.
# 24 blocks (384 tokens): the four prompts' 4 x ~120 tokens do not fit at once, so some are preempted.
SMOL_BLOCK_BYTES = 30 * 2 * 16 * 64 * 4
SMOL = {"tensor_parallel_size": "3", "dtype": "float32", "max_model_len": "256",
        "kv_cache_memory_bytes": str(25 * SMOL_BLOCK_BYTES), "max_num_seqs": "4"}  # fmt: skip
TINY = {"dtype": "float32", "max_model_len": "256", "kv_cache_memory_bytes": str(16 << 20)}
MAX_TOKENS = 110


def _add_model(repo: Path, name: str, parameters: dict[str, str]) -> None:
    shutil.copytree(
        DEFAULT_MODEL_REPOSITORY / "llm", repo / name, ignore=shutil.ignore_patterns("__pycache__")
    )
    config = repo / name / "config.pbtxt"
    config.write_text(set_parameters(config.read_text(), parameters))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, smollm2_path: Path) -> Path:
    path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama")
    copy_tokenizer(smollm2_path, path)
    return path


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory, smollm2_path: Path, tiny_path: Path) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("tp-server")
    repo = work / "model_repository"
    repo.mkdir()
    _add_model(repo, "llm", {"model_path": str(smollm2_path), **SMOL})
    _add_model(repo, "tiny_tp2", {"model_path": str(tiny_path), "tensor_parallel_size": "2", **TINY})
    _add_model(repo, "tiny_tp4", {"model_path": str(tiny_path), "tensor_parallel_size": "4", **TINY})
    yield from serve_repository(repo, work / "tritonserver.log")


def _reference(path: Path, prompts: list, max_tokens: int, **options) -> list[list[int]]:
    """Greedy token ids at TP = 1 (fp32, EOS ignored: every request runs its length), in this process, one request
    at a time."""
    llm = LLM(str(path), dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 << 20, **options)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [llm.generate([p], params)[0].token_ids for p in prompts]


def _request(prompt, max_tokens: int, stream: bool = True) -> dict:
    key, value = (
        ("text_input", prompt) if isinstance(prompt, str) else ("input_ids", np.array(prompt, np.int32))
    )
    return {key: value, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": stream}


def test_smollm2_tp3_matches_tp1_streamed_and_preempted(tp_server, smollm2_path) -> None:
    expected = _reference(smollm2_path, PROMPTS, MAX_TOKENS)
    before = settled_metrics(tp_server.url_metrics, model="llm")
    requests = {f"r{i}": _request(p, MAX_TOKENS) for i, p in enumerate(PROMPTS)}
    got = run_streams(tp_server.url_grpc, requests, model="llm")
    for i, want in enumerate(expected):
        result = got[f"r{i}"]
        assert not result.errors and result.num_final == 1
        assert len(result.outputs) > 1  # streamed: a response per step, not one at the end
        assert result.token_ids == want, f"prompt {i}"
    after = settled_metrics(tp_server.url_metrics, model="llm")
    key = "inflight_preemptions_total"
    assert after[key] > before[key], "the small KV cache was meant to preempt some of the batch"
    assert after["inflight_kv_blocks_used"] == 0


@pytest.mark.parametrize("model", ["tiny_tp2", "tiny_tp4"])
def test_tiny_tp_matches_tp1(tp_server, tiny_path, model) -> None:
    prompts = [[5, 6, 7, 8, 9], [100, 2000, 30000, 7, 7, 7, 1], list(range(300, 400))]
    expected = _reference(tiny_path, prompts, 40)
    got = run_streams(
        tp_server.url_grpc, {f"p{i}": _request(p, 40) for i, p in enumerate(prompts)}, model=model
    )
    assert [got[f"p{i}"].token_ids for i in range(len(prompts))] == expected


def test_two_tp_models_at_once_and_a_cancelled_request_frees_its_blocks(tp_server, tiny_path) -> None:
    """A request to each tiny model while a long one on ``tiny_tp2`` is cancelled midway: the others finish
    right, the cancelled one's blocks are freed (the KV gauge is back to 0), and the workers are untouched."""
    workers = worker_pids(tp_server.process.pid)
    assert len(workers) == 2 + 1 + 3, workers  # TP 3 + TP 2 + TP 4: N - 1 workers each
    prompt = [11, 12, 13, 14]
    (expected,) = _reference(tiny_path, [prompt], 30)
    results: dict[str, object] = {}
    threads = [
        threading.Thread(target=lambda m=m: results.update(
            {m: run_streams(tp_server.url_grpc, {"x": _request(prompt, 30)}, model=m)["x"]}))
        for m in ("tiny_tp2", "tiny_tp4")
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    cancelled = run_streams(tp_server.url_grpc, {"c": _request(list(range(50, 60)), 200)}, model="tiny_tp2",
                            cancel_after_responses=3)["c"]  # fmt: skip
    for thread in threads:
        thread.join(120)
    assert len(cancelled.outputs) >= 3 and len(cancelled.token_ids) < 200  # cut short
    for model in ("tiny_tp2", "tiny_tp4"):
        assert results[model].token_ids == expected and not results[model].errors
    assert settled_metrics(tp_server.url_metrics, model="tiny_tp2")["inflight_kv_blocks_used"] == 0
    assert worker_pids(tp_server.process.pid) == workers


def test_memory_figures_per_rank(tp_server, smollm2_path) -> None:
    """Each of the three ranks publishes its figures: a third of the weights (norms replicated), the same KV
    cache (one KV head of three each, the same block count), the same longest sequence."""
    from safetensors import safe_open

    total = 0
    for file in smollm2_path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            total += sum(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    now = settled_metrics(tp_server.url_metrics, model="llm")
    ranks = [f'{{rank="{r}"}}' for r in range(3)]
    weights = [now[f"inflight_memory_weights_bytes{r}"] for r in ranks]
    assert total < sum(weights) < total * 1.01  # the replicated norms: under 1%
    assert all(abs(w - total / 3) < total * 0.01 for w in weights), weights
    for name in (
        "inflight_memory_kv_cache_bytes",
        "inflight_kv_cache_capacity_tokens",
        "inflight_max_sequence_tokens",
    ):
        values = {now[f"{name}{r}"] for r in ranks}
        assert len(values) == 1, (name, values)
    assert now[f"inflight_memory_kv_cache_bytes{ranks[0]}"] == 25 * SMOL_BLOCK_BYTES
    assert now[f"inflight_kv_cache_capacity_tokens{ranks[0]}"] == 24 * 16
