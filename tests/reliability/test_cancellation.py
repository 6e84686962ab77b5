"""Scenarios 1 and 2: cancellation storms and clients that die without cancelling."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.reliability.harness import (
    PROMPTS,
    Job,
    check_clean,
    drive,
    final_count,
    finals,
    received,
    settle,
    stub_pid,
    wait_until,
)
from tests.serving.triton_helpers import metrics


def test_cancellation_storm(scenario, rel_server, reference, full: bool) -> None:
    """64 concurrent streams, half cancelled (in the queue / prefill, mid-way, just before the last token):
    exactly one FINAL each (client side for survivors, server side for all), survivors exact, no leak."""
    rounds = 3 if full else 1
    max_tokens = 16 if full else 8
    stub = stub_pid(rel_server)
    rng = random.Random(1)
    for rnd in range(rounds):
        before = settle(rel_server)  # earlier requests' counts all pushed
        jobs = []
        for i in range(64):
            prompt = PROMPTS[i % len(PROMPTS)]
            values = {"text_input": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
                      "exclude_input_in_output": True}  # fmt: skip
            job = Job(f"storm{rnd}-{i}", values)
            if i % 2:
                expected = len(reference(prompt, max_tokens).token_ids)
                job.cancel_after = rng.choice([0, 0, 1, max(expected // 2, 1), max(expected - 1, 1)])
                job.cancel_delay_s = rng.random() * 0.03
            jobs.append(job)
        outcomes = drive(rel_server.url_grpc, jobs, concurrency=64)
        scenario.requests += len(outcomes)
        for o in outcomes:
            r = o.result
            if o.cancelled:
                if r.num_final > 1 or r.errors:
                    scenario.fail(f"{o.job.rid}: cancelled but got {r.num_final} FINALs, errors {r.errors}")
                continue
            exp = reference(o.job.values["text_input"], max_tokens)
            if r.num_final != 1 or r.errors:
                scenario.fail(f"{o.job.rid}: {r.num_final} FINALs, errors {r.errors}")
            elif r.token_ids != list(exp.token_ids) or r.text != exp.text:
                scenario.fail(f"{o.job.rid}: {r.text!r} != reference {exp.text!r}")
        after = check_clean(scenario, rel_server, stub)
        sent, got = finals(after) - finals(before), received(after) - received(before)
        if sent != got or got < 32:
            scenario.fail(f"the server sent {sent} FINALs for {got} requests that reached it (of 64)")
        if final_count(after, "INTERNAL") != final_count(before, "INTERNAL"):
            scenario.fail("INTERNAL errors during the storm")
    assert scenario.failures == 0, scenario.notes


_GRPC_CLIENT = textwrap.dedent("""
    import sys, time, numpy as np, tritonclient.grpc as g
    c = g.InferenceServerClient(sys.argv[1])
    got = []
    c.start_stream(callback=lambda result, error: got.append(1))
    inputs = []
    for name, value, dtype in (("text_input", np.array([b"Tell me a long story."], dtype=object), "BYTES"),
                               ("max_tokens", np.array([200], dtype=np.int32), "INT32"),
                               ("ignore_eos", np.array([True]), "BOOL"), ("stream", np.array([True]), "BOOL")):
        t = g.InferInput(name, [1], dtype); t.set_data_from_numpy(value); inputs.append(t)
    c.async_stream_infer("llm", inputs, request_id="killed", enable_empty_final_response=True)
    while len(got) < 3: time.sleep(0.01)
    print("streaming", flush=True)
    time.sleep(600)
""")
_HTTP_CLIENT = textwrap.dedent("""
    import sys, json, time, urllib.request
    body = {"text_input": "Tell me a long story.", "max_tokens": 200, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(f"http://{sys.argv[1]}/v2/models/llm/generate_stream",
                                 data=json.dumps(body).encode(), method="POST")
    resp = urllib.request.urlopen(req, timeout=60)
    n = 0
    while n < 3:
        if resp.readline().startswith(b"data:"): n += 1
    print("streaming", flush=True)
    time.sleep(600)
""")


_ENDED = ('inflight_requests_total{finish_reason="abort"}', 'inflight_requests_total{finish_reason="length"}')


def _ended_since(server, before: dict[str, float]) -> tuple[int, int]:
    """How many requests ended since `before`: (aborted, by their length)."""
    now = metrics(server.url_metrics)
    aborted, by_length = (int(now.get(k, 0) - before.get(k, 0)) for k in _ENDED)
    return aborted, by_length


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_killed_without_cancelling(scenario, rel_server, protocol: str) -> None:
    """SIGKILL a client mid-stream: the server stops generating and frees the request's blocks."""
    stub = stub_pid(rel_server)
    rounds = 3
    after_kill: list[int] = []
    for _ in range(rounds):
        before = settle(rel_server)  # earlier requests' counts all pushed
        script, url = (
            (_GRPC_CLIENT, rel_server.url_grpc) if protocol == "grpc" else (_HTTP_CLIENT, rel_server.url_http)
        )
        child = subprocess.Popen([sys.executable, "-c", script, url], stdout=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            assert line.strip() == "streaming", f"the client did not start streaming: {line!r}"
            tokens_at_kill = metrics(rel_server.url_metrics).get("inflight_generation_tokens_total", 0)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        scenario.requests += 1
        # NOTE: it ends aborted, not by its length (200 tokens; it has had 3): the server stopped it.
        took = wait_until(lambda before=before: _ended_since(rel_server, before) != (0, 0))
        if scenario.timed(f"{protocol} end after the kill", took):
            aborted, by_length = _ended_since(rel_server, before)
            if (aborted, by_length) != (1, 0):
                scenario.fail(
                    f"{protocol}: ended {aborted} aborted, {by_length} by length: it was not stopped"
                )
            generated = metrics(rel_server.url_metrics)["inflight_generation_tokens_total"] - tokens_at_kill
            after_kill.append(int(generated))
        check_clean(scenario, rel_server, stub)
    scenario.notes.append(f"tokens generated after the kill: {after_kill} (of up to 197)")
    assert scenario.failures == 0, scenario.notes
