"""SiLU-and-multiply, the gate of SwiGLU MLPs.

The fused gate/up projection holds both halves in one row; the kernel reads both and writes one::

    x[row] = [ gate (d) | up (d) ]  ─►  out[row] = silu(gate) * up     (fp32 math, one rounding)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import launcher

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of shape ``[..., 2 * d]``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_rows, 2 * d]
    out_ptr,  # [num_rows, d]
    stride_x_row,
    stride_out_row,
    d,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x_row + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [..., 2 * d] fp32 / fp16 / bf16
    """Triton ``silu(x[..., :d]) * x[..., d:]``; returns a new contiguous ``[..., d]`` tensor.

    NOTE: computed in fp32 and rounded once, so fp16/bf16 results may differ from the reference (which
    rounds after the SiLU and after the product) by one rounding step.
    """
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"silu_and_mul: x must be fp32, fp16 or bf16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"silu_and_mul: the last dimension must be even (gate | up), got {tuple(x.shape)}")
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = x.reshape(-1, 2 * d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_rows = out.view(-1, d)
    block = min(triton.next_power_of_2(d), 1024)
    grid = (rows.shape[0], triton.cdiv(d, block))
    launcher(_silu_and_mul_kernel, x.device)[grid](
        rows, out_rows, rows.stride(0), out_rows.stride(0), d, BLOCK=block, num_warps=4
    )
    return out
