"""silu_and_mul against silu_and_mul_reference."""

from __future__ import annotations

import pytest
import torch

from inflight.kernels.activation import silu_and_mul, silu_and_mul_reference

from .conftest import ELEMENTWISE_TOL, assert_close


@pytest.mark.parametrize("shape", [(5, 2 * 123), (2, 3, 2 * 64), (3, 2 * 1500)])
def test_matches_reference(device, dtype, shape) -> None:
    x = (2 * torch.randn(shape)).to(dtype).to(device)
    out = silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.is_contiguous()
    assert_close(out, silu_and_mul_reference(x), ELEMENTWISE_TOL[dtype])


def test_strided_input(device) -> None:
    x = torch.randn(8, 2 * 40, device=device)[::2]
    assert_close(silu_and_mul(x), silu_and_mul_reference(x), ELEMENTWISE_TOL[torch.float32])


def test_bad_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul(torch.randn(3, 7))
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        silu_and_mul(torch.ones(3, 8, dtype=torch.int64))
