"""The TensorRT-LLM-compatible ``ensemble`` model: ``model_repository/ensemble/1/model.py`` re-exports
``TritonPythonModel``.

A thin decoupled Python model in front of ``llm``: ``execute`` checks a batched request
(``trtllm_ensemble_inputs``), then hands each batch row to ``llm`` through Triton's decoupled BLS
(``pb_utils.InferenceRequest(...).exec(decoupled=True)``), one thread per row, and forwards every ``llm``
response as it arrives, tagged with its ``batch_index`` / ``sequence_index``. The request's FINAL flag goes
out once, after its last row ended (an error final when a row failed or the client cancelled)::

    client ──[batch, ...]──► ensemble.execute ──► row 0 thread ──BLS──► llm ─┐ responses, each forwarded
                                               └─► row 1 thread ──BLS──► llm ─┤ at once (one sender lock)
                                                                              └─► last row ends: FINAL

Numpy and ``triton_python_backend_utils`` only: this stub never loads torch or the engine.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from inflight.backend.serving.request import ErrorKind, ServiceError
from inflight.backend.serving.trtllm_ensemble_inputs import (
    RowRequest,
    ensemble_outputs,
    parse_ensemble_request,
)

logger = logging.getLogger("inflight.ensemble")

DEFAULT_LLM_MODEL = "llm"
# NOTE: each is_cancelled() is a round trip to the server; a row checks at most this often.
CANCEL_POLL_S = 0.05


@dataclass(frozen=True)
class LlmReply:
    """One response of the ``llm`` model to a row's request: its output tensors, or its error."""

    outputs: dict[str, np.ndarray] | None = None
    error: ServiceError | None = None


class EnsembleSink(Protocol):
    """Where one ensemble request's responses go (the Triton response sender, or a test double)."""

    def send(self, outputs: dict[str, np.ndarray]) -> None: ...

    def finish(self, error: ServiceError | None) -> None: ...

    def is_cancelled(self) -> bool: ...


RowStream = Callable[[RowRequest], Iterable[LlmReply]]


class EnsembleRequest:
    """One ensemble request in flight: its rows' ``llm`` streams, forwarded, and its one final response."""

    def __init__(self, rows: list[RowRequest], sink: EnsembleSink, stream_row: RowStream,
                 cancel_poll_s: float = CANCEL_POLL_S) -> None:  # fmt: skip
        self.rows = rows
        self.sink = sink
        self.stream_row = stream_row
        self.cancel_poll_s = cancel_poll_s
        self._lock = threading.Lock()
        self._num_open = len(rows)
        self._errors: list[tuple[int, ServiceError]] = []
        self._cancelled = False
        self._finished = False
        self._last_poll = time.monotonic()

    def start(self) -> list[threading.Thread]:
        """One thread per row; returns them (started)."""
        threads = [
            threading.Thread(
                target=self.run_row, args=(row,), name=f"ensemble-row-{row.batch_index}", daemon=True
            )
            for row in self.rows
        ]
        for thread in threads:
            thread.start()
        return threads

    def run_row(self, row: RowRequest) -> None:
        """Forward one row's ``llm`` responses; the last row to end sends the final response."""
        try:
            stream = self.stream_row(row)
            cancel = getattr(stream, "cancel", None)
            for reply in stream:
                if reply.error is not None:
                    self._record_error(row, reply.error)
                elif reply.outputs and not self._stopped():
                    self._send(ensemble_outputs(reply.outputs, row))
                self._poll_cancelled()
                if cancel is not None and self._is_cancelled():
                    cancel()  # Triton >= 25.04 cancels the llm request; then its stream ends
                    cancel = None
        except Exception as exc:  # noqa: BLE001 - a row's failure must still end the request
            logger.exception("ensemble row %d failed", row.batch_index)
            self._record_error(row, ServiceError(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"))
        finally:
            self._row_done()

    def _is_cancelled(self) -> bool:
        with self._lock:
            return self._cancelled

    def _stopped(self) -> bool:
        with self._lock:
            return self._cancelled or self._finished

    def _send(self, outputs: dict[str, np.ndarray]) -> None:
        with self._lock:
            if self._cancelled or self._finished:
                return
            try:
                self.sink.send(outputs)
            except Exception:  # noqa: BLE001 - the client is gone: stop forwarding, still end the request
                logger.warning("sending an ensemble response failed; dropping the rest", exc_info=True)
                self._cancelled = True
                self._finish_locked()

    def _record_error(self, row: RowRequest, error: ServiceError) -> None:
        prefix = f"batch_index {row.batch_index}: " if len(self.rows) > 1 else ""
        with self._lock:
            self._errors.append((row.batch_index, ServiceError(error.kind, prefix + error.message)))

    def _poll_cancelled(self) -> None:
        """Ask the server whether the client cancelled (at most every ``cancel_poll_s``).

        NOTE: under the lock, as every send: Triton 2.51 frees a response factory with its final response,
        and a cancellation check racing it read freed memory (docs/serving.md). The ``llm`` requests of a
        cancelled request cannot be cancelled in 2.51 (BLS response iterators have no ``cancel()`` before
        python_backend r25.04): the final CANCELLED response goes out at once, and the rows drain their
        streams to the end, dropping the responses.
        """
        now = time.monotonic()
        with self._lock:
            if self._cancelled or self._finished or now - self._last_poll < self.cancel_poll_s:
                return
            self._last_poll = now
            try:
                self._cancelled = self.sink.is_cancelled()
            except Exception:  # noqa: BLE001
                self._cancelled = True
            if self._cancelled:
                self._finish_locked()  # at once: the rows still open only drain their llm streams

    def _row_done(self) -> None:
        with self._lock:
            self._num_open -= 1
            if self._num_open == 0:
                self._finish_locked()

    def _finish_locked(self) -> None:
        """Send the one final response (the lock held); later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        try:
            self.sink.finish(self._final_error())
        except Exception:  # noqa: BLE001 - nothing more can be sent for this request
            logger.warning("sending the final ensemble response failed", exc_info=True)

    def _final_error(self) -> ServiceError | None:
        if self._cancelled:
            return ServiceError(ErrorKind.CANCELLED, "the request was cancelled")
        if not self._errors:
            return None
        errors = [error for _, error in sorted(self._errors, key=lambda item: item[0])]
        kinds = {error.kind for error in errors}
        kind = errors[0].kind if len(kinds) == 1 else ErrorKind.INTERNAL
        return ServiceError(kind, "; ".join(error.message for error in errors))


class _TritonSender:
    """A request's Triton response sender as an ``EnsembleSink`` (``EnsembleRequest`` serializes calls)."""

    def __init__(self, pb_utils: Any, sender: Any) -> None:
        self.pb = pb_utils
        self.sender = sender

    def send(self, outputs: dict[str, np.ndarray]) -> None:
        tensors = [self.pb.Tensor(name, value) for name, value in outputs.items()]
        self.sender.send(self.pb.InferenceResponse(output_tensors=tensors))

    def finish(self, error: ServiceError | None) -> None:
        sender, self.sender = self.sender, None  # NOTE: never used after its final response
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if error is None:
            sender.send(flags=final)
            return
        code = getattr(self.pb.TritonError, error.kind.value, self.pb.TritonError.INTERNAL)
        sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(error.message, code)), flags=final)

    def is_cancelled(self) -> bool:
        return self.sender is None or bool(self.sender.is_cancelled())


