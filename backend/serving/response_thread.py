"""The service's response side: one thread that sends every response, in order, and counts open requests.

The engine thread queues ``(request, outputs, error, final)``; for a stream it queues the sequence itself and
the response is built when this thread gets to it, from everything not sent yet, so a busy sender coalesces
tokens instead of falling behind. A request's final response drops its sender (Triton keeps a model that
still has one).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from inflight.backend.engine.outputs import RequestOutput
from inflight.backend.serving.metrics import EngineMetrics
from inflight.backend.serving.request import CLOSED_SINK, GenerateRequest, SequenceState, ServiceError
from inflight.backend.serving.responses import build_outputs

logger = logging.getLogger("inflight")


class ResponseThread:
    """Sends the queued responses; ``num_open`` counts submitted requests whose final has not gone yet."""

    def __init__(self, metrics: EngineMetrics | None, on_send_failed: Callable[[str], None]) -> None:
        self.metrics = metrics
        self._on_send_failed = on_send_failed  # (request id): a send failed, the request must end
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.stream_lock = threading.Lock()  # guards the unsent parts of streamed requests
        self.num_open = 0
        self._thread = threading.Thread(target=self._loop, name="inflight-responses", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """After what is queued: the thread ends."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def opened(self) -> None:
        """A request was submitted: one more final response to send."""
        with self._lock:
            self.num_open += 1
            self._set_open_gauge()

    def put(self, live: GenerateRequest, outputs: object, error: ServiceError | None, final: bool) -> None:
        self._queue.put((live, outputs, error, final))

    def queue_output(self, live: GenerateRequest, out: RequestOutput) -> None:
        """Queue what a delta of ``live`` sends: a stream's send (built when the thread gets to it), or a whole
        sequence's response once it finished."""
        seq = live.sequences[out.index]
        if live.stream:
            # NOTE: the response thread builds and sends a stream's response from everything unsent when it
            # gets to it, so a busy sender coalesces tokens (fewer, larger responses) instead of falling
            # behind and holding the engine thread. Every new token is sent, also one whose text is not out
            # yet (part of a UTF-8 character, a possible stop string held back, a skipped special token):
            # that response has empty text, as with Triton's vLLM and TensorRT-LLM backends. Held back to
            # the next text instead, a run of such tokens (a model repeating a special token under
            # ignore_eos, a long stop string) kept a stream silent to its end: its client saw the first
            # token only with the last, and a liveness guard could give up on it.
            # The FINAL flag goes with the request's last send (see _take_stream_response).
            with self.stream_lock:
                seq.token_ids.extend(out.new_token_ids)
                if out.new_logprobs:
                    seq.logprobs.extend(out.new_logprobs)
                if out.prompt_logprobs is not None:
                    seq.prompt_logprobs = out.prompt_logprobs  # sent with the next response, once
                seq.unsent_text.append(out.new_text)
                seq.last_delta = out
                live.all_finished = out.finished
                if (not out.new_token_ids and out.finish_reason is None) or seq.send_queued:
                    return
                seq.send_queued = True
            self.put(live, seq, None, False)
            return
        seq.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            seq.logprobs.extend(out.new_logprobs)
        if out.prompt_logprobs is not None:
            seq.prompt_logprobs = out.prompt_logprobs
        seq.text.append(out.new_text)
        if out.finish_reason is None:
            return
        # Not streamed: one response per sequence once it finished; the request's last one is FINAL.
        ids = seq.token_ids if live.exclude_input_in_output else live.prompt_token_ids + seq.token_ids
        outputs = build_outputs(
            live,
            live.prompt_text + "".join(seq.text),
            ids,
            seq.logprobs,
            out,
            len(live.prompt_token_ids),
            len(seq.token_ids),
            seq.prompt_logprobs,
        )
        self.put(live, outputs, None, out.finished)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            self._send(*item)
            # NOTE: no reference to a request may outlive its final response: Triton keeps the model (it
            # cannot unload) while any response sender is alive, and `item` would otherwise hold the last
            # one while this thread waits for the next.
            del item

    def _send(self, live: GenerateRequest, outputs: object, error: ServiceError | None, final: bool) -> None:
        start = time.monotonic()
        if isinstance(outputs, SequenceState):  # a stream's: built now from the sequence's unsent tokens
            outputs, final = self._take_stream_response(live, outputs)
        try:
            live.sink.send(outputs, error, final)
        except Exception:  # noqa: BLE001 - a client that went away must not stop the others
            logger.warning("sending a response for %s failed; cancelling it", live.request_id, exc_info=True)
            if not final:
                self._on_send_failed(live.request_id)
        metrics = self.metrics
        if metrics is not None:
            metrics.responses_sent.increment(1)
            metrics.response_send_seconds.increment(time.monotonic() - start)
        if final:
            live.sink = CLOSED_SINK  # drop the response sender now (see _loop)
            with self._lock:
                self.num_open -= 1
                self._set_open_gauge()

    def _take_stream_response(
        self, live: GenerateRequest, seq: SequenceState
    ) -> tuple[dict[str, np.ndarray], bool]:
        """One response with every token of a sequence not sent yet; final if the request's last delta is in
        and no other sequence has a send queued (with n > 1 a sequence's queued send may lie ahead of
        another's that holds older tokens: the FINAL waits for the last of them)."""
        with self.stream_lock:
            text, ids, logprobs, out, prompt_logprobs = (
                "".join(seq.unsent_text),
                seq.token_ids,
                seq.logprobs,
                seq.last_delta,
                seq.prompt_logprobs,
            )
            seq.unsent_text, seq.token_ids, seq.logprobs, seq.prompt_logprobs = [], [], [], None
            seq.send_queued = False
            final = live.all_finished and not any(s.send_queued for s in live.sequences)
        assert out is not None
        outputs = build_outputs(
            live, text, ids, logprobs, out, len(live.prompt_token_ids), len(ids), prompt_logprobs
        )
        return outputs, final

    def _set_open_gauge(self) -> None:
        metrics = self.metrics
        if metrics is not None:
            metrics.open_requests.set(self.num_open)
