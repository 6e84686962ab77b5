"""benchmarks.random_models' config-only folders (``load_format="dummy"``) and the Llama-3-70B shape."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks import random_models
from benchmarks.roofline import offline_ideal
from inflight import LLM, SamplingParams
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.weight_loader import load_model, meta_model

TINY = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=49152, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0, original_max_position_embeddings=64),
)  # fmt: skip


@pytest.fixture
def tiny_shape(monkeypatch) -> str:
    monkeypatch.setitem(random_models.SHAPES, "tiny", TINY)
    return "tiny"


def _layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(name, tuple(p.shape), p.dtype) for name, p in model.named_parameters()]


def test_config_only_folder_is_the_random_checkpoint_without_its_weights(
    tmp_path, tiny_shape, smollm2_path
) -> None:
    """The same config.json and generation_config.json as the checkpoint transformers writes (and the same
    tokenizer), no weights; the engine loads it with dummy weights of the checkpoint's layout and generates,
    and refuses it without load_format="dummy"."""
    full = random_models.build_random_model(tiny_shape, tmp_path / "full", tokenizer_dir=smollm2_path)
    bare = random_models.build_config_only_model(tiny_shape, tmp_path / "bare", tokenizer_dir=smollm2_path)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert json.loads((bare / name).read_text()) == json.loads((full / name).read_text()), name
    assert {p.name for p in bare.iterdir()} == {p.name for p in full.iterdir()} - {"model.safetensors"}
    assert not list(bare.glob("*.safetensors"))

    def load(folder, dummy):
        return load_model(
            ModelConfig.from_pretrained(folder), torch.float32, torch.device("cpu"), 64, dummy=dummy
        )

    assert _layout(load(bare, dummy=True)) == _layout(load(full, dummy=False))
    llm = LLM(str(bare), load_format="dummy", device="cpu", dtype="float32", max_model_len=64,
              kv_cache_memory_bytes=1 << 22)  # fmt: skip
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
    assert out[0].num_output_tokens == 4
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        LLM(str(bare), device="cpu", dtype="float32", max_model_len=64, kv_cache_memory_bytes=1 << 22)


def test_a_kept_folder_of_another_shape_is_refused(tmp_path, tiny_shape, monkeypatch) -> None:
    folder = random_models.build_config_only_model(tiny_shape, tmp_path / "m")
    assert random_models.build_config_only_model(tiny_shape, folder) == folder  # kept
    monkeypatch.setitem(random_models.SHAPES, "wider", {**TINY, "hidden_size": 128})
    for build in (random_models.build_config_only_model, random_models.build_random_model):
        with pytest.raises(ValueError, match="holds another shape than wider"):
            build("wider", folder)


@pytest.fixture(scope="module")
def llama3_70b(tmp_path_factory) -> ModelConfig:
    folder = random_models.build_config_only_model("llama3-70b", tmp_path_factory.mktemp("m") / "llama3-70b")
    return ModelConfig.from_pretrained(folder)


# Meta's Llama-3-70B: 70,553,706,496 parameters (its bf16 checkpoint's index: total_size 141,107,412,992 bytes)
LLAMA3_70B_PARAMETERS = 141_107_412_992 // 2


def test_llama3_70b_shape_has_the_published_parameter_count(llama3_70b) -> None:
    model = meta_model(llama3_70b, torch.bfloat16, 128)  # on the meta device: no memory
    assert sum(p.numel() for p in model.parameters()) == LLAMA3_70B_PARAMETERS
    assert (llama3_70b.num_layers, llama3_70b.num_kv_heads, llama3_70b.head_dim) == (80, 8, 128)
    assert not llama3_70b.tie_word_embeddings and llama3_70b.rope["rope_type"] == "llama3"


def test_roofline_counts_the_70b_shapes_linear_flops(llama3_70b) -> None:
    """One output token at 1 FLOP/s: its seconds are 2 FLOPs per weight it multiplies, every parameter but the
    input embedding table and the norms (80 x 2 + 1 of 8192)."""
    ideal = offline_ideal(llama3_70b.hf_config, [(1, 1)], matmul_tflops=1e-12, copy_gbs=1e30)
    multiplied = LLAMA3_70B_PARAMETERS - 128256 * 8192 - 161 * 8192
    assert ideal["decode_matmul_s"] == pytest.approx(2 * multiplied, rel=1e-12)


def test_throughput_refuses_hf_peers_on_dummy_weights(tmp_path, monkeypatch, capsys) -> None:
    from benchmarks import throughput

    argv = ["throughput", "--model", str(tmp_path), "--out", str(tmp_path / "r.json"), "--hf-batch", "2",
            "--engine-option", 'load_format="dummy"']  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        throughput.main()
    assert exit_info.value.code == 2 and "load_format" in capsys.readouterr().err
