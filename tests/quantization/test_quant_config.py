"""Which quantization a checkpoint asks for (``resolve_quantization``), and what is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inflight import LLM
from inflight.backend.engine.args import EngineArgs
from inflight.backend.executor.quantization import QuantConfig, resolve_quantization


def _ckpt(tmp_path: Path, qc: dict | None, modelopt: dict | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"]}
    if qc is not None:
        config["quantization_config"] = qc
    (tmp_path / "config.json").write_text(json.dumps(config))
    if modelopt is not None:
        (tmp_path / "hf_quant_config.json").write_text(json.dumps(modelopt))
    return tmp_path


CT_DYNAMIC = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        }
    },
    "ignore": ["lm_head", "re:.*layers\\.0\\.mlp\\..*"],
}


def test_full_precision_checkpoint(tmp_path) -> None:
    path = _ckpt(tmp_path, None)
    assert resolve_quantization(None, path) is None
    assert resolve_quantization("fp8", path) == QuantConfig(
        "fp8 at load", False, True, False, False, ("lm_head",)
    )


def test_compressed_tensors_dynamic(tmp_path) -> None:
    config = resolve_quantization(None, _ckpt(tmp_path, CT_DYNAMIC))
    assert config is not None and config.checkpoint_fp8 and config.weight_per_channel
    assert not config.static_input_scale and not config.kv_scales
    assert config.is_ignored("lm_head") and config.is_ignored("model.layers.0.mlp.down_proj")
    assert not config.is_ignored("model.layers.1.mlp.down_proj")
    assert not config.is_ignored("model.layers.0.self_attn.q_proj")


def test_compressed_tensors_static_with_kv(tmp_path) -> None:
    group = {
        "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False},
    }
    qc = {**CT_DYNAMIC, "config_groups": {"g": group}, "kv_cache_scheme": {"num_bits": 8, "type": "float"}}
    config = resolve_quantization(None, _ckpt(tmp_path, qc))
    assert (
        config is not None
        and not config.weight_per_channel
        and config.static_input_scale
        and config.kv_scales
    )


def test_modelopt_in_config_and_in_hf_quant_config(tmp_path) -> None:
    a = resolve_quantization(None, _ckpt(tmp_path / "a", {"quant_method": "modelopt", "quant_algo": "FP8"}))
    b = resolve_quantization(
        None,
        _ckpt(tmp_path / "b", None, {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}),
    )
    assert a is not None and a.source == "modelopt" and a.static_input_scale and not a.kv_scales
    assert b is not None and b.source == "modelopt" and b.kv_scales


@pytest.mark.parametrize(
    ("qc", "named"),
    [
        ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
        ({"quant_method": "awq"}, "'awq'"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise fp8"),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "'NVFP4'"),
        ({**CT_DYNAMIC, "format": "pack-quantized"}, "'pack-quantized'"),
        (
            {
                **CT_DYNAMIC,
                "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}},
            },
            "weight-only",
        ),
        (
            {
                **CT_DYNAMIC,
                "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}},
            },
            "int4",
        ),
    ],
)
def test_unsupported_methods_are_refused_by_name(tmp_path, qc, named) -> None:
    with pytest.raises(ValueError, match="not supported") as info:
        resolve_quantization(None, _ckpt(tmp_path, qc))
    assert named in str(info.value)


def test_unsupported_option_is_refused_at_the_option(smollm2_path) -> None:
    with pytest.raises(ValueError, match="quantization 'int8' is not supported; supported: fp8"):
        EngineArgs(model=str(smollm2_path), quantization="int8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, got 'fp16'"):
        EngineArgs(model=str(smollm2_path), kv_cache_dtype="fp16")


def test_a_quantized_checkpoint_of_another_method_fails_the_load_by_name(tmp_path, smollm2_path) -> None:
    import shutil

    shutil.copytree(smollm2_path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization method 'awq' of the checkpoint .* is not supported"):
        LLM(str(tmp_path / "m"))
