"""Paged prefill attention (varlen, causal) and the decode/prefill dispatch, against the reference."""

from __future__ import annotations

import pytest
import torch

from inflight.kernels.paged_attention import paged_attention, paged_attention_reference
from inflight.kernels.paged_prefill_attention import paged_prefill_attention

from .conftest import ATTENTION_TOL, assert_close
from .paged_cases import make_paged_case

# (num_heads, num_kv_heads, head_dim, block_size, seq_lens, query_lens, sliding_window, block_m, block_n)
CASES = {
    # SmolLM2's 9/3 heads, whole prompts from position 0.
    "smollm2-full-prompts": (9, 3, 64, 16, [23, 40], [23, 40], None, None, None),
    # Chunked prefill (queries start mid-sequence after a cached prefix), a decode row, an empty row.
    "chunked-mixed": (12, 3, 64, 16, [50, 37, 9, 30], [18, 1, 9, 0], None, None, None),
    # Group 8 (BLOCK_Q = 2 tokens per 16-row tile), a prefix-cache hit of 32 tokens.
    "gqa8-prefix-hit": (8, 1, 64, 16, [45], [13], None, None, None),
    # MHA, head_dim 128, a block size of 5.
    "mha-d128-block5": (6, 6, 128, 5, [33, 19], [13, 19], None, None, None),
    # Sliding window shorter than the prompt, with a cached prefix.
    "window": (8, 2, 64, 16, [60, 41], [35, 41], 13, None, None),
    # Larger tiles: unmasked phase-1 tiles and diagonal tiles in one program, window on.
    "big-tiles-window": (4, 2, 64, 16, [70, 64], [50, 64], 40, 32, 16),
    "big-tiles": (4, 2, 64, 16, [70, 64], [50, 64], None, 32, 32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(device, dtype, name) -> None:
    num_heads, num_kv_heads, head_dim, block_size, seq_lens, query_lens, window, block_m, block_n = CASES[
        name
    ]
    case = make_paged_case(num_heads, num_kv_heads, head_dim, block_size, seq_lens, query_lens, dtype, device)
    scale = head_dim**-0.5
    out = paged_prefill_attention(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens_t(),
        case.query_start_loc_t(),
        scale,
        window,
        block_m=block_m,
        block_n=block_n,
    )
    ref = paged_attention_reference(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
        scale,
        window,
    )
    assert_close(out, ref, ATTENTION_TOL[dtype])


def step_kv(case, poison_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's K/V rows as strided views of one ``[T, q | k | v]`` buffer (like the qkv projection's
    output); with ``poison_cache`` their cache slots become NaN, so reading them there fails the test."""
    num_kv_heads, head_dim = case.k_cache.shape[2:]
    block_size = case.k_cache.shape[1]
    num_tokens = case.query.shape[0]
    buf = torch.randn(
        num_tokens, 3 * num_kv_heads * head_dim, dtype=case.query.dtype, device=case.query.device
    )
    k_new = buf[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    v_new = buf[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    poisoned = []
    for i, seq_len in enumerate(case.seq_lens):
        start, end = case.query_start_loc[i], case.query_start_loc[i + 1]
        for t in range(start, end):
            pos = seq_len - (end - start) + (t - start)
            block = int(case.block_tables[i, pos // block_size])
            k_new[t] = case.k_cache[block, pos % block_size]
            v_new[t] = case.v_cache[block, pos % block_size]
            poisoned.append((block, pos % block_size))
    ref = paged_attention_reference(case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                    case.query_start_loc, case.query.shape[2] ** -0.5, case.window)  # fmt: skip
    if poison_cache:
        for block, slot in poisoned:
            case.k_cache[block, slot] = float("nan")
            case.v_cache[block, slot] = float("nan")
    return k_new, v_new, ref


@pytest.mark.parametrize("name", list(CASES))
def test_step_kv_matches_reference(device, dtype, name) -> None:
    """The step's own keys read from its contiguous (strided) K/V rows, the prefix from the cache."""
    num_heads, num_kv_heads, head_dim, block_size, seq_lens, query_lens, window, block_m, block_n = CASES[
        name
    ]
    case = make_paged_case(num_heads, num_kv_heads, head_dim, block_size, seq_lens, query_lens, dtype, device)
    case.window = window
    k_new, v_new, ref = step_kv(case)
    out = paged_prefill_attention(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens_t(),
        case.query_start_loc_t(),
        head_dim**-0.5,
        window,
        block_m=block_m,
        block_n=block_n,
        k_new=k_new,
        v_new=v_new,
    )
    assert_close(out, ref, ATTENTION_TOL[dtype])


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 4, 1]], ids=["decode", "mixed"])
def test_dispatch_matches_reference(device, query_lens) -> None:
    """`paged_attention` takes the decode kernel for one token per sequence, the prefill one otherwise."""
    seq_lens = [20, 33, 7]
    case = make_paged_case(9, 3, 64, 16, seq_lens, query_lens, torch.float32, device)
    out = paged_attention(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens_t(),
        case.query_start_loc_t(),
        0.125,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    ref = paged_attention_reference(
        case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.query_start_loc, 0.125
    )
    assert_close(out, ref, ATTENTION_TOL[torch.float32])


@pytest.mark.cuda  # model-sized shapes: the compiled kernel only (make test-gpu)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("window", [None, 300])
def test_model_sized_on_cuda(dtype, window) -> None:
    """Llama-3-8B's heads (32/8, d128), a whole 1000-token prompt, chunks after prefixes, a decode row."""
    seq_lens, query_lens = [1000, 1500, 700, 260], [1000, 512, 1, 259]
    case = make_paged_case(32, 8, 128, 16, seq_lens, query_lens, dtype, torch.device("cuda"))
    out = paged_prefill_attention(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens_t(),
        case.query_start_loc_t(),
        128**-0.5,
        window,
    )
    ref = paged_attention_reference(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
        128**-0.5,
        window,
    )
    assert_close(out, ref, ATTENTION_TOL[dtype])


@pytest.mark.cuda  # model-sized shapes: the compiled kernel only (make test-gpu)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("use_tma", [False, None], ids=["pointers", "auto-tma"])
def test_model_sized_step_kv_on_cuda(dtype, window, use_tma) -> None:
    """As above with the step's K/V rows given (TMA on Hopper): chunks after prefixes, a decode row."""
    seq_lens, query_lens = [1000, 1500, 700, 260], [1000, 512, 1, 259]
    case = make_paged_case(32, 8, 128, 16, seq_lens, query_lens, dtype, torch.device("cuda"))
    case.window = window
    k_new, v_new, ref = step_kv(case)
    out = paged_prefill_attention(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens_t(),
        case.query_start_loc_t(),
        128**-0.5,
        window,
        k_new=k_new,
        v_new=v_new,
        use_tma=use_tma,
    )
    assert_close(out, ref, ATTENTION_TOL[dtype])


def test_bad_inputs_raise_value_error() -> None:
    case = make_paged_case(4, 2, 64, 16, [20, 5], [3, 5], torch.float32, torch.device("cpu"))
    args = (case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t())
    with pytest.raises(ValueError, match="query_start_loc must be"):
        paged_prefill_attention(*args, case.query_start_loc_t()[:2], 0.125)
    with pytest.raises(ValueError, match="query_start_loc must be"):
        paged_prefill_attention(*args, case.query_start_loc_t().long(), 0.125)
    with pytest.raises(ValueError, match="block_m must be"):
        paged_prefill_attention(*args, case.query_start_loc_t(), 0.125, block_m=24)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        q = case.query.transpose(1, 2).contiguous().transpose(1, 2)
        paged_prefill_attention(q, *args[1:], case.query_start_loc_t(), 0.125)
    k_new = torch.zeros(8, 2, 64)
    with pytest.raises(ValueError, match="k_new and v_new go together"):
        paged_prefill_attention(*args, case.query_start_loc_t(), 0.125, k_new=k_new)
    with pytest.raises(ValueError, match="k_new must be"):
        paged_prefill_attention(*args, case.query_start_loc_t(), 0.125, k_new=k_new[:7], v_new=k_new[:7])


@pytest.mark.parametrize("pad_tokens, pad_seqs", [(4, 1), (14, 5)])
def test_graph_padded_step_matches_unpadded(device, dtype, pad_tokens, pad_seqs) -> None:
    """A step laid out as a mixed-step CUDA graph replays it (``backend.cuda_graphs``): tokens padded to the
    bucket (belonging to no sequence), sequences padded with no query tokens and length 0, and the
    bucket's token count as ``max_query_len``. The real rows are exactly the unpadded step's."""
    seq_lens, query_lens = [50, 37, 9], [18, 1, 9]  # a chunk past a cached prefix, a decode, a prompt
    case = make_paged_case(8, 2, 64, 16, seq_lens, query_lens, dtype, device)
    case.window = None
    k_new, v_new, ref = step_kv(case, poison_cache=False)
    args = dict(scale=0.125, sliding_window=None, max_seq_len=max(seq_lens), k_new=k_new, v_new=v_new)
    out = paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t(),
                          case.query_start_loc_t(), max_query_len=max(query_lens), **args)  # fmt: skip
    assert_close(out, ref, ATTENTION_TOL[dtype])
    t = case.query.shape[0]
    T, S = t + pad_tokens, len(seq_lens) + pad_seqs

    def padded(x: torch.Tensor) -> torch.Tensor:  # padding rows hold garbage, as a graph's buffers may
        return torch.cat([x, torch.randn((pad_tokens, *x.shape[1:]), dtype=x.dtype, device=x.device)])

    tables = torch.cat([case.block_tables, torch.zeros((pad_seqs, case.block_tables.shape[1]),
                                                       dtype=torch.int32, device=device)])  # fmt: skip
    lens = torch.tensor([*seq_lens] + [0] * pad_seqs, dtype=torch.int32, device=device)
    qsl = torch.tensor([*case.query_start_loc] + [t] * pad_seqs, dtype=torch.int32, device=device)
    args |= dict(k_new=padded(k_new), v_new=padded(v_new))
    out_padded = paged_attention(padded(case.query), case.k_cache, case.v_cache, tables, lens, qsl,
                                 max_query_len=T, **args)  # fmt: skip
    assert out_padded.shape[0] == T and S == lens.shape[0]
    assert torch.equal(out_padded[:t], out)
