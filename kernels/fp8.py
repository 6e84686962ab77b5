"""FP8 (E4M3) W8A8 linear layers: per-token activation quantization and the row-wise scaled GEMM.

The numbers (the CPU engine path runs the references, so they define them)::

    a [M, K] model dtype ─► amax = max |a| per row (fp32),  scale = max(amax / 448, 1 / (448 * 512))   [M, 1]
                         ─► q = clamp(a / scale, -448, 448) rounded to E4M3 (nearest, ties to even)  [M, K]
    y = ((q @ w_q^T) * scale * w_scale[None, :] + bias).to(out dtype)   (then + addend, written over it)

with ``w_q`` [N, K] E4M3 and ``w_scale`` [N] fp32 quantized at load, per output channel, by the same rule
(``quantize_weight_per_channel_reference``). The floor on the scale keeps an all-zero row finite. A static
variant quantizes with a given fp32 scale instead (checkpoints with a per-tensor ``input_scale``).

The Triton quantization kernels equal their references bit for bit when given the same values: they divide
with IEEE rounding (``tl.math.div_rn``: Triton's ``/`` is an approximate division on NVIDIA GPUs) and round to
the E4M3 grid themselves before the fp8 cast (``round_e4m3``). ``fp8_gemm`` is ``torch._scaled_mm`` on CUDA.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import launcher

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# 1 / (448 * 512) as the fp32 value that the kernels and the references both compare against
MIN_SCALE = float(torch.tensor(1.0 / (FP8_MAX * 512), dtype=torch.float32))
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the same, for @triton.jit code (which only reads constexpr globals); imported by the fused kernels' modules
FP8_MAX_C = tl.constexpr(FP8_MAX)
MIN_SCALE_C = tl.constexpr(MIN_SCALE)


def quantize_per_token_reference(
    a: torch.Tensor,  # [..., K] any float dtype
    static_scale: torch.Tensor | None = None,  # fp32, one element
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [..., K] float8_e4m3fn, scale [..., 1] fp32)`` with ``q * scale ~ a`` (one scale per row)."""
    af = a.float()
    if static_scale is None:
        scale = (af.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    else:
        shape = (*a.shape[:-1], 1)
        scale = static_scale.float().reshape([1] * len(shape)).expand(shape).contiguous()
    q = (af / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_weight_per_channel_reference(
    w: torch.Tensor, row_amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize-at-load of a linear weight ``w`` [N, K]: ``(w_q [N, K] float8_e4m3fn, w_scale [N] fp32)``.
    ``row_amax`` [N] fp32: each row's amax taken over more than ``w`` (a tensor-parallel shard of the rows:
    the whole rows'), so every shard gets the unsharded weight's scales and values."""
    if row_amax is None:
        w_q, scale = quantize_per_token_reference(w)
        return w_q, scale.view(-1)
    scale = (row_amax.float().reshape(-1, 1) / FP8_MAX).clamp_min(MIN_SCALE)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.view(-1)


def fp8_linear_reference(
    q: torch.Tensor,  # [M, K] float8_e4m3fn
    a_scale: torch.Tensor,  # [M, 1] fp32
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [N] fp32
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,  # [N]
    addend: torch.Tensor | None = None,  # [M, N] out_dtype; the result is added into it and it is returned
) -> torch.Tensor:
    """``((q @ w_q^T) * a_scale * w_scale + bias).to(out_dtype)`` (+ addend, in place) in fp32.

    NOTE: the fp32 products of two E4M3 values are exact (4 significant bits each), also in TF32, so only
    the summation order is left to the matmul.
    """
    acc = (q.float() @ w_q.float().t()) * a_scale.float().reshape(-1, 1) * w_scale.float()[None, :]
    if bias is not None:
        acc = acc + bias.float()
    y = acc.to(out_dtype)
    return y if addend is None else addend.add_(y)


@triton.jit
def round_e4m3(v):
    """fp32 ``v`` clamped to +-448 and rounded to the nearest E4M3 value (ties to even), still in fp32.

    The ``.to(tl.float8e4nv)`` after it is then exact. NOTE: rounding here rather than in the cast keeps
    Triton's interpreter right: its fp32 -> fp8 cast lets the rounding carry clobber the exponent (31.6 gives
    16) and truncates subnormals. On the GPU this is a few integer operations per element.
    """
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    # normal range (>= 2^-6): keep 3 of the 23 mantissa bits, round to nearest, ties to even
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0x7FF00000).to(tl.float32, bitcast=True)
    # subnormals are multiples of 2^-9; 1.5 * 2^14 has an ulp of 2^-9, so this add rounds there
    sub = (a + 24576.0) - 24576.0
    r = tl.where(a < 0.015625, sub, normal)
    return tl.where(v.to(tl.int32, bitcast=True) < 0, -r, r)  # the sign bit: -0.0 stays -0.0


@triton.jit
def quantize_e4m3(x, scale):
    """fp32 ``x / scale`` (IEEE division, as the references' torch division) as an E4M3 value, in fp32:
    ``clamp(x / scale, -448, 448)`` rounded to nearest, ties to even (the KV write and every quantization
    kernel here).

    NOTE: the division is the reciprocal's product corrected by one FMA step (Markstein): with ``r`` the
    correctly rounded ``1 / scale`` and ``q0 = x * r``, ``q0 + r * (x - q0 * scale)`` is the correctly
    rounded quotient wherever it is a normal fp32 number, for 3 operations an element where an IEEE division
    (``div_rn``) takes about 20 and a branch: the quantization kernels were compute-bound on it. Quotients
    of 1024 and more (the infinities of a zero scale too) need no correction: they clamp to 448 either way.
    """
    r = tl.math.div_rn(1.0, scale)
    q0 = x * r
    q = tl.fma(tl.fma(-q0, scale, x), r, q0)
    return round_e4m3(tl.where(tl.abs(q0) < 1024.0, q, q0))


@triton.jit
def _load_row_chunk(a_ptr, cols, mask, K):
    """``quantize_per_token``'s values at ``cols`` of the row at ``a_ptr`` (fp32, 0 where masked)."""
    return tl.load(a_ptr + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _quantize_per_token_kernel(
    a_ptr,  # [num_rows, K]
    q_ptr,  # [num_rows, K] fp8
    scale_ptr,  # [num_rows] fp32
    static_scale_ptr,  # [1] fp32 (STATIC_SCALE)
    stride_a_row,
    stride_q_row,
    K,
    STATIC_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    quantize_row(_load_row_chunk, a_ptr + row * stride_a_row, q_ptr + row * stride_q_row, scale_ptr + row,
                 static_scale_ptr, K, STATIC_SCALE, BLOCK, CHUNKED)  # fmt: skip


@triton.jit
def quantize_row(load_chunk: tl.constexpr, x_ptr, q_ptr, scale_ptr, static_scale_ptr, n_cols, STATIC_SCALE: tl.constexpr,
                 BLOCK: tl.constexpr, CHUNKED: tl.constexpr):  # fmt: skip
    """Quantize one row of ``n_cols`` values, ``load_chunk(x_ptr, cols, mask, n_cols)`` (fp32, 0 where
    masked), to E4M3 at ``q_ptr`` with its scale at ``scale_ptr``, as ``quantize_per_token_reference``.

    Not ``CHUNKED``: the whole row in one ``BLOCK`` (>= n_cols), loaded once. ``CHUNKED``: ``BLOCK`` columns
    at a time, twice over (the row's amax, then the quantized values). NOTE: wide rows (the 14,336 of an
    8B MLP) in one block need a program of 16 warps holding tens of registers an element, one such program
    an SM: too few loads in flight for the copy bandwidth. Small chunks let many programs share an SM; the
    second read mostly comes from L2.
    """
    if not CHUNKED:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        store_row_quantized(
            load_chunk(x_ptr, cols, mask, n_cols),
            q_ptr + cols,
            scale_ptr,
            static_scale_ptr,
            mask,
            STATIC_SCALE,
        )
    else:
        if STATIC_SCALE:
            scale = tl.load(static_scale_ptr)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                amax = tl.maximum(amax, tl.abs(load_chunk(x_ptr, cols, cols < n_cols, n_cols)))
            scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), FP8_MAX_C), MIN_SCALE_C)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            q = quantize_e4m3(load_chunk(x_ptr, cols, mask, n_cols), scale)
            tl.store(q_ptr + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr, scale)


@triton.jit
def store_row_quantized(v, q_ptrs, scale_ptr, static_scale_ptr, mask, STATIC_SCALE: tl.constexpr):
    """Store the fp32 row ``v`` (0 where masked) as E4M3 at ``q_ptrs`` and its scale at ``scale_ptr``:
    ``quantize_per_token_reference``'s numbers (the scale from the row's amax, or the static one)."""
    if STATIC_SCALE:
        scale = tl.load(static_scale_ptr)
    else:
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(v), axis=0), FP8_MAX_C), MIN_SCALE_C)
    q = quantize_e4m3(v, scale)
    tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)
    tl.store(scale_ptr, scale)


