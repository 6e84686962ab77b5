"""The gateway's HTTP contract with raw requests (curl, http.client): SSE framing, OpenAI's errors and
statuses, metrics, and a dropped stream or non-streamed request cancelling its Triton request (the KV blocks
come back). The fuzzed bodies are a reliability scenario (tests/reliability/test_gateway_load.py)."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.serving.triton_helpers import settled_metrics

from .conftest import API_KEY, MODEL, Gateway, stop_process

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def post(
    gateway: Gateway, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict, Any]:
    return post_to(gateway.url, path, body, headers)


def post_to(
    url: str, path: str, body: Any, headers: dict[str, str] | None = None, timeout_s: float = 120
) -> tuple[int, dict, Any]:
    """POST ``body`` (JSON, or raw bytes): ``(status, headers lower-cased, the JSON answer)``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, headers=headers or AUTH, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                json.loads(response.read()),
            )
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, json.loads(err.read())


def curl_sse(gateway: Gateway, path: str, body: dict[str, Any]) -> list[str]:
    """The `data:` payloads of a streamed answer, as curl receives them."""
    done = subprocess.run(
        ["curl", "-sN", "--max-time", "120", f"{gateway.url}{path}", "-H", f"Authorization: Bearer {API_KEY}",
         "-H", "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True, text=True, check=True, timeout=150,
    )  # fmt: skip
    events = done.stdout.split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    assert all(e.startswith("data: ") for e in events[:-1]), done.stdout[:500]
    return [e.removeprefix("data: ") for e in events[:-1]]


def test_raw_sse_frames_chunks_then_done(gateway: Gateway) -> None:
    payloads = curl_sse(gateway, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 4,
                                                            "temperature": 0, "stream": True})  # fmt: skip
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "length" and reasons.count("length") == 1 and set(reasons[:-1]) == {None}


def test_completion_usage_sums_the_streamed_tokens(gateway: Gateway) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 7, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": 0}  # fmt: skip
    chunks = [json.loads(p) for p in curl_sse(gateway, "/v1/completions", body)[:-1]]
    tokens = sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks if c["choices"])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == tokens == 7
    status, _, whole = post(gateway, "/v1/completions", {**body, "stream": False})
    assert status == 200 and whole["usage"] == chunks[-1]["usage"]
    assert whole["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert "".join(whole["choices"][0]["logprobs"]["tokens"]) == whole["choices"][0]["text"]


def test_echo_prepends_the_prompt_and_its_logprobs(gateway: Gateway) -> None:
    prompt = "The capital of France is"
    status, _, body = post(gateway, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 3,
                                                         "temperature": 0, "echo": True, "logprobs": 1})  # fmt: skip
    assert status == 200
    choice = body["choices"][0]
    assert choice["text"].startswith(prompt)
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    num_prompt = body["usage"]["prompt_tokens"]
    assert len(logprobs["tokens"]) == num_prompt + body["usage"]["completion_tokens"]
    assert logprobs["token_logprobs"][0] is None and all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert logprobs["text_offset"] == [
        sum(map(len, logprobs["tokens"][:i])) for i in range(len(logprobs["tokens"]))
    ]


def _error(status: int, body: dict) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("temperature", 2.1, "chat"), ("temperature", -0.1, "chat"), ("top_p", 1.1, "chat"),
        ("max_tokens", -1, "chat"), ("max_tokens", 513, "chat"), ("max_completion_tokens", 0, "chat"),
        ("presence_penalty", 2.5, "chat"), ("frequency_penalty", -2.01, "completions"), ("n", 0, "chat"),
        ("messages", [], "chat"), ("prompt", "", "completions"), ("max_tokens", "12", "completions"),
        ("stop", 5, "chat"), ("top_logprobs", 3, "chat"), ("logprobs", 21, "completions"),
    ],
)  # fmt: skip
def test_invalid_values_are_400_naming_the_parameter(
    gateway: Gateway, field: str, value: Any, path: str
) -> None:
    body = {"model": MODEL, "max_tokens": 2, **({"messages": CHAT} if path == "chat" else {"prompt": "Hi"})}
    body[field] = value
    status, _, answer = post(gateway, f"/v1/{'chat/completions' if path == 'chat' else 'completions'}", body)
    error = _error(status, answer)
    assert status == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == field, error


def test_prompt_plus_max_tokens_past_the_context_is_400(gateway: Gateway) -> None:
    status, _, answer = post(
        gateway, "/v1/completions", {"model": MODEL, "prompt": "word " * 100, "max_tokens": 500}
    )
    error = _error(status, answer)
    assert status == 400 and error["param"] == "max_tokens" and "512" in error["message"]
    long_prompt = "word " * 600  # more tokens than the context holds: the llm model's own refusal
    status, _, answer = post(
        gateway, "/v1/completions", {"model": MODEL, "prompt": long_prompt, "max_tokens": 2}
    )
    assert status == 400 and _error(status, answer)["param"] == "prompt"


def test_malformed_bodies_are_400_not_422(gateway: Gateway) -> None:
    for raw in (b"{not json", b"[1, 2]", b'{"model": "llm"}', b'{"model": "llm", "messages": "hi"}'):
        status, _, answer = post(gateway, "/v1/chat/completions", raw)
        assert status == 400, (raw, answer)
        _error(status, answer)


