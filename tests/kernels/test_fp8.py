"""FP8 W8A8 kernels (kernels/fp8.py, fp8_gemv.py, rms_norm_quant, silu_and_mul_quant) against their references,
and the references against exact arithmetic."""

from __future__ import annotations

import os

import pytest
import torch

from inflight.kernels import fp8
from inflight.kernels.activation import (
    _silu_and_mul_quant_kernel,
    silu_and_mul_quant,
    silu_and_mul_quant_reference,
)
from inflight.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    MIN_SCALE,
    _quantize_per_token_kernel,
    fp8_gemm,
    fp8_linear_reference,
    quant_row_launch,
    quantize_per_token,
    quantize_per_token_reference,
    quantize_weight_per_channel_reference,
)
from inflight.kernels.fp8_gemv import _fp8_gemv_kernel, default_config, fp8_gemv, fp8_gemv_reference
from inflight.kernels.rms_norm import _rms_norm_quant_kernel, rms_norm_quant, rms_norm_quant_reference

from .conftest import ELEMENTWISE_TOL, assert_close, e4m3_steps

# Relative (to the whole output's norm) error of y against the float64 reference. The quantized values of
# the two may differ by one E4M3 step for a few elements (see assert_quantized), each moving y by up to 1/8
# of its term; 16-bit outputs also round once more. bf16 on "cpu": the interpreter truncates to bf16 where
# the GPU rounds, moving many normed values (and their q) a little.
Y_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 4e-2}
# A fused quantization (its value computed in the kernel) against the reference: the scale's relative error
# and the share of q that must be exact (assert_quantized).
# (bf16 on "cpu": the normed value and its product with the weight both truncated: up to two bf16 steps)
SCALE_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
EXACT_SHARE = {torch.float32: 0.99, torch.float16: 0.97, torch.bfloat16: 0.75}


def assert_quantized(q, scale, q_ref, scale_ref, dtype=None) -> None:
    """Bit for bit (``dtype`` None), or for a value computed inside the kernel: scales within SCALE_RTOL and
    every q within one E4M3 step of the reference's, most of them equal. That value may differ from the
    reference's by a rounding of the dtype (interpreter truncation, the GPU's rsqrt / exp, fp32 summation
    order), which moves the row's amax (so its scale) as much and, now and then, a quotient across an E4M3
    rounding midpoint: one step, never two (a step is >= 1/16 of the value)."""
    assert scale.dtype == torch.float32 and scale.shape == scale_ref.shape, (scale.shape, scale_ref.shape)
    steps = e4m3_steps(q, q_ref)  # a zero's sign aside
    if dtype is None:
        assert steps.max().item() == 0
        assert torch.equal(scale.cpu(), scale_ref.cpu())
        return
    torch.testing.assert_close(scale.cpu(), scale_ref.cpu(), rtol=SCALE_RTOL[dtype], atol=0)
    assert steps.max().item() <= 1, steps.max().item()
    assert (steps == 0).float().mean().item() >= EXACT_SHARE[dtype]


def _rows(m: int, k: int, dtype, device) -> torch.Tensor:
    """Rows of very different magnitudes; row 1 all zero (the scale's floor), row 2 tiny (E4M3 subnormals)."""
    a = torch.randn(m, k) * torch.logspace(-3, 3, m)[torch.randperm(m)][:, None]
    if m > 2:
        a[1] = 0
        a[2] *= 1e-6
    return a.to(dtype).to(device)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


# --- the references ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantize_reference_round_trip(dtype) -> None:
    a = _rows(9, 300, dtype, "cpu")
    q, scale = quantize_per_token_reference(a)
    af = a.double()
    amax = af.abs().amax(-1, keepdim=True)
    assert torch.equal(scale.double(), (amax.float() / FP8_MAX).clamp_min(MIN_SCALE).double())
    v = af / scale.double()
    # Round to nearest: within half a step, 2^-4 of the value for normal E4M3 numbers, 2^-10 below 2^-6.
    assert ((q.double() - v).abs() <= torch.maximum(v.abs() * 2**-4, torch.tensor(2**-10)) * (1 + 1e-6)).all()
    deq = q.double() * scale.double()
    assert ((deq - af).abs() <= torch.maximum(af.abs() / 16, scale.double() * 2**-10) * (1 + 1e-6)).all()
    nonzero = amax[:, 0] > FP8_MAX * MIN_SCALE
    assert (q.double().abs().amax(-1)[nonzero] == FP8_MAX).all()  # each row's largest value maps to 448
    assert (q[1] == 0).all() and scale[1].item() == MIN_SCALE
    static = (amax.max() / FP8_MAX / 4).float().reshape(1)  # 4x too small: the large values clamp
    q_s, scale_s = quantize_per_token_reference(a, static)
    assert scale_s.shape == (9, 1) and (scale_s == static).all()
    assert q_s.double().abs().max().item() == FP8_MAX
    assert not torch.isnan(q_s.float()).any()