def check_static_scale(static_scale: torch.Tensor | None, device: torch.device, who: str) -> None:
    if static_scale is not None and (
        static_scale.numel() != 1 or static_scale.dtype != torch.float32 or static_scale.device != device
    ):
        raise ValueError(f"{who}: static_scale must be one fp32 element on {device}")


def row_launch(block: int) -> int:
    """num_warps of a one-row-per-program kernel over ``block`` columns (as kernels.rms_norm)."""
    return min(max(block // 256, 1), 16)


# Rows wider than this are quantized in chunks of QUANT_CHUNK columns by QUANT_CHUNK_WARPS warps
# (quantize_row's CHUNKED). Measured on an H100 (bench_fp8_gemm.py --quant-sweep, 2026-12-07; results in
# benchmarks/results/fp8-quant-sweep-h100.json): at 14,336 columns chunks of 4096 by 16 warps were the fastest
# layout for both kernels from 1,024 rows (quantize_per_token 16,384 rows: 309 us against 461 in one block;
# silu_and_mul_quant 580 against 610); at 4096 columns one block was as fast or faster.
QUANT_CHUNKED_ABOVE = 4096
QUANT_CHUNK = 4096
QUANT_CHUNK_WARPS = 16


def quant_row_launch(n_cols: int) -> tuple[int, int, bool]:
    """``(BLOCK, num_warps, CHUNKED)`` of ``quantize_row`` for rows of ``n_cols`` values."""
    if n_cols > QUANT_CHUNKED_ABOVE:
        return QUANT_CHUNK, QUANT_CHUNK_WARPS, True
    block = triton.next_power_of_2(n_cols)
    return block, row_launch(block), False


def quantize_per_token(
    a: torch.Tensor,  # [..., K] fp32 / fp16 / bf16, unit stride along K
    static_scale: torch.Tensor | None = None,  # fp32, one element
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``quantize_per_token_reference``: ``(q [..., K] float8_e4m3fn, scale [..., 1] fp32)``."""
    who = "quantize_per_token"
    if a.dtype not in FLOAT_DTYPES or a.dim() < 1 or a.shape[-1] == 0:
        raise ValueError(f"{who}: a must be fp32, fp16 or bf16 [..., K > 0], got {tuple(a.shape)} {a.dtype}")
    check_static_scale(static_scale, a.device, who)
    return launch_row_quantization(_quantize_per_token_kernel, a, a.shape[-1], static_scale)


def launch_row_quantization(
    kernel, x: torch.Tensor, out_cols: int, static_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [..., out_cols] float8_e4m3fn, scale [..., 1] fp32)`` from a one-row-per-program ``kernel`` over
    ``x``'s rows, called as ``kernel(x_rows, q, scale, static_scale, stride_x_row, stride_q_row, out_cols,
    STATIC_SCALE=, BLOCK=, CHUNKED=)`` (quantize_per_token's and silu_and_mul_quant's kernels, which quantize
    with ``quantize_row``)."""
    q = torch.empty((*x.shape[:-1], out_cols), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    if q.numel() == 0:
        return q, scale
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    block, num_warps, chunked = quant_row_launch(out_cols)
    launcher(kernel, x.device)[(rows.shape[0],)](
        rows,
        q.view(-1, out_cols),
        scale,
        static_scale if static_scale is not None else scale,
        rows.stride(0),
        out_cols,
        out_cols,
        STATIC_SCALE=static_scale is not None,
        BLOCK=block,
        CHUNKED=chunked,
        num_warps=num_warps,
    )
    return q, scale


def _has_fp8_matmul(device: torch.device) -> bool:
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def fp8_gemm(
    q: torch.Tensor,  # [M, K] float8_e4m3fn, unit stride along K
    a_scale: torch.Tensor,  # [M, 1] fp32 (per token)
    w_q: torch.Tensor,  # [N, K] float8_e4m3fn, contiguous
    w_scale: torch.Tensor,  # [N] fp32 (per output channel)
    out_dtype: torch.dtype,  # bf16 / fp16 (fp32 too)
    bias: torch.Tensor | None = None,  # [N] out_dtype
    addend: torch.Tensor | None = None,  # [M, N] out_dtype: the result is added into it (as addend.addmm_)
) -> torch.Tensor:
    """``fp8_linear_reference`` on CUDA through ``torch._scaled_mm`` with row-wise scales (cuBLASLt on sm90
    with cuBLAS >= 12.9, else PyTorch's CUTLASS kernel); the addend is added after it (one more pass).

    Falls back to the reference (an fp32 matmul of the dequantized operands, same numbers) on CPU, below
    sm89, and for shapes ``_scaled_mm`` refuses: K or N not a multiple of 16.
    """
    who = "fp8_gemm"
    if q.dim() != 2 or w_q.dim() != 2 or q.shape[1] != w_q.shape[1]:
        raise ValueError(f"{who}: q [M, K] and w_q [N, K] do not match: {tuple(q.shape)}, {tuple(w_q.shape)}")
    if q.dtype != FP8_DTYPE or w_q.dtype != FP8_DTYPE:
        raise ValueError(f"{who}: q and w_q must be float8_e4m3fn, got {q.dtype}, {w_q.dtype}")
    m, k = q.shape
    n = w_q.shape[0]
    if a_scale.numel() != m or a_scale.dtype != torch.float32:
        raise ValueError(f"{who}: a_scale must be [{m}, 1] fp32, got {tuple(a_scale.shape)} {a_scale.dtype}")
    if w_scale.shape != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(f"{who}: w_scale must be [{n}] fp32, got {tuple(w_scale.shape)} {w_scale.dtype}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != out_dtype):
        raise ValueError(f"{who}: bias must be [{n}] {out_dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if addend is not None and (addend.shape != (m, n) or addend.dtype != out_dtype):
        raise ValueError(
            f"{who}: addend must be [{m}, {n}] {out_dtype}, got {tuple(addend.shape)} {addend.dtype}"
        )
    if not q.is_cuda or k % 16 or n % 16 or not _has_fp8_matmul(q.device):
        return fp8_linear_reference(q, a_scale, w_q, w_scale, out_dtype, bias, addend)
    if not w_q.is_contiguous():
        raise ValueError(f"{who}: w_q must be contiguous (its transpose is the column-major operand)")
    # _scaled_mm takes no bias with an fp32 output: added after it there (the same fp32 sum)
    fused_bias = bias if out_dtype != torch.float32 else None
    y = torch._scaled_mm(
        q.contiguous(),
        w_q.t(),
        scale_a=a_scale.reshape(m, 1).contiguous(),
        scale_b=w_scale.view(1, n),
        bias=fused_bias,
        out_dtype=out_dtype,
    )
    if bias is not None and fused_bias is None:
        y = y + bias
    return y if addend is None else addend.add_(y)