def test_auth_unknown_model_and_body_limit(gateway: Gateway) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    for headers in ({"Content-Type": "application/json"}, {"Authorization": "Bearer nope"}):
        status, _, answer = post(gateway, "/v1/chat/completions", body, headers)
        assert status == 401 and _error(status, answer)["code"] == "invalid_api_key"
    request = urllib.request.Request(f"{gateway.url}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 401
    with urllib.request.urlopen(f"{gateway.url}/health", timeout=10) as response:  # no key needed
        assert response.status == 200
    status, _, answer = post(gateway, "/v1/chat/completions", {**body, "model": "gpt-4"})
    assert status == 404 and _error(status, answer)["code"] == "model_not_found"
    huge = {**body, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    status, _, answer = post(gateway, "/v1/chat/completions", huge)
    assert status == 413 and _error(status, answer)["code"] == "request_too_large"


def test_metrics_count_requests_by_endpoint_and_status(gateway: Gateway) -> None:
    post(gateway, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    post(gateway, "/v1/completions", {"model": MODEL, "prompt": "Hi", "temperature": 3})
    request = urllib.request.Request(f"{gateway.url}/metrics", headers=AUTH)
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples['inflight_gateway_requests_total{endpoint="/v1/completions",status="200"}']) >= 1
    assert float(samples['inflight_gateway_requests_total{endpoint="/v1/completions",status="400"}']) >= 1
    assert (
        float(samples['inflight_gateway_time_to_first_token_seconds_count{endpoint="/v1/completions"}']) >= 1
    )
    assert float(samples["inflight_gateway_open_streams"]) == 0


def test_a_dropped_stream_cancels_its_request_and_frees_its_blocks(gateway: Gateway) -> None:
    metrics_url = gateway.triton.url_metrics
    _wait_for_no_blocks_used(metrics_url)  # NOTE: requests of earlier tests (cancelled ones too) are done
    connection = http.client.HTTPConnection(gateway.url.removeprefix("http://"), timeout=60)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), AUTH)
    response = connection.getresponse()
    assert response.status == 200
    for _ in range(4):  # a few chunks: the request is generating
        assert response.readline().startswith(b"data: ") and response.readline() == b"\n"
    during = settled_metrics(metrics_url)
    assert during["inflight_kv_blocks_used"] > 0
    connection.sock.close()  # the client goes away mid-stream
    connection.close()
    after = _wait_for_no_blocks_used(metrics_url)
    # NOTE: cancelled long before its 400 tokens: the output counter grew by far fewer
    assert after["inflight_generation_tokens_total"] - during["inflight_generation_tokens_total"] < 300


def test_a_dropped_non_streamed_request_is_cancelled_and_frees_its_blocks(gateway: Gateway) -> None:
    metrics_url = gateway.triton.url_metrics
    _wait_for_no_blocks_used(metrics_url)
    before = settled_metrics(metrics_url)
    connection = http.client.HTTPConnection(gateway.url.removeprefix("http://"), timeout=60)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "ignore_eos": True}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), AUTH)
    deadline = time.monotonic() + 60
    while (during := settled_metrics(metrics_url))["inflight_generation_tokens_total"] < (
        before["inflight_generation_tokens_total"] + 3
    ):  # the request is generating (no byte of the answer comes before its end)
        assert time.monotonic() < deadline, "the request never started generating"
    assert during["inflight_kv_blocks_used"] > 0
    connection.sock.close()  # the client goes away before the answer
    connection.close()
    after = _wait_for_no_blocks_used(metrics_url)
    # NOTE: cancelled long before its 400 tokens: the output counter grew by far fewer
    assert after["inflight_generation_tokens_total"] - before["inflight_generation_tokens_total"] < 300
    aborted = 'inflight_requests_total{finish_reason="abort"}'
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1


def _wait_for_no_blocks_used(metrics_url: str, timeout_s: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while (samples := settled_metrics(metrics_url))["inflight_kv_blocks_used"] != 0:
        assert time.monotonic() < deadline, "KV blocks stayed in use with no request running"
    return samples


def test_triton_down_is_503_with_retry_after(gateway: Gateway, tmp_path) -> None:
    from inflight.tools.server import free_port

    command_url, proc = _gateway_without_triton(tmp_path, free_port())
    try:
        status, headers, answer = post_to(
            command_url, "/v1/chat/completions", {"model": MODEL, "messages": CHAT}, timeout_s=60
        )
        assert status == 503 and headers.get("retry-after") == "1", answer
        assert _error(status, answer)["type"] == "server_error"
    finally:
        stop_process(proc)


def _gateway_without_triton(tmp_path, triton_port: int):
    """A gateway whose Triton address has no server (its /health answers 503, so not waited on)."""
    import sys

    from inflight.tools.server import free_port

    port = free_port()
    command = [sys.executable, "-m", "inflight.gateway", "--triton-url", f"localhost:{triton_port}",
               "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY]  # fmt: skip
    log = open(tmp_path / "gw-no-triton.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
        except urllib.error.HTTPError as err:
            assert err.code == 503
            return url, process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the gateway without Triton never answered /health")
