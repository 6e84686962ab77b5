"""Run NVIDIA's perf_analyzer and genai-perf against the inflight model (used by `make perf` and the tests).

perf_analyzer is the binary that `tritonclient[all]==2.51.0` installs into the venv's bin/; it needs the
libraries that `inflight.tools.triton_install.perf_env()` exposes. genai-perf 0.0.16 drives that same binary.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from inflight.tools.model_repository import DEFAULT_MODEL_REPOSITORY, write_model_repository
from inflight.tools.server import TritonServer
from inflight.tools.triton_install import CACHE_DIR, perf_env

GENAI_PERF_SPEC = "genai-perf==0.0.16"
# The TensorRT-LLM-compatible model (model_repository/ensemble), driven in genai-perf's tensorrtllm mode.
ENSEMBLE_MODEL = "ensemble"
GENAI_PERF_VENV = Path(os.environ.get("GENAI_PERF_VENV", CACHE_DIR / "genai-perf-venv"))
# What installing genai-perf must not move in our own environment (numpy 2 breaks the Triton stub).
PROTECTED = {"numpy": "1.", "tritonclient": "2.51.0", "nvidia-pytriton": "0.7.0"}


def start_server(
    model: Path, work: Path, parameters: dict[str, str] | None = None, ready_timeout_s: float = 900.0
) -> TritonServer:
    """A tritonserver on free ports serving `model` (plus config `parameters`), its log in `work`; ready."""
    repo = write_model_repository(
        DEFAULT_MODEL_REPOSITORY, work / "repo", parameters={"model_path": str(model), **(parameters or {})}
    )
    print(f"starting tritonserver (log: {work / 'tritonserver.log'}) ...", flush=True)
    server = TritonServer.start(repo, log_path=work / "tritonserver.log")
    try:
        server.wait_ready(ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


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
    requests_per_window: int = 4,
    model: str = "llm",
    timeout_s: float = 600.0,
    profile_export: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`perf_analyzer --streaming` over gRPC at each concurrency level of `concurrency` (start:end:step).

    NOTE: count windows of `requests_per_window` requests with the stability check off (`-s 999`, so three
    windows per level): on a small shared CPU machine the default check rarely passes and perf_analyzer
    then drops the level; `--request-count` would do, but 2.51 refuses it with a concurrency range.
    Its report goes to stdout (returned) and `csv_path`; every request's responses to `profile_export`
    when given (see `response_token_counts`).
    """
    command = [
        str(_venv_bin("perf_analyzer")), "-m", model, "-u", grpc_url, "-i", "grpc", "--streaming",
        "--input-data", str(input_data), "--concurrency-range", concurrency, "-f", str(csv_path),
        "--measurement-mode", "count_windows", "--measurement-request-count", str(requests_per_window),
        "--stability-percentage", "999",
    ]  # fmt: skip
    if profile_export is not None:
        command += ["--profile-export-file", str(profile_export)]
    done = subprocess.run(command, env=perf_env(), capture_output=True, text=True, timeout=timeout_s)
    if done.returncode == 0 and profile_export is not None and profile_export.stat().st_size == 0:
        # NOTE: perf_analyzer 2.51 now and then exits 0 with an empty export file (1 run in 24 against a quiet
        # server, greedy requests: not content, timing); its measurement is fine, so run it once more.
        profile_export.unlink()
        csv_path.unlink(missing_ok=True)
        done = subprocess.run(command, env=perf_env(), capture_output=True, text=True, timeout=timeout_s)
    return done


