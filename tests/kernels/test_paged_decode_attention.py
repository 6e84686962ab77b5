"""Paged decode attention (split-K) against paged_attention_reference."""

from __future__ import annotations

import pytest
import torch

from inflight.kernels.paged_attention import paged_attention_reference
from inflight.kernels.paged_decode_attention import paged_decode_attention

from .conftest import ATTENTION_TOL, assert_close
from .paged_cases import make_paged_case

# (num_heads, num_kv_heads, head_dim, block_size, seq_lens, sliding_window, partition_size, block_n)
CASES = {
    # SmolLM2's 9/3 heads, one partition (the kernel writes the output itself).
    "smollm2-one-partition": (9, 3, 64, 16, [1, 17, 40], None, 512, 64),
    # One partition of many key tiles (a large batch runs unsplit: backend.layers.attention).
    "gqa4-unsplit-many-tiles": (12, 3, 64, 16, [300, 45, 129], None, 1024, 32),
    # 12/3 (group 4), several partitions, lengths not multiples of the block size.
    "gqa4-split": (12, 3, 64, 16, [37, 100, 5], None, 32, 16),
    # group 8, head_dim 128.
    "gqa8-d128-split": (16, 2, 128, 16, [70, 33], None, 64, 32),
    # MHA (group 1), a block size of 5 (tokens of one tile span several blocks).
    "mha-block5-split": (6, 6, 64, 5, [23, 41, 2], None, 32, 16),
    # A sliding window shorter than the context: early partitions see nothing at all.
    "window-split": (8, 2, 64, 16, [90, 20, 50], 24, 32, 16),
}


def run_case(case_args, dtype, device, max_seq_len=None):
    num_heads, num_kv_heads, head_dim, block_size, seq_lens, window, partition_size, block_n = case_args
    case = make_paged_case(
        num_heads, num_kv_heads, head_dim, block_size, seq_lens, [1] * len(seq_lens), dtype, device
    )
    scale = head_dim**-0.5
    out = paged_decode_attention(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens_t(),
        scale,
        window,
        max_seq_len=max_seq_len,
        partition_size=partition_size,
        block_n=block_n,
    )
    return case, scale, window, out


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(device, dtype, name) -> None:
    case, scale, window, out = run_case(CASES[name], dtype, device)
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


def test_max_seq_len_above_every_sequence(device) -> None:
    """A padded bound (as under CUDA graphs) adds partitions no sequence reaches; the result is the same."""
    case, scale, window, out = run_case(CASES["gqa4-split"], torch.float32, device, max_seq_len=200)
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
    assert_close(out, ref, ATTENTION_TOL[torch.float32])


def test_partitions_grow_past_max_partitions(device) -> None:
    """A long bound (max_model_len under CUDA graphs) doubles the partition size instead of adding
    partitions: 200 / 16 -> 13 partitions > 4, so 64-token partitions, and the same result."""
    case = make_paged_case(12, 3, 64, 16, [37, 100, 5], [1, 1, 1], torch.float32, device)
    out = paged_decode_attention(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens_t(),
        0.125,
        max_seq_len=200,
        partition_size=16,
        block_n=16,
        max_partitions=4,
    )
    ref = paged_attention_reference(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
        0.125,
    )
    assert_close(out, ref, ATTENTION_TOL[torch.float32])


@pytest.mark.parametrize("partition_size", [512, 16])
def test_empty_sequence_gives_zeros(device, partition_size) -> None:
    """A padded decode row (seq_len 0) gets zeros, not NaN, and leaves the other rows alone."""
    case = make_paged_case(4, 1, 64, 16, [30, 1], [1, 1], torch.float32, device)
    seq_lens = torch.tensor([30, 0], dtype=torch.int32, device=device)
    out = paged_decode_attention(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        seq_lens,
        0.125,
        partition_size=partition_size,
        block_n=16,
    )
    ref = paged_attention_reference(
        case.query[:1], case.k_cache, case.v_cache, case.block_tables[:1], [30], [0, 1], 0.125
    )
    assert_close(out[:1], ref, ATTENTION_TOL[torch.float32])
    assert torch.equal(out[1].cpu(), torch.zeros(4, 64))


@pytest.mark.cuda  # model-sized shapes: the compiled kernel only (make test-gpu)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("window", [None, 700])
@pytest.mark.parametrize("partition_size", [512, 4096], ids=["split", "unsplit"])
def test_model_sized_on_cuda(dtype, window, partition_size) -> None:
    """Llama-3-8B's heads (32/8, d128), contexts up to 3000 tokens, split in 512-key partitions or not."""
    seq_lens = [3000, 1, 513, 1024, 2047, 77, 16, 900]
    case = make_paged_case(32, 8, 128, 16, seq_lens, [1] * len(seq_lens), dtype, torch.device("cuda"))
    out = paged_decode_attention(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens_t(),
        128**-0.5,
        window,
        partition_size=partition_size,
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


def test_bad_inputs_raise_value_error() -> None:
    case = make_paged_case(4, 2, 64, 16, [20, 5], [1, 1], torch.float32, torch.device("cpu"))
    args = (case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t(), 0.125)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        q = torch.randn(2, 4, 48)
        k = torch.randn(3, 16, 2, 48)
        paged_decode_attention(q, k, k.clone(), case.block_tables, case.seq_lens_t(), 0.125)
    with pytest.raises(ValueError, match="seq_lens must be"):
        paged_decode_attention(*args[:4], case.seq_lens_t().long(), 0.125)
    with pytest.raises(ValueError, match="block_tables must be"):
        paged_decode_attention(*args[:3], case.block_tables.long(), *args[4:])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(torch.randn(2, 3, 64), *args[1:])
    with pytest.raises(ValueError, match="query's dtype"):
        paged_decode_attention(case.query.half(), *args[1:])
    with pytest.raises(ValueError, match="one query each"):
        paged_decode_attention(torch.randn(3, 4, 64), *args[1:])
    with pytest.raises(ValueError, match="sliding_window must be positive"):
        paged_decode_attention(*args, 0)
