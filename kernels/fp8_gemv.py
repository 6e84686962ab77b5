"""FP8-weight (W8A8) linear for decode's few rows (M <= 16): weights read at one byte each, with the RMSNorm
before it, the per-token activation quantization and the residual add after it fused in.

``y = (quant(prologue(x)) @ W_q^T) * a_scale * w_scale (+ bias) (+ addend)`` with kernels.fp8's numbers:

    prologue None       a = x
             "rmsnorm"  h = x (+ residual, rounded; the new residual), a = rms_norm_reference(h) (rounded)
    quant               q = E4M3(a / scale) per row, scale = max(amax(a) / 448, floor) or a static scale

Work split as kernels.fused_gemv: program p owns output columns ``p*BLOCK_N ..`` and streams their
``[BLOCK_N, K]`` slab of W in ``BLOCK_K`` chunks through ``tl.dot`` (rows padded to 16), the q chunks beside
them, both pipelined by Triton. Two forms:

  fused (M <= FUSE_MAX_M): the quantization needs a row's amax before its first value, so each program
      first quantizes the M rows itself (from L2 after the first program; one to three passes over a row:
      rstd, amax, quantize) into a small [M, K] buffer that every program writes with the same bytes, then
      streams W against it. One launch; each program starts its W stream a few L2 round trips late.
  quantized input: x already E4M3 with its scales (quantize_per_token, rms_norm_quant, silu_and_mul_quant).
      ``fp8_gemv`` takes this form itself for larger M (after one of those kernels), where every program's
      redundant pass over the rows would cost more than one more launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import (
    FP8_DTYPE,
    FP8_MAX_C,
    MIN_SCALE_C,
    check_static_scale,
    fp8_linear_reference,
    quantize_e4m3,
    quantize_per_token,
    quantize_per_token_reference,
)
from .fp8_gemv_row import fp8_gemv_row
from .launch import interpreting, launcher
from .rms_norm import rms_norm_quant, rms_norm_reference

MAX_M = 16
# The fused form up to here by default. 0: the quantize-first form was faster at every M from 1 to 16 for all
# four 8B projections on an H100 in CUDA graphs (benchmarks/kernels/bench_fp8_gemm.py, 2026-12-07: qkv at M=1
# 21.7 vs 30.2 us, gate_up 57.5 vs 66.2): each program's own pass over the rows costs more than a launch.
FUSE_MAX_M = 0
# One row (after the quantization) takes kernels.fp8_gemv_row (no tl.dot) when True. NOTE: False until it is
# timed on a GPU (bench_fp8_gemm --gemv-sweep times both forms at M = 1); written 2026-12-07, no GPU lent since.
ROW_FORM = False
PROLOGUES = (None, "rmsnorm")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fp8_gemv_reference(
    x: torch.Tensor,  # [M, K] model dtype
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [N] fp32
    prologue: str | None = None,
    *,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    addend: torch.Tensor | None = None,  # [M, N] x's dtype (not modified)
    bias: torch.Tensor | None = None,  # [N] x's dtype
    static_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, new residual or None)``: the unfused ops in order (rms_norm, quantize per token, fp8 linear)."""
    new_residual = None
    if prologue == "rmsnorm":
        x, new_residual = rms_norm_reference(x, norm_weight, eps, residual)
    elif prologue is not None:
        raise ValueError(f"fp8_gemv: unknown prologue {prologue!r}")
    q, scale = quantize_per_token_reference(x, static_scale)
    extra = addend.clone() if addend is not None else None
    return fp8_linear_reference(q, scale, w_q, w_scale, x.dtype, bias, extra), new_residual


@triton.jit
def _load_sum(x_ptrs, r_ptrs, mask, HAS_RESIDUAL: tl.constexpr):
    """x, or x + residual rounded to the dtype (as the unfused add)."""
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _normed(h, rstd, g):
    """rms_norm_reference's output in fp32: (h * rstd) rounded to the dtype, times the weight, rounded."""
    normed = (h.to(tl.float32) * rstd).to(h.dtype)
    return (normed.to(tl.float32) * g.to(tl.float32)).to(h.dtype).to(tl.float32)


