"""``load_format="dummy"`` built module by module (``weight_loader.materialize_dummy``): the same tensors as
materializing the whole model, filling it and then processing its linears, and no full-precision weight of a
later linear in memory while one linear is processed (a 70B model quantized to FP8 at load fits an H200)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from inflight.backend.executor import weight_loader
from inflight.backend.executor.layers.linear import UnquantizedLinearMethod
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.models import MODEL_REGISTRY
from inflight.backend.executor.parallel import SINGLE_RANK
from inflight.backend.executor.quantization import resolve_quantization
from inflight.backend.executor.quantization.fp8 import Fp8LinearMethod

from ..engine.tiny_models import build_tiny_checkpoint
from ..quantization.fp8_checkpoints import write_fp8_checkpoint

CPU = torch.device("cpu")
MAX_POSITION = 64


@torch.no_grad()
def _all_at_once(
    cfg: ModelConfig, dtype: torch.dtype, quant, kv_cache_dtype: str, seed: int = 0
) -> nn.Module:
    """The reference: the dummy load as it was before streaming. The whole model materialized at once
    (``to_empty``), its buffers set, every parameter filled in ``named_parameters`` order from one seeded
    generator, then every linear processed (quantized at load)."""
    with torch.device("meta"):
        model = MODEL_REGISTRY[cfg.architecture](cfg, dtype, MAX_POSITION, SINGLE_RANK, quant, kv_cache_dtype)
    model.to_empty(device=CPU)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    generator = torch.Generator(CPU).manual_seed(seed)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("k_scale", "v_scale"):
            param.zero_()
        elif "norm" in name:
            param.fill_(1.0)
        elif leaf == "weight_scale":
            param.fill_(0.02 * 4 / 448)
        elif leaf == "input_scale":
            param.fill_(1.0)
        else:
            values = torch.randn(param.shape, generator=generator)
            if param.dtype != torch.float8_e4m3fn:
                values = values * 0.02
            param.copy_(values.clamp(-448, 448).to(param.dtype))
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    return model.eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


def _assert_same(model: nn.Module, reference: nn.Module) -> None:
    got, want = _tensors(model), _tensors(reference)
    assert [n for n, _ in got] == [n for n, _ in want]  # the same tensors in the same order
    for (name, a), (_, b) in zip(got, want, strict=True):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), name
        assert torch.equal(_bits(a), _bits(b)), name  # bit for bit


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dummy-streamed")
    llama = build_tiny_checkpoint("llama", base / "llama")  # untied, biases everywhere
    return {
        "llama": llama,
        "qwen2": build_tiny_checkpoint("qwen2", base / "qwen2"),  # tied embeddings, q/k/v biases
        # An FP8 checkpoint's config (FP8 weights and scales, static input scales): nothing quantized at load
        "llama-modelopt": write_fp8_checkpoint(llama, base / "modelopt", "modelopt"),
        # a small vocabulary, so the linears are most of the weights
        "llama-small-vocab": build_tiny_checkpoint("llama", base / "small", vocab_size=256),
        "qwen2-small-vocab": build_tiny_checkpoint("qwen2", base / "small-qwen2", vocab_size=256),
    }


def _load(folder: Path, dtype: torch.dtype, quantization: str | None, kv_cache_dtype: str) -> nn.Module:
    cfg = ModelConfig.from_pretrained(folder)
    quant = resolve_quantization(quantization, folder)
    return weight_loader.load_model(cfg, dtype, CPU, MAX_POSITION, quant=quant, kv_cache_dtype=kv_cache_dtype,
                                    dummy=True)  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    ("quantization", "kv_cache_dtype"), [(None, "auto"), ("fp8", "auto"), ("fp8", "fp8")]
)
def test_streamed_dummy_equals_the_all_at_once_fill(
    folders, arch, dtype, quantization, kv_cache_dtype
) -> None:
    folder = folders[arch]
    model = _load(folder, dtype, quantization, kv_cache_dtype)
    cfg = ModelConfig.from_pretrained(folder)
    quant = resolve_quantization(quantization, folder)
    _assert_same(model, _all_at_once(cfg, dtype, quant, kv_cache_dtype))
    names = dict(model.named_parameters())
    weight = names["model.layers.0.mlp.down_proj.weight"]
    assert weight.dtype == (torch.float8_e4m3fn if quantization else dtype)
    if cfg.tie_word_embeddings:  # the head reads the (materialized) embedding table: no second copy
        assert model.lm_head is None and "lm_head.weight" not in names
        hidden = torch.randn(3, cfg.hidden_size, dtype=dtype)
        assert torch.equal(model.compute_logits(hidden), hidden @ model.model.embed_tokens.weight.t())
    else:
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # The comparison sees the values: another seed differs
    other = weight_loader.meta_model(cfg, dtype, MAX_POSITION, quant=quant, kv_cache_dtype=kv_cache_dtype)
    weight_loader.materialize_dummy(other, CPU, seed=1)
    with pytest.raises(AssertionError):
        _assert_same(other, model)


def test_streamed_dummy_of_an_fp8_checkpoint_config(folders) -> None:
    """FP8 weights and scales as the checkpoint would hold them (drawn as E4M3), static input scales 1."""
    folder = folders["llama-modelopt"]
    model = _load(folder, torch.bfloat16, None, "fp8")
    cfg = ModelConfig.from_pretrained(folder)
    _assert_same(model, _all_at_once(cfg, torch.bfloat16, resolve_quantization(None, folder), "fp8"))
    layer = model.model.layers[0].self_attn.qkv_proj
    assert layer.weight.dtype == torch.float8_e4m3fn and float(layer.input_scale) == 1.0


def test_a_shared_parameter_stays_shared_and_is_filled_once() -> None:
    """Two modules holding one Parameter: one tensor after materializing, filled at its first place in
    ``named_parameters`` order (which lists it once)."""
    with torch.device("meta"):
        toy = nn.Module()
        toy.a, toy.b = nn.Module(), nn.Module()
        toy.a.weight = nn.Parameter(torch.empty(4, 3), requires_grad=False)
        toy.b.weight = toy.a.weight
        toy.b.bias = nn.Parameter(torch.empty(5), requires_grad=False)
    weight_loader.materialize_dummy(toy, CPU, seed=7)
    assert toy.b.weight is toy.a.weight and not toy.a.weight.is_meta
    generator = torch.Generator(CPU).manual_seed(7)
    expected_weight = torch.randn(4, 3, generator=generator) * 0.02
    expected_bias = torch.randn(5, generator=generator) * 0.02
    assert torch.equal(toy.a.weight, expected_weight) and torch.equal(toy.b.bias, expected_bias)


def _linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "linear_method", None) is not None]


@pytest.mark.parametrize("arch", ["llama-small-vocab", "qwen2-small-vocab"])
@pytest.mark.parametrize("quantization", ["fp8", None])
def test_each_linear_is_processed_before_the_next_one_exists(
    folders, monkeypatch, arch, quantization
) -> None:
    """When a linear is processed, every later module is still on the meta device and every earlier linear
    is in its final format: the memory then holds the finished part of the model plus this one linear's
    full-precision weight, never the whole model in full precision."""
    built: list[nn.Module] = []
    meta_model = weight_loader.meta_model
    monkeypatch.setattr(
        weight_loader, "meta_model", lambda *a, **k: built.append(meta_model(*a, **k)) or built[-1]
    )
    calls: list[nn.Module] = []
    peaks: list[int] = []

    def check(layer: nn.Module) -> None:
        (model,) = built
        modules = [m for _, m in model.named_modules()]
        here = next(i for i, m in enumerate(modules) if m is layer)
        assert not layer.weight.is_meta and layer.weight.dtype == torch.bfloat16
        for module in modules[here + 1 :]:  # the modules after it: nothing materialized yet
            assert all(t.is_meta for t in module.parameters(recurse=False)), module
        for linear in [m for m in _linears(model) if modules.index(m) < here]:  # before it: final format
            assert linear.weight.dtype == (torch.float8_e4m3fn if quantization else torch.bfloat16)
        calls.append(layer)
        peaks.append(sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta))

    for cls in (Fp8LinearMethod, UnquantizedLinearMethod):
        original = cls.process_weights_after_loading
        monkeypatch.setattr(cls, "process_weights_after_loading",
                            lambda self, layer, original=original: (check(layer), original(self, layer))[1])  # fmt: skip
    model = _load(folders[arch], torch.bfloat16, quantization, "auto")
    assert calls == _linears(model)  # each linear once, in module order
    final = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(2 * m.weight.numel() for m in calls)  # a bf16 weight
    assert max(peaks) <= final + largest
    if quantization:  # the whole model in bf16 (the old all-at-once load) is far above that
        full = sum(2 * p.numel() if p.dtype == torch.float8_e4m3fn else p.numel() * p.element_size()
                   for p in model.parameters())  # fmt: skip
        assert max(peaks) < final + largest < full
