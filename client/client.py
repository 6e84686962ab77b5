"""`InflightClient`: generate or stream from the `llm` model of a Triton server, over gRPC or HTTP."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .http_stream import HttpTokenStream
from .request import build_inputs
from .stream import TokenStream
from .types import InflightError, Result

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


class InflightClient:
    """A client for the inflight model served by Triton.

    >>> client = InflightClient("localhost:8001")
    >>> client.generate("The capital of France is", max_tokens=8, temperature=0).text
    >>> for delta in client.stream(messages=[{"role": "user", "content": "Hi!"}], max_tokens=32):
    ...     print(delta.text, end="", flush=True)

    Sampling options (keyword arguments) are vLLM's names: `max_tokens`, `min_tokens`, `temperature`,
    `top_k`, `top_p`, `min_p`, `seed`, `repetition_penalty`, `presence_penalty`, `frequency_penalty`,
    `ignore_eos`, `stop`, `bad_words`, `logprobs`, `stop_token_ids`, `skip_special_tokens`,
    `include_stop_str_in_output`, `exclude_input_in_output` (default True), and `sampling_parameters`
    (a dict sent as the model's JSON input). `timeout_s` bounds each whole request.

    `liveness_s` (gRPC; None turns it off): when a stream got no response for that many seconds, the client
    checks that the server is live and the model ready, and ends the request with `ModelUnavailableError`
    if not (Triton never ends the requests of a backend process that died; docs/serving.md).
    """

    def __init__(
        self,
        url: str | None = None,
        model: str = "llm",
        protocol: Literal["grpc", "http"] = "grpc",
        timeout_s: float | None = 600.0,
        liveness_s: float | None = 5.0,
    ) -> None:
        if protocol not in DEFAULT_URLS:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        url = url or DEFAULT_URLS[protocol]
        for scheme in ("http://", "https://", "grpc://"):
            url = url.removeprefix(scheme)
        self.url, self.model, self.protocol, self.timeout_s = url.rstrip("/"), model, protocol, timeout_s
        self.liveness_s = liveness_s

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        input_ids: Sequence[int] | None = None,
        **sampling: Any,
    ) -> TokenStream:
        """Start a request and iterate over its deltas as the server sends them.

        Close the returned stream (or use it in a `with` block) to cancel the request early.
        """
        return self._open(prompt, messages, input_ids, sampling, stream=True)

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        input_ids: Sequence[int] | None = None,
        **sampling: Any,
    ) -> Result:
        """Run a request to the end and return the whole completion.

        The request is sent with `stream=false` (one response for HTTP `generate`); any deltas the
        server sends are joined.
        """
        start = time.monotonic()
        result = Result()
        with self._open(prompt, messages, input_ids, sampling, stream=False) as deltas:
            for delta in deltas:
                if result.time_to_first_token_s is None and (delta.text or delta.token_ids):
                    result.time_to_first_token_s = time.monotonic() - start
                result.add(delta)
        result.latency_s = time.monotonic() - start
        return result

    def is_ready(self) -> bool:
        """True when the model answers its readiness check."""
        if self.protocol == "http":
            try:
                url = f"http://{self.url}/v2/models/{self.model}/ready"
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False
        import tritonclient.grpc as grpcclient

        try:
            with grpcclient.InferenceServerClient(self.url) as client:
                return bool(client.is_model_ready(self.model, client_timeout=5))
        except Exception:  # noqa: BLE001 (unreachable, not ready, or refused: all mean "no")
            return False

    def _open(
        self,
        prompt: str | None,
        messages: Sequence[Mapping[str, str]] | None,
        input_ids: Sequence[int] | None,
        sampling: dict[str, Any],
        stream: bool,
    ) -> TokenStream:
        timeout_s = sampling.pop("timeout_s", self.timeout_s)
        try:
            inputs = build_inputs(prompt, messages, input_ids, stream, sampling)
        except ValueError as err:
            raise InflightError(str(err), "INVALID_ARG") from None
        if self.protocol == "grpc":
            from .grpc_stream import GrpcTokenStream  # NOTE: lazy: tritonclient.grpc and numpy load slowly.

            return GrpcTokenStream(self.url, self.model, inputs, timeout_s, self.liveness_s)
        return HttpTokenStream(self.url, self.model, inputs, stream, timeout_s)
