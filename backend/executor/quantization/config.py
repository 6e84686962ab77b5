"""Which quantization a checkpoint or the ``quantization`` option asks for.

A quantized checkpoint says so in ``config.json``'s ``quantization_config`` (ModelOpt's older exports in a
separate ``hf_quant_config.json``). Three FP8 layouts load as they are (docs/fp8.md names every tensor):

* ``compressed-tensors``, format ``float-quantized`` (llm-compressor): FP8 weights with per-channel
  (``FP8_DYNAMIC``) or per-tensor (``FP8``) ``weight_scale``; activations dynamic per token, or static with a
  per-tensor ``input_scale``; ``kv_cache_scheme`` when K/V scales are stored; an ``ignore`` list.
* ``modelopt`` (NVIDIA TensorRT Model Optimizer), ``quant_algo`` FP8: per-tensor ``weight_scale`` and
  static ``input_scale``; ``kv_cache_quant_algo`` FP8 when K/V scales are stored; ``exclude_modules``.
* ``fp8`` (AutoFP8 / vLLM): per-tensor ``weight_scale``, ``activation_scheme`` static or dynamic,
  ``ignored_layers``. (Block-wise FP8, with ``weight_block_size``, is refused.)

A full-precision checkpoint with ``quantization="fp8"`` is quantized at load: per-channel weight scales,
dynamic per-token activations. Anything else is refused by name.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED = "fp8 at load, or an FP8 checkpoint (compressed-tensors float-quantized, modelopt FP8, fp8)"


@dataclass(frozen=True)
class QuantConfig:
    """An FP8 (E4M3) format for the linear layers."""

    source: str  # "fp8 at load" | "compressed-tensors" | "modelopt" | "fp8"
    checkpoint_fp8: bool  # the checkpoint stores FP8 weights and their weight_scale
    weight_per_channel: bool  # one weight scale per output channel (else one per tensor)
    static_input_scale: bool  # activations use the checkpoint's per-tensor input_scale (else per token)
    kv_scales: bool  # the checkpoint declares K/V cache scales
    ignore: tuple[str, ...] = ()  # module names (or "re:" patterns / globs) left in full precision

    def is_ignored(self, prefix: str) -> bool:
        """Whether the module ``prefix`` (an HF name, e.g. ``model.layers.0.self_attn.q_proj``) stays dense."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                import re

                if re.fullmatch(pattern[3:], prefix):
                    return True
            elif prefix == pattern or fnmatch.fnmatchcase(prefix, pattern) or prefix.endswith("." + pattern):
                return True
        return False


def resolve_quantization(option: str | None, checkpoint: str | Path) -> QuantConfig | None:
    """The format from the ``quantization`` option and the checkpoint's config; refuses what is unsupported."""
    path = Path(checkpoint)
    qc = _quantization_config(path)
    if qc is None:
        if option is None:
            return None
        if option != "fp8":
            raise ValueError(f"quantization {option!r} is not supported; supported: {SUPPORTED}")
        return QuantConfig("fp8 at load", False, True, False, False, ("lm_head",))
    method = str(qc.get("quant_method", "")).lower()
    parse = {"compressed-tensors": _compressed_tensors, "modelopt": _modelopt, "fp8": _fp8}.get(method)
    if parse is None:
        raise ValueError(
            f"quantization method {method or qc!r} of the checkpoint {path} is not supported; "
            f"supported: {SUPPORTED}"
        )
    config = parse(qc, path)
    if option not in (None, "fp8"):
        raise ValueError(f"quantization {option!r} is not supported; supported: {SUPPORTED}")
    return config


def _quantization_config(path: Path) -> dict[str, Any] | None:
    config = path / "config.json"
    qc = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    modelopt = path / "hf_quant_config.json"
    if qc is None and modelopt.is_file():
        qc = {"quant_method": "modelopt", **json.loads(modelopt.read_text()).get("quantization", {})}
    return qc


def _refuse(path: Path, what: str) -> ValueError:
    return ValueError(
        f"the checkpoint {path} is quantized as {what}, which is not supported; supported: {SUPPORTED}"
    )


def _compressed_tensors(qc: dict[str, Any], path: Path) -> QuantConfig:
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise _refuse(path, f"compressed-tensors format {fmt!r}")
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise _refuse(path, "compressed-tensors without config_groups")
    schemes = {json.dumps([g.get("weights"), g.get("input_activations")], sort_keys=True) for g in groups}
    if len(schemes) > 1:
        raise _refuse(path, "compressed-tensors with several different schemes (mixed precision)")
    weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations")
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise _refuse(path, f"compressed-tensors {weights.get('type')}{weights.get('num_bits')} weights")
    if weights.get("strategy") not in ("channel", "tensor"):
        raise _refuse(path, f"compressed-tensors FP8 weights with strategy {weights.get('strategy')!r}")
    if not acts:
        raise _refuse(path, "compressed-tensors FP8 weight-only (W8A16, no input_activations)")
    if acts.get("type") != "float" or acts.get("num_bits") != 8:
        raise _refuse(path, f"compressed-tensors {acts.get('type')}{acts.get('num_bits')} activations")
    dynamic = bool(acts.get("dynamic"))
    if (dynamic and acts.get("strategy") != "token") or (not dynamic and acts.get("strategy") != "tensor"):
        raise _refuse(path, f"compressed-tensors activations {acts.get('strategy')!r} dynamic={dynamic}")
    return QuantConfig("compressed-tensors", True, weights["strategy"] == "channel", not dynamic,
                       bool(qc.get("kv_cache_scheme")), tuple(qc.get("ignore") or ()))  # fmt: skip


def _modelopt(qc: dict[str, Any], path: Path) -> QuantConfig:
    algo = str(qc.get("quant_algo", "")).upper()
    if algo != "FP8":
        raise _refuse(path, f"modelopt quant_algo {algo or None!r}")
    kv = qc.get("kv_cache_quant_algo")
    if kv not in (None, "FP8"):
        raise _refuse(path, f"modelopt kv_cache_quant_algo {kv!r}")
    return QuantConfig("modelopt", True, False, True, kv == "FP8", tuple(qc.get("exclude_modules") or ()))


def _fp8(qc: dict[str, Any], path: Path) -> QuantConfig:
    if qc.get("weight_block_size"):
        raise _refuse(path, f"block-wise fp8 (weight_block_size {qc['weight_block_size']})")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("static", "dynamic"):
        raise _refuse(path, f"fp8 with activation_scheme {scheme!r}")
    ignore = tuple(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ())
    return QuantConfig("fp8", True, False, scheme == "static", False, ignore)
