"""Every kernel compiles for Hopper (sm_90) in the configurations the GPU wrappers launch, without a GPU.

Triton's wheel ships ptxas, so this runs on CPU-only CI and catches what the interpreter cannot: code
that does not lower (e.g. tl.dot shapes), shared memory over the 227 KiB an H100/H200 block may use,
and the bf16 prefill tile not using Hopper's wgmma tensor-core instructions.
"""

from __future__ import annotations

import os

import pytest
import triton
from triton.runtime.jit import JITFunction

from inflight.kernels.activation import _silu_and_mul_kernel
from inflight.kernels.kv_cache import _write_kv_cache_kernel
from inflight.kernels.paged_decode_attention import (
    _paged_decode_partition_kernel,
    _paged_decode_reduce_kernel,
)
from inflight.kernels.paged_prefill_attention import (
    _default_stages,
    _paged_prefill_kernel,
    default_prefill_blocks,
)
from inflight.kernels.rms_norm import _rms_norm_kernel
from inflight.kernels.rotary import _rotary_kernel

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="TRITON_INTERPRET=1 made triton's library functions interpreted: nothing can compile",
)

HOPPER_SHARED_MEMORY = 227 * 1024
FLOAT_ARGS = {"eps", "scale_log2"}
TYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def compile_for_hopper(
    kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int, int_ptrs=(), pointers=()
):
    """Compile ``kernel`` for sm_90: pointers (``*_ptr`` and ``pointers``) ``*dtype`` (or as ``int_ptrs``
    says), other ints i32."""
    # NOTE: no skip if these move in a future triton: the test must then fail and be updated.
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = JITFunction(kernel.fn)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr") or name in pointers:
            signature[name] = "*" + dict(int_ptrs).get(name, TYPE[dtype])
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # As a real launch specialises them: 16-byte aligned pointers, strides divisible by 16 (head_dim >= 16);
    # the block-table row stride (max_blocks) may be anything.
    divisible = [
        i
        for i, name in enumerate(fn.arg_names)
        if name.endswith("_ptr")
        or name in pointers
        or (name.startswith("stride_") and name != "stride_block_table_seq")
    ]
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible if fn.arg_names[i] not in constexprs}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


ATTN_INDEX_PTRS = (("block_tables_ptr", "i32"), ("seq_lens_ptr", "i32"), ("query_start_loc_ptr", "i32"))
STAT_PTRS = (("part_acc_ptr", "fp32"), ("part_max_ptr", "fp32"), ("part_sum_ptr", "fp32"))


@pytest.mark.parametrize("new_kv", [False, True], ids=["cache-kv", "step-kv"])
@pytest.mark.parametrize(
    "dtype,head_dim,group,window,query_len",
    [("bf16", 128, 4, False, 4096), ("bf16", 128, 4, False, 128), ("fp16", 64, 3, True, None),
     ("fp32", 128, 8, False, None)],
)  # fmt: skip
def test_prefill_compiles(dtype, head_dim, group, window, query_len, new_kv) -> None:
    """The cache-only path and the step-K/V path through pointers (the TMA path runs in the CUDA tests),
    in the tiles of long and of short queries."""
    block_m, block_n = default_prefill_blocks(
        head_dim, group, on_gpu=True, dtype_bytes=4 if dtype == "fp32" else 2, max_query_len=query_len
    )
    constexprs = dict(
        GROUP=group,
        BLOCK_Q=block_m // group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        USE_WINDOW=window,
        NEW_KV=new_kv,
        USE_TMA=False,
        KV_FP8=False,
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
    )
    dtype_bytes = 4 if dtype == "fp32" else 2
    compiled = compile_for_hopper(
        _paged_prefill_kernel,
        dtype,
        constexprs,
        8 if block_m >= 128 else 4,
        _default_stages(block_m, block_n, head_dim, dtype_bytes, on_gpu=True),
        ATTN_INDEX_PTRS,
        pointers=("k_new", "v_new"),
    )
    assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY
    if dtype != "fp32":
        assert "wgmma" in compiled.asm["ptx"], "the prefill tile should run on Hopper's wgmma"


@pytest.mark.parametrize("dtype,head_dim,group", [("bf16", 128, 4), ("fp32", 64, 1), ("fp16", 128, 8)])
def test_decode_compiles(dtype, head_dim, group) -> None:
    constexprs = dict(
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=64,
        SPLIT=True,
        USE_WINDOW=group == 1,
        KV_FP8=False,
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
    )
    compiled = compile_for_hopper(
        _paged_decode_partition_kernel, dtype, constexprs, 4, 3, ATTN_INDEX_PTRS + STAT_PTRS
    )
    assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY
    reduce = compile_for_hopper(
        _paged_decode_reduce_kernel,
        dtype,
        dict(HEAD_DIM=head_dim, PARTS_PAD=64, PART_CHUNK=16),
        4,
        1,
        ATTN_INDEX_PTRS + STAT_PTRS,
    )
    assert reduce.metadata.shared <= HOPPER_SHARED_MEMORY


def test_elementwise_kernels_compile() -> None:
    compile_for_hopper(_rms_norm_kernel, "bf16", dict(HAS_RESIDUAL=True, BLOCK=8192), 16, 1)
    compile_for_hopper(_silu_and_mul_kernel, "bf16", dict(BLOCK=1024), 4, 1)
    compile_for_hopper(
        _write_kv_cache_kernel,
        "bf16",
        dict(BLOCK_H=8, BLOCK_D=128, KV_FP8=False),
        4,
        1,
        (("slot_mapping_ptr", "i64"),),
    )
    for write_cache in (False, True):
        compile_for_hopper(
            _rotary_kernel,
            "bf16",
            dict(WRITE_CACHE=write_cache, BLOCK_H=32, BLOCK_HALF=64, KV_FP8=False),
            4,
            1,
            (("positions_ptr", "i64"), ("cos_sin_ptr", "fp32"), ("slot_mapping_ptr", "i64")),
        )
