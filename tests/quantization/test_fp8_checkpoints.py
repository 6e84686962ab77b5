"""FP8 linear layers on the CPU path against HF transformers fake-quantized in fp32, per checkpoint layout.

Each layout is a tiny checkpoint written as its tool writes it (``fp8_checkpoints``); ``quantization="fp8"``
quantizes the full-precision one at load. The engine's prompt log-probabilities and greedy tokens must match
HF's with the same FP8 weights and activation quantization. An activation's FP8 rounding can differ where
fp32 sums in another order (one E4M3 step, 1/16 of that value, measured up to 1.1e-2 on one position, mean
3e-4), hence a bound on the mean (2e-3) and a looser one on each position (5e-2); the same model without FP8
is 6e-2 away on average, 30x the bound on the mean.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inflight import LLM, SamplingParams
from inflight.backend.executor.quantization.fp8 import Fp8LinearMethod

from ..conftest import copy_tokenizer
from ..engine.conftest import hf_greedy, random_prompts
from ..engine.tiny_models import build_tiny_checkpoint
from .fp8_checkpoints import hf_fp8_reference, write_fp8_checkpoint

LAYOUTS = ["ct-dynamic", "ct-static", "modelopt", "fp8-static"]
MEAN_TOL, MAX_TOL = 2e-3, 5e-2
MAX_NEW = 12


@pytest.fixture(scope="module")
def fp32_tiny(tmp_path_factory, smollm2_path) -> Path:
    path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("fp8-src"))
    copy_tokenizer(smollm2_path, path)
    return path


def _check_against_hf(llm: LLM, hf) -> None:
    prompts = random_prompts(5, [7, 23, 40])
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate(prompts, params)
    errors = []
    for prompt, out in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
        want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        errors.append((got - want).abs())
        assert out.token_ids == hf_greedy(hf, prompt, MAX_NEW)
    errors = torch.cat(errors)
    assert errors.mean().item() <= MEAN_TOL and errors.max().item() <= MAX_TOL, errors


def _fp8_layers(llm: LLM) -> list:
    model = llm.engine.executor.runner.model
    return [m for m in model.modules() if isinstance(getattr(m, "linear_method", None), Fp8LinearMethod)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp8_checkpoint_matches_hf_fake_quant(layout, fp32_tiny, tmp_path) -> None:
    ckpt = write_fp8_checkpoint(fp32_tiny, tmp_path / layout, layout)
    llm = LLM(str(ckpt), max_model_len=128)
    layers = _fp8_layers(llm)
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down in each of the 2 layers; lm_head stays dense
    for layer in layers:
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    # the checkpoint's FP8 bytes are the engine's: q_proj's rows are the first of the fused qkv weight
    stored = load_file(str(ckpt / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    qkv = llm.engine.executor.runner.model.model.layers[0].self_attn.qkv_proj
    assert torch.equal(qkv.weight[: stored.shape[0]].view(torch.uint8), stored.view(torch.uint8))
    _check_against_hf(llm, hf_fp8_reference(fp32_tiny, ckpt))


def test_quantize_at_load_matches_hf_fake_quant(fp32_tiny) -> None:
    llm = LLM(str(fp32_tiny), max_model_len=128, quantization="fp8")
    layers = _fp8_layers(llm)
    assert len(layers) == 8 and all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)
    assert all(layer.weight_scale.shape == (layer.weight.shape[0],) for layer in layers)
    _check_against_hf(llm, hf_fp8_reference(fp32_tiny))


def test_static_input_scales_of_fused_shards_keep_the_largest(fp32_tiny, tmp_path) -> None:
    ckpt = write_fp8_checkpoint(fp32_tiny, tmp_path / "static", "modelopt")
    stored = load_file(str(ckpt / "model.safetensors"))
    llm = LLM(str(ckpt), max_model_len=128)
    attn = llm.engine.executor.runner.model.model.layers[1].self_attn
    names = [f"model.layers.1.self_attn.{p}_proj.input_scale" for p in "qkv"]
    assert attn.qkv_proj.input_scale.item() == max(stored[n].item() for n in names)
    w_scale = attn.qkv_proj.weight_scale
    q_rows = attn.qkv_proj.q_size
    assert torch.all(w_scale[:q_rows] == stored["model.layers.1.self_attn.q_proj.weight_scale"])
    assert torch.all(w_scale[q_rows : q_rows + attn.qkv_proj.kv_size]
                     == stored["model.layers.1.self_attn.k_proj.weight_scale"])  # fmt: skip
