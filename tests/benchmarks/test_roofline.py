"""benchmarks.roofline against a token-by-token count for a tiny shape."""

from __future__ import annotations

import pytest

from benchmarks.roofline import ideal_for_run, offline_ideal

TINY = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 10}  # fmt: skip


def _count(lengths: list[tuple[int, int]]) -> tuple[float, float, float]:
    """FLOPs of prefill and of decode matmuls, and bytes of K/V read by decode, one token at a time."""
    h, m, layers, heads, d, kv = 8, 16, 2, 2, 4, 4
    weights = layers * (h * h + 2 * h * kv + h * h + 3 * h * m) + h * 10  # q, k, v, o, gate/up/down; lm_head
    prefill = decode = kv_bytes = 0.0
    for n_in, n_out in lengths:
        for q in range(n_in):  # the query at position q attends to keys 0..q
            prefill += 2 * weights + layers * heads * (q + 1) * 2 * (2 * d)
        for j in range(n_out):  # output j reads the K and V of n_in + j positions, every layer, bf16
            decode += 2 * weights
            kv_bytes += (n_in + j) * layers * 2 * kv * 2
    return prefill, decode, kv_bytes


@pytest.mark.parametrize("lengths", [[(2, 2)], [(5, 3), (1, 7), (9, 1)]])
def test_matches_a_token_by_token_count(lengths) -> None:
    prefill, decode, kv_bytes = _count(lengths)
    # Ceilings of 1 FLOP/s and 1 byte/s: the seconds are the counts.
    ideal = offline_ideal(TINY, lengths, matmul_tflops=1e-12, copy_gbs=1e-9)
    assert ideal["prefill_matmul_s"] == pytest.approx(prefill, rel=1e-9)
    assert ideal["decode_matmul_s"] == pytest.approx(decode, rel=1e-9)
    assert ideal["decode_kv_read_s"] == pytest.approx(kv_bytes, rel=1e-9)
    assert ideal["ideal_out_tok_s"] == pytest.approx(
        sum(n for _, n in lengths) / (prefill + decode + kv_bytes), rel=1e-9
    )


@pytest.mark.parametrize("scale", [1e-12, 1e-6])  # seconds in the thousands; out tok/s in the hundreds
def test_gpu_ideal_at_the_burst_and_the_held_matmul_rate(scale) -> None:
    lengths = [(5, 3), (1, 7)]
    ceiling = {"kind": "cuda", "copy_bandwidth_gbs": 2e3 * scale, "bf16_matmul_tflops": 4 * scale,
               "bf16_matmul_sustained_tflops": 3 * scale}  # fmt: skip
    ideal = ideal_for_run(TINY, lengths, ceiling)
    burst = offline_ideal(TINY, lengths, 4 * scale, 2e3 * scale)
    held = offline_ideal(TINY, lengths, 3 * scale, 2e3 * scale)
    assert held["seconds"] > 1.2 * burst["seconds"]
    assert ideal["seconds"] == round(burst["seconds"], 2)
    assert ideal["seconds_sustained"] == round(held["seconds"], 2)
    assert ideal["ideal_out_tok_s"] == round(burst["ideal_out_tok_s"], 1)
    assert ideal["ideal_out_tok_s_sustained"] == round(held["ideal_out_tok_s"], 1)
    del ceiling["bf16_matmul_sustained_tflops"]  # results measured before the held rate was
    assert "ideal_out_tok_s_sustained" not in ideal_for_run(TINY, lengths, ceiling)


def test_fp8_ideal_counts_layer_linears_at_the_fp8_rate_and_kv_at_one_byte() -> None:
    lengths = [(5, 3), (1, 7)]
    h, m, layers, kv = 8, 16, 2, 4
    layer_flops = 2 * layers * (h * h + 2 * h * kv + h * h + 3 * h * m)  # per token
    head_flops = 2 * h * 10
    # bf16 at 1 FLOP/s, FP8 at 2 FLOP/s, K/V at 1 byte per value and 1 byte/s
    ideal = offline_ideal(TINY, lengths, 1e-12, 1e-9, bytes_per_value=1, linear_tflops=2e-12)
    dense = offline_ideal(TINY, lengths, 1e-12, 1e-9)
    tokens_out = sum(n for _, n in lengths)
    assert ideal["decode_matmul_s"] == pytest.approx(tokens_out * (layer_flops / 2 + head_flops), rel=1e-9)
    assert ideal["decode_kv_read_s"] == pytest.approx(dense["decode_kv_read_s"] / 2, rel=1e-9)
    attention = dense["prefill_matmul_s"] - 6 * (layer_flops + head_flops)
    assert ideal["prefill_matmul_s"] == pytest.approx(
        6 * (layer_flops / 2 + head_flops) + attention, rel=1e-9
    )
    ceiling = {"kind": "cuda", "copy_bandwidth_gbs": 1e-9, "bf16_matmul_tflops": 1e-12,
               "bf16_matmul_sustained_tflops": 1e-12, "fp8_matmul_tflops": 2e-12,
               "fp8_matmul_sustained_tflops": 2e-12}  # fmt: skip
    assert ideal_for_run(TINY, lengths, ceiling, fp8=True, kv_fp8=True)["seconds"] == round(
        ideal["seconds"], 2
    )
