"""Paged PREFILL attention: varlen, causal, several query tokens per sequence (chunked prefill,
prefix-cache hits). Keys and values come from the paged cache through the block table, or (``k_new`` /
``v_new`` given) the cached prefix from the cache and this step's own keys from the step's contiguous
K/V rows (on Hopper through TMA descriptors).

Sequence i's queries are ``query[query_start_loc[i] : query_start_loc[i + 1]]``, the last ``q_len``
positions of its ``seq_len`` cached tokens (this step's K/V already written), so query token t sits at
absolute position ``seq_len - q_len + t`` and sees keys ``<=`` that position (and ``> position - w``
with a sliding window w).

Work split (GQA packed into the rows of one tile, so each K/V tile is read once for the group)::

    grid (num_kv_heads, cdiv(max_query_len, BLOCK_Q), num_seqs)   heads fastest, heaviest blocks first
      program (g, b, s): rows r = 0 .. BLOCK_M-1  ->  query token b * BLOCK_Q + r // GROUP,
                                                       query head  g * GROUP + r % GROUP
                         (BLOCK_Q = BLOCK_M // GROUP tokens; leftover rows are padding)
      keys in tiles of BLOCK_N, flash-attention online softmax in fp32 with tl.dot (exp2, the scale
      folded into one FMA):
        tiles every row may see whole: no causal mask
        the tiles on the diagonal (and a partial prefix tile): masked by absolute position

An FP8 (E4M3) cache is read as the query's dtype (exact) inside the tile loop, ``k_scale`` folded into the
score scale and ``v_scale`` into the output; every key then comes from the cache (no ``k_new``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_checks import check_index_tensor, check_paged_inputs
from .launch import interpreting, launcher

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(q, k, v, acc, m_i, l_i, visible, scale_log2, MASKED: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One key tile of the online softmax. ``visible`` is only read when MASKED."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    # NOTE: scores stay unscaled; scale * log2(e) is folded into one FMA with the max below.
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    if MASKED:  # a row may see nothing in this tile yet: keep -inf - -inf out
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# NOTE: the block table's width (its row stride) changes with every eager step: specialized on it, the
# kernel would compile again (2 s on an H200) at the first request of a new width class.
@triton.jit(do_not_specialize=["stride_block_table_seq", "sliding_window"])
def _paged_prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, HEAD_DIM]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, HEAD_DIM]
    k_new,  # NEW_KV: [num_tokens, num_kv_heads, HEAD_DIM] pointer, or (USE_TMA) a 2-D tensor descriptor
    v_new,
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32: cached tokens after this step
    query_start_loc_ptr,  # [num_seqs + 1] int32
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    k_scale_ptr,  # 0-dim fp32 (KV_FP8 only)
    v_scale_ptr,
    scale_log2,  # softmax scale * log2(e)
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_new_token,  # NEW_KV without TMA
    stride_new_head,
    stride_block_table_seq,
    block_size: tl.constexpr,  # NOTE: constexpr: `pos // block_size` becomes a shift
    sliding_window,  # USE_WINDOW only
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per program = BLOCK_M // GROUP
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    NEW_KV: tl.constexpr,
    USE_TMA: tl.constexpr,
    KV_FP8: tl.constexpr,  # the cache is FP8 (never with NEW_KV)
    DOT_PRECISION: tl.constexpr,
):
    # NOTE: KV heads vary fastest and the longest causal rows start first, so the first wave holds the
    # heaviest query blocks of every head and the short ones fill the tail.
    kv_head = tl.program_id(0)
    q_block = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_token = q_block * BLOCK_Q
    if first_token >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # the absolute position of query token 0
    last_token = tl.minimum(first_token + BLOCK_Q, q_len) - 1

    rows = tl.arange(0, BLOCK_M)
    token = first_token + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (token < q_len)
    q_pos = context_len + token  # [BLOCK_M] absolute positions
    dims = tl.arange(0, HEAD_DIM)
    q_offsets = (q_start + token).to(tl.int64) * stride_q_token + heads * stride_q_head
    q = tl.load(q_ptr + q_offsets[:, None] + dims[None, :], mask=row_valid[:, None], other=0.0)

    if KV_FP8:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)
    min_pos = context_len + first_token
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(min_pos - sliding_window + 1, 0)

    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_block_table_seq
    head_offset = kv_head.to(tl.int64) * stride_cache_head
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # Keys read through the block table: with NEW_KV the cached prefix [lo, context_len), which every
    # query sees whole; else every key, diagonal included.
    if NEW_KV:
        cache_hi = tl.maximum(context_len, lo)
        full_hi = lo + (cache_hi - lo) // BLOCK_N * BLOCK_N
    else:
        cache_hi = context_len + last_token + 1
        # Keys below min_pos + 1 are visible to every row (causally); whole tiles of them need no mask.
        full_hi = lo + tl.maximum(min_pos + 1 - lo, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, full_hi, BLOCK_N):
        pos = start + offs_n
        block_ids = tl.load(block_table_row + pos // block_size).to(tl.int64)
        kv_ptrs = (block_ids * stride_cache_block + (pos % block_size) * stride_cache_slot + head_offset)[
            :, None
        ] + dims[None, :]
        k = tl.load(k_cache_ptr + kv_ptrs)
        v = tl.load(v_cache_ptr + kv_ptrs)
        if KV_FP8:
            k, v = k.to(q.dtype), v.to(q.dtype)
        visible = pos[None, :] > q_pos[:, None] - sliding_window
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, visible, scale_log2, USE_WINDOW, DOT_PRECISION)
    for start in range(full_hi, cache_hi, BLOCK_N):  # the masked tail (the diagonal without NEW_KV)
        pos = start + offs_n
        key_valid = pos < cache_hi
        block_ids = tl.load(block_table_row + pos // block_size, mask=key_valid, other=0).to(tl.int64)
        kv_ptrs = (block_ids * stride_cache_block + (pos % block_size) * stride_cache_slot + head_offset)[
            :, None
        ] + dims[None, :]
        k = tl.load(k_cache_ptr + kv_ptrs, mask=key_valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_ptrs, mask=key_valid[:, None], other=0.0)
        if KV_FP8:
            k, v = k.to(q.dtype), v.to(q.dtype)
        visible = key_valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - sliding_window)
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, visible, scale_log2, True, DOT_PRECISION)

    if NEW_KV:
        # This step's keys, read from the step's own K/V rows: token j of the sequence is row q_start + j.
        j_lo = tl.maximum(lo - context_len, 0)
        j_full = j_lo + tl.maximum(first_token + 1 - j_lo, 0) // BLOCK_N * BLOCK_N
        new_offset = kv_head.to(tl.int64) * stride_new_head
        for j in range(j_lo, j_full, BLOCK_N):
            if USE_TMA:
                k = k_new.load([q_start + j, kv_head * HEAD_DIM])
                v = v_new.load([q_start + j, kv_head * HEAD_DIM])
            else:
                new_ptrs = ((q_start + j + offs_n).to(tl.int64) * stride_new_token + new_offset)[
                    :, None
                ] + dims[None, :]
                k = tl.load(k_new + new_ptrs)
                v = tl.load(v_new + new_ptrs)
            pos = context_len + j + offs_n
            visible = pos[None, :] > q_pos[:, None] - sliding_window
            acc, m_i, l_i = _softmax_step(
                q, k, v, acc, m_i, l_i, visible, scale_log2, USE_WINDOW, DOT_PRECISION
            )
        for j in range(j_full, last_token + 1, BLOCK_N):  # the diagonal
            key_valid = j + offs_n <= last_token
            if USE_TMA:
                # Rows past the step's tokens read as zeros; rows of the next sequence are masked below.
                k = k_new.load([q_start + j, kv_head * HEAD_DIM])
                v = v_new.load([q_start + j, kv_head * HEAD_DIM])
            else:
                new_ptrs = ((q_start + j + offs_n).to(tl.int64) * stride_new_token + new_offset)[
                    :, None
                ] + dims[None, :]
                k = tl.load(k_new + new_ptrs, mask=key_valid[:, None], other=0.0)
                v = tl.load(v_new + new_ptrs, mask=key_valid[:, None], other=0.0)
            pos = context_len + j + offs_n
            visible = key_valid[None, :] & (pos[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                visible = visible & (pos[None, :] > q_pos[:, None] - sliding_window)
            acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, visible, scale_log2, True, DOT_PRECISION)

    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_offsets = (q_start + token).to(tl.int64) * stride_out_token + heads * stride_out_head
    tl.store(
        out_ptr + out_offsets[:, None] + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


def _tma_ok(k_new: torch.Tensor, v_new: torch.Tensor, on_gpu: bool) -> bool:
    """Whether the step's K/V rows can be read through 2-D TMA descriptors ``[num_tokens, kv_heads * D]``."""
    if not on_gpu or torch.cuda.get_device_capability(k_new.device)[0] < 9:
        return False
    size = k_new.element_size()
    return all(
        t.stride(1) == t.shape[2] and t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0
        for t in (k_new, v_new)
    )


