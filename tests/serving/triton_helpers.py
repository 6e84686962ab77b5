"""Raw tritonclient helpers for the serving tests (the wire protocol itself, not our client library)."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from inflight.tools.server import TritonServer

MODEL = "llm"
_DTYPES = {np.dtype(np.int32): "INT32", np.dtype(np.uint64): "UINT64", np.dtype(np.float32): "FP32",
           np.dtype(np.bool_): "BOOL", np.dtype(np.float64): "FP64"}  # fmt: skip


def make_inputs(values: dict[str, Any]) -> list[grpcclient.InferInput]:
    """Scalars become shape-[1] tensors; str/bytes become BYTES; lists of str become BYTES [n]."""
    inputs = []
    for name, value in values.items():
        if isinstance(value, np.ndarray):
            array = value
        elif isinstance(value, str | bytes):
            array = np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
        elif isinstance(value, list) and value and isinstance(value[0], str):
            array = np.array([v.encode() for v in value], dtype=np.object_)
        elif isinstance(value, bool):
            array = np.array([value], dtype=np.bool_)
        elif isinstance(value, int):
            array = np.array([value], dtype=np.int32)
        elif isinstance(value, float):
            array = np.array([value], dtype=np.float32)
        else:
            raise TypeError(f"{name}: {value!r}")
        dtype = "BYTES" if array.dtype == np.object_ else _DTYPES[array.dtype]
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@dataclass
class StreamResult:
    """Everything one request received over the gRPC stream."""

    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    num_final: int = 0
    first_time: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


def record_response(r: StreamResult, result: Any) -> bool:
    """Add one streamed gRPC response (an `InferResult`) to `r`; True when it was the request's FINAL."""
    response = result.get_response()
    final = response.parameters["triton_final_response"].bool_param
    outputs = {o.name: result.as_numpy(o.name) for o in response.outputs}
    if outputs:
        r.outputs.append(outputs)
        if r.first_time is None:
            r.first_time = time.monotonic()
        if "text_output" in outputs:
            r.texts.append(b"".join(outputs["text_output"].reshape(-1)).decode())
        if "output_ids" in outputs:
            r.token_ids.extend(int(t) for t in outputs["output_ids"].reshape(-1))
    r.num_final += int(final)
    return final


def run_streams(
    url: str,
    requests: dict[str, dict[str, Any]],
    timeout_s: float = 120.0,
    cancel_after_responses: int | None = None,
    model: str = MODEL,
) -> dict[str, StreamResult]:
    """Send every request on one gRPC stream; wait until each has its FINAL (or cancel after N responses)."""
    results = {rid: StreamResult() for rid in requests}
    events: queue.SimpleQueue = queue.SimpleQueue()
    lock = threading.Lock()

    def callback(result: Any, error: Any) -> None:
        with lock:
            if error is not None:
                rid = _request_id_of(error)
                target = results.get(rid) if rid else None
                for r in [target] if target else results.values():
                    r.errors.append(str(error))
                    r.num_final += 1  # an error response is final
                events.put(("error", rid))
                return
            rid = result.get_response().id
            record_response(results[rid], result)
            events.put(("response", rid))

    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=callback)
    done = False
    try:
        for rid, values in requests.items():
            client.async_stream_infer(
                model, make_inputs(values), request_id=rid, enable_empty_final_response=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with lock:
                done = all(r.num_final for r in results.values())
                seen = sum(len(r.outputs) for r in results.values())
            if done or (cancel_after_responses is not None and seen >= cancel_after_responses):
                break
            try:
                events.get(timeout=0.5)
            except queue.Empty:
                pass
    finally:
        # NOTE: cancel only what is still in flight (see docs/serving.md, "Closing streams").
        client.stop_stream(cancel_requests=cancel_after_responses is not None and not done)
        client.close()
    return results


def _request_id_of(error: Any) -> str | None:
    match = re.search(r"request_id[\"' :=]+([\w-]+)", str(error))
    return match.group(1) if match else None


def http_post(url: str, path: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{url}{path}", data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sse_events(body: str) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: ")]


def metrics(url: str, model: str | None = None) -> dict[str, float]:
    """The inflight_* samples on the metrics port, keyed by name{labels} without model/version labels (only
    ``model``'s when given: a server with several models)."""
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("inflight_") or (model is not None and f'model="{model}"' not in line):
            continue
        name, value = line.rsplit(" ", 1)
        name = re.sub(r',?(model|version)="[^"]*"', "", name).replace("{,", "{").replace("{}", "")
        samples[name] = float(value)
    return samples


FLUSHES = "inflight_metrics_flushes_total"


def settled_metrics(url: str, timeout_s: float = 60.0, model: str | None = None) -> dict[str, float]:
    """The inflight_* samples with every update made before this call: read once the model's periodic
    metrics push has run twice more.

    The model holds metric updates and pushes them every METRICS_FLUSH_INTERVAL_S, counting each push last in
    inflight_metrics_flushes_total; a push that began before this call may have missed what happened just
    before it, the next one cannot. `timeout_s` only bounds a hang (pushes stopped): it raises then.
    """
    deadline = time.monotonic() + timeout_s
    start = metrics(url, model).get(FLUSHES, 0.0)
    while True:
        now = metrics(url, model)
        if now.get(FLUSHES, 0.0) >= start + 2:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"the model pushed no metrics for {timeout_s:.0f} s ({FLUSHES} stuck)")
        time.sleep(0.05)  # NOTE: a poll interval; the wait ends on the counter, not on time


def wait_for_metric(url: str, name: str, expected: float, timeout_s: float = 15.0) -> float:
    deadline = time.monotonic() + timeout_s
    value = float("nan")
    while time.monotonic() < deadline:
        value = metrics(url).get(name, float("nan"))
        if value == expected:
            return value
        time.sleep(0.2)
    return value


def is_model_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/models/{MODEL}/ready", timeout=5) as response:
            return response.status == 200
    except urllib.error.URLError:
        return False


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = [int(c) for c in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except OSError:
            continue
        found += children
        todo += children
    return found


def worker_pids(server_pid: int) -> list[int]:
    """The tensor-parallel worker processes (``inflight.backend.executor.worker``) anywhere on this machine
    whose parent is gone or is below tritonserver ``server_pid``: an orphan counts too."""
    below = set(descendants(server_pid))
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"inflight.backend.executor.worker" in cmdline and state[0] not in ("Z", "X"):
            parent = int(state[1])
            if int(entry.name) in below or parent == 1 or not Path(f"/proc/{parent}").exists():
                pids.append(int(entry.name))
    return sorted(pids)


def serve_repository(repo: Path, log_path: Path) -> Iterator[TritonServer]:
    """A fixture's body: a started, ready tritonserver on ``repo`` (a failed start fails the test, with the
    server stopped), stopped after the yield."""
    server = TritonServer.start(repo, log_path=log_path, extra_args=["--exit-timeout-secs=15"])
    try:
        server.wait_ready(300)
    except RuntimeError as err:
        server.stop()
        pytest.fail(f"tritonserver did not become ready: {err}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
