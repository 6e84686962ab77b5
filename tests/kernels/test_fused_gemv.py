"""Small-M linear with the RMSNorm / SiLU-and-mul fused in (kernels/fused_gemv.py) against the unfused ops."""

from __future__ import annotations

import pytest
import torch

from inflight.kernels.fused_gemv import fused_gemv, fused_gemv_reference

from .conftest import ELEMENTWISE_TOL, assert_close

# Relative to the output's scale: fp32 accumulation everywhere; 16-bit inputs round the activation once
# (the reference twice) and the output once.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def _case(prologue, m, n, k, dtype, device, with_residual=True):
    x = torch.randn(m, 2 * k if prologue == "silu_mul" else k)
    w = torch.randn(n, k) / k**0.5
    kw = {}
    if prologue == "rmsnorm":
        kw = dict(residual=torch.randn(m, k) if with_residual else None, norm_weight=torch.randn(k), eps=1e-5)
    cast = {name: (t.to(dtype).to(device) if torch.is_tensor(t) else t) for name, t in kw.items()}
    return x.to(dtype).to(device), w.to(dtype).to(device), cast


@pytest.mark.parametrize("prologue", ["none", "rmsnorm", "silu_mul"])
@pytest.mark.parametrize(
    "m,n,k", [(1, 40, 96), (3, 33, 80), (4, 100, 200)], ids=["1x40x96", "3x33x80", "4x100x200"]
)
def test_matches_reference(device, dtype, prologue, m, n, k) -> None:
    x, w, kw = _case(prologue, m, n, k, dtype, device)
    out, new_residual = fused_gemv(x, w, prologue, **kw)
    # The reference in float64 from the same (rounded) inputs.
    ref, ref_residual = fused_gemv_reference(
        x.double(),
        w.double(),
        prologue,
        **{a: (t.double() if torch.is_tensor(t) else t) for a, t in kw.items()},
    )
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, ref.to(dtype), TOL[dtype])
    if prologue == "rmsnorm":
        # The new residual is x + residual rounded to the dtype, as the unfused add (the interpreter
        # truncates where the GPU rounds: one rounding step).
        assert_close(new_residual, (x.float() + kw["residual"].float()).to(dtype), ELEMENTWISE_TOL[dtype])
    else:
        assert new_residual is None


def test_rmsnorm_without_residual_returns_x(device) -> None:
    x, w, kw = _case("rmsnorm", 2, 48, 64, torch.float32, device, with_residual=False)
    out, new_residual = fused_gemv(x, w, "rmsnorm", **kw)
    ref, _ = fused_gemv_reference(x, w, "rmsnorm", **kw)
    assert torch.equal(new_residual, x)
    assert_close(out, ref, TOL[torch.float32])


@pytest.mark.parametrize("prologue", ["none", "rmsnorm"])
def test_addend_is_added_to_the_product(device, dtype, prologue) -> None:
    """o_proj / down_proj with the residual add fused: ``x @ W^T + addend``, rounded once."""
    x, w, kw = _case(prologue, 3, 33, 80, dtype, device)
    addend = (4 * torch.randn(3, 33)).to(dtype).to(device)
    out, _ = fused_gemv(x, w, prologue, addend=addend, **kw)
    ref, _ = fused_gemv_reference(
        x.double(),
        w.double(),
        prologue,
        addend=addend.double(),
        **{a: (t.double() if torch.is_tensor(t) else t) for a, t in kw.items()},
    )
    assert_close(out, ref.to(dtype), TOL[dtype])
    with pytest.raises(AssertionError):  # the check sees a missing addend
        assert_close(fused_gemv(x, w, prologue, **kw)[0], ref.to(dtype), TOL[dtype])


def test_misses_are_detected(device) -> None:
    """A wrong residual or norm weight must fail the comparison: the checks can fail."""
    x, w, kw = _case("rmsnorm", 1, 40, 96, torch.float32, device)
    out, _ = fused_gemv(x, w, "rmsnorm", **kw)
    ref, _ = fused_gemv_reference(x, w, "rmsnorm", **(kw | {"norm_weight": kw["norm_weight"] * 1.01}))
    with pytest.raises(AssertionError):
        assert_close(out, ref, TOL[torch.float32])


def test_bad_inputs_raise_value_error() -> None:
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    with pytest.raises(ValueError, match="unknown prologue"):
        fused_gemv(x, w, "gelu")
    with pytest.raises(ValueError, match="1 <= M <= 16"):
        fused_gemv(torch.randn(17, 64), w)
    with pytest.raises(ValueError, match="weight must be"):
        fused_gemv(x, w, "silu_mul")
    with pytest.raises(ValueError, match="norm_weight"):
        fused_gemv(x, w, "rmsnorm")
    with pytest.raises(ValueError, match=r"addend must be \[1, 32\]"):
        fused_gemv(x, w, addend=torch.randn(1, 31))


@pytest.mark.cuda  # model-sized shapes: the compiled kernel only (make test-gpu)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "prologue,n,k", [("rmsnorm", 6144, 4096), ("none", 4096, 4096), ("silu_mul", 4096, 14336)]
)
def test_model_sized_on_cuda(dtype, prologue, n, k) -> None:
    x, w, kw = _case(prologue, 1, n, k, dtype, torch.device("cuda"))
    if prologue == "none":  # o_proj with the residual added
        kw["addend"] = torch.randn(1, n, dtype=dtype, device="cuda")
    out, _ = fused_gemv(x, w, prologue, **kw)
    ref, _ = fused_gemv_reference(
        x.double(),
        w.double(),
        prologue,
        **{a: (t.double() if torch.is_tensor(t) else t) for a, t in kw.items()},
    )
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
