"""The FP8-cache forms of the KV write and attention kernels compile for Hopper (sm_90) without a GPU, in the
configurations the wrappers launch: E4M3 loads converted in the tile loop, the scales loaded through
pointers, the quantizing stores; within Hopper's shared memory, and the bf16/fp16 prefill tile still on
wgmma. (test_compile_hopper.py does the same for the full-precision forms.)"""

from __future__ import annotations

import pytest
import triton

from inflight.kernels.kv_cache import _write_kv_cache_kernel
from inflight.kernels.paged_decode_attention import _paged_decode_partition_kernel
from inflight.kernels.paged_prefill_attention import (
    _default_stages,
    _paged_prefill_kernel,
    default_prefill_blocks,
)
from inflight.kernels.rotary import _rotary_kernel

from .test_compile_hopper import (
    ATTN_INDEX_PTRS,
    HOPPER_SHARED_MEMORY,
    STAT_PTRS,
    compile_for_hopper,
    pytestmark,  # noqa: F401  (skipped as there under TRITON_INTERPRET=1)
)

FP8_CACHE = (
    ("k_cache_ptr", "fp8e4nv"),
    ("v_cache_ptr", "fp8e4nv"),
    ("k_scale_ptr", "fp32"),
    ("v_scale_ptr", "fp32"),
)


@pytest.mark.parametrize(
    "dtype,head_dim,group,window,query_len",
    [("bf16", 128, 4, False, 4096), ("bf16", 128, 4, True, 128), ("fp16", 64, 3, True, None),
     ("fp32", 128, 8, False, None)],
)  # fmt: skip
def test_prefill_fp8_cache_compiles(dtype, head_dim, group, window, query_len) -> None:
    dtype_bytes = 4 if dtype == "fp32" else 2
    block_m, block_n = default_prefill_blocks(head_dim, group, on_gpu=True, dtype_bytes=dtype_bytes,
                                              max_query_len=query_len)  # fmt: skip
    constexprs = dict(GROUP=group, BLOCK_Q=block_m // group, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
                      USE_WINDOW=window, NEW_KV=False, USE_TMA=False, KV_FP8=True,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")  # fmt: skip
    compiled = compile_for_hopper(_paged_prefill_kernel, dtype, constexprs, 8 if block_m >= 128 else 4,
                                  _default_stages(block_m, block_n, head_dim, dtype_bytes, on_gpu=True),
                                  ATTN_INDEX_PTRS + FP8_CACHE, pointers=("k_new", "v_new"))  # fmt: skip
    assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY
    if dtype != "fp32":
        assert "wgmma" in compiled.asm["ptx"], "the prefill tile should run on Hopper's wgmma"


@pytest.mark.parametrize("dtype,head_dim,group", [("bf16", 128, 4), ("fp32", 64, 1), ("fp16", 128, 8)])
@pytest.mark.parametrize("split", [True, False])
def test_decode_fp8_cache_compiles(dtype, head_dim, group, split) -> None:
    constexprs = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_N=64,
                      SPLIT=split, USE_WINDOW=group == 1, KV_FP8=True,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")  # fmt: skip
    compiled = compile_for_hopper(_paged_decode_partition_kernel, dtype, constexprs, 4, 3,
                                  ATTN_INDEX_PTRS + STAT_PTRS + FP8_CACHE)  # fmt: skip
    assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fp8_cache_writes_compile(dtype) -> None:
    compiled = compile_for_hopper(_write_kv_cache_kernel, dtype, dict(BLOCK_H=8, BLOCK_D=128, KV_FP8=True), 4, 1,
                                  (("slot_mapping_ptr", "i64"), *FP8_CACHE))  # fmt: skip
    assert "div.rn.f32" in compiled.asm["ptx"], "x / scale must round as IEEE division, as the reference's"
    compile_for_hopper(_rotary_kernel, dtype, dict(WRITE_CACHE=True, STORE_K=False, BLOCK_H=32, BLOCK_HALF=64,
                                                   KV_FP8=True), 4, 1,
                       (("positions_ptr", "i64"), ("cos_sin_ptr", "fp32"), ("slot_mapping_ptr", "i64"),
                        *FP8_CACHE))  # fmt: skip
