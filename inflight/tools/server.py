"""Start the real NVIDIA Triton Inference Server (from the `nvidia-pytriton` wheel) on our model repository.

    python -m inflight.tools.server [--model-repository DIR] [--model HF_FOLDER] [--http-port 8000] ...

The wheel ships `pytriton/tritonserver/bin/tritonserver`, its libraries (`nvidia_pytriton.libs/`), the
Python backend and one backend stub per Python version. We assemble a backend directory for the running
interpreter, write a copy of the model repository whose `model_path` is absolute, and start the server
with the environment the stub needs (docs/serving.md explains each piece).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from inflight.tools.model_repository import DEFAULT_MODEL_REPOSITORY, write_model_repository
from inflight.tools.triton_install import backend_directory, find_triton, server_env


def free_port() -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_ready(http_url: str, timeout_s: float = 1.0) -> bool:
    """True when `GET http://<http_url>/v2/health/ready` answers 200."""
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def stub_pids(server_pid: int, model: str) -> list[int]:
    """The live (not zombie) Python-backend stub processes that tritonserver `server_pid` runs for `model`."""
    pids = []
    for child in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        text = b" ".join(cmdline).decode(errors="replace")
        if "triton_python_backend_stub" in text and f"/{model}/" in text and state not in ("Z", "X"):
            pids.append(int(child))
    return pids


class StubWatchdog(threading.Thread):
    """Unloads a model whose backend stub process died, so that Triton reports it not ready.

    Triton 2.51 keeps a model "ready" after its stub process was killed (every request then fails with
    "Stub process ... is not healthy"). The server must run with ``--model-control-mode=explicit``; a load
    request (``TritonServer.load_model``) restores the model. A stub that ends while a newer one of the same
    model runs (a reload) is not a death.
    """

    def __init__(self, server: TritonServer, model: str = "llm", interval_s: float = 0.2) -> None:
        super().__init__(name=f"stub-watchdog-{model}", daemon=True)
        self.server, self.model, self.interval_s = server, model, interval_s
        self.deaths = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        seen: set[int] = set()
        while not self._stop_event.wait(self.interval_s) and self.server.process.poll() is None:
            try:
                alive = set(stub_pids(self.server.process.pid, self.model))
            except OSError:
                return
            # NOTE: a stub that ends while the model is not ready was unloaded on purpose (or by itself).
            if (
                seen - alive
                and not alive
                and not self._stop_event.is_set()
                and self.server.model_ready(self.model)
            ):
                self.deaths += 1
                print(f"stub watchdog: the backend stub of {self.model} died; unloading it", file=sys.stderr)
                try:
                    self.server.unload_model(self.model)
                except OSError as err:
                    print(f"stub watchdog: unloading {self.model} failed: {err}", file=sys.stderr)
            seen = alive

    def stop(self) -> None:
        self._stop_event.set()


def explicit_model_control(*models: str) -> list[str]:
    """tritonserver arguments that load `models` at start and allow load/unload requests."""
    return ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]


class TritonServer:
    """A tritonserver process on a model repository. URLs are `host:port` (tritonclient's style).

    >>> with TritonServer.start("model_repository") as server:
    ...     server.wait_ready(120)
    ...     client = InflightClient(server.url_grpc)
    """

    def __init__(self, process: subprocess.Popen, ports: tuple[int, int, int], log_path: Path | None) -> None:
        self.process = process
        self.http_port, self.grpc_port, self.metrics_port = ports
        self.log_path = log_path
        self.watchdogs: list[StubWatchdog] = []

    @classmethod
    def start(
        cls, model_repository: Path | str, *, http_port: int | None = None, grpc_port: int | None = None,
        metrics_port: int | None = None, log_verbose: int = 0, log_path: Path | str | None = None,
        env: dict[str, str] | None = None, cwd: Path | str | None = None, extra_args: list[str] | None = None,
    ) -> TritonServer:  # fmt: skip
        """Launch tritonserver (free ports where none is given); output goes to `log_path` if given."""
        ports: list[int] = []
        for port in (http_port, grpc_port, metrics_port):
            while port is None or port in ports:
                port = free_port()
            ports.append(port)
        install = find_triton()
        command = [
            str(install.binary), f"--model-repository={Path(model_repository).resolve()}",
            f"--backend-directory={backend_directory(install)}", f"--http-port={ports[0]}",
            f"--grpc-port={ports[1]}", f"--metrics-port={ports[2]}", f"--log-verbose={log_verbose}",
            *(extra_args or []),
        ]  # fmt: skip
        log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 (closed below)
        # NOTE: a session of its own: Ctrl-C reaches only us, and stop() can end the stubs with the server.
        process = subprocess.Popen(
            command, env=server_env(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT if log else None,
            start_new_session=True,
        )  # fmt: skip
        if log is not None:
            log.close()
        return cls(process, (ports[0], ports[1], ports[2]), Path(log_path) if log_path is not None else None)

    @property
    def url_http(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def url_grpc(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def url_metrics(self) -> str:
        return f"localhost:{self.metrics_port}"

    def log_text(self) -> str:
        """What the server has written so far (empty when its output is not captured)."""
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.is_file() else ""

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Poll `/v2/health/ready` and the metrics port; RuntimeError (with the log's tail) if the server
        exits or times out.

        NOTE: Triton starts its metrics service after it reports ready (44 ms later in one CI run, where a
        metrics read right after readiness was refused), so both are waited for.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited ({self.process.returncode}):\n{self.log_text()[-6000:]}"
                )
            if is_ready(self.url_http) and self._metrics_up():
                return
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f}s:\n{self.log_text()[-6000:]}")

    def _metrics_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url_metrics}/metrics", timeout=2.0) as response:
                return response.status == 200
        except OSError:
            return False

    def model_ready(self, model: str = "llm", timeout_s: float = 2.0) -> bool:
        """True when `GET /v2/models/<model>/ready` answers 200."""
        try:
            url = f"http://{self.url_http}/v2/models/{model}/ready"
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return response.status == 200
        except OSError:
            return False

    def _repository(self, model: str, action: str, timeout_s: float) -> None:
        url = f"http://{self.url_http}/v2/repository/models/{model}/{action}"
        request = urllib.request.Request(url, data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as err:
            raise OSError(
                f"{action} {model}: HTTP {err.code}: {err.read().decode(errors='replace')}"
            ) from None

    def load_model(self, model: str = "llm", timeout_s: float = 300.0) -> None:
        """(Re)load a model (explicit model-control mode only); OSError when Triton refuses or fails."""
        self._repository(model, "load", timeout_s)

    def unload_model(self, model: str = "llm", timeout_s: float = 120.0) -> None:
        """Unload a model (explicit model-control mode only); Triton drains it first."""
        self._repository(model, "unload", timeout_s)

    def watch_stubs(self, model: str = "llm") -> StubWatchdog:
        """Start a `StubWatchdog` for `model` (stopped by `stop()`)."""
        watchdog = StubWatchdog(self, model)
        watchdog.start()
        self.watchdogs.append(watchdog)
        return watchdog

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGINT (Triton's graceful shutdown), then SIGKILL to the process group after `timeout_s`."""
        for watchdog in self.watchdogs:
            watchdog.stop()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        end_orphaned_stubs(self.process.pid)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def end_orphaned_stubs(pgid: int) -> list[int]:
    """Kill what is left of an exited tritonserver's process group (its session) and unlink their shared memory.

    NOTE: tritonserver 2.51 exiting at its --exit-timeout-secs while requests still run leaves the model's
    Python-backend stub behind, orphaned, for good (seen under the gateway's restart scenario).
    """
    ended = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            args = (stat.parent / "cmdline").read_bytes().split(b"\0")
            os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue
        ended.append(int(stat.parent.name))
        for arg in args:
            if arg.startswith(b"triton_python_backend_shm_region"):
                Path("/dev/shm", arg.decode(errors="replace")).unlink(missing_ok=True)
    return ended


def _usage(server: TritonServer, model: str) -> str:
    http = f"http://{server.url_http}/v2/models/{model}"
    generate = {"text_input": "The capital of France is", "max_tokens": 16, "temperature": 0}
    chat = json.dumps([{"role": "user", "content": "Hi!"}])
    stream = {"messages": chat, "max_tokens": 64, "stream": True, "exclude_input_in_output": True}
    return (
        f"\ninflight is ready: HTTP {server.url_http}, gRPC {server.url_grpc}, "
        f"metrics http://{server.url_metrics}/metrics\n"
        f"  curl -s -X POST {http}/generate -d '{json.dumps(generate)}'\n"
        f"  curl -N -X POST {http}/generate_stream -d '{json.dumps(stream)}'\n"
        f'  python -m inflight.client "Name three colors." --chat --stream --url {server.url_grpc}\n'
        f"  TensorRT-LLM's Triton clients: model `ensemble` at {server.url_grpc} (docs/trtllm_clients.md)\n"
        "Ctrl-C stops the server.\n"
    )


def start_gateway(server: TritonServer, port: int) -> subprocess.Popen:
    """`python -m inflight.gateway` in front of `server` on `port` (API keys from $INFLIGHT_API_KEY)."""
    command = [sys.executable, "-m", "inflight.gateway", "--triton-url", server.url_grpc, "--port", str(port)]
    # NOTE: its own session, as Triton's: Ctrl-C reaches only this launcher, which stops both in order.
    gateway = subprocess.Popen(command, start_new_session=True)
    base = f"http://localhost:{port}"
    print(
        f"OpenAI API: {base}/v1 (docs/gateway.md)\n"
        f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
        '-d \'{"model": "llm", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}\'',
        flush=True,
    )
    return gateway


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Serve the model repository until Ctrl-C / SIGTERM."""
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m inflight.tools.server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    parser.add_argument("--model", default=env.get("MODEL"), help="HF checkpoint folder (sets model_path)")
    parser.add_argument("--model-name", default="llm", help="the model in the repository that --model sets")
    parser.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="set a config parameter"
    )
    parser.add_argument("--http-port", type=int, default=int(env.get("HTTP_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(env.get("GRPC_PORT", 8001)))
    parser.add_argument("--metrics-port", type=int, default=int(env.get("METRICS_PORT", 8002)))
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument(
        "--gateway-port", type=int, default=None,
        help="also start the OpenAI-compatible gateway (python -m inflight.gateway) on this port; stopped with Triton",
    )  # fmt: skip
    args = parser.parse_args(argv)
    parameters = dict(p.split("=", 1) for p in args.param if "=" in p)
    if len(parameters) != len(args.param):
        parser.error("--param takes KEY=VALUE")
    if args.model:
        parameters["model_path"] = args.model
    with tempfile.TemporaryDirectory(prefix="inflight-repo-") as tmp:
        try:
            repo = write_model_repository(args.model_repository, Path(tmp), args.model_name, parameters)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
        server = TritonServer.start(
            repo, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
            log_verbose=args.log_verbose, extra_args=explicit_model_control("*"),
        )  # fmt: skip
        # A model whose stub process dies is unloaded (not ready) until a load request restores it.
        server.watch_stubs(args.model_name)
        if (repo / "ensemble").is_dir() and args.model_name != "ensemble":
            server.watch_stubs("ensemble")
        # NOTE: SIGINT too: a shell starts background jobs with SIGINT ignored, which Python then keeps.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise_interrupt)
        gateway: subprocess.Popen | None = None
        try:
            server.wait_ready(args.ready_timeout)
            print(_usage(server, args.model_name), flush=True)
            if args.gateway_port is not None:
                gateway = start_gateway(server, args.gateway_port)
            return server.process.wait()
        except KeyboardInterrupt:
            return server.stop()
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            server.stop()
            return 1
        finally:
            if gateway is not None and gateway.poll() is None:
                gateway.terminate()
                gateway.wait(15)


if __name__ == "__main__":
    sys.exit(main())
