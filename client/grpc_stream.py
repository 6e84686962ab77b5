"""The gRPC transport: one bidirectional `ModelStreamInfer` stream per request (tritonclient.grpc)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from . import liveness
from .request import RequestInput, delta_from_outputs
from .stream import TokenStream
from .types import Delta, InflightError, ModelUnavailableError

DEFAULT_LIVENESS_S = 5.0

_NUMPY_TYPES = {
    "BYTES": np.object_,
    "INT32": np.int32,
    "UINT64": np.uint64,
    "FP32": np.float32,
    "BOOL": np.bool_,
}


def response_outputs(result: grpcclient.InferResult) -> tuple[dict[str, list[Any] | None], bool]:
    """A streamed response's output tensors as flat lists (by name), and whether it is the request's FINAL."""
    response = result.get_response()
    outputs = {}
    for output in response.outputs:
        array = result.as_numpy(output.name)
        outputs[output.name] = array.reshape(-1).tolist() if array is not None else None
    return outputs, response.parameters["triton_final_response"].bool_param


def to_infer_input(spec: RequestInput) -> grpcclient.InferInput:
    """A tritonclient InferInput (scalars as shape [1]; strings as UTF-8 bytes)."""
    values = [v.encode() if isinstance(v, str) else v for v in spec.values]
    array = np.array(values, dtype=_NUMPY_TYPES[spec.datatype])
    tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.datatype)
    tensor.set_data_from_numpy(array)
    return tensor


class GrpcTokenStream(TokenStream):
    """Sends one request on its own stream and hands out its responses as deltas.

    NOTE: a client object holds one stream at a time, so each request gets its own client; that keeps
    concurrent requests independent and lets `cancel` stop exactly this request.

    `liveness_s` (None: off): when no response arrived for that long, the server's liveness and the model's
    readiness are checked (`liveness.py`); a model that is not ready ends the request with
    `ModelUnavailableError` instead of leaving it hanging (Triton never ends the requests of a dead stub).
    """

    def __init__(
        self, url: str, model: str, inputs: list[RequestInput], timeout_s: float | None,
        liveness_s: float | None = DEFAULT_LIVENESS_S,
    ) -> None:  # fmt: skip
        super().__init__(timeout_s)
        self.url, self.model = url, model
        self._responses: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
        self._client = grpcclient.InferenceServerClient(url)
        self._event_lock = threading.Lock()
        self._liveness_failed = False
        self.last_event = time.monotonic()
        self.liveness_s = liveness_s if liveness_s is not None else float("inf")
        try:
            # NOTE: the stream's gRPC deadline makes the server cancel the request when the timeout passes.
            self._client.start_stream(callback=self._on_stream_event, stream_timeout=timeout_s)
            self._client.async_stream_infer(
                model, [to_infer_input(s) for s in inputs], enable_empty_final_response=True
            )
        except InferenceServerException as err:
            self._client.close()
            raise self._first_error(err) from None
        if liveness_s is not None:
            liveness.watch(self)

    def _on_stream_event(self, result: Any, error: InferenceServerException | None) -> None:
        with self._event_lock:
            if self._liveness_failed:
                return  # the guard already ended this request
            self.last_event = time.monotonic()
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
            liveness.unwatch(self)
        self._on_response(result, error)

    def fail_liveness(self, message: str) -> None:
        """The guard found the model not ready: end the request with an error (once)."""
        with self._event_lock:
            if self._liveness_failed:
                return
            self._liveness_failed = True
        self._on_response(None, liveness.LivenessFailure(message))

    def _first_error(self, err: InferenceServerException) -> InflightError:
        """When the stream fails at once (no server), the real error reached the callback before `err`."""
        try:
            _, reported = self._responses.get(timeout=1.0)
        except queue.Empty:
            reported = None
        error = reported or err
        return InflightError.from_grpc(error.message(), error.status())

    def _on_response(self, result: Any, error: InferenceServerException | None) -> None:
        self._responses.put((result, error))

    def _next_delta(self) -> Delta:
        remaining = self.remaining_s()
        try:
            result, error = self._responses.get(timeout=None if remaining is None else remaining + 1.0)
        except queue.Empty:
            raise InflightError("no response before the request's timeout", "DEADLINE_EXCEEDED") from None
        if isinstance(error, liveness.LivenessFailure):
            raise ModelUnavailableError(error.message())
        if error is not None:
            raise InflightError.from_grpc(error.message(), error.status())
        outputs, final = response_outputs(result)
        return delta_from_outputs(outputs, finished=final)

    def _shutdown(self, cancel: bool) -> None:
        liveness.unwatch(self)
        try:
            self._client.stop_stream(cancel_requests=cancel)
        finally:
            self._client.close()