def test_weight_quantization_is_per_output_channel() -> None:
    w = torch.randn(24, 40) * torch.logspace(-2, 2, 24)[:, None]
    w_q, w_scale = quantize_weight_per_channel_reference(w)
    assert w_q.dtype == FP8_DTYPE and w_scale.shape == (24,)
    torch.testing.assert_close(w_q.float() * w_scale[:, None], w, rtol=1 / 16, atol=0)


def test_linear_reference_is_exact_to_fp32_rounding() -> None:
    m, n, k = 7, 33, 200
    q = (torch.randn(m, k) * 100).clamp(-448, 448).to(FP8_DTYPE)
    w_q = (torch.randn(n, k) * 100).clamp(-448, 448).to(FP8_DTYPE)
    a_scale, w_scale = torch.rand(m, 1) + 0.1, torch.rand(n) + 0.1
    y = fp8_linear_reference(q, a_scale, w_q, w_scale, torch.float32)
    exact = (q.double() @ w_q.double().t()) * a_scale.double() * w_scale.double()
    # fp32 sums of exact products: |error| <= (k + 2) * 2^-24 * sum |terms|
    bound = (
        (q.double().abs() @ w_q.double().abs().t()) * a_scale.double() * w_scale.double() * (k + 2) * 2**-24
    )
    assert ((y.double() - exact).abs() <= bound).all()
    bias = torch.randn(n).to(torch.bfloat16)
    addend = torch.randn(m, n).to(torch.bfloat16)
    expected = addend + (exact + bias.double()).float().to(torch.bfloat16)
    out = fp8_linear_reference(q, a_scale, w_q, w_scale, torch.bfloat16, bias, addend)
    assert out is addend
    assert_close(out, expected, ELEMENTWISE_TOL[torch.bfloat16])


# --- the quantization kernels -----------------------------------------------------------------------------


@pytest.fixture(params=["one block", "chunked"])
def row_layout(request, monkeypatch) -> str:
    """quantize_row's two layouts: a row in one block, or (rows wider than 64 here) chunks of 128 columns,
    the last one partial, read twice."""
    if request.param == "chunked":
        monkeypatch.setattr(fp8, "QUANT_CHUNKED_ABOVE", 64)
        monkeypatch.setattr(fp8, "QUANT_CHUNK", 128)
    return request.param


@pytest.mark.parametrize("shape", [(1, 64), (3, 1000), (33, 123)])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_quantize_per_token_is_the_reference(device, dtype, shape, static, row_layout) -> None:
    a = _rows(*shape, dtype, device)
    static_scale = torch.tensor([0.01], device=device) if static else None
    q, scale = quantize_per_token(a, static_scale)
    q_ref, scale_ref = quantize_per_token_reference(a.cpu(), static_scale.cpu() if static else None)
    assert_quantized(q, scale, q_ref, scale_ref)


def test_quantize_per_token_leading_dims_and_strides(device) -> None:
    a = torch.randn(2, 6, 80, device=device)[:, ::2]
    q, scale = quantize_per_token(a)
    assert q.shape == (2, 3, 80) and scale.shape == (2, 3, 1)
    assert_quantized(q, scale, *quantize_per_token_reference(a.cpu()))


