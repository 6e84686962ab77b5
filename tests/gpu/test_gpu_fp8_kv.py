"""The FP8 KV cache on CUDA (the Triton kernels writing and reading E4M3, decode and mixed-step CUDA graphs
that read the scales through their device pointers): tiny fp32 models token-identical to HF transformers
with K (after RoPE) and V fake-quantized by the engine's scales, graphs on and off, and through swapping."""

from __future__ import annotations

import pytest
import torch

from inflight import LLM, SamplingParams

from ..conftest import copy_tokenizer
from ..engine.test_fp8_kv_cache import engine_scales, hf_fp8_kv
from ..engine.tiny_models import TINY_CONFIGS, build_tiny_checkpoint
from .test_gpu_engine import LENGTHS, _hf_greedy, _prompts


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_tiny_fp8_kv_greedy_matches_hf_fake_quant_on_gpu(
    name: str, graphs: bool, tmp_path, tokenizer_dir
) -> None:
    path = build_tiny_checkpoint(name, tmp_path / name)
    copy_tokenizer(tokenizer_dir, path)
    prompts = _prompts(1, LENGTHS, 49152)
    llm = LLM(str(path), dtype="float32", device="cuda", max_model_len=256, max_num_seqs=16,
              kv_cache_memory_bytes=64 << 20, enable_cuda_graphs=graphs, max_cuda_graph_prefill_tokens=256,
              kv_cache_dtype="fp8")  # fmt: skip
    runner = llm.engine.executor.runner
    assert runner.kv_cache.dtype == torch.float8_e4m3fn
    hf = hf_fp8_kv(path, engine_scales(llm)).cuda()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    for i, (out, prompt) in enumerate(zip(outputs, prompts, strict=True)):
        assert out.token_ids == _hf_greedy(hf, prompt, 24), f"{name} prompt {i} differs from HF (FP8 K/V)"
    if graphs:  # the prompts' step replayed a mixed-step graph, the decodes decode graphs
        assert runner.mixed_graphs.replays > 0 and runner.graphs.replays > 0


def test_tiny_fp8_kv_swapped_matches_unswapped_on_gpu(tmp_path, tokenizer_dir) -> None:
    """FP8 blocks swapped to pinned host memory and back (copied as bytes): the tokens of a large cache."""
    from inflight.backend.executor.model_config import ModelConfig
    from inflight.backend.executor.model_runner import kv_cache_bytes_per_block

    path = build_tiny_checkpoint("llama", tmp_path / "llama")
    copy_tokenizer(tokenizer_dir, path)
    prompts = _prompts(2, LENGTHS, 49152)
    cfg = ModelConfig.from_pretrained(str(path))
    block = kv_cache_bytes_per_block(cfg, 16, torch.float8_e4m3fn, cfg.num_kv_heads)
    common = dict(dtype="float32", device="cuda", max_model_len=112, max_num_seqs=8, kv_cache_dtype="fp8")
    expected = LLM(str(path), kv_cache_memory_bytes=64 << 20, **common).generate(
        prompts, SamplingParams(max_tokens=24, temperature=0)
    )
    llm = LLM(str(path), kv_cache_memory_bytes=9 * block, swap_space_bytes=40 * block, **common)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    assert llm.engine.scheduler.num_swapped_out_total > 0
