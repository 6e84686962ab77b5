"""Matrix-vector product for batch-1 decode: ``y = x @ W^T`` with ``x`` of one row.

A decode step of one sequence reads every weight once; cuBLAS's GEMV for these shapes reads well below
the copy bandwidth. Here each program owns ``BLOCK_N`` output rows and streams their whole ``[BLOCK_N, K]``
slab of W (one contiguous read per row), accumulating in fp32::

    W [N, K] row-major        program p: rows p*BLOCK_N .. p*BLOCK_N + BLOCK_N - 1, all K columns
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import launcher

DEFAULT_BLOCK_N = 16
DEFAULT_BLOCK_K = 512


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [1, K] @ weight [N, K]^T (+ bias)`` -> ``[1, N]``."""
    return F.linear(x, weight, bias)


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N] or unused
    out_ptr,  # [N]
    N,
    K,
    stride_w_row,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    row_offsets = rows.to(tl.int64)[:, None] * stride_w_row
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + row_offsets + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
        )
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _gemv_split_k_kernel(
    x_ptr,  # [K]
    w_ptr,  # [N, K]
    partial_ptr,  # [SPLIT_K, N] fp32
    N,
    K,
    stride_w_row,
    k_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_mask = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    row_offsets = rows.to(tl.int64)[:, None] * stride_w_row
    k_start = split * k_per_split
    for k0 in range(0, k_per_split, BLOCK_K):
        cols = k_start + k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + row_offsets + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
        )
        acc += w.to(tl.float32) * x[None, :]
    tl.store(partial_ptr + split * N + rows, tl.sum(acc, axis=1), mask=row_mask)


@triton.jit
def _gemv_reduce_kernel(partial_ptr, bias_ptr, out_ptr, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    y = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):  # a fixed order: the result does not vary run to run
        y += tl.load(partial_ptr + split * N + rows, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=mask)


def gemv(
    x: torch.Tensor,  # [1, K] fp32 / fp16 / bf16
    weight: torch.Tensor,  # [N, K], x's dtype, unit stride along K
    bias: torch.Tensor | None = None,  # [N]
    *,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int = DEFAULT_BLOCK_K,
    num_warps: int = 4,
    num_stages: int = 3,
    split_k: int = 1,
) -> torch.Tensor:
    """Triton ``gemv_reference`` for a single row of ``x``; returns ``[1, N]`` in x's dtype.

    ``split_k > 1`` splits K over that many programs per row block (more loads in flight for shapes with
    few output rows); their fp32 partial sums are added in a fixed order by a second kernel.
    """
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv: x must be [1, K], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride(1) != 1:
        raise ValueError(f"gemv: weight must be [N, {x.shape[1]}] with unit stride along K, got "
                         f"{tuple(weight.shape)} strides {weight.stride()}")  # fmt: skip
    if weight.dtype != x.dtype or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError("gemv: weight (and bias [N]) must match x's dtype")
    n, k = weight.shape
    x = x.contiguous()
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    if split_k > 1:
        k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
        partial = torch.empty((split_k, n), dtype=torch.float32, device=x.device)
        launcher(_gemv_split_k_kernel, x.device)[(triton.cdiv(n, block_n), split_k)](
            x, weight, partial, n, k, weight.stride(0), k_per_split,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        launcher(_gemv_reduce_kernel, x.device)[(triton.cdiv(n, 1024),)](
            partial, bias if bias is not None else x, out, n,
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=1024,
        )  # fmt: skip
        return out
    grid = (triton.cdiv(n, block_n),)
    launcher(_gemv_kernel, x.device)[grid](
        x, weight, bias if bias is not None else x, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
