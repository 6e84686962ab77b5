"""FP8-weight GEMV for one row (batch-1 decode): ``y = (q @ W_q^T) * a_scale * w_scale (+ bias) (+ addend)``
with q already E4M3 (quantize_per_token / rms_norm_quant / silu_and_mul_quant made it).

kernels.gemv's shape with one-byte weights: program p owns output columns ``p*BLOCK_N ..`` and streams their
``[BLOCK_N, K]`` slab of W in ``BLOCK_K`` chunks, multiplying in fp32 on the CUDA cores and summing once at
the end. No ``tl.dot``: with one real row the tensor cores would work on 15 rows of padding, and the E4M3 ->
fp16 operand conversion a dot needs may be why fp8_gemv's dot form read W at 1.0-2.0 TB/s at M = 1 on an H100
(3.0 TB/s copy; benchmarks/results/fp8-gemm-h100.json, its quantization pass included).
Products of two E4M3 values are exact in fp32, so this is fp8_gemv's numbers up to the summation order.
Not yet the default (kernels.fp8_gemv.ROW_FORM): it has not run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import interpreting, launcher


@triton.jit
def _fp8_gemv_row_kernel(
    q_ptr,  # [K] E4M3
    a_scale_ptr,  # [1] fp32
    w_ptr,  # [N, K] E4M3
    w_scale_ptr,  # [N] fp32
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [N]
    addend_ptr,  # [N] (HAS_ADDEND)
    N,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        q = tl.load(q_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * q[None, :]
    w_scale = tl.load(w_scale_ptr + cols, mask=col_mask, other=0.0)
    y = tl.sum(acc, axis=1) * tl.load(a_scale_ptr) * w_scale
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_ADDEND:
        y += tl.load(addend_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_mask)


def default_config(n: int) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` on the GPU. NOTE: a first guess (kernels.gemv's 16 KB a
    chunk at one byte a weight), to be replaced by ``bench_fp8_gemm --gemv-sweep``'s best."""
    return 16, 1024, 4, 3


def fp8_gemv_row(
    q: torch.Tensor,  # [1, K] float8_e4m3fn, unit stride along K
    a_scale: torch.Tensor,  # one fp32 element
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn, unit stride along K
    w_scale: torch.Tensor,  # [N] fp32 contiguous
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,  # [N] out_dtype
    addend: torch.Tensor | None = None,  # [1, N] out_dtype, unit stride along N
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """``[1, N]`` in ``out_dtype``. The caller (kernels.fp8_gemv.fp8_gemv) has checked the operands."""
    n, k = w_q.shape
    out = torch.empty((1, n), dtype=out_dtype, device=q.device)
    if interpreting(q.device):  # small tiles, so the tests cover several programs and K chunks
        dn, dk, dw, ds = 16, 32, 4, 1
    else:
        dn, dk, dw, ds = default_config(n)
    block_n, block_k = block_n or dn, block_k or min(dk, max(16, triton.next_power_of_2(k)))
    launcher(_fp8_gemv_row_kernel, q.device)[(triton.cdiv(n, block_n),)](
        q,
        a_scale,
        w_q,
        w_scale,
        bias if bias is not None else out,
        out,
        addend if addend is not None else out,
        n,
        k,
        w_q.stride(0),
        HAS_BIAS=bias is not None,
        HAS_ADDEND=addend is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps or dw,
        num_stages=num_stages or ds,
    )
    return out
