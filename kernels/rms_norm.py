"""RMSNorm, optionally fused with the residual add that precedes it (and, for FP8 linears, with the
per-token quantization that follows it).

One Triton program normalises one row::

    x[row], residual[row] ─► s = x + residual (rounded to the dtype, stored as the new residual)
                          ─► out = (s * rsqrt(mean(s^2) + eps)).to(dtype) * weight
                          (─► rms_norm_quant: q, scale = quantize_per_token(out), out never stored)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import (
    FP8_DTYPE,
    check_static_scale,
    quantize_per_token_reference,
    row_launch,
    store_row_quantized,
)
from .launch import launcher

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_reference(
    x: torch.Tensor,  # [num_tokens, hidden] any float dtype
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden], same dtype as x
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(rmsnorm(x + residual) * weight, x + residual)`` (the second is None without residual).

    Computed in fp32 and cast back to ``x.dtype``, as HF Llama does.
    """
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    variance = xf.pow(2).mean(dim=-1, keepdim=True)
    out = (xf * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * out, residual


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_rows, hidden]
    residual_ptr,  # [num_rows, hidden] (unused without HAS_RESIDUAL)
    weight_ptr,  # [hidden]
    out_ptr,  # [num_rows, hidden]; may alias x_ptr
    residual_out_ptr,  # [num_rows, hidden]; may alias residual_ptr
    stride_x_row,
    stride_residual_row,
    stride_out_row,
    stride_residual_out_row,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    out = _residual_rms_norm(x_ptr, residual_ptr, weight_ptr, residual_out_ptr, row, cols, mask, stride_x_row,
                             stride_residual_row, stride_residual_out_row, hidden, eps, HAS_RESIDUAL)  # fmt: skip
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_rms_norm(x_ptr, residual_ptr, weight_ptr, residual_out_ptr, row, cols, mask, stride_x_row,
                       stride_residual_row, stride_residual_out_row, hidden, eps, HAS_RESIDUAL: tl.constexpr):  # fmt: skip
    """One row: ``x (+ residual, rounded to the dtype, stored as the new residual)``, RMS-normed and rounded
    to the dtype, times the weight, in fp32 (``rms_norm_reference``'s numbers before its last rounding).

    NOTE: the whole row is loaded before anything is stored, so the outputs may alias the inputs.
    """
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual_row + cols, mask=mask, other=0.0)
        # Round the sum to the dtype first, as the unfused `x + residual` does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_residual_out_row + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / hidden
    normed = (xf * tl.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    return normed.to(tl.float32) * w.to(tl.float32)


def _as_rows(t: torch.Tensor, hidden: int, name: str, in_place: bool) -> torch.Tensor:
    """``t`` as ``[rows, hidden]`` with a unit column stride (a view of ``t`` when ``in_place``)."""
    if not in_place:
        rows = t.reshape(-1, hidden)
        return rows if rows.stride(-1) == 1 else rows.contiguous()
    try:
        rows = t.view(-1, hidden)
    except RuntimeError:
        rows = None
    if rows is None or rows.stride(-1) != 1:
        raise ValueError(f"rms_norm: in_place=True needs {name} viewable as [rows, hidden] with unit stride")
    return rows


def rms_norm(
    x: torch.Tensor,  # [..., hidden] fp32 / fp16 / bf16
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    residual: torch.Tensor | None = None,  # x's shape and dtype
    *,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton RMSNorm, fused with the residual add; same results as ``rms_norm_reference``.

    Returns ``(rmsnorm(x + residual) * weight, x + residual)`` (the second is None without residual).
    With ``in_place=True`` the normed output is written into ``x`` and the sum into ``residual``
    (vLLM's fused_add_rms_norm), and those two tensors are returned.
    """
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"rms_norm: x must be fp32, fp16 or bf16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"rms_norm: weight must be [{hidden}] {x.dtype} on {x.device}, "
            f"got {tuple(weight.shape)} {weight.dtype} on {weight.device}"
        )
    if not weight.is_contiguous():
        raise ValueError("rms_norm: weight must be contiguous")
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device
    ):
        raise ValueError(
            f"rms_norm: residual must match x ({tuple(x.shape)} {x.dtype} on {x.device}), "
            f"got {tuple(residual.shape)} {residual.dtype} on {residual.device}"
        )
    if x.numel() == 0:
        return rms_norm_reference(x, weight, eps, residual)

    x_rows = _as_rows(x, hidden, "x", in_place)
    r_rows = _as_rows(residual, hidden, "residual", in_place) if residual is not None else None
    if in_place:
        out_rows, r_out_rows = x_rows, r_rows
    else:
        out_rows = torch.empty(x_rows.shape, dtype=x.dtype, device=x.device)
        r_out_rows = torch.empty_like(out_rows) if residual is not None else None
    has_residual = residual is not None
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 256, 1), 16)
    launcher(_rms_norm_kernel, x.device)[(x_rows.shape[0],)](
        x_rows,
        r_rows if has_residual else x_rows,
        weight,
        out_rows,
        r_out_rows if has_residual else out_rows,
        x_rows.stride(0),
        r_rows.stride(0) if has_residual else 0,
        out_rows.stride(0),
        r_out_rows.stride(0) if has_residual else 0,
        hidden,
        eps,
        HAS_RESIDUAL=has_residual,
        BLOCK=block,
        num_warps=num_warps,
    )
    if in_place:
        return x, residual
    out = out_rows.view(x.shape)
    return out, (r_out_rows.view(x.shape) if has_residual else None)


def rms_norm_quant_reference(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,
    static_scale: torch.Tensor | None = None,  # fp32, one element
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q, scale, x + residual or None)``: ``rms_norm_reference``'s output quantized per token (kernels.fp8)."""
    out, new_residual = rms_norm_reference(x, weight, eps, residual)
    q, scale = quantize_per_token_reference(out, static_scale)
    return q, scale, new_residual


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr,  # [num_rows, hidden]
    residual_ptr,  # [num_rows, hidden] (HAS_RESIDUAL)
    weight_ptr,  # [hidden]
    q_ptr,  # [num_rows, hidden] fp8
    scale_ptr,  # [num_rows] fp32
    residual_out_ptr,  # [num_rows, hidden] (HAS_RESIDUAL)
    static_scale_ptr,  # [1] fp32 (STATIC_SCALE)
    stride_x_row,
    stride_residual_row,
    stride_q_row,
    stride_residual_out_row,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    STATIC_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    out = _residual_rms_norm(x_ptr, residual_ptr, weight_ptr, residual_out_ptr, row, cols, mask, stride_x_row,
                             stride_residual_row, stride_residual_out_row, hidden, eps, HAS_RESIDUAL)  # fmt: skip
    # rms_norm's output rounded to the dtype, as the unfused path would quantize it
    y = out.to(x_ptr.dtype.element_ty).to(tl.float32)
    store_row_quantized(
        y, q_ptr + row * stride_q_row + cols, scale_ptr + row, static_scale_ptr, mask, STATIC_SCALE
    )


def rms_norm_quant(
    x: torch.Tensor,  # [..., hidden] fp32 / fp16 / bf16
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    residual: torch.Tensor | None = None,  # x's shape and dtype
    static_scale: torch.Tensor | None = None,  # fp32, one element
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton ``rms_norm_quant_reference`` in one pass: ``(q [..., hidden] float8_e4m3fn, scale [..., 1] fp32,
    x + residual or None)``; the normed activation itself is never written.

    Numerics: as ``rms_norm`` (fp32 sum of squares in another order, the GPU's rsqrt) up to the rounding of
    the normed value to the dtype; from there as ``kernels.fp8.quantize_per_token``, bit for bit.
    """
    who = "rms_norm_quant"
    if x.dtype not in FLOAT_DTYPES or x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(
            f"{who}: x must be fp32, fp16 or bf16 [..., hidden > 0], got {tuple(x.shape)} {x.dtype}"
        )
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(
            f"{who}: weight must be contiguous [{hidden}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}"
        )
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{who}: residual must match x ({tuple(x.shape)} {x.dtype})")
    check_static_scale(static_scale, x.device, who)
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    x_rows = _as_rows(x, hidden, "x", False)
    r_rows = _as_rows(residual, hidden, "residual", False) if residual is not None else None
    r_out = torch.empty(x_rows.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if x_rows.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        launcher(_rms_norm_quant_kernel, x.device)[(x_rows.shape[0],)](
            x_rows,
            r_rows if r_rows is not None else x_rows,
            weight,
            q.view(-1, hidden),
            scale,
            r_out if r_out is not None else x_rows,
            static_scale if static_scale is not None else scale,
            x_rows.stride(0),
            r_rows.stride(0) if r_rows is not None else 0,
            hidden,
            hidden,
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            STATIC_SCALE=static_scale is not None,
            BLOCK=block,
            num_warps=row_launch(block),
        )
    return q, scale, (r_out.view(x.shape) if r_out is not None else None)
