"""A streaming load generator: the same request schedule through Triton (gRPC) or into the engine in-process.

::

    schedule(...) -> [RequestSpec]          random-token prompts of exact lengths; Poisson arrival offsets
          │
    drive(specs, open_request, concurrency) sends each request at its arrival time (rate mode) or when one
          │                                  of `concurrency` slots frees (concurrency mode)
          ▼
    open_request(spec, record, done)         a transport: TritonTarget (a pool of persistent gRPC streams,
                                             one request in flight on each) or EngineDirectTarget
                                             (EngineService in this process); each stamps every response
                                             as it arrives
          ▼
    summarize(records) -> TTFT / ITL / TPOT / E2E percentiles, output tok/s, req/s

Timestamps are `time.monotonic()` taken where the response arrives: in the gRPC stream's callback for
Triton, in the service's response thread (where Triton's sender would be called) for engine-direct. A
response may carry several tokens (text held back for an incomplete character): each of its k tokens is
given 1/k of the gap to the previous response as its inter-token latency.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RequestSpec:
    """One request of a schedule: its prompt token ids, exact output length and arrival offset (rate mode)."""

    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float | None = None  # seconds after the start; None: as soon as a slot is free


@dataclass
class RequestRecord:
    """What one request did: when it was sent, when each response arrived and how many tokens it held."""

    input_len: int
    max_tokens: int
    sent: float = 0.0
    responses: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, tokens in it)
    finished: float | None = None
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.responses)

    def token_responses(self) -> list[tuple[float, int]]:
        return [(t, n) for t, n in self.responses if n]


# on_response(time, num_tokens, final, error) is what a transport calls for each response it gets.
OnResponse = Callable[[float, int, bool, "str | None"], None]
OpenRequest = Callable[[RequestSpec, OnResponse], None]


def schedule(
    num_requests: int, input_len: int | tuple[int, int], output_len: int | tuple[int, int], vocab_size: int,
    rate: float | None = None, seed: int = 0,
) -> list[RequestSpec]:  # fmt: skip
    """Random-token prompts (ids 10..vocab-10, so no special tokens at the ends of a small vocabulary).

    A length is a fixed int or a (low, high) pair drawn uniformly. With `rate` (requests/s), arrival offsets
    are a Poisson process: exponential gaps of mean 1/rate, the first request at 0.
    """
    rng = random.Random(seed)
    draw = lambda v: rng.randint(*v) if isinstance(v, tuple) else v
    specs, t = [], 0.0
    for i in range(num_requests):
        if rate is not None and i:
            t += rng.expovariate(rate)
        n_in, n_out = draw(input_len), draw(output_len)
        prompt = [rng.randrange(10, vocab_size - 10) for _ in range(n_in)]
        specs.append(RequestSpec(prompt, n_out, t if rate is not None else None))
    return specs


def drive(
    specs: list[RequestSpec], open_request: OpenRequest, concurrency: int | None = None,
    progress: Callable[[int], None] | None = None, timeout_s: float = 3600.0,
) -> list[RequestRecord]:  # fmt: skip
    """Run a schedule; returns one record per spec (in order).

    Rate mode (specs have `arrival_s`): each request is sent at its arrival time, at most `concurrency` in
    flight when given. Concurrency mode: `concurrency` requests are kept in flight. `progress(n)` is called
    with the number of requests finished so far (from the transports' threads).
    """
    records = [RequestRecord(len(s.prompt_ids), s.max_tokens) for s in specs]
    slots = threading.Semaphore(concurrency or len(specs))
    all_done = threading.Event()
    lock = threading.Lock()
    finished = [0]

    def make_callback(record: RequestRecord) -> OnResponse:
        def on_response(now: float, num_tokens: int, final: bool, error: str | None) -> None:
            if num_tokens:
                record.responses.append((now, num_tokens))
            if error is not None and record.error is None:
                record.error = error
            if final and record.finished is None:
                record.finished = now
                slots.release()
                with lock:
                    finished[0] += 1
                    count = finished[0]
                if progress is not None:
                    progress(count)
                if count == len(specs):
                    all_done.set()

        return on_response

    start = time.monotonic() + 0.01
    for spec, record in zip(specs, records, strict=True):
        if spec.arrival_s is not None:
            delay = start + spec.arrival_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        slots.acquire()
        record.sent = time.monotonic()
        callback = make_callback(record)
        try:
            open_request(spec, callback)
        except Exception as exc:  # noqa: BLE001 - a request that could not be sent is a failed request
            callback(time.monotonic(), 0, True, f"{type(exc).__name__}: {exc}")
    if specs and not all_done.wait(timeout_s):
        missing = sum(r.finished is None for r in records)
        raise TimeoutError(f"{missing} of {len(specs)} requests did not finish within {timeout_s:.0f} s")
    return records


def _percentiles(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    """mean, p50, p90, p99 in ms (None when there is nothing to measure)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    array = np.asarray(values) * scale
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"mean": round(float(array.mean()), 3), "p50": round(float(p50), 3), "p90": round(float(p90), 3),
            "p99": round(float(p99), 3)}  # fmt: skip


def summarize(records: list[RequestRecord]) -> dict[str, Any]:
    """Latency percentiles (ms) and throughput of one run; failed requests are counted, not measured."""
    ok = [r for r in records if r.error is None and r.token_responses()]
    ttft, e2e, itl, tpot = [], [], [], []
    for r in ok:
        responses = r.token_responses()
        first, last = responses[0][0], responses[-1][0]
        ttft.append(first - r.sent)
        e2e.append(last - r.sent)
        if r.num_tokens > 1:
            tpot.append((last - first) / (r.num_tokens - 1))
        # The first response's extra tokens arrived with the first one: ITL 0 each.
        itl.extend([0.0] * (responses[0][1] - 1))
        for (t_prev, _), (t, n) in zip(responses, responses[1:], strict=False):
            itl.extend([(t - t_prev) / n] * n)
    output_tokens = sum(r.num_tokens for r in ok)
    begin = min((r.sent for r in records), default=0.0)
    end = max((r.finished or r.sent for r in records), default=0.0)
    duration = max(end - begin, 1e-9)
    return {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "exact_output_lengths": sum(r.num_tokens == r.max_tokens for r in ok),
        "input_tokens": sum(r.input_len for r in ok),
        "output_tokens": output_tokens,
        # > 1 when responses carry several tokens (text held back: an incomplete character, an id the
        # tokenizer does not decode): TTFT then waits for the first decodable token.
        "tokens_per_response": round(output_tokens / max(sum(len(r.token_responses()) for r in ok), 1), 3),
        "duration_s": round(duration, 3),
        "output_tok_s": round(output_tokens / duration, 2),
        "total_tok_s": round((output_tokens + sum(r.input_len for r in ok)) / duration, 2),
        "req_s": round(len(ok) / duration, 4),
        "ttft_ms": _percentiles(ttft),
        "itl_ms": _percentiles(itl),
        "tpot_ms": _percentiles(tpot),
        "e2e_ms": _percentiles(e2e),
    }