@triton.jit
def _activation(x_row, r_row, norm_w_ptr, ks, K, rstd, RMSNORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Chunk ``ks`` of one row of prologue(x), fp32."""
    if RMSNORM:
        h = _load_sum(x_row + ks, r_row + ks, ks < K, HAS_RESIDUAL)
        a = _normed(h, rstd, tl.load(norm_w_ptr + ks, mask=ks < K, other=0.0))
    else:
        a = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
    return a


@triton.jit
def _quantize_rows(x_ptr, residual_ptr, norm_w_ptr, residual_out_ptr, static_scale_ptr, q_ptr, K, stride_x,
                   stride_residual, stride_residual_out, stride_q, eps, RMSNORM: tl.constexpr,
                   STATIC_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, M_ROWS: tl.constexpr,
                   BLOCK_M: tl.constexpr, PRE_K: tl.constexpr, PRE_CHUNKS: tl.constexpr):  # fmt: skip
    """Quantize the rows of prologue(x) into ``q_ptr`` (as rms_norm_quant / quantize_per_token would) and
    return their scales as a [BLOCK_M] vector (1 past M_ROWS). Program 0 also stores x + residual.

    Up to three passes over a row: the sum of squares (rmsnorm), the amax, the quantization; the first chunk
    is kept in registers between them, so a row of one chunk is read once."""
    rows = tl.arange(0, BLOCK_M)
    scales = tl.full((BLOCK_M,), 1.0, tl.float32)
    store_residual = tl.program_id(0) == 0
    for m in tl.static_range(M_ROWS):
        x_row = x_ptr + m * stride_x
        r_row = residual_ptr + m * stride_residual
        rstd = 1.0
        if RMSNORM:
            sum_sq = tl.zeros((PRE_K,), dtype=tl.float32)
            for c in tl.static_range(PRE_CHUNKS):
                ks = c * PRE_K + tl.arange(0, PRE_K)
                h = _load_sum(x_row + ks, r_row + ks, ks < K, HAS_RESIDUAL)
                if HAS_RESIDUAL:
                    if store_residual:
                        tl.store(residual_out_ptr + m * stride_residual_out + ks, h, mask=ks < K)
                if c == 0:
                    h_first = h
                hf = h.to(tl.float32)
                sum_sq += hf * hf
            rstd = tl.rsqrt(tl.sum(sum_sq, 0) / K + eps)
        if STATIC_SCALE:
            scale = tl.load(static_scale_ptr)
        else:
            amax = tl.zeros((PRE_K,), dtype=tl.float32)
            for c in tl.static_range(PRE_CHUNKS):
                ks = c * PRE_K + tl.arange(0, PRE_K)
                if RMSNORM and c == 0:
                    a = _normed(h_first, rstd, tl.load(norm_w_ptr + ks, mask=ks < K, other=0.0))
                else:
                    a = _activation(x_row, r_row, norm_w_ptr, ks, K, rstd, RMSNORM, HAS_RESIDUAL)
                if c == 0:
                    a_first = a
                amax = tl.maximum(amax, tl.abs(a))
            scale = tl.maximum(tl.math.div_rn(tl.max(amax, 0), FP8_MAX_C), MIN_SCALE_C)
        scales = tl.where(rows == m, scale, scales)
        for c in tl.static_range(PRE_CHUNKS):
            ks = c * PRE_K + tl.arange(0, PRE_K)
            if c == 0 and not STATIC_SCALE:
                a = a_first
            elif c == 0 and RMSNORM:
                a = _normed(h_first, rstd, tl.load(norm_w_ptr + ks, mask=ks < K, other=0.0))
            else:
                a = _activation(x_row, r_row, norm_w_ptr, ks, K, rstd, RMSNORM, HAS_RESIDUAL)
            q = quantize_e4m3(a, scale)
            tl.store(q_ptr + m * stride_q + ks, q.to(q_ptr.dtype.element_ty), mask=ks < K)
    return scales


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,  # [M, K]: E4M3 (PROLOGUE 0) or the model dtype
    a_scale_ptr,  # PROLOGUE 0: [M] fp32; else with STATIC_SCALE: [1] fp32
    residual_ptr,  # [M, K] (HAS_RESIDUAL)
    norm_w_ptr,  # [K] (PROLOGUE 2)
    residual_out_ptr,  # [M, K] (HAS_RESIDUAL: x + residual)
    q_ptr,  # [M, K] E4M3 (PROLOGUE 1 / 2): every program writes the same q here, then reads it back
    w_ptr,  # [N, K] E4M3
    w_scale_ptr,  # [N] fp32
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N]
    addend_ptr,  # [M, N] (HAS_ADDEND)
    M,
    N,
    K,
    stride_x,
    stride_residual,
    stride_residual_out,
    stride_q,
    stride_w,
    stride_out,
    stride_addend,
    eps,
    PROLOGUE: tl.constexpr,  # 0 x is quantized, 1 quantize x, 2 rmsnorm then quantize
    STATIC_SCALE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    M_ROWS: tl.constexpr,  # PROLOGUE 1 / 2: M (the quantization pass is unrolled over the rows)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRE_K: tl.constexpr,
    PRE_CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if PROLOGUE == 0:
        a_scale = tl.load(a_scale_ptr + rows, mask=row_mask, other=1.0)
        q_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    else:
        # NOTE: each program quantizes the rows itself (x is in L2 after the first), once per row rather
        # than per W chunk on 16 padded rows, and writes the same bytes as every other program; the barrier
        # makes its own stores visible to all its threads before the loop reads them back.
        a_scale = _quantize_rows(x_ptr, residual_ptr, norm_w_ptr, residual_out_ptr, a_scale_ptr, q_ptr, K,
                                 stride_x, stride_residual, stride_residual_out, stride_q, eps, PROLOGUE == 2,
                                 STATIC_SCALE, HAS_RESIDUAL, M_ROWS, BLOCK_M, PRE_K, PRE_CHUNKS)  # fmt: skip
        tl.debug_barrier()
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(q_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        # NOTE: fp16 operands (exact for E4M3), so the MMA accumulates in fp32 whichever instruction Triton
        # picks (Hopper's fp8 wgmma keeps fewer accumulator bits unless told otherwise).
        acc = tl.dot(q.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
    w_scale = tl.load(w_scale_ptr + cols, mask=col_mask, other=0.0)
    y = acc * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_ADDEND:
        addend = tl.load(addend_ptr + rows.to(tl.int64)[:, None] * stride_addend + cols[None, :], mask=out_mask,
                         other=0.0)  # fmt: skip
        y += addend.to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :],
             y.to(out_ptr.dtype.element_ty), mask=out_mask)  # fmt: skip


def default_config(n: int) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` on the GPU. NOTE: not tuned on a GPU yet: fused_gemv's
    tiles with BLOCK_K doubled (the same bytes per stage at one byte a weight)."""
    if n >= 16384:  # gate_up, lm_head
        return 64, 512, 4, 3
    return 32, 512, 4, 4  # qkv, o_proj, down_proj: enough programs to cover every SM


def _check(x, w_q, w_scale, prologue, residual, norm_weight, addend, bias, static_scale, a_scale, out_dtype):
    who = "fp8_gemv"
    if prologue not in PROLOGUES:
        raise ValueError(f"{who}: unknown prologue {prologue!r}")
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M or x.stride(-1) != 1:
        raise ValueError(f"{who}: x must be [M, K] with 1 <= M <= {MAX_M} and a unit stride along K, "
                         f"got {tuple(x.shape)}")  # fmt: skip
    m, k = x.shape
    if w_q.dim() != 2 or w_q.shape[1] != k or w_q.dtype != FP8_DTYPE or w_q.stride(1) != 1:
        raise ValueError(f"{who}: w_q must be [N, {k}] float8_e4m3fn with unit stride along K, "
                         f"got {tuple(w_q.shape)} {w_q.dtype}")  # fmt: skip
    n = w_q.shape[0]
    if w_scale.shape != (n,) or w_scale.dtype != torch.float32 or not w_scale.is_contiguous():
        raise ValueError(f"{who}: w_scale must be contiguous [{n}] fp32")
    if x.dtype == FP8_DTYPE:
        if prologue is not None or static_scale is not None or out_dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{who}: an fp8 x is already quantized: no prologue or static_scale, and an out_dtype"
            )
        if (
            a_scale is None
            or a_scale.numel() != m
            or a_scale.dtype != torch.float32
            or not a_scale.is_contiguous()
        ):
            raise ValueError(f"{who}: an fp8 x needs its scales, a_scale [{m}, 1] fp32 contiguous")
    elif x.dtype not in FLOAT_DTYPES or a_scale is not None or out_dtype not in (None, x.dtype):
        raise ValueError(f"{who}: x must be fp8 (with a_scale) or fp32 / fp16 / bf16 (output in its dtype)")
    out_dtype = out_dtype or x.dtype
    if prologue == "rmsnorm":
        if norm_weight is None or norm_weight.shape != (k,) or norm_weight.dtype != x.dtype:
            raise ValueError(f"{who}: rmsnorm needs norm_weight [{k}] {x.dtype}")
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
            raise ValueError(f"{who}: residual must match x ({tuple(x.shape)} {x.dtype})")
    elif residual is not None or norm_weight is not None:
        raise ValueError(f"{who}: residual and norm_weight belong to the rmsnorm prologue")
    for t in (residual, norm_weight):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{who}: residual and norm_weight need a unit stride along K")
    if addend is not None and (addend.shape != (m, n) or addend.dtype != out_dtype or addend.stride(-1) != 1):
        raise ValueError(f"{who}: addend must be [{m}, {n}] {out_dtype} with a unit stride along N")
    if bias is not None and (bias.shape != (n,) or bias.dtype != out_dtype):
        raise ValueError(f"{who}: bias must be [{n}] {out_dtype}")
    check_static_scale(static_scale, x.device, who)
    return out_dtype


