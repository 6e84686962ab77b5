"""Paged PREFILL attention: varlen, causal, several query tokens per sequence (chunked prefill,
prefix-cache hits), every key and value read from the paged cache through the block table.

Sequence i's queries are ``query[query_start_loc[i] : query_start_loc[i + 1]]``, the last ``q_len``
positions of its ``seq_len`` cached tokens (this step's K/V already written), so query token t sits at
absolute position ``seq_len - q_len + t`` and sees keys ``<=`` that position (and ``> position - w``
with a sliding window w).

Work split (GQA packed into the rows of one tile, so each K/V tile is read once for the group)::

    grid (cdiv(max_query_len, BLOCK_Q), num_kv_heads, num_seqs)     heaviest query blocks first
      program (b, g, s): rows r = 0 .. BLOCK_M-1  ->  query token b * BLOCK_Q + r // GROUP,
                                                       query head  g * GROUP + r % GROUP
                         (BLOCK_Q = BLOCK_M // GROUP tokens; leftover rows are padding)
      keys in tiles of BLOCK_N, flash-attention online softmax in fp32 with tl.dot:
        phase 1: tiles every row may see whole (no causal mask)
        phase 2: the tiles on the diagonal, masked by absolute position
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_checks import check_index_tensor, check_paged_inputs
from .launch import interpreting, launcher

LOG2E = 1.4426950408889634


@triton.jit
def _paged_prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, HEAD_DIM]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, HEAD_DIM]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32: cached tokens after this step
    query_start_loc_ptr,  # [num_seqs + 1] int32
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    scale_log2,  # softmax scale * log2(e)
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_block_table_seq,
    block_size: tl.constexpr,  # NOTE: constexpr: `pos // block_size` becomes a shift
    sliding_window,  # USE_WINDOW only
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per program = BLOCK_M // GROUP
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)  # NOTE: the longest causal rows start first
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_token = q_block * BLOCK_Q
    if first_token >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # the absolute position of query token 0

    rows = tl.arange(0, BLOCK_M)
    token = first_token + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (token < q_len)
    q_pos = context_len + token  # [BLOCK_M] absolute positions
    dims = tl.arange(0, HEAD_DIM)
    q_offsets = (q_start + token).to(tl.int64) * stride_q_token + heads * stride_q_head
    q = tl.load(q_ptr + q_offsets[:, None] + dims[None, :], mask=row_valid[:, None], other=0.0)

    min_pos = context_len + first_token
    max_pos = context_len + tl.minimum(first_token + BLOCK_Q, q_len) - 1
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(min_pos - sliding_window + 1, 0)
    # Keys below min_pos + 1 are visible to every row (causally); whole tiles of them need no mask.
    full_hi = lo + tl.maximum(min_pos + 1 - lo, 0) // BLOCK_N * BLOCK_N
    hi = max_pos + 1

    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_block_table_seq
    head_offset = kv_head.to(tl.int64) * stride_cache_head
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # Phase 1: tiles entirely at or below every row's position.
    for start in range(lo, full_hi, BLOCK_N):
        pos = start + offs_n
        block_ids = tl.load(block_table_row + pos // block_size).to(tl.int64)
        kv_ptrs = (block_ids * stride_cache_block + (pos % block_size) * stride_cache_slot + head_offset)[
            :, None
        ] + dims[None, :]
        k = tl.load(k_cache_ptr + kv_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if USE_WINDOW:
            s = tl.where(pos[None, :] > q_pos[:, None] - sliding_window, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if USE_WINDOW:  # a row may see nothing in this tile yet: keep -inf - -inf out
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # Phase 2: the diagonal tiles, masked by absolute position.
    for start in range(full_hi, hi, BLOCK_N):
        pos = start + offs_n
        key_valid = pos < hi
        block_ids = tl.load(block_table_row + pos // block_size, mask=key_valid, other=0).to(tl.int64)
        kv_ptrs = (block_ids * stride_cache_block + (pos % block_size) * stride_cache_slot + head_offset)[
            :, None
        ] + dims[None, :]
        k = tl.load(k_cache_ptr + kv_ptrs, mask=key_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = pos[None, :] <= q_pos[:, None]
        if USE_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows see nothing
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_ptrs, mask=key_valid[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_offsets = (q_start + token).to(tl.int64) * stride_out_token + heads * stride_out_head
    tl.store(
        out_ptr + out_offsets[:, None] + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


def default_prefill_blocks(head_dim: int, group: int, on_gpu: bool, dtype_bytes: int = 2) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)``. GPU: 128 x 128 for 16-bit inputs up to head_dim 128 (the fastest of the sweep
    in benchmarks/results/attention-h200.json), 64 x 32 for fp32 or head_dim 256 (shared memory).
    Interpreted: 16-row tiles, which the interpreter runs fastest."""
    if not on_gpu:
        return max(16, triton.next_power_of_2(group)), 16
    block_m, block_n = 128, 128
    if dtype_bytes > 2 or head_dim > 128:
        block_m, block_n = 64, 32
    return max(block_m, triton.next_power_of_2(group)), block_n


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim] fp32 / fp16 / bf16
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], query's dtype
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: tokens in the cache, this step's included
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim], query's dtype
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its paged K/V (Triton, flash-attention style).

    Same result as ``paged_attention_reference``. ``max_query_len`` (an upper bound of the query
    lengths) sets the grid; without it one device-to-host sync reads it. Queries whose sequence has
    fewer keys than queries (``seq_len < q_len``) are a caller bug and are not detected.
    """
    who = "paged_prefill_attention"
    num_seqs, num_heads, head_dim = check_paged_inputs(who, query, k_cache, v_cache, block_tables, seq_lens)
    check_index_tensor(who, "query_start_loc", query_start_loc, (num_seqs + 1,), query.device)
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"{who}: sliding_window must be positive, got {sliding_window}")
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    on_gpu = not interpreting(query.device)
    default_m, default_n = default_prefill_blocks(head_dim, group, on_gpu, query.element_size())
    block_m, block_n = block_m or default_m, block_n or default_n
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{who}: {name} must be a power of two >= 16, got {value}")
    if block_m < group:
        raise ValueError(f"{who}: block_m ({block_m}) must hold at least one token's {group} query heads")
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(-1) != 1:
        raise ValueError(f"{who}: out must be {tuple(query.shape)} {query.dtype} with a contiguous last dim")
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    block_q = block_m // group
    grid = (triton.cdiv(max_query_len, block_q), num_kv_heads, num_seqs)
    launcher(_paged_prefill_kernel, query.device)[grid](
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        k_cache.shape[1],
        sliding_window or 0,
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        USE_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps or (8 if block_m >= 128 else 4),
        num_stages=num_stages or (2 if on_gpu else 1),
    )
    return out
