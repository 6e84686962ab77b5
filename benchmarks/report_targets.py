"""The README's goal tables ("targets"): each issue's must-show figures per device, from the newest JSON of each
kind in benchmarks/results/, measured against the goal as the issue states it (met / missed by how much).

benchmarks.report writes them into README.md between its targets markers.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _check(what: str, value: float | None, target: float, unit: str, higher: bool, source: str,
           bound: float | None = None, peer: str | None = None, short_run: str | None = None) -> str:  # fmt: skip
    """One row: measured value, target, met or missed by how much, and whether a missed goal is above
    ``bound`` (the ideal at the device's held matmul rate: then no engine meets it at this precision).
    ``peer``: a column before the result's (a published figure); ``short_run``: how the run fell short of the
    goal's method (fewer requests), said in the verdict."""
    goal = f"{'≥' if higher else '≤'} {target:g}{unit}"
    extra = "" if peer is None else f" {peer} |"
    if value is None:
        return f"| {what} | not measured | {goal} | - |{extra} {source} |"
    met = value >= target if higher else value <= target
    gap = (value / target - 1) * 100
    verdict = "met" if met else f"missed by {abs(gap):.1f}%"
    if not met and bound is not None and bound < target:
        verdict += f"; above the ideal at the held matmul rate ({bound:,.0f})"
    if short_run is not None:
        verdict = "met on fewer requests" if met else f"{short_run}: {verdict}"
    return f"| {what} | {value:,.1f}{unit} | {goal} | {verdict} |{extra} {source} |"


def _level(result: dict | None, mode: str, value: object = None) -> dict | None:
    """A serving result's level of ``mode`` (and ``value``), or None."""
    levels = (result or {}).get("levels", [])
    return next((lv for lv in levels if lv["mode"] == mode and (value is None or lv["value"] == value)), None)


def _out_tok_s(result: dict | None) -> float | None:
    """An offline throughput result's output tok/s, or None."""
    return result["inflight"]["output_tok_s"] if result else None


def _ideal(result: dict | None) -> float | None:
    """An offline throughput result's ideal at the held matmul rate (the bound of a missed goal), or None."""
    return ((result or {}).get("ideal") or {}).get("ideal_out_tok_s_sustained")


# Issue 5's offline goals per device (out tok/s); its serving latency goals (TTFT 20 ms, ITL 7 ms) are an H100's.
OFFLINE_GOALS = {
    "h100": {"1000/1000": 8_500, "128/128": 18_000},
    "h200": {"1000/1000": 10_000, "128/128": 20_000},
}
DEVICES = {"h100": "H100", "h200": "H200"}

# Issue 20's FP8 goals per device: out tok/s offline (trtllm-bench's method and counts), and TensorRT-LLM's
# published Llama-3.1-8B FP8 figures (perf-overview, TP1, v0.17 / v1.0) beside them.
FP8_GOALS = {
    "h100": {"128/128": 30_000, "1000/1000": 16_000, "2048/2048": 10_000, "128/2048": 23_500},
    "h200": {"128/128": 31_000, "1000/1000": 18_500, "2048/2048": 12_800, "128/2048": 27_000},
}
TRTLLM_FP8 = {
    "h100": {"128/128": 28_837, "1000/1000": 15_270, "2048/2048": 9_488, "128/2048": 22_714},
    "h200": {"128/128": 29_526, "1000/1000": 17_744, "2048/2048": 12_194, "128/2048": 26_221},
}
TRTLLM_TRITON_BF16 = {"h100": 9_420, "h200": 10_121}  # its published Triton serving figure, 467/256
TRTLLM_BENCH_REQUESTS = {"128/128": 30_000, "1000/1000": 3_000, "2048/2048": 1_500, "128/2048": 3_000}


def targets() -> str:
    """The issues' must-show figures, a table per device that has results (the H100 first), bf16 then FP8."""
    parts = []
    for tag, name in DEVICES.items():
        if any(RESULTS.glob(f"*-{tag}*.json")):
            parts.append(f"**{name}**\n\n" + device_targets(tag))
            parts.append(f"**{name}, FP8** (issue 20: W8A8 linears + FP8 KV, the 8B shape quantized at load)\n\n"
                         + fp8_targets(tag))  # fmt: skip
            parts.append(f"**{name}, past one GPU** (issue 22: the Llama-3-70B shape in FP8 + FP8 KV on dummy "
                         "weights; tensor parallelism)\n\n" + scaling_targets(tag))  # fmt: skip
    return "\n\n".join(parts)


def fp8_targets(tag: str) -> str:
    """Issue 20's rows on one device: each beside TensorRT-LLM's published FP8 figure and the FP8 ideal
    measured in the same run (the ideal at the held FP8 matmul rate)."""
    rows = ["| target | measured | goal | verdict | TensorRT-LLM FP8 | result |", "|---|---|---|---|---|---|"]
    for name, goal in FP8_GOALS[tag].items():
        file = f"fp8-throughput-{name.replace('/', 'x')}-{tag}.json"
        result = _load(file)
        value, bound = _out_tok_s(result), _ideal(result)
        # a shorter run than trtllm-bench's is not the goal's method: the verdict says so
        rows.append(_check(f"{name} offline FP8, out tok/s", value, goal, "", True, file, bound,
                           f"{TRTLLM_FP8[tag][name]:,}", _short(result, name)))  # fmt: skip
    decode = _load(f"fp8-decode-{tag}.json")
    value = 100 * decode["inflight"]["fraction_of_roofline"] if decode else None
    rows.append(_check("batch-1 decode 8B FP8, % of the FP8 weight-read roofline", value, 75, "%", True,
                       f"fp8-decode-{tag}.json", peer=""))  # fmt: skip
    rate2 = _level(_load(f"fp8-serving-{tag}.json"), "rate", 2)
    for key, goal in (("ttft_ms", 14), ("itl_ms", 4.5)):
        value = rate2["triton"][key]["p50"] if rate2 and rate2.get("triton") else None
        rows.append(_check(f"2 req/s 467/256 via Triton FP8: {key[:-3].upper()} p50", value, goal, " ms", False,
                           f"fp8-serving-{tag}.json", peer=""))  # fmt: skip
    gemm = _load(f"fp8-gemm-{tag}.json")
    for low, goal in ((1, 1.0), (1024, 1.4), (4096, 1.6)):
        ratios = [r["speedup_vs_bf16"] for r in (gemm or {}).get("linears", []) if r["m"] >= low]
        rows.append(_check(f"FP8 GEMM / bf16, 8B projections, worst at M >= {low}", min(ratios) if ratios else None,
                           goal, "x", True, f"fp8-gemm-{tag}.json", peer=""))  # fmt: skip
    for name, file in (("bf16", f"serving-{tag}.json"), ("FP8", f"fp8-serving-{tag}.json")):
        level = _level(_load(file), "unlimited")
        value = level["triton"]["output_tok_s"] if level and level.get("triton") else None
        rows.append(_check(f"467/256 through Triton, unlimited rate, {name}, out tok/s", value,
                           TRTLLM_TRITON_BF16[tag], "", True, file, peer=f"{TRTLLM_TRITON_BF16[tag]:,} (bf16, Triton)"))  # fmt: skip
    return "\n".join(rows)


def device_targets(tag: str) -> str:
    """The must-show figures on one device, from the newest JSON of each kind (targets as stated)."""
    rows = ["| target | measured | goal | verdict | result |", "|---|---|---|---|---|"]
    att = _load(f"attention-{tag}.json")
    e2e = sorted(RESULTS.glob(f"decode_e2e-{tag}-*.json"))
    thr128, thr1000 = _load(f"throughput-128x128-{tag}.json"), _load(f"throughput-1000x1000-{tag}.json")
    serving = _load(f"serving-{tag}.json")
    if att:
        rows.append(_check("decode attention, % of copy bandwidth", att["decode"]["default"]["pct_copy"], 80,
                           "%", True, f"attention-{tag}.json"))  # fmt: skip
        rows.append(_check("prefill attention 4k, % of bf16 matmul", att["prefill"]["default"]["pct_matmul"], 50,
                           "%", True, f"attention-{tag}.json"))  # fmt: skip
    if e2e:
        newest = json.loads(e2e[-1].read_text())
        rows.append(_check("batch-1 decode 8B, % of weight-read roofline",
                           100 * newest["inflight"]["fraction_of_roofline"], 75, "%", True, e2e[-1].name))  # fmt: skip
    goals = OFFLINE_GOALS[tag]
    for name, result, goal in (
        ("1000/1000", thr1000, goals["1000/1000"]),
        ("128/128", thr128, goals["128/128"]),
    ):
        value, bound = _out_tok_s(result), _ideal(result)
        rows.append(
            _check(
                f"{name} offline, out tok/s",
                value,
                goal,
                "",
                True,
                f"throughput-{name.replace('/', 'x')}-{tag}.json",
                bound,
            )
        )
    ratios = (thr128 or {}).get("ratios") or {}
    rows.append(_check("128/128: x HF eager (same run)", ratios.get("over_hf_eager"), 10, "x", True,
                       f"throughput-128x128-{tag}.json"))  # fmt: skip
    rows.append(_check("128/128: x transformers generate_batch (same run)",
                       ratios.get("over_hf_continuous_batching"), 1, "x", True, f"throughput-128x128-{tag}.json"))  # fmt: skip
    if serving:
        c256, rate2 = _level(serving, "concurrency", 256), _level(serving, "rate", 2)
        ratio = c256.get("triton_over_direct") if c256 else None
        rows.append(_check("Triton / engine-direct out tok/s at concurrency 256",
                           None if ratio is None else 100 * ratio, 95, "%", True, f"serving-{tag}.json"))  # fmt: skip
        for key, goal in (("ttft_ms", 20), ("itl_ms", 7)):
            value = rate2["triton"][key]["p50"] if rate2 and rate2.get("triton") else None
            whose = "" if tag == "h100" else " (the goal is H100's)"
            rows.append(_check(f"2 req/s 467/256 via Triton: {key[:-3].upper()} p50{whose}", value, goal,
                               " ms", False, f"serving-{tag}.json"))  # fmt: skip
    return "\n".join(rows)


# Issue 22's goals: the Llama-3-70B shape in FP8 with FP8 KV (dummy weights), trtllm-bench's method, out tok/s,
# beside TensorRT-LLM's published figures (TP1 on one H200; TP2 / TP4 on H100; its H200 TP scaling).
TP1_70B_GOALS = {"1000/1000": (3_200, 2_909), "128/128": (4_000, 3_658)}
TP_70B_GOALS = {"h100": {2: (4_500, 4_205), 4: (8_000, 7_427)}}
TP_70B_SCALING = {"h200": {2: 1.87, 4: 3.19}}


def _short(result: dict | None, name: str) -> str | None:
    """How a throughput run fell short of trtllm-bench's request count, or None."""
    count, wanted = int(result["workload"].split()[0]) if result else 0, TRTLLM_BENCH_REQUESTS[name]
    return f"on {count:,} requests, not {wanted:,}" if result and count != wanted else None


def scaling_targets(tag: str) -> str:
    """Issue 22's rows on one device: 70B FP8 on one GPU (H200), tensor-parallel speed-ups (several GPUs)."""
    rows = ["| target | measured | goal | verdict | TensorRT-LLM | result |", "|---|---|---|---|---|---|"]
    tp1 = {}
    for name, (goal, peer) in TP1_70B_GOALS.items():
        file = f"fp8-70b-throughput-{name.replace('/', 'x')}-{tag}.json"
        tp1[name] = result = _load(file)
        bound = _ideal(result)
        if tag == "h200":  # the goal is one H200's (141 GB): the 70B FP8 weights do not fit an H100
            rows.append(_check(f"70B FP8 {name} on one GPU, out tok/s", _out_tok_s(result), goal, "", True, file,
                               bound, f"{peer:,}", _short(result, name)))  # fmt: skip
    tp1_decode = _load(f"tp1-decode-{tag}.json")
    tp2_decode = _load(f"tp2-decode-{tag}.json")
    ratio = (
        tp2_decode["inflight"]["tok_s"] / tp1_decode["inflight"]["tok_s"]
        if tp1_decode and tp2_decode
        else None
    )
    rows.append(_check("8B bf16 batch-1 decode, TP 2 / TP 1", ratio, 1.6, "x", True, f"tp2-decode-{tag}.json",
                       peer=""))  # fmt: skip
    for size, (goal, peer) in TP_70B_GOALS.get(tag, {}).items():
        file = f"fp8-70b-tp{size}-throughput-1000x1000-{tag}.json"
        result = _load(file)
        rows.append(_check(f"70B FP8 1000/1000 at TP {size}, out tok/s", _out_tok_s(result), goal, "", True, file,
                           peer=f"{peer:,}", short_run=_short(result, "1000/1000")))  # fmt: skip
    for size, goal in TP_70B_SCALING.get(tag, {}).items():
        file = f"fp8-70b-tp{size}-throughput-1000x1000-{tag}.json"
        result, base = _load(file), _out_tok_s(tp1["1000/1000"])
        value = _out_tok_s(result) / base if result and base else None
        rows.append(_check(f"70B FP8 1000/1000, TP {size} / TP 1", value, goal, "x", True, file,
                           peer=f"{goal}x"))  # fmt: skip
    return "\n".join(rows)
