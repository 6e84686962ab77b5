"""One real tritonserver and one gateway process in front of it per test module.

The gateway runs as `python -m inflight.gateway` (a real uvicorn server on a free port) with an API key,
talking gRPC to a tritonserver that serves a fresh copy of model_repository/ with small engine settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from inflight.tools.model_repository import DEFAULT_MODEL_REPOSITORY, write_model_repository
from inflight.tools.server import TritonServer, free_port

from ..serving.triton_helpers import serve_repository

API_KEY = "test-key"
MODEL = "llm"
# Small engine settings: CI is a 2-core CPU machine. max_model_len is what the gateway reads as the context.
SERVER_PARAMETERS = {
    "max_model_len": "512",
    "kv_cache_memory_bytes": str(64 << 20),
    "max_queue_size": "64",
}


@dataclass
class Gateway:
    """A running gateway: its base URL (`http://host:port`), its process and its log."""

    url: str
    process: subprocess.Popen
    log_path: Path
    triton: TritonServer

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""


def start_gateway(
    triton_grpc_url: str, log_path: Path, *extra: str, api_key: str | None = API_KEY
) -> tuple[str, subprocess.Popen]:
    port = free_port()
    command = [sys.executable, "-m", "inflight.gateway", "--triton-url", triton_grpc_url, "--host", "127.0.0.1",
               "--port", str(port), *(["--api-key", api_key] if api_key else []), *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "INFLIGHT_API_KEY"}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited ({process.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return url, process
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the gateway did not answer /health:\n{log_path.read_text()[-4000:]}")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def triton(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A ready tritonserver serving `llm` (SmolLM2-135M-Instruct) for this module; always stopped."""
    work = tmp_path_factory.mktemp("gateway-triton")
    parameters = {"model_path": str(smollm2_path), **SERVER_PARAMETERS}
    repo = write_model_repository(DEFAULT_MODEL_REPOSITORY, work / "model_repository", parameters=parameters)
    yield from serve_repository(repo, work / "tritonserver.log")


@pytest.fixture(scope="module")
def gateway(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """`python -m inflight.gateway` in front of `triton`, with API key `API_KEY`."""
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    try:
        url, process = start_gateway(triton.url_grpc, log_path, "--max-body-bytes", str(1 << 20))
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield Gateway(url, process, log_path, triton)
    finally:
        stop_process(process)
