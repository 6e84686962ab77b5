"""Writing one step's K/V into the paged cache by slot, in the model's dtype or as FP8 (E4M3).

::

    key/value [num_tokens, num_kv_heads, head_dim]          slot_mapping [num_tokens] int64
                │ token t                                    slot = block_id * block_size + offset
                ▼
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]
                     [slot // block_size, slot % block_size]   (a negative slot: padding, nothing written)

An FP8 cache (``torch.float8_e4m3fn``) has one fp32 dequantization scale per layer for K and one for V
(``real = fp8 * scale``): a value is stored as ``clamp(x.float() / scale, -448, 448)`` rounded to E4M3
(nearest, ties to even; ``quantize_fp8_reference``), and attention reads ``fp8.float() * scale``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import FLOAT_DTYPES, FP8_DTYPE, FP8_MAX, quantize_e4m3
from .launch import launcher

CACHE_DTYPES = (*FLOAT_DTYPES, FP8_DTYPE)


def quantize_fp8_reference(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x`` as FP8 K/V with dequantization ``scale``: ``clamp(x.float() / scale, -448, 448)`` in E4M3."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def write_kv_cache_reference(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; rows with a negative slot are padding and skipped
    k_scale: torch.Tensor | float | None = None,  # an FP8 cache's dequantization scales (fp32)
    v_scale: torch.Tensor | float | None = None,
) -> None:
    """Store each token's K/V at its slot (in place); quantized with ``k_scale`` / ``v_scale`` into an FP8
    cache."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_blocks, block_size = k_cache.shape[:2]
    k_flat = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
    v_flat = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    if k_cache.dtype == FP8_DTYPE:
        if k_scale is None or v_scale is None:
            raise ValueError("write_kv_cache_reference: an FP8 cache needs k_scale and v_scale")
        # NOTE: index_copy_ has no float8 kernel on the CPU: copy the bytes.
        k_flat.view(torch.uint8).index_copy_(
            0, slots, quantize_fp8_reference(key[keep], k_scale).view(torch.uint8)
        )
        v_flat.view(torch.uint8).index_copy_(
            0, slots, quantize_fp8_reference(value[keep], v_scale).view(torch.uint8)
        )
        return
    k_flat.index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value[keep].to(v_cache.dtype))


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    k_scale_ptr,  # 0-dim fp32 (KV_FP8 only)
    v_scale_ptr,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    num_kv_heads,
    head_dim,
    block_size,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    # NOTE: a padded row (negative slot) masks every load and store instead of returning early.
    # NOTE: `block & (scalar >= 0)` comes out int32 in Triton's interpreter: compare a block instead.
    mask = (heads < num_kv_heads) & (dims < head_dim) & (heads * 0 + slot >= 0)
    k = tl.load(key_ptr + token * stride_key_token + heads * stride_key_head + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_value_token + heads * stride_value_head + dims, mask=mask)
    if KV_FP8:
        k = quantize_e4m3(k.to(tl.float32), tl.load(k_scale_ptr))
        v = quantize_e4m3(v.to(tl.float32), tl.load(v_scale_ptr))
    cache_offset = (
        (slot // block_size) * stride_cache_block
        + (slot % block_size) * stride_cache_slot
        + heads * stride_cache_head
        + dims
    )
    tl.store(k_cache_ptr + cache_offset, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offset, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_kv_cache(
    who: str, k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int
) -> None:
    """Raise ValueError unless the caches are ``[num_blocks, block_size, num_kv_heads, head_dim]`` twins."""
    if k_cache.dim() != 4 or k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"{who}: k_cache must be [num_blocks, block_size, {num_kv_heads}, {head_dim}], "
            f"got {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"{who}: v_cache must have k_cache's shape and strides")
    if k_cache.dtype not in CACHE_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"{who}: caches must both be fp32, fp16, bf16 or float8_e4m3fn, got {k_cache.dtype}/{v_cache.dtype}"
        )
    if k_cache.stride(-1) != 1:
        raise ValueError(f"{who}: the caches' head_dim must be contiguous")


def check_kv_scales(
    who: str, k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> bool:
    """Whether the cache is FP8; raise ValueError unless its scales are given as one-element fp32 tensors on
    its device (read by the kernels at run time, so a captured CUDA graph sees their current value), and
    only then."""
    fp8 = k_cache.dtype == FP8_DTYPE
    if not fp8:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"{who}: k_scale / v_scale go with a float8_e4m3fn cache only")
        return False
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
            raise ValueError(f"{who}: an FP8 cache needs {name} as a one-element fp32 tensor, got {t!r}")
        if t.device != k_cache.device:
            raise ValueError(f"{who}: {name} is on {t.device}, the cache on {k_cache.device}")
    return True


def check_slot_mapping(who: str, slot_mapping: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype != torch.int64:
        raise ValueError(
            f"{who}: slot_mapping must be [{num_tokens}] int64, "
            f"got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if slot_mapping.device != device:
        raise ValueError(f"{who}: slot_mapping is on {slot_mapping.device}, expected {device}")


def check_heads(who: str, name: str, t: torch.Tensor, num_tokens: int, head_dim: int) -> None:
    """Raise ValueError unless ``t`` is ``[num_tokens, heads, head_dim]`` float with a contiguous last dim."""
    if t.dim() != 3 or t.shape[0] != num_tokens or t.shape[2] != head_dim:
        raise ValueError(f"{who}: {name} must be [{num_tokens}, heads, {head_dim}], got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{who}: {name} must be fp32, fp16 or bf16, got {t.dtype}")
    if t.stride(-1) != 1:
        raise ValueError(f"{who}: {name} must have a contiguous last dimension (head_dim)")


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative = padding, skipped
    k_scale: torch.Tensor | None = None,  # FP8 cache only: 0-dim fp32 dequantization scales
    v_scale: torch.Tensor | None = None,
) -> None:
    """Triton ``write_kv_cache_reference``: store each token's K/V at its slot (in place).

    Slots are not range-checked (that would need a device-to-host sync): a slot past the cache is a
    caller bug, as in the reference's ``index_copy_``.
    """
    who = "write_kv_cache"
    if key.dim() != 3:
        raise ValueError(f"{who}: key must be [num_tokens, num_kv_heads, head_dim], got {tuple(key.shape)}")
    num_tokens, num_kv_heads, head_dim = key.shape
    check_heads(who, "key", key, num_tokens, head_dim)
    check_heads(who, "value", value, num_tokens, head_dim)
    if value.shape != key.shape:
        raise ValueError(f"{who}: value {tuple(value.shape)} must match key {tuple(key.shape)}")
    check_kv_cache(who, k_cache, v_cache, num_kv_heads, head_dim)
    fp8 = check_kv_scales(who, k_cache, k_scale, v_scale)
    check_slot_mapping(who, slot_mapping, num_tokens, key.device)
    for name, t in (("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != key.device:
            raise ValueError(f"{who}: {name} is on {t.device}, key on {key.device}")
    if num_tokens == 0:
        return
    launcher(_write_kv_cache_kernel, key.device)[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale if fp8 else slot_mapping,
        v_scale if fp8 else slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        num_kv_heads,
        head_dim,
        k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        KV_FP8=fp8,
        num_warps=4,
    )
