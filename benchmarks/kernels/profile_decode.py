"""Per-kernel GPU time of decode steps (batch 1 unless --batch) of the random Llama-3-8B-shaped model (torch.profiler).

    python benchmarks/kernels/profile_decode.py [--steps 10]

Runs eagerly (no CUDA graph), so the kernel list and per-kernel times are visible; launch gaps are not
representative. ``INFLIGHT_FUSED_GEMV=0`` compares with cuBLAS and separate norm / activation kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.random_models import build_random_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=Path("/tmp/inflight-llama31-8b-random"))
    parser.add_argument("--tokenizer-dir", type=Path, default=Path(".gpu/tok"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    args = parser.parse_args()
    from inflight import LLM, SamplingParams

    build_random_model("llama3-8b", args.model, tokenizer_dir=args.tokenizer_dir)
    llm = LLM(str(args.model), dtype="bfloat16", max_model_len=400, max_num_seqs=max(8, args.batch),
              kv_cache_memory_bytes=(2 + args.batch // 8) << 30, enable_cuda_graphs=False)  # fmt: skip
    engine = llm.engine
    for i in range(args.batch):
        engine.add_request(f"p{i}", list(range(1000 + i, 1128 + i)),
                           SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))  # fmt: skip
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    print(f"\nGPU time per decode step: {total / args.steps / 1e3:.3f} ms (kernels only, eager)")
    print(f"{'kernel':70}{'us/step':>10}{'calls/step':>12}{'%':>7}")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:22]:
        print(f"{e.key[:70]:70}{e.device_time_total / args.steps:10.1f}{e.count / args.steps:12.1f}"
              f"{100 * e.device_time_total / total:6.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
