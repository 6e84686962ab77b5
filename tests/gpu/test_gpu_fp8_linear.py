"""FP8 (W8A8) linear layers on CUDA: the GEMV (decode of a few rows, RMSNorm and residual fused), the RMSNorm /
SiLU-and-mul kernels emitting FP8 and cuBLASLt's scaled GEMM, in CUDA graphs and eagerly, against HF
transformers with the same FP8 weights and activation quantization (tests/quantization/fp8_checkpoints.py).
Tiny fp32 models; the bounds are the CPU tests' (an activation's E4M3 rounding may differ in fp32's last bit)."""

from __future__ import annotations

import pytest
import torch

from inflight import LLM, SamplingParams

from ..conftest import copy_tokenizer
from ..engine.tiny_models import build_tiny_checkpoint
from ..quantization.fp8_checkpoints import hf_fp8_reference, write_fp8_checkpoint
from ..quantization.test_fp8_checkpoints import MAX_TOL, MEAN_TOL
from .test_gpu_engine import _hf_greedy, _prompts


@pytest.mark.parametrize("layout", ["at-load", "ct-dynamic", "modelopt"])
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_tiny_fp8_linear_matches_hf_fake_quant_on_gpu(
    layout: str, graphs: bool, tmp_path, tokenizer_dir
) -> None:
    src = build_tiny_checkpoint("llama", tmp_path / "src")
    copy_tokenizer(tokenizer_dir, src)
    ckpt = None if layout == "at-load" else write_fp8_checkpoint(src, tmp_path / layout, layout)
    llm = LLM(str(ckpt or src), dtype="float32", device="cuda", max_model_len=256, max_num_seqs=16,
              kv_cache_memory_bytes=64 << 20, enable_cuda_graphs=graphs, max_cuda_graph_prefill_tokens=256,
              quantization="fp8" if ckpt is None else None)  # fmt: skip
    hf = hf_fp8_reference(src, ckpt).cuda()
    prompts = _prompts(1, [3, 9, 17, 40], 49152)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=0))
    errors = []
    for i, (out, prompt) in enumerate(zip(outputs, prompts, strict=True)):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt], device="cuda")).logits[0].float().log_softmax(-1).cpu()
        got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
        errors.append((got - expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]).abs())
        assert out.token_ids == _hf_greedy(hf, prompt, 16), f"{layout} prompt {i} differs from HF (FP8)"
    errors = torch.cat(errors)
    assert errors.mean().item() <= MEAN_TOL and errors.max().item() <= MAX_TOL, errors
    if graphs:
        runner = llm.engine.executor.runner
        assert runner.graphs.replays > 0


def test_8b_shape_fp8_decode_runs_the_fused_gemv_in_graphs(llama8b_path) -> None:
    """The 8B shape quantized at load, bf16: batch-1 decode in graphs, greedy output equal to eager's."""
    common = dict(dtype="bfloat16", device="cuda", max_model_len=256, max_num_seqs=4, quantization="fp8",
                  kv_cache_memory_bytes=1 << 30)  # fmt: skip
    prompt = list(range(1000, 1040))
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    graphed = LLM(str(llama8b_path), **common)
    out = graphed.generate([prompt], params)[0].token_ids
    assert graphed.engine.executor.runner.graphs.replays > 0
    layer = graphed.engine.executor.runner.model.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.float8_e4m3fn
    del graphed
    torch.cuda.empty_cache()
    eager = LLM(str(llama8b_path), enable_cuda_graphs=False, **common)
    assert eager.generate([prompt], params)[0].token_ids == out
