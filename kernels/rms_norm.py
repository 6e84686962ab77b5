"""RMSNorm, optionally fused with the residual add that precedes it.

One Triton program normalises one row::

    x[row], residual[row] ─► s = x + residual (rounded to the dtype, stored as the new residual)
                          ─► out = (s * rsqrt(mean(s^2) + eps)).to(dtype) * weight
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    # NOTE: the whole row is loaded before anything is stored, so the outputs may alias the inputs.
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
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


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
