"""Shared pieces of the benchmarks: measured ceilings, environment facts, result files."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def copy_bandwidth_gbs(num_bytes: int = 4 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, read + write counted (the usual ceiling for reads)."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    del src, dst
    torch.cuda.empty_cache()
    return 2 * num_bytes / seconds / 1e9


def _matmul_operands(n: int, fp8: bool):
    """``(a, b, product)``: bf16 ``a @ b``, or FP8 (E4M3) ``a @ b`` through ``torch._scaled_mm`` with row-wise
    scales and bf16 out, as the engine's FP8 linear layers run it."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    if not fp8:
        return lambda: a @ b
    qa, qb = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # b column-major, as cuBLASLt wants
    sa = torch.ones(n, 1, dtype=torch.float32, device="cuda")
    sb = torch.ones(1, n, dtype=torch.float32, device="cuda")
    return lambda: torch._scaled_mm(qa, qb, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def matmul_tflops(n: int = 8192, iters: int = 20, fp8: bool = False) -> float:
    """bf16 (or FP8 with ``fp8``) ``n x n x n`` matmul rate in TFLOP/s."""
    product = _matmul_operands(n, fp8)
    for _ in range(3):
        product()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        product()
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 / (start.elapsed_time(end) / 1e3 / iters) / 1e12


def sustained_matmul_tflops(
    n: int = 8192, seconds: float = 3.0, window: int = 10, fp8: bool = False
) -> float:
    """bf16 (or FP8) ``n x n x n`` matmul rate held for ``seconds``: the median of the second half's windows.

    A burst (``matmul_tflops``) runs at the top clock; held, the GPU sits at its power limit and lowers its
    clocks (an H200 at 700 W, 2026-12-03: 1,980 MHz and 778 TFLOP/s for a burst, 1,410-1,545 MHz and 663
    held). A run of several seconds of GEMMs gets the held rate, so the ideal is given at both.
    """
    product = _matmul_operands(n, fp8)
    rates: list[float] = []
    end_at = time.perf_counter() + seconds
    while time.perf_counter() < end_at:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(window):
            product()
        end.record()
        end.synchronize()
        rates.append(2 * n**3 * window / (start.elapsed_time(end) / 1e3) / 1e12)
    held = sorted(rates[len(rates) // 2 :])
    return held[len(held) // 2]


def cpu_copy_bandwidth_gbs(num_bytes: int = 256 << 20, iters: int = 5) -> float:
    """Host memory copy bandwidth in GB/s (read + write counted), torch on the CPU."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    return 2 * num_bytes * iters / (time.perf_counter() - start) / 1e9


def cpu_matmul_gflops(n: int = 1024, iters: int = 5) -> float:
    """fp32 ``n x n x n`` matmul rate on the CPU in GFLOP/s (the CPU path computes in fp32)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e9


def ceilings(fp8: bool = False) -> dict[str, Any]:
    """The device's measured ceilings, same run: copy bandwidth and matmul rate (GPU: bf16, and FP8 too with
    ``fp8``; CPU: fp32)."""
    if torch.cuda.is_available():
        c = {"kind": "cuda", "copy_bandwidth_gbs": round(copy_bandwidth_gbs(), 1),
             "bf16_matmul_tflops": round(matmul_tflops(), 1),
             "bf16_matmul_sustained_tflops": round(sustained_matmul_tflops(), 1)}  # fmt: skip
        if fp8:
            c["fp8_matmul_tflops"] = round(matmul_tflops(fp8=True), 1)
            c["fp8_matmul_sustained_tflops"] = round(sustained_matmul_tflops(fp8=True), 1)
        return c
    return {"kind": "cpu", "threads": torch.get_num_threads(),
            "copy_bandwidth_gbs": round(cpu_copy_bandwidth_gbs(), 2),
            "fp32_matmul_gflops": round(cpu_matmul_gflops(), 1)}  # fmt: skip


def describe_ceilings(c: dict[str, Any]) -> str:
    """One line for a log or a table cell."""
    if c.get("kind") == "cuda":
        held = c.get("bf16_matmul_sustained_tflops")  # results before 2026-12-03 lack it
        fp8 = c.get("fp8_matmul_tflops")
        return (f"copy {c['copy_bandwidth_gbs']:.0f} GB/s, bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s"
                + (f" ({held:.0f} held)" if held else "")
                + (f", FP8 matmul {fp8:.0f} TFLOP/s ({c['fp8_matmul_sustained_tflops']:.0f} held)" if fp8 else ""))  # fmt: skip
    return (f"CPU ({c['threads']} threads): copy {c['copy_bandwidth_gbs']:.1f} GB/s, "
            f"fp32 matmul {c['fp32_matmul_gflops']:.0f} GFLOP/s")  # fmt: skip


def environment() -> dict[str, Any]:
    import triton

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                     "transformers": tf_version, "cuda": torch.version.cuda},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }  # fmt: skip


def add_engine_option_argument(parser: Any) -> None:
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra engine option (JSON value), e.g. async_scheduling=false")  # fmt: skip


def engine_option_values(items: list[str]) -> dict[str, Any]:
    """``--engine-option KEY=VALUE`` arguments (JSON values) as a dict."""
    return {k: json.loads(v) for k, v in (item.split("=", 1) for item in items)}


def write_result(path: Path | str, result: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
