"""The FP8 (E4M3) KV cache (``kv_cache_dtype="fp8"``) on the CPU engine, on tiny fp32 models.

The reference is HF transformers with each layer's keys (after RoPE) and values fake-quantized with the
engine's per-layer scales (an attention function that wraps sdpa: ``clamp(x / s, -448, 448)`` through
``float8_e4m3fn`` and back, times ``s``). It quantizes every key it attends to, the step's own included,
which is the engine's rule: every key and value attention reads comes from the FP8 cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inflight import LLM, SamplingParams
from inflight.backend.executor.kv_scales import SCALE_MARGIN, calibration_prompts
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.model_runner import kv_cache_bytes_per_block

from ..conftest import copy_tokenizer
from .conftest import TinyModel, hf_greedy, random_prompts
from .tiny_models import build_tiny_checkpoint

LENGTHS = [3, 9, 16, 17, 31, 40, 57, 75]
MAX_NEW = 24
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
FP8_MAX = 448.0
ATTENTION = "inflight_fp8_kv_fake_quant"


def _fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    return ((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def _fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    k_scale, v_scale = module.inflight_kv_scales
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return sdpa(
        module, query, _fake_quant(key, k_scale), _fake_quant(value, v_scale), attention_mask, **kwargs
    )


def hf_fp8_kv(path: Path, scales: list[tuple[float, float]]):
    """HF ``path`` in fp32 whose attention reads K (after RoPE) and V fake-quantized by ``scales``."""
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION, _fp8_kv_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # else a custom function gets no sliding window
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTENTION)
    for layer, pair in zip(model.model.layers, scales, strict=True):
        layer.self_attn.inflight_kv_scales = pair
    return model.eval()


def engine_scales(llm: LLM) -> list[tuple[float, float]]:
    layers = llm.engine.executor.runner.model.attention_layers()
    return [(layer.k_scale.item(), layer.v_scale.item()) for layer in layers]


@torch.no_grad()
def hf_prompt_logprobs(model, prompt: list[int]) -> list[float]:
    logits = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    return [logits[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]


def _assert_greedy(outputs, prompts, reference) -> None:
    for i, (out, prompt) in enumerate(zip(outputs, prompts, strict=True)):
        assert out.token_ids == reference(prompt), f"prompt {i} ({len(prompt)} tokens) differs"


# ----------------------------------------------------------------------------------- (a) against HF
def test_fp8_kv_matches_hf_fake_quant(tiny_model: TinyModel) -> None:
    prompts = random_prompts(1, LENGTHS)
    llm = LLM(str(tiny_model.path), max_model_len=256, block_size=16, kv_cache_dtype="fp8")
    assert llm.engine.executor.runner.kv_cache.dtype == torch.float8_e4m3fn
    scales = engine_scales(llm)
    hf = hf_fp8_kv(tiny_model.path, scales)
    _assert_greedy(llm.generate(prompts, GREEDY), prompts, lambda p: hf_greedy(hf, p, MAX_NEW))

    # Logits: every prompt position's log-probability of the next prompt token. The engine and HF read
    # the same E4M3 values, but for any that a last-bit difference (of the rotated key, of a previous
    # layer's output) rounds to the neighbouring E4M3 value, one step (2^-3 relative) of one key or value
    # element: a few 1e-4 in a log-probability. Measured: 2e-6 at most on these prompts of the four
    # models; 2e-3 still tells quantization apart, which moves them by 5e-2 to 1.5e-1 (checked below).
    (out,) = llm.generate([prompts[-1]], SamplingParams(max_tokens=1, prompt_logprobs=0))
    got = [lp.logprob for lp in out.prompt_logprobs[1:]]
    expected = hf_prompt_logprobs(hf, prompts[-1])
    assert got == pytest.approx(expected, abs=2e-3)
    full_precision = hf_prompt_logprobs(tiny_model.hf, prompts[-1])
    assert max(abs(a - b) for a, b in zip(got, full_precision, strict=True)) > 1e-2, "nothing was quantized"


# ------------------------------------------------------------------------------------ (b) the sizing
def _block_bytes(path: Path, dtype: torch.dtype) -> int:
    cfg = ModelConfig.from_pretrained(str(path))
    return kv_cache_bytes_per_block(cfg, 16, dtype, cfg.num_kv_heads)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_path) -> Path:
    path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("fp8-kv-llama"))
    copy_tokenizer(smollm2_path, path)
    return path


@pytest.mark.parametrize("dtype, ratio", [("float32", 4), ("bfloat16", 2)])
def test_fp8_kv_holds_more_blocks_in_the_same_bytes(tiny_llama: Path, dtype: str, ratio: int, caplog) -> None:
    """One byte an element: twice the blocks of a bf16 cache in the same budget, four times fp32's."""
    budget = 40 * _block_bytes(tiny_llama, torch.float32)
    full = LLM(str(tiny_llama), dtype=dtype, max_model_len=64, kv_cache_memory_bytes=budget)
    with caplog.at_level("INFO", logger="inflight"):
        fp8 = LLM(str(tiny_llama), dtype=dtype, max_model_len=64, kv_cache_memory_bytes=budget,
                  kv_cache_dtype="fp8")  # fmt: skip
    full_ex, fp8_ex = full.engine.executor, fp8.engine.executor
    assert full_ex.bytes_per_block == ratio * fp8_ex.bytes_per_block
    assert (
        fp8_ex.num_blocks
        == ratio * full_ex.num_blocks
        == budget // _block_bytes(tiny_llama, torch.float8_e4m3fn)
    )
    assert fp8.engine.num_kv_blocks == fp8_ex.num_blocks - 1  # the null block is not usable
    cache = fp8_ex.runner.kv_cache
    assert cache.dtype == torch.float8_e4m3fn and cache.shape[2] == fp8_ex.num_blocks
    assert f"KV cache: {fp8_ex.num_blocks} blocks of 16 tokens, float8_e4m3fn" in caplog.text


