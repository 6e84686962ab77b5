"""benchmarks.kernels.profile_steps: its ideal times against the model's own sizes, its synthetic steps on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.kernels.profile_steps import Step, build_runner, ideal_ms, kernel_group, run_step, step_inputs
from inflight.backend.executor.model_runner import kv_cache_bytes_per_block

TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 256, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip


@pytest.fixture(scope="module")
def runner():
    return build_runner(
        TINY, max_model_len=128, kv_tokens=512, device=torch.device("cpu"), dtype=torch.float32
    )


def test_matmul_ideal_counts_the_models_own_weights(runner) -> None:
    # The weights every token multiplies (all projections), the head once per sequence: 2 FLOPs per weight.
    body = sum(p.numel() for n, p in runner.model.named_parameters() if n.endswith("proj.weight"))
    head = runner.model.lm_head.weight.numel()
    step = Step("t", num_seqs=3, query_len=5, context=9)
    # 1 FLOP/s and an unbounded copy rate: the matmul seconds are the FLOP count.
    ideal = ideal_ms(TINY, step, copy_gbs=1e30, matmul_tflops=1e-12)
    assert ideal["matmul"] / 1e3 == pytest.approx(2 * 15 * body + 2 * 3 * head, rel=1e-12)


def test_decode_attention_ideal_is_the_kv_cache_bytes_read(runner) -> None:
    cfg = runner.model.config
    per_token = kv_cache_bytes_per_block(cfg, 1, torch.bfloat16, cfg.num_kv_heads)  # every layer's K and V
    step = Step("t", num_seqs=4, query_len=1, context=37)
    ideal = ideal_ms(TINY, step, copy_gbs=1e-9, matmul_tflops=1e30)  # 1 byte/s
    assert ideal["attention"] / 1e3 == pytest.approx(per_token * 4 * 37, rel=1e-12)


def test_step_inputs_write_each_token_into_its_own_blocks_and_run(runner) -> None:
    step = Step("t", num_seqs=3, query_len=4, context=20)
    inputs = step_inputs(step, runner.block_size, runner.num_blocks, TINY["vocab_size"])
    assert inputs.positions.tolist() == [16, 17, 18, 19] * 3
    assert inputs.logits_rows == [3, 7, 11]
    runner.kv_cache.zero_()
    run_step(runner, inputs)
    written = runner.kv_cache[0, 0].reshape(-1, runner.kv_cache.shape[-2] * runner.kv_cache.shape[-1])
    filled = set(np.flatnonzero(written.abs().sum(-1).numpy()).tolist())
    # Sequence i owns 2 blocks from 1 + 2 i; its positions 16..19 lie in its second block, rows 0..3.
    assert filled == {(1 + 2 * i + 1) * runner.block_size + r for i in range(3) for r in range(4)}


@pytest.mark.parametrize(
    ("kernel", "group"),
    [("_paged_decode_partition_kernel", "attention"), ("_paged_prefill_kernel", "attention"),
     ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "matmul"), ("_fused_gemv_kernel", "matmul"),
     ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"), ("_rotary_kernel", "rope+kv write"),
     ("_write_kv_cache_kernel", "rope+kv write"), ("_rms_norm_kernel", "rmsnorm"),
     ("_silu_and_mul_kernel", "silu_and_mul"), ("void at::native::index_elementwise_kernel", "other")],
)  # fmt: skip
def test_kernel_groups(kernel, group) -> None:
    assert kernel_group(kernel) == group
