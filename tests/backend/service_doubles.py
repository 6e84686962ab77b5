"""Test doubles for the engine service's threads: sinks that record or block, a gate on the engine thread, a
clock per thread. With them a test decides the order in which the threads move, instead of hoping for it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from inflight.backend.engine.outputs import RequestOutput
from inflight.backend.serving import response_thread
from inflight.backend.serving import service as engine_service
from inflight.backend.serving.service import EngineService

# NOTE: every wait on another thread is bounded by this, so a broken service fails instead of hanging; the
# waits it bounds take milliseconds (a tiny model's steps), so only a hang reaches it.
HANG_S = 60.0


class FakeSink:
    """Records every response. ``cancel_at_check=n``: the client is gone from its n-th cancellation check on;
    ``check_log``: a list that every check appends this sink to (the order the streams were checked in)."""

    def __init__(self, cancel_at_check: int | None = None, check_log: list | None = None) -> None:
        self.responses: list[tuple] = []
        self.num_final = 0
        self.checks = 0
        self.cancel_at_check = cancel_at_check
        self.check_log = check_log
        self.done = threading.Event()  # the final response arrived
        self.changed = threading.Condition()  # notified on every response

    def send(self, outputs, error, final) -> None:
        with self.changed:
            self.responses.append((outputs, error, final))
            self.num_final += int(final)
            self.changed.notify_all()
        if final:
            self.done.set()

    def is_cancelled(self) -> bool:
        self.checks += 1
        if self.check_log is not None:
            self.check_log.append(self)
        return self.cancel_at_check is not None and self.checks >= self.cancel_at_check

    def wait_for_tokens(self, n: int) -> bool:
        """Wait (at most HANG_S) until the responses hold ``n`` tokens."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.token_ids) >= n, HANG_S)

    @property
    def token_ids(self) -> list[int]:
        return [i for o, _, _ in self.responses if o is not None for i in o["output_ids"].tolist()]

    @property
    def text(self) -> str:
        return "".join(o["text_output"][0].decode() for o, _, _ in self.responses if o is not None)

    @property
    def error(self):
        return next((e for _, e, _ in self.responses if e is not None), None)


class BlockingSink(FakeSink):
    """A sender whose first send blocks until the test sets ``release`` (a response stuck in Triton): the
    service's one response thread is held, so everything the engine produces meanwhile waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.sending = threading.Event()  # the first send has begun
        self.release = threading.Event()

    def send(self, outputs, error, final) -> None:
        if not self.sending.is_set():
            self.sending.set()
            self.release.wait(HANG_S)
        super().send(outputs, error, final)


class EngineGate:
    """Wraps a service's engine so that the test decides when the engine thread moves.

    ``hold_adds`` / ``release_adds``: requests are taken in only once released, so all queued by then go
    in together. ``close`` / ``open``: while closed, ``step`` and ``wait_for_small_step`` do nothing (no
    token, no cancellation poll; the engine loop goes on reading its inbox, so a stop still gets through).
    ``close_when(match)``: closes right after a call returns an output that matches (once).
    ``wait_idle``: waits until the engine thread finds nothing unfinished.
    """

    def __init__(self, service: EngineService, monkeypatch) -> None:
        engine = service.engine
        self._open = threading.Event()
        self._open.set()
        self._adds = threading.Event()
        self._adds.set()
        self._idle = threading.Event()
        self._close_when: Callable[[RequestOutput], object] | None = None
        real_add, real_busy = engine.add_checked_request, engine.has_unfinished_requests

        def gated(real: Callable[..., list[RequestOutput]]) -> Callable[..., list[RequestOutput]]:
            def call(*args, **kwargs) -> list[RequestOutput]:
                if not self._open.wait(0.01):  # closed: no progress; the loop reads its inbox and comes back
                    return []
                outputs = real(*args, **kwargs)
                match = self._close_when
                if match is not None and any(match(out) for out in outputs):
                    self._close_when = None
                    self._open.clear()
                return outputs

            return call

        def add(*args, **kwargs) -> int:
            self._adds.wait(HANG_S)
            return real_add(*args, **kwargs)

        def busy() -> bool:
            result = real_busy()
            # NOTE: the engine thread asks this only after it handled the outputs of its last step, so a
            # False here means every output, finals included, is queued for the response thread.
            if not result and threading.current_thread() is service._engine_thread:
                self._idle.set()
            return result

        monkeypatch.setattr(engine, "step", gated(engine.step))
        monkeypatch.setattr(engine, "wait_for_small_step", gated(engine.wait_for_small_step))
        monkeypatch.setattr(engine, "add_checked_request", add)
        monkeypatch.setattr(engine, "has_unfinished_requests", busy)

    def hold_adds(self) -> None:
        self._adds.clear()

    def release_adds(self) -> None:
        self._adds.set()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def close_when(self, match: Callable[[RequestOutput], object]) -> None:
        self._close_when = match

    def wait_idle(self) -> bool:
        """Wait (at most HANG_S) until the engine thread finds no unfinished request. Call it only once the
        requests waited for are in the engine (they produced an output)."""
        self._idle.clear()
        return self._idle.wait(HANG_S)


class ThreadClock:
    """Stands in for ``time`` in the engine service's module: each thread has a clock of its own (from 0) that
    moves only by ``advance`` and ``sleep``, so every duration the service measures on a thread is exactly
    what the test's doubles spent there. ``on_sleep``: what ``sleep`` does instead of sleeping."""

    def __init__(self, monkeypatch, on_sleep: Callable[[float], None] | None = None) -> None:
        self._local = threading.local()
        self.on_sleep = on_sleep
        monkeypatch.setattr(engine_service, "time", self)
        monkeypatch.setattr(response_thread, "time", self)  # the response thread times its sends

    def monotonic(self) -> float:
        return getattr(self._local, "now", 0.0)

    def advance(self, seconds: float) -> None:
        self._local.now = self.monotonic() + seconds

    def sleep(self, seconds: float) -> None:
        if self.on_sleep is not None:
            self.on_sleep(seconds)
        else:
            time.sleep(seconds)
        self.advance(seconds)
