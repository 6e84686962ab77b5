"""The gRPC transport: one bidirectional `ModelStreamInfer` stream per request (tritonclient.grpc)."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .request import RequestInput, delta_from_outputs
from .stream import TokenStream
from .types import Delta, InflightError

_NUMPY_TYPES = {
    "BYTES": np.object_,
    "INT32": np.int32,
    "UINT64": np.uint64,
    "FP32": np.float32,
    "BOOL": np.bool_,
}


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
    """

    def __init__(self, url: str, model: str, inputs: list[RequestInput], timeout_s: float | None) -> None:
        super().__init__(timeout_s)
        self._responses: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
        self._client = grpcclient.InferenceServerClient(url)
        try:
            # NOTE: the stream's gRPC deadline makes the server cancel the request when the timeout passes.
            self._client.start_stream(callback=self._on_response, stream_timeout=timeout_s)
            self._client.async_stream_infer(
                model, [to_infer_input(s) for s in inputs], enable_empty_final_response=True
            )
        except InferenceServerException as err:
            self._client.close()
            raise self._first_error(err) from None

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
        if error is not None:
            raise InflightError.from_grpc(error.message(), error.status())
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        outputs = {}
        for output in response.outputs:
            array = result.as_numpy(output.name)
            outputs[output.name] = array.reshape(-1).tolist() if array is not None else None
        return delta_from_outputs(outputs, finished=final)

    def _shutdown(self, cancel: bool) -> None:
        try:
            self._client.stop_stream(cancel_requests=cancel)
        finally:
            self._client.close()
