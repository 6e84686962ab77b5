"""Serving benchmark: streamed requests through Triton (gRPC) and engine-direct, same schedule, same run.

    python -m benchmarks.serving --model /tmp/inflight-llama31-8b-random --isl 467 --osl 256 \\
        --rate 2 --concurrency 1,16,64,256 --out benchmarks/results/serving-h200.json

For each level (a Poisson request rate, or a fixed number of requests kept in flight) the same
random-token prompts (sent as token ids: exact lengths), greedy with `ignore_eos` and exactly `osl` output
tokens, go first into the engine in this process (`EngineService`, engine-direct), then through a
tritonserver this script starts with the same engine settings (or `--server-url`). Reports TTFT, ITL,
TPOT and E2E latency (mean, p50, p90, p99, ms) and output tok/s, req/s for both, the ratio
Triton / engine-direct, and the device's measured ceilings. JSON to `--out`, PNG plots beside it.
`--engine-option load_format="dummy"` (both targets: the Triton model's parameter too) runs on random
weights drawn at load, from a folder without weights (`python -m benchmarks.random_models --config-only`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    add_engine_option_argument,
    ceilings,
    describe_ceilings,
    engine_option_values,
    environment,
    write_result,
)
from benchmarks.loadgen import RequestSpec, drive, schedule, summarize

TARGETS = ("engine_direct", "triton")


def _levels(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rate levels first (lowest first), then concurrency levels, each with its own request count."""
    levels = [{"mode": "rate", "value": r, "num_requests": args.rate_requests} for r in args.rate]
    levels += [
        {
            "mode": "concurrency",
            "value": c,
            "num_requests": max(args.min_requests, args.requests_per_slot * c),
        }
        for c in args.concurrency
    ]
    if args.unlimited:  # every request sent at once (TensorRT-LLM's Triton figure's setting)
        levels.append({"mode": "unlimited", "value": "all at once", "num_requests": args.unlimited})
    return levels


def _specs(level: dict[str, Any], args: argparse.Namespace, vocab: int, index: int) -> list[RequestSpec]:
    # NOTE: a seed per level, so no level repeats an earlier one's prompts (prefix caching is off anyway).
    lengths_in = tuple(args.random_lengths) if args.random_lengths else args.isl
    lengths_out = tuple(args.random_lengths) if args.random_lengths else args.osl
    rate = level["value"] if level["mode"] == "rate" else None
    return schedule(level["num_requests"], lengths_in, lengths_out, vocab, rate=rate, seed=1000 + index)


def _label(level: dict[str, Any]) -> str:
    if level["mode"] == "unlimited":
        return f"{level['num_requests']} at once"
    return f"{level['value']} req/s" if level["mode"] == "rate" else f"concurrency {level['value']}"


_RATE_STREAMS = 16  # streams opened before a rate level (more open when more requests are in flight)


def run_level(target: Any, specs: list[RequestSpec], level: dict[str, Any], timeout_s: float) -> dict:
    """Drive one level through one target with a progress bar; its summary."""
    from tqdm import tqdm

    bar = tqdm(
        total=len(specs),
        desc=f"{target.name:>13} {_label(level):>16}",
        unit="req",
        leave=False,
        mininterval=1.0,
    )
    lock = threading.Lock()

    def progress(count: int) -> None:
        with lock:
            bar.update(count - bar.n)

    metrics_url = getattr(target, "metrics_url", None)
    try:
        concurrency = level["value"] if level["mode"] == "concurrency" else None
        if hasattr(target, "prewarm"):
            target.prewarm(concurrency or (len(specs) if level["mode"] == "unlimited" else _RATE_STREAMS))
        before = _server_counters(metrics_url) if metrics_url else None
        start = time.monotonic()
        records = drive(specs, target, concurrency=concurrency, progress=progress, timeout_s=timeout_s)
        wall = time.monotonic() - start
        after = _server_counters(metrics_url) if metrics_url else None
    finally:
        bar.close()
    summary = summarize(records)
    if before is not None and after is not None:
        summary.update(server_side(before, after, wall))
    return summary


# The server's counters that say where the Triton layer's time goes (``inflight_*`` families).
_SERVER_COUNTERS = (
    "inflight_time_to_first_token_seconds_sum",
    "inflight_time_to_first_token_seconds_count",
    "inflight_cancellation_checks_total",
    "inflight_cancellation_check_seconds_total",
    "inflight_responses_sent_total",
    "inflight_response_send_seconds_total",
)


