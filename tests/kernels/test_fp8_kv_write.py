"""Writing K/V into an FP8 (E4M3) cache: the plain write and RoPE fused with the write, against the torch
references (``clamp(x.float() / scale, -448, 448).to(float8_e4m3fn)``)."""

from __future__ import annotations

import pytest
import torch

from inflight.kernels.fp8 import FP8_DTYPE, FP8_MAX
from inflight.kernels.kv_cache import (
    quantize_fp8_reference,
    write_kv_cache,
    write_kv_cache_reference,
)
from inflight.kernels.rotary import rotary_embedding_write_kv_cache, rotary_embedding_write_kv_cache_reference

from .conftest import ELEMENTWISE_TOL, assert_close, e4m3_steps
from .test_rotary_kv_cache import HEADS, cos_sin_cache, fused_qkv

# Random normal K/V over these scales span E4M3's range up to ~360 (K) and ~600 (V: past 448, saturated),
# down through the subnormal binades.
K_SCALE, V_SCALE = 0.0123, 0.00731
FLIPS = {torch.float32: 0.01, torch.float16: 0.02, torch.bfloat16: 0.08}  # see the rotary test


def fp8_caches(num_blocks, block_size, num_kv_heads, head_dim, device):
    """FP8 K and V caches as views into one buffer with guard blocks before, between and after (see
    test_rotary_kv_cache._caches), filled with random codes."""
    codes = torch.randint(0, 126, (2 * num_blocks + 3, block_size, num_kv_heads, head_dim), dtype=torch.uint8)
    buffer = codes.view(FP8_DTYPE).to(device)
    return buffer[1 : num_blocks + 1], buffer[num_blocks + 2 : 2 * num_blocks + 2]


def guards(cache: torch.Tensor) -> torch.Tensor:
    buffer, n = cache._base, cache.shape[0]
    return torch.stack([buffer[0], buffer[n + 1], buffer[-1]]).view(torch.uint8).clone()


