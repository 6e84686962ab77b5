"""`python -m benchmarks.perf` (`make perf`): perf_analyzer and genai-perf against the inflight model.

Uses the server on localhost:$HTTP_PORT/$GRPC_PORT when one is ready there; otherwise starts one (free
ports) for the run and stops it after. Prints perf_analyzer's table, then genai-perf's in its vllm and
tensorrtllm modes against `llm` and in its tensorrtllm mode against `ensemble` (TensorRT-LLM's model), and
fails if genai-perf saw an output length other than the one it asked for. Last, genai-perf's OpenAI mode
against the gateway (`openai_mode.py`: the one on $GATEWAY_PORT, else one started for the run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from inflight.tools.server import is_ready
from inflight.tools.triton_install import REPO_ROOT

from .openai_mode import profile_gateway
from .tools import (
    ENSEMBLE_MODEL,
    output_length_matches,
    run_genai_perf,
    run_perf_analyzer,
    start_server,
    tokens_sent,
    write_input_data,
)

DEFAULT_MODEL = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "Explain in one sentence what a KV cache is.",
    "List three prime numbers:",
]


def _parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, default=int(env.get("HTTP_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(env.get("GRPC_PORT", 8001)))
    model_help = "the checkpoint: served if this script starts the server; genai-perf's tokenizer"
    parser.add_argument(
        "--model", type=Path, default=Path(env.get("MODEL") or DEFAULT_MODEL), help=model_help
    )
    parser.add_argument("--concurrency", default="1:4:3", help="perf_analyzer --concurrency-range (1 and 4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--window", type=int, default=4, help="perf_analyzer requests per window (3 a level)")
    parser.add_argument("--requests", type=int, default=8, help="genai-perf requests per mode")
    parser.add_argument("--genai-concurrency", type=int, default=4)
    parser.add_argument("--skip-genai-perf", action="store_true")
    parser.add_argument("--gateway-port", type=int, default=int(env.get("GATEWAY_PORT", 9000)),
                        help="the OpenAI gateway to profile, if one answers there (else one is started)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "artifacts" / "perf")
    return parser


def _banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 90 - len(title)), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    server = None
    work = Path(tempfile.mkdtemp(prefix="inflight-perf-"))
    grpc_url = f"localhost:{args.grpc_port}"
    failures: list[str] = []
    try:
        if is_ready(f"localhost:{args.http_port}"):
            print(f"using the server at localhost:{args.http_port} (gRPC {grpc_url})")
        else:
            server = start_server(args.model, work, ready_timeout_s=600)
            grpc_url = server.url_grpc
        _banner(f"perf_analyzer --streaming, concurrency {args.concurrency}, {args.max_tokens} tokens")
        data = write_input_data(out / "perf_input.json", PROMPTS, args.max_tokens)
        done = run_perf_analyzer(grpc_url, data, out / "perf_analyzer.csv", args.concurrency, args.window)
        print(done.stdout, done.stderr, sep="\n", flush=True)
        if done.returncode != 0:
            failures.append(f"perf_analyzer exited with {done.returncode}")
        runs = [("vllm", "llm"), ("tensorrtllm", "llm"), ("tensorrtllm", ENSEMBLE_MODEL)]
        for backend, model in [] if args.skip_genai_perf else runs:
            name = backend if model == "llm" else f"{backend}-{model}"
            _banner(f"genai-perf -m {model} --backend {backend} --streaming, {args.requests} requests")
            done, stats = run_genai_perf(
                backend, grpc_url, args.model, out / f"genai-perf-{name}", output_tokens=args.max_tokens,
                request_count=args.requests, concurrency=args.genai_concurrency, model=model,
            )  # fmt: skip
            table_at = done.stdout.rfind("\n", 0, max(0, done.stdout.find("NVIDIA GenAI-Perf")))
            print(done.stdout[table_at + 1 :] if done.stdout else done.stderr, flush=True)
            if done.returncode != 0:
                failures.append(f"genai-perf ({name}) exited with {done.returncode}: {done.stderr[-2000:]}")
            elif not output_length_matches(stats, args.max_tokens):
                sent = tokens_sent(out / f"genai-perf-{name}")
                failures.append(
                    f"genai-perf ({name}) output length {stats.get('output_sequence_length')}; "
                    f"tokens the server sent per request: {sent}"
                )
            else:
                print(f"output sequence length == {args.max_tokens} for every request: OK")
        if not args.skip_genai_perf:  # genai-perf's OpenAI mode against the gateway (openai_mode.py)
            failures += profile_gateway(grpc_url, args.gateway_port, args.model, out, work, args.max_tokens,
                                        args.requests, args.genai_concurrency)  # fmt: skip
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nartifacts: {out}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
