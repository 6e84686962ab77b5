"""_TritonSink: no cancellation poll while a response is being sent, nor after the final one.

Triton 2.51 frees a request's response factory with its final response; a poll in that window crashed
tritonserver (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled). This drives a sink from two threads
with a sender double that records any poll overlapping a send or following the final one.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np

from inflight.backend.engine_service import ErrorKind, ServiceError
from inflight.backend.triton_model import _TritonSink

FINAL = 1
PB = SimpleNamespace(
    TRITONSERVER_RESPONSE_COMPLETE_FINAL=FINAL,
    Tensor=lambda name, value: (name, value),
    InferenceResponse=lambda output_tensors=None, error=None: (output_tensors, error),
    TritonError=type("TritonError", (), {"__init__": lambda self, msg, code=None: None, "INTERNAL": 13,
                                          "UNAVAILABLE": 14, "INVALID_ARG": 3, "CANCELLED": 1}),
)  # fmt: skip


class SenderDouble:
    def __init__(self) -> None:
        self.sending = False
        self.closed = False
        self.bad_polls = 0
        self.polls = 0
        self.sent: list[tuple] = []

    def send(self, response=None, flags=0) -> None:
        self.sending = True
        time.sleep(0.0005)  # a round trip to the server: the window a racing poll would hit
        self.sent.append((response, flags))
        self.closed = self.closed or flags == FINAL
        self.sending = False

    def is_cancelled(self) -> bool:
        self.polls += 1
        if self.sending or self.closed:
            self.bad_polls += 1
        return False


def test_polls_never_overlap_a_send_or_follow_the_final() -> None:
    for final_error in (None, ServiceError(ErrorKind.INTERNAL, "boom")):
        sender = SenderDouble()
        sink = _TritonSink(PB, sender)
        done = threading.Event()

        def poll(sink: _TritonSink = sink, done: threading.Event = done) -> None:
            while not done.is_set():
                sink.is_cancelled()

        poller = threading.Thread(target=poll)
        poller.start()
        outputs = {"output_ids": np.array([1], dtype=np.int32)}
        for _ in range(200):
            sink.send(outputs, None, False)
        sink.send(None if final_error else outputs, final_error, True)
        time.sleep(0.01)  # polls after the final response
        done.set()
        poller.join()
        assert sender.polls > 0 and sender.bad_polls == 0, (sender.polls, sender.bad_polls)
        assert len(sender.sent) == 201 and sender.sent[-1][1] == FINAL
        assert sink.is_cancelled()  # after the final response: cancelled, without asking the sender
