"""Scenarios 14 (a tensor-parallel worker killed) and 15 (unload, reload and shutdown with TP), on a server of
their own: the default SmolLM2 at TP = 3 (gloo on CPU), explicit model control.

14: kill -9 one worker under live streams: every stream ends with one error FINAL, the model turns not ready,
    its other processes go (the stub unloads itself, its last worker with it), a reload serves again.
15: unload with live streams: they drain (one FINAL each, every token), then the stub and the workers are gone
    within 10 s; ten load / generate / unload cycles leave no worker and no rendezvous port behind; a
    server shutdown leaves no worker either.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

from inflight.tools.server import stub_pids
from tests.reliability.harness import HANG_S, PROMPTS, Job, drive, start_server, wait_until
from tests.serving.triton_helpers import metrics, worker_pids

TP = {"tensor_parallel_size": "3", "max_model_len": "256", "kv_cache_memory_bytes": str(32 << 20),
      "drain_timeout_s": "3"}  # fmt: skip
GONE_S = 10.0  # the bound: no process left this long after an unload or a shutdown
RELOADS = 10


def _stream(i: int, max_tokens: int) -> Job:
    return Job(f"s{i}", {"text_input": PROMPTS[i % 8], "max_tokens": max_tokens, "temperature": 0.0,
                         "ignore_eos": True, "stream": True})  # fmt: skip


def _rendezvous_ports(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"rendezvous port (\d+)", log)]


def _listening(port: int) -> bool:
    """Some process on this machine listens on TCP ``port`` (/proc/net/tcp{,6}, state 0A)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _until_no_process(server) -> float:
    return wait_until(lambda: not stub_pids(server.process.pid, "llm") and not worker_pids(server.process.pid),
                      interval_s=0.1)  # fmt: skip


def test_tp_worker_killed_streams_end_and_reload_restores(scenario, smollm2_path, tmp_path) -> None:
    server = start_server(tmp_path, smollm2_path, TP)
    try:
        workers = worker_pids(server.process.pid)
        assert len(workers) == 2, f"TP 3 runs 2 workers, found {workers}"
        results: list = []
        jobs = [_stream(i, 200) for i in range(4)]
        t = threading.Thread(target=lambda: results.extend(drive(server.url_grpc, jobs, 4, timeout_s=300)))
        t.start()
        flowing = wait_until(
            lambda: metrics(server.url_metrics).get("inflight_generation_tokens_total", 0) >= 20
        )
        assert scenario.timed("tokens flowing", flowing), scenario.notes
        os.kill(workers[-1], signal.SIGKILL)
        killed = time.monotonic()
        t.join(HANG_S)
        assert not t.is_alive(), f"live streams still open {HANG_S:.0f} s after the worker was killed"
        scenario.requests = len(results)
        for o in results:
            scenario.timed("stream's error after the kill", o.ended - killed)
            if o.result.num_final != 1 or not o.result.errors:
                scenario.fail(f"{o.job.rid}: {o.result.num_final} FINALs, errors {o.result.errors}")
        scenario.notes.append(f"how a stream ended: {results[0].result.errors[:1]}")
        assert scenario.timed("not ready after the kill", wait_until(lambda: not server.model_ready()))
        assert scenario.timed("stub and workers gone", _until_no_process(server)), worker_pids(
            server.process.pid
        )
        server.load_model()
        (back,) = drive(server.url_grpc, [_stream(0, 8)], concurrency=1, timeout_s=HANG_S)
        scenario.requests += 1
        assert back.result.num_final == 1 and len(back.result.token_ids) == 8, back.result.errors
        assert len(worker_pids(server.process.pid)) == 2
    finally:
        server.stop()
    assert scenario.failures == 0, scenario.notes


def test_tp_unload_reload_and_shutdown_leave_nothing(scenario, smollm2_path, tmp_path) -> None:
    server = start_server(tmp_path, smollm2_path, TP, exit_timeout_s=60)
    try:
        results: list = []
        jobs = [_stream(i, 48) for i in range(8)]
        t = threading.Thread(target=lambda: results.extend(drive(server.url_grpc, jobs, 8, timeout_s=300)))
        t.start()
        opened = wait_until(lambda: metrics(server.url_metrics).get("inflight_requests_open") == 8)
        assert scenario.timed("8 streams open", opened), scenario.notes
        server.unload_model()
        t.join(300)
        ended = time.monotonic()
        for o in results:
            if o.result.num_final != 1 or o.result.errors or len(o.result.token_ids) != 48:
                scenario.fail(f"{o.job.rid}: {o.result.num_final} FINALs, {len(o.result.token_ids)} tokens, "
                              f"{o.result.errors}")  # fmt: skip
        gone = _until_no_process(server)
        scenario.timed("stub and workers gone after the unload drained", gone, hang_s=GONE_S)
        assert gone <= GONE_S, f"processes left {time.monotonic() - ended:.1f} s after the drain"
        scenario.requests = len(results)
        for cycle in range(RELOADS):
            server.load_model()
            assert len(worker_pids(server.process.pid)) == 2, f"cycle {cycle}"
            (out,) = drive(server.url_grpc, [_stream(cycle, 4)], concurrency=1, timeout_s=HANG_S)
            scenario.requests += 1
            assert out.result.num_final == 1 and len(out.result.token_ids) == 4, (cycle, out.result.errors)
            server.unload_model()
            gone = _until_no_process(server)
            scenario.timed("stub and workers gone after an unload", gone, hang_s=GONE_S)
            assert gone <= GONE_S, f"cycle {cycle}: {worker_pids(server.process.pid)} left"
        ports = _rendezvous_ports(server.log_text())
        assert len(ports) == RELOADS + 1, ports  # one group per load, each on a port of its own
        assert not [p for p in ports if _listening(p)], "a rendezvous port is still open after its unload"
        server.load_model()
        assert len(worker_pids(server.process.pid)) == 2
        server_pid = server.process.pid
        server.stop()
        stopped = time.monotonic()
        left = wait_until(lambda: not worker_pids(server_pid), interval_s=0.1)
        scenario.timed("workers gone after the server stopped", left, hang_s=GONE_S)
        assert left <= GONE_S, f"workers left {time.monotonic() - stopped:.1f} s after the shutdown"
    finally:
        server.stop()
    assert scenario.failures == 0, scenario.notes
