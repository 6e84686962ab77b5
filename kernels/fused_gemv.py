"""Small-M linear (decode: M <= 16 rows) with the op before it fused into the input load.

``y = prologue(x) @ W^T`` with W ``[N, K]`` row-major, for the few rows of a decode step, where reading W
is the whole cost and each kernel boundary costs a drain and a ramp of the memory pipe. The prologue:

    "none"       a = x
    "rmsnorm"    h = x (+ residual, rounded to the dtype; stored as the new residual; without one it is x)
                 a = rmsnorm(h) * norm_weight              (RMSNorm fused into the qkv / gate_up GEMV)
    "silu_mul"   a = silu(x[:, :K]) * x[:, K:]              (SiLU-and-mul fused into the down GEMV)

and, given an ``addend`` [M, N], ``y = prologue(x) @ W^T + addend`` rounded once (the residual add fused into
o_proj / down_proj).

Work split: program p owns output columns ``p*BLOCK_N ..`` and streams their ``[BLOCK_N, K]`` slab of W
in ``BLOCK_K`` chunks through ``tl.dot`` (rows padded to 16), so Triton's pipeliner keeps ``num_stages``
W chunks in flight. RMSNorm in one pass: ``y = rstd * ((h * norm_weight) @ W^T)``, with ``sum(h^2)``
accumulated over the same chunks, so the weight stream never waits for a separate reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import interpreting, launcher

PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2}
MAX_M = 16


def fused_gemv_reference(
    x: torch.Tensor,  # [M, K] ("silu_mul": [M, 2K])
    weight: torch.Tensor,  # [N, K]
    prologue: str = "none",
    *,
    residual: torch.Tensor | None = None,  # "rmsnorm": [M, K] or None
    norm_weight: torch.Tensor | None = None,  # "rmsnorm": [K]
    eps: float = 1e-6,
    addend: torch.Tensor | None = None,  # [M, N] or None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(prologue(x) @ weight^T (+ addend), new residual or None)``, the unfused ops in order."""
    from .activation import silu_and_mul_reference
    from .rms_norm import rms_norm_reference

    new_residual = None
    if prologue == "rmsnorm":
        x, new_residual = rms_norm_reference(x, norm_weight, eps, residual)
    elif prologue == "silu_mul":
        x = silu_and_mul_reference(x)
    elif prologue != "none":
        raise ValueError(f"fused_gemv: unknown prologue {prologue!r}")
    y = F.linear(x, weight) if addend is None else torch.addmm(addend, x, weight.t())
    return y, new_residual


@triton.jit
def _fused_gemv_kernel(
    x_ptr,  # [M, K] ("silu_mul": [M, 2K])
    residual_ptr,  # [M, K] (HAS_RESIDUAL)
    norm_w_ptr,  # [K] ("rmsnorm")
    residual_out_ptr,  # [M, K] ("rmsnorm" with HAS_RESIDUAL: x + residual)
    w_ptr,  # [N, K]
    out_ptr,  # [M, N]
    addend_ptr,  # [M, N] (HAS_ADDEND)
    M,
    N,
    K,
    stride_x,
    stride_residual,
    stride_residual_out,
    stride_w,
    stride_out,
    stride_addend,
    eps,
    PROLOGUE: tl.constexpr,  # 0 none, 1 rmsnorm, 2 silu_mul
    HAS_RESIDUAL: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PROLOGUE == 0:  # the input goes straight into the dot: Triton's pipeliner prefetches it with W
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            a = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(a.to(w.dtype), tl.trans(w), acc, input_precision=DOT_PRECISION)
    else:
        # NOTE: a computed operand is not pipelined by Triton, so the input chunks are prefetched into
        # registers one iteration ahead by hand (else every chunk waits a full memory latency).
        r_rows = residual_ptr + rows.to(tl.int64)[:, None] * stride_residual
        ks = tl.arange(0, BLOCK_K)
        x_mask = row_mask[:, None] & (ks < K)[None, :]
        x_next = tl.load(x_rows + ks[None, :], mask=x_mask, other=0.0)
        if PROLOGUE == 1:
            g_next = tl.load(norm_w_ptr + ks, mask=ks < K, other=0.0)
            if HAS_RESIDUAL:
                y_next = tl.load(r_rows + ks[None, :], mask=x_mask, other=0.0)
            else:
                y_next = x_next
        else:
            g_next = tl.zeros((BLOCK_K,), dtype=x_next.dtype)
            y_next = tl.load(x_rows + K + ks[None, :], mask=x_mask, other=0.0)  # silu_mul: the "up" half
        sum_sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            x_mask = row_mask[:, None] & k_mask[None, :]
            w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            xc, yc, gc = x_next, y_next, g_next
            kn = ks + BLOCK_K
            n_mask = row_mask[:, None] & (kn < K)[None, :]
            x_next = tl.load(x_rows + kn[None, :], mask=n_mask, other=0.0)
            if PROLOGUE == 1:
                g_next = tl.load(norm_w_ptr + kn, mask=kn < K, other=0.0)
                if HAS_RESIDUAL:
                    y_next = tl.load(r_rows + kn[None, :], mask=n_mask, other=0.0)
                    h = (xc.to(tl.float32) + yc.to(tl.float32)).to(xc.dtype)  # rounded, as the unfused add
                else:
                    y_next = x_next
                    h = xc
                if HAS_RESIDUAL and pid == 0:  # without one, the new residual is x itself
                    tl.store(residual_out_ptr + rows.to(tl.int64)[:, None] * stride_residual_out + ks[None, :],
                             h, mask=x_mask)  # fmt: skip
                hf = h.to(tl.float32)
                sum_sq += hf * hf
                a = (hf * gc.to(tl.float32)[None, :]).to(w.dtype)
            else:
                y_next = tl.load(x_rows + K + kn[None, :], mask=n_mask, other=0.0)
                gate = xc.to(tl.float32)
                a = (gate / (1.0 + tl.exp(-gate)) * yc.to(tl.float32)).to(w.dtype)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if PROLOGUE == 1:
            acc = acc * tl.rsqrt(tl.sum(sum_sq, 1) / K + eps)[:, None]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_ADDEND:
        addend = tl.load(addend_ptr + rows.to(tl.int64)[:, None] * stride_addend + cols[None, :], mask=out_mask,
                         other=0.0)  # fmt: skip
        acc += addend.to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)  # fmt: skip


