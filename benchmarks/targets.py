"""The two transports of the load generator: Triton over gRPC, and the engine service in this process.

Both send random-token prompts as token ids (`input_ids`), greedy, `ignore_eos`, exactly `max_tokens`
tokens, streamed; both call `on_response(time, num_tokens, final, error)` for every response.
"""

from __future__ import annotations

import gc
import queue
import threading
import time
from typing import Any

import tritonclient.grpc as grpcclient

from inflight.client.grpc_stream import to_infer_input
from inflight.client.request import build_inputs

from .loadgen import OnResponse, RequestSpec


def sampling_options(spec: RequestSpec) -> dict[str, Any]:
    return {"max_tokens": spec.max_tokens, "ignore_eos": True, "temperature": 0.0}


class _StreamSlot:
    """One gRPC stream kept open across requests, one request at a time (as perf_analyzer keeps one per slot).

    NOTE: a stream per request would put a channel set-up and a stream start into every TTFT; real clients
    keep their connection. A slot goes back to the pool when its request's final response arrives.
    """

    def __init__(self, url: str, model: str, pool: queue.SimpleQueue) -> None:
        self.model, self._pool = model, pool
        self.client = grpcclient.InferenceServerClient(url)
        self._on_timed: OnResponse | None = None
        self.broken = False
        self.client.start_stream(callback=self._on_response)

    def send(self, spec: RequestSpec, on_response: OnResponse) -> None:
        self._on_timed = on_response
        inputs = build_inputs(None, None, spec.prompt_ids, True, sampling_options(spec))
        self.client.async_stream_infer(
            self.model, [to_infer_input(s) for s in inputs], enable_empty_final_response=True
        )

    def _on_response(self, result: Any, error: Any) -> None:
        now = time.monotonic()
        on_timed = self._on_timed
        if on_timed is None:
            return
        if error is not None:
            # A stream-level error ends the stream itself: this slot is not reused.
            self.broken, self._on_timed = True, None
            on_timed(now, 0, True, str(error.message()))
            return
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        ids = result.as_numpy("output_ids")
        if final:
            self._on_timed = None
            self._pool.put(self)  # before the callback: it may let the next request go at once
        on_timed(now, 0 if ids is None else int(ids.size), final, None)

    def close(self) -> None:
        try:
            # Nothing is in flight: end the stream gracefully (docs/serving.md, "Closing streams").
            self.client.stop_stream(cancel_requests=self.broken)
        finally:
            self.client.close()


class TritonTarget:
    """Sends requests to the `model` of the Triton server at `url` over a pool of persistent gRPC streams."""

    name = "triton"

    def __init__(self, url: str, model: str = "llm") -> None:
        self.url, self.model = url, model
        self.metrics_url: str | None = None  # set when the benchmark started the server (its metrics port)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._slots: list[_StreamSlot] = []
        self._lock = threading.Lock()

    @property
    def num_streams(self) -> int:
        return len(self._slots)

    def prewarm(self, n: int) -> None:
        """Open streams until `n` exist (so a level's first requests do not pay for a connection)."""
        while len(self._slots) < n:
            self._idle.put(self._new_slot())

    def _new_slot(self) -> _StreamSlot:
        slot = _StreamSlot(self.url, self.model, self._idle)
        with self._lock:
            self._slots.append(slot)
        return slot

    def __call__(self, spec: RequestSpec, on_response: OnResponse) -> None:
        while True:
            try:
                slot = self._idle.get_nowait()
            except queue.Empty:
                slot = self._new_slot()
            if not slot.broken:
                break
        slot.send(spec, on_response)

    def close(self) -> None:
        for slot in self._slots:
            try:
                slot.close()
            except Exception:  # noqa: BLE001 - every request has ended; closing is best effort
                pass
        self._slots.clear()


class _TimedSink:
    """An EngineService ResponseSink that stamps each response as the service's response thread sends it."""

    def __init__(self, on_response: OnResponse) -> None:
        self.on_response = on_response

    def send(self, outputs: dict | None, error: Any, final: bool) -> None:
        now = time.monotonic()
        num_tokens = 0 if outputs is None else int(outputs["output_ids"].size)
        message = None if error is None else f"{error.kind.value}: {error.message}"
        self.on_response(now, num_tokens, final, message)

    def is_cancelled(self) -> bool:
        return False


class EngineDirectTarget:
    """The engine and its `EngineService` threads in this process: the model Triton runs, without Triton."""

    name = "engine_direct"

    def __init__(self, model: str, options: dict[str, Any]) -> None:
        from inflight.backend.engine.args import EngineArgs
        from inflight.backend.engine.engine import LLMEngine
        from inflight.backend.serving.service import EngineService, tune_interpreter_for_serving

        tune_interpreter_for_serving()  # as the Triton model does in its stub
        self.service = EngineService(LLMEngine(EngineArgs.from_options(model, options)))

    def __call__(self, spec: RequestSpec, on_response: OnResponse) -> None:
        from inflight.backend.engine.sampling_params import SamplingParams
        from inflight.backend.serving.request import GenerateRequest

        request = GenerateRequest(
            prompt=list(spec.prompt_ids), params=SamplingParams(**sampling_options(spec)), stream=True,
            exclude_input_in_output=True, return_num_output_tokens=True,
        )  # fmt: skip
        self.service.submit(request, _TimedSink(on_response))

    def close(self) -> None:
        import torch

        self.service.shutdown(drain_timeout_s=5)
        del self.service
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
