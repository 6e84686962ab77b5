"""Which quantization a checkpoint asks for (``resolve_quantization``), and what is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inflight import LLM
from inflight.backend.engine.args import EngineArgs
from inflight.backend.executor.quantization import QuantConfig, resolve_quantization
from inflight.backend.executor.quantization.config import SUPPORTED


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


# --- every accepted layout to its whole QuantConfig, every refusal to its whole message ----------------------
FLOAT8 = {"num_bits": 8, "type": "float"}


def _ct(weights: dict | None, acts: dict | None, **extra) -> dict:
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": group},
            **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("qc", "modelopt", "expected"),
    [
        (_ct({**FLOAT8, "strategy": "channel"}, {**FLOAT8, "strategy": "token", "dynamic": True}, ignore=["lm_head"]),
         None, QuantConfig("compressed-tensors", True, True, False, False, ("lm_head",))),
        ({**_ct({**FLOAT8, "strategy": "tensor"}, {**FLOAT8, "strategy": "tensor", "dynamic": False}),
          "format": "naive-quantized", "kv_cache_scheme": {**FLOAT8, "strategy": "tensor"}},
         None, QuantConfig("compressed-tensors", True, False, True, True, ())),
        ({"quant_method": "ModelOpt", "quant_algo": "fp8", "exclude_modules": ["lm_head", "model.layers.0.mlp*"]},
         None, QuantConfig("modelopt", True, False, True, False, ("lm_head", "model.layers.0.mlp*"))),
        (None, {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                                                                   "exclude_modules": ["lm_head"]}},
         QuantConfig("modelopt", True, False, True, True, ("lm_head",))),
        ({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]},
         None, QuantConfig("fp8", True, False, True, False, ("lm_head",))),
        ({"quant_method": "fp8", "modules_to_not_convert": ["model.layers.1.mlp.down_proj"]},
         None, QuantConfig("fp8", True, False, False, False, ("model.layers.1.mlp.down_proj",))),
    ],
    ids=["ct-dynamic", "ct-static-naive-kv", "modelopt", "hf_quant_config", "fp8-static", "fp8-dynamic-default"],
)  # fmt: skip
def test_each_layout_resolves_to_its_config(tmp_path, qc, modelopt, expected) -> None:
    path = _ckpt(tmp_path, qc, modelopt)
    assert resolve_quantization(None, path) == expected
    assert resolve_quantization("fp8", path) == expected  # the option agrees with an FP8 checkpoint


WHAT = {
    "ct-format": ({**CT_DYNAMIC, "format": "int-quantized"}, "compressed-tensors format 'int-quantized'"),
    "ct-no-groups": ({**CT_DYNAMIC, "config_groups": {}}, "compressed-tensors without config_groups"),
    "ct-mixed": ({**CT_DYNAMIC, "config_groups": {**CT_DYNAMIC["config_groups"], "h": {
        "weights": {**FLOAT8, "strategy": "tensor"}, "input_activations": {**FLOAT8, "strategy": "token",
                                                                            "dynamic": True}}}},
                 "compressed-tensors with several different schemes (mixed precision)"),
    "ct-int8": (_ct({"num_bits": 8, "type": "int", "strategy": "channel"}, None), "compressed-tensors int8 weights"),
    "ct-fp4": (_ct({"num_bits": 4, "type": "float", "strategy": "channel"}, None), "compressed-tensors float4 weights"),
    "ct-group": (_ct({**FLOAT8, "strategy": "group"}, None), "compressed-tensors FP8 weights with strategy 'group'"),
    "ct-block": (_ct({**FLOAT8, "strategy": "block"}, None), "compressed-tensors FP8 weights with strategy 'block'"),
    "ct-w8a16": (_ct({**FLOAT8, "strategy": "channel"}, None),
                 "compressed-tensors FP8 weight-only (W8A16, no input_activations)"),
    "ct-int-acts": (_ct({**FLOAT8, "strategy": "channel"}, {"num_bits": 8, "type": "int", "strategy": "token"}),
                    "compressed-tensors int8 activations"),
    "ct-fp4-acts": (_ct({**FLOAT8, "strategy": "channel"}, {"num_bits": 4, "type": "float", "strategy": "token"}),
                    "compressed-tensors float4 activations"),
    "ct-dynamic-tensor": (_ct({**FLOAT8, "strategy": "channel"}, {**FLOAT8, "strategy": "tensor", "dynamic": True}),
                          "compressed-tensors activations 'tensor' dynamic=True"),
    "ct-static-token": (_ct({**FLOAT8, "strategy": "channel"}, {**FLOAT8, "strategy": "token", "dynamic": False}),
                        "compressed-tensors activations 'token' dynamic=False"),
    "modelopt-none": ({"quant_method": "modelopt"}, "modelopt quant_algo None"),
    "modelopt-int4": ({"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"}, "modelopt quant_algo 'W4A8_AWQ'"),
    "modelopt-kv": ({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "NVFP4"},
                    "modelopt kv_cache_quant_algo 'NVFP4'"),
    "fp8-block": ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise fp8 (weight_block_size [128, 128])"),
    "fp8-scheme": ({"quant_method": "fp8", "activation_scheme": "per_token"}, "fp8 with activation_scheme 'per_token'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(WHAT))
def test_each_refusal_names_what_it_refuses(tmp_path, case) -> None:
    qc, what = WHAT[case]
    path = _ckpt(tmp_path, qc)
    expected = f"the checkpoint {path} is quantized as {what}, which is not supported; supported: {SUPPORTED}"
    with pytest.raises(ValueError) as info:
        resolve_quantization(None, path)
    assert str(info.value) == expected


def test_refusals_of_the_method_and_the_option_in_full(tmp_path) -> None:
    unknown = _ckpt(tmp_path / "gptq", {"quant_method": "GPTQ", "bits": 4})
    with pytest.raises(ValueError) as info:
        resolve_quantization(None, unknown)
    assert str(info.value) == f"quantization method 'gptq' of the checkpoint {unknown} is not supported; supported: {SUPPORTED}"  # fmt: skip
    nameless = _ckpt(tmp_path / "nameless", {"bits": 4})
    with pytest.raises(ValueError) as info:
        resolve_quantization(None, nameless)
    assert str(info.value).startswith("quantization method {'bits': 4} of the checkpoint")
    for path in (_ckpt(tmp_path / "dense", None), _ckpt(tmp_path / "fp8", {"quant_method": "fp8"})):
        with pytest.raises(ValueError) as info:
            resolve_quantization("int8", path)
        assert str(info.value) == f"quantization 'int8' is not supported; supported: {SUPPORTED}"


def test_a_missing_config_is_full_precision(tmp_path) -> None:
    assert resolve_quantization(None, tmp_path) is None  # no config.json here: ModelConfig says so first
    assert resolve_quantization("fp8", tmp_path) == QuantConfig(
        "fp8 at load", False, True, False, False, ("lm_head",)
    )


@pytest.mark.parametrize(
    ("pattern", "prefix", "ignored"),
    [
        ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj", True),  # the name itself
        ("model.layers.*.mlp.down_proj", "model.layers.7.mlp.down_proj", True),  # a glob
        ("down_proj", "model.layers.7.mlp.down_proj", True),  # a module name's last parts
        ("mlp.down_proj", "model.layers.7.mlp.down_proj", True),
        ("re:.*\\.mlp\\..*", "model.layers.7.mlp.gate_proj", True),  # compressed-tensors' regex
        ("re:.*\\.mlp\\..*", "model.layers.7.self_attn.q_proj", False),
        ("own_proj", "model.layers.7.mlp.down_proj", False),  # a suffix is whole names only
        ("model.layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj", False),
        ("model.layers.*.mlp.down_proj", "model.layers.7.mlp.up_proj", False),
    ],
)
def test_is_ignored(pattern, prefix, ignored) -> None:
    assert QuantConfig("fp8", True, False, False, False, (pattern,)).is_ignored(prefix) is ignored
    assert QuantConfig("fp8", True, False, False, False, ("lm_head", pattern)).is_ignored(prefix) is ignored


def test_groups_are_compared_whole_and_key_order_does_not_matter(tmp_path) -> None:
    weights = {**FLOAT8, "strategy": "channel"}
    dynamic = {**FLOAT8, "strategy": "token", "dynamic": True}
    reordered = {"dynamic": True, "strategy": "token", "type": "float", "num_bits": 8}  # the same scheme
    same = {**CT_DYNAMIC, "config_groups": {"a": {"weights": weights, "input_activations": dynamic},
                                            "b": {"weights": dict(reversed(weights.items())),
                                                  "input_activations": reordered}}}  # fmt: skip
    assert resolve_quantization(None, _ckpt(tmp_path / "same", same)).static_input_scale is False
    static = {**FLOAT8, "strategy": "tensor", "dynamic": False}  # only the activations differ
    mixed = {**CT_DYNAMIC, "config_groups": {"a": {"weights": weights, "input_activations": dynamic},
                                             "b": {"weights": weights, "input_activations": static}}}  # fmt: skip
    with pytest.raises(ValueError, match="several different schemes"):
        resolve_quantization(None, _ckpt(tmp_path / "mixed", mixed))


def test_hf_quant_config_without_its_quantization_entry_is_refused_by_name(tmp_path) -> None:
    path = _ckpt(tmp_path, None, {"producer": {"name": "modelopt"}})
    with pytest.raises(ValueError) as info:
        resolve_quantization(None, path)
    assert str(info.value) == (
        f"the checkpoint {path} is quantized as modelopt quant_algo None, which is not supported; "
        f"supported: {SUPPORTED}"
    )
