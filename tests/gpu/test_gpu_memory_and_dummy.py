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
