"""PNG plots of the benchmark results (matplotlib, the `bench` extra), written next to their JSON.

    python -m benchmarks.plots benchmarks/results/serving-h200.json ...   (re-plot saved results)

Serving: `<stem>-throughput.png` (output tok/s vs concurrency, Triton and engine-direct) and
`<stem>-latency.png` (TTFT / ITL / E2E p50, p90, p99 vs concurrency and vs request rate).
Offline throughput: `<stem>.png` (out tok/s of inflight and its peers).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

STYLES = {"triton": ("Triton", "-"), "engine_direct": ("engine-direct", "--")}
METRICS = (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (`pip install -e '.[bench]'`, or re-plot later with "
              "`python -m benchmarks.plots RESULT.json`)", flush=True)  # fmt: skip
        return None
    return plt


def plot_serving(result: dict[str, Any], json_path: Path) -> list[Path]:
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    title = f"{result['model']}, {result['workload']}, {result['device']}"
    by_mode = {m: [r for r in result["levels"] if r["mode"] == m] for m in ("concurrency", "rate")}
    targets = [t for t in STYLES if any(t in r for r in result["levels"])]
    conc = by_mode["concurrency"]
    if conc:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for t in targets:
            label, style = STYLES[t]
            ax.plot(
                [r["value"] for r in conc],
                [r[t]["output_tok_s"] for r in conc],
                style,
                marker="o",
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set(xlabel="concurrency (requests in flight)", ylabel="output tokens/s", title=title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        written.append(_save(fig, json_path.with_name(json_path.stem + "-throughput.png"), plt))
    modes = [m for m in ("concurrency", "rate") if by_mode[m]]
    if modes:
        fig, axes = plt.subplots(len(modes), 3, figsize=(15, 4 * len(modes)), squeeze=False)
        for row, mode in enumerate(modes):
            levels = by_mode[mode]
            for col, (key, name) in enumerate(METRICS):
                ax = axes[row][col]
                for t in targets:
                    label, style = STYLES[t]
                    for pct, marker in (("p50", "o"), ("p90", "s"), ("p99", "^")):
                        ys = [r[t][key][pct] for r in levels]
                        ax.plot(
                            [r["value"] for r in levels], ys, style, marker=marker, label=f"{label} {pct}"
                        )
                if mode == "concurrency":
                    ax.set_xscale("log", base=2)
                ax.set(xlabel="concurrency" if mode == "concurrency" else "request rate (req/s)",
                       ylabel=f"{name} (ms)", title=f"{name} vs {mode}")  # fmt: skip
                ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title)
        written.append(_save(fig, json_path.with_name(json_path.stem + "-latency.png"), plt))
    return written


def plot_throughput(result: dict[str, Any], json_path: Path) -> list[Path]:
    plt = _pyplot()
    if plt is None:
        return []
    bars = [("inflight", result["inflight"]["output_tok_s"])]
    for key, name in (("hf_eager", "HF eager"), ("hf_continuous_batching", "HF generate_batch")):
        peer = result.get(key) or {}
        if peer.get("output_tok_s"):
            bars.append((name, peer["output_tok_s"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=["C0", "C1", "C2"][: len(bars)])
    for i, (_, value) in enumerate(bars):
        ax.text(i, value, f"{value:.0f}", ha="center", va="bottom")
    ideal = result.get("ideal") or {}
    for key, label, style in (("ideal_out_tok_s", "ideal at the burst matmul rate", "--"),
                              ("ideal_out_tok_s_sustained", "ideal at the held matmul rate", ":")):  # fmt: skip
        if ideal.get(key):
            ax.axhline(ideal[key], color="0.3", linestyle=style, label=f"{label}: {ideal[key]:.0f}")
    if ideal:
        top = max([b[1] for b in bars] + [v for k, v in ideal.items() if k.startswith("ideal_out_tok_s")])
        ax.set_ylim(top=1.2 * top)  # room for the legend above the lines
        ax.legend(loc="upper right", fontsize="small")
    ax.set(ylabel="output tokens/s", title=f"{result['model']}, {result['workload']}\n{result['device']}")
    return [_save(fig, json_path.with_suffix(".png"), plt)]


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", flush=True)
    return path


def main(paths: list[str]) -> None:
    for name in paths:
        path = Path(name)
        result = json.loads(path.read_text())
        if result.get("benchmark") == "serving":
            plot_serving(result, path)
        elif result.get("benchmark") == "offline_throughput":
            plot_throughput(result, path)


if __name__ == "__main__":
    main(sys.argv[1:])
