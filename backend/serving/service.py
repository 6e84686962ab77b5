"""The serving floor's engine thread and response thread: they run the engine behind Triton.

::

    execute() ──submit()──► inbox ──► engine thread: add / abort / engine.step() (polls cancellation
                                                  │ while the GPU runs the step)
                                                  │ per-step deltas, as numpy output tensors
                                                  ▼
                                    ResponseThread (response_thread.py): sink.send(..., final)

Responses are per sequence (``SamplingParams.n``; each carries its ``sequence_index``), streamed or not.
Every request gets exactly one final response, after all of its sequences: on success, bad input
(INVALID_ARG), a full queue (UNAVAILABLE), cancellation, an engine fault (INTERNAL) and shutdown.
Triton's objects reach the service only as each request's ``ResponseSink`` (``triton_model`` wraps a
response sender as one, tests and the benchmarks pass their own); it takes a parsed ``GenerateRequest`` (``triton_inputs`` reads one from Triton's
input tensors) and has ``responses`` build the numpy output tensors that the sink sends.
"""

from __future__ import annotations

import gc
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable

from inflight.backend.engine import gc_freeze
from inflight.backend.engine.engine import EngineDeadError, LLMEngine
from inflight.backend.engine.outputs import RequestOutput
from inflight.backend.serving.metrics import EngineMetrics
from inflight.backend.serving.metrics_writer import MetricsWriter
from inflight.backend.serving.request import (
    CLOSED_SINK,
    ErrorKind,
    GenerateRequest,
    ResponseSink,
    SequenceState,
    ServiceError,
)
from inflight.backend.serving.response_thread import ResponseThread
from inflight.batching import QueueFullError

logger = logging.getLogger("inflight")


# NOTE: a serving process runs several Python threads (engine, responses, metrics, Triton's request thread)
# and a thread waiting for the GIL gets it after at most this long (CPython's default is 5 ms). Measured
# through Triton (H200, 8B, 2 req/s): TTFT p50 26.9 -> 22.9 ms; throughput at 256 streams unchanged.
SERVING_SWITCH_INTERVAL_S = 0.0005


def tune_interpreter_for_serving() -> None:
    """Set the process's GIL switch interval for serving (see SERVING_SWITCH_INTERVAL_S)."""
    sys.setswitchinterval(SERVING_SWITCH_INTERVAL_S)


_SCHEDULER_STATS_INTERVAL_S = 0.1  # the scheduler gauges are published at most this often (and when idle)


def _prompt_field(prompt: object) -> str:
    """The input a prompt came from, to name it in errors."""
    if isinstance(prompt, str):
        return "text_input"
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return "messages"
    return "input_ids"


