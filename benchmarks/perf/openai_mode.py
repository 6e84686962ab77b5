"""genai-perf's OpenAI mode against the gateway (`make perf`): streamed chat completions over HTTP.

The gateway (`python -m inflight.gateway`, docs/gateway.md) is the one answering on localhost:$GATEWAY_PORT
when there is one, else one started here in front of the run's Triton (a free port) and stopped after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inflight.tools.server import free_port
from inflight.tools.triton_install import perf_env

from .tools import genai_perf_command


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def gateway_for(grpc_url: str, port: int, log_path: Path, timeout_s: float = 60.0):
    """The gateway's base URL: the one on `port` when it answers, else one started in front of `grpc_url`."""
    if _answers(f"http://localhost:{port}"):
        print(f"using the gateway at http://localhost:{port}", flush=True)
        yield f"http://localhost:{port}"
        return
    port = free_port()
    command = [sys.executable, "-m", "inflight.gateway", "--triton-url", grpc_url, "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    print(f"starting the gateway on port {port} (log: {log_path}) ...", flush=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_genai_perf_openai(
    url: str, tokenizer: Path, artifact_dir: Path, output_tokens: int = 16, input_tokens: int = 32,
    request_count: int = 8, concurrency: int = 2, model: str = "llm", timeout_s: float = 600.0,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:  # fmt: skip
    """`genai-perf profile --endpoint-type chat --streaming` against the gateway at `url`; its statistics.

    `--output-tokens-mean` sends `max_tokens`; `min_tokens` (a vLLM extra the gateway takes; genai-perf's
    `--output-tokens-mean-deterministic` is refused in OpenAI mode), `ignore_eos` and greedy decoding make
    every request produce exactly `output_tokens` tokens; `logprobs` gives each chunk one entry per token
    (`completion_tokens_sent` counts them). NOTE: not `stream_options.include_usage`: genai-perf 0.0.16
    fails on its usage chunk (`choices: []`).
    """
    command = [
        str(genai_perf_command()), "profile", "-m", model, "--endpoint-type", "chat", "--streaming",
        "-u", url, "--tokenizer", str(tokenizer),
        "--synthetic-input-tokens-mean", str(input_tokens), "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(output_tokens), "--output-tokens-stddev", "0",
        "--request-count", str(request_count), "--concurrency", str(concurrency), "--warmup-request-count", "0",
        "--extra-inputs", f"min_tokens:{output_tokens}", "--extra-inputs", "ignore_eos:true",
        "--extra-inputs", "temperature:0.0", "--extra-inputs", "logprobs:true",
        "--artifact-dir", str(artifact_dir), "-v",
    ]  # fmt: skip
    if os.environ.get("INFLIGHT_API_KEY"):
        key = os.environ["INFLIGHT_API_KEY"].split(",")[0].strip()
        command += ["--header", f"Authorization:Bearer {key}"]
    env = {**perf_env(), "COLUMNS": "150"}  # NOTE: a wide table off a terminal (rich wraps at 80 columns)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    exports = sorted(artifact_dir.glob("*/profile_export_genai_perf.json"))
    stats = json.loads(exports[-1].read_text()) if done.returncode == 0 and exports else {}
    return done, stats


def completion_tokens_sent(artifact_dir: Path) -> list[int]:
    """Per request of perf_analyzer's profile exports, the tokens its stream carried (logprobs entries).

    NOTE: genai-perf's own output length re-tokenizes the joined text, which can merge tokens (29-32 of 32
    seen on synthetic prompts); these are the server's tokens.
    """
    counts = []
    for export in sorted(artifact_dir.glob("*/profile_export.json")):
        for experiment in json.loads(export.read_text())["experiments"]:
            for request in experiment["requests"]:
                text = "".join(r.get("response", "") for r in request["response_outputs"])
                chunks = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith('data: {"')]
                counts.append(sum(len((c["choices"][0].get("logprobs") or {}).get("content") or ())
                                  for c in chunks if c.get("choices")))  # fmt: skip
    return counts


def profile_gateway(
    grpc_url: str, gateway_port: int, tokenizer: Path, out: Path, work: Path, max_tokens: int, requests: int,
    concurrency: int,
) -> list[str]:  # fmt: skip
    """`make perf`'s OpenAI step: genai-perf's table for the gateway; the failures (empty when it ran and every
    request produced `max_tokens` tokens)."""
    title = f"genai-perf --endpoint-type chat --streaming (OpenAI API, the gateway), {requests} requests"
    print(f"\n=== {title} " + "=" * max(0, 90 - len(title)), flush=True)
    with gateway_for(grpc_url, gateway_port, work / "gateway.log") as url:
        done, stats = run_genai_perf_openai(
            url, tokenizer, out / "genai-perf-openai", output_tokens=max_tokens, request_count=requests,
            concurrency=concurrency,
        )  # fmt: skip
    table_at = done.stdout.rfind("\n", 0, max(0, done.stdout.find("NVIDIA GenAI-Perf")))
    print(done.stdout[table_at + 1 :] if done.stdout else done.stderr, flush=True)
    if done.returncode != 0:
        return [f"genai-perf (openai) exited with {done.returncode}: {done.stderr[-2000:]}"]
    sent = completion_tokens_sent(out / "genai-perf-openai")
    if len(sent) != requests or set(sent) != {max_tokens}:
        return [f"genai-perf (openai): tokens per request {sent}, want {requests} x {max_tokens}"]
    print(f"{max_tokens} tokens sent for every request: OK (genai-perf's re-tokenized output "
          f"length: {stats.get('output_sequence_length', {}).get('avg')})")  # fmt: skip
    return []
