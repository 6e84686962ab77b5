"""Input checks shared by the paged attention kernels (decode and prefill): clear ValueErrors."""

from __future__ import annotations

import torch

from .fp8 import FP8_DTYPE
from .kv_cache import check_heads, check_kv_cache, check_kv_scales


def check_index_tensor(
    who: str, name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device
) -> None:
    """Raise ValueError unless ``t`` is a contiguous int32 tensor of ``shape`` on ``device``."""
    if t.shape != shape or t.dtype != torch.int32:
        raise ValueError(f"{who}: {name} must be {list(shape)} int32, got {list(t.shape)} {t.dtype}")
    if t.device != device:
        raise ValueError(f"{who}: {name} is on {t.device}, query on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{who}: {name} must be contiguous")


def check_paged_inputs(
    who: str,
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    k_scale: torch.Tensor | None = None,  # FP8 cache only: one-element fp32 tensors on the device
    v_scale: torch.Tensor | None = None,
) -> tuple[int, int, int, bool]:
    """Validate the common inputs; return ``(num_seqs, num_heads, head_dim, kv_fp8)``: the cache is the
    query's dtype, or FP8 (E4M3) with its dequantization scales."""
    if query.dim() != 3:
        raise ValueError(f"{who}: query must be [num_tokens, num_heads, head_dim], got {tuple(query.shape)}")
    num_tokens, num_heads, head_dim = query.shape
    check_heads(who, "query", query, num_tokens, head_dim)
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"{who}: head_dim must be a power of two in [16, 256], got {head_dim}")
    if k_cache.dim() != 4:
        raise ValueError(f"{who}: k_cache must be [num_blocks, block_size, num_kv_heads, head_dim]")
    num_kv_heads = k_cache.shape[2]
    check_kv_cache(who, k_cache, v_cache, num_kv_heads, head_dim)
    if k_cache.dtype not in (query.dtype, FP8_DTYPE):
        raise ValueError(
            f"{who}: the caches ({k_cache.dtype}) must have the query's dtype ({query.dtype}) or be "
            "float8_e4m3fn"
        )
    kv_fp8 = check_kv_scales(who, k_cache, k_scale, v_scale)
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"{who}: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != query.device:
            raise ValueError(f"{who}: {name} is on {t.device}, query on {query.device}")
    if seq_lens.dim() != 1:
        raise ValueError(f"{who}: seq_lens must be [num_seqs] int32, got shape {tuple(seq_lens.shape)}")
    num_seqs = seq_lens.shape[0]
    check_index_tensor(who, "seq_lens", seq_lens, (num_seqs,), query.device)
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"{who}: block_tables must be [{num_seqs}, max_blocks] int32, got {tuple(block_tables.shape)}"
        )
    check_index_tensor(who, "block_tables", block_tables, tuple(block_tables.shape), query.device)
    return num_seqs, num_heads, head_dim, kv_fp8
