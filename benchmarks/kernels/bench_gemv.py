"""Batch-1 GEMV (decode's weight reads) on the Llama-3.1-8B shapes: cuBLAS (F.linear) vs the Triton gemv.

    python -m benchmarks.kernels.bench_gemv --out benchmarks/results/gemv-h200.json

GB/s counts the weight bytes read once; the ceiling is the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from benchmarks.common import copy_bandwidth_gbs, environment, write_result
from inflight.kernels.gemv import gemv

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336), "lm_head": (128256, 4096)}  # fmt: skip
SWEEP = list(itertools.product([4, 8, 16], [256, 512], [4, 8], [1, 2, 4, 8]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    rows, entries = [], []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        nbytes = n * k * 2
        ms_cublas = do_bench(lambda w=w, x=x: F.linear(x, w), return_mode="median")
        ref = F.linear(x, w).float()
        best = None
        for bn, bk, warps, split in SWEEP:
            if bk * split > k:
                continue
            fn = lambda w=w, x=x, bn=bn, bk=bk, warps=warps, split=split: gemv(
                x, w, block_n=bn, block_k=bk, num_warps=warps, split_k=split
            )
            err = (fn().float() - ref).abs().max().item()
            ms = do_bench(fn, return_mode="median")
            if best is None or ms < best[0]:
                best = (ms, bn, bk, warps, err, split)
        ms, bn, bk, warps, err, split = best
        entry = {"shape": name, "n": n, "k": k, "cublas_ms": ms_cublas,
                 "cublas_gbs": nbytes / ms_cublas / 1e6,
                 "triton_ms": ms, "triton_gbs": nbytes / ms / 1e6, "best": {"block_n": bn, "block_k": bk,
                 "num_warps": warps, "split_k": split}, "max_abs_err_vs_cublas": err}  # fmt: skip
        entries.append(entry)
        rows.append(
            f"{name:<14}{n:>7}x{k:<6}{entry['cublas_gbs']:>9.0f}{entry['triton_gbs']:>9.0f}"
            f"{100 * entry['triton_gbs'] / copy_gbs:>8.1f}%  bn{bn} bk{bk} w{warps} err {err:.1e}"
        )
    write_result(
        args.out,
        {
            "benchmark": "gemv_batch1",
            **environment(),
            "ceilings": {"copy_bandwidth_gbs": round(copy_gbs, 1)},
            "shapes": entries,
        },
    )
    print(f"copy {copy_gbs:.0f} GB/s\n{'shape':<14}{'N x K':>14}{'cuBLAS':>9}{'triton':>9}{'% copy':>9}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
