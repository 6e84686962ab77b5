"""Attention over a paged KV cache.

Memory layout, per layer::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset_in_block

A sequence's keys live in the blocks its block table names, in order; block 0 is the null block that
padded table entries point at. One step's tokens are first written into the cache by slot, then every
query attends over its sequence's cache, so tokens of one step that share cached blocks see each other.

An FP8 cache (``float8_e4m3fn``, ``kv_cache.py``) is read as ``fp8.float() * k_scale`` (and ``v_scale``).
"""

from __future__ import annotations

import torch

from .fp8 import FP8_DTYPE
from .kv_cache import write_kv_cache_reference  # noqa: F401  (re-exported: kernels.ops imports it here)
from .paged_decode_attention import DEFAULT_PARTITION_SIZE, paged_decode_attention
from .paged_prefill_attention import paged_prefill_attention


def paged_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: list[int],  # per sequence: tokens in the cache after this step (context + new)
    query_start_loc: list[int],  # [num_seqs + 1]: the sequence's queries are query[start[i]:start[i+1]]
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | float | None = None,  # FP8 cache only: the dequantization scales (fp32)
    v_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys and values.

    The queries of sequence i are its last ``q_len`` positions ``seq_len - q_len .. seq_len - 1``; each
    attends to the keys at positions up to its own (and, with a sliding window ``w``, above
    ``position - w``). GQA: query head h reads KV head ``h // (num_heads // num_kv_heads)``.
    Computed in fp32; the result has the query's dtype. An FP8 cache is dequantized as
    ``k_cache.float() * k_scale`` and ``v_cache.float() * v_scale``.
    """
    fp8 = k_cache.dtype == FP8_DTYPE
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("paged_attention_reference: an FP8 cache needs k_scale and v_scale")
    num_heads, head_dim = query.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    for i, seq_len in enumerate(seq_lens):
        q_start, q_end = query_start_loc[i], query_start_loc[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_seq_blocks = -(-seq_len // block_size)
        blocks = block_tables[i, :num_seq_blocks].long()
        k = k_cache.index_select(0, blocks).reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = v_cache.index_select(0, blocks).reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        if fp8:
            k, v = k * k_scale, v * v_scale
        q = query[q_start:q_end].float().view(q_len, num_kv_heads, group, head_dim)
        scores = torch.einsum("qkgd,tkd->kgqt", q, k) * scale  # [kv_heads, group, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=scores.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=scores.device).unsqueeze(0)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("kgqt,tkd->qkgd", probs, v)
        out[q_start:q_end] = o.reshape(q_len, num_heads, head_dim).to(query.dtype)
    return out


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, on query's device
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32, on query's device
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int,
    max_seq_len: int,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton form of ``paged_attention_reference``: the decode kernel when every sequence has one
    query token this step, the prefill kernel otherwise (mixed batches included).

    ``k_new``/``v_new`` (optional): this step's keys (rotated) and values, ``[num_tokens, num_kv_heads,
    head_dim]``, which the prefill kernel then reads directly instead of through the cache.
    ``max_query_len`` and ``max_seq_len`` are host-side bounds (``AttentionMetadata`` has them), so no
    device-to-host sync happens here. ``partition_size`` is the decode kernel's split-K partition.
    ``k_scale``/``v_scale``: an FP8 cache's dequantization scales (0-dim fp32 device tensors).
    """
    if max_query_len == 1 and query.shape[0] == seq_lens.shape[0]:
        return paged_decode_attention(
            query,
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            scale,
            sliding_window,
            max_seq_len=max_seq_len,
            partition_size=partition_size,
            k_scale=k_scale,
            v_scale=v_scale,
        )
    return paged_prefill_attention(
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        sliding_window,
        max_query_len=max_query_len,
        k_new=k_new,
        v_new=v_new,
        k_scale=k_scale,
        v_scale=v_scale,
    )
