"""Writing one step's K/V into the paged cache by slot.

::

    key/value [num_tokens, num_kv_heads, head_dim]          slot_mapping [num_tokens] int64
                │ token t                                    slot = block_id * block_size + offset
                ▼
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]
                     [slot // block_size, slot % block_size]   (a negative slot: padding, nothing written)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launcher

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def write_kv_cache_reference(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; rows with a negative slot are padding and skipped
) -> None:
    """Store each token's K/V at its slot (in place)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_blocks, block_size = k_cache.shape[:2]
    k_flat = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
    v_flat = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    k_flat.index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value[keep].to(v_cache.dtype))


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
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
    if k_cache.dtype not in FLOAT_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"{who}: caches must both be fp32, fp16 or bf16, got {k_cache.dtype}/{v_cache.dtype}"
        )
    if k_cache.stride(-1) != 1:
        raise ValueError(f"{who}: the caches' head_dim must be contiguous")


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
        num_warps=4,
    )
