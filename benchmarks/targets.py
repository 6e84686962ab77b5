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

from inflight.client.grpc_stream import GrpcTokenStream
from inflight.client.request import build_inputs

from .loadgen import OnResponse, RequestSpec


def sampling_options(spec: RequestSpec) -> dict[str, Any]:
    return {"max_tokens": spec.max_tokens, "ignore_eos": True, "temperature": 0.0}


class _TimedGrpcStream(GrpcTokenStream):
    """The client's gRPC stream, stamping each response in the stream's callback (not when it is read).

    NOTE: the stream cannot be stopped from its own callback thread (stop_stream joins that thread), so a
    finished stream is handed to the target's closer thread.
    """

    def __init__(self, url: str, model: str, spec: RequestSpec, on_response: OnResponse, closed: queue.Queue):
        self._on_timed = on_response
        self._closed = closed
        self._ended = False
        inputs = build_inputs(None, None, spec.prompt_ids, True, sampling_options(spec))
        super().__init__(url, model, inputs, timeout_s=None)

    def _on_response(self, result: Any, error: Any) -> None:
        now = time.monotonic()
        if self._ended:
            return
        if error is not None:
            self._ended = True
            self._on_timed(now, 0, True, str(error.message()))
            self._closed.put(self)
            return
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        ids = result.as_numpy("output_ids")
        self._on_timed(now, 0 if ids is None else int(ids.size), final, None)
        if final:
            self._ended = True
            self._closed.put(self)


class TritonTarget:
    """Sends each request on its own gRPC stream to the `model` of the Triton server at `url`."""

    name = "triton"

    def __init__(self, url: str, model: str = "llm") -> None:
        self.url, self.model = url, model
        self._closed: queue.Queue = queue.Queue()
        self._closer = threading.Thread(target=self._close_loop, name="loadgen-closer", daemon=True)
        self._closer.start()

    def __call__(self, spec: RequestSpec, on_response: OnResponse) -> None:
        _TimedGrpcStream(self.url, self.model, spec, on_response, self._closed)

    def _close_loop(self) -> None:
        while True:
            stream = self._closed.get()
            if stream is None:
                return
            stream.done = True
            try:
                stream._shutdown(cancel=False)
            except Exception:  # noqa: BLE001 - the request has ended; closing is best effort
                pass

    def close(self) -> None:
        self._closed.put(None)
        self._closer.join(timeout=30)


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
        from inflight.backend.engine import LLMEngine
        from inflight.backend.engine_args import EngineArgs
        from inflight.backend.engine_service import EngineService

        self.service = EngineService(LLMEngine(EngineArgs.from_options(model, options)))

    def __call__(self, spec: RequestSpec, on_response: OnResponse) -> None:
        from inflight.backend.sampling_params import SamplingParams
        from inflight.backend.triton_inputs import GenerateRequest

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