def _error_kind(pb_utils: Any, error: Any) -> ErrorKind:
    code = error.code() if hasattr(error, "code") else None
    for kind in ErrorKind:
        if code is not None and code == getattr(pb_utils.TritonError, kind.value, None):
            return kind
    return ErrorKind.INTERNAL


class _BlsStream:
    """A decoupled BLS response iterator as ``LlmReply``s (empty responses skipped), with ``cancel`` where
    this Triton's iterator has one (python_backend r25.04 and later)."""

    def __init__(self, pb_utils: Any, responses: Any) -> None:
        self.pb = pb_utils
        self.responses = responses
        if hasattr(responses, "cancel"):
            self.cancel = responses.cancel

    def __iter__(self) -> Iterator[LlmReply]:
        for response in self.responses:
            if response.has_error():
                error = response.error()
                yield LlmReply(error=ServiceError(_error_kind(self.pb, error), error.message()))
                continue
            tensors = response.output_tensors()
            if tensors:
                yield LlmReply(outputs={t.name(): t.as_numpy() for t in tensors})


class TritonPythonModel:
    """Decoupled Triton model with TensorRT-LLM's ensemble tensors, serving through the ``llm`` model."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise ValueError("model_transaction_policy { decoupled: true } is required in config.pbtxt")
        parameters = config.get("parameters", {})
        self.llm_model = parameters.get("llm_model_name", {}).get("string_value", "") or DEFAULT_LLM_MODEL

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sink = _TritonSender(self.pb, request.get_response_sender())
            try:
                rows = parse_ensemble_request({t.name(): t.as_numpy() for t in request.inputs()})
            except ValueError as exc:
                sink.finish(ServiceError(ErrorKind.INVALID_ARG, str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - never let one request take the model down
                logger.exception("parsing an ensemble request failed")
                sink.finish(ServiceError(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"))
                continue
            EnsembleRequest(rows, sink, self._stream_row).start()
        return None

    def _stream_row(self, row: RowRequest) -> _BlsStream:
        """The ``llm`` model's responses to one row, through decoupled BLS."""
        pb = self.pb
        inputs = [pb.Tensor(name, value) for name, value in row.llm_inputs.items()]
        # NOTE: no requested outputs means every output llm sends (sequence_index only where llm has it).
        request = pb.InferenceRequest(model_name=self.llm_model, inputs=inputs, requested_output_names=[])
        return _BlsStream(pb, request.exec(decoupled=True))

    def finalize(self) -> None:
        logger.info("ensemble: finalize")
