"""Host time of cuBLAS's first GEMM of a new row count, against a repeat of the same call (8B shapes).

    python -m benchmarks.kernels.bench_gemm_first_call --out benchmarks/results/gemm-first-call-h200.json

Each call is made while the GPU is busy with ~10 ms of queued matmuls, as in a step in flight, and timed on
the host. "drained" counts first calls after which that queue was empty (the call may have waited for it).
This is why the engine pads the logits GEMM's rows to a ladder warmed at start (``ModelRunner.warm_logits``):
the number of sampled rows changes at most steps where a batch fills up or winds down.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import environment, write_result
from benchmarks.kernels.bench_gemv import SHAPES  # (out features, in features) of the 8B's layers

# the projections whose product the model adds to the residual stream in the GEMM's epilogue (addmm)
ADDS_RESIDUAL = {"o_proj", "down_proj"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=24, help="new row counts per shape")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dtype, dev = torch.bfloat16, "cuda"
    x = torch.randn(8192, 14336, device=dev, dtype=dtype)
    residual = torch.randn(8192, 4096, device=dev, dtype=dtype)
    busy = torch.randn(8192, 8192, device=dev, dtype=dtype)
    calls = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
        if name in ADDS_RESIDUAL:
            calls[name] = lambda m, w=w, k=k: torch.addmm(residual[:m], x[:m, :k], w.t())
        else:
            calls[name] = lambda m, w=w, k=k: F.linear(x[:m, :k], w)
    for call in calls.values():
        call(8)  # the handles and workspaces: not a first call's cost
    torch.cuda.synchronize()
    rng = random.Random(0)
    rows = {name: rng.sample(range(300, 8000) if name != "lm_head" else range(17, 1024), args.rows)
            for name in SHAPES}  # fmt: skip
    entries = []
    print(f"{'shape':>13} {'first ms (median / max)':>24} {'repeat ms':>10} {'drained':>8}")
    for name, call in calls.items():
        first, repeat, drained = [], [], 0
        for m in rows[name]:
            for times in (first, repeat):
                for _ in range(6):
                    busy @ busy
                start = time.perf_counter()
                call(m)
                times.append(1e3 * (time.perf_counter() - start))
                if times is first and torch.cuda.current_stream().query():
                    drained += 1
                torch.cuda.synchronize()
        entry = {"shape": name, "out_features": SHAPES[name][0], "in_features": SHAPES[name][1],
                 "residual_in_epilogue": name in ADDS_RESIDUAL, "rows": rows[name],
                 "first_call_host_ms_median": round(statistics.median(first), 3),
                 "first_call_host_ms_max": round(max(first), 3),
                 "repeat_call_host_ms_median": round(statistics.median(repeat), 3),
                 "first_calls_that_drained_the_queue": drained}  # fmt: skip
        entries.append(entry)
        print(f"{name:>13} {entry['first_call_host_ms_median']:>11.2f} / {entry['first_call_host_ms_max']:>10.2f} "
              f"{entry['repeat_call_host_ms_median']:>10.3f} {drained:>5}/{len(first)}")  # fmt: skip
    if args.out:
        write_result(args.out, {"benchmark": "gemm_first_call", **environment(), "shapes": entries})


if __name__ == "__main__":
    main()
