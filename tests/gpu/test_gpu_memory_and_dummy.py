"""On a GPU: the load's memory figures (the activation peak is measured there) and dummy weights."""

from __future__ import annotations

import shutil

import pytest
import torch

from inflight import LLM, SamplingParams

from ..conftest import copy_tokenizer
from ..engine.tiny_models import build_tiny_checkpoint

pytestmark = pytest.mark.cuda


def test_memory_figures_on_gpu(tmp_path, tokenizer_dir) -> None:
    from transformers import AutoModelForCausalLM

    path = build_tiny_checkpoint("llama", tmp_path / "llama")
    copy_tokenizer(tokenizer_dir, path)
    hf_params = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).num_parameters()
    llm = LLM(str(path), dtype="float32", device="cuda", max_model_len=256, max_num_seqs=16,
              kv_cache_memory_fraction=0.05)  # fmt: skip
    memory = llm.engine.memory
    assert memory.weights_bytes == 4 * hf_params
    assert memory.activation_peak_bytes is not None and memory.activation_peak_bytes > 0
    assert memory.kv_blocks == llm.engine.num_kv_blocks
    assert memory.longest_sequence == min(256, memory.kv_blocks * 16)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_dummy_weights_generate_on_gpu(tmp_path, tokenizer_dir, fp8: bool) -> None:
    path = build_tiny_checkpoint("llama", tmp_path / "llama")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(path / "config.json", bare / "config.json")
    copy_tokenizer(tokenizer_dir, bare)
    options = dict(quantization="fp8", kv_cache_dtype="fp8") if fp8 else {}
    llm = LLM(str(bare), dtype="bfloat16", device="cuda", load_format="dummy", max_model_len=256,
              kv_cache_memory_bytes=64 << 20, **options)  # fmt: skip
    out = llm.generate([[5, 6, 7, 8]] * 3, SamplingParams(max_tokens=16, ignore_eos=True, temperature=0))
    assert [o.num_output_tokens for o in out] == [16, 16, 16]
    assert out[0].token_ids == out[1].token_ids == out[2].token_ids  # one batch, greedy


# The Llama-3-70B shape in FP8 from dummy weights: its bf16 weights (~141 GB) never exist, only the FP8 ones
# (~67.7 GiB with the bf16 embedding and head) plus one module's draw: it fits the 80 GB of an H100.
def test_70b_fp8_dummy_load_peak(tmp_path, tokenizer_dir) -> None:
    from benchmarks.random_models import build_config_only_model

    total = torch.cuda.get_device_properties(0).total_memory
    assert total >= 78 * 2**30, (
        f"needs a GPU of 80 GB (an H100 or H200); this one has {total / 2**30:.0f} GiB"
    )
    folder = build_config_only_model("llama3-70b", tmp_path / "llama3-70b", tokenizer_dir=tokenizer_dir,
                                     pad_tokenizer=True)  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    with LLM(str(folder), device="cuda", load_format="dummy", quantization="fp8", kv_cache_dtype="fp8",
             max_model_len=512, kv_cache_memory_bytes=1 << 30, max_num_seqs=4, enable_cuda_graphs=False) as llm:  # fmt: skip
        weights = llm.engine.memory.weights_bytes
        out = llm.generate([[1000, 2000, 3000]], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
    assert out[0].num_output_tokens == 4
    # 70.55B parameters: 68.45B in FP8 linears (63.75 GiB) + their fp32 channel scales (27 MB) + the bf16 embedding
    # and head (2 x 1.05B: 3.91 GiB) + the norms
    assert 67.5 * 2**30 < weights < 68 * 2**30, weights / 2**30
    # the load's peak: the weights, 1 GiB of KV, one module's fp32 draw (the embedding's 3.9 GiB) and activations
    assert torch.cuda.max_memory_allocated() < weights + 7 * 2**30
