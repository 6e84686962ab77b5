"""Regenerate the README's performance table from the JSON results in benchmarks/results/.

python -m benchmarks.report          (rewrites the block between the markers in README.md)
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"
HEADER = ["| what | inflight | peer, same run | measured ceiling, same run | device, date |",
          "|---|---|---|---|---|"]  # fmt: skip


def _decode_e2e(r: dict) -> list[tuple[str, str, str, str]]:
    ours, hf, c = r["inflight"], r.get("hf_eager") or {}, r["ceilings"]
    return [(
        f"batch-1 decode, {r['model']}, {r['prompt_len']} in / {r['new_tokens']} out",
        f"{ours['tok_s']:.1f} tok/s = {100 * ours['fraction_of_roofline']:.1f}% of roofline "
        f"({c['roofline_tok_s']:.0f} tok/s); CPU {100 * ours['cpu_fraction_of_step']:.0f}% of a step",
        f"HF eager {hf.get('tok_s', 'n/a')} tok/s",
        f"copy {c['copy_bandwidth_gbs']:.0f} GB/s",
    )]  # fmt: skip


def _attention(r: dict) -> list[tuple[str, str, str, str]]:
    c, d, p = r["ceilings"], r["decode"], r["prefill"]
    ds, ps = d["shape"], p["shape"]
    return [
        (f"paged decode attention, batch {ds['batch']} x ctx {ds['context']}, "
         f"{ds['heads']}/{ds['kv_heads']} heads, d{ds['head_dim']}, {ds['dtype']}",
         f"{d['default']['kv_gbs']:.0f} GB/s = {d['default']['pct_copy']:.1f}% of copy",
         f"torch SDPA ({d['sdpa']['backend'].lower()}) {d['sdpa']['kv_gbs']:.0f} GB/s",
         f"copy {c['copy_gbs_read_plus_write']:.0f} GB/s"),
        (f"paged prefill attention, {ps['tokens']} tokens causal, {ps['heads']}/{ps['kv_heads']} heads, "
         f"d{ps['head_dim']}, {ps['dtype']}",
         f"{p['default']['tflops']:.0f} TFLOP/s = {p['default']['pct_matmul']:.1f}% of matmul",
         f"torch SDPA ({p['sdpa']['backend'].lower()}) {p['sdpa']['tflops']:.0f} TFLOP/s",
         f"bf16 matmul {c['bf16_matmul_8192_tflops']:.0f} TFLOP/s"),
    ]  # fmt: skip


def _gemv(r: dict) -> list[tuple[str, str, str, str]]:
    copy = r["ceilings"]["copy_bandwidth_gbs"]
    return [
        (f"batch-1 GEMV {s['shape']} ({s['n']}x{s['k']}, bf16)", f"Triton {s['triton_gbs']:.0f} GB/s",
         f"cuBLAS {s['cublas_gbs']:.0f} GB/s", f"copy {copy:.0f} GB/s")
        for s in r["shapes"]
    ]  # fmt: skip


def _ceiling(r: dict) -> str:
    c = r.get("ceilings")
    if not c:
        return "n/a"
    from benchmarks.common import describe_ceilings

    return describe_ceilings(c)


def _peer(name: str, peer: dict | None, ratio: float | None, detail: str) -> str | None:
    if not peer:
        return None
    if peer.get("output_tok_s"):
        times = f" (inflight {ratio:.1f}x)" if ratio else ""
        return f"{name} {peer['output_tok_s']:.0f} out tok/s ({detail}){times}"
    return f"{name} not run ({peer.get('skipped') or peer.get('error', 'no figure')})"


def _throughput(r: dict) -> list[tuple[str, str, str, str]]:
    ours, ratios = r["inflight"], r.get("ratios") or {}
    hf, cb = r.get("hf_eager"), r.get("hf_continuous_batching")
    peers = [
        _peer("HF eager", hf, ratios.get("over_hf_eager"), f"static batch {(hf or {}).get('batch_size')}"),
        _peer("HF generate_batch", cb, ratios.get("over_hf_continuous_batching"),
              f"{(cb or {}).get('num_requests')} requests"),
    ]  # fmt: skip
    return [(
        f"offline throughput, {r['model']}, {r['workload']}, max_num_seqs {r['engine']['max_num_seqs']}",
        f"{ours['output_tok_s']:.0f} out tok/s ({ours['total_tok_s']:.0f} total)"
        + (f"; GPU idle {100 * ours['host_bound_fraction']:.1f}% of the run"
           if ours.get("host_bound_fraction") is not None else "")
        + (f"; {100 * ours['fraction_of_ideal']:.1f}% of the ideal {r['ideal']['ideal_out_tok_s']:.0f} out tok/s "
           "at the measured ceilings" if ours.get("fraction_of_ideal") and r.get("ideal") else "")
        + (f" ({100 * ours['fraction_of_sustained_ideal']:.1f}% of {r['ideal']['ideal_out_tok_s_sustained']:.0f} "
           "at the held matmul rate)" if ours.get("fraction_of_sustained_ideal") else ""),  # fmt: skip
        "; ".join(p for p in peers if p) or "not run",
        _ceiling(r),
    )]  # fmt: skip


def _serving(r: dict) -> list[tuple[str, str, str, str]]:
    """The rate levels and the highest concurrency: Triton's figures next to engine-direct's."""
    conc = [level for level in r["levels"] if level["mode"] == "concurrency"]
    shown = [level for level in r["levels"] if level["mode"] == "rate"] + conc[-1:]
    rows = []
    for level in shown:
        triton, direct = level.get("triton"), level.get("engine_direct")
        if triton is None:
            continue
        where = f"{level['value']:g} req/s" if level["mode"] == "rate" else f"concurrency {level['value']}"
        figures = lambda s: (
            f"{s['output_tok_s']:.0f} out tok/s, {s['req_s']:.2f} req/s; TTFT p50 {s['ttft_ms']['p50']:.1f} / "
            f"p99 {s['ttft_ms']['p99']:.1f} ms; ITL p50 {s['itl_ms']['p50']:.1f} / p99 {s['itl_ms']['p99']:.1f} ms"
        )
        ratio = level.get("triton_over_direct")
        peer = (f"engine-direct {figures(direct)}" + (f" (Triton = {100 * ratio:.1f}%)" if ratio else "")
                if direct else "engine-direct not run")  # fmt: skip
        rows.append((f"serving via Triton gRPC, {r['model']}, {r['workload']}, {where}, streamed",
                     figures(triton), peer, _ceiling(r)))  # fmt: skip
    return rows


KINDS = {"decode_e2e_batch1": _decode_e2e, "gemv_batch1": _gemv, "offline_throughput": _throughput,
         "serving": _serving}  # fmt: skip


def table() -> str:
    lines = list(HEADER)
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        kind = KINDS.get(result.get("benchmark", ""), _attention if "prefill" in result else None)
        if kind is None:
            continue
        where = f"{result['device']}, {result['date'][:10]} ([json](benchmarks/results/{path.name}))"
        lines.extend(
            f"| {what} | {ours} | {peer} | {ceiling} | {where} |"
            for what, ours, peer, ceiling in kind(result)
        )
    return "\n".join(lines)


TARGETS_BEGIN, TARGETS_END = "<!-- targets:begin -->", "<!-- targets:end -->"


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
    return "\n\n".join(parts)


def fp8_targets(tag: str) -> str:
    """Issue 20's rows on one device: each beside TensorRT-LLM's published FP8 figure and the FP8 ideal
    measured in the same run (the ideal at the held FP8 matmul rate)."""
    rows = ["| target | measured | goal | verdict | TensorRT-LLM FP8 | result |", "|---|---|---|---|---|---|"]
    for name, goal in FP8_GOALS[tag].items():
        file = f"fp8-throughput-{name.replace('/', 'x')}-{tag}.json"
        result = _load(file)
        value = result["inflight"]["output_tok_s"] if result else None
        bound = ((result or {}).get("ideal") or {}).get("ideal_out_tok_s_sustained")
        count, wanted = int(result["workload"].split()[0]) if result else 0, TRTLLM_BENCH_REQUESTS[name]
        # a shorter run than trtllm-bench's is not the goal's method: the verdict says so
        short = f"on {count:,} requests, not {wanted:,}" if result and count != wanted else None
        rows.append(_check(f"{name} offline FP8, out tok/s", value, goal, "", True, file, bound,
                           f"{TRTLLM_FP8[tag][name]:,}", short))  # fmt: skip
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
        value = result["inflight"]["output_tok_s"] if result else None
        bound = ((result or {}).get("ideal") or {}).get("ideal_out_tok_s_sustained")
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


PROFILE_BEGIN, PROFILE_END = "<!-- profile:begin -->", "<!-- profile:end -->"


def profile_table(result: dict) -> str:
    """Where each profiled step's GPU time goes (``benchmarks/kernels/profile_steps.py``), beside the ideal."""

    def group(row: dict, name: str) -> str:
        g = row["groups"][name]
        frac = g.get("fraction_of_ideal")
        return f"{g['ms']:.2f}" + ("" if frac is None else f" ({100 * frac:.0f}%)")

    lines = ["| step | eager step, ms | kernels, ms | ideal, ms | matmul, ms (% of ideal) | attention | "
             "RoPE + KV write | RMSNorm | SiLU-and-mul | other | mixed-step graph, ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["steps"]:
        graph = row.get("graph_step_ms")
        cells = [row["step"], f"{row['eager_step_ms']:.2f}", f"{row['kernel_ms']:.2f}", f"{row['ideal_ms']:.2f}",
                 *(group(row, g) for g in ("matmul", "attention", "rope+kv write", "rmsnorm", "silu_and_mul",
                                           "other")),
                 "not run" if graph is None else f"{graph:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    c = result["ceilings"]
    lines.append(f"\n{result['device']}, {result['date'][:10]}, ceilings copy {c['copy_bandwidth_gbs']:.0f} GB/s, "
                 f"bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s "
                 f"([json](benchmarks/results/profile-steps-{_tag(result)}.json)).")  # fmt: skip
    return "\n".join(lines)


QUALITY_BEGIN, QUALITY_END = "<!-- quality:begin -->", "<!-- quality:end -->"
QUALITY_INTRO = (
    "**FP8 quality** (`make quality`: `benchmarks/quality.py`): the model's perplexity on the first N windows "
    "of 512 tokens of the Wikipedia sample in the gensim 4.4.0 wheel, in full precision (HF transformers and "
    'inflight) and with inflight\'s FP8 (`quantization="fp8"`: W8A8 E4M3; `kv_cache_dtype="fp8"`), beside '
    "HF with fake-quantized W8A8 linears. Bounds: FP8 at most +3.5% over inflight's full precision, the FP8 KV "
    "cache at most +1% more, FP8 within 0.5% of the fake-quant reference."
)


def _ppl(result: dict, name: str) -> str:
    """A perplexity and its difference from inflight's full precision; the error if the run failed."""
    value, full = result["perplexity"].get(name), result["perplexity"].get("engine")
    if value is None:
        error = result.get("errors", {}).get(name, "no figure").replace("|", "\\|")
        return f"failed ({error})"
    if name == "engine" or full is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({100 * (value / full - 1):+.2f}%)"


def _signed_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}%"


def quality_row(r: dict, name: str) -> str:
    """A quality result's row: each perplexity with its difference from inflight's full precision."""
    missed = [f"{b['name']} {_signed_pct(b['value'])}" for b in r["bounds"] if not b["passed"]]
    verdict = "all met" if not missed else "missed: " + ", ".join(missed)
    return (
        f"| {r['model']} ({r['dtype']}), {r['windows']} x {r['window_tokens']} tokens "
        f"| {_ppl(r, 'hf')} | {_ppl(r, 'engine')} | {_ppl(r, 'engine_fp8')} | {_ppl(r, 'engine_fp8_kv')} "
        f"| {_ppl(r, 'hf_fake_w8a8')} | {verdict} "
        f"| {r['device']}, {r['date'][:10]} ([json](benchmarks/results/{name})) |"
    )


def quality_table() -> str:
    """One row per ``quality-<tag>.json`` (``benchmarks/quality.py``)."""
    lines = [QUALITY_INTRO, "",
             "| model, text | HF full precision | inflight full precision | inflight FP8 W8A8 | "
             "inflight FP8 W8A8 + FP8 KV | HF fake-quant W8A8 | bounds | device, date |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    paths = sorted(RESULTS.glob("quality-*.json"))
    lines += [quality_row(json.loads(path.read_text()), path.name) for path in paths]
    if not paths:
        lines.append("| not measured yet: run `make quality` | | | | | | | |")
    return "\n".join(lines)


def _tag(result: dict) -> str:
    return "h200" if "H200" in result["device"] else "h100" if "H100" in result["device"] else "gpu"


def _replace(text: str, begin: str, end: str, body: str) -> str:
    head, rest = text.split(begin, 1)
    return head + f"{begin}\n{body}\n{end}" + rest.split(end, 1)[1]


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if TARGETS_BEGIN in text:
        text = _replace(text, TARGETS_BEGIN, TARGETS_END, targets())
    profile = _load("profile-steps-h200.json")
    if profile and PROFILE_BEGIN in text:
        text = _replace(text, PROFILE_BEGIN, PROFILE_END, profile_table(profile))
    if QUALITY_BEGIN in text:
        text = _replace(text, QUALITY_BEGIN, QUALITY_END, quality_table())
    block = f"{BEGIN}\n{table()}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = (text.rstrip() + "\n\n## Performance\n\nGenerated by `python -m benchmarks.report` from "
                "`benchmarks/results/*.json` (do not edit by hand).\n\n" + block + "\n")  # fmt: skip
    readme.write_text(text)
    print(table())


if __name__ == "__main__":
    main()
