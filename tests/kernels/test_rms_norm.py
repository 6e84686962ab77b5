"""rms_norm (fused residual add) against rms_norm_reference."""

from __future__ import annotations

import pytest
import torch

from inflight.kernels.rms_norm import rms_norm, rms_norm_reference

from .conftest import ELEMENTWISE_TOL, assert_close


@pytest.mark.parametrize("shape", [(5, 123), (3, 1000), (1, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(device, dtype, shape, with_residual) -> None:
    x = torch.randn(shape, dtype=dtype, device=device)
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(dtype).to(device)
    residual = torch.randn(shape, dtype=dtype, device=device) if with_residual else None
    out, new_residual = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_residual = rms_norm_reference(x, weight, 1e-6, residual)
    assert_close(out, ref_out, ELEMENTWISE_TOL[dtype])
    if with_residual:
        assert_close(new_residual, ref_residual, ELEMENTWISE_TOL[dtype])
    else:
        assert new_residual is None


def test_in_place_writes_into_x_and_residual(device, dtype) -> None:
    x = torch.randn(4, 96, dtype=dtype, device=device)
    residual = torch.randn(4, 96, dtype=dtype, device=device)
    weight = torch.randn(96, dtype=dtype, device=device)
    ref_out, ref_residual = rms_norm_reference(x.clone(), weight, 1e-5, residual.clone())
    out, new_residual = rms_norm(x, weight, 1e-5, residual, in_place=True)
    assert out is x and new_residual is residual
    assert_close(x, ref_out, ELEMENTWISE_TOL[dtype])
    assert_close(residual, ref_residual, ELEMENTWISE_TOL[dtype])


def test_strided_heads_like_qk_norm(device) -> None:
    """q/k norm over head_dim of a [T, H, D] view into the fused qkv output."""
    qkv = torch.randn(6, 5 * 64, device=device)
    q = qkv[:, : 3 * 64].view(6, 3, 64)
    weight = torch.randn(64, device=device)
    out, _ = rms_norm(q, weight, 1e-6)
    assert out.shape == q.shape
    assert_close(out, rms_norm_reference(q, weight, 1e-6)[0], ELEMENTWISE_TOL[torch.float32])


def test_bad_inputs_raise_value_error() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.randn(8, dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.randn(9), 1e-6)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, torch.randn(8), 1e-6, torch.randn(2, 7))
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        rms_norm(x.to(torch.int32), torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match="in_place"):
        rms_norm(torch.randn(8, 2).t(), torch.randn(8), 1e-6, in_place=True)
