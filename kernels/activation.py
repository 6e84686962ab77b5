"""SiLU-and-multiply, the gate of SwiGLU MLPs.

The fused gate/up projection holds both halves in one row; the kernel reads both and writes one::

    x[row] = [ gate (d) | up (d) ]  ─►  out[row] = silu(gate) * up     (fp32 math, one rounding)

``silu_and_mul_quant`` quantizes the row per token for an FP8 down projection (kernels.fp8) in the same pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fp8 import (
    check_static_scale,
    launch_row_quantization,
    quantize_per_token_reference,
    quantize_row,
)
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


def silu_and_mul_quant_reference(
    x: torch.Tensor, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``silu_and_mul_reference(x)`` (in x's dtype) quantized per token (kernels.fp8)."""
    return quantize_per_token_reference(silu_and_mul_reference(x), static_scale)


@triton.jit
def _silu_mul_chunk(x_ptr, cols, mask, d):
    """``silu(gate) * up`` at ``cols`` of the row at ``x_ptr`` ([gate | up]), in fp32 (0 where masked), rounded
    where the reference rounds (F.silu's output, then the product), so the two quantize one value."""
    gate = tl.load(x_ptr + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # NOTE: `/` (approximate on the GPU, whose exp is approximate anyway; IEEE in the interpreter) rather
    # than div_rn: an IEEE division an element made this kernel compute-bound.
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype).to(tl.float32)


@triton.jit
def _silu_and_mul_quant_kernel(
    x_ptr,  # [num_rows, 2 * d]
    q_ptr,  # [num_rows, d] fp8
    scale_ptr,  # [num_rows] fp32
    static_scale_ptr,  # [1] fp32 (STATIC_SCALE)
    stride_x_row,
    stride_q_row,
    d,
    STATIC_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    # One program per row: the whole row's amax comes before its first quantized value.
    row = tl.program_id(0).to(tl.int64)
    quantize_row(_silu_mul_chunk, x_ptr + row * stride_x_row, q_ptr + row * stride_q_row, scale_ptr + row,
                 static_scale_ptr, d, STATIC_SCALE, BLOCK, CHUNKED)  # fmt: skip


def silu_and_mul_quant(
    x: torch.Tensor,  # [..., 2 * d] fp32 / fp16 / bf16
    static_scale: torch.Tensor | None = None,  # fp32, one element
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``silu_and_mul_quant_reference``: ``(q [..., d] float8_e4m3fn, scale [..., 1] fp32)`` in one pass.

    NOTE: the GPU's exp is approximate, so silu(gate) may round to the neighbouring value of the dtype now and
    then (as in ``silu_and_mul``); the quantization of a given value is bit for bit the reference's.
    """
    who = "silu_and_mul_quant"
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{who}: x must be fp32, fp16 or bf16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 2 != 0 or x.shape[-1] == 0:
        raise ValueError(f"{who}: the last dimension must be even (gate | up), got {tuple(x.shape)}")
    check_static_scale(static_scale, x.device, who)
    return launch_row_quantization(_silu_and_mul_quant_kernel, x, x.shape[-1] // 2, static_scale)
