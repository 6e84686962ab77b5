"""What the reliability scenarios share: per-scenario numbers, servers with special settings, a load driver.

Every scenario records a `ScenarioStats` (requests tried, failures, leaked KV blocks, crashes, wall-clock
figures) in `RESULTS`; the runner (`python -m tests.reliability`) prints them as a table, and plain pytest
prints the figures in its summary (conftest.py).
"""

from __future__ import annotations

import math
import queue
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from inflight.tools.model_repository import DEFAULT_MODEL_REPOSITORY, write_model_repository
from inflight.tools.server import TritonServer, explicit_model_control, stub_pids
from tests.serving.triton_helpers import (
    MODEL,
    StreamResult,
    make_inputs,
    record_response,
    settled_metrics,
)

# KV bytes of one 16-token block of SmolLM2-135M in float32: 2 (K, V) x 30 layers x 16 x 3 heads x 64 x 4.
BYTES_PER_BLOCK = 2 * 30 * 16 * 3 * 64 * 4
# NOTE: a scenario's wall-clock figures (how long a refusal, an abort or a state change took) are recorded
# and printed, and fail the scenario only at this bound: a hang, not a slow machine. On the 2-core CPU
# machine a refusal takes under 0.2 s, an abort after a client's death about 0.5 s, a stub's exit or a
# client's error after a stub kill about 2 s (the printed p50 / max). A client's own give-up point
# (`drive`'s `timeout_s`) is no shorter.
HANG_S = 60.0


@dataclass
class ScenarioStats:
    """One scenario's numbers for the table."""

    name: str
    requests: int = 0
    failures: int = 0
    leaked_blocks: int = 0
    crashes: int = 0
    seconds: float = 0.0
    outcome: str = "?"
    notes: list[str] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds of each sample
    hang_bounds: dict[str, float] = field(default_factory=dict)  # kind -> the bound it fails at

    def fail(self, message: str) -> None:
        self.failures += 1
        if len(self.notes) < 5:
            self.notes.append(message)

    def timed(self, kind: str, seconds: float, hang_s: float = HANG_S) -> bool:
        """Record how long one `kind` of thing took; at `hang_s` or more it is a hang, and a failure.
        Returns False then."""
        self.timings.setdefault(kind, []).append(seconds)
        self.hang_bounds[kind] = hang_s
        if seconds < hang_s:
            return True
        self.fail(f"{kind}: {seconds:.1f} s, a hang (bound {hang_s:.0f} s)")
        return False

    def timing_lines(self) -> list[str]:
        """One line per kind of figure: median and worst (the normal figure), and the bound it fails at."""
        return [
            f"{kind}: p50 {statistics.median(values):.2f} s, max {max(values):.2f} s over {len(values)} "
            f"(hang bound {self.hang_bounds[kind]:.0f} s)"
            for kind, values in self.timings.items()
        ]


RESULTS: dict[str, ScenarioStats] = {}


# ------------------------------------------------------------------------------------------------ servers
def start_server(
    work: Path,
    model_path: Path,
    parameters: dict[str, str],
    *,
    explicit: bool = True,
    ready_timeout_s=300,
    exit_timeout_s: int = 20,
) -> TritonServer:
    """A tritonserver on a fresh repository copy with `parameters`; explicit model control + stub watchdog."""
    work.mkdir(parents=True, exist_ok=True)
    repo = write_model_repository(
        DEFAULT_MODEL_REPOSITORY,
        work / "model_repository",
        parameters={"model_path": str(model_path), **parameters},
    )
    extra = [f"--exit-timeout-secs={exit_timeout_s}", *(explicit_model_control(MODEL) if explicit else [])]
    server = TritonServer.start(repo, log_path=work / "tritonserver.log", extra_args=extra)
    try:
        server.wait_ready(ready_timeout_s)
    except RuntimeError:
        server.stop()
        raise
    if explicit:
        server.watch_stubs(MODEL)
    return server


def stub_pid(server: TritonServer) -> int | None:
    pids = stub_pids(server.process.pid, MODEL)
    return pids[0] if len(pids) == 1 else None


