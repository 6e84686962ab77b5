"""FP8 (W8A8) linears on the Llama-3-8B projection shapes: bf16 ``F.linear`` against the FP8 paths, from the
same bf16 activation x, and the quantization kernels' bandwidth.

    python -m benchmarks.kernels.bench_fp8_gemm --out benchmarks/results/fp8-gemm-h100.json [--smoke]

Per shape and M (1 .. 16384):
  bf16          F.linear(x, W)
  gemm          quantize_per_token(x) + fp8_gemm (torch._scaled_mm, row-wise scales); "gemm only": without
                the quantization (q given)
  gemv          fp8_gemv(x) for M <= 16 (kernels.fp8_gemv.MAX_M): the quantize-first form, and the fused
                form for M <= 8 (the engine's FUSE_MAX_M is picked from these)
The engine takes the GEMV up to MAX_M and the GEMM above; the last lines say where the GEMV stops winning.
Times: medians of triton.testing.do_bench over a CUDA graph of the call (CUDA events, L2 flushed before
every run, so W comes from HBM as in a model's forward pass; no launch overhead, as in the engine's graphs). GB/s counts the FP8 weight bytes read once; TFLOP/s 2*M*N*K.

Then GB/s of quantize_per_token, rms_norm_quant (with the residual) and silu_and_mul_quant against the copy
ceiling measured in the same run, beside their unfused chains (rms_norm / silu_and_mul + quantize_per_token).
``--quant-sweep``: also quantize_per_token and silu_and_mul_quant in each of kernels.fp8.quantize_row's
layouts (one block a row; chunks of BLOCK columns by num_warps warps), the bf16 silu_and_mul beside them:
how kernels.fp8's QUANT_* constants are chosen.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from benchmarks.common import copy_bandwidth_gbs, environment, matmul_tflops, write_result
from inflight.kernels import fp8
from inflight.kernels.activation import silu_and_mul, silu_and_mul_quant
from inflight.kernels.fp8 import fp8_gemm, quantize_per_token, quantize_weight_per_channel_reference
from inflight.kernels.fp8_gemv import MAX_M, fp8_gemv
from inflight.kernels.rms_norm import rms_norm, rms_norm_quant

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336)}  # fmt: skip
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
FUSED_MAX_M = 8  # each M is its own compile of the fused form (the quantization is unrolled over the rows)
QUANT_CASES = [(1, 4096), (16, 4096), (256, 4096), (4096, 4096), (16384, 4096), (4096, 14336), (16384, 14336)]
BF16 = torch.bfloat16


def bench_us(fn) -> float:
    """Median microseconds of ``fn`` captured in a CUDA graph (as the engine runs decode and small mixed steps:
    no per-kernel launch overhead in the figure), L2 flushed before each replay by do_bench."""
    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=10, rep=40, return_mode="median") * 1e3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear_case(m: int, w: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> dict:
    n, k = w.shape
    x = torch.randn(m, k, dtype=BF16, device="cuda")
    q, a_scale = quantize_per_token(x)
    r = {"n": n, "k": k, "m": m}
    r["bf16_us"] = bench_us(lambda: F.linear(x, w))
    r["gemm_us"] = bench_us(lambda: fp8_gemm(*quantize_per_token(x), w_q, w_scale, BF16))
    r["gemm_only_us"] = bench_us(lambda: fp8_gemm(q, a_scale, w_q, w_scale, BF16))
    y_gemm = fp8_gemm(q, a_scale, w_q, w_scale, BF16)
    r["fp8_vs_bf16_err"] = rel_err(y_gemm, F.linear(x, w))  # the quantization's own error
    if m <= MAX_M:
        r["gemv_quantize_first_us"] = bench_us(lambda: fp8_gemv(x, w_q, w_scale, fuse=False))
        r["gemv_vs_gemm_err"] = rel_err(fp8_gemv(x, w_q, w_scale, fuse=False)[0], y_gemm)
    if m <= FUSED_MAX_M:
        r["gemv_fused_us"] = bench_us(lambda: fp8_gemv(x, w_q, w_scale, fuse=True))
        r["gemv_fused_vs_gemm_err"] = rel_err(fp8_gemv(x, w_q, w_scale, fuse=True)[0], y_gemm)
    r["best_fp8"] = min((key for key in ("gemm_us", "gemv_quantize_first_us", "gemv_fused_us") if key in r),
                        key=r.__getitem__)  # fmt: skip
    fp8_us = r[r["best_fp8"]]
    r["speedup_vs_bf16"] = r["bf16_us"] / fp8_us
    r["fp8_weight_gbs"] = n * k / fp8_us / 1e3
    r["fp8_tflops"] = 2 * m * n * k / fp8_us / 1e6
    return r


def linear_rows(shapes: dict, ms: list[int]) -> list[dict]:
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, dtype=BF16, device="cuda") / k**0.5
        w_q, w_scale = quantize_weight_per_channel_reference(w)
        rows += [{"shape": name, **linear_case(m, w, w_q, w_scale)} for m in ms]
        print(f"{name}: done", flush=True)
    return rows


def quant_case(m: int, k: int, copy_gbs: float) -> dict:
    x = torch.randn(m, k, dtype=BF16, device="cuda")
    res = torch.randn(m, k, dtype=BF16, device="cuda")
    g = torch.randn(k, dtype=BF16, device="cuda")
    act = torch.randn(m, 2 * k, dtype=BF16, device="cuda")
    r = {"m": m, "k": k}
    # bytes moved: quantize reads 2 B and writes 1 B an element; rms_norm_quant reads x and the residual,
    # writes the new residual and q; silu_and_mul_quant reads gate and up, writes q
    for key, nbytes, fused, unfused in [
        ("quantize_per_token", 3 * m * k, lambda: quantize_per_token(x), None),
        ("rms_norm_quant", 7 * m * k, lambda: rms_norm_quant(x, g, 1e-5, res),
         lambda: quantize_per_token(rms_norm(x, g, 1e-5, res)[0])),
        ("silu_and_mul_quant", 5 * m * k, lambda: silu_and_mul_quant(act),
         lambda: quantize_per_token(silu_and_mul(act))),
    ]:  # fmt: skip
        us = bench_us(fused)
        r[key] = {"us": us, "gbs": nbytes / us / 1e3, "pct_copy": 100 * nbytes / us / 1e3 / copy_gbs}
        if unfused is not None:
            r[key]["unfused_us"] = bench_us(unfused)
    return r


# quantize_row's layouts: None = one block a row; (BLOCK, num_warps) = chunked
SWEEP_LAYOUTS = [None, (1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)]
SWEEP_CASES = [(m, k) for k in (4096, 14336) for m in (256, 1024, 4096, 16384)]


def quant_sweep(copy_gbs: float) -> list[dict]:
    """Each (M, K) of SWEEP_CASES in each layout: us and % of copy of quantize_per_token / silu_and_mul_quant."""
    saved = fp8.QUANT_CHUNKED_ABOVE, fp8.QUANT_CHUNK, fp8.QUANT_CHUNK_WARPS
    rows = []
    try:
        for m, k in SWEEP_CASES:
            x = torch.randn(m, k, dtype=BF16, device="cuda")
            act = torch.randn(m, 2 * k, dtype=BF16, device="cuda")
            row = {"m": m, "k": k, "silu_and_mul_bf16_us": bench_us(lambda act=act: silu_and_mul(act))}
            for layout in SWEEP_LAYOUTS:
                if layout is None:
                    fp8.QUANT_CHUNKED_ABOVE = 1 << 30
                else:
                    fp8.QUANT_CHUNKED_ABOVE, (fp8.QUANT_CHUNK, fp8.QUANT_CHUNK_WARPS) = 0, layout
                name = "one_block" if layout is None else f"chunk{layout[0]}_w{layout[1]}"
                for key, nbytes, fn in [("quantize_per_token", 3 * m * k, lambda x=x: quantize_per_token(x)),
                                        ("silu_and_mul_quant", 5 * m * k, lambda act=act: silu_and_mul_quant(act))]:  # fmt: skip
                    us = bench_us(fn)
                    row[f"{key}/{name}"] = {
                        "us": round(us, 2),
                        "pct_copy": round(100 * nbytes / us / 1e3 / copy_gbs, 1),
                    }
            rows.append(row)
            best = {key: min((v["us"], name.split("/")[1]) for name, v in row.items()
                             if isinstance(v, dict) and name.startswith(key))
                    for key in ("quantize_per_token", "silu_and_mul_quant")}  # fmt: skip
            print(f"sweep {m}x{k}: silu_and_mul bf16 {row['silu_and_mul_bf16_us']:.1f} us; "
                  + "; ".join(f"{key} " + ", ".join(f"{n.split('/')[1]} {v['us']:.1f} ({v['pct_copy']:.0f}%)"
                              for n, v in row.items() if isinstance(v, dict) and n.startswith(key))
                              + f" -> best {best[key][1]}" for key in best), flush=True)  # fmt: skip
    finally:
        fp8.QUANT_CHUNKED_ABOVE, fp8.QUANT_CHUNK, fp8.QUANT_CHUNK_WARPS = saved
    return rows


# fp8_gemv's tiles: (BLOCK_N, BLOCK_K, num_warps, num_stages), the row kernel at M = 1, the dot kernel at M = 1 .. 16
ROW_CONFIGS = [
    (bn, bk, w, st) for bn in (8, 16, 32) for bk in (512, 1024, 2048) for w in (4, 8) for st in (2, 3, 4)
]
DOT_CONFIGS = [(bn, bk, 4, st) for bn in (16, 32, 64) for bk in (256, 512) for st in (3, 4, 5)]


def gemv_sweep(copy_gbs: float) -> list[dict]:
    """Every 8B projection at M = 1, 4, 16 (E4M3 input, as the engine calls it after quantize-first): us and
    % of copy of the W read in each tile config, both kernels at M = 1; the best of each form last."""
    rows = []
    for name, (n, k) in SHAPES.items():
        w_q, w_scale = quantize_weight_per_channel_reference(
            torch.randn(n, k, dtype=BF16, device="cuda") / k**0.5
        )
        for m in (1, 4, 16):
            q, a_scale = quantize_per_token(torch.randn(m, k, dtype=BF16, device="cuda"))
            ref = fp8_gemm(q, a_scale, w_q, w_scale, BF16)
            for form, configs in (("row", ROW_CONFIGS if m == 1 else []), ("dot", DOT_CONFIGS)):
                for bn, bk, nw, st in configs:
                    kw = dict(a_scale=a_scale, out_dtype=BF16, row=form == "row", block_n=bn, block_k=bk,
                              num_warps=nw, num_stages=st)  # fmt: skip
                    call = functools.partial(fp8_gemv, q, w_q, w_scale, **kw)
                    try:
                        err = rel_err(call()[0], ref)
                        us = bench_us(call)
                    except Exception as exc:  # a tile that does not fit (shared memory, registers)
                        rows.append({"shape": name, "m": m, "form": form, "config": [bn, bk, nw, st],
                                     "error": str(exc)[:200]})  # fmt: skip
                        continue
                    rows.append({"shape": name, "m": m, "form": form, "config": [bn, bk, nw, st], "us": round(us, 2),
                                 "pct_copy": round(100 * n * k / us / 1e3 / copy_gbs, 1), "rel_err": err})  # fmt: skip
            for form in ("row", "dot"):
                ok = sorted((r for r in rows if (r["shape"], r["m"], r["form"]) == (name, m, form) and "us" in r),
                            key=lambda r: r["us"])  # fmt: skip
                if ok:
                    print(
                        f"gemv sweep {name} M={m} {form}: best "
                        + ", ".join(f"{r['config']} {r['us']:.1f} us ({r['pct_copy']:.0f}%)" for r in ok[:3]),
                        flush=True,
                    )
    return rows


def print_tables(linear: list[dict], quant: list[dict], ceilings: dict) -> None:
    print(f"\nceilings: copy {ceilings['copy_bandwidth_gbs']:.0f} GB/s, bf16 matmul {ceilings['bf16_matmul_tflops']:.0f}"
          f" TFLOP/s, fp8 row-wise matmul {ceilings['fp8_rowwise_matmul_tflops']:.0f} TFLOP/s")  # fmt: skip
    print(
        "\nquantization (bf16 in), us and GB/s (% of copy); unfused: rms_norm / silu_and_mul + quantize_per_token"
    )
    for r in quant:
        cells = [f"{key.split('_')[0]} {v['us']:.1f} ({v['gbs']:.0f}, {v['pct_copy']:.0f}%)"
                 + (f" unfused {v['unfused_us']:.1f}" if "unfused_us" in v else "")
                 for key, v in r.items() if isinstance(v, dict)]  # fmt: skip
        print(f"  {r['m']:>6}x{r['k']:<6} " + " | ".join(cells))
    head = f"{'shape':<13}{'M':>6}{'bf16':>9}{'gemm':>9}{'only':>9}{'gemv qf':>9}{'gemv fu':>9}"
    print(f"\nlinears, us (gemm = quantize + _scaled_mm; only = _scaled_mm alone)\n{head}  best fp8")
    for r in linear:
        cell = lambda key, r=r: f"{r[key]:>9.1f}" if key in r else f"{'-':>9}"
        print(f"{r['shape']:<13}{r['m']:>6}" + "".join(cell(key) for key in ("bf16_us", "gemm_us", "gemm_only_us",
              "gemv_quantize_first_us", "gemv_fused_us"))
              + f"  x{r['speedup_vs_bf16']:.2f} {r['fp8_weight_gbs']:.0f} GB/s {r['fp8_tflops']:.0f} TFLOP/s")  # fmt: skip
    for name in dict.fromkeys(r["shape"] for r in linear):
        wins = [r["m"] for r in linear if r["shape"] == name and r["best_fp8"] != "gemm_us"]
        fused = [r["m"] for r in linear if r["shape"] == name and r["best_fp8"] == "gemv_fused_us"]
        print(f"{name}: a GEMV form is fastest at M = {wins or 'none'} (the fused one at {fused or 'none'})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    parser.add_argument(
        "--model", help="ignored (make bench passes every step its model); the 8B shapes are fixed"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="one shape, three M: a quick check of the script"
    )
    parser.add_argument("--quant-sweep", action="store_true", help="time quantize_row's layouts too")
    parser.add_argument("--gemv-sweep", action="store_true", help="time fp8_gemv's tile configs (both forms)")
    parser.add_argument("--quant-only", action="store_true", help="the quantization parts only (no linears)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.manual_seed(0)
    shapes = {"o_proj": SHAPES["o_proj"]} if args.smoke else SHAPES
    ms = [1, 16, 256] if args.smoke else MS
    ceilings = {"copy_bandwidth_gbs": round(copy_bandwidth_gbs(), 1), "bf16_matmul_tflops": round(matmul_tflops(), 1),
                "fp8_rowwise_matmul_tflops": round(matmul_tflops(fp8=True), 1)}  # fmt: skip
    quant = [
        quant_case(m, k, ceilings["copy_bandwidth_gbs"])
        for m, k in (QUANT_CASES[:2] if args.smoke else QUANT_CASES)
    ]
    sweep = quant_sweep(ceilings["copy_bandwidth_gbs"]) if args.quant_sweep else None
    gemv = gemv_sweep(ceilings["copy_bandwidth_gbs"]) if args.gemv_sweep else None
    linear = [] if args.quant_only else linear_rows(shapes, ms)
    if args.out:
        write_result(args.out, {"benchmark": "fp8_gemm", **environment(), "ceilings": ceilings,
                                "fused_max_m": FUSED_MAX_M, "gemv_max_m": MAX_M, "quantization": quant,
                                "quant_layout": {"chunked_above": fp8.QUANT_CHUNKED_ABOVE, "chunk": fp8.QUANT_CHUNK,
                                                 "chunk_warps": fp8.QUANT_CHUNK_WARPS},
                                "quant_sweep": sweep, "gemv_sweep": gemv, "linears": linear})  # fmt: skip
    print_tables(linear, quant, ceilings)


if __name__ == "__main__":
    main()
