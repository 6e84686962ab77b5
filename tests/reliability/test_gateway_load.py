"""Scenarios 12 and 13: the OpenAI gateway (`python -m inflight.gateway`) in front of the shared server.

12: fuzzed JSON bodies (hypothesis: 1,200 at full size, 200 fast) never get a 500 or crash anything; every
answer is OpenAI's error shape or a completion the official `openai` package's types validate.
13: 256 SSE streams (32 fast), half of them dropped by their client mid-stream: the other half complete
(exactly max_tokens tokens, one finish_reason, `[DONE]`), and afterwards no KV block and no request is left
on the server (`inflight_kv_blocks_used` back to 0) and the gateway has no open stream.
"""

from __future__ import annotations

import http.client
import json
import random
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from inflight.tools.server import TritonServer
from tests.gateway.bodies import ALLOWED_STATUSES, answer_problem, path_of, post_raw, request_bodies
from tests.gateway.conftest import API_KEY, start_gateway, stop_process
from tests.reliability.harness import HANG_S, check_clean, settle, stub_pid, wait_until

ABORTED = 'inflight_requests_total{finish_reason="abort"}'  # requests the engine ended early (cancelled)
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


@dataclass
class RunningGateway:
    host: str  # host:port
    process: object
    log_path: Path


@pytest.fixture(scope="module")
def gateway(rel_server: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A gateway process in front of the shared server (liveness checks after 1 s without a response)."""
    log_path = tmp_path_factory.mktemp("rel-gateway") / "gateway.log"
    url, process = start_gateway(rel_server.url_grpc, log_path, "--liveness-s", "1")
    try:
        yield RunningGateway(url.removeprefix("http://"), process, log_path)
    finally:
        stop_process(process)


def gateway_gauge(gateway: RunningGateway, name: str) -> float:
    request = urllib.request.Request(f"http://{gateway.host}/metrics", headers=HEADERS)
    with urllib.request.urlopen(request, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"{name} missing from the gateway's metrics")


def test_gateway_fuzzed_bodies_never_500(scenario, rel_server, gateway, full: bool) -> None:
    stub = stub_pid(rel_server)
    seen: dict[int, int] = {}

    @settings(max_examples=1200 if full else 200, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(body=request_bodies())
    def check(body: dict) -> None:
        body.setdefault("max_tokens", 2)  # NOTE: a valid body generates a few tokens, not the whole context
        path = path_of(body)
        scenario.requests += 1
        start = time.monotonic()
        status, headers, text = post_raw(
            gateway.host, path, json.dumps(body, allow_nan=True).encode(), HEADERS
        )
        scenario.timed("gateway answer", time.monotonic() - start)
        seen[status] = seen.get(status, 0) + 1
        if status not in ALLOWED_STATUSES:
            scenario.fail(f"{status} for {body!r}: {text[:300]}")
        elif (problem := answer_problem(path, status, headers, text, body.get("stream") is True)) is not None:
            scenario.fail(f"{problem} for {body!r}")

    check()
    scenario.notes.append(f"statuses: {dict(sorted(seen.items()))}")
    assert gateway.process.poll() is None, "the gateway exited"
    check_clean(scenario, rel_server, stub)
    assert seen.get(200, 0) >= 10 and seen.get(400, 0) >= 50, seen
    assert scenario.failures == 0, scenario.notes


@dataclass
class StreamEnd:
    dropped: bool
    chunks: int = 0
    tokens: int = 0
    reasons: tuple = ()
    done: bool = False
    problem: str | None = None


def _stream(gateway: RunningGateway, i: int, max_tokens: int, drop_after: int | None) -> StreamEnd:
    """One streamed completion (chat or not); `drop_after`: close the connection after that many chunks."""
    chat = i % 2 == 0
    body: dict = {"model": "llm", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.7, "seed": i,
                  "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    body |= (
        {"messages": [{"role": "user", "content": f"Tell me a story about {i}."}]}
        if chat
        else {"prompt": f"Story {i}:"}
    )
    end = StreamEnd(dropped=drop_after is not None)
    connection = http.client.HTTPConnection(gateway.host, timeout=HANG_S * 2)
    try:
        connection.request(
            "POST", "/v1/chat/completions" if chat else "/v1/completions", json.dumps(body), HEADERS
        )
        response = connection.getresponse()
        if response.status != 200:
            end.problem = f"{response.status}: {response.read()[:300]!r}"
            return end
        reasons = []
        while True:
            line = response.readline()
            if not line:
                end.problem = "the stream ended without [DONE]"
                return end
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                end.done, end.reasons = True, tuple(reasons)
                return end
            chunk = json.loads(data)
            if "error" in chunk:
                end.problem = f"error event {chunk}"
                return end
            if chunk["choices"]:
                end.chunks += 1
                reason = chunk["choices"][0]["finish_reason"]
                if reason is not None:
                    reasons.append(reason)
            elif chunk.get("usage"):
                end.tokens = chunk["usage"]["completion_tokens"]
            if drop_after is not None and end.chunks >= drop_after:
                connection.sock.close()  # NOTE: the client goes away mid-stream, without a word
                return end
    finally:
        connection.close()


def test_gateway_streams_half_dropped_leak_nothing(scenario, rel_server, gateway, full: bool) -> None:
    stub = stub_pid(rel_server)
    count, max_tokens = (256, 32) if full else (32, 24)
    rng = random.Random(13)
    drops = [rng.randint(1, max_tokens - 2) if i % 2 else None for i in range(count)]
    before = settle(rel_server)
    start = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        ends = list(pool.map(lambda i: _stream(gateway, i, max_tokens, drops[i]), range(count)))
    scenario.timed("all streams", time.monotonic() - start, hang_s=HANG_S * 10)
    scenario.requests = count
    for i, end in enumerate(ends):
        if end.problem is not None:
            scenario.fail(f"stream {i}: {end.problem}")
        elif not end.dropped and (end.reasons != ("length",) or end.tokens != max_tokens):
            scenario.fail(
                f"stream {i}: finish_reasons {end.reasons}, {end.tokens} tokens (want {max_tokens})"
            )
        elif end.dropped and (end.done or end.chunks != drops[i]):
            scenario.fail(f"stream {i}: dropped after {end.chunks} chunks, [DONE] seen: {end.done}")
    # The gateway notices each dropped connection and cancels its Triton request: no stream stays open.
    closed = wait_until(lambda: gateway_gauge(gateway, "inflight_gateway_open_streams") == 0, interval_s=0.2)
    assert scenario.timed("gateway streams closed", closed), scenario.notes
    after = check_clean(scenario, rel_server, stub)  # 0 KV blocks used, no request open: nothing leaked
    cancelled = after.get(ABORTED, 0) - before.get(ABORTED, 0)
    scenario.notes.append(f"{cancelled:.0f} of {count // 2} dropped streams were cancelled before their end")
    assert cancelled >= 1, "no dropped stream's request was cancelled in Triton"
    assert scenario.failures == 0, scenario.notes