def scales(device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(K_SCALE, device=device), torch.tensor(V_SCALE, device=device)


def assert_same_codes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert e4m3_steps(actual, expected).max().item() == 0


def assert_within_one_step(actual: torch.Tensor, expected: torch.Tensor, max_fraction: float) -> None:
    """Every E4M3 value equal to the expected one or one E4M3 step from it, and at most ``max_fraction`` of
    them not equal."""
    steps = e4m3_steps(actual, expected)
    assert steps.max().item() <= 1, "a value is more than one E4M3 step from the reference"
    assert (steps != 0).float().mean().item() <= max_fraction


def test_quantize_reference_rounds_and_saturates() -> None:
    """The reference's rule on values whose E4M3 form is known: ties to even, saturation at 448, the
    subnormal step 2^-9, signs kept."""
    x = torch.tensor([17.0, 19.0, 18.0, 1000.0, -1e6, 449.0, 2.0**-9 * 2.5, -(2.0**-11), 0.0, 3.0])
    got = quantize_fp8_reference(x, 1.0).float()
    expected = torch.tensor([16.0, 20.0, 18.0, FP8_MAX, -FP8_MAX, FP8_MAX, 2.0**-9 * 2, -0.0, 0.0, 3.0])
    assert torch.equal(got, expected)
    assert torch.equal(
        quantize_fp8_reference(torch.tensor([0.75]), torch.tensor(0.25)).float(), torch.tensor([3.0])
    )


@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 128), (2, 1, 96)], ids=lambda h: "x".join(map(str, h)))
def test_write_kv_cache_fp8_matches_reference_exactly(device, dtype, heads) -> None:
    """The plain write quantizes exactly as the reference: IEEE division, then E4M3 rounding (ties to even)
    done in fp32 before an exact cast, on the GPU as in the interpreter: every code equal."""
    _, num_kv_heads, head_dim = heads
    _, k, v = fused_qkv(6, 1, num_kv_heads, head_dim, dtype, device)
    k[1, 0, :4] = torch.tensor([6.0, -6.0, 1e-5, 0.0], dtype=dtype)  # saturated, tiny, zero
    slot_mapping = torch.tensor([-1, 44, 0, 12, -1, 13], device=device)
    k_cache, v_cache = fp8_caches(9, 5, num_kv_heads, head_dim, device)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    before = guards(k_cache)
    k_scale, v_scale = scales(device)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    assert torch.equal(guards(k_cache), before), "a padded row (slot -1) wrote outside its slot"
    write_kv_cache_reference(k, v, ref_k_cache, ref_v_cache, slot_mapping, k_scale, v_scale)
    assert_same_codes(k_cache, ref_k_cache)
    assert_same_codes(v_cache, ref_v_cache)
    assert ref_k_cache.view(-1, num_kv_heads, head_dim)[44, 0, 0].float() == FP8_MAX


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
def test_rotary_write_kv_cache_fp8_matches_reference(device, dtype, heads) -> None:
    num_heads, num_kv_heads, head_dim = heads
    q, k, v = fused_qkv(8, num_heads, num_kv_heads, head_dim, dtype, device)
    positions = torch.tensor([0, 1, 2, 0, 40, 41, 0, 7], device=device)
    slot_mapping = torch.tensor([17, 18, 19, -1, 3, 4, -1, 31], device=device)
    cache = cos_sin_cache(head_dim, device)
    k_cache, v_cache = fp8_caches(8, 5, num_kv_heads, head_dim, device)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    before = guards(k_cache)
    k_scale, v_scale = scales(device)
    q_rot = rotary_embedding_write_kv_cache(positions, q, k, v, cache, k_cache, v_cache, slot_mapping,
                                            k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    assert torch.equal(guards(k_cache), before), "a padded row (slot -1) wrote outside its slot"
    ref_q = rotary_embedding_write_kv_cache_reference(positions, q, k, v, cache, ref_k_cache, ref_v_cache,
                                                      slot_mapping, k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    assert_close(q_rot, ref_q, ELEMENTWISE_TOL[dtype])
    assert_same_codes(v_cache, ref_v_cache)  # v is quantized as it is: exact
    written = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
    written[slot_mapping[slot_mapping >= 0].cpu()] = True
    rows = k_cache.cpu().view(-1, num_kv_heads, head_dim), ref_k_cache.cpu().view(-1, num_kv_heads, head_dim)
    assert_same_codes(rows[0][~written], rows[1][~written])
    # The rotated key may differ from the reference's by one rounding of k's dtype (the interpreter
    # truncates fp32 to bf16/fp16 where torch rounds; the GPU fuses the rotation's multiply-adds). A key
    # within that of an E4M3 rounding midpoint lands one E4M3 step (2^-3 relative) away: about
    # ulp / step of them, 2^-8 / 2^-3 ~ 3% in bf16, ~0.4% in fp16, ~0 in fp32; never further.
    assert_within_one_step(rows[0][written], rows[1][written], max_fraction=FLIPS[dtype])


def test_fp8_scales_are_checked() -> None:
    cpu = torch.device("cpu")
    q, k, v = fused_qkv(3, 4, 2, 64, torch.float32, cpu)
    k_cache, v_cache = fp8_caches(4, 5, 2, 64, cpu)
    slots = torch.arange(3)
    cache = cos_sin_cache(64, cpu)
    with pytest.raises(ValueError, match="needs k_scale as a one-element fp32 tensor"):
        write_kv_cache(k, v, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="needs v_scale"):
        write_kv_cache(
            k, v, k_cache, v_cache, slots, torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="float8_e4m3fn cache only"):
        rotary_embedding_write_kv_cache(torch.arange(3), q, k, v, cache, k_cache.float(), v_cache.float(), slots,
                                        k_scale=torch.tensor(1.0), v_scale=torch.tensor(1.0))  # fmt: skip
    with pytest.raises(ValueError, match="an FP8 cache needs k_scale and v_scale"):
        write_kv_cache_reference(k, v, k_cache, v_cache, slots)
