"""The liveness guard of gRPC streams: a request whose model went away ends with an error instead of hanging.

Triton 2.51 never ends the requests that were running in a Python-backend stub process that died (`kill -9`,
out of memory): their streams stay open with no response, also after the model was unloaded or reloaded
(docs/serving.md, "Readiness"). So while a stream waits and no response arrived for `liveness_s` seconds,
one shared monitor thread asks the server whether it is live and the model ready; if not, the stream gets a
`ModelUnavailableError` (through its own callback, so subclasses that read responses there see it too).

A ready model is never second-guessed: a request that waits in a long queue stays open. A reload that
completes before the check runs hides the death (the request then ends only at its own timeout).
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Protocol

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


class LivenessFailure(InferenceServerException):
    """What a stream's callback receives when the guard ends its request (gRPC status UNAVAILABLE)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status="StatusCode.UNAVAILABLE")


class Guarded(Protocol):
    url: str
    model: str
    liveness_s: float
    last_event: float

    def fail_liveness(self, message: str) -> None: ...


class _Monitor(threading.Thread):
    """Checks the idle streams of every (url, model) every `interval_s`; one readiness query per pair."""

    interval_s = 0.25

    def __init__(self) -> None:
        super().__init__(name="inflight-liveness", daemon=True)
        self._streams: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._clients: dict[str, grpcclient.InferenceServerClient] = {}

    def add(self, stream: Guarded) -> None:
        with self._lock:
            self._streams.add(stream)
        self._wake.set()

    def remove(self, stream: Guarded) -> None:
        with self._lock:
            self._streams.discard(stream)

    def run(self) -> None:
        while True:
            with self._lock:
                streams = list(self._streams)
            if not streams:
                self._wake.wait()
                self._wake.clear()
                continue
            now = time.monotonic()
            idle: dict[tuple[str, str], list[Guarded]] = {}
            for s in streams:
                if now - s.last_event >= s.liveness_s:
                    idle.setdefault((s.url, s.model), []).append(s)
            for (url, model), group in idle.items():
                problem = self._problem(url, model, timeout_s=max(2.0, min(s.liveness_s for s in group)))
                if problem is None:
                    for s in group:  # ready: look again after another liveness_s
                        s.last_event = time.monotonic()
                    continue
                for s in group:
                    self.remove(s)
                    s.fail_liveness(f"{problem}; the request was not completed")
            time.sleep(self.interval_s)

    def _problem(self, url: str, model: str, timeout_s: float) -> str | None:
        """None when the server is live and the model ready; otherwise what is wrong."""
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = grpcclient.InferenceServerClient(url)
        try:
            if not client.is_server_live(client_timeout=timeout_s):
                return f"the server at {url} is not live"
        except InferenceServerException as err:
            return f"the server at {url} does not answer its liveness check ({err.message()})"
        try:
            if client.is_model_ready(model, client_timeout=timeout_s):
                return None
        except InferenceServerException as err:
            return f"model '{model}' is not ready ({err.message()})"
        return f"model '{model}' is not ready (its backend stopped or it was unloaded)"


_monitor: _Monitor | None = None
_monitor_lock = threading.Lock()


def watch(stream: Guarded) -> None:
    """Guard `stream` until `unwatch` (its request ended)."""
    global _monitor
    with _monitor_lock:
        if _monitor is None or not _monitor.is_alive():
            _monitor = _Monitor()
            _monitor.start()
    _monitor.add(stream)


def unwatch(stream: Guarded) -> None:
    if _monitor is not None:
        _monitor.remove(stream)
