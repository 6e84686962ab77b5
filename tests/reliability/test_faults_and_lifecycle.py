"""Scenarios 9 (faults inside engine steps), 10 (the backend stub killed) and 11 (unload and shutdown with
live streams)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from tests.reliability.harness import PROMPTS, Job, check_clean, drive, start_server, stub_pid

STEP_FAULT_TOKEN, FATAL_TOKEN = 49000, 49001


@pytest.fixture(scope="module")
def fault_server(smollm2_path, tmp_path_factory):
    params = {"max_model_len": "256", "kv_cache_memory_bytes": str(64 << 20), "max_num_seqs": "4",
              "fault_injection": f"step:token={STEP_FAULT_TOKEN};fatal:token={FATAL_TOKEN}"}  # fmt: skip
    server = start_server(tmp_path_factory.mktemp("rel-faults"), smollm2_path, params)
    yield server
    server.stop()


def _long(i: int, max_tokens: int = 24) -> dict:
    return {"text_input": PROMPTS[i % 8], "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "exclude_input_in_output": True}  # fmt: skip


def _until_not_ready(server, timeout_s: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if not server.model_ready():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_step_fault_ends_that_steps_requests_only(scenario, fault_server, reference) -> None:
    stub = stub_pid(fault_server)
    poison = Job("poison", {"input_ids": np.array([1, 2, STEP_FAULT_TOKEN], dtype=np.int32), "max_tokens": 4})
    jobs = [Job(f"ok{i}", _long(i)) for i in range(8)]
    outcomes = drive(fault_server.url_grpc, [*jobs[:2], poison, *jobs[2:]], concurrency=9, timeout_s=300)
    scenario.requests = len(outcomes)
    errored = [o for o in outcomes if o.result.errors]
    poisoned = next(o for o in outcomes if o.job.rid == "poison")
    assert poisoned.result.errors and "injected step fault" in poisoned.result.errors[0]
    # The error lists the step's requests: exactly that many requests failed; all others are exact.
    in_step = poisoned.result.errors[0].rsplit("[", 1)[1].count("req-")
    assert len(errored) == in_step, [o.result.errors for o in errored]
    for o in outcomes:
        if o.result.num_final != 1:
            scenario.fail(f"{o.job.rid}: {o.result.num_final} FINALs")
        elif not o.result.errors and o.result.token_ids != list(
            reference(o.job.values["text_input"], 24).token_ids
        ):
            scenario.fail(f"{o.job.rid}: wrong output {o.result.text!r}")
    assert len(outcomes) - len(errored) >= 1, "no request survived the faulty step"
    check_clean(scenario, fault_server, stub)
    assert fault_server.model_ready()
    assert scenario.failures == 0, scenario.notes


def test_fatal_fault_makes_the_model_not_ready_and_reload_restores(scenario, fault_server) -> None:
    fatal = Job("fatal", {"input_ids": np.array([1, 2, FATAL_TOKEN], dtype=np.int32), "max_tokens": 4})
    outcomes = drive(fault_server.url_grpc, [Job(f"live{i}", _long(i, 200)) for i in range(3)] + [fatal],
                     concurrency=4, timeout_s=60)  # fmt: skip
    scenario.requests = len(outcomes)
    for o in outcomes:
        if o.result.num_final != 1 or not o.result.errors:
            scenario.fail(f"{o.job.rid}: {o.result.num_final} FINALs, errors {o.result.errors}")
    took = _until_not_ready(fault_server, 10)
    assert took is not None, "the model still reports ready 10 s after a fatal engine fault"
    scenario.notes.append(f"not ready {took:.2f} s after the fatal fault's answer")
    (after,) = drive(fault_server.url_grpc, [Job("after", _long(0, 2))], concurrency=1, timeout_s=10)
    assert after.result.errors and after.seconds < 2, after.result.errors
    fault_server.load_model()
    (back,) = drive(fault_server.url_grpc, [Job("back", _long(0, 2))], concurrency=1, timeout_s=60)
    scenario.requests += 2
    assert not back.result.errors and back.result.num_final == 1
    assert scenario.failures == 0, scenario.notes


def test_stub_killed_readiness_false_clients_get_errors_reload_restores(scenario, fault_server) -> None:
    if not fault_server.model_ready():
        fault_server.load_model()
    pid = stub_pid(fault_server)
    assert pid is not None
    results: list = []
    runner = threading.Thread(
        target=lambda: results.extend(
            drive(
                fault_server.url_grpc,
                [Job(f"k{i}", _long(i, 200)) for i in range(4)],
                concurrency=4,
                timeout_s=60,
            )
        )
    )
    runner.start()
    time.sleep(3)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    took = _until_not_ready(fault_server, 10)
    runner.join(60)
    scenario.requests = len(results)
    assert took is not None, "the model still reports ready 10 s after its stub was killed"
    scenario.notes.append(f"not ready {took:.2f} s after kill -9")
    for o in results:
        if o.result.num_final != 1 or not o.result.errors:
            scenario.fail(f"{o.job.rid}: {o.result.num_final} FINALs, errors {o.result.errors}")
    assert time.monotonic() - killed < 30, "clients hung after the stub died"
    fault_server.load_model()
    (back,) = drive(fault_server.url_grpc, [Job("back2", _long(0, 2))], concurrency=1, timeout_s=60)
    scenario.requests += 1
    assert not back.result.errors and back.result.num_final == 1, back.result.errors
    assert scenario.failures == 0, scenario.notes


def _live_streams(server, n: int, results: list) -> threading.Thread:
    jobs = [Job(f"live{i}", _long(i, 200) | {"ignore_eos": True}) for i in range(n)]
    t = threading.Thread(
        target=lambda: results.extend(drive(server.url_grpc, jobs, concurrency=n, timeout_s=120))
    )
    t.start()
    return t


def test_unload_and_shutdown_with_live_streams(scenario, smollm2_path, tmp_path) -> None:
    params = {"max_model_len": "256", "kv_cache_memory_bytes": str(64 << 20), "drain_timeout_s": "3"}
    server = start_server(tmp_path, smollm2_path, params)
    try:
        for phase in ("unload", "sigint"):
            results: list = []
            t = _live_streams(server, 16, results)
            time.sleep(4)
            start = time.monotonic()
            if phase == "unload":
                unloader = threading.Thread(target=server.unload_model)
                unloader.start()
                time.sleep(0.5)
                (new,) = drive(server.url_grpc, [Job("new", _long(0, 2))], concurrency=1, timeout_s=10)
                unloader.join(60)
                assert not unloader.is_alive(), "unload is stuck"
                assert not server.model_ready()
            else:
                server.process.send_signal(signal.SIGINT)
                time.sleep(0.5)
                (new,) = drive(server.url_grpc, [Job("new2", _long(0, 2))], concurrency=1, timeout_s=10)
                server.process.wait(60)
            took = time.monotonic() - start
            t.join(60)
            scenario.requests += len(results) + 1
            assert new.result.errors, f"{phase}: a new request was accepted"
            for o in results:
                if o.result.num_final != 1:
                    scenario.fail(f"{phase} {o.job.rid}: {o.result.num_final} FINALs, {o.result.errors}")
            scenario.notes.append(f"{phase}: done in {took:.1f} s")
            assert took < 30, f"{phase} took {took:.0f} s"
            if phase == "unload":
                server.load_model()
                check_clean(scenario, server, stub_pid(server))
    finally:
        server.stop()
    assert scenario.failures == 0, scenario.notes
