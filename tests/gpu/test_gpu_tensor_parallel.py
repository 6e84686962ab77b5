"""On GPUs: the distributed path (NCCL) gives the tokens the single-process path gives.

At world size 1 (``distributed_executor_backend="mp"``, one GPU) the collectives run through NCCL, inside the
captured CUDA graphs too; with two GPUs or more TP = 2 runs as well (its case exists only where they do).
"""

from __future__ import annotations

import pytest
import torch

from inflight import LLM, SamplingParams

from ..conftest import copy_tokenizer
from ..engine.tiny_models import build_tiny_checkpoint

pytestmark = pytest.mark.cuda

SIZES = [1] + ([2] if torch.cuda.device_count() >= 2 else [])
PROMPTS = [[5, 6, 7, 8, 9, 10], [100, 200, 300], list(range(40, 140))]


def _generate(path, dtype: str, **options) -> list:
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0, prompt_logprobs=1, logprobs=1)
    with LLM(str(path), dtype=dtype, device="cuda", max_model_len=256, max_num_seqs=8,
             kv_cache_memory_bytes=64 << 20, **options) as llm:  # fmt: skip
        out = llm.generate(PROMPTS, params)
        # decode steps replayed captured graphs (with the collectives in them, when distributed)
        assert llm.engine.executor.runner.graphs is not None
    return [(o.token_ids, o.prompt_logprobs, o.logprobs) for o in out]


@pytest.mark.parametrize("tp", SIZES)
def test_distributed_path_matches_one_process(tmp_path, tokenizer_dir, tp: int) -> None:
    path = build_tiny_checkpoint("llama", tmp_path / "llama")
    copy_tokenizer(tokenizer_dir, path)
    # bf16 at world size 1 (the all-reduce of one rank is exact); fp32 across GPUs (sums in another order)
    dtype = "bfloat16" if tp == 1 else "float32"
    single = _generate(path, dtype)
    distributed = _generate(path, dtype, tensor_parallel_size=tp, distributed_executor_backend="mp")
    if tp == 1:
        assert distributed == single
    else:
        assert [d[0] for d in distributed] == [s[0] for s in single]