@pytest.mark.parametrize("shape", [(5, 123), (3, 1000), (1, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quant_matches_reference(device, dtype, shape, with_residual) -> None:
    x = _rows(*shape, dtype, device)
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(dtype).to(device)
    residual = torch.randn(shape, dtype=dtype, device=device) if with_residual else None
    q, scale, new_residual = rms_norm_quant(x, weight, 1e-6, residual)
    q_ref, scale_ref, ref_residual = rms_norm_quant_reference(x, weight, 1e-6, residual)
    assert_quantized(q, scale, q_ref, scale_ref, dtype)
    if with_residual:
        assert_close(new_residual, ref_residual, ELEMENTWISE_TOL[dtype])
    else:
        assert new_residual is None


def test_rms_norm_quant_static_scale_clamps(device) -> None:
    x = torch.randn(4, 96, device=device)
    weight = torch.randn(96, device=device)
    static = torch.tensor([0.002], device=device)
    q, scale, _ = rms_norm_quant(x, weight, 1e-5, static_scale=static)
    q_ref, scale_ref, _ = rms_norm_quant_reference(x, weight, 1e-5, static_scale=static)
    assert_quantized(q, scale, q_ref, scale_ref, torch.float32)
    assert q.float().abs().max().item() == FP8_MAX


@pytest.mark.parametrize("shape", [(5, 2 * 123), (2, 3, 2 * 64), (3, 2 * 1500)])
def test_silu_and_mul_quant_matches_reference(device, dtype, shape, row_layout) -> None:
    x = (2 * torch.randn(shape)).to(dtype).to(device)
    q, scale = silu_and_mul_quant(x)
    assert q.shape == (*shape[:-1], shape[-1] // 2) and scale.shape == (*shape[:-1], 1)
    assert_quantized(q, scale, *silu_and_mul_quant_reference(x), dtype)
    static = torch.tensor([0.003], device=device)
    assert_quantized(*silu_and_mul_quant(x, static), *silu_and_mul_quant_reference(x, static), dtype)


# --- the GEMM and the GEMV --------------------------------------------------------------------------------


def _weights(n: int, k: int, device):
    w_q, w_scale = quantize_weight_per_channel_reference(torch.randn(n, k) / k**0.5)
    return w_q.to(device), w_scale.to(device)


@pytest.mark.parametrize("m", [1, 2, 3, 16, 33])
@pytest.mark.parametrize("n,k", [(48, 64), (40, 100)], ids=["scaled_mm", "odd_k"])  # odd_k: the fallback
@pytest.mark.parametrize("extra", ["none", "bias", "addend"])
def test_fp8_gemm_matches_reference(device, dtype, m, n, k, extra) -> None:
    # NOTE: fp32 output on CUDA too: the engine's FP8 linears take it for an fp32 model on a GPU
    # (tests/gpu/test_gpu_fp8_linear.py), through _scaled_mm with the bias added after it
    q, a_scale = quantize_per_token_reference(_rows(m, k, dtype, device))
    w_q, w_scale = _weights(n, k, device)
    bias = torch.randn(n).to(dtype).to(device) if extra == "bias" else None
    addend = (4 * torch.randn(m, n)).to(dtype).to(device) if extra == "addend" else None
    ref = fp8_linear_reference(*(t.cpu() for t in (q, a_scale, w_q, w_scale)), dtype,
                               bias.cpu() if bias is not None else None,
                               addend.cpu().clone() if addend is not None else None)  # fmt: skip
    y = fp8_gemm(q, a_scale, w_q, w_scale, dtype, bias, addend)
    assert y.shape == (m, n) and y.dtype == dtype
    if addend is not None:
        assert y is addend
    # fp32 sums in another order, then one rounding to the dtype (two with the addend). Measured on an H100
    # (2026-12-07): cuBLASLt's fp16 output was up to 4 fp16 ulps off (0.06 at outputs of ~16), and a sum
    # with the addend 1 bf16 ulp of the addend where the two cancel; so the bound is relative to the
    # largest output, not to each element (a wrong scale or operand is off by the whole product).
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1.6e-2}[dtype]
    if dtype == torch.float32 and y.is_cuda:
        # NOTE: Hopper's FP8 tensor cores accumulate with fewer bits than fp32 (about 14, DeepSeek-V3's
        # report): on an H100 (2026-12-07) fp32 outputs missed 1e-5 of the largest output in 11 of 15
        # _scaled_mm cases. 5e-4 is an estimate from that precision, not yet re-run on a GPU.
        tol = 5e-4
    torch.testing.assert_close(
        y.cpu().float(), ref.float(), rtol=0, atol=tol * ref.float().abs().max().item()
    )


@pytest.mark.parametrize("m", [1, 2, 3, 16])
@pytest.mark.parametrize("n,k", [(40, 96), (33, 100)], ids=["40x96", "33x100"])
@pytest.mark.parametrize("extra", ["none", "bias+addend"])
def test_fp8_gemv_of_quantized_input_is_the_linear_reference(device, dtype, m, n, k, extra) -> None:
    q, a_scale = quantize_per_token_reference(_rows(m, k, dtype, device))
    w_q, w_scale = _weights(n, k, device)
    bias = torch.randn(n).to(dtype).to(device) if extra != "none" else None
    addend = (4 * torch.randn(m, n)).to(dtype).to(device) if extra != "none" else None
    y, new_residual = fp8_gemv(q, w_q, w_scale, a_scale=a_scale, out_dtype=dtype, bias=bias, addend=addend)
    ref = fp8_linear_reference(q, a_scale, w_q, w_scale, torch.float32, bias)
    if addend is not None:  # the GEMV rounds the sum with the addend once (fp8_linear_reference: twice)
        ref = ref + addend.float()
    assert y.shape == (m, n) and y.dtype == dtype and new_residual is None
    assert_close(y, ref.to(dtype), ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("row", [True, False], ids=["row-kernel", "dot-kernel"])
@pytest.mark.parametrize("n,k", [(40, 96), (33, 100)], ids=["40x96", "33x100"])
@pytest.mark.parametrize("extra", ["none", "bias+addend"])
def test_fp8_gemv_one_row_both_forms_are_the_linear_reference(device, dtype, row, n, k, extra) -> None:
    """M = 1 takes kernels.fp8_gemv_row (CUDA-core products, no tl.dot) unless told otherwise."""
    q, a_scale = quantize_per_token_reference(_rows(1, k, dtype, device))
    w_q, w_scale = _weights(n, k, device)
    bias = torch.randn(n).to(dtype).to(device) if extra != "none" else None
    addend = (4 * torch.randn(1, n)).to(dtype).to(device) if extra != "none" else None
    y, _ = fp8_gemv(q, w_q, w_scale, a_scale=a_scale, out_dtype=dtype, bias=bias, addend=addend, row=row)
    ref = fp8_linear_reference(q, a_scale, w_q, w_scale, torch.float32, bias)
    if addend is not None:
        ref = ref + addend.float()
    assert y.shape == (1, n) and y.dtype == dtype
    assert_close(y, ref.to(dtype), ELEMENTWISE_TOL[dtype])


def _gemv_case(prologue, m, n, k, dtype, device, with_residual=True):
    x = torch.randn(m, k).to(dtype).to(device)
    kw = {}
    if prologue == "rmsnorm":
        residual = torch.randn(m, k).to(dtype).to(device) if with_residual else None
        kw = dict(residual=residual, norm_weight=(1 + 0.3 * torch.randn(k)).to(dtype).to(device), eps=1e-5)
    return x, *_weights(n, k, device), kw


@pytest.mark.parametrize("prologue", [None, "rmsnorm"], ids=["none", "rmsnorm"])
@pytest.mark.parametrize("m", [1, 2, 3, 16])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "quantize-first"])
def test_fp8_gemv_matches_reference(device, dtype, prologue, m, fuse) -> None:
    n, k = 33, 100  # k: two chunks of the statistics pass on "cpu" (one on "cuda"), a partial BLOCK_K
    x, w_q, w_scale, kw = _gemv_case(prologue, m, n, k, dtype, device)
    addend = (4 * torch.randn(m, n)).to(dtype).to(device)
    y, new_residual = fp8_gemv(x, w_q, w_scale, prologue, addend=addend, fuse=fuse, **kw)
    ref, ref_residual = fp8_gemv_reference(x, w_q, w_scale, prologue, addend=addend, **kw)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, ref) < Y_TOL[dtype]
    if prologue == "rmsnorm":
        assert_close(new_residual, ref_residual, ELEMENTWISE_TOL[dtype])
    else:
        assert new_residual is None


@pytest.mark.parametrize("prologue", [None, "rmsnorm"], ids=["none", "rmsnorm"])
def test_fp8_gemv_fused_equals_quantize_first(device, dtype, prologue) -> None:
    """The fused quantization against rms_norm_quant / quantize_per_token, then the same GEMV loop: the same q
    up to the rstd's summation order (chunked here, one reduction there), so nearly the same y."""
    x, w_q, w_scale, kw = _gemv_case(prologue, 3, 40, 200, dtype, device)
    fused, r1 = fp8_gemv(x, w_q, w_scale, prologue, fuse=True, **kw)
    unfused, r2 = fp8_gemv(x, w_q, w_scale, prologue, fuse=False, **kw)
    assert _rel_err(fused, unfused) < 2e-3
    if prologue == "rmsnorm":
        assert torch.equal(r1, r2)


def test_fp8_gemv_static_scale_and_no_residual(device) -> None:
    x, w_q, w_scale, kw = _gemv_case("rmsnorm", 2, 48, 64, torch.float32, device, with_residual=False)
    static = torch.tensor([0.004], device=device)  # small enough that some values clamp
    for fuse in (True, False):
        y, new_residual = fp8_gemv(x, w_q, w_scale, "rmsnorm", static_scale=static, fuse=fuse, **kw)
        ref, _ = fp8_gemv_reference(x, w_q, w_scale, "rmsnorm", static_scale=static, **kw)
        assert new_residual is x
        assert _rel_err(y, ref) < Y_TOL[torch.float32]


def test_fp8_gemv_misses_are_detected(device) -> None:
    """A wrong norm weight or a missing addend must fail the comparison: the checks can fail."""
    x, w_q, w_scale, kw = _gemv_case("rmsnorm", 1, 40, 96, torch.float32, device)
    y, _ = fp8_gemv(x, w_q, w_scale, "rmsnorm", **kw)
    ref, _ = fp8_gemv_reference(
        x, w_q, w_scale, "rmsnorm", **(kw | {"norm_weight": kw["norm_weight"] * 1.01})
    )
    assert _rel_err(y, ref) > 10 * Y_TOL[torch.float32]
    addend = torch.randn(1, 40, device=device)
    ref, _ = fp8_gemv_reference(x, w_q, w_scale, "rmsnorm", addend=addend, **kw)
    assert _rel_err(y, ref) > 10 * Y_TOL[torch.float32]


def test_bad_inputs_raise_value_error() -> None:
    a, w_q, w_scale = torch.randn(2, 64), *_weights(32, 64, "cpu")
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        quantize_per_token(a.to(torch.int32))
    with pytest.raises(ValueError, match="static_scale"):
        quantize_per_token(a, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm_quant(a, torch.randn(63), 1e-6)
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul_quant(torch.randn(2, 7))
    q, s = quantize_per_token_reference(a)
    with pytest.raises(ValueError, match="do not match"):
        fp8_gemm(q, s, w_q[:, :32], w_scale, torch.bfloat16)
    with pytest.raises(ValueError, match="a_scale"):
        fp8_gemm(q, s[:1], w_q, w_scale, torch.bfloat16)
    with pytest.raises(ValueError, match="bias must be"):
        fp8_gemm(q, s, w_q, w_scale, torch.bfloat16, bias=torch.randn(32))
    with pytest.raises(ValueError, match="unknown prologue"):
        fp8_gemv(a, w_q, w_scale, "silu_mul")
    with pytest.raises(ValueError, match="1 <= M <= 16"):
        fp8_gemv(torch.randn(17, 64), w_q, w_scale)
    with pytest.raises(ValueError, match="w_q must be"):
        fp8_gemv(a, w_q.float(), w_scale)
    with pytest.raises(ValueError, match="needs its scales"):
        fp8_gemv(q, w_q, w_scale, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="norm_weight"):
        fp8_gemv(a, w_q, w_scale, "rmsnorm")
    with pytest.raises(ValueError, match=r"addend must be \[2, 32\]"):
        fp8_gemv(a, w_q, w_scale, addend=torch.randn(2, 31))


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="nothing compiles under TRITON_INTERPRET=1"
)
def test_kernels_compile_for_hopper() -> None:
    """As tests/kernels/test_compile_hopper.py, in the GPU wrappers' configurations."""
    from .test_compile_hopper import HOPPER_SHARED_MEMORY, compile_for_hopper

    fp32_ptrs = (("scale_ptr", "fp32"), ("static_scale_ptr", "fp32"), ("q_ptr", "fp8e4nv"))
    for n_cols, static in [(4096, False), (14336, False), (14336, True)]:  # one block, then chunked
        block, warps, chunked = quant_row_launch(n_cols)
        constexprs = dict(STATIC_SCALE=static, BLOCK=block, CHUNKED=chunked)
        compile_for_hopper(_quantize_per_token_kernel, "bf16", constexprs, warps, 1, fp32_ptrs)
        compile_for_hopper(_silu_and_mul_quant_kernel, "bf16", constexprs, warps, 1, fp32_ptrs)
    compile_for_hopper(_rms_norm_quant_kernel, "bf16", dict(HAS_RESIDUAL=True, STATIC_SCALE=False, BLOCK=8192),
                       16, 1, fp32_ptrs)  # fmt: skip
    for prologue, m, n, k in [
        (0, 16, 4096, 14336),
        (1, 4, 4096, 14336),
        (2, 1, 6144, 4096),
        (2, 4, 28672, 4096),
    ]:
        block_n, block_k, warps, stages = default_config(n)
        constexprs = dict(PROLOGUE=prologue, STATIC_SCALE=False, HAS_RESIDUAL=prologue == 2, HAS_BIAS=True,
                          HAS_ADDEND=True, M_ROWS=m, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, PRE_K=4096,
                          PRE_CHUNKS=-(-k // 4096))  # fmt: skip
        ptrs = (("x_ptr", "fp8e4nv" if prologue == 0 else "bf16"), ("a_scale_ptr", "fp32"), ("q_ptr", "fp8e4nv"),
                ("w_ptr", "fp8e4nv"), ("w_scale_ptr", "fp32"))  # fmt: skip
        compiled = compile_for_hopper(_fp8_gemv_kernel, "bf16", constexprs, warps, stages, ptrs)
        assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY
        assert "mma" in compiled.asm["ptx"], "the GEMV's dot should run on the tensor cores"


# --- model-sized, compiled only (make test-gpu) -------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("prologue,n,k", [("rmsnorm", 6144, 4096), (None, 4096, 14336)], ids=["qkv", "down"])
def test_fp8_gemv_model_sized_on_cuda(dtype, m, prologue, n, k) -> None:
    x, w_q, w_scale, kw = _gemv_case(prologue, m, n, k, dtype, torch.device("cuda"))
    addend = torch.randn(m, n, dtype=dtype, device="cuda") if prologue is None else None
    ref, _ = fp8_gemv_reference(x, w_q, w_scale, prologue, addend=addend, **kw)
    # the path the engine takes at larger M: the fused quantization, then the GEMM
    if prologue == "rmsnorm":
        q, a_scale, _ = rms_norm_quant(x, kw["norm_weight"], kw["eps"], kw["residual"])
    else:
        q, a_scale = quantize_per_token(x)
    y_gemm = fp8_gemm(q, a_scale, w_q, w_scale, dtype, addend=addend.clone() if addend is not None else None)
    for fuse in (True, False) if m <= 8 else (False,):  # (fused at M = 16: a long compile; "cpu" covers it)
        y, _ = fp8_gemv(x, w_q, w_scale, prologue, addend=addend, fuse=fuse, **kw)
        assert _rel_err(y, ref) < 1e-2
        assert _rel_err(y, y_gemm) < 5e-3  # the engine may switch from one to the other at any M


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 33, 512])
def test_fp8_gemm_model_sized_on_cuda(dtype, m) -> None:
    n, k = 4096, 4096
    q, a_scale = quantize_per_token(torch.randn(m, k, dtype=dtype, device="cuda"))
    w_q, w_scale = _weights(n, k, "cuda")
    bias = torch.randn(n, dtype=dtype, device="cuda")
    y = fp8_gemm(q, a_scale, w_q, w_scale, dtype, bias)
    exact = (q.double() @ w_q.double().t()) * a_scale.double() * w_scale.double() + bias.double()
    assert_close(y, exact.to(dtype), ELEMENTWISE_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_quantization_model_sized_on_cuda(dtype) -> None:
    x, r = torch.randn(2, 300, 4096, dtype=dtype, device="cuda").unbind(0)
    weight = (1 + 0.3 * torch.randn(4096, device="cuda")).to(dtype)
    q, scale, _ = rms_norm_quant(x, weight, 1e-5, r)
    q_ref, scale_ref, _ = rms_norm_quant_reference(x, weight, 1e-5, r)
    assert_quantized(q, scale, q_ref, scale_ref, dtype)
    act = 2 * torch.randn(300, 2 * 14336, dtype=dtype, device="cuda")
    assert_quantized(*silu_and_mul_quant(act), *silu_and_mul_quant_reference(act), dtype)
