"""Run NVIDIA's perf_analyzer and genai-perf against the inflight model (used by `make perf` and the tests).

perf_analyzer is the binary that `tritonclient[all]==2.51.0` installs into the venv's bin/; it needs the
libraries that `inflight.backend.server.perf_env()` exposes. genai-perf 0.0.16 drives that same binary.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from inflight.backend.server import CACHE_DIR, perf_env

GENAI_PERF_SPEC = "genai-perf==0.0.16"
GENAI_PERF_VENV = Path(os.environ.get("GENAI_PERF_VENV", CACHE_DIR / "genai-perf-venv"))
# What installing genai-perf must not move in our own environment (numpy 2 breaks the Triton stub).
PROTECTED = {"numpy": "1.", "tritonclient": "2.51.0", "nvidia-pytriton": "0.7.0"}


def _venv_bin(name: str) -> Path:
    return Path(sys.prefix) / "bin" / name


def write_input_data(path: Path, prompts: list[str], max_tokens: int, ignore_eos: bool = True) -> Path:
    """A perf_analyzer `--input-data` file: one streamed request per prompt, output without the prompt."""
    rows = [
        {
            "text_input": [p],
            "max_tokens": [max_tokens],
            "stream": [True],
            "exclude_input_in_output": [True],
            "ignore_eos": [ignore_eos],
        }
        for p in prompts
    ]
    path.write_text(json.dumps({"data": rows}, indent=1))
    return path


def run_perf_analyzer(
    grpc_url: str,
    input_data: Path,
    csv_path: Path,
    concurrency: str = "1:2",
    request_count: int = 8,
    model: str = "llm",
    timeout_s: float = 600.0,
) -> subprocess.CompletedProcess[str]:
    """`perf_analyzer --streaming` over gRPC, `request_count` requests per concurrency level.

    NOTE: a fixed request count with the stability check off (as genai-perf runs it): on a small shared
    CPU machine the default windows rarely stabilise, and perf_analyzer then drops the level.
    Its report goes to stdout (returned) and `csv_path`.
    """
    command = [
        str(_venv_bin("perf_analyzer")), "-m", model, "-u", grpc_url, "-i", "grpc", "--streaming",
        "--input-data", str(input_data), "--concurrency-range", concurrency, "-f", str(csv_path),
        "--request-count", str(request_count), "--stability-percentage", "999",
    ]  # fmt: skip
    return subprocess.run(command, env=perf_env(), capture_output=True, text=True, timeout=timeout_s)


def read_perf_csv(csv_path: Path) -> list[dict[str, str]]:
    """perf_analyzer's `-f` CSV: one row per concurrency level."""
    with csv_path.open() as f:
        return list(csv.DictReader(f))


def _would_move_protected(report: dict[str, Any]) -> list[str]:
    moved = []
    for item in report.get("install", []):
        name, version = item["metadata"]["name"].lower(), item["metadata"]["version"]
        if name in PROTECTED and not version.startswith(PROTECTED[name]):
            moved.append(f"{name}=={version}")
    return moved


def genai_perf_command() -> Path:
    """The genai-perf executable, installing it on first use.

    NOTE: it goes into our venv only if pip's dry run moves none of PROTECTED; genai-perf 0.0.16 pulls
    numpy 2 (seen: numpy-2.4.6), so in practice it gets a venv of its own at `.cache/genai-perf-venv`.
    """
    for candidate in (_venv_bin("genai-perf"), GENAI_PERF_VENV / "bin" / "genai-perf"):
        if candidate.is_file():
            return candidate
    pip = [sys.executable, "-m", "pip"]
    dry = subprocess.run(
        [*pip, "install", "--dry-run", "--quiet", "--report", "-", GENAI_PERF_SPEC],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    moved = _would_move_protected(json.loads(dry.stdout))
    if not moved:
        subprocess.run([*pip, "install", "--quiet", GENAI_PERF_SPEC], check=True)
        return _venv_bin("genai-perf")
    print(f"{GENAI_PERF_SPEC} would install {', '.join(moved)}: using {GENAI_PERF_VENV}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(GENAI_PERF_VENV)], check=True)
    venv_pip = [str(GENAI_PERF_VENV / "bin" / "python"), "-m", "pip"]
    subprocess.run([*venv_pip, "install", "--quiet", GENAI_PERF_SPEC], check=True)
    return GENAI_PERF_VENV / "bin" / "genai-perf"


def run_genai_perf(
    backend: str,
    grpc_url: str,
    tokenizer: Path,
    artifact_dir: Path,
    output_tokens: int = 16,
    input_tokens: int = 32,
    request_count: int = 8,
    concurrency: int = 2,
    model: str = "llm",
    extra_inputs: dict[str, Any] | None = None,
    timeout_s: float = 600.0,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`genai-perf profile --backend {vllm,tensorrtllm} --streaming` and its exported statistics.

    `--output-tokens-mean-deterministic` makes genai-perf send min_tokens (vllm) / min_length (tensorrtllm)
    equal to max_tokens, so every request asks for exactly `output_tokens` tokens; `ignore_eos` too.
    """
    if backend not in ("vllm", "tensorrtllm"):
        raise ValueError(f"backend must be vllm or tensorrtllm, got {backend!r}")
    command = [
        str(genai_perf_command()), "profile", "-m", model, "--backend", backend, "--streaming",
        "-u", grpc_url, "--tokenizer", str(tokenizer),
        "--synthetic-input-tokens-mean", str(input_tokens), "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(output_tokens), "--output-tokens-stddev", "0",
        "--output-tokens-mean-deterministic", "--request-count", str(request_count),
        "--concurrency", str(concurrency), "--warmup-request-count", "0",
        "--artifact-dir", str(artifact_dir),
    ]  # fmt: skip
    for key, value in {"ignore_eos": "true", **(extra_inputs or {})}.items():
        command += ["--extra-inputs", f"{key}:{value}"]
    # NOTE: COLUMNS widens genai-perf's (rich) table, which otherwise wraps at 80 columns off a terminal.
    env = {**perf_env(), "COLUMNS": "150"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    exports = sorted(artifact_dir.glob("*/profile_export_genai_perf.json"))
    stats = json.loads(exports[-1].read_text()) if done.returncode == 0 and exports else {}
    return done, stats


def output_length_matches(stats: dict[str, Any], expected: int) -> bool:
    """True when genai-perf saw every request produce exactly `expected` output tokens."""
    osl = stats.get("output_sequence_length", {})
    return bool(osl) and osl.get("min") == osl.get("max") == osl.get("avg") == expected
