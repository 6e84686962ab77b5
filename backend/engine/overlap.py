"""Async scheduling: the host plans and launches step N+1 before it reads step N's tokens.

    step() call k:   schedule N+1 ─ launch N+1 (forward + sample) ─ wait for N's tokens ─ detokenize N, outputs
    device:          ... N running ...............│ N+1 running ........................................

Step N+1 is planned before N's tokens are on the host: a decode whose input is N's token carries a
placeholder that the executor fills from N's sampled tensor on the device. A request N finishes (a stop
token) may then be computed once more for nothing; requests whose sampling reads their output history
(penalties, bad words) make the engine read N's tokens before it plans N+1.

A guided request (structured output) of N+1 needs its token of N accepted by its grammar matcher before
its mask is built; only its sampler needs the mask, not its forward. So it is planned and launched like
any other, and inside N+1's launch, once the forward is queued, the engine reads N's tokens, feeds the
matchers, builds the masks and then queues the sampler (``guided.py``, docs/structured-output.md).

Planned that early, N+1 cannot take in a request that arrives while N runs: it waits for N+2, a whole
step more to its first token. So the serving loop calls ``LLMEngine.wait_for_small_step`` before it takes in
new requests: a step of fewer than ``async_scheduling_min_batch`` requests (where the host's planning is
short) is waited for on the device first, then N+1 is planned with whatever arrived, launched, and only
then are N's tokens detokenized and turned into outputs, while N+1 runs::

    small steps:     wait for N ─ take in arrivals ─ schedule N+1 ─ launch N+1 ─ detokenize N, outputs
    device:          N running ─┘ (idle while N+1 is planned)    │ N+1 running .......................

A small step that ended a prompt is read right after the wait instead, so the request's first token does
not wait for N+1's planning and launch (once per request, the device idles that much longer).
"""

from __future__ import annotations

from inflight.backend.executor.executor import StepHandle


class StepOverlap:
    """Holds the step in flight and says, at each point of a step, which launched step to read."""

    def __init__(self, enabled: bool, min_batch: int) -> None:
        self.enabled = enabled  # off: every step is read right after its launch
        self.min_batch = min_batch
        self.in_flight: StepHandle | None = None

    def begin(self, must_read_first: bool) -> tuple[StepHandle | None, StepHandle | None]:
        """At a step's start: (the step to read before planning, the step to read after the launch).

        ``must_read_first``: some request's sampling reads its output tokens, so they must be on the host
        before the next step is planned."""
        previous, self.in_flight = self.in_flight, None
        return (previous, None) if must_read_first else (None, previous)

    def launched(self, step: StepHandle | None) -> StepHandle | None:
        """Keep the step just launched in flight; returns it when it must be read now (overlap is off)."""
        if not self.enabled:
            return step
        self.in_flight = step
        return None

    def wait_if_small(self) -> StepHandle | None:
        """Wait on the device for a small step in flight (see the module docstring); returns it when its
        tokens must go out now (it ended a prompt), else it stays in flight, waited for."""
        step = self.in_flight
        if step is None or step.num_requests >= self.min_batch:
            return None
        step.wait()
        if not step.ends_a_prompt:
            return None
        self.in_flight = None
        return step
