"""Batch-1 decode linears of a Llama-3-8B layer inside CUDA graphs: cuBLAS (+ the separate RMSNorm /
SiLU-and-mul kernels) against ``kernels.fused_gemv`` (those ops fused into the GEMV's input load).

    python benchmarks/kernels/bench_decode_linear.py [--out x.json]

Each variant is captured as a graph over ``--layers`` distinct weight sets (several times the L2, as the
model's layers are) and replayed; times are per layer. Bytes: the weights read once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import copy_bandwidth_gbs, environment, write_result  # noqa: E402
from inflight.kernels import ops  # noqa: E402
from inflight.kernels.fused_gemv import fused_gemv, fused_gemv_reference  # noqa: E402

HIDDEN, INTER, QKV = 4096, 14336, 6144
CONFIGS = [  # (block_n, block_k, num_warps, num_stages)
    (32, 256, 4, 4),
    (32, 512, 4, 3),
    (64, 256, 4, 3),
    (64, 512, 4, 3),
]


def graph_us(fn, layers: int, replays: int = 20) -> float:
    """Microseconds per layer of ``fn(i)`` for i in range(layers), captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(layers):  # warm-up / compile outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays / layers)
    return sorted(times)[len(times) // 2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", default=None)
    parser.add_argument("--with-none", action="store_true", help="also the plain GEMV on every shape")
    parser.add_argument("--lm-head", action="store_true", help="also the 128256 x 4096 head (3 copies)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dt, dev, eps, L = torch.bfloat16, "cuda", 1e-5, args.layers
    copy = copy_bandwidth_gbs()
    w = {
        "qkv": [torch.randn(QKV, HIDDEN, dtype=dt, device=dev) * 0.02 for _ in range(L)],
        "o": [torch.randn(HIDDEN, HIDDEN, dtype=dt, device=dev) * 0.02 for _ in range(L)],
        "gate_up": [torch.randn(2 * INTER, HIDDEN, dtype=dt, device=dev) * 0.02 for _ in range(L)],
        "down": [torch.randn(HIDDEN, INTER, dtype=dt, device=dev) * 0.02 for _ in range(L)],
    }
    if args.lm_head:
        w["lm_head"] = [torch.randn(128256, HIDDEN, dtype=dt, device=dev) * 0.02 for _ in range(3)]
    norm_w = torch.randn(HIDDEN, dtype=dt, device=dev)
    x = torch.randn(1, HIDDEN, dtype=dt, device=dev)
    res = torch.randn(1, HIDDEN, dtype=dt, device=dev)
    act = torch.randn(1, 2 * INTER, dtype=dt, device=dev)
    prologue = {"qkv": "rmsnorm", "o": "none", "gate_up": "rmsnorm", "down": "silu_mul", "lm_head": "none"}

    def unfused(name, i):
        if prologue[name] == "rmsnorm":
            h, _ = ops.rms_norm(x, norm_w, eps, res)
            return F.linear(h, w[name][i])
        if prologue[name] == "silu_mul":
            return F.linear(ops.silu_and_mul(act), w[name][i])
        return F.linear(x, w[name][i])

    def inp(name):
        return act if name == "down" else x

    rows = []
    for name in w:
        nbytes = w[name][0].numel() * 2
        nl = len(w[name])
        kw = dict(residual=res, norm_weight=norm_w, eps=eps) if prologue[name] == "rmsnorm" else {}
        ref, _ = fused_gemv_reference(inp(name).double(), w[name][0].double(), prologue[name],
                                      **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})  # fmt: skip
        r = {"shape": name, "n": w[name][0].shape[0], "k": w[name][0].shape[1], "prologue": prologue[name]}
        r["cublas_only_us"] = graph_us(lambda i, n=name: F.linear(inp(n) if n != "down" else act[:, :INTER],
                                                                  w[n][i]), nl)  # fmt: skip
        r["unfused_us"] = graph_us(lambda i, n=name: unfused(n, i), nl)
        r["unfused_err"] = rel_err(unfused(name, 0), ref)
        r["fused"] = []
        for cfg, pro in [(c, prologue[name]) for c in CONFIGS] + [
            (c, "none") for c in CONFIGS if prologue[name] != "none" and args.with_none
        ]:
            bn, bk, nw, ns = cfg
            kn = dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
            pkw = kw if pro == prologue[name] else {}
            xin = inp(name) if pro == prologue[name] else (act[:, :INTER] if name == "down" else x)
            try:
                out, _ = fused_gemv(xin, w[name][0], pro, **pkw, **kn)
                us = graph_us(
                    lambda i, n=name, kn=kn, p=pro, pkw=pkw, xin=xin: fused_gemv(
                        xin, w[n][i], p, **pkw, **kn
                    ),
                    nl,
                )
                err = rel_err(out, ref) if pro == prologue[name] else float("nan")
                r["fused"].append(dict(cfg=cfg, prologue=pro, us=us, gbs=nbytes / us / 1e3, err=err))
            except Exception as e:
                r["fused"].append(dict(cfg=cfg, prologue=pro, error=str(e).splitlines()[0][:160]))
        r["cublas_gbs"] = nbytes / r["cublas_only_us"] / 1e3
        rows.append(r)

    print(f"\ncopy {copy:.0f} GB/s; per layer, in CUDA graphs over {L} weight sets")
    for r in rows:
        print(f"\n{r['shape']} {r['n']}x{r['k']} ({r['prologue']}): cuBLAS alone {r['cublas_only_us']:.2f} us "
              f"({r['cublas_gbs']:.0f} GB/s), unfused chain {r['unfused_us']:.2f} us (err {r['unfused_err']:.1e})")  # fmt: skip
        for f in r["fused"]:
            if "us" in f:
                print(
                    f"   {f['prologue']:8} {f['cfg']}: {f['us']:.2f} us {f['gbs']:.0f} GB/s err {f['err']:.1e}"
                )
            else:
                print(f"   {f['prologue']:8} {f['cfg']}: {f['error']}")
    if args.out:
        write_result(args.out, {"benchmark": "decode_linear_explore", **environment(), "copy_gbs": copy,
                                "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
