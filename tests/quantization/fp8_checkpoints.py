"""Tiny FP8 checkpoints written in each layout the engine loads, and an HF transformers reference for them.

The writers take a full-precision tiny checkpoint and write exactly what each tool writes (docs/fp8.md):
tensor names, shapes, dtypes and ``quantization_config``. The reference is independent of the engine: HF
transformers with every decoder linear's weight replaced by its dequantized FP8 value and its input
fake-quantized (per token, or by the static ``input_scale``), all in fp32: ``make quality``'s
``FakeW8A8Linear`` (benchmarks/quality.py), given the checkpoint's weights and scales.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks.quality import FP8_MAX, FakeW8A8Linear, fp8_quantize

LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def _calibration_amax(
    src: Path, token_ids: torch.Tensor
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Per linear layer, the amax of its input; per layer, the amax of K (after RoPE) and V."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    amax: dict[str, float] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: amax.__setitem__(
                name, max(amax.get(name, 0.0), args[0].abs().max().item())
            )
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and LINEAR.match(name + ".weight")
    ]
    with torch.no_grad():
        out = model(token_ids, use_cache=True)
    for h in hooks:
        h.remove()
    cache = getattr(out, "cache", None) or out.past_key_values
    kv = {}
    for i in range(model.config.num_hidden_layers):
        k, v = (cache.layers[i].keys, cache.layers[i].values) if hasattr(cache, "layers") else cache[i]
        kv[f"model.layers.{i}.self_attn"] = (k.abs().max().item(), v.abs().max().item())
    return amax, kv


def write_fp8_checkpoint(src: Path, out: Path, layout: str, seed: int = 0) -> Path:
    """``layout``: "ct-dynamic" (llm-compressor FP8_DYNAMIC), "ct-static" (llm-compressor FP8 with a K/V
    scheme), "modelopt" (ModelOpt FP8, FP8 K/V), "fp8-static" (AutoFP8 / vLLM ``fp8``)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    calib = torch.randint(3, vocab, (2, 48), generator=torch.Generator().manual_seed(seed))
    amax, kv = _calibration_amax(src, calib)
    per_channel = layout == "ct-dynamic"
    static = layout != "ct-dynamic"
    written: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not LINEAR.match(name):
            written[name] = tensor
            continue
        prefix = name[: -len(".weight")]
        if per_channel:
            written[name], scale = fp8_quantize(tensor, dim=1)  # scale [out, 1]
        else:
            q, scale = fp8_quantize(tensor.reshape(1, -1), dim=1)
            written[name], scale = q.reshape(tensor.shape), scale.reshape(())
        if layout.startswith("ct"):
            # llm-compressor stores scales in the model's dtype: [out, 1] per channel, [1] per tensor
            written[f"{prefix}.weight_scale"] = (scale if per_channel else scale.reshape(1)).to(
                torch.bfloat16
            )
        else:
            written[f"{prefix}.weight_scale"] = scale.reshape(()).float()
        if static:
            input_scale = torch.tensor(max(amax[prefix], 1e-6) / FP8_MAX)
            written[f"{prefix}.input_scale"] = (
                input_scale.reshape(1) if layout.startswith("ct") else input_scale
            )
    kv_names = {
        "ct-static": ("{p}.k_scale", "{p}.v_scale"),
        "modelopt": ("{p}.k_proj.k_scale", "{p}.v_proj.v_scale"),
    }.get(layout)
    if kv_names is not None:
        for p, (k_amax, v_amax) in kv.items():
            written[kv_names[0].format(p=p)] = torch.tensor(k_amax / FP8_MAX)
            written[kv_names[1].format(p=p)] = torch.tensor(v_amax / FP8_MAX)
    save_file(written, str(out / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = _quantization_config(layout)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _quantization_config(layout: str) -> dict:
    if layout.startswith("ct"):
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "group_size": None,
                   "strategy": "channel" if layout == "ct-dynamic" else "tensor"}  # fmt: skip
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                "strategy": "token" if layout == "ct-dynamic" else "tensor", "dynamic": layout == "ct-dynamic"}  # fmt: skip
        kv = None
        if layout == "ct-static":
            kv = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
                "ignore": ["lm_head"], "kv_cache_scheme": kv}  # fmt: skip
    if layout == "modelopt":
        return {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                "exclude_modules": ["lm_head"]}  # fmt: skip
    return {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}


def hf_fp8_reference(fp32_src: Path, fp8_ckpt: Path | None = None):
    """HF ``fp32_src`` with each decoder linear made FP8: from ``fp8_ckpt``'s tensors (dequantized) when
    given, else quantized per channel here (what ``quantization="fp8"`` does at load)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp32_src, dtype=torch.float32).eval()
    tensors = load_file(str(fp8_ckpt / "model.safetensors")) if fp8_ckpt is not None else None
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and LINEAR.match(name + ".weight")):
            continue
        if tensors is None:
            fake = FakeW8A8Linear(module)
        else:
            scale = tensors[f"{name}.weight_scale"].float()
            scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
            fake = FakeW8A8Linear(module, tensors[f"{name}.weight"].float() * scale,
                                  tensors.get(f"{name}.input_scale"))  # fmt: skip
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, fake)
    return model