class EngineService:
    """Owns an ``LLMEngine`` and the two threads that serve it."""

    def __init__(
        self,
        engine: LLMEngine,
        metrics: EngineMetrics | None = None,
        cancel_poll_s: float = 0.02,
        on_fatal: Callable[[], None] | None = None,
        cancel_poll_batch: int = 16,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.on_fatal = on_fatal  # called (engine thread) once the engine died and every live request ended
        self.cancel_poll_s = cancel_poll_s
        # NOTE: each is_cancelled() is a round trip to the Triton server. The engine thread polls while the
        # GPU runs a step (a thread of its own measured worse: its GIL hand-offs stalled the engine thread),
        # and a poll checks at most this many live requests, in turn: 256 live streams cost 800 checks/s.
        self.cancel_poll_batch = cancel_poll_batch
        self._poll_cursor = 0
        self._last_poll = 0.0
        self._cancelled: list[str] = []  # found by the last poll, aborted after the step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # NOTE: a send that fails (the client went away) aborts the request in the engine.
        self._responses = ResponseThread(metrics, lambda request_id: self._inbox.put(("abort", request_id)))
        self._live: dict[str, GenerateRequest] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self._accepting = True
        self.fatal_error: str | None = None
        self._metrics_writer = MetricsWriter(metrics) if metrics is not None else None
        self._step_tokens, self._step_ttfts, self._step_itls = 0, [], []  # this step's, for the writer
        self._last_stats_time = 0.0
        self._engine_thread = threading.Thread(target=self._engine_loop, name="inflight-engine", daemon=True)
        # NOTE: the model, the tokenizer and the block pool are millions of long-lived objects; a full
        # (generation 2) collection walks them all and stopped the engine thread for 170-210 ms on the
        # 2-core CPU machine (benchmarks/host_overhead.py, 512 streams). Frozen, the collector skips them;
        # requests' objects are collected as before. Unfrozen at shutdown, so a reload frees the old engine.
        gc.collect()
        gc_freeze.freeze()
        self._heap_frozen = True
        if metrics is not None:
            metrics.flush()  # what the model set up (healthy, KV totals) shows at once
        self._engine_thread.start()
        self._responses.start()
        # A dead tensor-parallel worker: the engine thread dies as on any fatal error, even when idle.
        engine.add_death_listener(lambda reason: self._inbox.put(("fatal", reason)))

    # ------------------------------------------------------------------------------------ public side
    @property
    def is_healthy(self) -> bool:
        return self.fatal_error is None and self._engine_thread.is_alive()

    def submit(self, request: GenerateRequest, sink: ResponseSink) -> str:
        """Queue a validated request (any thread); returns the engine's id for it. The request is the
        service's from here on: its id, sink and arrival are set now, its state kept until its final."""
        if request.request_id:
            raise ValueError(f"request {request.request_id} was submitted already: submit a new one")
        with self._lock:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        self._responses.opened()
        request.request_id, request.sink, request.arrival = request_id, sink, time.monotonic()
        if not self._accepting:
            refusal = ServiceError(ErrorKind.UNAVAILABLE, "the model is shutting down")
        elif not self.is_healthy:
            refusal = self._dead_error()
        else:
            self._inbox.put(("add", request))
            return request_id
        if self._responses.is_alive():
            self._responses.put(request, None, refusal, True)
        else:  # after shutdown nothing else would answer
            request.sink = CLOSED_SINK  # released with the final, as _send does
            sink.send(None, refusal, True)
        return request_id

    def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests, let live ones finish for up to ``drain_timeout_s``, end the rest, stop."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._responses.num_open and self.is_healthy and time.monotonic() < deadline:
            time.sleep(0.01)
        self._inbox.put(("stop", None))
        self._engine_thread.join(timeout=30)
        self.engine.shutdown()  # the tensor-parallel workers, once no step runs
        self._responses.stop()
        if self._metrics_writer is not None:
            self._metrics_writer.close()
        if self._heap_frozen:
            self._heap_frozen = False
            gc_freeze.unfreeze()

    # ---------------------------------------------------------------------------------- engine thread
    def _engine_loop(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                if busy and (early := self.engine.wait_for_small_step()):
                    # a small step that ended a prompt, read before the next step is planned (engine.py);
                    # what arrived while it ran joins the next step
                    self._handle_outputs(early)
                    self._publish_step_metrics()  # it may have ended the last request: no step follows
                if not self._drain_inbox(block=not busy):
                    break
                if self.engine.has_unfinished_requests():
                    self._handle_outputs(self.engine.step(self._poll_cancellations))
                    self._publish_step_metrics()
                    for request_id in self._cancelled:
                        self._abort(request_id, client_gone=True)
                    self._cancelled.clear()
        except BaseException as exc:  # noqa: BLE001 - the engine is gone; every live request must still end
            self.fatal_error = f"{type(exc).__name__}: {exc}"
            logger.exception("inflight engine thread died")
            if self.metrics is not None:
                self.metrics.healthy.set(0)
                self.metrics.flush()  # at once: monitoring must see the death now, not an interval later
            self._fail_all(self._dead_error())
            if self.on_fatal is not None:
                try:
                    self.on_fatal()
                except Exception:  # noqa: BLE001
                    logger.exception("the on_fatal callback failed")
            self._drain_after_death()
            return
        # Stopping: whatever is still live ends now.
        self._fail_all(
            ServiceError(ErrorKind.UNAVAILABLE, "the model was unloaded before this request finished")
        )

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        try:
            item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            command, payload = item
            if command == "stop":
                return False
            if command == "add":
                self._add(payload)
            elif command == "fatal":
                raise EngineDeadError(payload)
            elif command == "abort":
                self._abort(payload, client_gone=True)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, live: GenerateRequest) -> None:
        error = None
        try:
            ids = self.engine.prompts.token_ids(live.prompt, live.tools)
        except ValueError as exc:
            error = ServiceError(ErrorKind.INVALID_ARG, f"{_prompt_field(live.prompt)}: {exc}")
        else:
            try:
                self.engine.add_checked_request(live.request_id, ids, live.params)
            except ValueError as exc:  # a sampling parameter past the engine's limits (the message names it)
                error = ServiceError(ErrorKind.INVALID_ARG, str(exc))
            except QueueFullError as exc:
                error = ServiceError(ErrorKind.UNAVAILABLE, str(exc))
        if error is not None:
            self._responses.put(live, None, error, True)
            return
        live.prompt_token_ids = ids
        live.sequences = [SequenceState(i) for i in range(live.params.n)]
        if not live.stream and not live.exclude_input_in_output:
            prompt = live.prompt
            live.prompt_text = prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(ids)
        self._live[live.request_id] = live
        if self._metrics_writer is not None:
            self._metrics_writer.put(self._metrics_writer.metrics.prompt_tokens.increment, len(ids))

    def _abort(self, request_id: str, client_gone: bool) -> None:
        live = self._live.get(request_id)
        if live is not None and not live.cancelled:
            live.cancelled = client_gone
            self.engine.abort(request_id)  # its final delta arrives with the next step

    def _poll_cancellations(self) -> None:
        """Find cancelled requests (at most ``cancel_poll_batch`` checks, in turn); aborted after the step."""
        now = time.monotonic()
        if now - self._last_poll < self.cancel_poll_s:
            return
        self._last_poll = now
        lives = list(self._live.values())
        if not lives:
            return
        start = self._poll_cursor % len(lives)
        batch = (lives[start:] + lives[:start])[: self.cancel_poll_batch]
        self._poll_cursor = start + len(batch)
        checked = [live for live in batch if not live.cancelled]
        self._cancelled.extend(live.request_id for live in checked if live.sink.is_cancelled())
        metrics = self.metrics
        if metrics is not None:  # the Triton layer's cost, in the metrics
            metrics.cancel_checks.increment(len(checked))
            metrics.cancel_check_seconds.increment(time.monotonic() - now)

    def _publish_step_metrics(self) -> None:
        writer = self._metrics_writer
        if writer is None:
            return
        metrics = writer.metrics
        if self._step_tokens:
            writer.record_step(self._step_tokens, self._step_ttfts, self._step_itls)
            self._step_tokens, self._step_ttfts, self._step_itls = 0, [], []
        now = time.monotonic()
        if (
            now - self._last_stats_time >= _SCHEDULER_STATS_INTERVAL_S
            or not self.engine.has_unfinished_requests()
        ):
            self._last_stats_time = now
            writer.put(metrics.update_scheduler, self.engine.stats())

    def _handle_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            self._record_tokens(live, out, now)
            # NOTE: an error ends the whole request at its first sequence's (its others' are not sent)
            if out.finished or out.finish_reason == "error":
                del self._live[out.request_id]
                if self._metrics_writer is not None:
                    self._metrics_writer.put(
                        self._metrics_writer.metrics.request_finished,
                        out.finish_reason or "error",
                        len(live.prompt_token_ids),
                        live.num_output_tokens,
                        now - live.arrival,
                    )
            if out.finish_reason == "error":
                error = ServiceError(ErrorKind.INTERNAL, out.error or "engine step failed")
                self._responses.put(live, None, error, True)
            elif out.finish_reason == "abort" and live.cancelled:
                if out.finished:  # the request's last sequence
                    self._responses.put(live, None, None, True)  # the client has gone: a bare FINAL flag
            else:
                self._responses.queue_output(live, out)

    def _record_tokens(self, live: GenerateRequest, out: RequestOutput, now: float) -> None:
        n = len(out.new_token_ids)
        if not n:
            return
        live.num_output_tokens += n
        if self._metrics_writer is not None:
            self._step_tokens += n
            if live.first_token_time is None:
                self._step_ttfts.append(now - live.arrival)
            else:
                self._step_itls.append(now - (live.last_token_time or now))
        if live.first_token_time is None:
            live.first_token_time = now
        live.last_token_time = now

    def _fail_all(self, error: ServiceError) -> None:
        for live in list(self._live.values()):
            self._responses.put(live, None, None if live.cancelled else error, True)
        self._live.clear()

    def _drain_after_death(self) -> None:
        """After a fatal error, answer whatever still arrives until asked to stop."""
        while True:
            command, payload = self._inbox.get()
            if command == "stop":
                return
            if command == "add":
                self._responses.put(payload, None, self._dead_error(), True)

    def _dead_error(self) -> ServiceError:
        return ServiceError(ErrorKind.UNAVAILABLE, f"the inflight engine is not running: {self.fatal_error}")

    @property
    def num_open(self) -> int:
        """Submitted requests whose final response has not been sent yet."""
        return self._responses.num_open
