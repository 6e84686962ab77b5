"""`TokenStream`: the iterator of deltas that both transports (gRPC, HTTP) implement."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from .types import Delta, InflightError


class TokenStream(ABC):
    """An iterator of `Delta`s for one request; the last one has `finished=True`.

    Closing it early (`close()`, `cancel()`, leaving a `with` block, or dropping it) cancels the request
    on the server. An error raises `InflightError` and ends the stream.
    """

    def __init__(self, timeout_s: float | None) -> None:
        self.done = False
        self.deadline = time.monotonic() + timeout_s if timeout_s is not None else None

    def remaining_s(self) -> float | None:
        """Seconds left before the request's deadline; InflightError(DEADLINE_EXCEEDED) once it passed."""
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise InflightError("the request did not finish within its timeout", "DEADLINE_EXCEEDED")
        return remaining

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Delta:
        if self.done:
            raise StopIteration
        try:
            delta = self._next_delta()
        except BaseException:
            self.done = True
            self._shutdown(cancel=True)
            raise
        if delta.finished:
            self.done = True
            self._shutdown(cancel=False)
        return delta

    def cancel(self) -> None:
        """Stop the request now (the server is told to cancel it); iteration then stops."""
        if not self.done:
            self.done = True
            self._shutdown(cancel=True)

    def close(self) -> None:
        """Same as `cancel()`: a stream closed before its last delta cancels its request."""
        self.cancel()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 (never raise from a finalizer)
            pass

    @abstractmethod
    def _next_delta(self) -> Delta:
        """Block for the next response (respecting `remaining_s()`)."""

    @abstractmethod
    def _shutdown(self, cancel: bool) -> None:
        """Release the connection; with `cancel`, tell the server to stop the request."""