# ------------------------------------------------- (c) preemption, swapping, chunks, prefix caching
_BASELINES: dict[str, list[list[int]]] = {}


def _fp8_llm(path: Path, **options) -> LLM:
    # NOTE: one max_model_len throughout: the calibration batch's length is min(256, max_model_len).
    return LLM(str(path), max_model_len=112, block_size=16, kv_cache_dtype="fp8", **options)


def _baseline(tiny_model: TinyModel) -> list[list[int]]:
    if tiny_model.name not in _BASELINES:
        llm = _fp8_llm(tiny_model.path, enable_prefix_caching=False)
        _BASELINES[tiny_model.name] = [o.token_ids for o in llm.generate(random_prompts(1, LENGTHS), GREEDY)]
    return _BASELINES[tiny_model.name]


# Llama (RoPE scaling, biases) and Mistral (a sliding window shorter than the prompts): the paths that
# differ between these variants are the cache's, not the architectures' ((a) covers all four).
TWO_MODELS = pytest.mark.parametrize("tiny_model", ["llama", "mistral"], indirect=True)


@TWO_MODELS
@pytest.mark.parametrize("variant", ["preempted", "swapped", "chunked"])
def test_fp8_kv_same_tokens_preempted_swapped_chunked(tiny_model: TinyModel, variant: str) -> None:
    """Recomputed after preemption (8 usable blocks: one request of max_model_len), swapped to host
    blocks and back (FP8 blocks copied as bytes), or prefilled in 13-token chunks (a chunk's queries
    read the chunk's own keys quantized from the cache): the tokens of one plain batch."""
    block = _block_bytes(tiny_model.path, torch.float8_e4m3fn)
    options = {
        "preempted": dict(kv_cache_memory_bytes=9 * block),
        "swapped": dict(kv_cache_memory_bytes=9 * block, swap_space_bytes=40 * block),
        "chunked": dict(max_num_batched_tokens=13, max_num_seqs=3),
    }[variant]
    llm = _fp8_llm(tiny_model.path, **options)
    outputs = llm.generate(random_prompts(1, LENGTHS), GREEDY)
    assert [o.token_ids for o in outputs] == _baseline(tiny_model)
    scheduler = llm.engine.scheduler
    if variant == "preempted":
        assert scheduler.num_preemptions_total > 0
    if variant == "swapped":
        assert scheduler.num_swapped_out_total > 0
        assert scheduler.kv_cache_manager.num_free_host_blocks == 40


@TWO_MODELS
def test_fp8_kv_same_tokens_with_prefix_cache_hits(tiny_model: TinyModel) -> None:
    prefix = random_prompts(7, [70])[0]
    prompts = [prefix + tail for tail in random_prompts(8, [1, 2, 5, 16, 20, 33])] + [prefix[:48], prefix]
    plain = _fp8_llm(tiny_model.path, enable_prefix_caching=False).generate(prompts, GREEDY)
    llm = _fp8_llm(tiny_model.path)
    first, again = llm.generate(prompts, GREEDY), llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.kv_cache_manager.stats.num_hit_tokens >= sum(
        (len(p) - 1) // 16 * 16 for p in prompts
    )
    expected = [o.token_ids for o in plain]
    assert [o.token_ids for o in first] == expected and [o.token_ids for o in again] == expected


