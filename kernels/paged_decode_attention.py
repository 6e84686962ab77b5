"""Paged DECODE attention: one query token per sequence, split-K over the context ("flash-decoding").

Work split, for ``num_partitions = cdiv(max_seq_len, PARTITION_SIZE)``::

    grid (num_seqs, num_kv_heads, num_partitions)
      program (s, g, p): the GROUP query heads of KV head g       q tile [GROUP_PAD, head_dim]
                         x the keys of sequence s in [p * PARTITION_SIZE, (p + 1) * PARTITION_SIZE)
                         read through the block table, BLOCK_N tokens per step (each token gathers
                         its block id: any block size, any block order)
                         -> partial max m, partial sum l, unnormalised output acc   (fp32)
    grid (num_seqs, num_heads)
      reduce: M = max_p m_p;  out = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p

Each KV block is read once per KV head, for all the query heads of its group (GQA). The group is padded
to ``GROUP_PAD = max(16, next_pow2(GROUP))`` rows because ``tl.dot`` needs 16 rows; the padded rows
are zeros and are never stored. With one partition the first kernel writes the output itself.
Scores are kept in base 2 (``scale * log2(e)`` folded in) so the kernel uses ``exp2``.

An FP8 (E4M3) cache is read as the query's dtype (exact) inside the tile loop; its per-layer scales are
folded in: ``k_scale`` into the score scale, ``v_scale`` into the output (the partial results of a split
carry it), so ``q . (k8 * k_scale) = (q . k8) * k_scale`` holds up to the rounding order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_checks import check_paged_inputs
from .launch import interpreting, launcher

LOG2E = 1.4426950408889634
DEFAULT_PARTITION_SIZE = 512
DEFAULT_BLOCK_N = 64
# NOTE: the partial results take num_seqs * num_heads * num_partitions * head_dim fp32; under a CUDA
# graph max_seq_len is max_model_len, so long contexts get longer partitions instead of more of them.
DEFAULT_MAX_PARTITIONS = 64


# NOTE: not specialized on what changes from one eager step to the next (the block table's width, the
# partition count and size), so a new batch does not compile the kernel again.
@triton.jit(
    do_not_specialize=["stride_block_table_seq", "num_partitions", "partition_size", "sliding_window"]
)
def _paged_decode_partition_kernel(
    q_ptr,  # [num_seqs, num_heads, HEAD_DIM]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, HEAD_DIM]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, HEAD_DIM]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_heads, HEAD_DIM] (used when not SPLIT)
    part_acc_ptr,  # [num_seqs, num_heads, num_partitions, HEAD_DIM] fp32 (used when SPLIT)
    part_max_ptr,  # [num_seqs, num_heads, num_partitions] fp32, base-2 logits
    part_sum_ptr,  # [num_seqs, num_heads, num_partitions] fp32
    k_scale_ptr,  # 0-dim fp32 (KV_FP8 only)
    v_scale_ptr,
    scale_log2,  # softmax scale * log2(e)
    stride_q_seq,
    stride_q_head,
    stride_out_seq,
    stride_out_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_block_table_seq,
    num_partitions,
    partition_size,  # keys per partition, a multiple of BLOCK_N
    block_size: tl.constexpr,  # NOTE: constexpr: `pos // block_size` becomes a shift
    sliding_window,  # keys at positions > query position - sliding_window are visible (USE_WINDOW only)
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    part_start = part * partition_size
    if (part_start >= seq_len) & (part > 0):
        return  # beyond this sequence; the reduction reads only its own partitions

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    row_valid = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )

    if KV_FP8:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)
    lo = part_start
    if USE_WINDOW:
        lo = tl.maximum(lo, seq_len - sliding_window)  # the query sits at position seq_len - 1
    hi = tl.minimum(part_start + partition_size, seq_len)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_block_table_seq
    head_offset = kv_head.to(tl.int64) * stride_cache_head

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    # NOTE: every tile below holds at least one visible key, for every row (all rows are the same
    # query position), so m_i is finite after the first tile and no -inf - -inf can appear.
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        key_valid = pos < hi
        block_ids = tl.load(block_table_row + pos // block_size, mask=key_valid, other=0).to(tl.int64)
        kv_offsets = block_ids * stride_cache_block + (pos % block_size) * stride_cache_slot + head_offset
        kv_ptrs = kv_offsets[:, None] + dims[None, :]
        k = tl.load(k_cache_ptr + kv_ptrs, mask=key_valid[:, None], other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(key_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_ptrs, mask=key_valid[:, None], other=0.0)
        if KV_FP8:
            v = v.to(q.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)
    if SPLIT:
        stat_offsets = (seq * tl.num_programs(1) * GROUP + heads).to(tl.int64) * num_partitions + part
        tl.store(part_max_ptr + stat_offsets, m_i, mask=row_valid)
        tl.store(part_sum_ptr + stat_offsets, l_i, mask=row_valid)
        tl.store(
            part_acc_ptr + stat_offsets[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_valid[:, None]
        )
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty sequence gives zeros
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None],
        )


@triton.jit(do_not_specialize=["num_partitions", "partition_size"])
def _paged_decode_reduce_kernel(
    out_ptr,  # [num_seqs, num_heads, HEAD_DIM]
    part_acc_ptr,  # [num_seqs, num_heads, num_partitions, HEAD_DIM] fp32
    part_max_ptr,  # [num_seqs, num_heads, num_partitions] fp32
    part_sum_ptr,  # [num_seqs, num_heads, num_partitions] fp32
    seq_lens_ptr,  # [num_seqs] int32
    stride_out_seq,
    stride_out_head,
    num_partitions,
    partition_size,
    HEAD_DIM: tl.constexpr,
    PARTS_PAD: tl.constexpr,  # a power of two >= num_partitions (fixed: one compile for every count)
    PART_CHUNK: tl.constexpr,  # partitions combined per step of the output loop
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_valid = (seq_len + partition_size - 1) // partition_size
    row = (seq * tl.num_programs(1) + head).to(tl.int64) * num_partitions

    parts = tl.arange(0, PARTS_PAD)
    m = tl.load(part_max_ptr + row + parts, mask=parts < num_valid, other=float("-inf"))
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no visible key at all: zeros, not NaN
    sums = tl.load(part_sum_ptr + row + parts, mask=parts < num_valid, other=0.0)
    total = tl.sum(sums * tl.exp2(m - m_max), 0)

    dims = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for chunk in range(0, num_valid, PART_CHUNK):
        ids = chunk + tl.arange(0, PART_CHUNK)
        valid = ids < num_valid
        weight = tl.exp2(tl.load(part_max_ptr + row + ids, mask=valid, other=float("-inf")) - m_max)
        part = tl.load(
            part_acc_ptr + (row + ids)[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0
        )
        acc += tl.sum(part * weight[:, None], 0)
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_out_seq + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty),
    )


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim] fp32 / fp16 / bf16
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], query's dtype or FP8
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: tokens in the cache, this step's included
    scale: float,
    sliding_window: int | None = None,
    *,
    k_scale: torch.Tensor | None = None,  # FP8 cache only: 0-dim fp32 dequantization scales
    v_scale: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    max_partitions: int = DEFAULT_MAX_PARTITIONS,
    block_n: int = DEFAULT_BLOCK_N,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim], query's dtype
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Attention of each sequence's single newest query over its paged K/V (Triton, split-K).

    Same result as ``paged_attention_reference`` with ``query_start_loc = [0, 1, ..., num_seqs]``.
    ``max_seq_len`` (an upper bound of ``seq_lens``) sets the number of partitions; without it one
    device-to-host sync reads it. The context is split into ``partition_size``-token partitions, the
    size doubled until there are at most ``max_partitions``. A sequence of length 0 gets zeros (padded
    CUDA-graph rows). An FP8 cache is dequantized with ``k_scale`` / ``v_scale``, read at run time.
    """
    who = "paged_decode_attention"
    num_seqs, num_heads, head_dim, kv_fp8 = check_paged_inputs(
        who, query, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale
    )
    if query.shape[0] != num_seqs:
        raise ValueError(
            f"{who}: query has {query.shape[0]} rows but seq_lens has {num_seqs} (one query each)"
        )
    num_kv_heads = k_cache.shape[2]
    if partition_size % block_n != 0 or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"{who}: block_n ({block_n}) must be a power of two >= 16 dividing partition_size")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"{who}: sliding_window must be positive, got {sliding_window}")
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(-1) != 1:
        raise ValueError(f"{who}: out must be {tuple(query.shape)} {query.dtype} with a contiguous last dim")
    if num_seqs == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())
    while triton.cdiv(max_seq_len, partition_size) > max_partitions:
        partition_size *= 2
    num_partitions = max(1, triton.cdiv(max_seq_len, partition_size))
    group = num_heads // num_kv_heads
    split = num_partitions > 1
    device = query.device
    if split:
        part_acc = torch.empty(
            num_seqs, num_heads, num_partitions, head_dim, dtype=torch.float32, device=device
        )
        part_max = torch.empty(num_seqs, num_heads, num_partitions, dtype=torch.float32, device=device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # unused
    launcher(_paged_decode_partition_kernel, device)[(num_seqs, num_kv_heads, num_partitions)](
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_acc,
        part_max,
        part_sum,
        k_scale if kv_fp8 else seq_lens,
        v_scale if kv_fp8 else seq_lens,
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        num_partitions,
        partition_size,
        k_cache.shape[1],
        sliding_window or 0,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        SPLIT=split,
        USE_WINDOW=sliding_window is not None,
        KV_FP8=kv_fp8,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=1 if interpreting(device) else num_stages,
    )
    if split:
        parts_pad = triton.next_power_of_2(max(max_partitions, num_partitions))
        launcher(_paged_decode_reduce_kernel, device)[(num_seqs, num_heads)](
            out,
            part_acc,
            part_max,
            part_sum,
            seq_lens,
            out.stride(0),
            out.stride(1),
            num_partitions,
            partition_size,
            HEAD_DIM=head_dim,
            PARTS_PAD=parts_pad,
            PART_CHUNK=min(parts_pad, 16),
            num_warps=4,
        )
    return out
