"""gemv against gemv_reference (F.linear) on odd shapes."""

from __future__ import annotations

import pytest
import torch

from inflight.kernels.gemv import gemv, gemv_reference

from .conftest import assert_close

# The reference rounds a cuBLAS/CPU dot product; the kernel sums in another order in fp32.
GEMV_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.mark.parametrize(("n", "k"), [(37, 96), (5, 600), (64, 1000)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("split_k", [1, 3])
def test_matches_reference(device, dtype, n: int, k: int, bias: bool, split_k: int) -> None:
    x = torch.randn(1, k).to(dtype).to(device)
    w = (torch.randn(n, k) / k**0.5).to(dtype).to(device)
    b = torch.randn(n).to(dtype).to(device) if bias else None
    assert_close(gemv(x, w, b, block_k=128, split_k=split_k), gemv_reference(x, w, b), GEMV_TOL[dtype])


def test_weight_view_with_row_stride(device) -> None:
    fused = torch.randn(48, 64, device=device)
    w = fused[8:40]  # rows of a fused projection: row stride 64, contiguous along K
    x = torch.randn(1, 64, device=device)
    assert_close(gemv(x, w, block_k=32), gemv_reference(x, w), GEMV_TOL[torch.float32])


def test_bad_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError, match=r"\[1, K\]"):
        gemv(torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="unit stride"):
        gemv(torch.randn(1, 8), torch.randn(8, 4).t())
