"""Tensor parallelism in the engine, offline (``inflight.LLM``), on CPU with gloo: every step message kind.

Against the same checkpoint at TP = 1 in fp32 (token-exact with HF transformers, test_hf_parity.py): greedy
tokens, their log-probabilities and the prompt's (the vocab-parallel logits gathered), preemption with swap
to host blocks (SWAP messages) under async scheduling (pending token ids broadcast from rank 0's device);
sizes the model cannot split are refused before any worker starts; a dead worker is fatal.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from inflight import LLM, SamplingParams
from inflight.backend.engine.args import EngineArgs
from inflight.backend.executor.executor import EngineDeadError
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.model_runner import kv_cache_bytes_per_block
from inflight.backend.executor.parallel import local_kv_heads

from ..conftest import copy_tokenizer
from ..serving.triton_helpers import descendants
from .conftest import random_prompts
from .tiny_models import build_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_path) -> Path:
    """4 query heads, 2 KV heads: TP 2 splits both."""
    path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("tp-llama"))
    copy_tokenizer(smollm2_path, path)
    return path


def _llm(path: Path, tp: int, kv_blocks: int | None = None, swap_blocks: int = 0) -> LLM:
    """fp32 on CPU; ``kv_blocks``: that many blocks on every rank (the same scheduling at any TP)."""
    options: dict = {"dtype": "float32", "device": "cpu", "max_model_len": 112, "block_size": 16}
    if tp > 1:
        options["tensor_parallel_size"] = tp
    if kv_blocks is not None:
        cfg = ModelConfig.from_pretrained(path)
        block = kv_cache_bytes_per_block(cfg, 16, torch.float32, local_kv_heads(cfg.num_kv_heads, tp))
        options |= {"kv_cache_memory_bytes": kv_blocks * block, "swap_space_bytes": swap_blocks * block,
                    "max_num_batched_tokens": 40}  # fmt: skip
    return LLM(str(path), **options)


def _workers() -> list[int]:
    """This process's tensor-parallel workers (the suite's tritonservers are its children too)."""
    return [pid for pid in descendants(os.getpid()) if _is_worker(pid)]


def _is_worker(pid: int) -> bool:
    try:
        return b"inflight.backend.executor.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_tp2_tokens_and_logprobs_match_tp1(tiny_llama) -> None:
    prompts = random_prompts(3, [7, 30, 16, 50])
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=2, prompt_logprobs=2, ignore_eos=True)
    with _llm(tiny_llama, 1) as llm:
        single = llm.generate(prompts, params)
    with _llm(tiny_llama, 2) as llm:
        assert len(_workers()) == 1
        split = llm.generate(prompts, params)
    assert not _workers()
    for a, b in zip(split, single, strict=True):
        assert a.token_ids == b.token_ids
        assert [t.logprob for t in a.logprobs] == pytest.approx([t.logprob for t in b.logprobs], abs=1e-5)
        assert [t.top for t in a.logprobs][0][0][0] == [t.top for t in b.logprobs][0][0][0]
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        assert [t.logprob for t in a.prompt_logprobs[1:]] == pytest.approx(
            [t.logprob for t in b.prompt_logprobs[1:]], abs=1e-5
        )


def test_tp2_preemption_swap_and_async_match_tp1(tiny_llama) -> None:
    """9 blocks of 16 on every rank for 8 requests of up to 112 tokens: preempted, swapped out and back in,
    some while their last token is still being sampled (async scheduling)."""
    prompts = random_prompts(5, [7, 30, 16, 50, 3, 21, 64, 12])
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with _llm(tiny_llama, 1, kv_blocks=9, swap_blocks=24) as llm:
        single = [o.token_ids for o in llm.generate(prompts, params)]
        single_swaps = llm.engine.stats().num_swapped_out_total
    with _llm(tiny_llama, 2, kv_blocks=9, swap_blocks=24) as llm:
        split = [o.token_ids for o in llm.generate(prompts, params)]
        stats = llm.engine.stats()
    assert split == single
    assert stats.num_swapped_out_total == single_swaps > 0


def test_sizes_the_model_cannot_split_are_refused_before_workers_start(tiny_llama) -> None:
    with pytest.raises(ValueError, match=r"number of attention heads \(4\) must be divisible by the "
                                         r"tensor-parallel size \(3\)"):  # fmt: skip
        _llm(tiny_llama, 3)
    assert not _workers()
    with pytest.raises(ValueError, match="distributed_executor_backend 'uni' runs one process"):
        EngineArgs(model=str(tiny_llama), tensor_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="tensor_parallel_size must be in"):
        EngineArgs(model=str(tiny_llama), tensor_parallel_size=0)


def test_a_dead_worker_is_fatal_and_shutdown_leaves_no_process(tiny_llama) -> None:
    with _llm(tiny_llama, 2) as llm:
        (worker,) = _workers()
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(
            EngineDeadError, match=r"tensor-parallel worker 1 \(pid \d+\) exited with code -9"
        ):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    assert not _workers()