# Queries up to this long (a step's longest) take the small tiles on the GPU (see default_prefill_blocks).
SHORT_QUERY_TOKENS = 1536


def default_prefill_blocks(
    head_dim: int, group: int, on_gpu: bool, dtype_bytes: int = 2, max_query_len: int | None = None
) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)``. GPU: 128 x 128 for 16-bit inputs up to head_dim 128 and queries longer than
    ``SHORT_QUERY_TOKENS`` (with 3 stages the fastest for one 4,096-token prompt in
    benchmarks/results/attention-h200.json); 64 x 32 for shorter queries, fp32 or head_dim 256 (shared
    memory). Short prompts in 128 x 128 tiles (one program per SM, most of a diagonal tile masked) ran at
    57 TFLOP/s for 128 prompts of 128 tokens on an H200; 64 x 32 tiles ran them 2.0x faster, 32 prompts of
    467 tokens 1.55x, 16 of 1,024 1.24x (348 against 280 TFLOP/s), 8 of 1,536 1.09x; from 2,048 tokens the
    large tiles win (8 x 2,048: 391 against 381; 4 x 4,096: 471 against 405) (sweeps of 2026-11-21, 8B
    shapes, bf16).
    Interpreted: 16-row tiles, which the interpreter runs fastest."""
    if not on_gpu:
        return max(16, triton.next_power_of_2(group)), 16
    block_m, block_n = 128, 128
    short = max_query_len is not None and max_query_len <= SHORT_QUERY_TOKENS
    if dtype_bytes > 2 or head_dim > 128 or short:
        block_m, block_n = 64, 32
    return max(block_m, triton.next_power_of_2(group)), block_n


def _default_stages(block_m: int, block_n: int, head_dim: int, dtype_bytes: int, on_gpu: bool) -> int:
    """3 pipeline stages where the K/V tiles of 3 stages and the Q tile fit in Hopper's 227 KB of shared
    memory (128 x 128 16-bit tiles at d128: 3 x 64 KB + 32 KB), else 2; 1 interpreted."""
    if not on_gpu:
        return 1
    smem = (3 * 2 * block_n + block_m) * head_dim * dtype_bytes
    return 3 if smem <= 227 * 1024 else 2


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim] fp32 / fp16 / bf16
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], query's dtype or FP8
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: tokens in the cache, this step's included
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    sliding_window: int | None = None,
    *,
    k_scale: torch.Tensor | None = None,  # FP8 cache only: 0-dim fp32 dequantization scales
    v_scale: torch.Tensor | None = None,
    max_query_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim], query's dtype
    k_new: torch.Tensor | None = None,  # [num_tokens, num_kv_heads, head_dim]: this step's keys (rotated)
    v_new: torch.Tensor | None = None,  # [num_tokens, num_kv_heads, head_dim]: this step's values
    use_tma: bool | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its paged K/V (Triton, flash-attention style).

    Same result as ``paged_attention_reference``. ``max_query_len`` (an upper bound of the query
    lengths) sets the grid; without it one device-to-host sync reads it. Queries whose sequence has
    fewer keys than queries (``seq_len < q_len``) are a caller bug and are not detected.

    ``k_new``/``v_new``: the step's own keys and values (the rows the cache write stored, same values),
    read from these contiguous rows instead of through the block table; the cache then serves only the
    prefix before the step. ``use_tma`` (default: on Hopper and newer when the rows are 16-byte aligned)
    reads them with the tensor-memory accelerator through host-side descriptors. An FP8 cache (dequantized
    with ``k_scale`` / ``v_scale``, read at run time) takes no ``k_new``: every key comes from the cache.
    """
    who = "paged_prefill_attention"
    num_seqs, num_heads, head_dim, kv_fp8 = check_paged_inputs(
        who, query, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale
    )
    check_index_tensor(who, "query_start_loc", query_start_loc, (num_seqs + 1,), query.device)
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"{who}: sliding_window must be positive, got {sliding_window}")
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    on_gpu = not interpreting(query.device)
    if max_query_len is None and num_seqs and query.shape[0]:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    default_m, default_n = default_prefill_blocks(
        head_dim, group, on_gpu, query.element_size(), max_query_len
    )
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
    block_q = block_m // group
    new_kv = k_new is not None
    if new_kv != (v_new is not None):
        raise ValueError(f"{who}: k_new and v_new go together")
    if new_kv and kv_fp8:
        raise ValueError(f"{who}: an FP8 cache takes no k_new / v_new (the step's keys are read quantized)")
    if new_kv:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t.shape != (query.shape[0], num_kv_heads, head_dim) or t.dtype != query.dtype:
                raise ValueError(f"{who}: {name} must be [{query.shape[0]}, {num_kv_heads}, {head_dim}] "
                                 f"{query.dtype}, got {tuple(t.shape)} {t.dtype}")  # fmt: skip
            if t.stride(2) != 1 or t.device != query.device:
                raise ValueError(f"{who}: {name} must be on the query's device with a contiguous last dim")
        if v_new.stride() != k_new.stride():
            raise ValueError(f"{who}: k_new and v_new must have the same strides")
        if use_tma is None:
            use_tma = _tma_ok(k_new, v_new, on_gpu)
        elif use_tma and not _tma_ok(k_new, v_new, on_gpu):
            raise ValueError(f"{who}: use_tma needs a CUDA device of compute capability 9+, rows of "
                             "[num_kv_heads * head_dim] contiguous elements and 16-byte aligned rows")  # fmt: skip
    use_tma = bool(new_kv and use_tma)
    k_arg, v_arg = (k_new, v_new) if new_kv else (query, query)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_arg, v_arg = (
            TensorDescriptor(t, [t.shape[0], num_kv_heads * head_dim], [t.stride(0), 1], [block_n, head_dim])
            for t in (k_new, v_new)
        )
    grid = (num_kv_heads, triton.cdiv(max_query_len, block_q), num_seqs)
    launcher(_paged_prefill_kernel, query.device)[grid](
        query,
        k_cache,
        v_cache,
        k_arg,
        v_arg,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
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
        k_new.stride(0) if new_kv else 0,
        k_new.stride(1) if new_kv else 0,
        block_tables.stride(0),
        k_cache.shape[1],
        sliding_window or 0,
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        USE_WINDOW=sliding_window is not None,
        NEW_KV=new_kv,
        USE_TMA=use_tma,
        KV_FP8=kv_fp8,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps or (8 if block_m >= 128 else 4),
        num_stages=num_stages or _default_stages(block_m, block_n, head_dim, query.element_size(), on_gpu),
    )
    return out