# ----------------------------------------------------------------- (d) checkpoint scales, calibration
def _with_kv_scales(
    src: Path, dst: Path, names: tuple[str, str], layers: list[int]
) -> list[tuple[float, float]]:
    """``src`` copied to ``dst`` with K/V scale tensors for ``layers`` under ``names`` (formats of
    ``{p}`` = ``model.layers.N.self_attn``); returns the scales written, per layer (0, 0 where none)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    written = []
    for i in range(2):
        pair = (0.011 * (i + 1), 0.0073 * (i + 2)) if i in layers else (0.0, 0.0)
        for name, value in zip(names, pair, strict=True):
            if i in layers:
                tensors[name.format(p=f"model.layers.{i}.self_attn")] = torch.tensor(value)
        written.append(pair)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return written


@pytest.mark.parametrize(
    "names",
    [("{p}.k_scale", "{p}.v_scale"), ("{p}.k_proj.k_scale", "{p}.v_proj.v_scale")],
    ids=["compressed-tensors", "modelopt"],
)
def test_checkpoint_kv_scales_are_used(tiny_llama: Path, tmp_path: Path, names) -> None:
    written = _with_kv_scales(tiny_llama, tmp_path / "ckpt", names, [0, 1])
    llm = LLM(str(tmp_path / "ckpt"), max_model_len=112, kv_cache_dtype="fp8")
    assert llm.engine.executor.kv_scales_source == "checkpoint"
    assert engine_scales(llm) == [(torch.tensor(k).item(), torch.tensor(v).item()) for k, v in written]
    hf = hf_fp8_kv(tmp_path / "ckpt", engine_scales(llm))
    prompts = random_prompts(3, [20, 41])
    _assert_greedy(llm.generate(prompts, GREEDY), prompts, lambda p: hf_greedy(hf, p, MAX_NEW))
    # the same checkpoint with a full-precision cache: the scales are not parameters, and not needed
    plain = LLM(str(tmp_path / "ckpt"), max_model_len=112)
    assert plain.engine.executor.runner.model.attention_layers()[0].k_scale is None


def test_missing_checkpoint_scales_are_calibrated(tiny_llama: Path, tmp_path: Path) -> None:
    written = _with_kv_scales(tiny_llama, tmp_path / "ckpt", ("{p}.k_scale", "{p}.v_scale"), [0])
    llm = LLM(str(tmp_path / "ckpt"), max_model_len=112, kv_cache_dtype="fp8")
    calibrated = LLM(str(tiny_llama), max_model_len=112, kv_cache_dtype="fp8")
    assert llm.engine.executor.kv_scales_source == "checkpoint + calibrated"
    assert calibrated.engine.executor.kv_scales_source == "calibrated"
    got, cal = engine_scales(llm), engine_scales(calibrated)
    assert got[0] == tuple(torch.tensor(x).item() for x in written[0]) and got[1] == cal[1]


def test_calibrated_scales_fit_the_calibration_batch(tiny_model: TinyModel) -> None:
    """Calibrated scales are positive and the same at every load; the calibration batch run as prompts
    fills the FP8 cache with finite values whose largest is 448 / margin in layer 0 (whose K/V do not
    depend on quantized attention) and near it, never saturated at 448, in the next."""
    llm = LLM(str(tiny_model.path), max_model_len=300, kv_cache_dtype="fp8")
    scales = engine_scales(llm)
    assert all(k > 0 and v > 0 for k, v in scales)
    assert scales == engine_scales(LLM(str(tiny_model.path), max_model_len=300, kv_cache_dtype="fp8"))
    prompts = calibration_prompts(llm.engine.executor.model_config.vocab_size, 300)
    assert [len(p) for p in prompts] == [256] * 4
    llm.generate(prompts, SamplingParams(max_tokens=1))
    cache = llm.engine.executor.runner.kv_cache.float()  # [layers, K|V, blocks, ...]
    assert bool(cache.isfinite().all())
    amax = cache.abs().amax(dim=(2, 3, 4, 5))
    top = FP8_MAX / SCALE_MARGIN
    assert bool((amax[0] == top).all()), amax[0]
    assert bool(((amax[1:] >= top / 1.5) & (amax[1:] <= top * 1.5)).all()), amax