def default_config(n: int, k: int, prologue: str) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` on the GPU: the fastest per shape in CUDA graphs on an
    H200 (benchmarks/kernels/bench_decode_linear.py, 2026-11-21)."""
    if prologue == "rmsnorm":
        return 64, 256, 4, 3
    if prologue == "silu_mul":
        return 32, 512, 4, 3
    if n >= 16384:  # gate_up, lm_head
        return 64, 256, 4, 3
    return 32, 256, 4, 4  # qkv, o_proj, down_proj: enough programs to cover every SM


def fused_gemv(
    x: torch.Tensor,  # [M, K] ("silu_mul": [M, 2K]), M <= 16, fp32 / fp16 / bf16
    weight: torch.Tensor,  # [N, K], x's dtype, unit stride along K
    prologue: str = "none",
    *,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    addend: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton ``fused_gemv_reference``: ``(y [M, N] in x's dtype, new residual [M, K] or None)``.

    Numerics: fp32 accumulation; with "rmsnorm" the input is rounded as ``h * norm_weight`` and the
    row's ``rsqrt(mean(h^2) + eps)`` scales the fp32 result (the reference rounds ``h * rstd`` first),
    with "silu_mul" the activation is rounded once (as ``kernels.activation.silu_and_mul``).
    """
    who = "fused_gemv"
    if prologue not in PROLOGUES:
        raise ValueError(f"{who}: unknown prologue {prologue!r}")
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M:
        raise ValueError(f"{who}: x must be [M, K] with 1 <= M <= {MAX_M}, got {tuple(x.shape)}")
    n, k = weight.shape
    x_cols = 2 * k if prologue == "silu_mul" else k
    if weight.dim() != 2 or x.shape[1] != x_cols or weight.stride(1) != 1 or weight.dtype != x.dtype:
        raise ValueError(f"{who}: weight must be [N, {x_cols if prologue != 'silu_mul' else x_cols // 2}] "
                         f"{x.dtype} with unit stride along K, got {tuple(weight.shape)} {weight.dtype}")  # fmt: skip
    if prologue == "rmsnorm":
        if norm_weight is None or norm_weight.shape != (k,) or norm_weight.dtype != x.dtype:
            raise ValueError(f"{who}: rmsnorm needs norm_weight [{k}] {x.dtype}")
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
            raise ValueError(f"{who}: residual must match x ({tuple(x.shape)} {x.dtype})")
    for t in (x, residual, norm_weight):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{who}: x, residual and norm_weight need a unit stride along K")
    m = x.shape[0]
    if addend is not None and (addend.shape != (m, n) or addend.dtype != x.dtype or addend.stride(-1) != 1):
        raise ValueError(f"{who}: addend must be [{m}, {n}] {x.dtype} with a unit stride along N")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # NOTE: without a residual the new residual is x itself: nothing to store (the model's norms before
    # qkv / gate_up get none, since o_proj / down_proj add the residual in their epilogue).
    residual_out = (
        torch.empty((m, k), dtype=x.dtype, device=x.device)
        if prologue == "rmsnorm" and residual is not None
        else None
    )
    on_gpu = not interpreting(x.device)
    if on_gpu:
        dn, dk, dw, ds = default_config(n, k, prologue)
    else:
        dn, dk, dw, ds = 16, 32, 4, 1
    block_n, block_k = block_n or dn, block_k or min(dk, triton.next_power_of_2(k))
    dummy = x
    launcher(_fused_gemv_kernel, x.device)[(triton.cdiv(n, block_n),)](
        x,
        residual if residual is not None else dummy,
        norm_weight if norm_weight is not None else dummy,
        residual_out if residual_out is not None else dummy,
        weight,
        out,
        addend if addend is not None else dummy,
        m,
        n,
        k,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        residual_out.stride(0) if residual_out is not None else 0,
        weight.stride(0),
        out.stride(0),
        addend.stride(0) if addend is not None else 0,
        eps,
        PROLOGUE=PROLOGUES[prologue],
        HAS_RESIDUAL=residual is not None,
        HAS_ADDEND=addend is not None,
        BLOCK_M=16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps or dw,
        num_stages=num_stages or ds,
    )
    return out, (x if prologue == "rmsnorm" and residual is None else residual_out)
