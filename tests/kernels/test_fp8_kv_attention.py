"""Decode (split-K) and prefill attention over an FP8 (E4M3) cache, against paged_attention_reference with
the same FP8 cache and scales.

Tolerances: the kernels and the reference read the same E4M3 codes; an E4M3 value is exact in the query's
dtype (fp32, and bf16/fp16, whose exponent ranges hold E4M3's), and each scale multiplies once in fp32
(the kernel folds k_scale into the score scale and v_scale into the output: a 2^-24 relative difference).
So what differs is what differs with a cache in the query's dtype, and the per-dtype ATTENTION_TOL of the
other attention tests applies unchanged: the cases are built so that the dequantized K/V are of the same
magnitude as theirs (unit normal).
"""

from __future__ import annotations

import pytest
import torch

from inflight.kernels.fp8 import FP8_DTYPE
from inflight.kernels.kv_cache import quantize_fp8_reference
from inflight.kernels.paged_attention import paged_attention, paged_attention_reference
from inflight.kernels.paged_decode_attention import paged_decode_attention
from inflight.kernels.paged_prefill_attention import paged_prefill_attention

from .conftest import ATTENTION_TOL, assert_close
from .paged_cases import PagedCase, make_paged_case
from .test_paged_decode_attention import CASES as DECODE_CASES
from .test_paged_prefill_attention import CASES as PREFILL_CASES

# Unit-normal K/V (|x| < ~5) over these scales use E4M3's range up to ~400 without saturating.
K_SCALE, V_SCALE = 0.0123, 0.0117


def fp8_case(case: PagedCase) -> tuple[PagedCase, torch.Tensor, torch.Tensor]:
    """The case with its caches quantized to E4M3 (NaN where no token lives stays NaN), and the scales."""
    device = case.query.device
    k_scale = torch.tensor(K_SCALE, device=device)
    v_scale = torch.tensor(V_SCALE, device=device)
    case.k_cache = quantize_fp8_reference(case.k_cache, k_scale)
    case.v_cache = quantize_fp8_reference(case.v_cache, v_scale)
    assert case.k_cache.dtype == FP8_DTYPE
    return case, k_scale, v_scale


def reference(case: PagedCase, scale: float, window: int | None, k_scale, v_scale) -> torch.Tensor:
    return paged_attention_reference(case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                     case.query_start_loc, scale, window, k_scale, v_scale)  # fmt: skip


def test_reference_dequantizes_by_the_scales() -> None:
    """The reference over an FP8 cache is the reference over ``fp8.float() * scale`` in fp32."""
    case, k_scale, v_scale = fp8_case(
        make_paged_case(8, 2, 64, 16, [40, 9], [5, 9], torch.float32, torch.device("cpu"))
    )
    got = reference(case, 0.125, None, k_scale, v_scale)
    plain = paged_attention_reference(case.query, case.k_cache.float() * K_SCALE, case.v_cache.float() * V_SCALE,
                                      case.block_tables, case.seq_lens, case.query_start_loc, 0.125)  # fmt: skip
    assert torch.equal(got, plain)


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_fp8_matches_reference(device, dtype, name) -> None:
    num_heads, num_kv_heads, head_dim, block_size, seq_lens, window, partition_size, block_n = DECODE_CASES[
        name
    ]
    case, k_scale, v_scale = fp8_case(make_paged_case(num_heads, num_kv_heads, head_dim, block_size, seq_lens,
                                                      [1] * len(seq_lens), dtype, device))  # fmt: skip
    scale = head_dim**-0.5
    out = paged_decode_attention(case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t(),
                                 scale, window, k_scale=k_scale, v_scale=v_scale, partition_size=partition_size,
                                 block_n=block_n)  # fmt: skip
    assert_close(out, reference(case, scale, window, k_scale, v_scale), ATTENTION_TOL[dtype])


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_fp8_matches_reference(device, dtype, name) -> None:
    num_heads, num_kv_heads, head_dim, block_size, seq_lens, query_lens, window, block_m, block_n = (
        PREFILL_CASES[name]
    )
    case, k_scale, v_scale = fp8_case(make_paged_case(num_heads, num_kv_heads, head_dim, block_size, seq_lens,
                                                      query_lens, dtype, device))  # fmt: skip
    scale = head_dim**-0.5
    out = paged_prefill_attention(case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t(),
                                  case.query_start_loc_t(), scale, window, k_scale=k_scale, v_scale=v_scale,
                                  block_m=block_m, block_n=block_n)  # fmt: skip
    assert_close(out, reference(case, scale, window, k_scale, v_scale), ATTENTION_TOL[dtype])


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 4, 1]], ids=["decode", "mixed"])
def test_dispatch_fp8_matches_reference(device, query_lens) -> None:
    seq_lens = [20, 33, 7]
    case, k_scale, v_scale = fp8_case(
        make_paged_case(9, 3, 64, 16, seq_lens, query_lens, torch.float32, device)
    )
    out = paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t(),
                          case.query_start_loc_t(), 0.125, max_query_len=max(query_lens),
                          max_seq_len=max(seq_lens), k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    assert_close(out, reference(case, 0.125, None, k_scale, v_scale), ATTENTION_TOL[torch.float32])


def test_scales_are_read_at_run_time(device) -> None:
    """The kernels read the scale tensors' values when they run (a CUDA graph captured before a change of
    the values would see the new ones): a scale changed in place changes the result accordingly."""
    case, k_scale, v_scale = fp8_case(make_paged_case(4, 2, 64, 16, [30, 12], [1, 1], torch.float32, device))
    args = (case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t(), 0.125)
    first = paged_decode_attention(*args, k_scale=k_scale, v_scale=v_scale)
    v_scale.mul_(2.0)
    assert_close(paged_decode_attention(*args, k_scale=k_scale, v_scale=v_scale), 2 * first,
                 ATTENTION_TOL[torch.float32])  # fmt: skip
    k_scale.mul_(0.5)
    assert_close(paged_decode_attention(*args, k_scale=k_scale, v_scale=v_scale),
                 reference(case, 0.125, None, k_scale, v_scale), ATTENTION_TOL[torch.float32])  # fmt: skip