def stub_rss_bytes(server: TritonServer) -> int:
    pid = stub_pid(server)
    if pid is None:
        return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_until(predicate: Callable[[], bool], hang_s: float = HANG_S, interval_s: float = 0.05) -> float:
    """Poll `predicate` until it is true; the seconds that took (infinite if not within `hang_s`)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start >= hang_s:
            return math.inf
        time.sleep(interval_s)
    return time.monotonic() - start


def settle(server: TritonServer, timeout_s: float = HANG_S) -> dict[str, float]:
    """Wait until the server holds no request and no KV block (or the timeout); returns the metrics then
    (settled: read after two more metric pushes, so not the idle state from before the scenario)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = settled_metrics(server.url_metrics, timeout_s=max(HANG_S / 2, deadline - time.monotonic()))
        idle = (
            m.get("inflight_kv_blocks_used", 0) == 0
            and m.get("inflight_requests_open", 0) == 0
            and m.get("inflight_num_requests_running", 0) == 0
            and m.get("inflight_num_requests_waiting", 0) == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def finals(m: dict[str, float]) -> float:
    """All final responses the server sent (any status)."""
    return sum(v for k, v in m.items() if k.startswith("inflight_final_responses_total"))


def received(m: dict[str, float]) -> float:
    """Requests that reached the model (a request cancelled before that never does)."""
    return m.get("inflight_requests_received_total", 0.0)


def final_count(m: dict[str, float], status: str) -> float:
    return m.get(f'inflight_final_responses_total{{status="{status}"}}', 0.0)


# ---------------------------------------------------------------------------------------------- the driver
@dataclass
class Job:
    """One request to send: its inputs, and when (if at all) the client cancels it."""

    rid: str
    values: dict[str, Any]
    cancel_after: int | None = None  # cancel once this many responses arrived (0: right after sending)
    cancel_delay_s: float = 0.0  # with cancel_after=0: wait this long first (lands in the queue / prefill)


@dataclass
class Outcome:
    job: Job
    result: StreamResult
    cancelled: bool = False
    seconds: float = 0.0  # from sending to the end
    ended: float = 0.0  # time.monotonic() at the end


class StreamWorker:
    """One persistent gRPC stream that runs one request at a time; cancelling reopens the stream."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = grpcclient.InferenceServerClient(url)
        self._open()

    def _open(self) -> None:
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        events = self.events
        self.client.start_stream(callback=lambda result, error: events.put((result, error)))

    def run(self, job: Job, timeout_s: float) -> Outcome:
        r = StreamResult()
        start = time.monotonic()
        self.client.async_stream_infer(
            MODEL, make_inputs(job.values), request_id=job.rid, enable_empty_final_response=True
        )
        if job.cancel_after == 0:
            time.sleep(job.cancel_delay_s)
            return self._cancel(job, r, start)
        deadline = start + timeout_s
        while True:
            try:
                result, error = self.events.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                r.errors.append(f"no FINAL within {timeout_s:.0f} s")
                return self._cancel(job, r, start)
            if error is not None:
                r.errors.append(str(error))
                r.num_final += 1  # an error ends the request
                break
            if record_response(r, result):
                break
            if job.cancel_after is not None and len(r.outputs) >= job.cancel_after:
                return self._cancel(job, r, start)
        # NOTE: anything further for this request would be a second FINAL: look briefly.
        while not self.events.empty():
            result, error = self.events.get()
            r.num_final += 1 if error is not None else int(record_response(r, result))
        now = time.monotonic()
        return Outcome(job, r, False, now - start, now)

    def _cancel(self, job: Job, r: StreamResult, start: float) -> Outcome:
        self.client.stop_stream(cancel_requests=True)
        while not self.events.empty():  # responses that arrived before the stream closed
            result, error = self.events.get()
            r.num_final += 1 if error is not None else int(record_response(r, result))
        self._open()
        now = time.monotonic()
        return Outcome(job, r, True, now - start, now)

    def close(self) -> None:
        # NOTE: nothing is in flight here, so end the stream gracefully. Cancelling the RPC right after a final
        # response hits a Triton 2.51 gRPC frontend race (docs/serving.md, "Closing streams") that keeps the
        # model from ever unloading.
        self.client.stop_stream(cancel_requests=False)
        self.client.close()


def drive(
    url: str, jobs: Iterable[Job], concurrency: int, timeout_s: float = 120.0,
    on_outcome: Callable[[Outcome], None] | None = None, start: threading.Barrier | None = None,
) -> list[Outcome]:  # fmt: skip
    """Run `jobs` over `concurrency` streams (one request in flight per stream); every outcome, in order done.
    `start`: each stream, once open, waits there before its first request (the caller passing it too sends
    them all at once: a burst)."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def work() -> None:
        worker = StreamWorker(url)
        try:
            if start is not None:
                start.wait(HANG_S)
            while True:
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                outcome = worker.run(job, timeout_s)
                with lock:
                    outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
        finally:
            worker.close()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


PROMPTS = [
    "Name a color.",
    "What is two plus two?",
    "Say hello in French.",
    "Write one word about the sea.",
    "What is the capital of Italy?",
    "Count to three.",
    "Name a fruit.",
    "What day comes after Monday?",
]


def mixed_jobs(count: int, seed: int, cancel_fraction: float, max_tokens: int, prefix: str) -> list[Job]:
    """Short requests: streamed or not, greedy or seeded-sampled, a fraction cancelled at random points."""
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        values: dict[str, Any] = {
            "text_input": rng.choice(PROMPTS),
            "max_tokens": rng.randint(1, max_tokens),
            "stream": rng.random() < 0.5,
            "exclude_input_in_output": True,
        }
        if rng.random() < 0.5:
            values.update(temperature=0.0)
        else:
            values.update(
                temperature=0.8, top_p=0.9, seed=np.array([rng.randint(0, 1 << 30)], dtype=np.uint64)
            )
        job = Job(f"{prefix}{i}", values)
        if rng.random() < cancel_fraction:
            job.cancel_after = rng.choice([0, 0, 1])
            job.cancel_delay_s = rng.random() * 0.05
        jobs.append(job)
    return jobs


def check_clean(stats: ScenarioStats, server: TritonServer, stub_before: int | None) -> dict[str, float]:
    """After a scenario: no KV block or request left (counted as leaks), the same live stub (else a crash)."""
    m = settle(server)
    stats.leaked_blocks += int(m.get("inflight_kv_blocks_used", 0))
    left = int(m.get("inflight_requests_open", 0) + m.get("inflight_num_requests_running", 0))
    if left:
        stats.fail(f"{left} requests still open on the server")
    if server.process.poll() is not None or stub_pid(server) != stub_before:
        stats.crashes += 1
    assert stats.leaked_blocks == 0, f"{stats.leaked_blocks} KV blocks leaked"
    assert stats.crashes == 0, "the server or its backend stub died"
    assert not left, stats.notes
    return m
