"""Where a step's GPU time goes, per kind of kernel, beside what each kind would take at the device's ceilings.

    python -m benchmarks.kernels.profile_steps --out benchmarks/results/profile-steps-h200.json

The steps are those of the offline runs that miss issue 5's targets, built synthetically (no scheduler, the
KV cache holds zeros, which changes no kernel's time): a 16k-token prefill of 1000-token prompts and a
decode step of 384 sequences at the mean context of the 1000/1000 run; a 16k-token prefill of 128-token
prompts and a decode step of 512 sequences at context 192 of the 128/128 run; a lone 467-token prefill (the
serving benchmark's time to first token). The model is a ``--shape`` (default the Llama-3-8B one) with
random bf16 weights drawn on the device module by module, as ``load_format="dummy"`` does (no checkpoint on
disk; with ``--fp8`` each linear is quantized as soon as it is drawn, so ``--shape llama3-70b --fp8`` fits
an H200).

Each step runs eagerly under ``torch.profiler``; its kernels are grouped (matmul, attention, RoPE + KV
write, RMSNorm, SiLU-and-mul, other) and each group's time is set beside its ideal: matmul FLOPs at the
measured bf16 matmul rate (or the weights' read at copy bandwidth, whichever is longer), decode attention's
K/V bytes at copy bandwidth, prefill attention's FLOPs at the matmul rate, the element-wise kernels' bytes at
copy bandwidth. The decode steps are also timed with other split-K partition sizes of decode attention, and
the steps that fit a mixed-step CUDA graph (``backend/cuda_graphs.MixedGraphs``) are timed replaying one.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import ceilings, environment, write_result  # noqa: E402
from benchmarks.random_models import SHAPES  # noqa: E402


@dataclass(frozen=True)
class Step:
    name: str
    num_seqs: int
    query_len: int  # tokens of each sequence in this step
    context: int  # each sequence's length after this step


STEPS = [
    Step("1000/1000 prefill (16 x 1000 tokens)", 16, 1000, 1000),
    Step("1000/1000 decode (384 seqs, context 1500)", 384, 1, 1500),
    Step("128/128 prefill (128 x 128 tokens)", 128, 128, 128),
    Step("128/128 decode (512 seqs, context 192)", 512, 1, 192),
    Step("128/128 decode (1024 seqs, context 192)", 1024, 1, 192),
    Step("serving TTFT prefill (1 x 467 tokens)", 1, 467, 467),
    Step("batch-1 decode (1 seq, context 1024)", 1, 1, 1024),
]
GROUPS = ("matmul", "attention", "rope+kv write", "rmsnorm", "silu_and_mul", "quantize", "other")


def kernel_group(name: str) -> str:
    """The group of a CUDA kernel, from its name (cuBLAS / CUTLASS GEMMs, our Triton kernels, torch's)."""
    n = name.lower()
    if "paged" in n or "attention" in n or "attn" in n:
        return "attention"
    if any(k in n for k in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk")):
        return "matmul"
    if "rotary" in n or "kv_cache" in n:
        return "rope+kv write"
    if "rms" in n:
        return "rmsnorm"
    if "silu" in n or "act_and_mul" in n:
        return "silu_and_mul"
    if "quantize" in n:
        return "quantize"
    return "other"


def ideal_ms(
    shape: dict[str, int], step: Step, copy_gbs: float, matmul_tflops: float, fp8_tflops: float | None = None
) -> dict[str, float]:
    """Each group's time at the ceilings (bf16 everywhere; K/V of every layer; logits for one row a sequence).
    ``fp8_tflops``: the FP8 run's (W8A8 layer linears at that rate and one byte a weight, K/V one byte; the
    element-wise kernels' bytes counted as bf16, their FP8 outputs being smaller)."""
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv_heads, vocab = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    head_dim = hidden // heads
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    tokens = step.num_seqs * step.query_len
    layer_weights = hidden * (q_size + 2 * kv_size) + q_size * hidden + hidden * 2 * inter + inter * hidden
    byte_s, flop_s = copy_gbs * 1e9, matmul_tflops * 1e12
    layer_flops, head_flops = 2 * tokens * layers * layer_weights, 2 * step.num_seqs * hidden * vocab
    weight_bytes = (1 if fp8_tflops else 2) * layers * layer_weights + 2 * vocab * hidden
    layer_flop_s = fp8_tflops * 1e12 if fp8_tflops else flop_s
    matmul = max(layer_flops / layer_flop_s + head_flops / flop_s, weight_bytes / byte_s)
    kv_bytes = 1 if fp8_tflops else 2
    past = step.context - step.query_len
    kv_read = kv_bytes * 2 * kv_size * layers * step.num_seqs * step.context  # K and V, every key once
    # Causal attention: query i of a sequence sees past + i + 1 keys; QK^T and PV are 2 FLOPs each per pair.
    pairs = step.num_seqs * (step.query_len * past + step.query_len * (step.query_len + 1) / 2)
    attn_flops = 4 * heads * head_dim * pairs * layers
    attention = max(kv_read / byte_s, attn_flops / flop_s)
    # RoPE + KV write: read q, k, v, write the rotated q and the cache's K/V rows (and, prefilling, the
    # rotated k in place); RMSNorm (with the residual add): read hidden + residual, write both; SiLU-and-mul:
    # read gate + up, write one.
    rope = 2 * tokens * layers * (2 * q_size + 4 * kv_size + (kv_size if step.query_len > 1 else 0))
    norm = 2 * tokens * (2 * layers + 1) * 4 * hidden
    act = 2 * tokens * layers * 3 * inter
    return {"matmul": 1e3 * matmul, "attention": 1e3 * attention, "rope+kv write": 1e3 * rope / byte_s,
            "rmsnorm": 1e3 * norm / byte_s, "silu_and_mul": 1e3 * act / byte_s}  # fmt: skip


def step_inputs(step: Step, block_size: int, max_blocks: int, vocab_size: int):
    """A ``StepInputs`` for ``step``: sequence i owns blocks [1 + i * w, 1 + (i + 1) * w), w = its blocks."""
    from inflight.backend.executor.step_inputs import flatten_step
    from inflight.batching import ScheduledRequest, SchedulerOutput

    width = math.ceil(step.context / block_size)
    assert 1 + step.num_seqs * width <= max_blocks, "the KV cache is too small for this step"
    ids = np.random.default_rng(0).integers(0, vocab_size, size=(step.num_seqs, step.query_len)).tolist()
    scheduled = [
        ScheduledRequest(
            request_id=f"s{i}",
            token_ids=ids[i],
            start_position=step.context - step.query_len,
            block_ids=list(range(1 + i * width, 1 + (i + 1) * width)),
            needs_sample=True,
        )  # fmt: skip
        for i in range(step.num_seqs)
    ]
    return flatten_step(SchedulerOutput(scheduled, step.num_seqs * step.query_len), block_size)


def build_runner(shape: dict[str, Any], max_model_len: int, kv_tokens: int, device: torch.device,
                 dtype: torch.dtype = torch.bfloat16, block_size: int = 16, fp8: bool = False):  # fmt: skip
    """The model with random bf16 weights (``load_format="dummy"``'s, drawn on ``device`` module by module) and
    a KV cache of ``kv_tokens`` tokens. ``fp8``: the engine's ``quantization="fp8"`` + ``kv_cache_dtype="fp8"``
    (each linear quantized right after its fill, K/V scales set to 0.05: the kernels' times do not depend on
    the values)."""
    from transformers import LlamaConfig

    from inflight.backend.executor.model_config import ModelConfig
    from inflight.backend.executor.model_runner import ModelRunner
    from inflight.backend.executor.quantization import resolve_quantization
    from inflight.backend.executor.weight_loader import materialize_dummy, meta_model

    folder = Path(tempfile.mkdtemp(prefix="profile-steps-"))
    LlamaConfig(
        **shape, architectures=["LlamaForCausalLM"], dtype=str(dtype).removeprefix("torch.")
    ).save_pretrained(folder)
    cfg = ModelConfig.from_pretrained(folder)
    quant = resolve_quantization("fp8", folder) if fp8 else None
    model = meta_model(cfg, dtype, max_model_len, quant=quant, kv_cache_dtype="fp8" if fp8 else "auto")
    materialize_dummy(model, device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("k_scale", "v_scale")):
                param.fill_(0.05)
    model.eval()
    runner = ModelRunner(model, device, block_size, torch.float8_e4m3fn if fp8 else dtype, max_model_len)
    runner.allocate_kv_cache(math.ceil(kv_tokens / block_size) + 1)
    return runner


@torch.inference_mode()
def run_step(runner, inputs, graphs=None) -> torch.Tensor:
    """One step's forward (eagerly, or replaying ``graphs``), its logits and a greedy pick; the logits."""
    hidden = runner._forward_eager(inputs, None) if graphs is None else graphs.run(inputs)
    if len(inputs.logits_rows) != hidden.shape[0]:
        hidden = hidden.index_select(0, torch.as_tensor(inputs.logits_rows, device=hidden.device))
    logits = runner.model.compute_logits(hidden)
    logits.argmax(-1)
    return logits


def time_ms(fn, iters: int = 5) -> float:
    """Median wall time of ``fn`` on the GPU (CUDA events), after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_step(runner, inputs, iters: int = 3) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """GPU ms per step of each group, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    run_step(runner, inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run_step(runner, inputs)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    groups = dict.fromkeys(GROUPS, 0.0)
    for e in events:
        groups[kernel_group(e.key)] += e.device_time_total / iters / 1e3
    top = [{"kernel": e.key[:120], "group": kernel_group(e.key), "ms": round(e.device_time_total / iters / 1e3, 4),
            "calls": e.count // iters} for e in sorted(events, key=lambda e: -e.device_time_total)[:12]]  # fmt: skip
    return groups, top


def partition_sweep(runner, inputs, sizes: list[int]) -> list[dict[str, float]]:
    """The eager step's time with decode attention's split-K partition forced to each size."""
    from inflight.backend.executor.layers import attention

    default = attention.decode_partition_size
    rows = []
    try:
        for size in sizes:
            attention.decode_partition_size = lambda *args, _s=size: _s
            rows.append(
                {"partition_size": size, "step_ms": round(time_ms(lambda: run_step(runner, inputs)), 3)}
            )
    finally:
        attention.decode_partition_size = default
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="profile only the steps whose name contains TEXT (repeatable)")  # fmt: skip
    parser.add_argument("--fp8", action="store_true", help='quantization="fp8", kv_cache_dtype="fp8"')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_steps needs a CUDA GPU")
    result: dict[str, Any] = {"benchmark": "profile_steps", **environment()}
    ceil = result["ceilings"] = ceilings(fp8=args.fp8)
    print(json.dumps(ceil), flush=True)
    max_model_len = 2048
    steps = [s for s in STEPS if not args.only or any(text in s.name for text in args.only)]
    kv_tokens = max(s.num_seqs * math.ceil(s.context / 16) * 16 for s in steps)
    runner = build_runner(SHAPES[args.shape], max_model_len, kv_tokens, torch.device("cuda"), fp8=args.fp8)
    from inflight.backend.executor.cuda_graphs import MixedGraphs
    from inflight.backend.executor.layers.attention import decode_partition_size

    mixed = MixedGraphs(runner.model, runner.device, 1024, 16, math.ceil(max_model_len / runner.block_size),
                        max_model_len)  # fmt: skip
    mixed.capture()
    shape = SHAPES[args.shape]
    result["shape"], result["fp8"], result["steps"] = args.shape, args.fp8, []
    for step in steps:
        inputs = step_inputs(step, runner.block_size, runner.num_blocks, shape["vocab_size"])
        groups, top = profile_step(runner, inputs)
        ideal = ideal_ms(shape, step, ceil["copy_bandwidth_gbs"], ceil["bf16_matmul_tflops"],
                         ceil["fp8_matmul_tflops"] if args.fp8 else None)  # fmt: skip
        wall = time_ms(lambda inputs=inputs: run_step(runner, inputs))
        row: dict[str, Any] = {
            "step": step.name, "num_seqs": step.num_seqs, "query_len": step.query_len, "context": step.context,
            "eager_step_ms": round(wall, 3), "kernel_ms": round(sum(groups.values()), 3),
            "ideal_ms": round(sum(ideal.values()), 3),
            "groups": {g: {"ms": round(groups[g], 3), "ideal_ms": round(ideal[g], 3) if g in ideal else None,
                           "fraction_of_ideal": round(ideal[g] / groups[g], 3) if g in ideal and groups[g] else None}
                       for g in GROUPS},
            "top_kernels": top,
        }  # fmt: skip
        if step.query_len > 1 and mixed.can_run(len(inputs.input_ids), step.num_seqs):
            row["graph_step_ms"] = round(time_ms(lambda inputs=inputs: run_step(runner, inputs, mixed)), 3)
            eager, graph = run_step(runner, inputs), run_step(runner, inputs, mixed)
            row["graph_vs_eager"] = {
                "max_abs_logit_diff": round(float((eager - graph).abs().max()), 4),
                "logit_std": round(float(eager.std()), 4),
                "same_argmax": round(float((eager.argmax(-1) == graph.argmax(-1)).float().mean()), 4),
            }
            print(f"  graph vs eager: {row['graph_vs_eager']}", flush=True)
            print(f"{step.name}: mixed-step graph {row['graph_step_ms']:.2f} ms", flush=True)
        if step.query_len == 1:
            device = torch.device("cuda")
            row["decode_partition_default"] = decode_partition_size(
                step.num_seqs, shape["num_key_value_heads"], step.context, device
            )
            row["partition_sweep"] = partition_sweep(runner, inputs, [256, 512, 1024, 2048])
        result["steps"].append(row)
        print(f"\n{step.name}: eager step {wall:.2f} ms, kernels {row['kernel_ms']:.2f} ms, "
              f"ideal {row['ideal_ms']:.2f} ms", flush=True)  # fmt: skip
        for g, v in row["groups"].items():
            frac = "" if v["fraction_of_ideal"] is None else f"{100 * v['fraction_of_ideal']:.0f}% of ideal"
            ideal_text = "" if v["ideal_ms"] is None else f"{v['ideal_ms']:.3f}"
            print(f"  {g:16}{v['ms']:10.3f} ms  ideal {ideal_text:>8}  {frac}", flush=True)
        for k in row.get("partition_sweep", []):
            print(f"  partition {k['partition_size']:5}: {k['step_ms']:.3f} ms", flush=True)
    if args.out is not None:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