@pytest.mark.parametrize("pad_tokens, pad_seqs", [(4, 1), (14, 5)])
def test_graph_padded_fp8_step_matches_unpadded(device, dtype, pad_tokens, pad_seqs) -> None:
    """A step laid out as a mixed-step CUDA graph replays it (padding tokens and sequences, the bucket's
    token count as max_query_len), over an FP8 cache: the real rows are exactly the unpadded step's."""
    seq_lens, query_lens = [50, 37, 9], [18, 1, 9]
    case, k_scale, v_scale = fp8_case(make_paged_case(8, 2, 64, 16, seq_lens, query_lens, dtype, device))
    args = dict(scale=0.125, sliding_window=None, max_seq_len=max(seq_lens), k_scale=k_scale, v_scale=v_scale)
    out = paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t(),
                          case.query_start_loc_t(), max_query_len=max(query_lens), **args)  # fmt: skip
    assert_close(out, reference(case, 0.125, None, k_scale, v_scale), ATTENTION_TOL[dtype])
    t = case.query.shape[0]
    query = torch.cat([case.query, torch.randn((pad_tokens, *case.query.shape[1:])).to(dtype).to(device)])
    tables = torch.cat([case.block_tables, torch.zeros((pad_seqs, case.block_tables.shape[1]),
                                                       dtype=torch.int32, device=device)])  # fmt: skip
    lens = torch.tensor([*seq_lens] + [0] * pad_seqs, dtype=torch.int32, device=device)
    qsl = torch.tensor([*case.query_start_loc] + [t] * pad_seqs, dtype=torch.int32, device=device)
    padded = paged_attention(query, case.k_cache, case.v_cache, tables, lens, qsl, max_query_len=t + pad_tokens,
                             **args)  # fmt: skip
    assert torch.equal(padded[:t], out)


def test_fp8_inputs_are_checked() -> None:
    case, k_scale, v_scale = fp8_case(
        make_paged_case(4, 2, 64, 16, [20, 5], [3, 5], torch.float32, torch.device("cpu"))
    )
    args = (
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens_t(),
        case.query_start_loc_t(),
        0.125,
    )
    with pytest.raises(ValueError, match="needs k_scale"):
        paged_prefill_attention(*args)
    with pytest.raises(ValueError, match="takes no k_new"):
        k_new = torch.zeros(8, 2, 64)
        paged_prefill_attention(*args, k_scale=k_scale, v_scale=v_scale, k_new=k_new, v_new=k_new)
    with pytest.raises(ValueError, match="float8_e4m3fn cache only"):
        paged_decode_attention(case.query[:2], case.k_cache.float(), case.v_cache.float(), case.block_tables,
                               case.seq_lens_t(), 0.125, k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    with pytest.raises(ValueError, match="v_scale is on"):
        paged_decode_attention(case.query[:2], case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t(),
                               0.125, k_scale=k_scale, v_scale=v_scale.to("meta"))  # fmt: skip
    with pytest.raises(ValueError, match="an FP8 cache needs k_scale and v_scale"):
        paged_attention_reference(case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                  case.query_start_loc, 0.125)  # fmt: skip


# ------------------------------------------------------------------------------ model-sized, CUDA only
@pytest.mark.cuda  # model-sized shapes: the compiled kernel only (make test-gpu)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("window", [None, 700])
@pytest.mark.parametrize("partition_size", [512, 4096], ids=["split", "unsplit"])
def test_decode_fp8_model_sized_on_cuda(dtype, window, partition_size) -> None:
    """Llama-3-8B's heads (32/8, d128), contexts up to 3000 tokens, split in 512-key partitions or not."""
    seq_lens = [3000, 1, 513, 1024, 2047, 77, 16, 900]
    case, k_scale, v_scale = fp8_case(make_paged_case(32, 8, 128, 16, seq_lens, [1] * len(seq_lens), dtype,
                                                      torch.device("cuda")))  # fmt: skip
    out = paged_decode_attention(case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens_t(),
                                 128**-0.5, window, k_scale=k_scale, v_scale=v_scale,
                                 partition_size=partition_size)  # fmt: skip
    assert_close(out, reference(case, 128**-0.5, window, k_scale, v_scale), ATTENTION_TOL[dtype])


@pytest.mark.cuda  # model-sized shapes: the compiled kernel only (make test-gpu)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("window", [None, 300])
def test_prefill_fp8_model_sized_on_cuda(dtype, window) -> None:
    """Llama-3-8B's heads, a whole 1000-token prompt (the large tiles), chunks after prefixes, a decode row;
    and a short step (the small tiles)."""
    for seq_lens, query_lens in (([1000, 1500, 700, 2060], [1000, 512, 1, 1759]), ([300, 40], [300, 17])):
        case, k_scale, v_scale = fp8_case(make_paged_case(32, 8, 128, 16, seq_lens, query_lens, dtype,
                                                          torch.device("cuda")))  # fmt: skip
        out = paged_prefill_attention(case.query, case.k_cache, case.v_cache, case.block_tables,
                                      case.seq_lens_t(), case.query_start_loc_t(), 128**-0.5, window,
                                      k_scale=k_scale, v_scale=v_scale, max_query_len=max(query_lens))  # fmt: skip
        assert_close(out, reference(case, 128**-0.5, window, k_scale, v_scale), ATTENTION_TOL[dtype])