def _server_counters(url: str) -> dict[str, float] | None:
    """The totals of ``_SERVER_COUNTERS`` on the server's metrics page, or None if unreadable.

    Read once the model's latest metric push is in: it pushes every METRICS_FLUSH_INTERVAL_S, so a read
    right after a level would miss its last requests (and count them in the next level).
    """
    import urllib.request

    from inflight.backend.serving.metrics import METRICS_FLUSH_INTERVAL_S

    time.sleep(METRICS_FLUSH_INTERVAL_S + 0.2)

    try:
        with urllib.request.urlopen(f"http://{url}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return parse_counters(text)


def parse_counters(text: str) -> dict[str, float]:
    """Sum each of ``_SERVER_COUNTERS`` over its label sets in a Prometheus text page (0 if absent)."""
    totals = dict.fromkeys(_SERVER_COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def server_side(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """What the server's counters say about one level: its own TTFT (request in the model -> first token out
    of the engine; the rest of the client's TTFT is the way through Triton and back), and the stub's
    engine-thread time in cancellation checks and response-thread time in sends, per second of the level."""
    d = {name: after[name] - before[name] for name in _SERVER_COUNTERS}
    out: dict[str, float] = {}
    if d["inflight_time_to_first_token_seconds_count"] > 0:
        out["server_ttft_mean_ms"] = round(
            1e3
            * d["inflight_time_to_first_token_seconds_sum"]
            / d["inflight_time_to_first_token_seconds_count"],
            3,
        )
    if wall_s > 0 and d["inflight_responses_sent_total"] > 0:
        out["server_cancel_checks_per_s"] = round(d["inflight_cancellation_checks_total"] / wall_s, 1)
        out["server_cancel_check_busy"] = round(d["inflight_cancellation_check_seconds_total"] / wall_s, 4)
        out["server_sends_per_s"] = round(d["inflight_responses_sent_total"] / wall_s, 1)
        out["server_send_busy"] = round(d["inflight_response_send_seconds_total"] / wall_s, 4)
        out["server_send_mean_ms"] = round(
            1e3 * d["inflight_response_send_seconds_total"] / d["inflight_responses_sent_total"], 3
        )
    return out


def _warm_up(target: Any, vocab: int, isl: int, osl: int) -> None:
    # NOTE: prompts of the workload's length: the first prefill of a new length compiles kernels (1.5 s
    # on an H200), which would otherwise land in the first level's TTFT p99.
    specs = schedule(2, isl, min(osl, 8), vocab, seed=999)
    summary = summarize(drive(specs, target, concurrency=2, timeout_s=900))
    if summary["failed"]:
        raise RuntimeError(f"{target.name}: warm-up requests failed: {summary['errors']}")


def _line(name: str, s: dict[str, Any]) -> str:
    failed = f", {s['failed']} FAILED {s['errors']}" if s["failed"] else ""
    server = (f" (mean {s['ttft_ms']['mean']}, server-side mean {s['server_ttft_mean_ms']})"
              if "server_ttft_mean_ms" in s else "")  # fmt: skip
    if "server_send_mean_ms" in s:
        server += (f" | stub: cancel checks {s['server_cancel_checks_per_s']}/s, {100 * s['server_cancel_check_busy']:.1f}%"
                   f" of the engine thread; sends {s['server_sends_per_s']}/s, {s['server_send_mean_ms']} ms each")  # fmt: skip
    return (
        f"  {name:>13}: {s['output_tok_s']:9.1f} out tok/s {s['req_s']:7.2f} req/s | TTFT p50 "
        f"{s['ttft_ms']['p50']} p99 {s['ttft_ms']['p99']} ms{server} | ITL p50 {s['itl_ms']['p50']} p99 "
        f"{s['itl_ms']['p99']} ms | E2E p50 {s['e2e_ms']['p50']} ms{failed}"
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings both targets run with (the Triton config parameters, as options)."""
    longest = max(args.random_lengths) * 2 if args.random_lengths else args.isl + args.osl
    options: dict[str, Any] = {
        "dtype": args.dtype, "max_num_seqs": args.max_num_seqs, "max_model_len": longest + 16,
        "enable_prefix_caching": args.prefix_caching, "max_queue_size": max(1024, 2 * max(args.concurrency or [1])),
    }  # fmt: skip
    if args.max_num_batched_tokens:
        options["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_cache_memory_bytes:
        options["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    options.update(engine_option_values(args.engine_option))
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ints = lambda text: [int(v) for v in text.split(",") if v]
    floats = lambda text: [float(v) for v in text.split(",") if v]
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--isl", type=int, default=467, help="input tokens per request")
    parser.add_argument("--osl", type=int, default=256, help="output tokens per request (ignore_eos)")
    parser.add_argument("--random-lengths", type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="input and output lengths uniform in MIN..MAX instead")  # fmt: skip
    parser.add_argument("--rate", type=floats, default=[2.0], help="Poisson request rates (req/s), e.g. 2,8")
    parser.add_argument("--rate-requests", type=int, default=64, help="requests per rate level")
    parser.add_argument("--concurrency", type=ints, default=[1, 16, 64, 256], help="e.g. 1,16,64,256")
    parser.add_argument("--unlimited", type=int, default=0, help="also send this many requests all at once")
    parser.add_argument("--requests-per-slot", type=int, default=2, help="a concurrency level sends this x c")
    parser.add_argument(
        "--min-requests", type=int, default=16, help="at least this many per concurrency level"
    )
    parser.add_argument("--targets", default=",".join(TARGETS), help="engine_direct,triton (both by default)")
    parser.add_argument("--server-url", help="gRPC host:port of a running server (its own engine settings)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument(
        "--kv-cache-memory-bytes", type=int, help="fixed KV cache size (default: the engine's)"
    )
    parser.add_argument("--prefix-caching", action="store_true", help="leave prefix caching on (default off)")
    parser.add_argument("--level-timeout", type=float, default=1800.0, help="seconds one level may take")
    add_engine_option_argument(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-plots", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if not targets or set(targets) - set(TARGETS):
        raise SystemExit(f"--targets must name some of {', '.join(TARGETS)}, got {args.targets!r}")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    tokenizer_size = _tokenizer_size(args.model)
    if tokenizer_size is not None and tokenizer_size < vocab:
        print(f"WARNING: the tokenizer has {tokenizer_size} tokens, the model {vocab}: sampled ids past it decode "
              "to no text and wait in the server, so TTFT is overstated (build the random model with "
              "`--pad-tokenizer`)", flush=True)  # fmt: skip
    levels = _levels(args)
    options = engine_options(args)
    print("measuring the device's ceilings ...", flush=True)
    ceiling = ceilings()
    print(f"ceilings: {describe_ceilings(ceiling)}", flush=True)
    workload = (f"in/out uniform {args.random_lengths[0]}..{args.random_lengths[1]}" if args.random_lengths
                else f"{args.isl} in / {args.osl} out")  # fmt: skip
    print(f"workload: {workload}, random-token prompts as input_ids, greedy, ignore_eos; levels: "
          f"{', '.join(_label(level) for level in levels)}; engine: {options}", flush=True)  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    for name in [t for t in TARGETS if t in targets]:
        print(f"\n=== {name} ===", flush=True)
        target, server, work = _open_target(name, args, options)
        try:
            _warm_up(target, vocab, max(args.random_lengths) if args.random_lengths else args.isl, args.osl)
            for index, level in enumerate(levels):
                summary = run_level(target, _specs(level, args, vocab, index), level, args.level_timeout)
                results[name].append(summary)
                print(f"{_label(level)}:\n" + _line(name, summary), flush=True)
        finally:
            target.close()
            if server is not None:
                server.stop()
            if work is not None:
                if any(r["failed"] for r in results[name]):
                    kept = args.out.with_name(args.out.stem + f".{name}.tritonserver.log")
                    shutil.copy(work / "tritonserver.log", kept)
                    print(f"requests failed: the server's log is kept as {kept}", flush=True)
                shutil.rmtree(work, ignore_errors=True)
    rows = []
    for index, level in enumerate(levels):
        row = {**level, **{t: results[t][index] for t in targets}}
        if len(targets) == 2:
            direct, triton = row["engine_direct"]["output_tok_s"], row["triton"]["output_tok_s"]
            row["triton_over_direct"] = round(triton / direct, 4) if direct else None
        rows.append(row)
    result = {
        "benchmark": "serving", **environment(), "model": args.model.name, "workload": workload,
        "isl": args.isl, "osl": args.osl, "random_lengths": args.random_lengths, "ceilings": ceiling,
        "vocab_size": vocab, "tokenizer_size": tokenizer_size,
        "engine": options, "server_url": args.server_url, "levels": rows,
        "method": "streamed gRPC (a pool of persistent ModelStreamInfer streams, one request in flight on each) vs EngineService in-process; "
                  "times stamped on arrival; ITL splits a multi-token response's gap evenly",
    }  # fmt: skip
    write_result(args.out, result)
    _print_table(result)
    if not args.no_plots:
        from benchmarks.plots import plot_serving

        plot_serving(result, args.out)
    failed = sum(row[t]["failed"] for row in rows for t in targets)
    if failed:
        print(f"FAILED: {failed} requests failed (see 'errors' in {args.out})", file=sys.stderr)
    return 1 if failed else 0


def _tokenizer_size(model: Path) -> int | None:
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(model))
    except Exception:  # noqa: BLE001 - only a warning depends on it
        return None


def _open_target(name: str, args: argparse.Namespace, options: dict[str, Any]):
    """(target, server or None, work folder or None) for `name`."""
    from benchmarks.targets import EngineDirectTarget, TritonTarget

    if name == "engine_direct":
        print("loading the engine in this process ...", flush=True)
        return EngineDirectTarget(str(args.model), options), None, None
    if args.server_url:
        print(f"using the server at {args.server_url} (its own engine settings)", flush=True)
        return TritonTarget(args.server_url), None, None
    from benchmarks.perf.tools import start_server

    work = Path(tempfile.mkdtemp(prefix="inflight-serving-"))
    parameters = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}
    server = start_server(args.model, work, parameters)
    target = TritonTarget(server.url_grpc)
    target.metrics_url = server.url_metrics
    return target, server, work


def _print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['model']}, {result['workload']}; device {result['device']}; ceilings "
          f"{describe_ceilings(result['ceilings'])}")  # fmt: skip
    for row in result["levels"]:
        ratio = row.get("triton_over_direct")
        print(
            f"{_label(row)}" + (f" (Triton = {100 * ratio:.1f}% of engine-direct out tok/s)" if ratio else "")
        )
        for name in TARGETS:
            if name in row:
                print(_line(name, row[name]))


if __name__ == "__main__":
    sys.exit(main())
