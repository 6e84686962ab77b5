"""``load_format="dummy"``: random weights of a checkpoint's shapes and dtypes from its config.json alone."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from inflight import LLM, SamplingParams
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.quantization import resolve_quantization
from inflight.backend.executor.weight_loader import load_model

from ..quantization.fp8_checkpoints import write_fp8_checkpoint
from .tiny_models import build_tiny_checkpoint


def _config_only(src: Path, out: Path) -> Path:
    """``src``'s folder without any weights file."""
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    return out


def _layout(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}


def _load(folder: Path, quantization: str | None, kv_cache_dtype: str, dummy: bool) -> torch.nn.Module:
    cfg = ModelConfig.from_pretrained(folder)
    quant = resolve_quantization(quantization, folder)
    return load_model(cfg, torch.float32, torch.device("cpu"), 64, quant=quant, kv_cache_dtype=kv_cache_dtype,
                      dummy=dummy)  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize(
    ("quantization", "kv_cache_dtype"), [(None, "auto"), ("fp8", "auto"), ("fp8", "fp8")]
)
def test_dummy_model_has_the_loaded_models_parameters(llama, tmp_path, quantization, kv_cache_dtype) -> None:
    """Every parameter the checkpoint would fill, with its shape and dtype (FP8 linears quantized at load
    too), from a folder that has no weights at all; seeded, so two loads are equal."""
    bare = _config_only(llama, tmp_path / "bare")
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        _load(bare, quantization, kv_cache_dtype, dummy=False)
    loaded = _load(llama, quantization, kv_cache_dtype, dummy=False)
    dummy = _load(bare, quantization, kv_cache_dtype, dummy=True)
    assert _layout(dummy) == _layout(loaded)
    again = dict(_load(bare, quantization, kv_cache_dtype, dummy=True).named_parameters())
    for name, param in dummy.named_parameters():
        assert torch.equal(param.float(), again[name].float()), name
        if "norm" in name:
            assert bool((param == 1).all()), name
    weight = dict(dummy.named_parameters())["model.layers.0.mlp.down_proj.weight"].float()
    if quantization is None:
        assert 0.015 < weight.std().item() < 0.025  # normal(0, 0.02)
    else:  # quantized at load: each row's largest value is E4M3's largest
        assert bool((weight.abs().amax(dim=1) == 448).all())


def test_dummy_fp8_checkpoint_layout(llama, tmp_path) -> None:
    """An FP8 checkpoint's config.json (compressed-tensors FP8_DYNAMIC) gives FP8 weights and scales as a
    real load of that checkpoint does."""
    ckpt = write_fp8_checkpoint(llama, tmp_path / "ct", "ct-dynamic")
    bare = _config_only(ckpt, tmp_path / "bare")
    loaded, dummy = _load(ckpt, None, "auto", dummy=False), _load(bare, None, "auto", dummy=True)
    assert _layout(dummy) == _layout(loaded)
    assert _layout(dummy)["model.layers.0.self_attn.o_proj.weight"][1] == torch.float8_e4m3fn


def test_llm_generates_with_dummy_weights(llama, tmp_path, smollm2_path) -> None:
    """The whole engine on dummy weights with an FP8 KV cache (its scales calibrated at load), and the option
    refused by name otherwise."""
    bare = _config_only(llama, tmp_path / "bare")
    llm = LLM(str(bare), tokenizer=str(smollm2_path), load_format="dummy", kv_cache_dtype="fp8",
              max_model_len=64, kv_cache_memory_bytes=1 << 22)  # fmt: skip
    out = llm.generate(["one two three"], SamplingParams(max_tokens=5, ignore_eos=True, temperature=0))
    assert out[0].num_output_tokens == 5
    with pytest.raises(ValueError, match=re.escape("load_format must be one of auto, dummy, got 'pt'")):
        LLM(str(llama), load_format="pt")
