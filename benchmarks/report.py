"""Regenerate the README's performance table from the JSON results in benchmarks/results/.

python -m benchmarks.report          (rewrites the block between the markers in README.md)
"""

from __future__ import annotations

import json
from pathlib import Path

from .report_targets import RESULTS, _load, targets

ROOT = Path(__file__).resolve().parents[1]
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
