"""The fastest an offline run could be on a device, from the model's shape and the device's measured ceilings.

An ideal engine would spend, over the whole run (bf16, nothing overlapped, nothing wasted):

- prefill: every prompt token's linear-layer FLOPs (2 x the weights it multiplies) plus its causal
  attention FLOPs, at the measured bf16 matmul rate;
- decode: every output token's linear-layer FLOPs at the matmul rate (large batches are compute-bound:
  the weights are read once per step), plus reading its whole context's K and V once, at the measured copy
  bandwidth.

``ideal_out_tok_s`` = output tokens / that time. It is a bound, not a target: no kernel runs at 100% of
both ceilings. A measured figure's ``fraction_of_ideal`` says how much of the device the engine used;
a target above ``ideal_out_tok_s`` cannot be met on that device at that precision. On a GPU the ideal is
also given at the matmul rate the device holds for seconds at its power limit (``*_sustained``), which is
what a run of several seconds of GEMMs can reach; the burst rate is the looser bound.

FP8 (``quantization="fp8"``): the linear layers' FLOPs at the measured FP8 matmul rate (the LM head and
attention stay at the bf16 rate); with an FP8 KV cache, K/V read at one byte per value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _shape(config: Any) -> dict[str, int]:
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k)
    heads = get("num_attention_heads")
    return {
        "hidden": get("hidden_size"),
        "mlp": get("intermediate_size"),
        "layers": get("num_hidden_layers"),
        "heads": heads,
        "kv_heads": get("num_key_value_heads") or heads,
        "head_dim": get("hidden_size") // heads,
        "vocab": get("vocab_size"),
    }


def offline_ideal(
    config: Any,
    lengths: Sequence[tuple[int, int]],
    matmul_tflops: float,
    copy_gbs: float,
    bytes_per_value: int = 2,
    linear_tflops: float | None = None,
) -> dict[str, float]:
    """The ideal run time of requests of (input, output) `lengths`; see the module docstring.
    ``linear_tflops``: the decoder layers' linear FLOPs at this rate instead (FP8), the head at ``matmul_tflops``."""
    s = _shape(config)
    d, kv = s["head_dim"], s["kv_heads"] * s["head_dim"]
    per_layer = s["hidden"] * (s["hidden"] + 2 * kv) + s["hidden"] * s["hidden"] + 3 * s["hidden"] * s["mlp"]
    # per token, in seconds at the rates: the layers' linears (FP8 or not) and the LM head (bf16)
    layer_rate = 1e12 * (linear_tflops or matmul_tflops)
    linear_s = 2 * s["layers"] * per_layer / layer_rate + 2 * s["hidden"] * s["vocab"] / (
        1e12 * matmul_tflops
    )
    attn_flops_per_pair = 4 * s["layers"] * s["heads"] * d  # QK^T and PV, per (query, key) pair
    kv_bytes_per_token = 2 * s["layers"] * kv * bytes_per_value
    flops = 1e12 * matmul_tflops
    prefill = decode_mm = decode_kv = 0.0
    out_tokens = 0
    for n_in, n_out in lengths:
        pairs = n_in * (n_in + 1) / 2  # causal
        prefill += n_in * linear_s + pairs * attn_flops_per_pair / flops
        decode_mm += n_out * linear_s
        # Output token j (0-based) attends to n_in + j keys.
        decode_kv += n_out * (n_in + (n_out - 1) / 2) * kv_bytes_per_token / (1e9 * copy_gbs)
        out_tokens += n_out
    seconds = prefill + decode_mm + decode_kv
    return {"seconds": seconds, "ideal_out_tok_s": out_tokens / seconds, "prefill_matmul_s": prefill,
            "decode_matmul_s": decode_mm, "decode_kv_read_s": decode_kv}  # fmt: skip


def ideal_for_run(
    config: Any, lengths: Sequence[tuple[int, int]], ceiling: Mapping[str, Any], fp8: bool = False,
    kv_fp8: bool = False,
) -> dict[str, float]:  # fmt: skip
    """``offline_ideal`` at a result's measured ceilings (GPU: bf16, or FP8 linears with ``fp8``; CPU: fp32),
    rounded for a JSON result."""
    if ceiling.get("kind") == "cuda":
        kv_bytes = 1 if kv_fp8 else 2
        burst_fp8 = ceiling["fp8_matmul_tflops"] if fp8 else None
        ideal = offline_ideal(
            config, lengths, ceiling["bf16_matmul_tflops"], ceiling["copy_bandwidth_gbs"], kv_bytes, burst_fp8
        )
        if ceiling.get("bf16_matmul_sustained_tflops"):
            held_fp8 = ceiling["fp8_matmul_sustained_tflops"] if fp8 else None
            held = offline_ideal(config, lengths, ceiling["bf16_matmul_sustained_tflops"],
                                 ceiling["copy_bandwidth_gbs"], kv_bytes, held_fp8)  # fmt: skip
            ideal["ideal_out_tok_s_sustained"] = held["ideal_out_tok_s"]
            ideal["seconds_sustained"] = held["seconds"]
    else:
        ideal = offline_ideal(
            config, lengths, ceiling["fp32_matmul_gflops"] / 1e3, ceiling["copy_bandwidth_gbs"], 4
        )
    return {k: round(v, 1 if k.startswith("ideal_out_tok_s") else 2) for k, v in ideal.items()}
