"""Rotary position embedding (the "neox" half-rotation layout that HF Llama uses).

For a head vector ``x = [x1 | x2]`` (two halves of ``head_dim / 2``) at position ``p``::

    cos, sin = cos_sin_cache[p, :half], cos_sin_cache[p, half:]
    out = [x1 * cos - x2 * sin | x2 * cos + x1 * sin]

The Triton kernel handles one token per program: all its query heads, all its KV heads, and, in the
fused form, stores the rotated key and the value straight into the paged cache at the token's slot
(into an FP8 cache quantized with the layer's ``k_scale`` / ``v_scale``: ``kv_cache.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import quantize_e4m3
from .kv_cache import (
    check_heads,
    check_kv_cache,
    check_kv_scales,
    check_slot_mapping,
    write_kv_cache_reference,
)
from .launch import launcher


def rotary_embedding_reference(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] fp32: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their positions; returns new tensors in the input dtype."""
    cos_sin = cos_sin_cache.index_select(0, positions)
    cos, sin = cos_sin.chunk(2, dim=-1)
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)  # [num_tokens, 1, rotary_dim]
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_embedding_write_kv_cache_reference(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim] fp32
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative = padding, skipped
    rotate_k_in_place: bool = False,
    k_scale: torch.Tensor | float | None = None,  # FP8 cache only: the dequantization scales
    v_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Rotate q and k, store the rotated k and v at their slots (in place); return the rotated q.
    ``rotate_k_in_place``: ``k`` itself also becomes the rotated keys. Into an FP8 cache the rotated k (in
    k's dtype) and v are stored as ``clamp(x.float() / scale, -448, 448)`` in E4M3."""
    q_rot, k_rot = rotary_embedding_reference(positions, q, k, cos_sin_cache)
    write_kv_cache_reference(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if rotate_k_in_place:
        k.copy_(k_rot)
    return q_rot


@triton.jit
def _rotary_kernel(
    positions_ptr,  # [num_tokens] int32/int64
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim] (WRITE_CACHE only)
    cos_sin_ptr,  # [max_position, head_dim] fp32
    q_out_ptr,  # [num_tokens, num_heads, head_dim] contiguous
    k_out_ptr,  # [num_tokens, num_kv_heads, head_dim] contiguous (not WRITE_CACHE)
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim] (WRITE_CACHE only)
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens] int64 (WRITE_CACHE only)
    k_scale_ptr,  # 0-dim fp32 (KV_FP8 only)
    v_scale_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_cos_sin_pos,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    num_heads,
    num_kv_heads,
    half,  # head_dim // 2
    block_size,
    WRITE_CACHE: tl.constexpr,
    STORE_K: tl.constexpr,  # WRITE_CACHE: also overwrite k with the rotated keys
    KV_FP8: tl.constexpr,  # WRITE_CACHE into an FP8 cache: k / k_scale and v / v_scale, rounded to E4M3
    BLOCK_H: tl.constexpr,  # >= max(num_heads, num_kv_heads), a power of two
    BLOCK_HALF: tl.constexpr,  # >= half, a power of two
):
    token = tl.program_id(0).to(tl.int64)
    head_dim = 2 * half
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < half
    cos = tl.load(cos_sin_ptr + pos * stride_cos_sin_pos + dims, mask=dim_mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cos_sin_pos + half + dims, mask=dim_mask, other=0.0)
    cos = cos[None, :]
    sin = sin.to(tl.float32)[None, :]
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = dims[None, :]

    # Query heads -> q_out.
    q_mask = (heads < num_heads) & dim_mask[None, :]
    q_row = q_ptr + token * stride_q_token + heads * stride_q_head + cols
    q1 = tl.load(q_row, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_row + half, mask=q_mask, other=0.0).to(tl.float32)
    q_out_row = q_out_ptr + token * num_heads * head_dim + heads * head_dim + cols
    q_ty = q_out_ptr.dtype.element_ty
    tl.store(q_out_row, (q1 * cos - q2 * sin).to(q_ty), mask=q_mask)
    tl.store(q_out_row + half, (q2 * cos + q1 * sin).to(q_ty), mask=q_mask)

    # Key heads -> k_out, or (with v) -> the cache slot.
    kv_mask = (heads < num_kv_heads) & dim_mask[None, :]
    k_row = k_ptr + token * stride_k_token + heads * stride_k_head + cols
    k1 = tl.load(k_row, mask=kv_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_row + half, mask=kv_mask, other=0.0).to(tl.float32)
    k1_rot = k1 * cos - k2 * sin
    k2_rot = k2 * cos + k1 * sin
    if WRITE_CACHE:
        # The rotated key is rounded to k's dtype first, as the unfused rotate-then-write does.
        k_ty = k_ptr.dtype.element_ty
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        # NOTE: `block & (scalar >= 0)` comes out int32 in Triton's interpreter: compare a block instead.
        store_mask = kv_mask & (heads * 0 + slot >= 0)
        cache_row = (
            (slot // block_size) * stride_cache_block
            + (slot % block_size) * stride_cache_slot
            + heads * stride_cache_head
            + cols
        )
        cache_ty = k_cache_ptr.dtype.element_ty
        k1_out = k1_rot.to(k_ty)
        k2_out = k2_rot.to(k_ty)
        if STORE_K:  # NOTE: this thread loaded these elements above: no other reader of the old keys
            tl.store(k_row, k1_out, mask=kv_mask)
            tl.store(k_row + half, k2_out, mask=kv_mask)
        v_row = v_ptr + token * stride_v_token + heads * stride_v_head + cols
        v1 = tl.load(v_row, mask=store_mask, other=0.0)
        v2 = tl.load(v_row + half, mask=store_mask, other=0.0)
        if KV_FP8:
            k_scale = tl.load(k_scale_ptr)
            v_scale = tl.load(v_scale_ptr)
            k1_out = quantize_e4m3(k1_out.to(tl.float32), k_scale)
            k2_out = quantize_e4m3(k2_out.to(tl.float32), k_scale)
            v1 = quantize_e4m3(v1.to(tl.float32), v_scale)
            v2 = quantize_e4m3(v2.to(tl.float32), v_scale)
        tl.store(k_cache_ptr + cache_row, k1_out.to(cache_ty), mask=store_mask)
        tl.store(k_cache_ptr + cache_row + half, k2_out.to(cache_ty), mask=store_mask)
        tl.store(v_cache_ptr + cache_row, v1.to(cache_ty), mask=store_mask)
        tl.store(v_cache_ptr + cache_row + half, v2.to(cache_ty), mask=store_mask)
    else:
        k_out_row = k_out_ptr + token * num_kv_heads * head_dim + heads * head_dim + cols
        k_ty = k_out_ptr.dtype.element_ty
        tl.store(k_out_row, k1_rot.to(k_ty), mask=kv_mask)
        tl.store(k_out_row + half, k2_rot.to(k_ty), mask=kv_mask)


def _check_rotary_inputs(
    who: str, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    if q.dim() != 3:
        raise ValueError(f"{who}: q must be [num_tokens, num_heads, head_dim], got {tuple(q.shape)}")
    num_tokens, _, head_dim = q.shape
    if head_dim % 2 != 0:
        raise ValueError(f"{who}: head_dim must be even, got {head_dim}")
    check_heads(who, "q", q, num_tokens, head_dim)
    check_heads(who, "k", k, num_tokens, head_dim)
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{who}: positions must be [{num_tokens}] int32/int64, "
            f"got {tuple(positions.shape)} {positions.dtype}"
        )
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.dtype != torch.float32:
        raise ValueError(
            f"{who}: cos_sin_cache must be [max_position, {head_dim}] fp32 "
            "(partial rotary is not supported), "
            f"got {tuple(cos_sin_cache.shape)} {cos_sin_cache.dtype}"
        )
    if cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"{who}: cos_sin_cache must have a contiguous last dimension")
    for name, t in (("positions", positions), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        if t.device != q.device:
            raise ValueError(f"{who}: {name} is on {t.device}, q on {q.device}")


def _launch(positions, q, k, v, cos_sin_cache, q_out, k_out, k_cache, v_cache, slot_mapping,
            store_k: bool = False, k_scale=None, v_scale=None) -> None:  # fmt: skip
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    write_cache = k_cache is not None
    cache_strides = k_cache.stride()[:3] if write_cache else (0, 0, 0)
    launcher(_rotary_kernel, q.device)[(num_tokens,)](
        positions,
        q,
        k,
        v if write_cache else k,
        cos_sin_cache,
        q_out,
        k_out if not write_cache else q_out,
        k_cache if write_cache else q_out,
        v_cache if write_cache else q_out,
        slot_mapping if write_cache else positions,
        positions if k_scale is None else k_scale,
        positions if v_scale is None else v_scale,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0) if write_cache else 0,
        v.stride(1) if write_cache else 0,
        cos_sin_cache.stride(0),
        *cache_strides,
        num_heads,
        num_kv_heads,
        head_dim // 2,
        k_cache.shape[1] if write_cache else 1,
        WRITE_CACHE=write_cache,
        STORE_K=store_k,
        KV_FP8=k_scale is not None,
        BLOCK_H=triton.next_power_of_2(max(num_heads, num_kv_heads)),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        num_warps=4,
    )


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int32/int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], head_dim contiguous (a view of qkv is fine)
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``rotary_embedding_reference``: new contiguous rotated q and k in their input dtypes.

    Positions are not range-checked (a device-to-host sync): one past ``max_position`` is a caller bug.
    """
    _check_rotary_inputs("rotary_embedding", positions, q, k, cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0] > 0:
        _launch(positions, q, k, None, cos_sin_cache, q_out, k_out, None, None, None)
    return q_out, k_out


def rotary_embedding_write_kv_cache(
    positions: torch.Tensor,  # [num_tokens] int32/int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim] fp32
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative = padding, nothing written
    rotate_k_in_place: bool = False,
    k_scale: torch.Tensor | None = None,  # FP8 cache only: 0-dim fp32 dequantization scales on q's device
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoPE fused with the cache write: returns the rotated q; stores rotated k and v at their slots.
    ``rotate_k_in_place``: ``k`` itself is overwritten with the rotated keys too (prefill attention then
    reads the step's keys from there).

    Same results as ``rotary_embedding_write_kv_cache_reference``; one launch instead of two and the
    rotated key never goes through memory. Padded rows (negative slot) still get a rotated q. An FP8 cache
    is written with the scales' values at run time (a captured CUDA graph reads them then).
    """
    who = "rotary_embedding_write_kv_cache"
    _check_rotary_inputs(who, positions, q, k, cos_sin_cache)
    num_tokens, _, head_dim = q.shape
    check_heads(who, "v", v, num_tokens, head_dim)
    if v.shape != k.shape:
        raise ValueError(f"{who}: v {tuple(v.shape)} must match k {tuple(k.shape)}")
    check_kv_cache(who, k_cache, v_cache, k.shape[1], head_dim)
    check_kv_scales(who, k_cache, k_scale, v_scale)
    check_slot_mapping(who, slot_mapping, num_tokens, q.device)
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{who}: {name} is on {t.device}, q on {q.device}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens > 0:
        _launch(positions, q, k, v, cos_sin_cache, q_out, None, k_cache, v_cache, slot_mapping,
                rotate_k_in_place, k_scale, v_scale)  # fmt: skip
    return q_out
