"""`python -m inflight.tools.server --gateway-port P` (what `make serve` runs) with a one-request queue.

The launcher starts Triton, then the gateway; the model runs one sequence at a time (`max_num_seqs` 1) and
holds one more waiting (`max_queue_size` 1), so concurrent requests overflow its queue: the gateway answers
429 with Retry-After (never a 500), streamed or not. Ctrl-C (SIGINT) to the launcher stops Triton, its
backend stubs and the gateway: no process is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from inflight.tools.server import free_port
from tests.gateway.bodies import answer_problem, post_raw

HEADERS = {"Content-Type": "application/json"}
CONCURRENT = 6


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _command_lines(pids: set[int]) -> list[str]:
    lines = []
    for pid in pids:
        try:
            lines.append(
                Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            pass
    return lines


def _wait_for_gateway(base: str, launcher: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert launcher.poll() is None, f"the launcher exited:\n{log.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as response:
                if any(m["id"] == "llm" for m in json.loads(response.read())["data"]):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the launcher's gateway never served llm:\n{log.read_text()[-4000:]}")


def _one(host: str, i: int) -> tuple[int, dict[str, str], str, bool]:
    stream = i % 3 == 0
    body = {
        "model": "llm",
        "prompt": f"Count to {i}:",
        "max_tokens": 48,
        "ignore_eos": True,
        "stream": stream,
    }
    status, headers, text = post_raw(
        host, "/v1/completions", json.dumps(body).encode(), HEADERS, timeout_s=300
    )
    return status, headers, text, stream


def test_launcher_with_gateway_answers_429_and_stops_everything(smollm2_path: Path, tmp_path: Path) -> None:
    http, grpc, metrics, gateway = (free_port() for _ in range(4))
    command = [sys.executable, "-m", "inflight.tools.server", "--model", str(smollm2_path),
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
               "--gateway-port", str(gateway), "--param", "max_queue_size=1", "--param", "max_num_seqs=1",
               "--param", "max_model_len=512", "--param", f"kv_cache_memory_bytes={64 << 20}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "INFLIGHT_API_KEY"}
    log = tmp_path / "launcher.log"
    with log.open("wb") as out:
        launcher = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    processes: set[int] = set()
    try:
        _wait_for_gateway(f"http://127.0.0.1:{gateway}", launcher, log)
        processes = _descendants(launcher.pid)
        commands = " | ".join(_command_lines(processes))
        assert "tritonserver" in commands and "inflight.gateway" in commands, commands
        assert "triton_python_backend_stub" in commands, commands
        host = f"127.0.0.1:{gateway}"
        with ThreadPoolExecutor(CONCURRENT) as pool:
            answers = list(pool.map(lambda i: _one(host, i), range(CONCURRENT)))
        statuses = sorted(status for status, *_ in answers)
        assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
        for status, headers, text, stream in answers:
            assert answer_problem("/v1/completions", status, headers, text, stream) is None, text[:500]
            if status == 429:
                error = json.loads(text)["error"]
                assert headers["retry-after"] == "1" and error["code"] == "rate_limit_exceeded", (
                    headers,
                    error,
                )
                assert "queue is full" in error["message"], error
    finally:
        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            launcher.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            for pid in _descendants(launcher.pid):
                os.kill(pid, signal.SIGKILL)
            raise
    deadline = time.monotonic() + 30
    while (left := [p for p in processes if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left behind: {_command_lines(set(left))}"
