"""_TritonSink: no cancellation poll while a response is being sent, nor after the final one.

Triton 2.51 frees a request's response factory with its final response; a poll in that window crashed
tritonserver (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled). This drives a sink from two threads
with a sender double that records any poll overlapping a send or following the final one.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np

from inflight.backend.serving.request import ErrorKind, ServiceError
from inflight.backend.serving.triton_model import _TritonSink

from .service_doubles import HANG_S

FINAL = 1
PB = SimpleNamespace(
    TRITONSERVER_RESPONSE_COMPLETE_FINAL=FINAL,
    Tensor=lambda name, value: (name, value),
    InferenceResponse=lambda output_tensors=None, error=None: (output_tensors, error),
    TritonError=type("TritonError", (), {"__init__": lambda self, msg, code=None: None, "INTERNAL": 13,
                                          "UNAVAILABLE": 14, "INVALID_ARG": 3, "CANCELLED": 1}),
)  # fmt: skip


class PollCount:
    """How many polls the test's poller thread has made (a poll: one ``sink.is_cancelled()`` returned)."""

    def __init__(self) -> None:
        self.n = 0
        self.changed = threading.Condition()

    def add(self) -> None:
        with self.changed:
            self.n += 1
            self.changed.notify_all()

    def wait_for_two_more(self) -> None:
        """Wait until two more polls returned: the second began after this call did."""
        with self.changed:
            target = self.n + 2
            assert self.changed.wait_for(lambda: self.n >= target, HANG_S), "the poller stopped"


class SenderDouble:
    """Records every poll that reaches it while a send runs or after the final; each send lasts until two of
    the poller's polls have returned, so a poll always races it."""

    def __init__(self, poller: PollCount) -> None:
        self.poller = poller
        self.sending = False
        self.closed = False
        self.bad_polls = 0
        self.polls = 0
        self.sent: list[tuple] = []

    def send(self, response=None, flags=0) -> None:
        self.sending = True
        self.poller.wait_for_two_more()
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
        polled = PollCount()
        sender = SenderDouble(polled)
        sink = _TritonSink(PB, sender)
        done = threading.Event()

        def poll(sink: _TritonSink = sink, done: threading.Event = done, polled: PollCount = polled) -> None:
            while not done.is_set():
                sink.is_cancelled()
                polled.add()

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            polled.wait_for_two_more()  # before any send: these polls reach the sender
            outputs = {"output_ids": np.array([1], dtype=np.int32)}
            for _ in range(200):
                sink.send(outputs, None, False)
            sink.send(None if final_error else outputs, final_error, True)
            polled.wait_for_two_more()  # polls after the final response
        finally:
            done.set()
            poller.join()
        assert sender.polls > 0 and sender.bad_polls == 0, (sender.polls, sender.bad_polls)
        assert len(sender.sent) == 201 and sender.sent[-1][1] == FINAL
        assert sink.is_cancelled()  # after the final response: cancelled, without asking the sender
