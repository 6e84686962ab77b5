"""Errors and cancellation through inflight.client: the server's message, its status, and a clean stop."""

from __future__ import annotations

import time

import pytest

from inflight.client import InflightClient, InflightError
from inflight.tools.server import free_port

from .triton_helpers import metrics, settled_metrics

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


def _metric(server, name: str) -> float:
    return metrics(server.url_metrics).get(name, 0.0)


def _wait_for(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("streamed", [False, True], ids=["generate", "stream"])
def test_invalid_argument_carries_the_servers_message(triton_server, protocol: str, streamed: bool) -> None:
    url = triton_server.url_grpc if protocol == "grpc" else triton_server.url_http
    client = InflightClient(url, protocol=protocol, timeout_s=60)
    with pytest.raises(InflightError) as caught:
        if streamed:
            list(client.stream("Hello", max_tokens=4, temperature=-1.0))
        else:
            client.generate("Hello", max_tokens=4, temperature=-1.0)
    assert "temperature" in caught.value.message and ">= 0" in caught.value.message
    # NOTE: HTTP carries Triton's error code; an error inside a gRPC stream carries only the message.
    assert caught.value.status == ("INVALID_ARG" if protocol == "http" else None)


def test_too_long_prompt_and_unknown_model(triton_server) -> None:
    client = InflightClient(triton_server.url_http, protocol="http", timeout_s=60)
    with pytest.raises(InflightError, match="max_model_len") as caught:
        client.generate(input_ids=[1] * 1100, max_tokens=4)
    assert caught.value.status == "INVALID_ARG"
    with pytest.raises(InflightError, match="nope") as caught:
        InflightClient(triton_server.url_grpc, model="nope").generate("Hi", max_tokens=2)


def test_unreachable_server_is_unavailable() -> None:
    port = free_port()
    with pytest.raises(InflightError) as caught:
        InflightClient(f"localhost:{port}", protocol="http", timeout_s=5).generate("Hi")
    assert caught.value.status == "UNAVAILABLE"
    with pytest.raises(InflightError) as caught:
        InflightClient(f"localhost:{port}", timeout_s=5).generate("Hi")
    assert caught.value.status == "UNAVAILABLE"


def test_bad_request_is_refused_before_sending() -> None:
    client = InflightClient("localhost:1")
    with pytest.raises(InflightError, match="exactly one") as caught:
        client.generate("a", input_ids=[1, 2])
    assert caught.value.status == "INVALID_ARG"
    with pytest.raises(InflightError, match="unknown sampling option 'temprature'"):
        client.generate("a", temprature=0)
    with pytest.raises(InflightError, match=r"seed must be an integer in \[0, "):
        client.generate("a", seed=-1)
    with pytest.raises(InflightError, match="ignore_eos must be a boolean"):
        client.generate("a", ignore_eos="yes")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_closing_the_stream_cancels_the_request(triton_server, protocol: str) -> None:
    url = triton_server.url_grpc if protocol == "grpc" else triton_server.url_http
    client = InflightClient(url, protocol=protocol, timeout_s=120)
    aborted = settled_metrics(triton_server.url_metrics).get(
        'inflight_requests_total{finish_reason="abort"}', 0.0
    )
    stream = client.stream("Count from one to one thousand:", **LONG)
    first = [next(stream), next(stream)]
    assert not any(d.finished for d in first)
    stream.close()
    assert list(stream) == []
    assert _wait_for(
        lambda: _metric(triton_server, 'inflight_requests_total{finish_reason="abort"}') > aborted
    )
    assert _wait_for(lambda: _metric(triton_server, "inflight_num_requests_running") == 0)
    # The server goes on serving; a `with` block and cancel() stop a stream the same way.
    with client.stream("Tell me a story.", **LONG) as again:
        assert next(
            again
        ).token_ids  # streaming again (the text may be empty: SmolLM2 starts with <|im_end|>)
    again.cancel()
    assert client.generate("Hi", max_tokens=2, temperature=0).num_output_tokens == 2
    assert _wait_for(
        lambda: _metric(triton_server, 'inflight_requests_total{finish_reason="abort"}') > aborted + 1
    )


def test_timeout_stops_the_request(triton_server) -> None:
    client = InflightClient(triton_server.url_grpc, timeout_s=0.5)
    with pytest.raises(InflightError) as caught:
        list(client.stream("Count from one to one thousand:", **LONG))
    assert caught.value.status == "DEADLINE_EXCEEDED"
    assert _wait_for(lambda: _metric(triton_server, "inflight_num_requests_running") == 0)