def fp8_gemv(
    x: torch.Tensor,  # [M, K], 1 <= M <= 16: fp32 / fp16 / bf16 (quantized here), or E4M3 with a_scale
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn, unit stride along K
    w_scale: torch.Tensor,  # [N] fp32
    prologue: str | None = None,  # None | "rmsnorm"
    *,
    residual: torch.Tensor | None = None,  # "rmsnorm": [M, K] or None
    norm_weight: torch.Tensor | None = None,  # "rmsnorm": [K]
    eps: float = 1e-6,
    addend: torch.Tensor | None = None,  # [M, N] output dtype (read, not modified)
    bias: torch.Tensor | None = None,  # [N] output dtype
    static_scale: torch.Tensor | None = None,  # fp32, one element: quantize with it instead of per token
    a_scale: torch.Tensor | None = None,  # [M, 1] fp32: the scales of an E4M3 x
    out_dtype: torch.dtype | None = None,  # with an E4M3 x
    fuse: bool | None = None,  # the fused form (default: M <= FUSE_MAX_M); ignored for an E4M3 x
    row: bool | None = None,  # one row, not fused: kernels.fp8_gemv_row (default: ROW_FORM)
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton ``fp8_gemv_reference``: ``(y [M, N], new residual or None)`` (as fused_gemv: "rmsnorm" without
    a residual returns x itself as the new residual).

    Numerics: q as quantize_per_token / rms_norm_quant make it (the fused form's rstd sums in another order,
    which may move a value by one rounding of the dtype now and then), fp32 accumulation of exact products:
    ``fp8_gemm``'s numbers up to the summation order. The addend is added before the one rounding (the
    reference rounds twice).
    """
    out_dtype = _check(x, w_q, w_scale, prologue, residual, norm_weight, addend, bias, static_scale, a_scale,
                       out_dtype)  # fmt: skip
    m, k = x.shape
    n = w_q.shape[0]
    new_residual = x if prologue == "rmsnorm" and residual is None else None
    fuse = m <= FUSE_MAX_M if fuse is None else fuse
    if x.dtype != FP8_DTYPE and not fuse:
        if prologue == "rmsnorm":
            x, a_scale, r_out = rms_norm_quant(x, norm_weight, eps, residual, static_scale)
            new_residual = r_out if residual is not None else new_residual
        else:
            x, a_scale = quantize_per_token(x, static_scale)
        prologue, residual, norm_weight, static_scale = None, None, None, None
    quantized = x.dtype == FP8_DTYPE
    if quantized and m == 1 and (ROW_FORM if row is None else row):
        kw = dict(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
        return fp8_gemv_row(x, a_scale, w_q, w_scale, out_dtype, bias, addend, **kw), new_residual
    residual_out = (
        torch.empty((m, k), dtype=x.dtype, device=x.device)
        if prologue == "rmsnorm" and residual is not None
        else None
    )
    new_residual = residual_out if residual_out is not None else new_residual
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    q_buf = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device) if not quantized else None
    if interpreting(x.device):  # small tiles; several statistics chunks, so the tests cover them
        (dn, dk, dw, ds), pre_k = (16, 32, 4, 1), min(64, triton.next_power_of_2(k))
    else:
        (dn, dk, dw, ds), pre_k = default_config(n), min(4096, triton.next_power_of_2(k))
    block_n, block_k = block_n or dn, block_k or min(dk, max(16, triton.next_power_of_2(k)))
    dummy = out
    launcher(_fp8_gemv_kernel, x.device)[(triton.cdiv(n, block_n),)](
        x,
        a_scale if quantized else (static_scale if static_scale is not None else dummy),
        residual if residual is not None else dummy,
        norm_weight if norm_weight is not None else dummy,
        residual_out if residual_out is not None else dummy,
        q_buf if q_buf is not None else dummy,
        w_q,
        w_scale,
        bias if bias is not None else dummy,
        out,
        addend if addend is not None else dummy,
        m,
        n,
        k,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        residual_out.stride(0) if residual_out is not None else 0,
        k,
        w_q.stride(0),
        out.stride(0),
        addend.stride(0) if addend is not None else 0,
        eps,
        PROLOGUE=0 if quantized else (2 if prologue == "rmsnorm" else 1),
        STATIC_SCALE=static_scale is not None,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        HAS_ADDEND=addend is not None,
        M_ROWS=1 if quantized else m,
        BLOCK_M=16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRE_K=pre_k,
        PRE_CHUNKS=triton.cdiv(k, pre_k),
        num_warps=num_warps or dw,
        num_stages=num_stages or ds,
    )
    return out, new_residual