def read_perf_csv(csv_path: Path) -> list[dict[str, str]]:
    """perf_analyzer's `-f` CSV: one row per concurrency level, sorted by concurrency."""
    # NOTE: the file itself orders the rows by throughput.
    with csv_path.open() as f:
        return sorted(csv.DictReader(f), key=lambda row: int(row["Concurrency"]))


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
    if _venv_bin("genai-perf").is_file():
        return _venv_bin("genai-perf")
    marker = GENAI_PERF_VENV / ".installed"
    if marker.is_file():
        return GENAI_PERF_VENV / "bin" / "genai-perf"
    pip = [sys.executable, "-m", "pip"]
    dry = subprocess.run(
        [*pip, "install", "--dry-run", "--quiet", "--report", "-", GENAI_PERF_SPEC],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    moved = _would_move_protected(json.loads(dry.stdout))
    if not moved:
        subprocess.run([*pip, "install", "--quiet", GENAI_PERF_SPEC], check=True)
        return _venv_bin("genai-perf")
    print(
        f"{GENAI_PERF_SPEC} would install {', '.join(moved)}: installing it into {GENAI_PERF_VENV}",
        file=sys.stderr,
    )
    # NOTE: a venv without pip, filled by our pip (--python), without compiling .pyc files: ~20 s instead of
    # ~65 s (most of its 900 MB is never imported).
    shutil.rmtree(GENAI_PERF_VENV, ignore_errors=True)  # a half-made one, if an install was interrupted
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(GENAI_PERF_VENV)], check=True)
    target = ["--python", str(GENAI_PERF_VENV / "bin" / "python")]
    subprocess.run([*pip, *target, "install", "--quiet", "--no-compile", GENAI_PERF_SPEC], check=True)
    marker.write_text(GENAI_PERF_SPEC + "\n")
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
    Decoding is greedy (`temperature` 0.0, as a float: perf_analyzer refuses `0` for an FP32 input) so that
    genai-perf's re-tokenized count is exact (see `tokens_sent`).
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
        "-v",  # perf_analyzer's own output reaches a failure message (genai-perf discards it otherwise)
    ]  # fmt: skip
    # NOTE: return_cumulative_logprob: perf_analyzer 2.51 records every output the model declares, and for
    # one a response lacks it exports a value read from a zero-length buffer, with no bounds check
    # (ProfileDataExporter::SetValueToJSON). For our one FP32 output, cumulative_logprob, that garbage is a
    # NaN or an infinity about 1 read in 256; rapidjson then refuses the document and perf_analyzer leaves an
    # empty profile export yet exits 0, so genai-perf fails to parse it (6 runs in 140 here). Asked for, the
    # output is present (0 empty exports in 80 runs).
    extras = {"ignore_eos": "true", "temperature": "0.0", "return_cumulative_logprob": "true"}
    if model == ENSEMBLE_MODEL:
        # NOTE: the ensemble declares TensorRT-LLM's tensors only: min_length (= max_tokens) fixes the length
        # instead of ignore_eos, and return_log_probs makes its FP32 outputs present (the NOTE above).
        extras = {"temperature": "0.0", "return_log_probs": "true"}
    for key, value in {**extras, **(extra_inputs or {})}.items():
        command += ["--extra-inputs", f"{key}:{value}"]
    # NOTE: COLUMNS widens genai-perf's (rich) table, which otherwise wraps at 80 columns off a terminal.
    env = {**perf_env(), "COLUMNS": "150"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    exports = sorted(artifact_dir.glob("*/profile_export_genai_perf.json"))
    stats = json.loads(exports[-1].read_text()) if done.returncode == 0 and exports else {}
    return done, stats


def tokens_sent(artifact_dir: Path) -> list[int]:
    """Per request, the token ids the server sent (`output_ids` in perf_analyzer's profile export).

    NOTE: genai-perf's output length re-tokenizes the joined text instead, which can merge a sampled
    non-canonical split (" s" + "ine" -> " sine"); these counts tell the server's side.
    """
    counts = []
    for export in sorted(artifact_dir.glob("*/profile_export.json")):
        counts += [sum(request) for request in response_token_counts(export)]
    return counts


def response_token_counts(export: Path) -> list[list[int]]:
    """Per request in a perf_analyzer profile export (every experiment), the number of token ids (`output_ids`)
    in each of its responses."""
    counts = []
    for experiment in json.loads(export.read_text())["experiments"]:
        for request in experiment["requests"]:
            ids = [r.get("output_ids", []) for r in request["response_outputs"]]
            counts.append([len(i) if isinstance(i, list) else 1 for i in ids])
    return counts


def output_length_matches(stats: dict[str, Any], expected: int) -> bool:
    """True when genai-perf saw every request produce exactly `expected` output tokens."""
    osl = stats.get("output_sequence_length", {})
    return bool(osl) and osl.get("min") == osl.get("max") == osl.get("avg") == expected
